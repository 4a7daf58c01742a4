"""pyvhost.control: one interface, two ways of naming memory.

The vhost-user Frontend names regions by fd and its label addresses; a kernel device by this
process's own mapping. Both take guest-physical ring addresses. The kernel half is checked here
by recording the ioctls a VhostNet would make (the host has no /dev/vhost-net; the guest tests in
tests/kernel prove the real thing), the vhost-user half against our BackendHandler.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from peers.recording import OFFERED, RecordingNet
from pyvhost.control import RingAddresses, VhostControl, region_for, start_ring
from pyvhost.driver.session import DriverSession
from pyvhost.errors import GuestMemoryError
from pyvhost.kernel.devices import VhostNet, VhostScsi, VhostVdpa, VhostVsock
from pyvhost.kernel.ioctl import VRING_ADDR, VRING_FILE, VRING_STATE, Ioctl
from pyvhost.testing import ConfigOnlyDevice
from pyvhost.user.backend import BackendHandler
from pyvhost.user.connection import socketpair
from pyvhost.user.frontend import Frontend
from pyvhost.virtio import features as vf
from pyvhost.virtio.memory import DirtyLog, GuestMemory, view_address
from pyvhost.virtio.split import split_layout


@pytest.mark.parametrize("cls", [Frontend, VhostNet, VhostVsock, VhostScsi, VhostVdpa])
def test_both_kinds_implement_the_interface(cls: type) -> None:
    for name in (
        "set_owner",
        "reset_owner",
        "get_features",
        "set_features",
        "set_memory",
        "set_dirty_log",
        "set_log_fd",
        "set_vring_num",
        "set_vring_base",
        "get_vring_base",
        "set_ring_addresses",
        "set_vring_kick",
        "set_vring_call",
        "set_vring_err",
        "enable_ring",
        "close",
    ):
        assert callable(getattr(cls, name, None)), f"{cls.__name__} lacks {name}"


def test_kernel_memory_table_names_this_process_mapping() -> None:
    dev = RecordingNet()
    with GuestMemory.anonymous(1 << 20, 0x4000_0000) as mem:
        mem.add_anonymous(1 << 16, 0x8000_0000)
        dev.set_memory(mem)
        (table,) = dev.args(Ioctl.SET_MEM_TABLE)
        nregions = struct.unpack_from("<I", table)[0]
        regions = [struct.unpack_from("<QQQQ", table, 8 + 32 * i) for i in range(nregions)]
        assert regions == [
            (r.guest_phys_addr, r.size, view_address(r.view), 0) for r in mem.regions
        ]
        assert all(r.userspace_addr != view_address(r.view) for r in mem.regions), (
            "labels differ from real addresses, so the test tells them apart"
        )

        dev.set_ring_addresses(1, RingAddresses(0x4000_1000, 0x4000_2000, 0x8000_0100, log=True))
        index, flags, desc, used, avail, log = VRING_ADDR.unpack(dev.args(Ioctl.SET_VRING_ADDR)[0])
        base0, base1 = (view_address(r.view) for r in mem.regions)
        assert (index, flags) == (1, 1)
        assert (desc, avail, used) == (base0 + 0x1000, base0 + 0x2000, base1 + 0x100)
        assert log == 0x8000_0100, "the log address stays guest-physical"

        with pytest.raises(GuestMemoryError, match="outside the shared memory"):
            dev.set_ring_addresses(0, RingAddresses(0x1000, 0x4000_0000, 0x4000_0000))

        log_area, fd = DirtyLog.anonymous(4096)
        try:
            dev.set_dirty_log(log_area, fd)
            assert dev.args(Ioctl.SET_LOG_BASE) == [struct.pack("<Q", log_area.host_address)]
        finally:
            log_area.close()
            os.close(fd)
    dev.close()


def test_ring_addresses_need_memory_first() -> None:
    with pytest.raises(GuestMemoryError, match="set_memory first"):
        region_for(None, 0x1000, "vring 0 descriptor area")
    dev = RecordingNet()
    with pytest.raises(GuestMemoryError, match="set_memory first"):
        dev.set_ring_addresses(0, RingAddresses(0, 0, 0))
    dev.close()


def test_start_ring_order_and_enable() -> None:
    dev = RecordingNet()
    with GuestMemory.anonymous(1 << 20) as mem:
        dev.set_memory(mem)
        start_ring(dev, 0, 256, RingAddresses(0x1000, 0x2000, 0x3000), 7, 5, 6)
    assert dev.requests()[1:] == [
        "VHOST_SET_VRING_NUM",
        "VHOST_SET_VRING_BASE",
        "VHOST_SET_VRING_ADDR",
        "VHOST_SET_VRING_CALL",
        "VHOST_SET_VRING_KICK",
    ]
    assert VRING_STATE.unpack(dev.args(Ioctl.SET_VRING_NUM)[0]) == (0, 256)
    assert VRING_STATE.unpack(dev.args(Ioctl.SET_VRING_BASE)[0]) == (0, 7)
    assert VRING_FILE.unpack(dev.args(Ioctl.SET_VRING_KICK)[0]) == (0, 5)
    assert VRING_FILE.unpack(dev.args(Ioctl.SET_VRING_CALL)[0]) == (0, 6)
    dev.close()


def test_driver_session_on_a_kernel_device_sends_the_generic_sequence() -> None:
    dev = RecordingNet()
    session = DriverSession.kernel(dev, num_queues=2, queue_size=64, features_mask=~0)
    try:
        per_ring = [
            "VHOST_SET_VRING_NUM",
            "VHOST_SET_VRING_BASE",
            "VHOST_SET_VRING_ADDR",
            "VHOST_SET_VRING_CALL",
            "VHOST_SET_VRING_KICK",
        ]
        assert dev.requests() == [
            "VHOST_SET_OWNER",
            "VHOST_GET_FEATURES",
            "VHOST_SET_FEATURES",
            "VHOST_SET_MEM_TABLE",
            *per_ring,
            *per_ring,
        ]
        acked = struct.unpack("<Q", dev.args(Ioctl.SET_FEATURES)[0])[0]
        assert acked == OFFERED & ~(1 << vf.F_LOG_ALL), "LOG_ALL only when logging starts"
        base = view_address(session.mem.regions[0].view)
        desc, avail, used, _ = split_layout(64, session.gpa_base)
        _, flags, d, u, a, _ = VRING_ADDR.unpack(dev.args(Ioctl.SET_VRING_ADDR)[0])
        offset = session.gpa_base
        assert (d, a, u) == (base + desc - offset, base + avail - offset, base + used - offset)
        assert flags == 0

        log, fd = DirtyLog.anonymous(4096)
        dev.calls.clear()
        session.enable_dirty_log(log, fd)
        assert dev.requests() == [
            "VHOST_SET_LOG_BASE",
            "VHOST_SET_FEATURES",
            "VHOST_SET_VRING_ADDR",
            "VHOST_SET_VRING_ADDR",
        ]
        assert struct.unpack("<Q", dev.args(Ioctl.SET_FEATURES)[0])[0] >> vf.F_LOG_ALL & 1
        assert all(VRING_ADDR.unpack(a)[1] == 1 for a in dev.args(Ioctl.SET_VRING_ADDR))
        with pytest.raises(Exception, match="no config space"):
            session.config(0, 4)
    finally:
        session.close()
        log.close()
        os.close(fd)
    assert dev.closed
    assert dev.requests()[-2:] == ["VHOST_GET_VRING_BASE", "VHOST_GET_VRING_BASE"]


@dataclass
class _Pair:
    fe: Frontend
    handler: BackendHandler
    thread: threading.Thread


@pytest.fixture
def pair() -> Iterator[_Pair]:
    a, b = socketpair()
    handler = BackendHandler(ConfigOnlyDevice(num_queues=2, features=OFFERED), b, name="control")
    thread = threading.Thread(target=handler.serve, daemon=True)
    thread.start()
    fe = Frontend(a, reply_timeout=5)
    yield _Pair(fe, handler, thread)
    fe.close()
    thread.join(5)


def test_frontend_names_regions_by_fd_and_labels(pair: _Pair) -> None:
    fe = pair.fe
    control: VhostControl = fe
    fe.negotiate()
    fe.set_features(OFFERED & ~(1 << vf.F_LOG_ALL))
    with GuestMemory.anonymous(1 << 20, 0x4000_0000) as mem:
        control.set_memory(mem)
        (region,) = mem.regions
        start_ring(
            control, 1, 64, RingAddresses(0x4000_1000, 0x4000_2000, 0x4000_3000), 0, None, None
        )
        vring = pair.handler.vrings[1]
        assert vring.addr is not None
        label = region.userspace_addr - region.guest_phys_addr
        assert (
            vring.addr.desc_user_addr,
            vring.addr.avail_user_addr,
            vring.addr.used_user_addr,
        ) == (
            0x4000_1000 + label,
            0x4000_2000 + label,
            0x4000_3000 + label,
        )
        assert vring.addr.log_guest_addr == 0x4000_3000
        assert len(pair.handler.mem) == 1
        control.get_vring_base(1)
