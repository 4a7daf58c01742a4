"""BackendHandler driven by hand-built messages over a socketpair: every request, the ring
state machine, the error policy (NACK / error reply / close) and fd hygiene."""

from __future__ import annotations

import logging
import os
import select
import threading
import uuid
from collections.abc import Iterator, Sequence

import pytest

from pyvhost.errors import ProtocolError, UnsupportedRequestError, VhostError
from pyvhost.testing import ConfigOnlyDevice
from pyvhost.user.backend import MAX_MEM_SLOTS, BackendHandler, FatalProtocolError
from pyvhost.user.connection import Connection, socketpair
from pyvhost.user.messages import (
    DEVICE_STATE_NOFD,
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    U64,
    VRING_F_LOG,
    VRING_NOFD,
    Config,
    DeviceStateTransfer,
    Empty,
    Inflight,
    IotlbMsg,
    Log,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    Message,
    Payload,
    ProtocolFeature,
    RawPayload,
    Request,
    SharedObject,
    ShmemConfig,
    VringAddr,
    VringState,
    encode_reply,
    encode_request,
    spec_for,
)
from pyvhost.user.protocol import HANDLER_PROTOCOL_FEATURES
from pyvhost.virtio import features as vf
from pyvhost.virtio.memory import DirtyLog, GuestMemory, Region
from pyvhost.virtio.packed import PackedDriver, PackedQueue, encode_packed_base, packed_layout
from pyvhost.virtio.queue import DeviceQueue
from pyvhost.virtio.split import SplitDriver, SplitQueue, split_layout

PF = ProtocolFeature
ALL_PF = HANDLER_PROTOCOL_FEATURES
CONFIG = bytes(range(60))
RING_GPA = 0x1000
BUF_GPA = 0x10000
QSIZE = 8


def bit(*bits: int) -> int:
    value = 0
    for b in bits:
        value |= 1 << b
    return value


