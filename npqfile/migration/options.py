"""Which migration capabilities, parameters and transports go together: QEMU's
``migrate_caps_check`` and ``migrate_params_check`` (migration/options.c) and
``migration_channels_and_transport_compatible`` (migration/migration.c), in one place.

Supports: :func:`migrate_caps_check` (multifd, xbzrle, page compression, mapped-ram,
postcopy-ram, release-ram, and what the QEMU version of the stream or of the declared
peer has), :func:`migrate_params_check` (``multifd-channels``, ``multifd-compression``,
``zero-page-detection``), :func:`migration_channels_and_transport_compatible` (multifd
needs sockets, mapped-ram a file) and :func:`check_migration_params` (all of it for a
``MigrationParams``).  Callers: ``MigrationParams.check``, ``npqfile migrate``,
``npqfile save``, ``npqfile incoming``, the multifd sender and receiver.

Goals: a combination is refused before anything is sent, with the same clear message
wherever it is asked for; ``prefix="--"`` names the command-line options
(``--multifd-channels``), ``""`` the parameters (``multifd-channels``).  Plan: pure
functions of booleans, names and :class:`~npqfile.stream.versions.QemuStreamVersion`;
each raises ValueError for the first combination that does not go, else returns None.
"""

from __future__ import annotations

from typing import Any

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
