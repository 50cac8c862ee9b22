"""QEMU migration URIs → channels: `open_channel(uri, mode)` and `listen(uri)`.

Supports ``file:PATH``, ``tcp:HOST:PORT`` (also ``tcp:[IPv6]:PORT``; an empty host listens on every
interface), ``unix:PATH``, ``exec:CMD``, ``fd:N``, ``mem:`` and ``null:``.  Mode "w" is the sending side
(``migrate URI``): connect / create / write stdin.  Mode "r" is the receiving side (``-incoming URI``):
for tcp:/unix: it listens, accepts ONE connection and returns its reader.  Use `listen(uri)` to learn the
bound port (port 0) or to accept with a timeout.
Goals: the URI in every error: ValueError for a malformed URI (saying what is wrong), OSError for a
system failure (connection refused, no such file).
Plan: split scheme and rest, validate per scheme, then build the channel from the sibling modules.
"""

from __future__ import annotations

import os
import socket
import stat

from .base import Channel
from .fd import ExecChannel, FdChannel, FileChannel
from .memory import MemoryChannel, NullChannel
from .sockets import Listener, SocketChannel, check_unix_path

SCHEMES = ("file", "tcp", "unix", "exec", "fd", "mem", "null")


def _split(uri: str) -> tuple[str, str]:
    if not isinstance(uri, str):
        raise ValueError(f"migration URI must be a string, not {type(uri).__name__}: {uri!r}")
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"unknown migration URI scheme in {uri!r} "
                         f"(expected one of {', '.join(s + ':' for s in SCHEMES)})")
    return scheme, rest


def _host_port(uri: str, rest: str, *, listening: bool) -> tuple[str, int]:
    if "," in rest:
        # QEMU's inet options (ipv4=on, keep-alive=on, to=PORT...): name them rather than
        # reading them as part of the port
        options = rest[rest.index(","):]
        raise ValueError(f"URI options like '{options}' are not supported in {uri!r} (expected tcp:HOST:PORT)")
    if rest.startswith("["):
        host, sep, port_text = rest[1:].partition("]")
        if not sep or not port_text.startswith(":"):
            raise ValueError(f"bad IPv6 address in {uri!r} (expected tcp:[ADDR]:PORT)")
        port_text = port_text[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise ValueError(f"missing port in {uri!r} (expected tcp:HOST:PORT)")
        if ":" in host:
            raise ValueError(f"IPv6 address must be bracketed in {uri!r} (expected tcp:[ADDR]:PORT)")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"bad port {port_text!r} in {uri!r} (expected a number 0-65535)")
    port = int(port_text)
    if not listening and (not host or port == 0):
        raise ValueError(f"{uri!r} needs a host and a non-zero port to connect to")
    return host, port


def _nonempty(uri: str, rest: str, what: str) -> str:
    if not rest:
        raise ValueError(f"missing {what} in {uri!r}")
    return rest


def listen(uri: str) -> Listener:
    """Start listening on a ``tcp:HOST:PORT`` or ``unix:PATH`` URI; returns a `Listener`
    (``.address``, ``.uri``, ``.accept(timeout)``).  ValueError for another or malformed URI,
    OSError (naming the URI) if the address cannot be bound."""
    scheme, rest = _split(uri)
    if scheme == "tcp":
        return Listener.tcp(*_host_port(uri, rest, listening=True), uri)
    if scheme == "unix":
        return Listener.unix(_nonempty(uri, rest, "socket path"), uri)
    raise ValueError(f"cannot listen on {uri!r}: only tcp: and unix: URIs accept connections")


def _connect(uri: str, scheme: str, rest: str) -> SocketChannel:
    try:
        if scheme == "tcp":
            sock = socket.create_connection(_host_port(uri, rest, listening=False))
        else:
            path = _nonempty(uri, rest, "socket path")
            check_unix_path(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
            except BaseException:
                sock.close()
                raise
    except OSError as exc:
        raise OSError(exc.errno, f"cannot connect to {uri}: {exc.strerror or exc}") from exc
    return SocketChannel(sock, "w")


def _fd_channel(uri: str, rest: str, mode: str) -> Channel:
    if not rest.isdigit():
        raise ValueError(f"bad file descriptor {rest!r} in {uri!r} (expected fd:N, N a number)")
    fd = int(rest)
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError as exc:
        raise OSError(exc.errno, f"{uri}: {exc.strerror}") from exc
    if is_socket:  # like QEMU, a socket fd gets socket semantics (shutdown, return path)
        return SocketChannel(socket.socket(fileno=fd), mode)
    return FdChannel(fd, mode)


def open_channel(uri: str, mode: str) -> Channel:
    """Open the channel a QEMU migration URI names, for writing ("w") or reading ("r").

    Returns a write channel (has ``writev``) or a read channel (has ``readinto``); the caller closes it.
    ``fd:N`` takes ownership of fd N.  ``mem:`` and ``null:`` are write-only.  Raises ValueError naming
    the URI for a malformed URI or unsupported mode, OSError naming it when the system call fails."""
    if mode not in ("r", "w"):
        raise ValueError(f"mode for {uri!r} must be 'r' or 'w', not {mode!r}")
    scheme, rest = _split(uri)
    if scheme in ("tcp", "unix"):
        if mode == "w":
            return _connect(uri, scheme, rest)
        with listen(uri) as listener:
            return listener.accept()
    if scheme == "file":
        path = _nonempty(uri, rest, "file path")
        try:
            return FileChannel(path, mode)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open {uri}: {exc.strerror}") from exc
    if scheme == "exec":
        return ExecChannel(_nonempty(uri, rest, "command"), mode)
    if scheme == "fd":
        return _fd_channel(uri, rest, mode)
    if rest:
        raise ValueError(f"{scheme}: takes no argument, got {uri!r}")
    if mode == "r":
        raise ValueError(f"{uri!r} is write-only"
                         + (" (use MemoryChannel.reader(data) to read bytes)" if scheme == "mem" else ""))
    return MemoryChannel() if scheme == "mem" else NullChannel()
