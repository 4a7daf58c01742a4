"""BlkDriver: virtio-blk requests over a :class:`~pyvhost.driver.session.DriverSession`.

A request is a chain of a 16-byte header ``{le32 type, le32 reserved, le64 sector}`` (readable),
the data (readable for OUT / DISCARD / WRITE_ZEROES, writable for IN / GET_ID) and a one-byte
status the device writes (OK 0, IOERR 1, UNSUPP 2). Sectors are always 512 bytes. Header and
status share one small allocation per request; data goes in its own buffer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from pyvhost.driver.session import DriverSession, QueueFullError
from pyvhost.errors import ReplyError, VhostError
from pyvhost.virtio import features as vf

__all__ = [
    "SECTOR_SIZE",
    "BlkCompletion",
    "BlkConfig",
    "BlkDriver",
    "BlkRequestError",
    "QueueFullError",
    "RequestType",
]

SECTOR_SIZE = 512
ID_BYTES = 20

STATUS_OK = 0
STATUS_IOERR = 1
STATUS_UNSUPP = 2
STATUS_NAMES = {STATUS_OK: "OK", STATUS_IOERR: "IOERR", STATUS_UNSUPP: "UNSUPP"}
_UNSET = 0xFF

_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
SEGMENT_F_UNMAP = 1


_ZEROS = bytes(1 << 20)
"""Read buffers up to this size are cleared from here before they are submitted."""


class RequestType:
    """virtio-blk request types (VIRTIO_BLK_T_*)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13

    NAMES: ClassVar[dict[int, str]] = {
        0: "IN",
        1: "OUT",
        4: "FLUSH",
        8: "GET_ID",
        11: "DISCARD",
        13: "WRITE_ZEROES",
    }


class BlkRequestError(VhostError):
    """A request completed with a status other than OK (or with no status at all)."""

    def __init__(self, message: str, *, request: str, sector: int, status: int) -> None:
        super().__init__(message)
        self.request = request
        self.sector = sector
        self.status = status


@dataclass(frozen=True)
class BlkConfig:
    """The fields of ``struct virtio_blk_config`` this driver uses (0 when not offered)."""

    capacity: int
    size_max: int
    seg_max: int
    blk_size: int
    physical_block_exp: int
    min_io_size: int
    opt_io_size: int
    writeback: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int

    SIZE: ClassVar[int] = 60

    @classmethod
    def parse(cls, data: bytes) -> BlkConfig:
        """Decode config space bytes (shorter input: missing fields read as 0)."""
        raw = bytes(data).ljust(cls.SIZE, b"\0")
        capacity, size_max, seg_max = struct.unpack_from("<QII", raw, 0)
        (blk_size,) = struct.unpack_from("<I", raw, 20)
        phys_exp, _align, min_io, opt_io = struct.unpack_from("<BBHI", raw, 24)
        writeback, _unused, num_queues = struct.unpack_from("<BBH", raw, 32)
        fields = struct.unpack_from("<IIIIIB", raw, 36)
        return cls(
            capacity,
            size_max,
            seg_max,
            blk_size,
            phys_exp,
            min_io,
            opt_io,
            writeback,
            num_queues,
            *fields,
        )

    @property
    def capacity_bytes(self) -> int:
        return self.capacity * SECTOR_SIZE


@dataclass
class BlkCompletion:
    """One finished request: what it was, its status and (for IN / GET_ID) the data read."""

    token: int
    queue: int
    type: int
    sector: int
    length: int
    status: int
    written: int
    data: bytes | None = None

    @property
    def name(self) -> str:
        return RequestType.NAMES.get(self.type, f"type {self.type}")

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def error(self) -> BlkRequestError:
        """The error describing a failed completion."""
        if self.status == _UNSET:
            what = "the back-end completed it without writing the status byte"
        else:
            label = STATUS_NAMES.get(self.status, "unknown")
            what = f"status {label} ({self.status})"
        return BlkRequestError(
            f"{self.name} sector {self.sector} ({self.length} bytes) on queue {self.queue}: {what}",
            request=self.name,
            sector=self.sector,
            status=self.status,
        )

    def check(self) -> BlkCompletion:
        """Raise :class:`BlkRequestError` unless the status is OK; return self."""
        if self.status != STATUS_OK:
            raise self.error()
        return self


@dataclass
class _Request:
    queue: int
    type: int
    sector: int
    length: int
    ctl_gpa: int
    data_gpa: int | None
    keep_data: bool


