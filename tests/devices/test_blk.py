"""virtio-blk request processing, driven in-process through the driver side of a real ring."""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvhost.daemon.adapter import DeviceAdapter
from pyvhost.devices.blk import (
    CONFIG_SIZE,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlkBackend,
    BlkDevice,
    BlkLimits,
    default_serial,
)
from pyvhost.devices.blk import request as blk
from pyvhost.errors import ProtocolError
from pyvhost.virtio import features as vf
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.packed import PackedDriver, PackedQueue, packed_layout
from pyvhost.virtio.split import SplitDriver, SplitQueue, split_layout

MiB = 1 << 20
SECTOR = 512
DISK_SECTORS = 256
DATA_BASE = 0x40000
HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")
SENTINEL = 0xA5


def pattern(n: int, seed: int = 1) -> bytes:
    """Deterministic, position-dependent bytes (so misplaced sectors show)."""
    return bytes((i * 7 + seed * 13 + (i >> 9)) & 0xFF for i in range(n))


@dataclass
class Reply:
    """What came back for one request: used length and the writable buffers' final contents."""

    used: int
    writable: list[bytes]

    @property
    def status(self) -> int:
        return self.writable[-1][-1]

    @property
    def data(self) -> bytes:
        return b"".join(self.writable)[:-1]


class BlkRig:
    """A guest memory with one ring (split or packed), its driver, and a BlkBackend to serve it."""

    def __init__(
        self,
        backend: BlkBackend,
        *,
        qsize: int = 256,
        packed: bool = False,
        handle: Callable[[DescriptorChain, int], int] | None = None,
    ) -> None:
        self.backend = backend
        self.handle = backend.handle if handle is None else handle
        self.mem = GuestMemory.anonymous(8 * MiB)
        self.qsize = qsize
        self.drv: SplitDriver | PackedDriver
        self.queue: SplitQueue | PackedQueue
        if packed:
            layout = packed_layout(qsize, 0)
            self.drv = PackedDriver(self.mem, qsize, *layout[:3])
            self.queue = PackedQueue(self.mem, qsize, *layout[:3])
        else:
            desc, avail, used, _ = split_layout(qsize, 0)
            self.drv = SplitDriver(self.mem, qsize, desc, avail, used)
            self.queue = SplitQueue(self.mem, qsize, desc, avail, used)
        self._next = DATA_BASE

    def close(self) -> None:
        self.drv.close()
        self.queue.close()
        gc.collect()
        self.mem.close()

    def alloc(self, n: int) -> int:
        gpa = self._next
        self._next = (gpa + max(n, 1) + 15) // 16 * 16
        assert self._next < 8 * MiB, "rig memory exhausted"
        return gpa

    def submit(
        self,
        readable: Sequence[bytes],
        writable: Sequence[int],
        *,
        indirect: bool = False,
        queue: int = 0,
    ) -> Reply:
        """Place one chain, let the backend process it, collect it; check the used element."""
        self._next = DATA_BASE
        rd = []
        for piece in readable:
            gpa = self.alloc(len(piece))
            self.mem.write(gpa, piece)
            rd.append((gpa, len(piece)))
        wr = []
        for n in writable:
            gpa = self.alloc(n)
            self.mem.write(gpa, bytes([SENTINEL]) * n)
            wr.append((gpa, n))
        table = self.alloc(16 * (len(rd) + len(wr))) if indirect else None
        head = self.drv.add(rd, wr, indirect_gpa=table)
        self.drv.publish()
        chain = self.queue.pop()
        assert chain is not None
        assert self.queue.pop() is None
        written = self.handle(chain, queue)
        self.queue.push(chain.head, written)
        used = self.drv.get_used()
        assert used == [(head, written)]
        return Reply(written, [self.mem.read(gpa, n) for gpa, n in wr])

    # -- request helpers ------------------------------------------------------------------------

    def request(
        self,
        rtype: int,
        sector: int = 0,
        payload: bytes = b"",
        *,
        out_split: Sequence[int] = (),
        in_split: Sequence[int] = (),
        status_alone: bool = True,
        indirect: bool = False,
    ) -> Reply:
        """One request: header, ``payload`` cut at ``out_split``, writable parts ``in_split``."""
        readable = [HEADER.pack(rtype, 0, sector), *_cut(payload, out_split)]
        readable = [r for r in readable if r]
        writable = list(in_split)
        if status_alone or not writable:
            writable.append(1)
        else:
            writable[-1] += 1
        return self.submit(readable, writable, indirect=indirect)

    def read(self, sector: int, n: int, *, segs: Sequence[int] = (), **kw: object) -> Reply:
        in_split = list(segs) if segs else [n]
        assert sum(in_split) == n
        return self.request(VIRTIO_BLK_T_IN, sector, in_split=in_split, **kw)  # type: ignore[arg-type]

    def write(self, sector: int, data: bytes, *, cuts: Sequence[int] = (), **kw: object) -> Reply:
        return self.request(VIRTIO_BLK_T_OUT, sector, data, out_split=cuts, **kw)  # type: ignore[arg-type]

    def segments(self, rtype: int, *segs: tuple[int, int, int], indirect: bool = False) -> Reply:
        payload = b"".join(SEGMENT.pack(*s) for s in segs)
        return self.request(rtype, 0, payload, indirect=indirect)


