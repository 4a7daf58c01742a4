"""The real-peer proof of the virtio core: DriverSession + BlkDriver (split ring driver side,
GuestMemory, Frontend) read and write a raw image through qemu-storage-daemon, and the image
file afterwards holds exactly what was written."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.qemu import QemuStorageDaemon
from pyvhost.driver.blk import SECTOR_SIZE, BlkCompletion, BlkDriver, BlkRequestError
from pyvhost.driver.session import DriverSession
from pyvhost.user.frontend import Frontend
from pyvhost.virtio import features as vf
from pyvhost.virtio.split import VRING_DESC_F_INDIRECT, split_layout

pytestmark = pytest.mark.qemu

IMAGE_SIZE = 64 << 20


class Shadow:
    """What the image must hold: every write the test makes, applied to a zero image."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def write(self, sector: int, data: bytes) -> None:
        off = sector * SECTOR_SIZE
        self.data[off : off + len(data)] = data

    def check(self, image: Path) -> None:
        on_disk = image.read_bytes()
        assert len(on_disk) == len(self.data)
        if on_disk != self.data:
            first = next(i for i in range(len(on_disk)) if on_disk[i] != self.data[i])
            pytest.fail(f"image differs from what was written, first at byte {first}")


def _data(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


@pytest.fixture
def shadow() -> Shadow:
    return Shadow(IMAGE_SIZE)


@pytest.fixture
def qsd2(peer_dir: Path, qsd_image: Path) -> Iterator[QemuStorageDaemon]:
    with QemuStorageDaemon(qsd_image, peer_dir / "qsd2.sock", num_queues=2) as daemon:
        yield daemon


def test_in_out_flush_get_id_through_qsd(
    qsd: QemuStorageDaemon, qsd_image: Path, shadow: Shadow
) -> None:
    rng = random.Random(1)
    assert qsd.socket is not None
    with DriverSession.connect(qsd.socket) as session:
        assert session.has_feature(vf.F_VERSION_1)
        blk = BlkDriver(session)
        assert blk.capacity == IMAGE_SIZE
        assert blk.config.blk_size >= SECTOR_SIZE
        ident = blk.get_id()
        assert len(ident) == 20 and ident.rstrip(b"\0")
        writes = [(0, 512), (1, 4096), (100, 65536), (IMAGE_SIZE // 512 - 8, 4096)]
        for sector, n in writes:
            data = _data(rng, n)
            blk.write(sector, data)
            shadow.write(sector, data)
        for sector, n in writes:
            off = sector * SECTOR_SIZE
            assert blk.read(sector, n) == bytes(shadow.data[off : off + n])
        assert blk.read(50, 4096) == bytes(4096)
        blk.flush()
    shadow.check(qsd_image)


def test_error_status_names_request_and_sector(qsd: QemuStorageDaemon) -> None:
    assert qsd.socket is not None
    with DriverSession.connect(qsd.socket) as session:
        blk = BlkDriver(session)
        past_end = IMAGE_SIZE // SECTOR_SIZE
        with pytest.raises(BlkRequestError, match=rf"IN sector {past_end} .*IOERR") as info:
            blk.read(past_end, 4096)
        assert info.value.request == "IN" and info.value.sector == past_end
        assert blk.read(0, 512) == bytes(512)  # the queue still works


def test_two_queues(
    qsd2: QemuStorageDaemon, qsd_image: Path, shadow: Shadow, no_fd_leak: None
) -> None:
    rng = random.Random(2)
    assert qsd2.socket is not None
    with DriverSession.connect(qsd2.socket, num_queues=2) as session:
        assert session.queue_num == 2
        blk = BlkDriver(session)
        assert blk.config.num_queues == 2
        for i in range(16):
            data = _data(rng, 4096)
            blk.write(i * 8, data, queue=i % 2)
            shadow.write(i * 8, data)
        for i in range(16):
            # read back on the other queue than the one that wrote
            off = i * 8 * SECTOR_SIZE
            assert blk.read(i * 8, 4096, queue=(i + 1) % 2) == bytes(shadow.data[off : off + 4096])
        blk.flush(queue=1)
    shadow.check(qsd_image)


def test_queue_depth_32(qsd2: QemuStorageDaemon, qsd_image: Path, shadow: Shadow) -> None:
    rng = random.Random(3)
    assert qsd2.socket is not None
    with DriverSession.connect(qsd2.socket, num_queues=2, queue_size=128) as session:
        blk = BlkDriver(session)
        expected: dict[int, bytes] = {}
        for rnd in range(3):
            tokens = []
            for i in range(64):
                sector = 1000 + i * 16 + rnd * 2048
                data = _data(rng, 8192)
                expected[sector] = data
                shadow.write(sector, data)
                tokens.append(blk.submit_write(sector, data, queue=i % 2, kick=False))
            blk.kick(0)
            blk.kick(1)
            assert blk.in_flight(0) == 32 and blk.in_flight(1) == 32
            done: list[BlkCompletion] = []
            while len(done) < 64:
                done += blk.reap(10)
            assert sorted(d.token for d in done) == sorted(tokens)
            assert all(d.ok for d in done)
        sectors = list(expected)
        for start in range(0, len(sectors), 64):
            batch = sectors[start : start + 64]
            reads = {blk.submit_read(s, 8192, queue=k % 2): s for k, s in enumerate(batch)}
            got: list[BlkCompletion] = []
            while len(got) < len(reads):
                got += blk.reap(10)
            for d in got:
                assert d.check().data == expected[reads[d.token]]
        blk.flush()
    shadow.check(qsd_image)


def test_indirect_descriptors(qsd: QemuStorageDaemon, qsd_image: Path, shadow: Shadow) -> None:
    rng = random.Random(4)
    assert qsd.socket is not None
    with DriverSession.connect(qsd.socket, indirect=True, queue_size=64) as session:
        if not session.indirect_negotiated:
            pytest.skip("qemu-storage-daemon does not offer VIRTIO_F_RING_INDIRECT_DESC")
        blk = BlkDriver(session)
        free = session.free_descriptors(0)
        data = _data(rng, 16384)
        token = blk.submit_write(64, data)
        # one ring descriptor for a three-buffer chain, and it points to an indirect table
        assert session.free_descriptors(0) == free - 1
        desc_gpa = split_layout(64, session.queues[0].base_gpa)[0]
        table = session.mem.read(desc_gpa, 16 * 64)
        flags = [int.from_bytes(table[i * 16 + 12 : i * 16 + 14], "little") for i in range(64)]
        assert any(f & VRING_DESC_F_INDIRECT for f in flags)
        blk.wait_for(token).check()
        shadow.write(64, data)
        # more chains in flight than the ring has descriptors for direct 3-buffer chains
        tokens = []
        for i in range(40):
            d = _data(rng, 4096)
            shadow.write(2048 + i * 8, d)
            tokens.append(blk.submit_write(2048 + i * 8, d, kick=False))
        blk.kick()
        done: list[BlkCompletion] = []
        while len(done) < 40:
            done += blk.reap(10)
        assert all(d.ok for d in done)
        assert blk.read(64, 16384) == data
        blk.flush()
    shadow.check(qsd_image)


def test_write_zeroes_and_discard(qsd: QemuStorageDaemon, qsd_image: Path, shadow: Shadow) -> None:
    assert qsd.socket is not None
    with DriverSession.connect(qsd.socket) as session:
        blk = BlkDriver(session)
        if not blk.has_feature(vf.BLK_F_WRITE_ZEROES):
            pytest.skip("qemu-storage-daemon does not offer WRITE_ZEROES")
        blk.write(200, b"\x77" * 8192)
        blk.write_zeroes(202, 4)
        shadow.write(200, b"\x77" * 1024 + bytes(2048) + b"\x77" * 5120)
        assert blk.read(200, 8192) == bytes(shadow.data[200 * 512 : 200 * 512 + 8192])
        if blk.has_feature(vf.BLK_F_DISCARD):
            blk.discard(4096, 8)  # content afterwards is unspecified; only the status matters
        blk.flush()
    shadow.check(qsd_image)


def test_packed_ring_against_qsd(qsd: QemuStorageDaemon) -> None:
    assert qsd.socket is not None
    with Frontend.connect(qsd.socket) as fe:
        offered = fe.get_features()
    if not offered >> vf.F_RING_PACKED & 1:
        pytest.skip(
            f"qemu-storage-daemon does not offer VIRTIO_F_RING_PACKED (features {offered:#x}): "
            "its libvhost-user back-end implements split rings only"
        )
    with DriverSession.connect(qsd.socket, packed=True) as session:  # pragma: no cover
        blk = BlkDriver(session)
        blk.write(8, b"\x11" * 4096)
        assert blk.read(8, 4096) == b"\x11" * 4096


def test_reconnect_resubmits_in_flight_requests(
    peer_dir: Path, qsd_image: Path, shadow: Shadow
) -> None:
    """qsd has no inflight tracking: the driver re-creates its rings and resubmits itself."""
    sock = peer_dir / "r.sock"
    rng = random.Random(5)
    qsd = QemuStorageDaemon(qsd_image, sock).start()
    try:
        with DriverSession.connect(sock, reconnect=20) as session:
            blk = BlkDriver(session)
            assert not session.inflight_mode
            blk.write(0, b"\x01" * 4096)
            shadow.write(0, b"\x01" * 4096)
            tokens = []
            for i in range(32):
                data = _data(rng, 4096)
                shadow.write(8 + i * 8, data)
                tokens.append(blk.submit_write(8 + i * 8, data, kick=False))
            assert qsd.proc is not None
            os.killpg(qsd.proc.pid, signal.SIGKILL)
            qsd.stop()
            sock.unlink(missing_ok=True)
            qsd = QemuStorageDaemon(qsd_image, sock).start()
            blk.kick()
            done: list[BlkCompletion] = []
            while len(done) < 32:
                done += blk.reap(10)
            assert sorted(d.token for d in done) == tokens
            assert all(d.ok for d in done)
            assert session.reconnects == 1
            assert session.in_flight_at_loss == 32
            # the driver added them again (more than once if a set-up attempt was cut short)
            assert session.resubmitted >= 32
            for i in range(32):
                off = (8 + i * 8) * 512
                assert blk.read(8 + i * 8, 4096) == bytes(shadow.data[off : off + 4096])
            blk.flush()
    finally:
        qsd.stop()
    shadow.check(qsd_image)


def test_no_reconnect_raises(peer_dir: Path, qsd_image: Path) -> None:
    from pyvhost.errors import ConnectionClosedError

    sock = peer_dir / "n.sock"
    with QemuStorageDaemon(qsd_image, sock) as qsd:
        session = DriverSession.connect(sock)
        try:
            blk = BlkDriver(session)
            token = blk.submit_write(0, bytes(512), kick=False)
            qsd.stop()
            with pytest.raises(ConnectionClosedError, match="went away"):
                while True:
                    blk.reap(5)
            assert token
        finally:
            session.close()