class BlkDriver:
    """virtio-blk over a session: one-shot calls (``read`` ...) and a pipelined API.

    Pipelined: ``submit_*`` returns a token (``kick=False`` to batch several before one
    :meth:`kick`), :meth:`reap` returns :class:`BlkCompletion` objects. The one-shot calls use
    the same path and raise :class:`BlkRequestError` on a bad status.
    """

    def __init__(self, session: DriverSession) -> None:
        self.session = session
        self._requests: dict[int, _Request] = {}
        self._ready: list[BlkCompletion] = []
        self.config = self.read_config()

    def read_config(self) -> BlkConfig:
        """GET_CONFIG for the whole virtio-blk config (shorter if the back-end has less)."""
        try:
            data = self.session.config(0, BlkConfig.SIZE)
        except ReplyError:
            data = self.session.config(0, 36)
        self.config = BlkConfig.parse(data)
        return self.config

    @property
    def capacity(self) -> int:
        """Disk size in bytes."""
        return self.config.capacity_bytes

    @property
    def read_only(self) -> bool:
        return self.session.has_feature(vf.BLK_F_RO)

    def has_feature(self, bit: int) -> bool:
        return self.session.has_feature(bit)

    # --- pipelined API ----------------------------------------------------------------------

    def _data_pieces(self, gpa: int, length: int) -> list[tuple[int, int]]:
        """Split a data buffer by size_max when the device limits segment sizes."""
        limit = self.config.size_max if self.has_feature(vf.BLK_F_SIZE_MAX) else 0
        if not limit or length <= limit:
            return [(gpa, length)]
        return [(gpa + off, min(limit, length - off)) for off in range(0, length, limit)]

    def submit(
        self,
        rtype: int,
        sector: int,
        *,
        data: bytes | bytearray | memoryview | None = None,
        read_len: int = 0,
        queue: int = 0,
        kick: bool = True,
    ) -> int:
        """Submit a raw request: ``data`` goes out (readable), ``read_len`` bytes come back."""
        session = self.session
        ctl = session.alloc(_HEADER.size + 1)
        view = session.view(ctl, _HEADER.size + 1)
        _HEADER.pack_into(view, 0, rtype, 0, sector)
        view[_HEADER.size] = _UNSET
        readable = [(ctl, _HEADER.size)]
        writable: list[tuple[int, int]] = []
        data_gpa = None
        length = 0
        try:
            if data is not None and len(data):
                length = len(data)
                data_gpa = session.alloc(length)
                session.view(data_gpa, length)[:] = memoryview(data).cast("B")
                readable += self._data_pieces(data_gpa, length)
            elif read_len:
                length = read_len
                data_gpa = session.alloc(length)
                # A recycled buffer may still hold what a write of the same block carried:
                # cleared, a read the back-end did not do cannot look right.
                session.view(data_gpa, length)[:] = (
                    _ZEROS[:length] if length <= len(_ZEROS) else bytes(length)
                )
                writable += self._data_pieces(data_gpa, length)
            writable.append((ctl + _HEADER.size, 1))
            token = session.submit(queue, readable, writable)
        except BaseException:
            session.free(ctl)
            if data_gpa is not None:
                session.free(data_gpa)
            raise
        self._requests[token] = _Request(
            queue, rtype, sector, length, ctl, data_gpa, data is None and read_len > 0
        )
        if kick:
            session.kick(queue)
        return token

    def submit_read(self, sector: int, n_bytes: int, *, queue: int = 0, kick: bool = True) -> int:
        """IN: read ``n_bytes`` (a multiple of 512) from ``sector``."""
        self._check_io("IN", sector, n_bytes)
        return self.submit(RequestType.IN, sector, read_len=n_bytes, queue=queue, kick=kick)

    def submit_write(
        self,
        sector: int,
        data: bytes | bytearray | memoryview,
        *,
        queue: int = 0,
        kick: bool = True,
    ) -> int:
        """OUT: write ``data`` (a multiple of 512 bytes) at ``sector``."""
        self._check_io("OUT", sector, len(data))
        return self.submit(RequestType.OUT, sector, data=data, queue=queue, kick=kick)

    def submit_flush(self, *, queue: int = 0, kick: bool = True) -> int:
        """FLUSH: make every completed write durable."""
        return self.submit(RequestType.FLUSH, 0, queue=queue, kick=kick)

    def submit_get_id(self, *, queue: int = 0, kick: bool = True) -> int:
        """GET_ID: the 20-byte device id string."""
        return self.submit(RequestType.GET_ID, 0, read_len=ID_BYTES, queue=queue, kick=kick)

    def submit_segments(
        self,
        rtype: int,
        segments: list[tuple[int, int, int]],
        *,
        queue: int = 0,
        kick: bool = True,
    ) -> int:
        """DISCARD / WRITE_ZEROES with ``(sector, num_sectors, flags)`` segments."""
        payload = b"".join(_SEGMENT.pack(s, n, f) for s, n, f in segments)
        sector = segments[0][0] if segments else 0
        return self.submit(rtype, sector, data=payload, queue=queue, kick=kick)

    @staticmethod
    def _check_io(name: str, sector: int, n_bytes: int) -> None:
        if sector < 0:
            raise ValueError(f"{name}: negative sector {sector}")
        if n_bytes <= 0 or n_bytes % SECTOR_SIZE:
            raise ValueError(f"{name} sector {sector}: length {n_bytes} is not a multiple of 512")

    def kick(self, queue: int = 0) -> None:
        """Publish and notify what was submitted with ``kick=False`` on ``queue``."""
        self.session.kick(queue)

    def in_flight(self, queue: int | None = None) -> int:
        """Requests submitted and not reaped."""
        if queue is None:
            return len(self._requests)
        return sum(1 for r in self._requests.values() if r.queue == queue)

    def _complete(self, token: int, written: int) -> BlkCompletion:
        req = self._requests.pop(token)
        session = self.session
        status = session.view(req.ctl_gpa + _HEADER.size, 1)[0]
        data = None
        if req.data_gpa is not None:
            if req.keep_data:
                data = session.view(req.data_gpa, req.length).tobytes()
            session.free(req.data_gpa)
        session.free(req.ctl_gpa)
        return BlkCompletion(
            token, req.queue, req.type, req.sector, req.length, status, written, data
        )

    def reap(
        self, timeout: float | None = None, *, queue: int | None = None
    ) -> list[BlkCompletion]:
        """Completed requests (on ``queue`` or any): at least one, or [] after ``timeout``."""
        if queue is None:
            got = [(t, n) for _, t, n in self.session.wait_any(timeout)]
        else:
            got = self.session.wait(queue, timeout)
        return [self._complete(t, n) for t, n in got if t in self._requests]

    def wait_for(self, token: int, timeout: float | None = 30.0) -> BlkCompletion:
        """Reap until request ``token`` completes (others stay available to :meth:`reap`)."""
        req = self._requests.get(token)
        if req is None:
            for i, done in enumerate(self._ready):
                if done.token == token:
                    return self._ready.pop(i)
            raise ValueError(f"request token {token} is not in flight")
        while True:
            got = self.reap(timeout, queue=req.queue)
            if not got:
                raise TimeoutError(
                    f"{RequestType.NAMES.get(req.type, req.type)} sector {req.sector} on queue "
                    f"{req.queue}: no completion within {timeout} s"
                )
            mine = None
            for done in got:
                if done.token == token:
                    mine = done
                else:
                    self._ready.append(done)
            if mine is not None:
                return mine

    def take_ready(self) -> list[BlkCompletion]:
        """Completions collected by the one-shot calls while they waited for their own."""
        ready, self._ready = self._ready, []
        return ready

    # --- one-shot API -----------------------------------------------------------------------

    def read(self, sector: int, n_bytes: int, *, queue: int = 0) -> bytes:
        """Read ``n_bytes`` at ``sector``; raises BlkRequestError on a bad status."""
        done = self.wait_for(self.submit_read(sector, n_bytes, queue=queue)).check()
        assert done.data is not None
        return done.data

    def write(self, sector: int, data: bytes | bytearray | memoryview, *, queue: int = 0) -> None:
        """Write ``data`` at ``sector``; raises BlkRequestError on a bad status."""
        self.wait_for(self.submit_write(sector, data, queue=queue)).check()

    def flush(self, *, queue: int = 0) -> None:
        """FLUSH; raises BlkRequestError on a bad status."""
        self.wait_for(self.submit_flush(queue=queue)).check()

    def get_id(self, *, queue: int = 0) -> bytes:
        """GET_ID: the raw 20 bytes (NUL padded)."""
        done = self.wait_for(self.submit_get_id(queue=queue)).check()
        assert done.data is not None
        return done.data

    def serial(self, *, queue: int = 0) -> str:
        """GET_ID as text, NUL padding removed."""
        return self.get_id(queue=queue).split(b"\0", 1)[0].decode(errors="replace")

    def discard(self, sector: int, num_sectors: int, *, queue: int = 0) -> None:
        """DISCARD ``num_sectors`` at ``sector``."""
        token = self.submit_segments(RequestType.DISCARD, [(sector, num_sectors, 0)], queue=queue)
        self.wait_for(token).check()

    def write_zeroes(
        self, sector: int, num_sectors: int, *, unmap: bool = False, queue: int = 0
    ) -> None:
        """WRITE_ZEROES ``num_sectors`` at ``sector`` (``unmap``: may deallocate)."""
        flags = SEGMENT_F_UNMAP if unmap else 0
        token = self.submit_segments(
            RequestType.WRITE_ZEROES, [(sector, num_sectors, flags)], queue=queue
        )
        self.wait_for(token).check()