class StatefulDevice(ConfigOnlyDevice):
    """ConfigOnlyDevice with the optional hooks implemented, for the requests that need them."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(CONFIG, writable_config=True, **kwargs)  # type: ignore[arg-type]
        self.state = b"device-state-" * 1000
        self.loaded: bytes | None = None
        self.mtu: int | None = None
        self.rarp: bytes | None = None
        self.shared: dict[uuid.UUID, bytes] = {}

    def save_state(self) -> bytes:
        return self.state

    def load_state(self, data: bytes) -> None:
        self.loaded = data

    def shmem_config(self) -> tuple[int, ...]:
        return (0x10000, 0, 0x2000)

    def get_shared_object(self, object_uuid: uuid.UUID) -> int | None:
        if object_uuid not in self.shared:
            return None
        fd = os.memfd_create("shared", os.MFD_CLOEXEC)
        os.write(fd, self.shared[object_uuid])
        return fd

    def net_set_mtu(self, mtu: int) -> None:
        self.mtu = mtu


class Peer:
    """A test front-end: sends requests through a real socket, runs handle(), reads replies."""

    def __init__(
        self,
        device: ConfigOnlyDevice | None = None,
        *,
        num_queues: int = 2,
        features: int = bit(vf.F_VERSION_1, vf.F_RING_EVENT_IDX, vf.F_RING_PACKED),
        protocol_features: int = ALL_PF,
    ) -> None:
        self.device = device or ConfigOnlyDevice(
            CONFIG, num_queues=num_queues, features=features, protocol_features=protocol_features
        )
        self.fe, be = socketpair()
        self.handler = BackendHandler(self.device, be, name="test")
        self.mem: GuestMemory | None = None

    def send(
        self,
        request: Request,
        payload: Payload | None = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> Message | None:
        """Send one request, let the handler process it; return its reply or None."""
        self.fe.send(encode_request(request, payload, need_reply=need_reply, fds=fds))
        self.handler.handle(self.handler.conn.recv_frame(2))
        return self.reply(request)

    def reply(self, request: Request) -> Message | None:
        ready, _, _ = select.select([self.fe.socket], [], [], 0)
        if not ready:
            return None
        return self.fe.recv_reply(request, 2)

    def u64(self, request: Request, payload: Payload | None = None) -> int:
        reply = self.send(request, payload)
        assert reply is not None
        return reply.payload_as(U64).value

    def negotiate(self, protocol: int = ALL_PF, features: int | None = None) -> None:
        offered = self.u64(Request.GET_FEATURES)
        self.send(Request.GET_PROTOCOL_FEATURES)
        self.send(Request.SET_PROTOCOL_FEATURES, U64(protocol))
        self.send(Request.SET_OWNER)
        acked = offered & ~bit(vf.F_RING_PACKED, F_LOG_ALL) if features is None else features
        self.send(Request.SET_FEATURES, U64(acked))

    def add_memory(self, size: int = 1 << 20) -> GuestMemory:
        self.mem = GuestMemory.anonymous(size)
        region = self.mem.regions[0]
        assert region.fd is not None
        self.send(Request.ADD_MEM_REG, MemRegMsg(_wire(region)), fds=[region.fd])
        return self.mem

    def ring(self, index: int, *, gpa: int = RING_GPA, kick: bool = True) -> SplitDriver:
        """Set up ring ``index`` like QEMU: NUM, BASE, ADDR, KICK; return the driver side."""
        assert self.mem is not None
        uva = self.mem.regions[0].userspace_addr
        desc, avail, used, _ = split_layout(QSIZE, gpa)
        driver = SplitDriver(self.mem, QSIZE, desc, avail, used, queue_index=index)
        self.send(Request.SET_VRING_NUM, VringState(index, QSIZE))
        self.send(Request.SET_VRING_BASE, VringState(index, 0))
        self.send(
            Request.SET_VRING_ADDR, VringAddr(index, 0, uva + desc, uva + used, uva + avail, 0)
        )
        if kick:
            efd = os.eventfd(0, os.EFD_CLOEXEC)
            try:
                self.send(Request.SET_VRING_KICK, U64(index), fds=[efd])
            finally:
                os.close(efd)
        return driver

    def close(self) -> None:
        self.handler.close()
        self.fe.close()
        if self.mem is not None:
            self.mem.close()


def _wire(region: Region, **changes: int) -> MemoryRegion:
    fields = {
        "guest_phys_addr": region.guest_phys_addr,
        "memory_size": region.size,
        "userspace_addr": region.userspace_addr,
        "mmap_offset": region.mmap_offset,
    }
    fields.update(changes)
    return MemoryRegion(**fields)


@pytest.fixture
def peer(no_fd_leak: None) -> Iterator[Peer]:
    p = Peer()
    yield p
    p.close()


@pytest.fixture
def ready(peer: Peer) -> Peer:
    """A peer after negotiation (all protocol features) with 1 MiB of memory mapped."""
    peer.negotiate()
    peer.add_memory()
    return peer


def test_features_offer_protocol_and_log_bits(peer: Peer) -> None:
    offered = peer.u64(Request.GET_FEATURES)
    assert offered == peer.device.features | bit(F_PROTOCOL_FEATURES, F_LOG_ALL)


def test_set_features_refuses_bits_not_offered(peer: Peer) -> None:
    with pytest.raises(ProtocolError, match=r"SET_FEATURES: features 0x2 were not offered"):
        peer.send(Request.SET_FEATURES, U64(bit(vf.F_VERSION_1, 1)))


def test_set_features_error_is_nacked_with_reply_ack(peer: Peer) -> None:
    peer.send(Request.SET_PROTOCOL_FEATURES, U64(bit(PF.REPLY_ACK)))
    reply = peer.send(Request.SET_FEATURES, U64(1 << 1), need_reply=True)
    assert reply is not None and reply.payload == U64(1)
    assert peer.handler.features == 0


def test_need_reply_success_is_acked_with_zero(peer: Peer) -> None:
    peer.send(Request.SET_PROTOCOL_FEATURES, U64(bit(PF.REPLY_ACK)))
    reply = peer.send(Request.SET_OWNER, need_reply=True)
    assert reply is not None and reply.payload == U64(0)
    reply = peer.send(Request.GET_FEATURES, need_reply=True)
    assert reply is not None and reply.payload_as(U64).value & 1 << F_PROTOCOL_FEATURES
    assert peer.reply(Request.GET_FEATURES) is None, "no extra ack after a reply body"


def test_without_bit_30_set_features_enables_every_ring(peer: Peer) -> None:
    peer.send(Request.SET_FEATURES, U64(bit(vf.F_VERSION_1)))
    assert peer.device.enabled == {0: True, 1: True}
    assert all(v.enabled for v in peer.handler.vrings)


def test_with_bit_30_rings_wait_for_set_vring_enable(peer: Peer) -> None:
    peer.send(Request.SET_FEATURES, U64(bit(vf.F_VERSION_1, F_PROTOCOL_FEATURES)))
    assert not any(v.enabled for v in peer.handler.vrings)
    peer.send(Request.SET_VRING_ENABLE, VringState(1, 1))
    assert [v.enabled for v in peer.handler.vrings] == [False, True]
    peer.send(Request.SET_VRING_ENABLE, VringState(1, 0))
    assert peer.device.events[-1] == ("queue_enabled", (1, False))


def test_protocol_features_offer_what_handler_and_device_support() -> None:
    device = ConfigOnlyDevice(
        CONFIG, protocol_features=bit(PF.MQ, PF.REPLY_ACK, PF.CROSS_ENDIAN, PF.XEN_MMAP)
    )
    p = Peer(device)
    try:
        assert p.u64(Request.GET_PROTOCOL_FEATURES) == bit(PF.MQ, PF.REPLY_ACK)
        with pytest.raises(ProtocolError, match="protocol features 0x40 were not offered"):
            p.send(Request.SET_PROTOCOL_FEATURES, U64(bit(PF.MQ, PF.CROSS_ENDIAN)))
    finally:
        p.close()


@pytest.mark.parametrize("missing", [PF.BACKEND_REQ, PF.REPLY_ACK])
def test_inband_notifications_without_its_partners_closes(peer: Peer, missing: PF) -> None:
    peer.send(Request.SET_PROTOCOL_FEATURES, U64(bit(PF.REPLY_ACK)))
    value = bit(PF.INBAND_NOTIFICATIONS, PF.BACKEND_REQ, PF.REPLY_ACK) & ~bit(missing)
    with pytest.raises(FatalProtocolError, match="INBAND_NOTIFICATIONS without"):
        peer.send(Request.SET_PROTOCOL_FEATURES, U64(value), need_reply=True)
    assert peer.reply(Request.SET_PROTOCOL_FEATURES) is None, "closing, not NACKing"


def test_queue_num_and_max_mem_slots(ready: Peer) -> None:
    assert ready.u64(Request.GET_QUEUE_NUM) == 2
    assert ready.u64(Request.GET_MAX_MEM_SLOTS) == MAX_MEM_SLOTS == 32


def test_owner_twice_is_an_error_and_reset_owner_disables_rings(peer: Peer) -> None:
    peer.send(Request.SET_OWNER)
    with pytest.raises(ProtocolError, match="SET_OWNER: the session already has an owner"):
        peer.send(Request.SET_OWNER)
    peer.send(Request.SET_FEATURES, U64(bit(vf.F_VERSION_1)))
    peer.send(Request.RESET_OWNER)
    assert not any(v.enabled for v in peer.handler.vrings)
    peer.send(Request.SET_OWNER)


# -- memory ----------------------------------------------------------------------------------------


def test_set_mem_table_honours_mmap_offset_and_closes_fds(peer: Peer) -> None:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 0x30000)
        os.pwrite(fd, b"second region", 0x20000)
        regions = (
            MemoryRegion(0, 0x10000, 0x7000_0000_0000, 0),
            MemoryRegion(0x100000, 0x10000, 0x7000_0010_0000, 0x20000),
        )
        before = set(os.listdir("/proc/self/fd"))
        peer.send(Request.SET_MEM_TABLE, MemoryTable(regions), fds=[fd, fd])
        # CPython's mmap keeps a dup of the fd per mapping: the two received fds are closed.
        assert len(set(os.listdir("/proc/self/fd")) - before) == 2
    finally:
        os.close(fd)
    mem = peer.handler.mem
    assert len(mem) == 2
    assert mem.read(0x100000, 13) == b"second region"
    assert mem.uva_to_gpa(0x7000_0010_0004) == 0x100004
    peer.send(Request.SET_MEM_TABLE, MemoryTable(()))
    assert len(mem) == 0
    assert set(os.listdir("/proc/self/fd")) <= before | {str(fd)}


def test_set_mem_table_releases_the_old_mappings(peer: Peer) -> None:
    first = GuestMemory.anonymous(0x10000)
    second = GuestMemory.anonymous(0x20000)
    try:
        for mem in (first, second):
            region = mem.regions[0]
            assert region.fd is not None
            peer.send(Request.SET_MEM_TABLE, MemoryTable((_wire(region),)), fds=[region.fd])
            if mem is first:
                old = peer.handler.mem.regions[0]
        assert old.closed
        assert [r.size for r in peer.handler.mem.regions] == [0x20000]
    finally:
        first.close()
        second.close()


def test_add_and_remove_memory_regions(ready: Peer, caplog: pytest.LogCaptureFixture) -> None:
    extra = GuestMemory.anonymous(0x10000, guest_phys_addr=0x1000_0000)
    try:
        region = extra.regions[0]
        assert region.fd is not None
        ready.send(Request.ADD_MEM_REG, MemRegMsg(_wire(region)), fds=[region.fd])
        assert len(ready.handler.mem) == 2
        ready.send(Request.REM_MEM_REG, MemRegMsg(_wire(region, mmap_offset=0x1234)))
        assert len(ready.handler.mem) == 1
        with pytest.raises(VhostError, match="no memory region with gpa 0x10000000"):
            ready.send(Request.REM_MEM_REG, MemRegMsg(_wire(region)))
        assert "REM_MEM_REG: no memory region with gpa 0x10000000" in caplog.text
    finally:
        extra.close()


def test_rem_mem_reg_closes_a_passed_fd(ready: Peer) -> None:
    assert ready.mem is not None
    region = ready.mem.regions[0]
    assert region.fd is not None
    before = set(os.listdir("/proc/self/fd"))
    ready.send(Request.REM_MEM_REG, MemRegMsg(_wire(region)), fds=[region.fd])
    assert len(before - set(os.listdir("/proc/self/fd"))) == 1, "mapping's fd gone, none added"
    assert len(ready.handler.mem) == 0


def test_add_mem_reg_beyond_the_slot_limit_fails(ready: Peer) -> None:
    ready.handler.max_mem_slots = 1
    extra = GuestMemory.anonymous(0x10000, guest_phys_addr=0x1000_0000)
    try:
        fd = extra.regions[0].fd
        assert fd is not None
        reply = ready.send(
            Request.ADD_MEM_REG, MemRegMsg(_wire(extra.regions[0])), fds=[fd], need_reply=True
        )
        assert reply is not None and reply.payload == U64(1)
    finally:
        extra.close()


# -- rings -----------------------------------------------------------------------------------------


def test_ring_starts_on_kick_and_serves_the_driver(ready: Peer) -> None:
    driver = ready.ring(0, kick=False)
    assert ready.device.queues == {}
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        ready.send(Request.SET_VRING_KICK, U64(0), fds=[efd])
        queue, notifier = ready.device.queues[0]
        assert isinstance(queue, SplitQueue)
        assert notifier.kick_fd is not None
        assert ready.mem is not None
        ready.mem.write(BUF_GPA, b"ping")
        driver.add([(BUF_GPA, 4)], [(BUF_GPA + 0x100, 16)])
        driver.publish()
        os.eventfd_write(efd, 1)
        assert notifier.drain_kick() == 1
    finally:
        os.close(efd)
    chain = queue.pop()
    assert chain is not None and chain.read_all() == b"ping"
    chain.write_at(0, b"pong")
    queue.push(chain.head, 4)
    assert driver.get_used() == [(chain.head, 4)]
    assert ready.mem.read(BUF_GPA + 0x100, 4) == b"pong"
    reply = ready.send(Request.GET_VRING_BASE, VringState(0, 0))
    assert reply is not None and reply.payload == VringState(0, 1)
    assert ready.device.events[-1] == ("queue_stopped", 0)
    assert 0 not in ready.device.queues


def test_call_fd_receives_notifications(ready: Peer) -> None:
    ready.ring(0)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        ready.send(Request.SET_VRING_CALL, U64(0), fds=[call])
        assert os.eventfd_read(call) == 1  # signalled once when installed
        _, notifier = ready.device.queues[0]
        notifier.call()
        assert os.eventfd_read(call) == 1
    finally:
        os.close(call)


def test_running_ring_is_rebuilt_on_memory_change(ready: Peer) -> None:
    driver = ready.ring(1)
    old_queue, _ = ready.device.queues[1]
    extra = GuestMemory.anonymous(0x10000, guest_phys_addr=0x1000_0000)
    try:
        fd = extra.regions[0].fd
        assert fd is not None
        ready.send(Request.ADD_MEM_REG, MemRegMsg(_wire(extra.regions[0])), fds=[fd])
    finally:
        extra.close()
    new_queue, _ = ready.device.queues[1]
    assert new_queue is not old_queue
    assert ("queue_stopped", 1) in ready.device.events
    assert ready.device.events[-1] == ("queue_started", 1)
    driver.add([(BUF_GPA, 8)], [])
    driver.publish()
    chain = new_queue.pop()
    assert chain is not None and chain.read_len == 8


def test_vring_index_out_of_range(ready: Peer) -> None:
    addr = VringAddr(3, 0, 0, 0, 0, 0)
    with pytest.raises(
        ProtocolError, match=r"^SET_VRING_ADDR: vring 3 out of range \(device has 2 queues\)$"
    ):
        ready.send(Request.SET_VRING_ADDR, addr)


@pytest.mark.parametrize("num", [0, 3, 100, 2048])
def test_vring_size_must_be_a_power_of_two_within_the_maximum(ready: Peer, num: int) -> None:
    with pytest.raises(ProtocolError, match=f"SET_VRING_NUM: vring 0: size {num} is not a power"):
        ready.send(Request.SET_VRING_NUM, VringState(0, num))


def test_nofd_kick_means_polling(ready: Peer) -> None:
    ready.ring(0, kick=False)
    ready.send(Request.SET_VRING_KICK, U64(VRING_NOFD))
    _, notifier = ready.device.queues[0]
    assert notifier.kick_fd is None and notifier.kick_polling


def test_vring_base_is_kept_across_stop_and_restart(ready: Peer) -> None:
    ready.ring(0, kick=False)
    ready.send(Request.SET_VRING_BASE, VringState(0, 5))
    ready.send(Request.SET_VRING_KICK, U64(VRING_NOFD))
    queue, _ = ready.device.queues[0]
    assert queue.get_base() == 5
    reply = ready.send(Request.GET_VRING_BASE, VringState(0, 0))
    assert reply is not None and reply.payload == VringState(0, 5)


def test_started_ring_refuses_size_and_base_changes(ready: Peer) -> None:
    ready.ring(0)
    with pytest.raises(ProtocolError, match="SET_VRING_NUM: vring 0 is started"):
        ready.send(Request.SET_VRING_NUM, VringState(0, 4))


def test_packed_ring_when_negotiated(peer: Peer) -> None:
    offered = peer.u64(Request.GET_FEATURES)
    assert offered & bit(vf.F_RING_PACKED)
    peer.negotiate(features=offered & ~bit(F_LOG_ALL))
    mem = peer.add_memory()
    uva = mem.regions[0].userspace_addr
    peer.send(Request.SET_VRING_NUM, VringState(0, QSIZE))
    peer.send(Request.SET_VRING_BASE, VringState(0, 0x8000_8000))
    peer.send(Request.SET_VRING_ADDR, VringAddr(0, 0, uva + 0x1000, uva + 0x2000, uva + 0x2100, 0))
    peer.send(Request.SET_VRING_KICK, U64(VRING_NOFD))
    queue, _ = peer.device.queues[0]
    assert type(queue).__name__ == "PackedQueue"
    reply = peer.send(Request.GET_VRING_BASE, VringState(0, 0))
    assert reply is not None and reply.payload == VringState(0, 0x8000_8000)


def test_inband_kick_starts_the_ring_with_an_eventfd_of_its_own(ready: Peer) -> None:
    ready.handler.protocol_features |= bit(PF.INBAND_NOTIFICATIONS)
    ready.ring(0, kick=False)
    ready.send(Request.VRING_KICK, VringState(0, 0))
    _, notifier = ready.device.queues[0]
    assert notifier.drain_kick() == 1


def test_set_vring_endian_refused_since_cross_endian_is_never_offered(ready: Peer) -> None:
    assert not ready.handler.offered_protocol_features >> PF.CROSS_ENDIAN & 1
    for big in (0, 1):
        reply = ready.send(Request.SET_VRING_ENDIAN, VringState(0, big), need_reply=True)
        assert reply is not None and reply.payload == U64(1)


# -- config, status, device-specific ---------------------------------------------------------------


def test_get_config_reply_has_the_requested_size(ready: Peer) -> None:
    reply = ready.send(Request.GET_CONFIG, Config(4, 0, bytes(8)))
    assert reply is not None and reply.payload == Config(4, 0, CONFIG[4:12])


def test_get_config_error_is_an_empty_payload(ready: Peer) -> None:
    reply = ready.send(Request.GET_CONFIG, Config(56, 0, bytes(8)))
    assert reply is not None and reply.payload == Empty()


def test_set_config_read_only_is_nacked(ready: Peer) -> None:
    reply = ready.send(Request.SET_CONFIG, Config(0, 0, b"\x01"), need_reply=True)
    assert reply is not None and reply.payload == U64(1)


def test_status_and_reset_device(ready: Peer) -> None:
    ready.ring(0)
    ready.send(Request.SET_STATUS, U64(0xF))
    assert ready.u64(Request.GET_STATUS) == 0xF
    ready.send(Request.RESET_DEVICE)
    assert ready.u64(Request.GET_STATUS) == 0
    assert ("queue_stopped", 0) in ready.device.events
    assert ready.device.events[-1] == ("reset", None)
    assert ready.handler.features == 0


@pytest.mark.parametrize(
    ("request_", "payload", "fds"),
    [
        (Request.SEND_RARP, U64(0x112233445566), 0),
        (Request.NET_SET_MTU, U64(1500), 0),
        (Request.CLOSE_CRYPTO_SESSION, U64(1), 0),
        (Request.GPU_SET_SOCKET, Empty(), 1),
    ],
)
def test_unsupported_hooks_nack_or_close(
    ready: Peer, request_: Request, payload: Payload, fds: int
) -> None:
    def send(need_reply: bool) -> Message | None:
        r, w = os.pipe()
        try:
            return ready.send(request_, payload, fds=[r][:fds], need_reply=need_reply)
        finally:
            os.close(r)
            os.close(w)

    reply = send(need_reply=True)
    assert reply is not None and reply.payload == U64(1)
    with pytest.raises(UnsupportedRequestError, match=f"{request_.name}: not supported"):
        send(need_reply=False)


def test_create_crypto_session_unsupported_closes(ready: Peer) -> None:
    with pytest.raises(UnsupportedRequestError, match="CREATE_CRYPTO_SESSION"):
        ready.send(Request.CREATE_CRYPTO_SESSION, RawPayload(bytes(16)))


def test_device_hooks_receive_mtu(no_fd_leak: None) -> None:
    p = Peer(StatefulDevice(num_queues=1, protocol_features=ALL_PF))
    try:
        p.negotiate()
        p.send(Request.NET_SET_MTU, U64(9000))
        assert isinstance(p.device, StatefulDevice) and p.device.mtu == 9000
        assert p.send(Request.GET_SHMEM_CONFIG) is not None
    finally:
        p.close()


def test_shmem_config(no_fd_leak: None) -> None:
    p = Peer(StatefulDevice(protocol_features=ALL_PF))
    try:
        p.negotiate()
        reply = p.send(Request.GET_SHMEM_CONFIG)
        assert reply is not None and reply.payload == ShmemConfig((0x10000, 0, 0x2000))
    finally:
        p.close()


def test_get_shared_object(no_fd_leak: None) -> None:
    device = StatefulDevice(protocol_features=ALL_PF)
    known = uuid.uuid4()
    device.shared[known] = b"dmabuf"
    p = Peer(device)
    try:
        p.negotiate()
        reply = p.send(Request.GET_SHARED_OBJECT, SharedObject(known))
        assert reply is not None and len(reply.fds) == 1
        assert os.pread(reply.fds[0], 6, 0) == b"dmabuf"
        os.close(reply.fds[0])
        reply = p.send(Request.GET_SHARED_OBJECT, SharedObject(uuid.uuid4()))
        assert reply is not None and reply.fds == []
    finally:
        p.close()


def test_iotlb_refused_since_access_platform_is_never_offered(ready: Peer) -> None:
    assert not ready.handler.offered_features >> vf.F_ACCESS_PLATFORM & 1
    update = IotlbMsg(0x1000, 0x2000, 0x7F00_0000_0000, 3, 2)
    assert ready.u64(Request.IOTLB_MSG, update) == 1, "the spec's error form: u64 non-zero"


# -- dirty log, inflight, channel, state, postcopy -------------------------------------------------


def test_dirty_log_marks_used_ring_and_buffers(ready: Peer) -> None:
    log_mem, log_fd = DirtyLog.anonymous(4096)
    log_mem.close()
    try:
        reply = ready.send(Request.SET_LOG_BASE, Log(4096, 0), fds=[log_fd])
        assert reply is not None and reply.payload == U64(0)
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        ready.send(Request.SET_LOG_FD, fds=[efd])
        os.close(efd)
        ready.send(Request.SET_FEATURES, U64(ready.handler.features | bit(F_LOG_ALL)))
        assert ready.mem is not None
        uva = ready.mem.regions[0].userspace_addr
        desc, avail, used, _ = split_layout(QSIZE, RING_GPA)
        driver = SplitDriver(ready.mem, QSIZE, desc, avail, used)
        ready.send(Request.SET_VRING_NUM, VringState(0, QSIZE))
        addr = VringAddr(0, VRING_F_LOG, uva + desc, uva + used, uva + avail, used)
        ready.send(Request.SET_VRING_ADDR, addr)
        ready.send(Request.SET_VRING_KICK, U64(VRING_NOFD))
        queue, _ = ready.device.queues[0]
        driver.add([], [(0x40000, 16)])
        driver.publish()
        chain = queue.pop()
        assert chain is not None
        chain.write_at(0, b"x" * 16)
        queue.push(chain.head, 16)
        check = DirtyLog(log_fd, 4096)
        try:
            assert check.dirty_pages() == [used // 4096, 0x40000 // 4096]
        finally:
            check.close()
    finally:
        os.close(log_fd)


def test_packed_dirty_log_marks_the_descriptor_ring_not_the_log_address(peer: Peer) -> None:
    """QEMU's log_guest_addr for a packed ring is the device area (used_phys): used descriptors
    must be logged where they are written, in the descriptor ring."""
    peer.negotiate(features=peer.u64(Request.GET_FEATURES))
    mem = peer.add_memory()
    size = 512  # the descriptor ring fills pages 1 and 2; the event areas are in page 3
    lay = packed_layout(size, RING_GPA)
    assert lay.device_event_gpa // 4096 == 3
    log_mem, log_fd = DirtyLog.anonymous(4096)
    log_mem.close()
    try:
        peer.send(Request.SET_LOG_BASE, Log(4096, 0), fds=[log_fd])
        peer.send(Request.SET_FEATURES, U64(peer.handler.features | bit(F_LOG_ALL)))
        uva = mem.regions[0].userspace_addr
        driver = PackedDriver(mem, size, lay.desc_gpa, lay.driver_event_gpa, lay.device_event_gpa)
        peer.send(Request.SET_VRING_NUM, VringState(0, size))
        addr = VringAddr(
            0,
            VRING_F_LOG,
            uva + lay.desc_gpa,
            uva + lay.device_event_gpa,
            uva + lay.driver_event_gpa,
            lay.device_event_gpa,
        )
        peer.send(Request.SET_VRING_ADDR, addr)
        peer.send(Request.SET_VRING_KICK, U64(VRING_NOFD))
        queue, _ = peer.device.queues[0]
        assert isinstance(queue, PackedQueue)
        for _ in range(300):  # used positions 0..299 lie in pages 1 and 2
            driver.add([], [(0x40000, 16)])
            driver.publish()
            chain = queue.pop()
            assert chain is not None
            queue.push(chain.head, 16)
        check = DirtyLog(log_fd, 4096)
        try:
            pages = check.dirty_pages()
        finally:
            check.close()
        # descriptor ring, device area (event writes), buffers; logging used descriptors
        # relative to the device area would have marked page 4 and missed page 2
        assert pages == [1, 2, 3, 0x40000 // 4096]
    finally:
        os.close(log_fd)


def test_inflight_fd_get_and_set(ready: Peer) -> None:
    reply = ready.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, 2, QSIZE))
    assert reply is not None and len(reply.fds) == 1
    info = reply.payload_as(Inflight)
    assert info.num_queues == 2 and info.queue_size == QSIZE and info.mmap_size > 0
    assert os.fstat(reply.fds[0]).st_size == info.mmap_size
    try:
        ready.send(Request.SET_INFLIGHT_FD, info, fds=reply.fds)
    finally:
        os.close(reply.fds[0])
    assert ready.handler.inflight is not None
    ready.ring(0)
    assert ready.device.queues[0][0] is not None


def test_device_state_save_and_load(no_fd_leak: None) -> None:
    device = StatefulDevice(protocol_features=ALL_PF)
    p = Peer(device)
    try:
        p.negotiate()
        r, w = os.pipe()
        reply = p.send(Request.SET_DEVICE_STATE_FD, DeviceStateTransfer(0, 0), fds=[w])
        os.close(w)
        assert reply is not None and reply.payload == U64(DEVICE_STATE_NOFD)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        os.close(r)
        assert b"".join(chunks) == device.state
        assert p.u64(Request.CHECK_DEVICE_STATE) == 0

        r, w = os.pipe()
        p.send(Request.SET_DEVICE_STATE_FD, DeviceStateTransfer(1, 0), fds=[r])
        os.close(r)

        def write_state() -> None:
            os.write(w, b"incoming" * 10000)
            os.close(w)

        writer = threading.Thread(target=write_state)
        writer.start()
        assert p.u64(Request.CHECK_DEVICE_STATE) == 0
        writer.join()
        assert device.loaded == b"incoming" * 10000
        assert p.u64(Request.CHECK_DEVICE_STATE) == 1, "nothing left to check"
    finally:
        p.close()


def test_device_state_unsupported_device_replies_an_error(ready: Peer) -> None:
    r, w = os.pipe()
    try:
        reply = ready.send(Request.SET_DEVICE_STATE_FD, DeviceStateTransfer(0, 0), fds=[w])
        assert reply is not None and reply.payload == U64(DEVICE_STATE_NOFD | 1)
    finally:
        os.close(r)
        os.close(w)


def test_backend_req_fd_gives_the_device_a_channel(ready: Peer) -> None:
    pytest.importorskip("pyvhost.user.channel")
    a, b = socketpair()
    try:
        ready.send(Request.SET_BACKEND_REQ_FD, fds=[b.fileno()])
        b.close()
        assert ready.device.channel is not None
        assert ready.device.events[-1] == ("set_channel", True)
        sender = threading.Thread(target=ready.device.channel.config_change)
        sender.start()
        msg = a.recv_request(2, backend_channel=True)
        assert msg.name == "BACKEND_CONFIG_CHANGE_MSG"
        a.send(encode_reply(msg.request, U64(0)))
        sender.join(5)
        assert not sender.is_alive()
    finally:
        a.close()


def test_inband_call_goes_over_the_channel(peer: Peer) -> None:
    inband = bit(PF.INBAND_NOTIFICATIONS, PF.BACKEND_REQ, PF.REPLY_ACK)
    peer.negotiate(protocol=inband | bit(PF.CONFIGURE_MEM_SLOTS))
    peer.add_memory()
    a, b = socketpair()
    try:
        peer.send(Request.SET_BACKEND_REQ_FD, fds=[b.fileno()])
        b.close()
        peer.ring(0, kick=False)
        peer.send(Request.SET_VRING_CALL, U64(VRING_NOFD))
        peer.send(Request.VRING_KICK, VringState(0, 0))
        _, notifier = peer.device.queues[0]
        done = threading.Thread(target=notifier.call)
        done.start()
        msg = a.recv_request(2, backend_channel=True)
        assert msg.name == "BACKEND_VRING_CALL" and msg.payload == VringState(0, 0)
        assert not msg.need_reply, "a worker never blocks on a notification's reply"
        done.join(5)
        assert not done.is_alive()
    finally:
        a.close()


def test_backend_req_fd_not_a_socket_is_refused(ready: Peer) -> None:
    r, w = os.pipe()
    try:
        reply = ready.send(Request.SET_BACKEND_REQ_FD, fds=[r], need_reply=True)
        assert reply is not None and reply.payload == U64(1)
    finally:
        os.close(r)
        os.close(w)


def test_postcopy_advise_listen_end(ready: Peer) -> None:
    reply = ready.send(Request.POSTCOPY_ADVISE)
    assert reply is not None
    if not reply.fds:
        pytest.skip("userfaultfd not permitted here")
    os.close(reply.fds[0])
    ready.send(Request.POSTCOPY_LISTEN)
    assert ready.handler.uffd is not None and len(ready.handler.uffd.registered) == 1
    assert ready.u64(Request.POSTCOPY_END) == 0
    assert ready.handler.uffd is None
    assert ready.u64(Request.POSTCOPY_END) == 1, "END without ADVISE is an error reply"


def test_every_request_has_a_handler() -> None:
    p = Peer()
    try:
        assert set(p.handler._dispatch) == set(Request)
        for request in Request:
            assert spec_for(request) is not None
    finally:
        p.close()


# -- connection lifecycle --------------------------------------------------------------------------


def test_serve_stops_rings_and_releases_everything_when_the_peer_leaves(
    no_fd_leak: None,
) -> None:
    p = Peer()
    p.negotiate()
    p.add_memory()
    p.ring(0)
    thread = threading.Thread(target=p.handler.serve)
    thread.start()
    reply_conn: Connection = p.fe
    reply_conn.send(encode_request(Request.GET_QUEUE_NUM))
    assert reply_conn.recv_reply(Request.GET_QUEUE_NUM, 2).payload == U64(2)
    reply_conn.close()
    thread.join(5)
    assert not thread.is_alive()
    assert p.handler.closed and len(p.handler.mem) == 0
    assert ("queue_stopped", 0) in p.device.events
    assert p.device.events[-1] == ("reset", None)
    assert p.mem is not None
    p.mem.close()


def test_serve_closes_on_garbage(no_fd_leak: None) -> None:
    p = Peer()
    thread = threading.Thread(target=p.handler.serve)
    thread.start()
    p.fe.send_bytes(b"\xff" * 12)
    thread.join(5)
    assert not thread.is_alive() and p.handler.closed
    p.fe.close()


def test_ring_kicked_before_its_memory_starts_when_memory_arrives(peer: Peer) -> None:
    """The kick may come first; the ring starts as soon as size, addresses and memory are there."""
    peer.negotiate()
    mem = GuestMemory.anonymous(1 << 20)
    peer.mem = mem
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        peer.send(Request.SET_VRING_KICK, U64(0), fds=[efd])
        assert peer.device.queues == {}
        uva = mem.regions[0].userspace_addr
        desc, avail, used, _ = split_layout(QSIZE, RING_GPA)
        peer.send(Request.SET_VRING_NUM, VringState(0, QSIZE))
        peer.send(Request.SET_VRING_ADDR, VringAddr(0, 0, uva + desc, uva + used, uva + avail, 0))
        assert peer.device.queues == {}
        region = mem.regions[0]
        assert region.fd is not None
        peer.send(Request.ADD_MEM_REG, MemRegMsg(_wire(region)), fds=[region.fd])
        assert isinstance(peer.device.queues[0][0], SplitQueue)
    finally:
        os.close(efd)


# -- ring positions a front-end hands over (migration, DPDK, inflight) ----------------------------


def _packed_ring(peer: Peer, index: int, size: int, base: int | None) -> PackedDriver:
    """Set up packed ring ``index`` of ``size`` like QEMU (NUM, BASE, ADDR, KICK)."""
    assert peer.mem is not None
    uva = peer.mem.regions[0].userspace_addr
    lay = packed_layout(size, RING_GPA)
    driver = PackedDriver(peer.mem, size, lay.desc_gpa, lay.driver_event_gpa, lay.device_event_gpa)
    peer.send(Request.SET_VRING_NUM, VringState(index, size))
    if base is not None:
        peer.send(Request.SET_VRING_BASE, VringState(index, base))
    addr = VringAddr(
        index, 0, uva + lay.desc_gpa, uva + lay.device_event_gpa, uva + lay.driver_event_gpa, 0
    )
    peer.send(Request.SET_VRING_ADDR, addr)
    peer.send(Request.SET_VRING_KICK, U64(index | VRING_NOFD))
    return driver


def _round_trip(driver: PackedDriver, queue: DeviceQueue) -> None:
    """One buffer through the ring: the driver must see the device's completion."""
    buf_id = driver.add([], [(BUF_GPA, 16)])
    driver.publish()
    chain = queue.pop()
    assert chain is not None and chain.head == buf_id
    queue.push(chain.head, 16)
    assert driver.get_used() == [(buf_id, 16)]


