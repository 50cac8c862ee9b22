"""Socket channels (TCP, Unix stream) and the listener behind ``-incoming tcp:``/``unix:``.

Supports: `SocketChannel(sock, mode)` → `SocketWriter` (sendmsg) or `SocketReader` (recv_into),
`shutdown(read, write)`, `get_return_path()` (the opposite direction of the same connection, QEMU's
return path for postcopy and the migration "return path" thread), `set_stall_timeout(seconds)` (a peer
that takes or sends nothing for that long fails the transfer with ETIMEDOUT), and `Listener` (bind/listen, learn the
bound port, accept one connection with an optional timeout).
Goals: QEMU's QIOChannelSocket semantics: a QEMUFile and its return-path QEMUFile share one socket, which
is closed only when both are closed; shutdown() wakes a thread blocked in recv.
Plan: the socket lives in a small reference-counted holder shared by the reader and writer objects.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
from typing import Any, Sequence

from .base import Closing, pick_direction, wait_writable, write_all
from .iovec import write_iov

# sizeof(sockaddr_un.sun_path) on Linux is 108, one byte of it the terminating NUL.
UNIX_PATH_MAX = 107


def check_unix_path(path: str) -> None:
    """OSError(ENAMETOOLONG) when ``path`` cannot fit a sockaddr_un (Python's own error
    has no errno and does not say the limit)."""
    n = len(os.fsencode(path))
    if n > UNIX_PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, f"AF_UNIX path too long ({n} bytes, max {UNIX_PATH_MAX} bytes)")


class _SharedSocket:
    """A socket and the number of channel objects still using it (closed when that drops to 0)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.refs = 1
        self.lock = threading.Lock()  # the return path is typically used from another thread

    def acquire(self) -> _SharedSocket:
        with self.lock:
            self.refs += 1
        return self

    def release(self) -> int:
        with self.lock:
            self.refs -= 1
            if self.refs:
                return 0
        try:
            self.sock.close()
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        return 0


class SocketChannel(Closing):
    """One direction of a connected stream socket.

    ``SocketChannel(sock, "w")`` is a `SocketWriter`, ``"r"`` a `SocketReader`; the channel takes
    ownership of ``sock``.  ``close()`` drops this object's reference: the socket itself is closed only
    when the channel and every return-path channel obtained from it are closed (QEMU refcounts the
    QIOChannel the same way).  To stop the peer or a blocked reader first, call ``shutdown``."""

    def __new__(cls, sock: socket.socket, mode: str = "r", **kwargs: Any):
        return object.__new__(pick_direction(cls, SocketChannel, mode, SocketReader, SocketWriter))

    def __init__(self, sock: socket.socket, mode: str = "r", *, _shared: _SharedSocket | None = None) -> None:
        self.mode = mode
        self._shared: _SharedSocket | None = _shared if _shared is not None else _SharedSocket(sock)
        self._sock = sock
        self._peer_name = "the peer"    # named in stall timeout errors
        self._stall: float | None = None  # the stall timeout, which set_blocking must keep

    def fileno(self) -> int:
        """The socket's fd (-1 once the socket is closed)."""
        return self._sock.fileno()

    def set_blocking(self, flag: bool) -> None:
        """Blocking or non-blocking mode — for both directions: they share one socket.
        Blocking mode keeps the stall timeout (``setblocking`` alone would drop it)."""
        self._sock.setblocking(flag)
        if flag and self._stall is not None:
            self._sock.settimeout(self._stall)

    def set_stall_timeout(self, seconds: float | None, peer: str = "the peer") -> None:
        """Fail a send or receive that makes no progress for ``seconds`` (None: wait
        forever) with OSError(ETIMEDOUT) naming ``peer`` and the timeout -- for both
        directions, which share the socket.  A stopped or hung peer then ends the
        migration instead of blocking it forever; ``shutdown`` still wakes a blocked
        call at once."""
        self._sock.settimeout(seconds)
        self._stall = seconds
        self._peer_name = peer

    def _stalled(self, what: str) -> OSError:
        return OSError(errno.ETIMEDOUT, f"{self._peer_name} {what} for {self._stall or 0:g} s (stall timeout)")

    def shutdown(self, read: bool = True, write: bool = True) -> int:
        """shutdown(2) the connection in the given directions (both directions' channels see it).

        A reader blocked in recv wakes up with end of stream.  Returns 0; OSError on failure, except
        that an already-disconnected socket (ENOTCONN) counts as success: it is shut down already."""
        if not (read or write):
            return 0
        how = socket.SHUT_RDWR if read and write else socket.SHUT_RD if read else socket.SHUT_WR
        try:
            self._sock.shutdown(how)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
        return 0

    def get_return_path(self) -> SocketChannel | None:
        """A channel for the opposite direction on the same socket (None once this one is closed).
        It holds its own reference: close it too."""
        if self._shared is None:
            return None
        other = "w" if self.mode == "r" else "r"
        return SocketChannel(self._sock, other, _shared=self._shared.acquire())

    def close(self) -> int:
        """Release this direction; closes the socket if no other channel uses it.  0 or -errno."""
        shared, self._shared = self._shared, None
        return shared.release() if shared is not None else 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._sock!r}>"


