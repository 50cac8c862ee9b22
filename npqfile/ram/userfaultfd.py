"""Linux userfaultfd through ctypes: missing-page faults of guest RAM, resolved by hand.

Supports what QEMU's postcopy destination (``migration/postcopy-ram.c``) uses: a
userfaultfd from ``/dev/userfaultfd`` (``USERFAULTFD_IOC_NEW``) or the
``userfaultfd(2)`` syscall; ``UFFDIO_API``; ``UFFDIO_REGISTER`` in MISSING mode;
reading fault messages (``struct uffd_msg``, ``UFFD_EVENT_PAGEFAULT``); ``UFFDIO_COPY``
(place a page atomically and wake the faulting threads), ``UFFDIO_ZEROPAGE``,
``UFFDIO_WAKE`` and ``UFFDIO_UNREGISTER``.  x86-64/aarch64 Linux (the generic ``_IOC``
encoding).  No maintained Python binding exists, hence ctypes; every ctypes call to
libc releases the GIL, which matters: a thread that faults blocks in the kernel until
another thread places the page, so the faulting thread must not hold the GIL.

Who may use it: root, or a process with CAP_SYS_PTRACE, or anyone when
``vm.unprivileged_userfaultfd = 1`` (syscall, user-mode faults only), or anyone with
read/write access to ``/dev/userfaultfd`` (Linux 6.1+).  :func:`open_userfaultfd`
raises :class:`UserfaultfdUnavailable` saying exactly that when both ways are refused.

Layouts (``linux/userfaultfd.h``), all fields u64 unless noted:
``uffdio_api {api, features, ioctls}`` 24 bytes; ``uffdio_range {start, len}`` 16;
``uffdio_register {range, mode, ioctls}`` 32; ``uffdio_copy {dst, src, len, mode,
s64 copy}`` 40; ``uffdio_zeropage {range, mode, s64 zeropage}`` 32; ``uffd_msg`` 32:
u8 event, 7 reserved bytes, then for a page fault u64 flags, u64 address, u32 ptid.
ioctl numbers: ``_IOC(dir, 0xAA, nr, size) = dir << 30 | size << 16 | 0xAA << 8 | nr``
with dir 3 for _IOWR and 2 for _IOR (:func:`_ioc` computes them; the test checks them
against the kernel header values).

Plan: :class:`Userfaultfd` owns the fd; methods raise OSError with the errno and what
was being done (the address and length).  No policy here: which pages to request and
when to place them is ``npqfile.migration.postcopy``'s business.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

__all__ = ["Userfaultfd", "UserfaultfdUnavailable", "open_userfaultfd", "FaultMessage",
           "UFFDIO_API", "UFFDIO_REGISTER", "UFFDIO_UNREGISTER", "UFFDIO_WAKE", "UFFDIO_COPY",
           "UFFDIO_ZEROPAGE", "USERFAULTFD_IOC_NEW"]

_IOC_WRITE, _IOC_READ = 1, 2
UFFDIO = 0xAA


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | UFFDIO << 8 | nr


USERFAULTFD_IOC_NEW = _ioc(0, 0x00, 0)                          # _IO(0xAA, 0x00) on /dev/userfaultfd
UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, 0x3F, 24)            # 0xc018aa3f
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, 0x00, 32)       # 0xc020aa00
UFFDIO_UNREGISTER = _ioc(_IOC_READ, 0x01, 16)                  # 0x8010aa01
UFFDIO_WAKE = _ioc(_IOC_READ, 0x02, 16)                        # 0x8010aa02
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, 0x03, 40)           # 0xc028aa03
UFFDIO_ZEROPAGE = _ioc(_IOC_READ | _IOC_WRITE, 0x04, 32)       # 0xc020aa04

UFFD_API = 0xAA
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_MSG_SIZE = 32
SYS_userfaultfd = {"x86_64": 323, "aarch64": 282}

HOW_TO_ALLOW = ("userfaultfd is not allowed for this process. Postcopy's destination needs one of: "
                "running as root or with CAP_SYS_PTRACE; read/write access to /dev/userfaultfd "
                "(Linux 6.1+, e.g. a 'userfaultfd' group: chmod 660 /dev/userfaultfd); or "
                "sysctl vm.unprivileged_userfaultfd=1. Pre-copy needs none of these.")


class UserfaultfdUnavailable(OSError):
    """Neither /dev/userfaultfd nor the syscall gave a userfaultfd; the message says why
    and what would allow it."""


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class _Zeropage(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _call(fd: int, request: int, arg: ctypes.Structure | None, what: str) -> None:
    """ioctl(fd, request, &arg); OSError(errno, what) on failure (EINTR retried)."""
    ptr = None if arg is None else ctypes.addressof(arg)
    while _ioctl(fd, request, ptr) < 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"{what}: {os.strerror(err)}")


def open_userfaultfd() -> int:
    """A new non-blocking, close-on-exec userfaultfd (not yet API-negotiated).  Tries
    /dev/userfaultfd, then the syscall.  Raises UserfaultfdUnavailable naming both
    failures and what would allow it."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    reasons = []
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        reasons.append(f"/dev/userfaultfd: {exc.strerror}")
    else:
        try:
            fd = _ioctl(dev, USERFAULTFD_IOC_NEW, ctypes.c_void_p(flags))
            if fd >= 0:
                return fd
            reasons.append(f"/dev/userfaultfd USERFAULTFD_IOC_NEW: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(dev)
    nr = SYS_userfaultfd.get(os.uname().machine)
    if nr is not None:
        fd = _syscall(ctypes.c_long(nr), ctypes.c_int(flags))
        if fd >= 0:
            return int(fd)
        reasons.append(f"userfaultfd(2): {os.strerror(ctypes.get_errno())}")
    else:
        reasons.append(f"userfaultfd(2): syscall number unknown on {os.uname().machine}")
    raise UserfaultfdUnavailable(errno.EPERM, f"{HOW_TO_ALLOW} ({'; '.join(reasons)})")


class FaultMessage:
    """One page fault: ``address`` (of the faulting byte, not rounded), ``flags``
    (UFFD_PAGEFAULT_FLAG_WRITE = 1...), ``ptid`` (the faulting thread, when the
    kernel reports it)."""
    __slots__ = ("address", "flags", "ptid")

    def __init__(self, address: int, flags: int, ptid: int):
        self.address, self.flags, self.ptid = address, flags, ptid


class Userfaultfd:
    """A userfaultfd with the API negotiated; ``close()`` it (or use ``with``).
    Raises UserfaultfdUnavailable when none can be had, OSError when UFFDIO_API fails."""

    def __init__(self) -> None:
        self.fd = open_userfaultfd()
        try:
            api = _Api(UFFD_API, 0, 0)
            _call(self.fd, UFFDIO_API, api, "UFFDIO_API")
            self.ioctls = api.ioctls
        except BaseException:
            os.close(self.fd)
            raise

    def fileno(self) -> int:
        return self.fd

    def register(self, start: int, length: int) -> int:
        """Register [start, start+length) for MISSING faults; returns the ioctls bitmask
        the range supports.  start/length must be page aligned."""
        reg = _Register(_Range(start, length), UFFDIO_REGISTER_MODE_MISSING, 0)
        _call(self.fd, UFFDIO_REGISTER, reg, f"UFFDIO_REGISTER {start:#x}+{length:#x}")
        return reg.ioctls

    def unregister(self, start: int, length: int) -> None:
        _call(self.fd, UFFDIO_UNREGISTER, _Range(start, length), f"UFFDIO_UNREGISTER {start:#x}+{length:#x}")

    def copy(self, dst: int, src: int, length: int) -> None:
        """UFFDIO_COPY: place ``length`` bytes from address ``src`` at the missing page(s) at
        ``dst`` atomically and wake the threads waiting on them.  EAGAIN (the mapping
        changed under us) is retried; EEXIST (the page is already there) is an OSError."""
        arg = _Copy(dst, src, length, 0, 0)
        while True:
            try:
                _call(self.fd, UFFDIO_COPY, arg, f"UFFDIO_COPY to {dst:#x}+{length:#x}")
                return
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    raise
                done = max(arg.copy, 0)
                arg = _Copy(dst + done, src + done, length - done, 0, 0)

    def zeropage(self, dst: int, length: int) -> None:
        """UFFDIO_ZEROPAGE: map zero page(s) at ``dst`` and wake the waiters (EEXIST: OSError)."""
        _call(self.fd, UFFDIO_ZEROPAGE, _Zeropage(_Range(dst, length), 0, 0),
              f"UFFDIO_ZEROPAGE at {dst:#x}+{length:#x}")

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE: wake threads waiting on the range (after placing it some other way)."""
        _call(self.fd, UFFDIO_WAKE, _Range(start, length), f"UFFDIO_WAKE {start:#x}+{length:#x}")

    def read_faults(self, max_messages: int = 64) -> list[FaultMessage]:
        """The page faults pending now (non-blocking; [] when none).  Other events are
        skipped (none are enabled).  OSError if the read fails."""
        try:
            data = os.read(self.fd, UFFD_MSG_SIZE * max_messages)
        except BlockingIOError:
            return []
        out = []
        for off in range(0, len(data) - UFFD_MSG_SIZE + 1, UFFD_MSG_SIZE):
            event = data[off]
            if event == UFFD_EVENT_PAGEFAULT:
                flags, address, ptid = struct.unpack_from("<QQI", data, off + 8)
                out.append(FaultMessage(address, flags, ptid))
        return out

    def close(self) -> None:
        """Close the fd: the kernel wakes threads still waiting, and later faults on the
        range are ordinary faults again (zero-filled pages)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