@pytest.mark.parametrize("base", [1 << 15, 0])
def test_packed_base_with_only_the_avail_side_as_dpdk_sends_it(peer: Peer, base: int) -> None:
    """DPDK / SPDK virtio-user: ``num = avail_idx | avail_wrap << 15``, bits 16-31 zero; the
    used side follows the avail side (DPDK's back-end: used_wrap_counter = avail_wrap_counter)."""
    peer.negotiate(features=peer.u64(Request.GET_FEATURES) & ~bit(F_LOG_ALL))
    peer.add_memory()
    driver = _packed_ring(peer, 0, QSIZE, base)
    queue, _ = peer.device.queues[0]
    wrap = bool(base >> 15)
    assert queue.get_base() == encode_packed_base(0, wrap, 0, wrap)
    if wrap:  # a fresh driver starts with both wrap counters at 1
        _round_trip(driver, queue)
    driver.close()


def test_packed_ring_of_a_size_that_is_not_a_power_of_two(peer: Peer) -> None:
    peer.negotiate(features=peer.u64(Request.GET_FEATURES) & ~bit(F_LOG_ALL))
    peer.add_memory()
    driver = _packed_ring(peer, 0, 100, None)
    queue, _ = peer.device.queues[0]
    assert queue.size == 100
    for _ in range(150):  # wraps past the end of a 100-entry ring
        _round_trip(driver, queue)
    driver.close()
    del queue  # the frame outlives the test in the expected error's traceback
    peer.send(Request.SET_VRING_NUM, VringState(1, 101))  # accepted for packed
    with pytest.raises(ProtocolError, match=r"size 0 is not in 1\.\.1024"):
        peer.send(Request.SET_VRING_NUM, VringState(1, 0))


