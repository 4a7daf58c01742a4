"""Guest memory: regions mmapped from file descriptors, address translation and the dirty log.

Guest memory is untrusted input: every translation is bounds-checked against the region table and
against 64-bit overflow, and a miss raises :class:`~pyvhost.errors.GuestMemoryError` naming the
address, the length and the reason. The files behind the mappings are the front-end's too: each is
checked when mapped (big enough; sealed against shrinking, or warned about) and the dirty log,
shared with other back-ends, is set with atomic ORs. See docs/memory-safety.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import threading
import weakref
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from pyvhost.closing import Closing
from pyvhost.errors import GuestMemoryError
from pyvhost.virtio import atomic
from pyvhost.virtio.barrier import RW_BARRIERS_NEEDED, write_barrier

__all__ = [
    "PAGE_SIZE",
    "DirtyLog",
    "GuestMemory",
    "Region",
    "RegionSpec",
    "deferred_unmaps",
    "set_require_sealed_default",
    "view_address",
]

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
"""Granularity of the vhost dirty log: one bit per 4 KiB guest-physical page."""
_PAGE_SHIFT = 12

_byref = ctypes.byref
_SEQ_CST = atomic.SEQ_CST

_U64_LIMIT = 1 << 64
_DEFAULT_UVA_BASE = 0x7F00_0000_0000
"""Front-end virtual address given to anonymous regions when the caller names none."""


def _check_range(what: str, address: int, length: int) -> None:
    """Reject negative values and ranges that wrap the 64-bit address space."""
    if address < 0 or length < 0:
        raise GuestMemoryError(
            f"{what} {address:#x}+{length:#x}: negative address or length",
            address=address,
            length=length,
        )
    if address + length > _U64_LIMIT:
        raise GuestMemoryError(
            f"{what} {address:#x}+{length:#x}: range overflows 64 bits",
            address=address,
            length=length,
        )


_require_sealed_default = False


def set_require_sealed_default(required: bool) -> None:
    """Process-wide default of ``require_sealed`` for GuestMemory and DirtyLog (``pyvhost serve
    --require-sealed-memory``); objects given an explicit value ignore it."""
    global _require_sealed_default  # noqa: PLW0603
    _require_sealed_default = required


# Regions already warned about as unsealed: SET_MEM_TABLE re-sends every region on each change,
# and one warning per region is enough. Bounded; forgetting only means warning again.
_warned_unsealed: set[tuple[int, int, int, int, str]] = set()
_WARNED_LIMIT = 4096


def _seals(fd: int) -> int | None:
    """The fd's seals, or None for a file that cannot have any (EINVAL: not on shmem/hugetlbfs;
    tmpfs files that are not memfds answer F_SEAL_SEAL, and so can never be sealed either)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


def _check_backing(fd: int, offset: int, size: int, what: str, require_sealed: bool) -> None:
    """Refuse a file too small for the mapping; refuse or warn if it is not sealed against
    shrinking (a front-end truncating a mapped file kills us with SIGBUS at the next access).
    """
    try:
        st = os.fstat(fd)
        seals = _seals(fd)
    except OSError as exc:
        raise GuestMemoryError(
            f"{what}: cannot mmap fd {fd}: {exc}", address=offset, length=size
        ) from exc
    needed = offset + size
    if stat.S_ISREG(st.st_mode) and st.st_size < needed:
        raise GuestMemoryError(
            f"{what}: cannot mmap fd {fd}: the file is {st.st_size:#x} bytes, smaller than "
            f"mmap_offset {offset:#x} + size {size:#x} = {needed:#x}",
            address=offset,
            length=size,
        )
    if seals is not None and seals & fcntl.F_SEAL_SHRINK:
        return
    why = (
        "not sealed against shrinking (its file system has no seals)"
        if seals is None
        else "not sealed against shrinking (no F_SEAL_SHRINK)"
    )
    if require_sealed:
        raise GuestMemoryError(
            f"{what}: fd {fd} is {why}: refused, sealed memory is required",
            address=offset,
            length=size,
        )
    key = (st.st_dev, st.st_ino, offset, size, what)
    if key in _warned_unsealed:
        return
    if len(_warned_unsealed) >= _WARNED_LIMIT:
        _warned_unsealed.clear()
    _warned_unsealed.add(key)
    log.warning(
        "%s: fd %d is %s: the front-end could still truncate it, and the next access to the "
        "lost pages would kill this process with SIGBUS",
        what,
        fd,
        why,
    )


