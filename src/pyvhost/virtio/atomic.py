"""Atomic byte OR on shared memory from CPython, for the vhost dirty log.

A front-end shares one dirty log among all the vhost back-ends of a VM, each in its own process,
so setting a bit must be a real atomic read-modify-write on the mapping: a byte load and store,
even under a lock, loses another process's bit set in the same byte in between. CPython has no
atomic operation on a buffer, so we call one through ``ctypes``:

``libatomic``
    GCC's runtime library (``libatomic1`` on Debian, present wherever gcc is):
    ``__atomic_fetch_or_1(ptr, mask, __ATOMIC_SEQ_CST)``; ``lock or`` on x86-64, an LL/SC loop or
    ``ldsetalb`` on aarch64. Preferred: a documented ABI, portable.
``x86-64-stub``
    Where libatomic is absent, on x86-64 only: the five bytes ``lock or byte [rdi], sil; ret``
    placed in a page of our own (written, then made read+execute: never writable and executable
    at once) and called through the same ``ctypes`` prototype; the third argument is ignored.
``locked``
    Neither available (or executable pages refused): a byte load and store under a lock of this
    process. Correct among threads, not against other processes; a warning says so.

Each candidate is checked on a scratch byte before it is used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import platform
from collections.abc import Callable
from typing import Any

__all__ = ["IMPLS", "LIBATOMIC", "LOCKED", "SEQ_CST", "X86_64_STUB", "default_impl", "or_byte"]

log = logging.getLogger(__name__)

LIBATOMIC = "libatomic"
X86_64_STUB = "x86-64-stub"
LOCKED = "locked"
IMPLS = (LIBATOMIC, X86_64_STUB, LOCKED)
"""Implementations in order of preference."""

SEQ_CST = 5
"""``__ATOMIC_SEQ_CST``: the memory order passed as third argument (ignored by the stub)."""

OrByte = Callable[..., Any]
"""``fn(ctypes.byref(array, index), mask, SEQ_CST)``: atomically ``array[index] |= mask``."""

# lock or byte ptr [rdi], sil ; ret   (F0 lock, 40 REX for sil, 08 /r OR r/m8 r8, 37 modrm, C3)
_STUB_CODE = bytes.fromhex("f0 40 08 37 c3")
_X86_64 = frozenset({"x86_64", "amd64"})

# ctypes prototype with no argtypes: a byref() argument passes as a pointer, small ints as C int;
# that skips per-argument conversion, about 40% cheaper per call than declared argtypes.
_PROTO = ctypes.CFUNCTYPE(None)


def _works(fn: OrByte) -> bool:
    """Whether ``fn`` ORs a mask into a byte and leaves its neighbours alone."""
    scratch = (ctypes.c_ubyte * 3)(0x00, 0x81, 0x00)
    fn(ctypes.byref(scratch, 1), 0x42, SEQ_CST)
    return list(scratch) == [0x00, 0xC3, 0x00]


def _libatomic() -> OrByte | None:
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        lib = ctypes.CDLL(name)
        return _PROTO(("__atomic_fetch_or_1", lib))
    except (OSError, AttributeError) as exc:
        log.debug("libatomic unavailable: %s", exc)
        return None


def _x86_64_stub() -> OrByte | None:
    if platform.machine().lower() not in _X86_64:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc_mmap = libc.mmap
        libc_mmap.restype = ctypes.c_void_p
        libc_mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc_mprotect = libc.mprotect
        libc_mprotect.restype = ctypes.c_int
        libc_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError) as exc:
        log.debug("x86-64 stub: no mmap/mprotect from libc: %s", exc)
        return None
    size = mmap.PAGESIZE
    page = libc_mmap(
        None,
        size,
        mmap.PROT_READ | mmap.PROT_WRITE,
        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
        -1,
        0,
    )
    if page is None or page == ctypes.c_void_p(-1).value:
        log.debug("x86-64 stub: mmap failed: errno %d", ctypes.get_errno())
        return None
    # The page is never unmapped: the function lives as long as the process.
    ctypes.memmove(page, _STUB_CODE, len(_STUB_CODE))
    if libc_mprotect(page, size, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        log.debug("x86-64 stub: executable page refused: errno %d", ctypes.get_errno())
        return None
    return _PROTO(page)


_LOADERS: dict[str, Callable[[], OrByte | None]] = {
    LIBATOMIC: _libatomic,
    X86_64_STUB: _x86_64_stub,
}


@functools.cache
def or_byte(impl: str) -> OrByte | None:
    """The atomic byte OR of ``impl`` (one of :data:`IMPLS`), or None if it cannot be had here.

    ``LOCKED`` is always None: the caller does the load and store itself.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown atomic OR implementation {impl!r} (one of {', '.join(IMPLS)})")
    loader = _LOADERS.get(impl)
    if loader is None:
        return None
    fn = loader()
    if fn is not None and not _works(fn):
        log.warning("%s: atomic OR failed its self-test; not used", impl)
        return None
    return fn


@functools.cache
def default_impl() -> str:
    """The best implementation available in this process; warns once if it is ``LOCKED``."""
    for impl in IMPLS[:-1]:
        if or_byte(impl) is not None:
            return impl
    log.warning(
        "dirty log: no atomic OR available (libatomic not found%s): bits are set with a byte "
        "load and store under a lock of this process only, so a bit another back-end of the "
        "same VM sets in the same byte at the same moment can be lost, and that page then not "
        "re-sent during migration; install libatomic1 to fix this",
        "" if platform.machine().lower() in _X86_64 else f", {platform.machine()} has no stub",
    )
    return LOCKED