def test_split_ring_size_must_be_a_power_of_two(ready: Peer) -> None:
    with pytest.raises(ProtocolError, match="only packed rings may have other sizes"):
        ready.send(Request.SET_VRING_NUM, VringState(0, 100))


def _inflight(peer: Peer, queue_size: int) -> int:
    """GET_INFLIGHT_FD then SET_INFLIGHT_FD as QEMU does; returns the region's fd (caller's)."""
    reply = peer.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, queue_size))
    assert reply is not None and len(reply.fds) == 1
    info = reply.payload_as(Inflight)
    fd = reply.fds[0]
    peer.send(Request.SET_INFLIGHT_FD, info, fds=[fd])
    return fd


def test_packed_fresh_inflight_region_keeps_the_migrated_base(peer: Peer) -> None:
    """A migration destination: QEMU passes the source's GET_VRING_BASE to SET_VRING_BASE and
    a fresh inflight region; the ring resumes there, not at the initial position."""
    peer.negotiate(features=peer.u64(Request.GET_FEATURES) & ~bit(F_LOG_ALL))
    peer.add_memory()
    fd = _inflight(peer, QSIZE)
    try:
        migrated = encode_packed_base(3, False, 3, False)
        _packed_ring(peer, 0, QSIZE, migrated).close()
        queue, _ = peer.device.queues[0]
        assert queue.recover_inflight() == []
        assert queue.get_base() == migrated
        reply = peer.send(Request.GET_VRING_BASE, VringState(0, 0))
        assert reply is not None and reply.payload_as(VringState).num == migrated
    finally:
        os.close(fd)