def _map_shared(
    fd: int, offset: int, size: int, what: str, require_sealed: bool = False
) -> tuple[mmap.mmap, int]:
    """Map ``size`` bytes of ``fd`` at ``offset`` (any alignment); return the mmap and the slack.

    mmap(2) needs a page-aligned offset, so we map from the aligned offset below and the caller
    slices ``slack`` bytes off the front. The file is checked first (:func:`_check_backing`).
    """
    if size <= 0:
        raise GuestMemoryError(f"{what}: size {size:#x} must be positive", length=size)
    if offset < 0:
        raise GuestMemoryError(f"{what}: negative mmap offset {offset:#x}", address=offset)
    _check_backing(fd, offset, size, what, require_sealed)
    granule = mmap.ALLOCATIONGRANULARITY
    aligned = offset - (offset % granule)
    slack = offset - aligned
    try:
        mm = mmap.mmap(
            fd,
            slack + size,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=aligned,
        )
    except (OSError, ValueError, OverflowError) as exc:
        raise GuestMemoryError(
            f"{what}: cannot mmap fd {fd} offset {offset:#x} size {size:#x}: {exc}",
            address=offset,
            length=size,
        ) from exc
    return mm, slack


def _sealed_memfd(name: str, size: int) -> int:
    """A fresh memfd of ``size`` bytes sealed against shrinking, as QEMU makes guest RAM."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except BaseException:
        os.close(fd)
        raise
    return fd


# Mappings whose close() hit BufferError (views still exported). They stay mapped until every
# view is released, at which point the last reference drops and CPython unmaps them.
_deferred_lock = threading.Lock()
_deferred_count = 0


def _on_deferred_unmapped(what: str) -> None:
    global _deferred_count  # noqa: PLW0603
    with _deferred_lock:
        _deferred_count -= 1
    log.debug("%s: deferred unmap done (last view released)", what)


def deferred_unmaps() -> int:
    """How many closed mappings are still kept alive by exported memoryviews."""
    return _deferred_count


def _release_mapping(mm: mmap.mmap, view: memoryview, what: str) -> None:
    """Unmap ``mm`` now, or, if memoryviews into it are still alive, when the last one goes.

    CPython refuses to close an mmap with exported buffers (BufferError). Those views may still be
    in the hands of a device (a chain being processed while SET_MEM_TABLE arrives); we drop our
    references instead and let reference counting unmap it once the views are released.
    """
    global _deferred_count  # noqa: PLW0603
    with contextlib.suppress(BufferError):
        view.release()
    try:
        mm.close()
    except BufferError:
        with _deferred_lock:
            _deferred_count += 1
        weakref.finalize(mm, _on_deferred_unmapped, what)
        log.info(
            "%s: memoryviews into this mapping are still alive; it stays mapped until they are "
            "released",
            what,
        )


def _removed(gpa: int, length: int) -> GuestMemoryError:
    return GuestMemoryError(
        f"guest address {gpa:#x}+{length:#x}: its memory region was removed meanwhile",
        address=gpa,
        length=length,
    )


def view_address(view: memoryview) -> int:
    """The virtual address in this process of the first byte of a writable memoryview."""
    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class RegionSpec(NamedTuple):
    """The description of one region as a front-end sends it (fd plus the message fields)."""

    fd: int
    mmap_offset: int
    size: int
    guest_phys_addr: int
    userspace_addr: int


@dataclass(eq=False)
class Region:
    """One guest memory region, mapped MAP_SHARED read/write.

    ``view`` covers exactly ``size`` bytes starting at ``guest_phys_addr``. ``fd`` is None unless
    the region was created by :meth:`GuestMemory.anonymous` / :meth:`GuestMemory.add_anonymous`,
    in which case the memfd is kept open (and owned) so it can be sent to a back-end.
    """

    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int
    view: memoryview
    fd: int | None = None
    _mm: mmap.mmap | None = field(default=None, repr=False)

    @property
    def gpa_end(self) -> int:
        """One past the last guest-physical address of the region."""
        return self.guest_phys_addr + self.size

    @property
    def uva_end(self) -> int:
        """One past the last front-end virtual address of the region."""
        return self.userspace_addr + self.size

    @property
    def closed(self) -> bool:
        """True once the region has been unmapped (or its unmap deferred)."""
        return self._mm is None

    @property
    def host_address(self) -> int:
        """Where this process maps the region's first byte (what the kernel's vhost needs)."""
        if self._mm is None:
            raise GuestMemoryError(
                f"memory region gpa {self.guest_phys_addr:#x} is unmapped",
                address=self.guest_phys_addr,
                length=self.size,
            )
        return view_address(self.view)

    def spec(self) -> RegionSpec:
        """The fields a front-end sends for this region (only meaningful when ``fd`` is set)."""
        return RegionSpec(
            -1 if self.fd is None else self.fd,
            self.mmap_offset,
            self.size,
            self.guest_phys_addr,
            self.userspace_addr,
        )

    @classmethod
    def map(
        cls,
        fd: int,
        mmap_offset: int,
        size: int,
        guest_phys_addr: int,
        userspace_addr: int,
        *,
        require_sealed: bool | None = None,
        keep_fd: bool = False,
    ) -> Region:
        """Map a region from ``fd``; the fd is not kept (the caller may close it) unless
        ``keep_fd``: then the region owns a duplicate as :attr:`fd` (to hand the memory on to a
        worker process), closed with the region.

        A file smaller than ``mmap_offset + size`` is refused; one not sealed against shrinking
        is refused with ``require_sealed`` (None: the process default, see
        :func:`set_require_sealed_default`), else warned about once.
        """
        if require_sealed is None:
            require_sealed = _require_sealed_default
        what = f"memory region gpa {guest_phys_addr:#x} size {size:#x}"
        _check_range(what, guest_phys_addr, size)
        _check_range(f"{what} userspace_addr", userspace_addr, size)
        mm, slack = _map_shared(fd, mmap_offset, size, what, require_sealed)
        view = memoryview(mm)[slack : slack + size]
        owned = os.dup(fd) if keep_fd else None
        return cls(guest_phys_addr, size, userspace_addr, mmap_offset, view, owned, mm)

    def close(self) -> None:
        """Unmap the region (deferred while memoryviews into it are alive); close an owned fd."""
        mm, self._mm = self._mm, None
        if mm is not None:
            _release_mapping(mm, self.view, f"memory region gpa {self.guest_phys_addr:#x}")
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __del__(self) -> None:
        if self._mm is not None or self.fd is not None:
            self.close()


def _or_partial_bytes(
    or_byte: atomic.OrByte, array: ctypes.Array[ctypes.c_ubyte], first: int, last: int
) -> tuple[int, int]:
    """Set the bits of pages ``first..last`` that share a byte with pages outside the range,
    with an atomic OR each; the bytes ``[from, to)`` left to fill with 0xFF whole."""
    first_byte = first >> 3
    last_byte = last >> 3
    if first_byte == last_byte:
        mask = (0xFF << (first & 7)) & (0xFF >> (7 - (last & 7)))
        if mask != 0xFF:
            or_byte(_byref(array, first_byte), mask, _SEQ_CST)
            return first_byte, first_byte
        return first_byte, last_byte + 1
    full_from, full_to = first_byte, last_byte + 1
    if first & 7:
        or_byte(_byref(array, first_byte), (0xFF << (first & 7)) & 0xFF, _SEQ_CST)
        full_from += 1
    if (last & 7) != 7:
        or_byte(_byref(array, last_byte), 0xFF >> (7 - (last & 7)), _SEQ_CST)
        full_to -= 1
    return full_from, full_to


class DirtyLog:
    """The vhost dirty-page log: one bit per 4 KiB guest-physical page, LSB first in each byte.

    The front-end shares one log among all the vhost back-ends of a VM (other processes), so a
    bit is set with an atomic OR on the shared mapping (see :mod:`pyvhost.virtio.atomic`;
    :attr:`atomic_impl` says which): a load and store, even under a lock, would lose a bit
    another back-end sets in the same byte in between, and that page would not be re-sent
    during migration. Bytes wholly inside a marked range are set with plain stores of 0xFF,
    which cannot lose anyone's bit (they are all set); a front-end that reads and clears the
    log with an atomic exchange, as QEMU does, sees each such store either before its exchange
    (and sends the pages) or after (and sends them next round). Only a front-end clearing with
    a plain load then store could lose bits, ours or anyone's, atomic or not. The ``locked``
    implementation (no libatomic, not x86-64) is correct among this process's threads only.
    """

    def __init__(
        self,
        fd: int,
        size: int,
        offset: int = 0,
        *,
        atomic_impl: str | None = None,
        require_sealed: bool | None = None,
        keep_fd: bool = False,
    ) -> None:
        """Map ``size`` bytes of ``fd`` at ``offset`` (checked as :meth:`Region.map` does;
        ``require_sealed`` None means the process default, see
        :func:`set_require_sealed_default`). ``keep_fd``: keep a duplicate of ``fd`` as
        :attr:`fd` (closed with the log) to hand the log on to a worker process."""
        impl = atomic.default_impl() if atomic_impl is None else atomic_impl
        or_byte = atomic.or_byte(impl)
        if or_byte is None and impl != atomic.LOCKED:
            raise GuestMemoryError(f"dirty log: atomic OR {impl!r} is not available here")
        if require_sealed is None:
            require_sealed = _require_sealed_default
        mm, slack = _map_shared(fd, offset, size, "dirty log", require_sealed)
        self._mm: mmap.mmap | None = mm
        self._view = memoryview(mm)[slack : slack + size]
        self.size = size
        self.offset = offset
        self.fd: int | None = os.dup(fd) if keep_fd else None
        """A duplicate of the log's fd (with ``keep_fd``), else None."""
        self.atomic_impl = impl
        """How bits are set: ``libatomic``, ``x86-64-stub`` or ``locked``."""
        self._or = or_byte
        # A ctypes array over the log, exporting a buffer of the view: while a mark() holds it,
        # close() cannot unmap (the unmap is deferred), so a racing mark never writes into
        # unmapped memory. close() drops it first, so an idle log unmaps at once.
        self._bytes: ctypes.Array[ctypes.c_ubyte] | None = (
            None if or_byte is None else (ctypes.c_ubyte * size).from_buffer(self._view)
        )
        self._lock = threading.Lock()

    @property
    def host_address(self) -> int:
        """Where this process maps the log's first byte (the kernel's VHOST_SET_LOG_BASE)."""
        if self._mm is None:
            raise GuestMemoryError("dirty log is closed")
        return view_address(self._view)

    @property
    def max_address(self) -> int:
        """One past the highest guest-physical address this log can describe."""
        return self.size * 8 * PAGE_SIZE

    def mark(self, gpa: int, length: int) -> None:
        """Set the bit of every page that ``[gpa, gpa + length)`` touches."""
        if length <= 0:
            if length < 0:
                raise GuestMemoryError(
                    f"dirty log: negative length {length}", address=gpa, length=length
                )
            return
        first = gpa >> _PAGE_SHIFT
        last = (gpa + length - 1) >> _PAGE_SHIFT
        if gpa < 0 or last >> 3 >= self.size:
            raise self._refused(gpa, length)
        or_byte = self._or
        if or_byte is None:
            self._mark_locked(first, last)
            return
        array = self._bytes  # held until we return: keeps the mapping alive (see __init__)
        if array is None:
            raise self._closed(gpa, length)
        full_from, full_to = _or_partial_bytes(or_byte, array, first, last)
        if full_to > full_from:
            if RW_BARRIERS_NEEDED:
                write_barrier()  # the data before the log bits (x86 orders stores itself)
            self._view[full_from:full_to] = b"\xff" * (full_to - full_from)

    def _mark_locked(self, first: int, last: int) -> None:
        """Byte load and store under our lock: the fallback without an atomic OR."""
        if self._mm is None:
            raise self._closed(first * PAGE_SIZE, (last - first + 1) * PAGE_SIZE)
        view = self._view
        first_byte = first >> 3
        last_byte = last >> 3
        with self._lock:
            if first_byte == last_byte:
                view[first_byte] |= (0xFF << (first & 7)) & (0xFF >> (7 - (last & 7)))
                return
            view[first_byte] |= (0xFF << (first & 7)) & 0xFF
            if last_byte > first_byte + 1:
                view[first_byte + 1 : last_byte] = b"\xff" * (last_byte - first_byte - 1)
            view[last_byte] |= 0xFF >> (7 - (last & 7))

    def _refused(self, gpa: int, length: int) -> GuestMemoryError:
        _check_range("dirty log", gpa, length)
        return GuestMemoryError(
            f"dirty log: gpa {gpa:#x}+{length:#x} is beyond the log "
            f"({self.size} bytes cover up to {self.max_address:#x})",
            address=gpa,
            length=length,
        )

    @staticmethod
    def _closed(gpa: int, length: int) -> GuestMemoryError:
        return GuestMemoryError(
            f"dirty log: gpa {gpa:#x}+{length:#x} not marked: the log was closed "
            "(replaced, or logging stopped)",
            address=gpa,
            length=length,
        )

    def is_dirty(self, page: int) -> bool:
        """Whether the bit for guest page number ``page`` is set."""
        return bool(self._view[page >> 3] & (1 << (page & 7)))

    def dirty_pages(self) -> list[int]:
        """Every page number whose bit is set, in ascending order."""
        data = bytes(self._view)
        return [
            (i << 3) + bit
            for i, byte in enumerate(data)
            if byte
            for bit in range(8)
            if byte & (1 << bit)
        ]

    def clear(self) -> None:
        """Clear every bit (what a front-end does after reading the log)."""
        with self._lock:
            self._view[:] = bytes(self.size)

    def close(self) -> None:
        """Unmap the log (deferred while views, or marks in progress, are alive)."""
        mm = self._mm
        if mm is not None:
            self._mm = None
            self._bytes = None
            _release_mapping(mm, self._view, "dirty log")
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    @classmethod
    def anonymous(cls, size: int, *, atomic_impl: str | None = None) -> tuple[DirtyLog, int]:
        """A log over a fresh memfd; returns the log and the fd (owned by the caller)."""
        fd = _sealed_memfd("pyvhost-dirty-log", size)
        try:
            return cls(fd, size, atomic_impl=atomic_impl), fd
        except BaseException:
            os.close(fd)
            raise


