"""virtio-blk requests (virtio 1.2 section 5.2) executed against an image fd: :class:`BlkBackend`.

It takes one popped :class:`~pyvhost.virtio.chain.DescriptorChain`, performs the request with
``os.preadv`` / ``os.pwritev`` straight into and out of the guest-memory views, writes the status
byte and returns the used length. It keeps no per-request state, so queues can run it from several
threads at once (positional I/O on one fd needs no lock).

Status choices, as QEMU's virtio-blk makes them: an unknown request type, a discard with the
unmap flag, unknown segment flags or too many discard / write-zeroes segments get
``VIRTIO_BLK_S_UNSUPP``; everything else that is wrong with a request (short header, data in
the wrong direction, length not a multiple of 512, sector range past the end, writes to a
read-only disk, host I/O errors) gets ``VIRTIO_BLK_S_IOERR``. A chain without a single writable
byte has nowhere to put a status: it is completed with used length 0.

Replaying a request (a front-end resubmits what was in flight when the back-end restarted) is
harmless: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES are idempotent, each leaves the disk
(and the guest buffers) as one execution would. Only requests not yet completed are replayed, and
a driver that has two overlapping writes in flight gets no ordering between them from virtio, so
a replayed write landing after a newer overlapping one is an outcome it already had to accept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence

from pyvhost.closing import Closing
from pyvhost.devices.blk.config import (
    DEFAULT_LIMITS,
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    BlkLimits,
    check_serial,
    default_serial,
    encode_config,
)
from pyvhost.virtio import features as vf
from pyvhost.virtio.chain import DescriptorChain

__all__ = [
    "VIRTIO_BLK_S_IOERR",
    "VIRTIO_BLK_S_OK",
    "VIRTIO_BLK_S_UNSUPP",
    "VIRTIO_BLK_T_DISCARD",
    "VIRTIO_BLK_T_FLUSH",
    "VIRTIO_BLK_T_GET_ID",
    "VIRTIO_BLK_T_IN",
    "VIRTIO_BLK_T_OUT",
    "VIRTIO_BLK_T_WRITE_ZEROES",
    "VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP",
    "BlkBackend",
    "fallocate",
]

log = logging.getLogger("pyvhost.devices.blk")

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
HEADER_SIZE = 16
SEGMENT_SIZE = 16

_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_ZEROS = bytes(1 << 20)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_BLKDISCARD = 0x1277
_BLKZEROOUT = 0x127F
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY)


class _RateLimiter:
    """At most ``burst`` messages per ``interval`` seconds; counts what it drops."""

    def __init__(self, burst: int = 10, interval: float = 5.0) -> None:
        self.burst = burst
        self.interval = interval
        self._lock = threading.Lock()
        self._window = 0.0
        self._count = 0
        self._dropped = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._window >= self.interval:
                dropped, self._dropped = self._dropped, 0
                self._window = now
                self._count = 0
                if dropped:
                    log.warning("%d malformed-request messages suppressed", dropped)
            if self._count >= self.burst:
                self._dropped += 1
                return
            self._count += 1
        log.warning(msg, *args)


def _skip(views: Sequence[memoryview], offset: int) -> list[memoryview]:
    """The views from byte ``offset`` on (slices, no copy)."""
    out: list[memoryview] = []
    for view in views:
        n = len(view)
        if offset >= n:
            offset -= n
            continue
        out.append(view[offset:] if offset else view)
        offset = 0
    return out


def _all_io(
    call: Callable[[int, Sequence[memoryview], int], int],
    fd: int,
    views: list[memoryview],
    offset: int,
) -> int:
    """Run preadv / pwritev until every view is done or the call returns 0; bytes moved."""
    if len(views) <= _IOV_MAX:
        got = call(fd, views, offset)
        want = sum(map(len, views))
        if got >= want or got <= 0:
            return got
        return got + _all_io(call, fd, _skip(views, got), offset + got)
    total = 0
    while views:
        batch = views[:_IOV_MAX]
        want = sum(len(v) for v in batch)
        got = call(fd, batch, offset)
        total += got
        offset += got
        if got == want:
            views = views[_IOV_MAX:]
        elif got <= 0:
            break
        else:
            views = _skip(batch, got) + views[_IOV_MAX:]
    return total


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.fallocate64 if hasattr(libc, "fallocate64") else libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with mode flags (``os.posix_fallocate`` has none); raises OSError."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _RequestError(Exception):
    """A request the device refuses: carries the status and the reason for the log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _ioerr(reason: str) -> _RequestError:
    return _RequestError(VIRTIO_BLK_S_IOERR, reason)