def test_split_fresh_inflight_region_then_crash_before_any_completion(
    no_fd_leak: None,
) -> None:
    """After a migration used.idx is far from 0; a back-end that dies before its first completion
    must leave a region the next one recovers from (not 'used ring idx N entries past 0')."""
    first = Peer()
    second = Peer()
    try:
        first.negotiate()
        mem = first.add_memory()
        fd = _inflight(first, QSIZE)
        start = 1000
        desc, avail, used, _ = split_layout(QSIZE, RING_GPA)
        driver = SplitDriver(mem, QSIZE, desc, avail, used, start_idx=start)
        first.send(Request.SET_VRING_NUM, VringState(0, QSIZE))
        first.send(Request.SET_VRING_BASE, VringState(0, start))
        uva = mem.regions[0].userspace_addr
        first.send(Request.SET_VRING_ADDR, VringAddr(0, 0, uva + desc, uva + used, uva + avail, 0))
        first.send(Request.SET_VRING_KICK, U64(VRING_NOFD))
        queue, _ = first.device.queues[0]
        heads = [driver.add([(BUF_GPA + 16 * k, 16)], []) for k in range(2)]
        driver.publish()
        assert queue.recover_inflight() == []
        popped = [c.head for c in queue.pop_batch(8)]
        assert popped == heads
        del queue

        # the back-end dies; the next one gets the same region and memory
        second.negotiate()
        region = mem.regions[0]
        assert region.fd is not None
        second.send(Request.ADD_MEM_REG, MemRegMsg(_wire(region)), fds=[region.fd])
        second.send(Request.SET_INFLIGHT_FD, Inflight(os.fstat(fd).st_size, 0, 1, QSIZE), fds=[fd])
        second.send(Request.SET_VRING_NUM, VringState(0, QSIZE))
        second.send(Request.SET_VRING_BASE, VringState(0, start))
        second.send(Request.SET_VRING_ADDR, VringAddr(0, 0, uva + desc, uva + used, uva + avail, 0))
        second.send(Request.SET_VRING_KICK, U64(VRING_NOFD))
        resumed, _ = second.device.queues[0]
        assert [c.head for c in resumed.recover_inflight()] == heads
        assert resumed.get_base() == start + 2
        os.close(fd)
        driver.close()
    finally:
        second.close()
        first.handler.close()
        first.fe.close()
        first.mem = None


