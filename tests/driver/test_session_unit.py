"""DriverSession and BlkDriver pieces that need no peer: the allocator, config parsing,
feature choice, and the errors they raise."""

from __future__ import annotations

import struct

import pytest

from pyvhost.driver.blk import BlkCompletion, BlkConfig, BlkRequestError, RequestType
from pyvhost.driver.session import DriverSession, _Heap
from pyvhost.errors import GuestMemoryError, UnsupportedRequestError
from pyvhost.virtio import features as vf


def test_heap_reuses_freed_buffers_and_reports_exhaustion() -> None:
    heap = _Heap(0x1000, 0x1000 + 4096)
    a = heap.alloc(100)
    b = heap.alloc(64)
    assert a == 0x1000 and b == 0x1000 + 128  # 64-byte granules
    heap.free(a)
    assert heap.alloc(128) == a  # same rounded size comes back
    with pytest.raises(ValueError, match="freed twice"):
        heap.free(0x1000 + 4000)
    with pytest.raises(GuestMemoryError, match="driver memory exhausted: cannot allocate 8192"):
        heap.alloc(8192)


def test_blk_config_parse() -> None:
    raw = struct.pack("<QII", 2048, 65536, 126) + bytes(4) + struct.pack("<I", 4096)
    raw += struct.pack("<BBHI", 3, 0, 8, 64) + struct.pack("<BBH", 1, 0, 4)
    raw += struct.pack("<IIIIIB", 100, 1, 8, 200, 1, 1)
    cfg = BlkConfig.parse(raw)
    assert cfg.capacity == 2048 and cfg.capacity_bytes == 1 << 20
    assert (cfg.size_max, cfg.seg_max, cfg.blk_size) == (65536, 126, 4096)
    assert (cfg.physical_block_exp, cfg.min_io_size, cfg.opt_io_size) == (3, 8, 64)
    assert (cfg.writeback, cfg.num_queues) == (1, 4)
    assert (cfg.max_discard_sectors, cfg.max_write_zeroes_sectors) == (100, 200)
    assert cfg.write_zeroes_may_unmap == 1
    assert BlkConfig.parse(struct.pack("<Q", 8)).num_queues == 0  # short config reads as 0


def test_completion_error_names_request_sector_and_status() -> None:
    done = BlkCompletion(1, 0, RequestType.OUT, 77, 4096, 1, 1)
    with pytest.raises(BlkRequestError, match=r"OUT sector 77 \(4096 bytes\) on queue 0: .*IOERR"):
        done.check()
    unset = BlkCompletion(2, 1, RequestType.IN, 5, 512, 0xFF, 0)
    assert "without writing the status byte" in str(unset.error())
    assert BlkCompletion(3, 0, RequestType.FLUSH, 0, 0, 0, 1).check().ok


def _session(**kw: object) -> DriverSession:
    return DriverSession("/nonexistent", mem_size=1 << 20, **kw)  # type: ignore[arg-type]


def test_feature_choice() -> None:
    s = _session()
    try:
        offered = (
            1 << vf.F_VERSION_1
            | 1 << vf.F_RING_EVENT_IDX
            | 1 << vf.F_RING_INDIRECT_DESC
            | 1 << vf.F_RING_PACKED
            | 1 << vf.F_ACCESS_PLATFORM
            | 1 << vf.F_PROTOCOL_FEATURES
            | 1 << vf.BLK_F_FLUSH
        )
        chosen = s._choose_features(offered)
        assert chosen & 1 << vf.F_RING_EVENT_IDX and chosen & 1 << vf.F_RING_INDIRECT_DESC
        assert chosen & 1 << vf.BLK_F_FLUSH and chosen & 1 << vf.F_PROTOCOL_FEATURES
        assert not chosen & 1 << vf.F_RING_PACKED  # only when asked for
        assert not chosen & 1 << vf.F_ACCESS_PLATFORM  # not implemented by this driver
        with pytest.raises(UnsupportedRequestError, match="VIRTIO_F_VERSION_1"):
            s._choose_features(offered & ~(1 << vf.F_VERSION_1))
    finally:
        s.close()
    p = _session(packed=True)
    try:
        assert p._choose_features(1 << vf.F_VERSION_1 | 1 << vf.F_RING_PACKED) >> 34 & 1
        with pytest.raises(UnsupportedRequestError, match="RING_PACKED"):
            p._choose_features(1 << vf.F_VERSION_1)
    finally:
        p.close()


def test_mem_size_too_small_for_rings() -> None:
    with pytest.raises(ValueError, match="cannot hold 4 rings of 1024"):
        DriverSession("/nonexistent", num_queues=4, queue_size=1024, mem_size=64 << 10)


def test_connect_to_nothing_fails_cleanly(no_fd_leak: None) -> None:
    with pytest.raises(ConnectionError):
        DriverSession.connect("/tmp/pvh-no-such-socket.sock", connect_timeout=0.2)
