"""The destination's verdict: who can give one, how long to wait for it, what its absence means.

Supports: :func:`peer_of` (from the destination URI and ``--peer``: is the peer an
npqfile destination that sends a verdict, a QEMU that sends none, or no peer at all),
:func:`verdict_wait` (how long the source waits for the verdict after its last byte),
:func:`await_verdict` (read the verification message of an npqfile destination on the
return path, see ``destination``, and turn it -- or its absence -- into the run's
verification and status) and the verification dicts shared by the session
(:func:`destination_failed`, :func:`compare_hashes`).

Goals: a failed migration is never reported as a success.  An npqfile destination
(``tcp:``/``unix:`` to ``npqfile incoming``; ``--peer npqfile``, the default) that dies,
stalls or closes without its verdict fails the migration, even after the source wrote
its last byte: a socket that accepted the bytes is not a destination that holds the
guest.  Only a peer known to send no verdict (``--peer qemu``, ``file:`` snapshots
aside: they are loaded back; ``exec:``, ``fd:``, ``null:``) ends "completed, not
verified".  The wait is bounded: the stall timeout plus the time the destination
needs to hash the RAM at a slow rate, and a ``MigrationControl`` cancel (Ctrl-C) ends it at
once, for an in-process destination too (:func:`cancelled_wait` says what the cancel means:
``cancelled`` in pre-copy, "not verified" once postcopy has switched; never a release).
Plan: pure decisions (``peer_of``, ``verdict_wait``, ``cancelled_wait``) apart from the
one I/O function.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from npqfile.channels.base import wait_readable
from npqfile.errors import StreamError
from npqfile.migration.destination import read_verification
from npqfile.migration.stats import MigrationStats

NPQFILE = "npqfile"
QEMU = "qemu"
PEERS = (NPQFILE, QEMU)
STALL_TIMEOUT = 30.0          # seconds without progress before a peer is given up (both sides)
HASH_RATE_FLOOR = 64 << 20    # bytes/s: the slowest a destination is expected to hash its RAM
FAILED_REPLY_WAIT = 2.0       # after our own failure: seconds to wait for the destination's reason


@dataclass(frozen=True)
class Peer:
    """The destination as the source sees it: ``scheme`` of the URI (``inprocess`` for the
    default) and ``kind``: ``npqfile`` (sends a verdict), ``qemu`` (sends none) or
    ``none`` (no process on the other end that could: file, command, fd, null)."""
    scheme: str
    kind: str

    @property
    def remote(self) -> bool:
        """A tcp:/unix: connection (it has a return path)."""
        return self.scheme in ("tcp", "unix")

    @property
    def sends_verdict(self) -> bool:
        """The destination confirms what it holds (in-process, or an npqfile peer)."""
        return self.scheme == "inprocess" or (self.remote and self.kind == NPQFILE)

    def why_no_verdict(self) -> str:
        """Why no verdict can come (for messages); "" when one can."""
        if self.sends_verdict:
            return ""
        if self.kind == QEMU:
            return "a QEMU destination (--peer qemu) sends none"
        return f"a {self.scheme}: destination cannot send one"


def peer_of(to: str | None, peer: str | None = None) -> Peer:
    """The Peer behind the destination URI ``to`` (None / "inprocess": this process).
    ``peer``: ``npqfile`` (default for tcp:/unix:) or ``qemu``.  ValueError for an
    unknown ``peer`` or one given for a URI without a peer process."""
    to = to or "inprocess"
    scheme = "inprocess" if to == "inprocess" else to.split(":", 1)[0]
    if peer is not None and peer not in PEERS:
        raise ValueError(f"--peer must be one of {', '.join(PEERS)}, not {peer!r}")
    if scheme in ("tcp", "unix"):
        return Peer(scheme, peer or NPQFILE)
    if peer is not None:
        raise ValueError(f"--peer applies to tcp: and unix: destinations, not {to!r}")
    return Peer(scheme, NPQFILE if scheme == "inprocess" else "none")


def verdict_wait(stall_timeout: float, ram_bytes: int) -> float:
    """Seconds to wait for the verdict after the last byte: the stall timeout plus the
    destination's hashing of ``ram_bytes`` at HASH_RATE_FLOOR."""
    return stall_timeout + ram_bytes / HASH_RATE_FLOOR


def destination_failed(method: str, reason: str | None) -> dict:
    """The verification of a run whose destination failed: nothing was compared, so
    ``done`` is False and ``error`` says why; ``ok`` is False (the guest did not arrive)."""
    return {"method": method, "ok": False, "done": False, "error": f"destination failed: {reason}"}


