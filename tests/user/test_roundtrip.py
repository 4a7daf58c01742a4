"""Frontend <-> BackendHandler over a real socket pair, for every front-end request."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pyvhost.errors import ReplyError, UnsupportedRequestError
from pyvhost.testing import ConfigOnlyDevice
from pyvhost.user.backend import MAX_MEM_SLOTS, BackendHandler
from pyvhost.user.channel import BackendRequestHandler
from pyvhost.user.connection import socketpair
from pyvhost.user.frontend import Frontend
from pyvhost.user.messages import (
    F_LOG_ALL,
    IotlbMsg,
    MemoryRegion,
    Message,
    Request,
    VringAddr,
)
from pyvhost.user.protocol import HANDLER_PROTOCOL_FEATURES
from pyvhost.virtio import features as vf
from pyvhost.virtio.memory import DirtyLog, GuestMemory
from pyvhost.virtio.split import SplitDriver, split_layout

CONFIG = bytes(range(60))
QSIZE = 16


class FullDevice(ConfigOnlyDevice):
    """Implements every optional hook, recording what it was given."""

    def __init__(self) -> None:
        super().__init__(
            CONFIG,
            features=1 << vf.F_VERSION_1 | 1 << vf.F_ACCESS_PLATFORM | 1 << vf.NET_F_MTU,
            num_queues=2,
            protocol_features=HANDLER_PROTOCOL_FEATURES,
            writable_config=True,
        )
        self.calls: dict[str, object] = {}
        self.exported = {uuid.UUID(int=7): b"exported object"}
        self.gpu_fd: int | None = None

    def net_set_mtu(self, mtu: int) -> None:
        self.calls["mtu"] = mtu

    def send_rarp(self, mac: bytes) -> None:
        self.calls["rarp"] = mac

    def create_crypto_session(self, request: bytes) -> bytes:
        self.calls["crypto"] = request
        return (42).to_bytes(8, "little") + request[8:]

    def close_crypto_session(self, session_id: int) -> None:
        self.calls["crypto_closed"] = session_id

    def gpu_set_socket(self, fd: int) -> None:
        self.gpu_fd = fd

    def get_shared_object(self, object_uuid: uuid.UUID) -> int | None:
        data = self.exported.get(object_uuid)
        if data is None:
            return None
        fd = os.memfd_create("object", os.MFD_CLOEXEC)
        os.write(fd, data)
        return fd

    def shmem_config(self) -> tuple[int, ...]:
        return (0x1000, 0x4000)

    def save_state(self) -> bytes:
        return b"state:" + bytes(self.config)

    def load_state(self, data: bytes) -> None:
        self.calls["loaded"] = data

    def reset(self) -> None:
        super().reset()
        if self.gpu_fd is not None:
            os.close(self.gpu_fd)
            self.gpu_fd = None


@dataclass
class Pair:
    fe: Frontend
    handler: BackendHandler
    device: FullDevice
    thread: threading.Thread
    seen: list[Message]


@pytest.fixture
def pair(no_fd_leak: None) -> Iterator[Pair]:
    a, b = socketpair()
    device = FullDevice()
    seen: list[Message] = []
    handler = BackendHandler(device, b, name="roundtrip", trace=seen.append)
    thread = threading.Thread(target=handler.serve, daemon=True)
    thread.start()
    fe = Frontend(a, reply_timeout=5)
    p = Pair(fe, handler, device, thread, seen)
    yield p
    fe.close()
    thread.join(5)
    assert not thread.is_alive()
    assert handler.closed


def _drain(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_every_request_round_trips(pair: Pair) -> None:
    fe, device = pair.fe, pair.device
    _negotiate_and_configure(pair)
    with (
        GuestMemory.anonymous(1 << 20) as mem,
        GuestMemory.anonymous(0x10000, guest_phys_addr=0x1000_0000) as extra,
    ):
        main, other = mem.regions[0], extra.regions[0]
        assert main.fd is not None and other.fd is not None
        region = MemoryRegion(main.guest_phys_addr, main.size, main.userspace_addr, 0)
        extra_region = MemoryRegion(other.guest_phys_addr, other.size, other.userspace_addr, 0)
        fe.set_mem_table([(region, main.fd)])
        fe.add_mem_reg(extra_region, other.fd)
        fe.rem_mem_reg(extra_region)
        assert len(pair.handler.mem) == 1

        log, log_fd = DirtyLog.anonymous(4096)
        log.close()
        try:
            fe.set_log_base(4096, 0, log_fd)
        finally:
            os.close(log_fd)
        # The chain is released at once: the postcopy SET_MEM_TABLE below then really unmaps
        # the old mapping, which must be unregistered from the userfaultfd before that.
        _ring_round_trip(pair, mem)
        _device_specific_requests(pair, main.userspace_addr)

        ufd = fe.postcopy_advise()
        os.close(ufd)
        fe.postcopy_listen()
        bases = fe.set_mem_table([(region, main.fd)])
        assert bases is not None and bases[0].guest_phys_addr == 0
        assert bases[0].userspace_addr != region.userspace_addr, "the back-end's own mapping"
        assert fe.postcopy_end() == 0

        inflight, ifd = fe.get_inflight_fd(2, QSIZE)
        assert ifd is not None and inflight.mmap_size > 0
        try:
            fe.set_inflight_fd(inflight, ifd)
        finally:
            os.close(ifd)
        _shared_object_and_device_state(pair)

        assert fe.get_shmem_config() == (0x1000, 0x4000)
        fe.reset_device()
        assert fe.get_status() == 0
        fe.reset_owner()
        fe.set_owner()
    assert device.calls["loaded"] == b"restored"

    seen = {m.request for m in pair.seen}
    assert seen == set(Request), f"not exercised: {sorted(r.name for r in set(Request) - seen)}"


def _negotiate_and_configure(pair: Pair) -> None:
    """Negotiation, features, config space and status."""
    fe, device = pair.fe, pair.device
    result = fe.negotiate(backend_handler=BackendRequestHandler())
    assert result.protocol_features == HANDLER_PROTOCOL_FEATURES
    assert result.queue_num == 2
    assert result.max_mem_slots == MAX_MEM_SLOTS
    assert device.channel is not None
    assert fe.get_features() & 1 << F_LOG_ALL
    fe.set_features(result.features & ~(1 << F_LOG_ALL | 1 << vf.F_ACCESS_PLATFORM))
    assert device.acked_features & 1 << vf.F_VERSION_1

    assert fe.get_config(0, 60) == CONFIG
    fe.set_config(4, b"\xaa\xbb")
    assert fe.get_config(4, 2) == b"\xaa\xbb"
    fe.set_status(7)
    assert fe.get_status() == 7


def _ring_round_trip(pair: Pair, mem: GuestMemory) -> None:
    """The vring requests: a ring started, one chain through it, kick and call, its base."""
    fe, device = pair.fe, pair.device
    main = mem.regions[0]
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        fe.set_log_fd(efd)
        fe.set_vring_err(0, efd)
        desc, avail, used, _ = split_layout(QSIZE, 0x1000)
        uva = main.userspace_addr
        driver = SplitDriver(mem, QSIZE, desc, avail, used)
        addr = VringAddr(0, 0, uva + desc, uva + used, uva + avail, 0)
        fe.start_vring(0, QSIZE, addr, 0, efd, call)
        assert os.eventfd_read(call) == 1  # a new call fd is signalled once
        queue, notifier = device.queues[0]
        mem.write(0x20000, b"hello")
        driver.add([(0x20000, 5)], [])
        driver.publish()
        chain = queue.pop()
        assert chain is not None and chain.read_all() == b"hello"
        queue.push(chain.head, 0)
        notifier.call()
        assert os.eventfd_read(call) == 1
        fe.vring_kick(0)
        assert notifier.drain_kick() >= 1
        assert fe.get_vring_base(0) == 1
        del chain
        driver.close()
    finally:
        os.close(efd)
        os.close(call)


def _device_specific_requests(pair: Pair, uva: int) -> None:
    """Endianness, net, IOTLB, crypto and GPU requests."""
    fe, device = pair.fe, pair.device
    # CROSS_ENDIAN and ACCESS_PLATFORM are never offered: the front-end refuses to send
    # their requests, and the back-end, asked anyway, refuses them by the same table.
    with pytest.raises(UnsupportedRequestError, match="CROSS_ENDIAN"):
        fe.set_vring_endian(1, big=False)
    with pytest.raises(UnsupportedRequestError, match="ACCESS_PLATFORM"):
        fe.iotlb_msg(IotlbMsg(0x1000, 0x1000, uva + 0x1000, 3, 2))
    fe.check_features = False
    with pytest.raises(ReplyError):
        fe.set_vring_endian(1, big=False)
    assert fe.iotlb_msg(IotlbMsg(0x1000, 0x1000, uva + 0x1000, 3, 2)) == 1
    fe.check_features = True

    fe.send_rarp(b"\x52\x54\x00\x12\x34\x56")
    assert device.calls["rarp"] == b"\x52\x54\x00\x12\x34\x56"
    fe.net_set_mtu(1400)
    assert device.calls["mtu"] == 1400
    session = bytes(range(8)) * 4
    assert fe.create_crypto_session(session)[:8] == (42).to_bytes(8, "little")
    fe.close_crypto_session(42)
    assert device.calls["crypto_closed"] == 42
    r, w = os.pipe()
    try:
        fe.gpu_set_socket(r)
    finally:
        os.close(r)
        os.close(w)
    assert device.gpu_fd is not None


def _shared_object_and_device_state(pair: Pair) -> None:
    """GET_SHARED_OBJECT, and device state saved to and loaded from a pipe."""
    fe, device = pair.fe, pair.device
    fd = fe.get_shared_object(uuid.UUID(int=7))
    assert fd is not None
    assert os.pread(fd, 15, 0) == b"exported object"
    os.close(fd)
    assert fe.get_shared_object(uuid.UUID(int=8)) is None

    r, w = os.pipe()
    assert fe.set_device_state_fd(0, 0, w) is None
    os.close(w)
    assert _drain(r) == b"state:" + bytes(device.config)
    os.close(r)
    assert fe.check_device_state() == 0
    r, w = os.pipe()
    assert fe.set_device_state_fd(1, 0, r) is None
    os.close(r)
    os.write(w, b"restored")
    os.close(w)
    assert fe.check_device_state() == 0


def test_backend_errors_reach_the_frontend_as_nacks(pair: Pair) -> None:
    fe = pair.fe
    fe.negotiate()
    with pytest.raises(ReplyError, match="SET_VRING_NUM"):
        fe.set_vring_num(0, 3)
    with pytest.raises(ReplyError, match="SET_VRING_ADDR"):
        fe.set_vring_addr(VringAddr(5, 0, 0, 0, 0, 0))
    assert fe.get_queue_num() == 2, "the connection survives NACKed requests"
