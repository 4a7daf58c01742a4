"""userfaultfd for postcopy migration (POSTCOPY_ADVISE / LISTEN / END), through ctypes.

The back-end opens a userfaultfd, hands a copy to the front-end, and registers its guest memory
mappings with it in MISSING mode: a touch of a page that has not arrived yet blocks until the
front-end (which serves the faults) fills it in.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import struct

from pyvhost.errors import VhostError

__all__ = ["USERFAULTFD_SYSCALLS", "Userfaultfd", "UserfaultfdError"]

USERFAULTFD_SYSCALLS = {"x86_64": 323, "aarch64": 282}
"""userfaultfd(2) system call numbers by machine."""

_UFFD_API = 0xAA
_UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
_UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)
_UFFDIO_UNREGISTER = 0x8010AA01  # _IOR(0xAA, 0x01, struct uffdio_range)
_UFFDIO_REGISTER_MODE_MISSING = 1
_UFFD_USER_MODE_ONLY = 1
_API = struct.Struct("<QQQ")
_REGISTER = struct.Struct("<QQQQ")
_RANGE = struct.Struct("<QQ")
PAGE_SIZE = mmap.PAGESIZE


class UserfaultfdError(VhostError):
    """userfaultfd is unavailable (no syscall, not permitted) or an ioctl on it failed."""

    def __init__(self, message: str, *, errno_value: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_value


def _page_span(address: int, length: int) -> tuple[int, int]:
    start = address - address % PAGE_SIZE
    end = -(-(address + length) // PAGE_SIZE) * PAGE_SIZE
    return start, end - start


class Userfaultfd:
    """An open userfaultfd (API handshake done); owns its fd."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        self.registered: list[tuple[int, int]] = []

    @classmethod
    def open(cls) -> Userfaultfd:
        """userfaultfd(O_CLOEXEC | O_NONBLOCK), then UFFDIO_API; UserfaultfdError on failure."""
        machine = platform.machine()
        number = USERFAULTFD_SYSCALLS.get(machine)
        if number is None:
            raise UserfaultfdError(f"userfaultfd: no syscall number known for {machine}")
        libc = ctypes.CDLL(None, use_errno=True)
        flags = os.O_CLOEXEC | os.O_NONBLOCK
        fd = libc.syscall(number, flags)
        if fd < 0 and ctypes.get_errno() == errno.EPERM:
            # vm.unprivileged_userfaultfd=0: user-mode-only faults are still allowed (Linux 5.11+).
            fd = libc.syscall(number, flags | _UFFD_USER_MODE_ONLY)
        if fd < 0:
            err = ctypes.get_errno()
            raise UserfaultfdError(
                f"userfaultfd: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})",
                errno_value=err,
            )
        uffd = cls(fd)
        try:
            buf = bytearray(_API.pack(_UFFD_API, 0, 0))
            uffd._ioctl(_UFFDIO_API, buf, "UFFDIO_API")
        except BaseException:
            uffd.close()
            raise
        return uffd

    def _ioctl(self, request: int, buf: bytearray, what: str) -> None:
        if self.fd is None:
            raise UserfaultfdError(f"{what}: userfaultfd is closed")
        try:
            fcntl.ioctl(self.fd, request, buf, True)
        except OSError as exc:
            raise UserfaultfdError(f"{what}: {exc.strerror}", errno_value=exc.errno) from exc

    def register(self, address: int, length: int) -> None:
        """Register ``[address, address + length)`` (rounded out to pages) in MISSING mode."""
        start, size = _page_span(address, length)
        buf = bytearray(_REGISTER.pack(start, size, _UFFDIO_REGISTER_MODE_MISSING, 0))
        self._ioctl(_UFFDIO_REGISTER, buf, f"UFFDIO_REGISTER {start:#x}+{size:#x}")
        self.registered.append((start, size))

    def unregister(self, address: int, length: int) -> None:
        """Unregister one range registered before (while it is still mapped: an unmapped range
        cannot be unregistered, the kernel answers EINVAL)."""
        start, size = _page_span(address, length)
        self.registered.remove((start, size))
        self._ioctl(
            _UFFDIO_UNREGISTER,
            bytearray(_RANGE.pack(start, size)),
            f"UFFDIO_UNREGISTER {start:#x}+{size:#x}",
        )

    def unregister_all(self) -> None:
        """Unregister every range registered so far; the first failure is raised at the end."""
        failure: UserfaultfdError | None = None
        ranges, self.registered = self.registered, []
        for start, size in ranges:
            try:
                self._ioctl(
                    _UFFDIO_UNREGISTER,
                    bytearray(_RANGE.pack(start, size)),
                    f"UFFDIO_UNREGISTER {start:#x}+{size:#x}",
                )
            except UserfaultfdError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Close the fd (the kernel drops the registrations with it)."""
        fd, self.fd = self.fd, None
        self.registered = []
        if fd is not None:
            os.close(fd)