def _unsupp(reason: str) -> _RequestError:
    return _RequestError(VIRTIO_BLK_S_UNSUPP, reason)


class BlkBackend(Closing):
    """Executes virtio-blk requests against an open image fd; thread-safe, stateless per request.

    ``fd`` is owned by the backend (closed by :meth:`close`). ``capacity`` is in bytes, a multiple
    of 512 (a trailing partial sector of the image is not exposed).
    """

    def __init__(
        self,
        fd: int,
        capacity: int,
        *,
        readonly: bool = False,
        serial: bytes | str = b"",
        block_device: bool = False,
        limits: BlkLimits = DEFAULT_LIMITS,
        name: str = "blk",
    ) -> None:
        if capacity < 0 or capacity % SECTOR_SIZE:
            raise ValueError(f"capacity {capacity} must be a non-negative multiple of 512")
        self.fd = fd
        self.capacity = capacity
        self.readonly = readonly
        self.serial = check_serial(serial)
        self.block_device = block_device
        self.limits = limits
        self.name = name
        self.path: str | None = None
        """The absolute path :meth:`open` opened (a worker process opens it again), else None."""
        self._ratelimit = _RateLimiter()
        self._handlers: dict[int, Callable[[DescriptorChain, int], int]] = {
            VIRTIO_BLK_T_IN: self._do_in,
            VIRTIO_BLK_T_OUT: self._do_out,
            VIRTIO_BLK_T_FLUSH: self._do_flush,
            VIRTIO_BLK_T_GET_ID: self._do_get_id,
            VIRTIO_BLK_T_DISCARD: self._do_discard,
            VIRTIO_BLK_T_WRITE_ZEROES: self._do_write_zeroes,
        }

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        serial: bytes | str | None = None,
        limits: BlkLimits = DEFAULT_LIMITS,
    ) -> BlkBackend:
        """Open a raw image file or a block device (O_RDONLY in read-only mode)."""
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            block_device = stat.S_ISBLK(st.st_mode)
            if not (block_device or stat.S_ISREG(st.st_mode)):
                raise ValueError(f"{os.fspath(path)}: not a regular file or a block device")
            size = os.lseek(fd, 0, os.SEEK_END) if block_device else st.st_size
            backend = cls(
                fd,
                size - size % SECTOR_SIZE,
                readonly=readonly,
                serial=default_serial(path) if serial is None else serial,
                block_device=block_device,
                limits=limits,
                name=os.path.basename(os.fspath(path)),
            )
            backend.path = os.path.abspath(path)
            return backend
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Close the image fd (idempotent)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    # -- description ----------------------------------------------------------------------------

    @property
    def sectors(self) -> int:
        """Capacity in 512-byte sectors."""
        return self.capacity // SECTOR_SIZE

    def features(self, num_queues: int = 1) -> int:
        """The virtio-blk (device-type) feature bits; ring and transport bits are the device's."""
        bits = [
            vf.BLK_F_SIZE_MAX,
            vf.BLK_F_SEG_MAX,
            vf.BLK_F_BLK_SIZE,
            vf.BLK_F_FLUSH,
        ]
        if num_queues > 1:
            bits.append(vf.BLK_F_MQ)
        if self.readonly:
            bits.append(vf.BLK_F_RO)
        else:
            bits += [vf.BLK_F_DISCARD, vf.BLK_F_WRITE_ZEROES]
        return vf.bit_mask(*bits)

    def config(self, num_queues: int = 1) -> bytes:
        """The whole config space for a device with ``num_queues`` queues."""
        return encode_config(self.sectors, limits=self.limits, num_queues=num_queues)

    # -- requests -------------------------------------------------------------------------------

    def handle(self, chain: DescriptorChain, queue: int = 0) -> int:
        """Execute one request, write its status byte; return the used length. Never raises.

        The used length is every writable byte of the chain (data, then the status byte, which
        is the last one): what a dirty log must cover. 0 when there is no byte for a status.
        """
        if chain.write_len <= 0:
            self._ratelimit.warning(
                "%s: queue %d: request (head %d) has no writable byte for the status; "
                "completed with nothing written",
                self.name,
                queue,
                chain.head,
            )
            return 0
        try:
            if chain.read_len < HEADER_SIZE:
                raise _ioerr(f"header is {chain.read_len} bytes, needs {HEADER_SIZE}")
            first = chain.readable[0]
            if len(first) >= HEADER_SIZE:
                rtype, _ioprio, sector = _HEADER.unpack_from(first)
            else:
                rtype, _ioprio, sector = _HEADER.unpack(chain.read_at(0, HEADER_SIZE))
            handler = self._handlers.get(rtype)
            if handler is None:
                raise _unsupp(f"unknown request type {rtype}")
            status = handler(chain, sector)
        except _RequestError as bad:
            self._ratelimit.warning(
                "%s: queue %d: request (head %d) failed (%s): %s",
                self.name,
                queue,
                chain.head,
                "UNSUPP" if bad.status == VIRTIO_BLK_S_UNSUPP else "IOERR",
                bad.reason,
            )
            status = bad.status
        except OSError as exc:
            self._ratelimit.warning(
                "%s: queue %d: request (head %d) I/O error: %s",
                self.name,
                queue,
                chain.head,
                str(exc),
            )
            status = VIRTIO_BLK_S_IOERR
        except Exception:  # a request must never take the daemon down
            log.exception("%s: queue %d: request (head %d) crashed", self.name, queue, chain.head)
            status = VIRTIO_BLK_S_IOERR
        try:
            self._set_status(chain, status)
        except (ValueError, IndexError) as exc:  # the views were released under us
            log.error(
                "%s: queue %d: request (head %d): no status written: %s",
                self.name,
                queue,
                chain.head,
                str(exc),
            )
            return 0
        return chain.write_len

    @staticmethod
    def _set_status(chain: DescriptorChain, status: int) -> None:
        last = chain.writable[-1]
        if len(last):
            last[-1] = status
            return
        for view in reversed(chain.writable):
            if len(view):
                view[len(view) - 1] = status
                return

    @staticmethod
    def _writable_data(chain: DescriptorChain) -> list[memoryview]:
        """The writable views without the final status byte (slices, no copy)."""
        if len(chain.writable[-1]) == 1:
            return chain.writable[:-1]
        views = [v for v in chain.writable if len(v)]
        last = views.pop()
        if len(last) > 1:
            views.append(last[: len(last) - 1])
        return views

    def _check_range(self, sector: int, length: int) -> int:
        """Byte offset of ``sector`` after checking alignment and bounds of ``length`` bytes."""
        if length % SECTOR_SIZE:
            raise _ioerr(f"data length {length} is not a multiple of {SECTOR_SIZE}")
        offset = sector * SECTOR_SIZE
        if offset + length > self.capacity:
            raise _ioerr(
                f"sector {sector} + {length // SECTOR_SIZE} sectors is past the end "
                f"({self.sectors} sectors)"
            )
        return offset

    def _do_in(self, chain: DescriptorChain, sector: int) -> int:
        if chain.read_len > HEADER_SIZE:
            raise _ioerr(f"IN has {chain.read_len - HEADER_SIZE} readable data bytes")
        length = chain.write_len - 1
        offset = self._check_range(sector, length)
        if length:
            got = _all_io(os.preadv, self.fd, self._writable_data(chain), offset)
            if got != length:
                raise _ioerr(f"IN: short read of {got} of {length} bytes at sector {sector}")
        return VIRTIO_BLK_S_OK

    def _do_out(self, chain: DescriptorChain, sector: int) -> int:
        if chain.write_len != 1:
            raise _ioerr(f"OUT has {chain.write_len - 1} writable data bytes")
        if self.readonly:
            raise _ioerr("OUT on a read-only disk")
        length = chain.read_len - HEADER_SIZE
        offset = self._check_range(sector, length)
        if length:
            readable = chain.readable
            views = (
                readable[1:] if len(readable[0]) == HEADER_SIZE else _skip(readable, HEADER_SIZE)
            )
            done = _all_io(os.pwritev, self.fd, views, offset)
            if done != length:
                raise _ioerr(f"OUT: short write of {done} of {length} bytes at sector {sector}")
        return VIRTIO_BLK_S_OK

    def _do_flush(self, chain: DescriptorChain, sector: int) -> int:
        if not self.readonly:
            os.fdatasync(self.fd)
        return VIRTIO_BLK_S_OK

    def _do_get_id(self, chain: DescriptorChain, sector: int) -> int:
        room = min(chain.write_len - 1, VIRTIO_BLK_ID_BYTES)
        ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:room]
        chain.write_at(0, ident)
        return VIRTIO_BLK_S_OK

    def _segments(
        self, chain: DescriptorChain, what: str, max_seg: int
    ) -> list[tuple[int, int, int]]:
        """Parse and validate the ``(sector, num_sectors, flags)`` segments after the header."""
        if chain.write_len != 1:
            raise _ioerr(f"{what} has {chain.write_len - 1} writable data bytes")
        if self.readonly:
            raise _ioerr(f"{what} on a read-only disk")
        length = chain.read_len - HEADER_SIZE
        if length <= 0 or length % SEGMENT_SIZE:
            raise _ioerr(f"{what} payload of {length} bytes is not a whole number of segments")
        count = length // SEGMENT_SIZE
        if count > max_seg:
            raise _unsupp(f"{what} has {count} segments (max {max_seg})")
        raw = chain.read_at(HEADER_SIZE, length)
        return [_SEGMENT.unpack_from(raw, k * SEGMENT_SIZE) for k in range(count)]

    def _check_segment(self, what: str, sector: int, count: int, max_sectors: int) -> int:
        if count > max_sectors:
            raise _ioerr(f"{what} of {count} sectors (max {max_sectors})")
        return self._check_range(sector, count * SECTOR_SIZE)

    def _do_discard(self, chain: DescriptorChain, sector: int) -> int:
        lim = self.limits
        ranges = []
        for seg_sector, count, flags in self._segments(chain, "DISCARD", lim.max_discard_seg):
            if flags:
                raise _unsupp(f"DISCARD segment flags {flags:#x} (unmap or unknown bits)")
            offset = self._check_segment("DISCARD", seg_sector, count, lim.max_discard_sectors)
            ranges.append((offset, count * SECTOR_SIZE))
        for offset, length in ranges:
            self._zero(offset, length, unmap=True, discard=True)
        return VIRTIO_BLK_S_OK

    def _do_write_zeroes(self, chain: DescriptorChain, sector: int) -> int:
        lim = self.limits
        ranges = []
        segs = self._segments(chain, "WRITE_ZEROES", lim.max_write_zeroes_seg)
        for seg_sector, count, flags in segs:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                raise _unsupp(f"WRITE_ZEROES segment flags {flags:#x} have unknown bits")
            offset = self._check_segment(
                "WRITE_ZEROES", seg_sector, count, lim.max_write_zeroes_sectors
            )
            ranges.append((offset, count * SECTOR_SIZE, bool(flags)))
        for offset, length, unmap in ranges:
            self._zero(offset, length, unmap=unmap)
        return VIRTIO_BLK_S_OK

    # -- zeroing --------------------------------------------------------------------------------

    def _zero(self, offset: int, length: int, *, unmap: bool, discard: bool = False) -> None:
        """Make ``[offset, offset+length)`` read as zeros, deallocating it when ``unmap``.

        On a block device a discard is only BLKDISCARD (the spec leaves discarded data
        unspecified, and writing zeros instead would cost what discard is meant to save); on a
        file it punches a hole, so discarded sectors read as zeros there.
        """
        if not length:
            return
        if self.block_device:
            request = _BLKDISCARD if discard else _BLKZEROOUT
            try:
                fcntl.ioctl(self.fd, request, struct.pack("=QQ", offset, length))
                return
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED:
                    raise
                if discard:
                    return
        else:
            modes = [_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE]
            if unmap:
                modes.insert(0, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE)
            for mode in modes:
                try:
                    fallocate(self.fd, mode, offset, length)
                    return
                except OSError as exc:
                    if exc.errno not in _NOT_SUPPORTED:
                        raise
        self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = memoryview(_ZEROS)
        while length:
            n = min(length, len(zeros))
            done = os.pwrite(self.fd, zeros[:n], offset)
            if done <= 0:
                raise OSError(errno.EIO, f"write of zeros at {offset} made no progress")
            offset += done
            length -= done
