"""Frontend against a real back-end: qemu-storage-daemon exporting a raw image as vhost-user-blk.

Negotiation, config space, memory via ADD_MEM_REG, GET_INFLIGHT_FD, a started vring that really
reads and writes the image through a split ring we drive, GET_VRING_BASE, a clean hang-up, and
a second connection afterwards.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.qemu import QemuStorageDaemon, make_raw_image, require, short_tmp
from pyvhost.errors import UnsupportedRequestError
from pyvhost.user.frontend import Frontend
from pyvhost.user.messages import F_PROTOCOL_FEATURES, MemoryRegion, ProtocolFeature, VringAddr
from pyvhost.virtio import features as vf
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.split import SplitDriver, split_layout

pytestmark = pytest.mark.qemu

PF = ProtocolFeature
IMAGE_SIZE = 8 << 20
NUM_QUEUES = 2
QSIZE = 128
RING_GPA = 0x1000
HDR_GPA, DATA_GPA, STATUS_GPA = 0x10000, 0x11000, 0x12000
SECTOR0 = bytes(range(256)) * 2
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT = 0, 1


@pytest.fixture
def qsd() -> Iterator[QemuStorageDaemon]:
    require("qemu-storage-daemon")
    require("timeout")
    with short_tmp("pvh-fe-") as tmp:
        image = make_raw_image(tmp / "disk.raw", IMAGE_SIZE)
        with open(image, "r+b") as f:
            f.write(SECTOR0)
        daemon = QemuStorageDaemon(image, tmp / "vhost.sock", num_queues=NUM_QUEUES, timeout_s=90)
        with daemon:
            yield daemon


def _sock(daemon: QemuStorageDaemon) -> Path:
    assert daemon.socket is not None
    return daemon.socket


def test_negotiate_and_config(qsd: QemuStorageDaemon) -> None:
    with Frontend.connect(_sock(qsd)) as fe:
        result = fe.negotiate()
        for bit in (
            vf.F_VERSION_1,
            F_PROTOCOL_FEATURES,
            vf.BLK_F_SEG_MAX,
            vf.BLK_F_BLK_SIZE,
            vf.BLK_F_FLUSH,
            vf.BLK_F_MQ,
        ):
            assert result.offered_features >> bit & 1, f"feature bit {bit} missing"
        for feature in (PF.MQ, PF.REPLY_ACK, PF.CONFIG, PF.CONFIGURE_MEM_SLOTS, PF.BACKEND_REQ):
            assert fe.has_protocol_feature(feature), feature.name
        assert result.queue_num == NUM_QUEUES
        assert result.max_mem_slots is not None and result.max_mem_slots >= 8
        assert result.backend_handler is not None and result.backend_handler.running

        config = fe.get_config(0, 60)
        capacity, seg_max = struct.unpack_from("<QxxxxI", config)
        assert capacity == IMAGE_SIZE // 512
        assert seg_max > 0
        assert struct.unpack_from("<I", config, 20)[0] == 512  # blk_size
        assert struct.unpack_from("<H", config, 34)[0] == NUM_QUEUES  # num_queues
        assert fe.get_config(0, 8) == config[:8]
    assert qsd.returncode is None


def _wait_used(driver: SplitDriver, call_fd: int, timeout: float = 10.0) -> list[tuple[int, int]]:
    """Wait for used elements; libvhost-user also signals the call fd once when it is set."""
    deadline = time.monotonic() + timeout
    while not (used := driver.get_used()):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([call_fd], [], [], max(0.0, remaining))
        assert ready, f"no used-buffer notification within {timeout} s"
        os.eventfd_read(call_fd)
    return used


def _blk_request(
    driver: SplitDriver, mem: GuestMemory, fds: tuple[int, int], kind: int, sector: int
) -> int:
    kick, call = fds
    mem.write(HDR_GPA, struct.pack("<IIQ", kind, 0, sector))
    mem.write(STATUS_GPA, b"\xff")
    if kind == VIRTIO_BLK_T_IN:
        driver.add([(HDR_GPA, 16)], [(DATA_GPA, 512), (STATUS_GPA, 1)])
    else:
        driver.add([(HDR_GPA, 16), (DATA_GPA, 512)], [(STATUS_GPA, 1)])
    driver.publish()
    os.eventfd_write(kick, 1)
    used = _wait_used(driver, call)
    assert len(used) == 1
    assert mem.read(STATUS_GPA, 1) == b"\0", "virtio-blk status is not OK"
    return used[0][1]


def test_memory_vring_and_io(qsd: QemuStorageDaemon) -> None:
    mem = GuestMemory.anonymous(1 << 20)
    region = mem.regions[0]
    assert region.fd is not None
    kick, call = os.eventfd(0), os.eventfd(0)
    driver: SplitDriver | None = None
    try:
        with Frontend.connect(_sock(qsd)) as fe:
            fe.negotiate()
            fe.set_features(1 << vf.F_VERSION_1 | 1 << F_PROTOCOL_FEATURES)

            with pytest.raises(UnsupportedRequestError, match="INFLIGHT_SHMFD"):
                fe.get_inflight_fd(NUM_QUEUES, QSIZE)  # qemu-storage-daemon does not offer it
            fe.check_features = False  # libvhost-user answers it all the same
            inflight, inflight_fd = fe.get_inflight_fd(NUM_QUEUES, QSIZE)
            fe.check_features = True
            assert inflight.mmap_size > 0 and inflight_fd is not None
            assert (inflight.num_queues, inflight.queue_size) == (NUM_QUEUES, QSIZE)
            assert os.fstat(inflight_fd).st_size >= inflight.mmap_offset + inflight.mmap_size
            os.close(inflight_fd)

            fe.setup_memory(
                [(MemoryRegion(0, region.size, region.userspace_addr, 0), region.fd)]
            )  # ADD_MEM_REG: CONFIGURE_MEM_SLOTS is negotiated
            desc, avail, used, _ = split_layout(QSIZE, RING_GPA)
            driver = SplitDriver(mem, QSIZE, desc, avail, used)
            uva = region.userspace_addr
            addr = VringAddr(0, 0, uva + desc, uva + used, uva + avail, 0)
            fe.start_vring(0, QSIZE, addr, 0, kick, call)

            assert _blk_request(driver, mem, (kick, call), VIRTIO_BLK_T_IN, 0) == 513
            assert mem.read(DATA_GPA, 512) == SECTOR0
            mem.write(DATA_GPA, b"pyvhost!" * 64)
            _blk_request(driver, mem, (kick, call), VIRTIO_BLK_T_OUT, 1)

            assert fe.get_vring_base(0) == 2
        # hung up: the daemon stays up and serves the next front-end
        with Frontend.connect(_sock(qsd)) as fe2:
            again = fe2.negotiate()
            assert again.queue_num == NUM_QUEUES
            assert fe2.get_config(0, 8) == struct.pack("<Q", IMAGE_SIZE // 512)
    finally:
        if driver is not None:
            driver.close()
        mem.close()
        os.close(kick)
        os.close(call)
    assert qsd.returncode is None
    with open(qsd.image, "rb") as f:
        f.seek(512)
        assert f.read(512) == b"pyvhost!" * 64