def test_set_vring_call_signals_the_new_fd_once(ready: Peer) -> None:
    """libvhost-user does: completions a crashed predecessor published are then noticed."""
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        ready.send(Request.SET_VRING_CALL, U64(0), fds=[efd])
        assert os.eventfd_read(efd) == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
    finally:
        os.close(efd)


def test_rem_mem_reg_under_a_running_ring_pauses_it_until_the_memory_returns(
    ready: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    """QEMU removes and re-adds regions while rings run (virtio-mem, merges): the ring keeps
    its position, no error is signalled, and it serves again once ADD_MEM_REG brings it back."""
    caplog.set_level(logging.INFO, "pyvhost.backend")
    driver = ready.ring(0)
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        ready.send(Request.SET_VRING_ERR, U64(0), fds=[err])
        queue, _ = ready.device.queues[0]
        for _ in range(3):
            driver.add([(BUF_GPA, 4)], [])
            driver.publish()
            chain = queue.pop()
            assert chain is not None
            queue.push(chain.head, 0)
        del chain, queue
        assert ready.mem is not None
        region = ready.mem.regions[0]
        assert region.fd is not None
        reply = ready.send(Request.REM_MEM_REG, MemRegMsg(_wire(region)), need_reply=True)
        assert reply is not None and reply.payload == U64(0)
        assert len(ready.handler.mem) == 0
        assert 0 not in ready.device.queues
        assert "vring 0 paused at base 0x3 until its memory is added back" in caplog.text
        with pytest.raises(BlockingIOError):
            os.eventfd_read(err)
        reply = ready.send(
            Request.ADD_MEM_REG, MemRegMsg(_wire(region)), fds=[region.fd], need_reply=True
        )
        assert reply is not None and reply.payload == U64(0)
        queue, _ = ready.device.queues[0]
        assert queue.get_base() == 3
        driver.add([(BUF_GPA, 4)], [])
        driver.publish()
        chain = queue.pop()
        assert chain is not None and chain.read_all() == ready.mem.read(BUF_GPA, 4)
        queue.push(chain.head, 0)
        assert len(driver.get_used()) == 4
        with pytest.raises(BlockingIOError):
            os.eventfd_read(err)
    finally:
        os.close(err)
        driver.close()


def test_access_platform_is_never_offered(no_fd_leak: None) -> None:
    """Descriptor addresses are not translated through the IOTLB, so the bit is withheld even
    from a device that asks for it."""
    p = Peer(features=bit(vf.F_VERSION_1, vf.F_ACCESS_PLATFORM))
    try:
        offered = p.u64(Request.GET_FEATURES)
        assert not offered >> vf.F_ACCESS_PLATFORM & 1
        assert offered >> vf.F_VERSION_1 & 1
        with pytest.raises(ProtocolError, match="were not offered"):
            p.send(Request.SET_FEATURES, U64(offered | bit(vf.F_ACCESS_PLATFORM)))
    finally:
        p.close()