def _cut(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut into pieces of the given sizes (the rest as the last piece)."""
    out = []
    pos = 0
    for n in cuts:
        out.append(data[pos : pos + n])
        pos += n
    if pos < len(data) or not out:
        out.append(data[pos:])
    return out


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(DISK_SECTORS * SECTOR, seed=3))
    return path


@pytest.fixture
def backend(image: Path, no_fd_leak: None) -> Iterator[BlkBackend]:
    with BlkBackend.open(image, serial="pyvhost-test") as b:
        yield b


@pytest.fixture(params=["split", "packed"])
def rig(request: pytest.FixtureRequest, backend: BlkBackend) -> Iterator[BlkRig]:
    r = BlkRig(backend, packed=request.param == "packed")
    yield r
    r.close()


@pytest.fixture
def split_rig(backend: BlkBackend) -> Iterator[BlkRig]:
    r = BlkRig(backend)
    yield r
    r.close()


def disk(image: Path, sector: int, n: int) -> bytes:
    with image.open("rb") as f:
        f.seek(sector * SECTOR)
        return f.read(n)


# -- IN / OUT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
def test_write_then_read_back(rig: BlkRig, image: Path, indirect: bool) -> None:
    data = pattern(8 * SECTOR, seed=9)
    reply = rig.write(10, data, indirect=indirect)
    assert reply.status == VIRTIO_BLK_S_OK
    assert reply.used == 1
    assert disk(image, 10, len(data)) == data
    assert disk(image, 9, SECTOR) == pattern(DISK_SECTORS * SECTOR, 3)[9 * SECTOR : 10 * SECTOR]
    back = rig.read(10, len(data), indirect=indirect)
    assert back.status == VIRTIO_BLK_S_OK
    assert back.data == data
    assert back.used == len(data) + 1


@pytest.mark.parametrize("indirect", [False, True])
def test_many_segments_in_odd_sizes(rig: BlkRig, image: Path, indirect: bool) -> None:
    """Data cut in pieces that do not follow sector boundaries, header split too."""
    data = pattern(6 * SECTOR, seed=5)
    cuts = [1, 100, 411, 1024, 3, 509, 7]
    header = HEADER.pack(VIRTIO_BLK_T_OUT, 0, 33)
    readable = [header[:5], header[5:], *_cut(data, cuts)]
    reply = rig.submit(readable, [1], indirect=indirect)
    assert reply.status == VIRTIO_BLK_S_OK
    assert disk(image, 33, len(data)) == data
    segs = [SECTOR - 1, 2, 1000, 3 * SECTOR, 23]
    assert sum(segs) == len(data)
    back = rig.read(33, len(data), segs=segs, indirect=indirect)
    assert back.status == VIRTIO_BLK_S_OK
    assert back.data == data
    assert [len(w) for w in back.writable] == [*segs, 1]


def test_status_sharing_the_last_data_buffer(rig: BlkRig, image: Path) -> None:
    reply = rig.read(4, 2 * SECTOR, segs=[SECTOR, SECTOR], status_alone=False)
    assert [len(w) for w in reply.writable] == [SECTOR, SECTOR + 1]
    assert reply.status == VIRTIO_BLK_S_OK
    assert reply.data == disk(image, 4, 2 * SECTOR)
    assert reply.used == 2 * SECTOR + 1


def test_more_buffers_than_iov_max(
    backend: BlkBackend, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """preadv / pwritev are called in IOV_MAX batches (lowered here to make several)."""
    monkeypatch.setattr(blk, "_IOV_MAX", 7)
    r = BlkRig(backend)
    try:
        data = pattern(40 * SECTOR, seed=11)
        cuts = [SECTOR // 2] * 79
        assert r.write(100, data, cuts=cuts, indirect=True).status == VIRTIO_BLK_S_OK
        assert disk(image, 100, len(data)) == data
        back = r.read(100, len(data), segs=[SECTOR // 4] * 160, indirect=True)
        assert back.status == VIRTIO_BLK_S_OK
        assert back.data == data
    finally:
        r.close()


def test_zero_length_read_and_write_are_ok(rig: BlkRig) -> None:
    assert rig.read(0, 0, segs=[]).status == VIRTIO_BLK_S_OK
    assert rig.write(DISK_SECTORS, b"").status == VIRTIO_BLK_S_OK


def test_last_sector_is_reachable(rig: BlkRig, image: Path) -> None:
    data = pattern(SECTOR, seed=2)
    assert rig.write(DISK_SECTORS - 1, data).status == VIRTIO_BLK_S_OK
    assert disk(image, DISK_SECTORS - 1, SECTOR) == data
    assert image.stat().st_size == DISK_SECTORS * SECTOR


def test_replayed_requests_are_harmless(split_rig: BlkRig, image: Path) -> None:
    """A chain handled twice (inflight resubmission) leaves what one execution leaves."""
    data = pattern(2 * SECTOR, seed=21)
    for _ in range(2):
        assert split_rig.write(50, data).status == VIRTIO_BLK_S_OK
    assert disk(image, 50, len(data)) == data
    first = split_rig.read(50, len(data))
    second = split_rig.read(50, len(data))
    assert first == second
    assert first.data == data


# -- FLUSH / GET_ID -----------------------------------------------------------------------------


def test_flush(rig: BlkRig) -> None:
    reply = rig.request(VIRTIO_BLK_T_FLUSH)
    assert (reply.status, reply.used) == (VIRTIO_BLK_S_OK, 1)


def test_get_id(rig: BlkRig) -> None:
    reply = rig.request(VIRTIO_BLK_T_GET_ID, in_split=[20])
    assert reply.status == VIRTIO_BLK_S_OK
    assert reply.data == b"pyvhost-test".ljust(20, b"\0")
    assert reply.used == 21


def test_get_id_short_buffer_gets_what_fits(rig: BlkRig) -> None:
    reply = rig.request(VIRTIO_BLK_T_GET_ID, in_split=[4])
    assert (reply.status, reply.data) == (VIRTIO_BLK_S_OK, b"pyvh")


def test_default_serial_comes_from_the_path(image: Path, tmp_path: Path) -> None:
    serial = default_serial(image)
    assert len(serial) <= 20
    assert serial.startswith(b"disk.img")
    other = tmp_path / "sub"
    other.mkdir()
    (other / "disk.img").write_bytes(b"")
    assert default_serial(other / "disk.img") != serial
    assert default_serial(image) == serial
    with BlkBackend.open(image) as b:
        assert b.serial == serial


def test_serial_longer_than_20_bytes_is_refused(image: Path) -> None:
    with pytest.raises(ValueError, match="at most 20"):
        BlkBackend.open(image, serial="x" * 21)


# -- DISCARD / WRITE_ZEROES ---------------------------------------------------------------------


def test_discard_zeroes_the_ranges_in_a_file(rig: BlkRig, image: Path) -> None:
    before = image.read_bytes()
    reply = rig.segments(VIRTIO_BLK_T_DISCARD, (8, 4, 0), (100, 16, 0))
    assert (reply.status, reply.used) == (VIRTIO_BLK_S_OK, 1)
    after = image.read_bytes()
    expect = bytearray(before)
    expect[8 * SECTOR : 12 * SECTOR] = bytes(4 * SECTOR)
    expect[100 * SECTOR : 116 * SECTOR] = bytes(16 * SECTOR)
    assert after == bytes(expect)


@pytest.mark.parametrize("unmap", [0, 1])
def test_write_zeroes(rig: BlkRig, image: Path, unmap: int) -> None:
    before = image.read_bytes()
    reply = rig.segments(VIRTIO_BLK_T_WRITE_ZEROES, (3, 5, unmap), indirect=True)
    assert reply.status == VIRTIO_BLK_S_OK
    expect = bytearray(before)
    expect[3 * SECTOR : 8 * SECTOR] = bytes(5 * SECTOR)
    assert image.read_bytes() == bytes(expect)


def test_discard_punches_a_hole(tmp_path: Path) -> None:
    """On a file system with holes, DISCARD deallocates (st_blocks drops)."""
    path = tmp_path / "big.img"
    path.write_bytes(pattern(4 * MiB))
    os.sync()
    with BlkBackend.open(path) as b:
        r = BlkRig(b)
        try:
            blocks = path.stat().st_blocks
            reply = r.segments(VIRTIO_BLK_T_DISCARD, (0, 2 * MiB // SECTOR, 0))
            assert reply.status == VIRTIO_BLK_S_OK
        finally:
            r.close()
    if blk._fallocate is None:
        pytest.skip("no fallocate in libc")
    after = path.stat().st_blocks
    if after == blocks:
        pytest.skip("this file system does not punch holes")
    assert after < blocks
    assert path.stat().st_size == 4 * MiB
    assert path.read_bytes()[: 2 * MiB] == bytes(2 * MiB)


@pytest.mark.parametrize("errno_value", [95, 38])  # EOPNOTSUPP, ENOSYS
def test_zeroing_falls_back_to_writing_zeros(
    rig: BlkRig, image: Path, monkeypatch: pytest.MonkeyPatch, errno_value: int
) -> None:
    calls: list[int] = []

    def no_fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append(mode)
        raise OSError(errno_value, os.strerror(errno_value))

    monkeypatch.setattr(blk, "fallocate", no_fallocate)
    before = image.read_bytes()
    assert rig.segments(VIRTIO_BLK_T_DISCARD, (0, 2, 0)).status == VIRTIO_BLK_S_OK
    assert rig.segments(VIRTIO_BLK_T_WRITE_ZEROES, (10, 3, 1)).status == VIRTIO_BLK_S_OK
    assert rig.segments(VIRTIO_BLK_T_WRITE_ZEROES, (20, 1, 0)).status == VIRTIO_BLK_S_OK
    expect = bytearray(before)
    for start, n in ((0, 2), (10, 3), (20, 1)):
        expect[start * SECTOR : (start + n) * SECTOR] = bytes(n * SECTOR)
    assert image.read_bytes() == bytes(expect)
    assert calls  # it tried fallocate first


def test_zeroing_real_errors_are_ioerr(
    rig: BlkRig, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int, mode: int, offset: int, length: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(blk, "fallocate", failing)
    before = image.read_bytes()
    assert rig.segments(VIRTIO_BLK_T_WRITE_ZEROES, (0, 1, 1)).status == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before


@pytest.mark.parametrize(
    ("rtype", "segs", "status"),
    [
        (VIRTIO_BLK_T_DISCARD, [(0, 1, 1)], VIRTIO_BLK_S_UNSUPP),  # unmap flag on a discard
        (VIRTIO_BLK_T_DISCARD, [(0, 1, 4)], VIRTIO_BLK_S_UNSUPP),
        (VIRTIO_BLK_T_WRITE_ZEROES, [(0, 1, 2)], VIRTIO_BLK_S_UNSUPP),
        (VIRTIO_BLK_T_DISCARD, [(0, 1, 0)] * 5, VIRTIO_BLK_S_UNSUPP),  # > max_discard_seg
        (VIRTIO_BLK_T_WRITE_ZEROES, [(0, 1, 0)] * 4, VIRTIO_BLK_S_UNSUPP),
        (VIRTIO_BLK_T_DISCARD, [(0, 65, 0)], VIRTIO_BLK_S_IOERR),  # > max_discard_sectors
        (VIRTIO_BLK_T_WRITE_ZEROES, [(0, 33, 0)], VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_DISCARD, [(0, 1, 0), (DISK_SECTORS - 1, 2, 0)], VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_WRITE_ZEROES, [(2**63, 1, 0)], VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_DISCARD, [], VIRTIO_BLK_S_IOERR),  # no segment
    ],
)
def test_discard_and_write_zeroes_limits(
    image: Path, rtype: int, segs: list[tuple[int, int, int]], status: int
) -> None:
    limits = BlkLimits(
        max_discard_sectors=64,
        max_discard_seg=4,
        max_write_zeroes_sectors=32,
        max_write_zeroes_seg=3,
    )
    before = image.read_bytes()
    with BlkBackend.open(image, limits=limits) as b:
        r = BlkRig(b)
        try:
            assert r.segments(rtype, *segs).status == status
        finally:
            r.close()
    assert image.read_bytes() == before  # a refused request touches nothing, not even segment 1


def test_segment_payload_not_a_multiple_of_16_is_ioerr(split_rig: BlkRig, image: Path) -> None:
    before = image.read_bytes()
    payload = SEGMENT.pack(0, 1, 0) + b"\0" * 8
    reply = split_rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, payload)
    assert reply.status == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before


# -- read-only ----------------------------------------------------------------------------------


def test_read_only(image: Path) -> None:
    before = image.read_bytes()
    with BlkBackend.open(image, readonly=True) as b:
        assert fcntl.fcntl(b.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        feats = b.features()
        assert feats >> vf.BLK_F_RO & 1
        assert not feats >> vf.BLK_F_DISCARD & 1
        assert not feats >> vf.BLK_F_WRITE_ZEROES & 1
        r = BlkRig(b)
        try:
            assert r.write(0, pattern(SECTOR)).status == VIRTIO_BLK_S_IOERR
            assert r.segments(VIRTIO_BLK_T_DISCARD, (0, 1, 0)).status == VIRTIO_BLK_S_IOERR
            assert r.segments(VIRTIO_BLK_T_WRITE_ZEROES, (0, 1, 1)).status == VIRTIO_BLK_S_IOERR
            assert r.request(VIRTIO_BLK_T_FLUSH).status == VIRTIO_BLK_S_OK
            back = r.read(0, 2 * SECTOR)
            assert (back.status, back.data) == (VIRTIO_BLK_S_OK, before[: 2 * SECTOR])
        finally:
            r.close()
    assert image.read_bytes() == before


def test_read_write_features(backend: BlkBackend) -> None:
    feats = backend.features(1)
    for bit in (
        vf.BLK_F_SEG_MAX,
        vf.BLK_F_SIZE_MAX,
        vf.BLK_F_BLK_SIZE,
        vf.BLK_F_FLUSH,
        vf.BLK_F_DISCARD,
        vf.BLK_F_WRITE_ZEROES,
    ):
        assert feats >> bit & 1, vf.feature_names(1 << bit, "blk")
    assert not feats >> vf.BLK_F_RO & 1
    assert not feats >> vf.BLK_F_MQ & 1
    assert backend.features(2) >> vf.BLK_F_MQ & 1


# -- malformed requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("readable", "writable", "status"),
    [
        pytest.param([], [1], VIRTIO_BLK_S_IOERR, id="no-header"),
        pytest.param(
            [HEADER.pack(0, 0, 0)[:8]], [SECTOR, 1], VIRTIO_BLK_S_IOERR, id="short-header"
        ),
        pytest.param([HEADER.pack(0, 0, 0)[:15]], [1], VIRTIO_BLK_S_IOERR, id="header-15-bytes"),
        pytest.param([HEADER.pack(99, 0, 0)], [1], VIRTIO_BLK_S_UNSUPP, id="unknown-type"),
        pytest.param([HEADER.pack(2, 0, 0)], [1], VIRTIO_BLK_S_UNSUPP, id="legacy-scsi"),
        pytest.param(
            [HEADER.pack(0, 0, DISK_SECTORS)], [SECTOR, 1], VIRTIO_BLK_S_IOERR, id="in-past-end"
        ),
        pytest.param(
            [HEADER.pack(0, 0, DISK_SECTORS - 1)],
            [2 * SECTOR, 1],
            VIRTIO_BLK_S_IOERR,
            id="in-straddles-end",
        ),
        pytest.param([HEADER.pack(0, 0, 2**64 - 1)], [SECTOR, 1], VIRTIO_BLK_S_IOERR, id="in-huge"),
        pytest.param([HEADER.pack(0, 0, 0)], [100, 1], VIRTIO_BLK_S_IOERR, id="in-not-512"),
        pytest.param(
            [HEADER.pack(0, 0, 0), b"x" * SECTOR],
            [SECTOR, 1],
            VIRTIO_BLK_S_IOERR,
            id="in-with-readable-data",
        ),
        pytest.param(
            [HEADER.pack(1, 0, DISK_SECTORS), b"x" * SECTOR],
            [1],
            VIRTIO_BLK_S_IOERR,
            id="out-past-end",
        ),
        pytest.param([HEADER.pack(1, 0, 0), b"x" * 513], [1], VIRTIO_BLK_S_IOERR, id="out-not-512"),
        pytest.param(
            [HEADER.pack(1, 0, 0), b"x" * SECTOR],
            [SECTOR, 1],
            VIRTIO_BLK_S_IOERR,
            id="out-with-writable-data",
        ),
        pytest.param(
            [HEADER.pack(11, 0, 0), SEGMENT.pack(0, 1, 0)],
            [8, 1],
            VIRTIO_BLK_S_IOERR,
            id="discard-with-writable-data",
        ),
    ],
)
def test_malformed_requests(
    rig: BlkRig,
    image: Path,
    caplog: pytest.LogCaptureFixture,
    *,
    readable: list[bytes],
    writable: list[int],
    status: int,
) -> None:
    before = image.read_bytes()
    with caplog.at_level(logging.WARNING, logger="pyvhost.devices.blk"):
        reply = rig.submit(readable, writable, queue=3)
    assert reply.status == status
    assert reply.used == sum(writable)
    assert image.read_bytes() == before
    assert any("queue 3" in rec.getMessage() for rec in caplog.records)


def test_no_status_byte_completes_with_zero(
    rig: BlkRig, image: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = image.read_bytes()
    with caplog.at_level(logging.WARNING, logger="pyvhost.devices.blk"):
        reply = rig.submit([HEADER.pack(VIRTIO_BLK_T_OUT, 0, 0), b"y" * SECTOR], [])
    assert reply.used == 0
    assert image.read_bytes() == before
    assert any("no writable byte" in rec.getMessage() for rec in caplog.records)


def test_short_read_at_eof_is_ioerr(tmp_path: Path) -> None:
    """The image shrank under the device: a read past the file's end fails instead of lying."""
    path = tmp_path / "small.img"
    path.write_bytes(pattern(4 * SECTOR))
    fd = os.open(path, os.O_RDWR)
    with BlkBackend(fd, 8 * SECTOR) as b:
        r = BlkRig(b)
        try:
            assert r.read(2, 2 * SECTOR).status == VIRTIO_BLK_S_OK
            assert r.read(3, 2 * SECTOR).status == VIRTIO_BLK_S_IOERR
        finally:
            r.close()


def test_host_io_error_is_ioerr(tmp_path: Path) -> None:
    path = tmp_path / "wo.img"
    path.write_bytes(bytes(4 * SECTOR))
    fd = os.open(path, os.O_WRONLY)  # preadv fails with EBADF
    with BlkBackend(fd, 4 * SECTOR) as b:
        r = BlkRig(b)
        try:
            assert r.read(0, SECTOR).status == VIRTIO_BLK_S_IOERR
            assert r.write(0, pattern(SECTOR)).status == VIRTIO_BLK_S_OK
        finally:
            r.close()


def test_warnings_are_rate_limited(split_rig: BlkRig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pyvhost.devices.blk"):
        for _ in range(50):
            split_rig.submit([HEADER.pack(77, 0, 0)], [1])
    assert 1 <= len(caplog.records) <= 11


# -- config space -------------------------------------------------------------------------------


def test_config_fields_at_their_offsets(image: Path) -> None:
    limits = BlkLimits(
        seg_max=126,
        size_max=65536,
        max_discard_sectors=1000,
        max_discard_seg=7,
        discard_sector_alignment=8,
        max_write_zeroes_sectors=2000,
        max_write_zeroes_seg=9,
    )
    with BlkBackend.open(image, limits=limits) as b:
        dev = BlkDevice(b, num_queues=3, queue_size=128)
        cfg = dev.config_bytes()
        assert len(cfg) == CONFIG_SIZE == 96

        def u(fmt: str, off: int) -> int:
            return int(struct.unpack_from("<" + fmt, cfg, off)[0])

        assert u("Q", 0) == DISK_SECTORS
        assert u("I", 8) == 65536
        assert u("I", 12) == 126
        assert cfg[16:20] == bytes(4)  # geometry not offered
        assert u("I", 20) == 512
        assert cfg[24:32] == bytes(8)  # topology not offered
        assert cfg[32] == 1  # writeback (FLUSH offered)
        assert u("H", 34) == 3
        assert u("I", 36) == 1000
        assert u("I", 40) == 7
        assert u("I", 44) == 8
        assert u("I", 48) == 2000
        assert u("I", 52) == 9
        assert cfg[56] == 1
        assert cfg[57:] == bytes(96 - 57)
        # GET_CONFIG slices: what QEMU 7.2 asks (60 bytes), single fields, the whole struct
        with DeviceAdapter(dev) as served:
            assert served.get_config(0, 60) == cfg[:60]
            assert served.get_config(36, 4) == struct.pack("<I", 1000)
            assert served.get_config(0, 96) == cfg
            with pytest.raises(ProtocolError, match="beyond"):
                served.get_config(90, 8)
            with pytest.raises(ProtocolError, match="beyond"):
                served.get_config(0, 97)


def test_capacity_ignores_a_trailing_partial_sector(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(3 * SECTOR + 100))
    with BlkBackend.open(path) as b:
        assert b.capacity == 3 * SECTOR
        assert struct.unpack_from("<Q", b.config())[0] == 3


# -- device ---------------------------------------------------------------------------------------


def test_from_args(image: Path) -> None:
    dev = BlkDevice.from_args(image, readonly=False, queues=2, serial="abc", queue_size=64)
    try:
        assert dev.num_queues == 2
        assert dev.queue_size == 64
        assert dev.uses_inflight
        assert dev.features >> vf.BLK_F_MQ & 1
        for bit in (vf.F_VERSION_1, vf.F_RING_INDIRECT_DESC, vf.F_RING_EVENT_IDX, vf.F_RING_PACKED):
            assert dev.features >> bit & 1, bit
        assert dev.features >> vf.BLK_F_DISCARD & 1
        assert dev.backend.serial == b"abc"
        # seg_max does not follow the ring size: the guest reads it before any ring exists
        assert struct.unpack_from("<I", dev.config_bytes(), 12)[0] == 126
        assert struct.unpack_from("<H", dev.config_bytes(), 34)[0] == 2
    finally:
        dev.close()
    ro = BlkDevice.from_args(image, readonly=True, queues=1, serial=None, queue_size=256)
    try:
        assert ro.features >> vf.BLK_F_RO & 1
        assert not ro.features >> vf.BLK_F_MQ & 1
    finally:
        ro.close()


def test_from_args_errors(tmp_path: Path, image: Path) -> None:
    with pytest.raises(FileNotFoundError):
        BlkDevice.from_args(tmp_path / "missing.img", False, 1, None, 256)
    with pytest.raises(IsADirectoryError):
        BlkDevice.from_args(tmp_path, False, 1, None, 256)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="regular file or a block device"):
        BlkDevice.from_args(fifo, False, 1, None, 256)
    with pytest.raises(ValueError, match="power of 2"):
        BlkDevice.from_args(image, False, 1, None, 100)
    with pytest.raises(ValueError, match="num_queues"):
        BlkDevice.from_args(image, False, 0, None, 256)


def test_handle_chain_goes_to_the_backend(image: Path) -> None:
    dev = BlkDevice.from_args(image, False, 2, "dev-serial", 256)
    try:
        r = BlkRig(dev.backend)
        r.handle = lambda chain, q: dev.handle_chain(q, chain, r.mem)
        try:
            reply = r.request(VIRTIO_BLK_T_GET_ID, in_split=[20])
            assert reply.data.rstrip(b"\0") == b"dev-serial"
        finally:
            r.close()
    finally:
        dev.close()


def test_released_guest_views_do_not_raise(backend: BlkBackend) -> None:
    """Memory taken away under a request: logged, completed with 0, nothing raised."""
    buf = bytearray(HEADER.pack(VIRTIO_BLK_T_IN, 0, 0)) + bytearray(SECTOR + 1)
    view = memoryview(buf)
    status = view[16 + SECTOR :]
    chain = DescriptorChain(0, [view[:16]], [view[16 : 16 + SECTOR], status], 16, SECTOR + 1)
    status.release()
    assert backend.handle(chain, 0) == 0
