"""The migration's capabilities and parameters: QEMU's ``migration/options.c``.

Supports :class:`MigrationParams`, the knobs of ``migrate-set-capabilities`` and
``migrate-set-parameters`` the simulator models (bandwidth, downtime limit, the limits
npqfile adds -- ``max_iterations``, ``time_limit``, ``on_limit`` -- zero-page
detection, XBZRLE, page compression, release-ram, pause-before-switchover, multifd,
mapped-ram, auto-converge, postcopy, the QEMU version whose stream is written), and which
capabilities, parameters and transports go together: :func:`migrate_caps_check`
(multifd, xbzrle, page compression, mapped-ram, postcopy-ram, release-ram, and what the
QEMU version of the stream or of the declared peer has), :func:`migrate_params_check`
(``multifd-channels``, ``multifd-compression``, ``zero-page-detection``),
:func:`migration_channels_and_transport_compatible` (QEMU's name, migration.c: multifd
needs sockets, mapped-ram a file) and :func:`check_migration_params` (all of it for a
``MigrationParams``).  Callers: ``MigrationParams.check``, ``npqfile migrate``,
``npqfile save``, ``npqfile incoming``, the multifd sender and receiver.

Goals: QEMU's names and QEMU's refusals; a combination is refused before anything is
sent, with the same clear message wherever it is asked for; ``prefix="--"`` names the
command-line options (``--multifd-channels``), ``""`` the parameters
(``multifd-channels``).  Plan: pure check functions of booleans, names and
:class:`~npqfile.stream.versions.QemuStreamVersion`, each raising ValueError for the first
combination that does not go; a dataclass the engine, the session, the CLI and the sweep
share, whose ``check()`` calls them and the throttle's own rules.  ``MigrationParams`` is
importable from ``npqfile.migration.engine`` as well (its historical home).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from npqfile.migration.throttle import AutoConverge
from npqfile.migration.throttle import check_params as check_throttle_params
from npqfile.stream.multifd import COMPRESSION_FLAGS
from npqfile.stream.versions import QemuStreamVersion, stream_version

ZERO_PAGE_DETECTION = ("none", "legacy", "multifd")
MULTIFD_COMPRESSION = tuple(COMPRESSION_FLAGS)     # none, zlib, zstd
MULTIFD_TRANSPORTS = ("tcp:", "unix:")             # a socket a channel


def migrate_caps_check(*, multifd: bool = False, xbzrle: bool = False, compress: bool = False,
                       stream_compression: bool = False, mapped_ram: bool = False, postcopy_ram: bool = False,
                       release_ram: bool = False, version: QemuStreamVersion | None = None,
                       peer: QemuStreamVersion | None = None, prefix: str = "") -> None:
    """Refuse capabilities that do not go together.  ``compress``: QEMU's compress
    capability (COMPRESS_PAGE records); ``stream_compression``: npqfile's ``--compress``
    of the whole main channel (not QEMU's); ``version``: the QEMU stream written (bounds
    COMPRESS_PAGE and mapped-ram); ``peer``: the QEMU version declared for the peer
    (multifd's wire format is QEMU 10.0's: a declared older peer cannot load it; None:
    not declared).  Returns None; ValueError naming the first conflict."""
    p = prefix
    if version is not None and compress:
        version.check_compress_pages()
    if version is not None and mapped_ram:
        version.check_mapped_ram()
    if peer is not None and multifd and not peer.multifd:
        raise ValueError(f"{p}multifd-channels speaks QEMU 10.0's multifd (RAM_SAVE_FLAG_MULTIFD_FLUSH, 8.1+; "
                         f"zero pages in packets, 9.0+), which QEMU {peer.name} cannot load: drop it for a "
                         f"{peer.name} peer")
    if multifd and xbzrle:
        raise ValueError("multifd is not compatible with xbzrle (QEMU: Multifd is not compatible with xbzrle)")
    if multifd and (compress or stream_compression):
        raise ValueError(f"{p}multifd-channels does not go with {p}compress: multifd is not compatible with "
                         f"compress (use {p}multifd-compression: multifd compresses per packet)")
    if multifd and release_ram:
        raise ValueError("multifd with release-ram is not supported here")
    if mapped_ram and (xbzrle or compress or stream_compression):
        raise ValueError(f"{p}mapped-ram cannot be combined with XBZRLE or compression: its pages sit "
                         f"uncompressed at fixed file offsets (QEMU refuses both)")
    if postcopy_ram and (multifd or mapped_ram):
        # QEMU sends postcopy pages on the main channel only; mapped-ram is a file: layout
        raise ValueError("postcopy cannot be combined with multifd channels or mapped-ram here "
                         "(QEMU: Mapped-ram migration is incompatible with postcopy)")


def migrate_params_check(*, multifd_channels: int = 0, multifd_compression: str = "none",
                         zero_page_detection: str | None = None, peer: QemuStreamVersion | None = None,
                         multifd: bool = False, prefix: str = "") -> None:
    """Refuse parameter values QEMU refuses, and multifd parameters without multifd.
    ``multifd_channels``: 0 is multifd off, unless ``multifd`` says it is on (the
    channels' own setup); ``zero_page_detection``: None when not set; ``peer`` as for
    :func:`migrate_caps_check` (zero-page-detection is QEMU 9.0+).  Returns None;
    ValueError naming the parameter."""
    p = prefix
    if not int(multifd) <= multifd_channels <= 255:
        raise ValueError(f"{p}multifd-channels must be 1..255 (0: off), not {multifd_channels}")
    if multifd_compression not in MULTIFD_COMPRESSION:
        raise ValueError(f"{p}multifd-compression must be one of {', '.join(MULTIFD_COMPRESSION)}, "
                         f"not {multifd_compression!r}")
    if multifd_compression != "none" and not multifd_channels:
        raise ValueError(f"{p}multifd-compression needs {p}multifd-channels")
    if zero_page_detection is not None:
        if zero_page_detection not in ZERO_PAGE_DETECTION:
            raise ValueError(f"{p}zero-page-detection must be one of {', '.join(ZERO_PAGE_DETECTION)}, "
                             f"not {zero_page_detection!r}")
        if peer is not None and not peer.zero_page_detection:
            raise ValueError(f"{p}zero-page-detection is a QEMU 9.0+ parameter that QEMU {peer.name} lacks: "
                             f"use {p}no-zero-detection or nothing for a {peer.name} peer")


def migration_channels_and_transport_compatible(uri: str | None, *, multifd: bool = False,
                                                mapped_ram: bool = False, prefix: str = "",
                                                where: str = "the destination") -> None:
    """Refuse a transport the capabilities cannot use: multifd needs a socket a channel
    (``tcp:``/``unix:``), mapped-ram a regular file (``file:PATH``, or a plain path where
    ``where`` takes one).  ``uri``: the transport (None: not given); ``where``: the option
    or role that names it, for the message.  Returns None; ValueError."""
    p = prefix
    shown = repr(uri) if uri else "nothing"
    if multifd and not (uri or "").startswith(MULTIFD_TRANSPORTS):
        subject = f"{p}multifd-channels" if p else "multifd"
        raise ValueError(f"{subject} needs a tcp: or unix: {'URI' if p else 'destination'}, not {shown}")
    if mapped_ram and not (uri or "").startswith("file:"):
        raise ValueError(f"{p}mapped-ram writes pages at fixed file offsets: {where} must be a regular file, "
                         f"not {shown} (it needs {where} file:PATH)")


def check_migration_params(params: Any, *, peer: QemuStreamVersion | None = None, prefix: str = "",
                           stream_compression: bool = False, zero_page_detection: str | None = None) -> None:
    """:func:`migrate_caps_check` and :func:`migrate_params_check` for a
    ``MigrationParams`` (``zero_page_detection``: as set by the user, None if not; the
    params' own ``multifd_zero_page`` is checked when multifd is on).  Returns None;
    ValueError."""
    multifd = params.multifd_channels != 0
    migrate_caps_check(multifd=multifd, xbzrle=bool(params.xbzrle_cache_size),
                       compress=params.compress_level is not None, stream_compression=stream_compression,
                       mapped_ram=params.mapped_ram, postcopy_ram=params.postcopy_after is not None,
                       release_ram=params.release_ram, version=stream_version(params.qemu_version), peer=peer,
                       prefix=prefix)
    migrate_params_check(multifd_channels=params.multifd_channels,
                         multifd_compression=params.multifd_compression,
                         zero_page_detection=zero_page_detection if zero_page_detection is not None
                         else (params.multifd_zero_page if multifd else None), peer=peer, prefix=prefix)


@dataclass
class MigrationParams:
    """The knobs of ``migrate-set-parameters`` / ``migrate-set-capabilities`` we model.

    Bandwidth in bytes/s (0 = unlimited), times in seconds.  ``on_limit``: what to do when
    ``max_iterations`` or ``time_limit`` is reached without converging: ``cancel`` (QEMU's
    migrate_cancel) or ``force`` (stop-and-copy anyway, with a longer downtime).
    ``release_ram`` is the capability; the engine itself releases nothing (when the
    source may release is ``release_ram.may_release``'s rule, applied by the session)."""
    max_bandwidth: float = 0.0
    downtime_limit: float = 0.3
    max_iterations: int = 30
    time_limit: float = 60.0
    on_limit: str = "cancel"
    zero_page_detection: bool = True
    xbzrle_cache_size: int = 0
    compress_level: int | None = None
    release_ram: bool = False
    pause_before_switchover: bool = False
    machine: str = "none"
    runstate: str = "running"
    sample_rss: bool = False
    multifd_channels: int = 0           # QEMU's multifd capability + multifd-channels (0: off)
    multifd_compression: str = "none"
    multifd_zero_page: str = "multifd"  # zero-page-detection with multifd: multifd | legacy | none
    qemu_version: str = "7.2"       # the QEMU whose stream is written (npqfile.stream.versions)
    mapped_ram: bool = False        # QEMU 9.0+ mapped-ram file layout (a file: destination)
    # auto-converge capability and its migrate-set-parameters (QEMU's names; see throttle)
    auto_converge: bool = False
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    max_cpu_throttle: int = 99
    throttle_trigger_threshold: int = 50
    cpu_throttle_tailslow: bool = False
    postcopy_after: int | str | None = None    # postcopy: after N dirty syncs, or "auto" (see postcopy.py)

    def check(self) -> None:
        """Raise ValueError naming the first bad parameter (capability and multifd
        combinations: ``options.check_migration_params``, QEMU's migrate_caps_check)."""
        check_migration_params(self)
        if self.max_bandwidth < 0:
            raise ValueError(f"max_bandwidth must not be negative ({self.max_bandwidth})")
        if self.downtime_limit < 0:
            raise ValueError(f"downtime_limit must not be negative ({self.downtime_limit})")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be at least 1 ({self.max_iterations})")
        if self.time_limit <= 0:
            raise ValueError(f"time_limit must be positive ({self.time_limit})")
        if self.on_limit not in ("cancel", "force"):
            raise ValueError(f"on_limit must be cancel or force, not {self.on_limit!r}")
        pa = self.postcopy_after
        if pa is not None and pa != "auto" and (not isinstance(pa, int) or pa < 0):
            raise ValueError(f"postcopy_after must be a number of dirty syncs >= 0 or 'auto', not {pa!r}")
        size = self.xbzrle_cache_size
        if size and (size < 4096 or size & (size - 1)):
            raise ValueError(f"xbzrle cache size {size} must be a power of two >= 4096")
        check_throttle_params(self.cpu_throttle_initial, self.cpu_throttle_increment,
                              self.max_cpu_throttle, self.throttle_trigger_threshold)

    def auto_converge_state(self, page_size: int = 4096) -> AutoConverge | None:
        """The auto-converge decision state these parameters describe (None when off)."""
        if not self.auto_converge:
            return None
        return AutoConverge(cpu_throttle_initial=self.cpu_throttle_initial,
                            cpu_throttle_increment=self.cpu_throttle_increment,
                            max_cpu_throttle=self.max_cpu_throttle,
                            throttle_trigger_threshold=self.throttle_trigger_threshold,
                            cpu_throttle_tailslow=self.cpu_throttle_tailslow, page_size=page_size)