class GuestMemory(Closing):
    """The guest's memory as a table of mapped regions, with GPA and front-end VA translation.

    Translations may run on other threads while the table changes: each sees the old or the new
    table as a whole; one that loses the race with a removal gets a GuestMemoryError. Views
    already handed out stay valid (the mapping is kept until they are released).
    """

    def __init__(
        self,
        regions: Iterable[RegionSpec] = (),
        *,
        require_sealed: bool | None = None,
        keep_fds: bool = False,
    ) -> None:
        """``require_sealed``: refuse region fds not sealed against shrinking (F_SEAL_SHRINK)
        instead of warning; None means the process default (:func:`set_require_sealed_default`).
        ``keep_fds``: each region keeps a duplicate of its fd (``Region.fd``) so that the memory
        can be mapped again elsewhere (the daemon's worker processes).
        """
        self.require_sealed = _require_sealed_default if require_sealed is None else require_sealed
        self.keep_fds = keep_fds
        # Each table is one tuple, swapped with one store, so a reader on another thread never
        # pairs the starts of one table with the regions of another.
        self._regions: tuple[Region, ...] = ()
        self._gpa_table: tuple[list[int], tuple[Region, ...]] = ([], ())
        self._uva_table: tuple[list[int], tuple[Region, ...]] = ([], ())
        self._fast: tuple[list[int], list[int], list[memoryview]] = ([], [], [])
        self._log: DirtyLog | None = None
        self._lock = threading.Lock()
        self.replace(regions)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def anonymous(
        cls,
        size: int,
        guest_phys_addr: int = 0,
        userspace_addr: int | None = None,
    ) -> GuestMemory:
        """Guest memory over one fresh memfd, as a driver (test harness, ``exercise``) makes it.

        The memfd stays open as ``regions[0].fd`` and is closed with the memory, so it can be sent
        to a back-end with ``regions[0].spec()``.
        """
        mem = cls()
        mem.add_anonymous(size, guest_phys_addr, userspace_addr)
        return mem

    def add_anonymous(
        self, size: int, guest_phys_addr: int, userspace_addr: int | None = None
    ) -> Region:
        """Add a region over a fresh memfd that the region owns (see :meth:`anonymous`)."""
        if userspace_addr is None:
            userspace_addr = _DEFAULT_UVA_BASE + guest_phys_addr
        fd = _sealed_memfd("pyvhost-guest-ram", size)
        try:
            region = self.add_region(fd, 0, size, guest_phys_addr, userspace_addr)
        except BaseException:
            os.close(fd)
            raise
        if region.fd is not None:  # keep_fds made a duplicate: the memfd itself is enough
            os.close(region.fd)
        region.fd = fd
        return region

    # -- region table ---------------------------------------------------------------------------

    @property
    def regions(self) -> tuple[Region, ...]:
        """The regions sorted by guest-physical address."""
        return self._regions

    def _install(self, regions: Iterable[Region]) -> None:
        by_gpa = tuple(sorted(regions, key=lambda r: r.guest_phys_addr))
        by_uva = tuple(sorted(by_gpa, key=lambda r: r.userspace_addr))
        self._uva_table = ([r.userspace_addr for r in by_uva], by_uva)
        self._gpa_table = ([r.guest_phys_addr for r in by_gpa], by_gpa)
        self._regions = by_gpa
        self._fast = (
            [r.guest_phys_addr for r in by_gpa],
            [r.size for r in by_gpa],
            [r.view for r in by_gpa],
        )

    @staticmethod
    def _check_overlap(new: RegionSpec, existing: Iterable[Region | RegionSpec]) -> None:
        n_gpa_end = new.guest_phys_addr + new.size
        n_uva_end = new.userspace_addr + new.size
        for r in existing:
            if new.guest_phys_addr < r.guest_phys_addr + r.size and r.guest_phys_addr < n_gpa_end:
                raise GuestMemoryError(
                    f"memory region gpa {new.guest_phys_addr:#x} size {new.size:#x} overlaps "
                    f"region gpa {r.guest_phys_addr:#x} size {r.size:#x}",
                    address=new.guest_phys_addr,
                    length=new.size,
                )
            if new.userspace_addr < r.userspace_addr + r.size and r.userspace_addr < n_uva_end:
                raise GuestMemoryError(
                    f"memory region userspace_addr {new.userspace_addr:#x} size {new.size:#x} "
                    f"overlaps region userspace_addr {r.userspace_addr:#x} size {r.size:#x}",
                    address=new.userspace_addr,
                    length=new.size,
                )

    def add_region(
        self,
        fd: int,
        mmap_offset: int,
        size: int,
        guest_phys_addr: int,
        userspace_addr: int,
    ) -> Region:
        """Map and add one region (ADD_MEM_REG); the others are undisturbed; fd is not kept."""
        spec = RegionSpec(fd, mmap_offset, size, guest_phys_addr, userspace_addr)
        with self._lock:
            _check_range("memory region", guest_phys_addr, size)
            _check_range("memory region userspace_addr", userspace_addr, size)
            self._check_overlap(spec, self._regions)
            region = Region.map(
                fd,
                mmap_offset,
                size,
                guest_phys_addr,
                userspace_addr,
                require_sealed=self.require_sealed,
                keep_fd=self.keep_fds,
            )
            self._install((*self._regions, region))
        return region

    def remove_region(self, guest_phys_addr: int, size: int, userspace_addr: int) -> None:
        """Remove and unmap the region matching all three fields (REM_MEM_REG)."""
        with self._lock:
            for region in self._regions:
                if (
                    region.guest_phys_addr == guest_phys_addr
                    and region.size == size
                    and region.userspace_addr == userspace_addr
                ):
                    self._install(r for r in self._regions if r is not region)
                    break
            else:
                raise GuestMemoryError(
                    f"no memory region with gpa {guest_phys_addr:#x} size {size:#x} "
                    f"userspace_addr {userspace_addr:#x} to remove "
                    f"({len(self._regions)} regions mapped)",
                    address=guest_phys_addr,
                    length=size,
                )
        region.close()

    def replace(self, specs: Iterable[RegionSpec | tuple[int, int, int, int, int]]) -> None:
        """Replace the whole table (SET_MEM_TABLE): all new regions map, or nothing changes."""
        wanted = [RegionSpec(*s) for s in specs]
        for i, spec in enumerate(wanted):
            _check_range("memory region", spec.guest_phys_addr, spec.size)
            _check_range("memory region userspace_addr", spec.userspace_addr, spec.size)
            self._check_overlap(spec, wanted[:i])
        mapped: list[Region] = []
        try:
            for spec in wanted:
                mapped.append(
                    Region.map(*spec, require_sealed=self.require_sealed, keep_fd=self.keep_fds)
                )
        except BaseException:
            for region in mapped:
                region.close()
            raise
        with self._lock:
            old = self._regions
            self._install(mapped)
        for region in old:
            region.close()

    def clear(self) -> None:
        """Unmap every region."""
        self.replace(())

    def close(self) -> None:
        """Unmap every region and the dirty log."""
        self.clear()
        self.set_log(None)

    def __iter__(self) -> Iterator[Region]:
        return iter(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    # -- translation ----------------------------------------------------------------------------

    def _miss(self, gpa: int, length: int) -> GuestMemoryError:
        """Build the error for a gpa range not (fully) covered by the table."""
        _check_range("guest address", gpa, length)
        starts, regions = self._gpa_table
        i = bisect_right(starts, gpa) - 1
        if i < 0 or gpa >= regions[i].gpa_end:
            why = "is not in any memory region"
        else:
            why = (
                f"runs past the end of region gpa {regions[i].guest_phys_addr:#x} "
                f"size {regions[i].size:#x}"
            )
            if i + 1 < len(regions) and regions[i + 1].guest_phys_addr == regions[i].gpa_end:
                why += " into an adjacent region (not contiguous in one mapping)"
        return GuestMemoryError(
            f"guest address {gpa:#x}+{length:#x} {why} ({len(regions)} regions mapped)",
            address=gpa,
            length=length,
        )

    def fast_table(self) -> tuple[list[int], list[int], list[memoryview]]:
        """Region starts, sizes and views sorted by gpa, for inlined lookups on hot paths.

        A snapshot: a later table change installs new lists and leaves these untouched. Callers
        fall back to :meth:`translate` for anything but the one-region case (and for errors).
        """
        return self._fast

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``[gpa, gpa + length)``, which must lie within one region."""
        starts, regions = self._gpa_table
        i = bisect_right(starts, gpa) - 1
        if i >= 0 and length >= 0:
            region = regions[i]
            offset = gpa - region.guest_phys_addr
            if offset + length <= region.size:
                try:
                    return region.view[offset : offset + length]
                except ValueError:  # released: the region was removed after we looked it up
                    raise _removed(gpa, length) from None
        raise self._miss(gpa, length)

    def translate(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering ``[gpa, gpa + length)``, one per region crossed (adjacent regions)."""
        if length == 0 and gpa >= 0:
            return []
        starts, regions = self._gpa_table
        i = bisect_right(starts, gpa) - 1
        if i >= 0 and length > 0:
            region = regions[i]
            offset = gpa - region.guest_phys_addr
            try:
                if offset + length <= region.size:
                    return [region.view[offset : offset + length]]
                if offset < region.size:
                    return self._translate_across(regions, i, offset, gpa, length)
            except ValueError:  # released: a region was removed after we looked it up
                raise _removed(gpa, length) from None
        raise self._miss(gpa, length)

    def _translate_across(
        self, regions: tuple[Region, ...], i: int, offset: int, gpa: int, length: int
    ) -> list[memoryview]:
        """The views of a range that starts in ``regions[i]`` and runs into the next ones."""
        region = regions[i]
        out: list[memoryview] = []
        remaining = length
        n = len(regions)
        while True:
            chunk = min(remaining, region.size - offset)
            out.append(region.view[offset : offset + chunk])
            remaining -= chunk
            if remaining == 0:
                return out
            end = region.gpa_end
            i += 1
            if i >= n or regions[i].guest_phys_addr != end:
                raise self._miss(gpa, length)
            region = regions[i]
            offset = 0

    def uva_to_gpa(self, uva: int, length: int = 1) -> int:
        """Translate a front-end virtual address (SET_VRING_ADDR) to a guest-physical one."""
        _check_range("userspace address", uva, length)
        starts, by_uva = self._uva_table
        i = bisect_right(starts, uva) - 1
        if i >= 0:
            region = by_uva[i]
            offset = uva - region.userspace_addr
            if offset + length <= region.size:
                return region.guest_phys_addr + offset
        raise GuestMemoryError(
            f"userspace address {uva:#x}+{length:#x} is not inside one memory region "
            f"({len(self._regions)} regions mapped)",
            address=uva,
            length=length,
        )

    def read(self, gpa: int, n: int) -> bytes:
        """Copy ``n`` bytes of guest memory at ``gpa``."""
        views = self.translate(gpa, n)
        if len(views) == 1:
            return views[0].tobytes()
        return b"".join(views)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``gpa`` and mark the pages dirty if logging."""
        src = memoryview(data).cast("B")
        pos = 0
        for view in self.translate(gpa, len(src)):
            n = len(view)
            view[:] = src[pos : pos + n]
            pos += n
        if self._log is not None:
            self._log.mark(gpa, len(src))

    # -- dirty logging --------------------------------------------------------------------------

    @property
    def log(self) -> DirtyLog | None:
        """The dirty log in use, or None when logging is off."""
        return self._log

    @property
    def logging(self) -> bool:
        """Whether device writes must be recorded in the dirty log."""
        return self._log is not None

    def set_log(self, dirty_log: DirtyLog | None) -> None:
        """Start (or stop, with None) dirty logging; a previous log is closed."""
        old, self._log = self._log, dirty_log
        if old is not None and old is not dirty_log:
            old.close()

    def log_write(self, gpa: int, length: int) -> None:
        """Record a device write of ``length`` bytes at ``gpa`` (no-op when logging is off)."""
        dirty_log = self._log
        if dirty_log is not None and length:
            dirty_log.mark(gpa, length)

    def log_pieces(self, pieces: Iterable[tuple[int, int]], written: int) -> None:
        """Record a device write of ``written`` bytes gathered over ``(gpa, len)`` pieces."""
        dirty_log = self._log
        if dirty_log is None:
            return
        for gpa, size in pieces:
            if written <= 0:
                break
            n = size if size < written else written
            dirty_log.mark(gpa, n)
            written -= n