def compare_hashes(mine: dict[str, str], theirs: dict[str, str]) -> dict:
    """The verification from the source's and the destination's per-block sha256.  No
    source hashes compare nothing: that is never "equal" (``ok`` False, ``done`` False)."""
    if not mine:
        return {"method": "sha256", "ok": False, "done": False, "error": "no source hashes to compare"}
    bad = sorted(n for n in mine if theirs.get(n) != mine[n])
    return {"method": "sha256", "ok": not bad, "mismatched": bad}


def _no_verdict(st: MigrationStats, why: str) -> dict:
    """An npqfile destination gave no verdict: the run failed (the guest may not have
    arrived); returns the verification saying so."""
    st.status, st.converged, st.outcome = "failed", False, f"error: {why}"
    return {"method": "sha256", "ok": False, "done": False, "error": why}


def cancelled_wait(st: MigrationStats, switched: bool) -> dict:
    """A ``migrate_cancel`` (Ctrl-C) that ended the wait for a completed run's verdict;
    returns the verification and updates ``st``.

    Pre-copy (``switched`` False): the source still holds the guest and its RAM, as QEMU's
    source does while ``migration_completion`` awaits the return path's SHUT (state still
    ``device``, so ``migration_cancel`` moves it to ``cancelling``): the run is
    ``cancelled``.  After postcopy switched (the package with RUN was sent) the guest runs
    on the destination: QEMU 10.0 refuses ``migrate_cancel`` in postcopy ("Postcopy
    migration in progress, cannot cancel.") and ``migration_cancel`` changes nothing once
    the migration is no longer running (``completed``).  The status stays QEMU's; the
    verification says it was not obtained (completion ``not-verified``)."""
    if not switched:
        st.status, st.converged = "cancelled", False
        st.outcome = "cancelled while waiting for the destination's verdict"
        return {}
    return {"method": "sha256", "ok": None, "done": False,
            "error": "interrupted before the destination's verdict; the postcopy migration had already "
                     f"{st.status} (the guest runs on the destination: migrate_cancel cannot undo it)"}


def await_verdict(f: Any, st: MigrationStats, src_hashes: dict | None, *, wait: float,
                  control: Any = None, rp: Any = None, switched: bool = False) -> dict:
    """Half-close the source's side of the connection of the QEMUFile ``f``, then read
    the npqfile destination's verdict on the return path for up to ``wait`` seconds
    (after a failed run only FAILED_REPLY_WAIT, for its reason; after a stall not at all).  Returns the
    verification dict and updates ``st``: no verdict in time, a closed connection, a
    broken return path or a failed destination make a completed run ``failed``; a
    ``control`` cancel during the wait ends it at once (``cancelled_wait``: ``cancelled``,
    or after postcopy ``switched`` not verified).  ``src_hashes`` None:
    verification off (the destination's status still counts).  ``rp``: the return path
    to read (postcopy's, already read up to SHUT); default a new one from ``f``."""
    failed = st.status != "completed"
    if st.status == "cancelled" or (failed and f.get_error() == -errno.ETIMEDOUT):
        return {}                   # a stalled peer has no reason to give either
    timed_out = False
    try:
        if not failed:
            finish = getattr(f.channel, "finish", None)
            if finish is not None:
                finish()            # the zstd frame ends before our half of the connection
            f.channel.shutdown(False, True)
        rp = rp or f.get_return_path()
        if rp is None:
            return {} if failed else _no_verdict(st, "the connection has no return path for the verdict")
        try:
            fd = rp.channel.fileno()
            fds = [fd] + ([control.wait_fd()] if control is not None else [])
            ready = wait_readable(fds, FAILED_REPLY_WAIT if failed else wait)
            # a verdict already there wins over a cancel (QEMU: SHUT received, the run is
            # completed, migrate_cancel no longer applies); otherwise the cancel ends the wait
            if control is not None and control.cancelled and fd not in ready:
                return {} if failed else cancelled_wait(st, switched)
            timed_out = fd not in ready
            msg = None if timed_out else read_verification(rp)
        finally:
            rp.close()
    except (OSError, StreamError) as exc:
        return {} if failed else _no_verdict(st, f"no verdict from the destination: {exc}")
    if msg is None:
        if failed:
            return {}
        if timed_out:
            return _no_verdict(st, f"the destination sent no verdict within {wait:g} s (stalled?)")
        return _no_verdict(st, "the destination closed the connection without its verdict (it failed, "
                               "or it is not npqfile: use --peer qemu for a QEMU destination)")
    st.destination = msg
    if msg.get("status") != "completed":
        if failed:
            st.outcome += f" (destination: {msg.get('error')})"
        else:
            st.status, st.converged = "failed", False
            st.outcome = f"error: destination failed: {msg.get('error')}"
        return destination_failed("sha256", msg.get("error"))
    if src_hashes is None:
        return {"method": None, "ok": None, "note": "verification off"}
    return compare_hashes(src_hashes, msg.get("hashes", {}))