class SocketReader(SocketChannel):
    def readinto(self, buf: memoryview, pos: int) -> int:
        """recv into ``buf`` (``pos`` ignored); returns the count, 0 at end of stream or after shutdown;
        BlockingIOError when non-blocking and empty; OSError on failure (ETIMEDOUT after
        the stall timeout without data)."""
        try:
            return self._sock.recv_into(buf)
        except TimeoutError:
            raise self._stalled("sent nothing") from None


class SocketWriter(SocketChannel):
    def writev(self, buffers: Sequence[Any], pos: int) -> int:
        """sendmsg all ``buffers`` (IOV_MAX per call, partial sends resumed); returns the byte count.
        OSError on failure (ETIMEDOUT when the peer took nothing for the stall timeout)."""
        sock = self._sock
        try:
            return write_all(buffers, lambda batch, _offset: _sendmsg(sock, batch),
                             lambda: wait_writable(sock.fileno()))
        except TimeoutError:
            raise self._stalled("accepted no data") from None

    def writev_iov(self, iov: Any, total: int, pos: int) -> int:
        """``writev`` of native iovecs (see `iovec.write_iov`) on the socket: the bytes and
        calls of ``writev``.  With a stall timeout the socket is non-blocking underneath;
        EAGAIN then waits at most that long for room (ETIMEDOUT naming the peer)."""
        fd = self._sock.fileno()

        def wait() -> None:
            if not wait_writable(fd, self._stall):
                raise self._stalled("accepted no data")

        return write_iov(fd, iov, total, wait)


def _sendmsg(sock: socket.socket, batch: list) -> int:
    try:
        return sock.sendmsg(batch)
    except OSError as exc:
        # EMSGSIZE: the kernel refused this many iovecs at once; a shorter batch is progress too.
        if exc.errno == errno.EMSGSIZE and len(batch) > 1:
            return _sendmsg(sock, batch[: len(batch) // 2])
        raise


class Listener(Closing):
    """A listening TCP or Unix socket that accepts migration connections (QEMU ``-incoming``).

    ``.address`` is ``(host, port)`` for TCP — the real port when 0 was asked for — or the socket path;
    ``.uri`` is the URI a sender should use.  A Unix listener replaces a stale socket file at its path
    (as QEMU does) but refuses to replace anything that is not a socket, and removes its file on close."""

    def __init__(self, sock: socket.socket, uri: str, unix_path: str | None = None) -> None:
        self._sock = sock
        self._unix_path = unix_path
        if unix_path is not None:
            self.address: Any = unix_path
            self.uri = uri
        else:
            host, port = sock.getsockname()[:2]
            self.address = (host, port)
            self.uri = f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"

    @classmethod
    def tcp(cls, host: str, port: int, uri: str) -> Listener:
        """Listen on host:port ("" = every interface).  OSError naming ``uri`` if it cannot bind."""
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            sock = socket.create_server(sockaddr, family=family, backlog=1)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {uri}: {exc.strerror or exc}") from exc
        return cls(sock, uri)

    @classmethod
    def unix(cls, path: str, uri: str) -> Listener:
        """Listen on a Unix socket at ``path``.  OSError naming ``uri`` if it cannot bind:
        the path is too long, something that is not a socket is there, or bind failed."""
        sock = None
        try:
            check_unix_path(path)
            try:
                if not stat.S_ISSOCK(os.lstat(path).st_mode):
                    raise OSError(errno.EEXIST, f"{path} exists and is not a socket (remove it or choose another path)")
                os.unlink(path)   # a stale socket, as QEMU replaces it
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            sock.listen(1)
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise OSError(exc.errno, f"cannot listen on {uri}: {exc.strerror or exc}") from exc
        return cls(sock, uri, path)

    def fileno(self) -> int:
        return self._sock.fileno()

    def set_backlog(self, n: int) -> None:
        """listen(n) again: room for ``n`` pending connections (QEMU listens with the
        multifd channel count as backlog, so parallel connects are not refused)."""
        self._sock.listen(max(1, n))

    def accept(self, timeout: float | None = None) -> SocketReader:
        """Wait up to ``timeout`` seconds (None = forever) for one connection; return its reader channel
        (its writer is ``get_return_path()``).  TimeoutError if nobody connected; OSError on failure."""
        self._sock.settimeout(timeout)
        try:
            conn, _ = self._sock.accept()
        except TimeoutError:
            raise TimeoutError(f"no connection to {self.uri} within {timeout} s") from None
        conn.setblocking(True)
        return SocketChannel(conn, "r")  # type: ignore[return-value]

    def close(self) -> int:
        """Stop listening (and remove the Unix socket file).  Returns 0."""
        self._sock.close()
        path, self._unix_path = self._unix_path, None
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return 0

    def __repr__(self) -> str:
        return f"<Listener {self.uri}>"
