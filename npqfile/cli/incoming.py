"""``npqfile incoming URI --ram SIZE``: the destination of ``npqfile migrate`` (QEMU's ``-incoming``).

Supports: ``tcp:HOST:PORT`` and ``unix:PATH`` (listen, accept one connection; port 0
picks a free port), ``file:PATH``, ``exec:CMD``, ``fd:N``; a guest of one block
(``--block``, default ``ram`` as QEMU's ``-M none``) of ``--ram`` bytes that the stream
must match, as QEMU demands, or (``--max-ram``) the blocks the stream declares, as a real
QEMU ``-M pc`` source sends them (its device sections after the RAM are stepped over
with the vmdesc it sends after EOF); the machine name check; channel decompression matching the
source's ``--compress zstd``/``lz4``; ``--stall-timeout`` (tcp:/unix:): a source that sends
nothing for that long (stopped, hung, network gone) fails the migration with an error
saying so instead of a wait forever.  When listening, the first line on stdout
(on stderr with ``--json`` or ``--events -``, so stdout is JSON only) is ``listening on URI``
(with the real port), so scripts can start the source.  At the end
it prints the result (``--json``: status, error, machine, load time, per-block sha256)
and, over tcp/unix, sends the verdict and hashes back to the source on the return path
(see ``npqfile.migration.destination``).  ``--multifd-channels N`` (QEMU's
``multifd`` capability and ``multifd-channels`` parameter on the destination) accepts
the main channel and N multifd channels in any order, told apart by their first bytes;
``--multifd-compression`` must match the source's.  ``--events FILE|-``: live JSON lines
(setup, active with the bytes read so far, completed/failed, then the ``--json``
result; ``npqfile.migration.events``).  Postcopy (a QEMU or npqfile source with
postcopy-ram): QEMU's return-path messages, pages placed through userfaultfd, and with
``--workload`` a guest running on the RAM from POSTCOPY_RUN on; a source lost during
postcopy gives status ``postcopy-paused``.

Exit status: 0 when the stream loaded completely, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from npqfile.channels import listen, open_channel
from npqfile.migration.compression import DecompressingReader, parse_compress
from npqfile.migration.destination import Destination
from npqfile.migration.events import EventWriter, IncomingEvents
from npqfile.migration.options import (
    MULTIFD_COMPRESSION, migrate_caps_check, migrate_params_check, migration_channels_and_transport_compatible,
)
from npqfile.migration.session import add_guest_block
from npqfile.migration.verdict import STALL_TIMEOUT
from npqfile.migration.workloads import make_workload
from npqfile.ram import GuestRAM
from npqfile.units import format_bytes, parse_size

NAME = "incoming"
HELP = "receive a migration (like qemu -incoming URI) and report per-block sha256"
ORDER = 21


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri", help="tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD or fd:N")
    p.add_argument("--ram", default="256M", help="guest RAM size the stream must declare (default 256M)")
    p.add_argument("--block", default="ram", help="RAM block name (default ram, QEMU -M none)")
    p.add_argument("--max-ram", metavar="SIZE", default=None,
                   help="take the RAM blocks the stream declares (a real QEMU -M pc: pc.ram, pc.bios, "
                        "pc.rom, ...), at most SIZE in total, instead of one --block of --ram")
    p.add_argument("--machine", default="none", help="expected machine name (default none; any: do not check)")
    p.add_argument("--compress", default="none", help="the source's --compress (zstd/lz4 decode the channel)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the connection (> 0; default: forever)")
    p.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT, metavar="SECONDS",
                   help="tcp:/unix: give up when the source sends nothing for SECONDS "
                        f"(default {STALL_TIMEOUT:g}; above any --pause-before-switchover of the source)")
    p.add_argument("--workload", default=None, metavar="SPEC",
                   help="postcopy: run this workload (as migrate --workload) on the RAM from POSTCOPY_RUN on; "
                        "its accesses to pages not yet received fault and are requested from the source")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--events", metavar="FILE|-",
                   help="write live query-migrate events as JSON lines (the last line: the --json result)")
    p.add_argument("--multifd-channels", type=int, default=0, metavar="N",
                   help="accept QEMU 10.0 multifd: the main channel plus N multifd channels (tcp:/unix:)")
    p.add_argument("--multifd-compression", default="none", choices=MULTIFD_COMPRESSION,
                   help="the source's multifd-compression (default none)")
    p.add_argument("--no-hash", action="store_true",
                   help="skip the per-block sha256 (file:, exec:, fd: only: a tcp:/unix: source verifies with it)")


def _accept(uri: str, timeout: float | None, out: Any = None) -> Any:
    with listen(uri) as listener:
        print(f"listening on {listener.uri}", file=out or sys.stdout, flush=True)
        return listener.accept(timeout)


def _multifd_setup(args: argparse.Namespace, ram: GuestRAM):
    """The MultiFDRecv for ``--multifd-channels``; ValueError for a bad combination."""
    from npqfile.migration.multifd_recv import MultiFDRecv
    migration_channels_and_transport_compatible(args.uri, multifd=True, prefix="--")
    migrate_caps_check(multifd=True, stream_compression=args.compress != "none", prefix="--")
    return MultiFDRecv(ram, args.multifd_channels, compression=args.multifd_compression)


def _accept_multifd(uri: str, recv, timeout: float | None, out: Any = None) -> Any:
    from npqfile.migration.multifd_recv import accept_channels
    with listen(uri) as listener:
        listener.set_backlog(recv.n + 1)     # before anyone is told to connect
        print(f"listening on {listener.uri}", file=out or sys.stdout, flush=True)
        return accept_channels(listener, recv, timeout)


def check_timeout(timeout: float | None, option: str = "--timeout") -> None:
    """ValueError naming ``option`` unless ``timeout`` is None or a finite number > 0
    (the socket layer would say "Resource temporarily unavailable" for 0)."""
    if timeout is not None and not 0 < timeout < float("inf"):
        raise ValueError(f"{option} must be a positive number of seconds, got {timeout:g}")


def machine_text(machine: str | None) -> str:
    """How the stream named its machine: None means it sent no configuration section
    (QEMU's send-configuration off), so there was no machine name to check."""
    if machine is None:
        return "machine not declared (the stream has no configuration section)"
    return f"machine {machine}"


def run(args: argparse.Namespace) -> int:
    comp = parse_compress(args.compress)
    size = parse_size(args.ram)
    check_timeout(args.timeout)
    if args.no_hash and args.uri.startswith(("tcp:", "unix:")):
        raise ValueError("--no-hash: a tcp:/unix: source verifies the migration with the per-block sha256")
    check_timeout(args.stall_timeout, "--stall-timeout")
    migrate_params_check(multifd_channels=args.multifd_channels, multifd_compression=args.multifd_compression,
                         prefix="--")
    events = EventWriter.open(args.events) if args.events else None
    out = sys.stderr if args.events == "-" else sys.stdout      # stdout carries the event lines
    # the "listening on" status line goes to stderr whenever stdout carries JSON
    status = sys.stderr if args.events == "-" or args.json else sys.stdout
    ram = GuestRAM()
    max_ram = parse_size(args.max_ram) if args.max_ram is not None else None
    dest = None
    try:
        if max_ram is None:
            add_guest_block(ram, args.block, size)
        incoming = IncomingEvents(events)
        recv = None
        if args.multifd_channels:
            if max_ram is not None:
                raise ValueError("--multifd-channels needs the guest RAM up front (--ram), not --max-ram: "
                                 "multifd packets may arrive before the block list")
            recv = _multifd_setup(args, ram)
            channel = _accept_multifd(args.uri, recv, args.timeout, status)
        elif args.uri.startswith(("tcp:", "unix:")):
            channel = _accept(args.uri, args.timeout, status)
            channel.set_stall_timeout(args.stall_timeout, "the source")
        else:
            channel = open_channel(args.uri, "r")
        if comp.on_channel:
            channel = DecompressingReader(channel, comp)
        guest = make_workload(args.workload) if args.workload else None
        dest = Destination(ram if max_ram is None else None, machine=None if args.machine == "any" else args.machine,
                           multifd=recv, guest=guest, max_ram_name="--max-ram", hash_blocks=not args.no_hash,
                           **({} if max_ram is None else {"max_ram_bytes": max_ram}))
        incoming.active(dest)
        res = dest.receive(channel)
        incoming.result(res.as_dict())
        if args.json:
            print(json.dumps(res.as_dict(), indent=2), file=out)
        elif res.status == "completed":
            main = " on the main channel" if res.stats_multifd else ""
            print(f"completed: {format_bytes(res.bytes)}{main} in {res.load_time * 1000:.1f} ms; "
                  f"{machine_text(res.machine)}", file=out)
            for name, digest in res.hashes.items():
                print(f"  {name}: sha256 {digest}", file=out)
            if res.stats_multifd:
                m = res.stats_multifd
                print(f"  multifd: {m['channels']} channels ({m['compression']}), {format_bytes(m['multifd-bytes'])}, "
                      f"{m['normal']} normal and {m['zero']} zero pages", file=out)
        if res.status != "completed":
            print(f"error: incoming migration {res.status} after {res.bytes} bytes: {res.error}", file=sys.stderr)
            return 1
        return 0
    finally:
        if events is not None:
            events.close()
        ram.close()
        if dest is not None and dest.ram is not None and dest.ram is not ram:
            dest.ram.close()   # the blocks the stream declared (--max-ram)
