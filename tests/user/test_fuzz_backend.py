"""Fuzzing BackendHandler with sequences of well-framed but hostile requests (hypothesis).

Contract under test: ``handle`` raises nothing but VhostError subclasses (the serve loop turns
those into a logged close); started rings survive whatever guest memory holds; and ``close``
releases every fd, every mapping of a memfd and every thread, whatever came before.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvhost.errors import GuestMemoryError, ProtocolError, VhostError, VirtqueueError
from pyvhost.testing import ConfigOnlyDevice
from pyvhost.user.backend import BackendHandler
from pyvhost.user.backend import state as backend_state
from pyvhost.user.connection import Frame, socketpair
from pyvhost.user.messages import (
    DEVICE_STATE_NOFD,
    FLAG_NEED_REPLY,
    FRONTEND_REQUESTS,
    U64,
    VERSION,
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
    Payload,
    ProtocolFeature,
    RawPayload,
    Request,
    SharedObject,
    VringAddr,
    VringState,
    close_fds,
    decode_header,
    encode_header,
    encode_request,
)
from pyvhost.user.protocol import HANDLER_PROTOCOL_FEATURES
from pyvhost.virtio import features as vf
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.split import split_layout

PF = ProtocolFeature
MEM_SIZE = 0x10000
UVA = 0x7F00_0000_0000
RING_GPA = 0x1000
QSIZE = 8
NUM_QUEUES = 2
FEATURES = (
    1 << vf.F_VERSION_1
    | 1 << vf.F_RING_EVENT_IDX
    | 1 << vf.F_RING_INDIRECT_DESC
    | 1 << vf.F_RING_PACKED
    | 1 << vf.F_ACCESS_PLATFORM
)
ALL_PF = HANDLER_PROTOCOL_FEATURES

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# -- observing the process --------------------------------------------------------------------


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def memfd_maps() -> collections.Counter[str]:
    """Mappings of memfds (guest memory, logs, inflight regions), by name."""
    with open("/proc/self/maps") as maps:
        return collections.Counter(
            line.split(None, 5)[5].strip() for line in maps if "/memfd:" in line
        )


def threads() -> set[threading.Thread]:
    return set(threading.enumerate())


# -- fds of every kind ------------------------------------------------------------------------


@dataclass
class FdFactory:
    """Makes the fds a hostile front-end sends, keeping the far ends it may hold open."""

    kept: list[int]

    def make(self, kind: str, size: int) -> int:
        if kind == "eventfd":
            return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        if kind == "memfd":
            fd = os.memfd_create("fuzz-fd", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            return fd
        if kind in ("pipe-r", "pipe-w"):
            r, w = os.pipe2(os.O_CLOEXEC)
            keep, send = (w, r) if kind == "pipe-r" else (r, w)
            self.kept.append(keep)
            return send
        if kind == "socket":
            a, b = socket.socketpair()
            self.kept.append(b.detach())
            return a.detach()
        return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        close_fds(self.kept)


FD_KIND = st.sampled_from(["eventfd", "memfd", "pipe-r", "pipe-w", "socket", "devnull"])
FD_SIZE = st.sampled_from([0, 1, 0x1000, 0x8000, MEM_SIZE, 0x20000])


# -- payload strategies -----------------------------------------------------------------------

U64_MAX = (1 << 64) - 1
ADDRS = st.sampled_from(
    [0, RING_GPA, MEM_SIZE - 16, MEM_SIZE, UVA, UVA + RING_GPA, UVA + MEM_SIZE - 16, UVA + MEM_SIZE]
) | st.integers(0, U64_MAX)
SIZES = st.sampled_from(
    [0, 1, 0x1000, MEM_SIZE, MEM_SIZE + 0x1000, 1 << 40, U64_MAX]
) | st.integers(0, U64_MAX)
OFFSETS = st.sampled_from([0, 0x1000, 0x8000, MEM_SIZE, 1 << 63]) | st.integers(0, U64_MAX)
U32 = st.sampled_from([0, 1, 2, 3, 8, 0x8000, 0xFFFF, 0x10000, 0x8000_8000]) | st.integers(
    0, 0xFFFF_FFFF
)
INDEX = st.sampled_from([0, 1, 2, 255]) | st.integers(0, 0xFFFF_FFFF)
U16 = st.sampled_from([0, 1, 2, 8, 0xFFFF]) | st.integers(0, 0xFFFF)


def _aligned(align: int) -> st.SearchStrategy[int]:
    return ADDRS.map(lambda v: v - v % align)


REGION = st.builds(MemoryRegion, ADDRS, SIZES, ADDRS, OFFSETS) | st.builds(
    MemoryRegion,
    st.sampled_from([0, 0x8000, MEM_SIZE, 0x100000]),
    st.sampled_from([0x1000, MEM_SIZE, 0x20000]),
    st.sampled_from([UVA, UVA + 0x8000, UVA + MEM_SIZE, UVA + 0x100000]),
    st.sampled_from([0, 0x1000, 0x8000, MEM_SIZE, 0x20000]),
)


def _regions_ok(regions: list[MemoryRegion]) -> bool:
    try:
        MemoryTable.decode(MemoryTable(tuple(regions)).encode(), request="fuzz")
    except ProtocolError:
        return False
    return True


PAYLOADS: dict[type[Payload], st.SearchStrategy[Payload]] = {
    Empty: st.just(Empty()),
    U64: st.builds(
        U64, st.sampled_from([0, 1, 2, VRING_NOFD, VRING_NOFD | 1]) | st.integers(0, U64_MAX)
    ),
    VringState: st.builds(VringState, INDEX, U32),
    VringAddr: st.builds(
        VringAddr, INDEX, st.sampled_from([0, 1]), _aligned(16), _aligned(4), _aligned(2), ADDRS
    ),
    MemoryTable: st.lists(REGION, max_size=3)
    .filter(_regions_ok)
    .map(lambda r: MemoryTable(tuple(r))),
    MemRegMsg: st.builds(MemRegMsg, REGION),
    Log: st.builds(Log, SIZES, OFFSETS),
    IotlbMsg: st.builds(IotlbMsg, ADDRS, SIZES, ADDRS, st.integers(0, 3), st.integers(1, 6)),
    Config: st.builds(
        lambda off, flags, data: Config(min(off, 256 - len(data)), flags, data),
        st.integers(0, 256),
        st.sampled_from([0, 1]),
        st.binary(max_size=64),
    ),
    Inflight: st.builds(Inflight, SIZES, OFFSETS, U16, U16),
    SharedObject: st.builds(SharedObject, st.uuids()),
    DeviceStateTransfer: st.builds(DeviceStateTransfer, st.sampled_from([0, 1]), st.just(0)),
    RawPayload: st.builds(RawPayload, st.binary(max_size=64)),
}


@dataclass
class Step:
    """One request to send: what, with which fields and flags, and which fds."""

    request: Request
    payload: Payload
    need_reply: bool
    fds: list[tuple[str, int]]


def _fd_count(request: Request, payload: Payload) -> int:
    if isinstance(payload, MemoryTable):
        return len(payload.regions)
    if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        assert isinstance(payload, U64)
        return 0 if payload.value & VRING_NOFD else 1
    return FRONTEND_REQUESTS[request].fds[1]


@st.composite
def steps(draw: st.DrawFn) -> Step:
    request = draw(st.sampled_from(list(FRONTEND_REQUESTS)))
    spec = FRONTEND_REQUESTS[request]
    payload = draw(PAYLOADS[spec.payload])
    count = _fd_count(request, payload)
    if draw(st.integers(0, 9)) == 0:
        count = max(0, count + draw(st.sampled_from([-1, 1])))
    fds = draw(st.lists(st.tuples(FD_KIND, FD_SIZE), min_size=count, max_size=count))
    return Step(request, payload, draw(st.booleans()), fds)


# -- the harness ------------------------------------------------------------------------------


class Harness:
    """A handler over a socketpair; guest memory the test owns; replies drained and closed."""

    def __init__(self, ring_bytes: bytes) -> None:
        self.device = ConfigOnlyDevice(
            bytes(range(60)),
            num_queues=NUM_QUEUES,
            max_queue_size=256,
            features=FEATURES,
            protocol_features=ALL_PF,
            writable_config=True,
        )
        self.fe, be = socketpair()
        self.handler = BackendHandler(self.device, be, name="fuzz")
        self.mem = GuestMemory.anonymous(MEM_SIZE, 0, UVA)
        pattern = (ring_bytes or b"\0") * (MEM_SIZE // max(1, len(ring_bytes)) + 1)
        self.mem.write(0, pattern[:MEM_SIZE])
        self.factory = FdFactory([])
        self.errors: list[VhostError] = []

    @property
    def guest_fd(self) -> int:
        fd = self.mem.regions[0].fd
        assert fd is not None
        return fd

    def send_raw(
        self, request: Request, payload: Payload, fds: list[int], need_reply: bool
    ) -> bool:
        """Frame one request as the socket would deliver it; handle it; False once closed."""
        body = payload.encode()
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        header = decode_header(encode_header(request, flags, len(body)))
        try:
            self.handler.handle(Frame(header, body, fds))
        except VhostError as exc:
            assert str(exc), "errors must say what went wrong"
            self.errors.append(exc)
            return False
        finally:
            self.drain()
        return True

    def send(self, step: Step) -> bool:
        fds = [self.factory.make(kind, size) for kind, size in step.fds]
        if (
            step.request in (Request.SET_MEM_TABLE, Request.ADD_MEM_REG)
            and fds
            and step.fds[0][0] == "memfd"
            and step.fds[0][1] == MEM_SIZE
        ):
            os.close(fds[0])
            fds[0] = os.dup(self.guest_fd)  # sometimes the real guest memory
        return self.send_raw(step.request, step.payload, fds, step.need_reply)

    def request(
        self, request: Request, payload: Payload | None = None, fds: tuple[int, ...] = ()
    ) -> None:
        msg = encode_request(request, payload, fds=[os.dup(fd) for fd in fds])
        assert self.send_raw(request, msg.payload, msg.fds, False), self.errors[-1]

    def drain(self) -> None:
        while select.select([self.fe.socket], [], [], 0)[0]:
            try:
                frame = self.fe.recv_frame(1)
            except (VhostError, TimeoutError):
                return
            close_fds(frame.fds)

    def setup(self, packed: bool) -> None:
        """Negotiate everything and start ring 0 over the guest memory, as QEMU would."""
        acked = FEATURES & ~(1 << vf.F_ACCESS_PLATFORM) | 1 << 30
        if not packed:
            acked &= ~(1 << vf.F_RING_PACKED)
        self.request(Request.SET_OWNER)
        self.request(Request.SET_PROTOCOL_FEATURES, U64(ALL_PF & ~(1 << PF.INBAND_NOTIFICATIONS)))
        self.request(Request.SET_FEATURES, U64(acked))
        self.request(
            Request.ADD_MEM_REG, MemRegMsg(MemoryRegion(0, MEM_SIZE, UVA, 0)), (self.guest_fd,)
        )
        desc, avail, used, _ = split_layout(QSIZE, RING_GPA)
        self.request(Request.SET_VRING_NUM, VringState(0, QSIZE))
        self.request(
            Request.SET_VRING_ADDR, VringAddr(0, 0, UVA + desc, UVA + used, UVA + avail, 0)
        )
        kick = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            self.request(Request.SET_VRING_KICK, U64(0), (kick,))
        finally:
            os.close(kick)
        assert 0 in self.device.queues

    def exercise_rings(self) -> None:
        """Pop from every started ring: hostile ring contents may only raise the ring errors."""
        for queue, _ in list(self.device.queues.values()):
            try:
                for chain in queue.pop_batch(4):
                    queue.push(chain.head, min(chain.write_len, 1))
            except (VirtqueueError, GuestMemoryError):
                pass

    def close(self) -> None:
        self.handler.close()
        self.fe.close()
        self.factory.close()
        self.mem.close()


@pytest.fixture
def clean_process() -> Iterator[None]:
    """Fail if the test leaves fds, memfd mappings or threads behind."""
    fds, maps, live = open_fds(), memfd_maps(), threads()
    yield
    assert open_fds() - fds == set(), "fds leaked"
    assert memfd_maps() - maps == collections.Counter(), "memfd mappings leaked"
    assert {t for t in threads() - live if t.is_alive()} == set(), "threads left running"


def _run(ring_bytes: bytes, setup: int, sequence: list[Step], keep_going: bool) -> None:
    fds, maps, live = open_fds(), memfd_maps(), threads()
    h = Harness(ring_bytes)
    try:
        if setup:
            h.setup(packed=setup == 2)
        else:
            h.request(Request.SET_PROTOCOL_FEATURES, U64(1 << PF.REPLY_ACK))
        for step in sequence:
            if not h.send(step):
                event(f"raised on {step.request.name}")
                if not keep_going:
                    break  # the serve loop would close the connection here
            h.exercise_rings()
        event(f"rings started at the end: {len(h.device.queues)}")
    finally:
        h.close()
    assert h.handler.closed
    leaked = open_fds() - fds
    assert not leaked, f"fds leaked: {sorted(leaked)}"
    assert memfd_maps() - maps == collections.Counter(), "memfd mappings left after close()"
    running = {t for t in threads() - live if t.is_alive()}
    assert not running, f"threads left running after close(): {running}"


@FUZZ
@given(
    ring_bytes=st.binary(min_size=1, max_size=64),
    setup=st.integers(0, 2),
    sequence=st.lists(steps(), max_size=12),
    keep_going=st.booleans(),
)
def test_random_request_sequences(
    monkeypatch: pytest.MonkeyPatch,
    ring_bytes: bytes,
    setup: int,
    sequence: list[Step],
    keep_going: bool,
) -> None:
    """``keep_going``: go on after handle() raised, so the state left by a failure is fuzzed too.

    CHECK_DEVICE_STATE waits for a transfer the far end of the pipe never serves: 0.2 s here.
    """
    monkeypatch.setattr(backend_state, "DEVICE_STATE_TIMEOUT", 0.2)
    _run(ring_bytes, setup, sequence, keep_going)


# -- the nasty ones, one by one ----------------------------------------------------------------


@pytest.fixture
def h(clean_process: None) -> Iterator[Harness]:
    harness = Harness(b"\0")
    yield harness
    harness.close()


def _memfd(size: int) -> int:
    fd = os.memfd_create("fuzz-fd", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def nack(h: Harness, request: Request, payload: Payload, fds: list[int]) -> str:
    """Send with NEED_REPLY (REPLY_ACK negotiated): expect a NACK and a logged reason."""
    body = payload.encode()
    header = decode_header(encode_header(request, VERSION | FLAG_NEED_REPLY, len(body)))
    h.handler.handle(Frame(header, body, fds))
    reply = h.fe.recv_reply(request, 1)
    close_fds(reply.fds)
    assert reply.payload == U64(1), f"{request.name} should have failed"
    return request.name


def test_mem_table_region_bigger_than_the_memfd(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.setup(packed=False)
    table = MemoryTable((MemoryRegion(0, 0x20000, UVA, 0),))
    nack(h, Request.SET_MEM_TABLE, table, [_memfd(0x1000)])
    assert "cannot mmap" in caplog.text
    assert len(h.handler.mem) == 1, "the old table stays"
    assert 0 in h.device.queues, "the running ring was not disturbed"


def test_mmap_offset_past_the_end(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.setup(packed=False)
    region = MemoryRegion(0x100000, 0x1000, UVA + 0x100000, 0x10000)
    nack(h, Request.ADD_MEM_REG, MemRegMsg(region), [_memfd(0x1000)])
    assert "cannot mmap" in caplog.text
    assert len(h.handler.mem) == 1


def test_overlapping_add_mem_reg(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.setup(packed=False)
    region = MemoryRegion(0x8000, 0x10000, UVA + 0x100000, 0)
    nack(h, Request.ADD_MEM_REG, MemRegMsg(region), [_memfd(0x10000)])
    assert "overlaps" in caplog.text
    assert 0 in h.device.queues


def test_a_region_added_again_is_kept_once_and_removed_as_often(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """QEMU 7.2 sends ADD_MEM_REG (and REM_MEM_REG) once per vhost device: a multiqueue net
    device has one per queue pair, all on one connection."""
    caplog.set_level(logging.INFO, "pyvhost.backend")
    h.setup(packed=False)
    region = MemRegMsg(MemoryRegion(0, MEM_SIZE, UVA, 0))
    h.request(Request.ADD_MEM_REG, region, (h.guest_fd,))
    h.request(Request.ADD_MEM_REG, region, (h.guest_fd,))
    assert len(h.handler.mem) == 1 and 0 in h.device.queues
    assert "memory region added again, kept once" in caplog.text
    h.request(Request.REM_MEM_REG, region)
    h.request(Request.REM_MEM_REG, region)
    assert len(h.handler.mem) == 1 and 0 in h.device.queues, "still mapped once"
    assert "memory region removed once of 3" in caplog.text
    h.request(Request.REM_MEM_REG, region)
    assert len(h.handler.mem) == 0
    nack(h, Request.REM_MEM_REG, region, [])
    assert "no memory region with gpa 0x0" in caplog.text


def test_rem_mem_reg_of_an_unknown_region_is_refused(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.setup(packed=False)
    nack(h, Request.REM_MEM_REG, MemRegMsg(MemoryRegion(0, MEM_SIZE, UVA + 0x1000, 0)), [])
    assert "no memory region with gpa 0x0" in caplog.text
    assert len(h.handler.mem) == 1 and 0 in h.device.queues, "nothing was lost"


def test_mem_table_without_the_rings_stops_only_that_ring(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.setup(packed=False)
    fd = _memfd(0x1000)
    h.request(
        Request.SET_MEM_TABLE,
        MemoryTable((MemoryRegion(0x100000, 0x1000, UVA + 0x100000, 0),)),
        (fd,),
    )
    os.close(fd)
    assert 0 not in h.device.queues
    assert "vring 0" in caplog.text and "stopped" in caplog.text


def test_vring_addr_outside_memory_then_kick(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.setup(packed=False)
    h.request(Request.SET_VRING_NUM, VringState(1, QSIZE))
    far = UVA + 0x100000
    h.request(Request.SET_VRING_ADDR, VringAddr(1, 0, far, far + 0x200, far + 0x100, 0))
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    nack(h, Request.SET_VRING_KICK, U64(1), [kick])
    assert "vring 1" in caplog.text and "not inside one memory region" in caplog.text
    assert 1 not in h.device.queues and 0 in h.device.queues


@pytest.mark.parametrize("num", [0, 3, 65536, 512])
def test_set_vring_num_bad_sizes(h: Harness, num: int, caplog: pytest.LogCaptureFixture) -> None:
    h.setup(packed=False)
    nack(h, Request.SET_VRING_NUM, VringState(1, num), [])
    assert f"size {num} is not a power of 2" in caplog.text


def test_set_log_base_with_a_tiny_log(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.setup(packed=False)
    body = Log(0x1000, 0).encode()
    header = decode_header(encode_header(Request.SET_LOG_BASE, VERSION, len(body)))
    h.handler.handle(Frame(header, body, [_memfd(16)]))
    reply = h.fe.recv_reply(Request.SET_LOG_BASE, 1)
    assert reply.payload == U64(1)
    assert "dirty log" in caplog.text


def test_set_inflight_fd_wrong_size(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.request(Request.SET_PROTOCOL_FEATURES, U64(ALL_PF & ~(1 << PF.INBAND_NOTIFICATIONS)))
    nack(h, Request.SET_INFLIGHT_FD, Inflight(0x10, 0, 2, 8), [_memfd(0x1000)])
    assert "mmap_size 16 does not match" in caplog.text


def test_get_vring_base_on_a_never_started_ring(h: Harness) -> None:
    h.request(Request.SET_OWNER)
    body = VringState(1, 0).encode()
    header = decode_header(encode_header(Request.GET_VRING_BASE, VERSION, len(body)))
    h.handler.handle(Frame(header, body, []))
    assert h.fe.recv_reply(Request.GET_VRING_BASE, 1).payload == VringState(1, 0)


def test_set_features_with_bits_not_offered(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.request(Request.SET_PROTOCOL_FEATURES, U64(1 << PF.REPLY_ACK))
    nack(h, Request.SET_FEATURES, U64(1 << 63), [])
    assert "were not offered" in caplog.text


@pytest.mark.parametrize("kind", ["eventfd", "memfd", "devnull"])
def test_set_device_state_fd_needs_a_pipe(
    h: Harness, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    h.request(Request.SET_PROTOCOL_FEATURES, U64(ALL_PF & ~(1 << PF.INBAND_NOTIFICATIONS)))
    body = DeviceStateTransfer(1, 0).encode()
    header = decode_header(encode_header(Request.SET_DEVICE_STATE_FD, VERSION, len(body)))
    h.handler.handle(Frame(header, body, [h.factory.make(kind, 0x1000)]))
    reply = h.fe.recv_reply(Request.SET_DEVICE_STATE_FD, 1)
    assert reply.payload == U64(DEVICE_STATE_NOFD | 1)
    assert "not a pipe" in caplog.text


def test_device_state_load_from_a_peer_that_vanishes(h: Harness) -> None:
    """The front-end keeps the pipe's write end and never writes: close() must not hang or leak."""
    h.request(Request.SET_PROTOCOL_FEATURES, U64(ALL_PF & ~(1 << PF.INBAND_NOTIFICATIONS)))
    h.device.load_state = lambda data: None  # type: ignore[method-assign]
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        h.request(Request.SET_DEVICE_STATE_FD, DeviceStateTransfer(1, 0), (r,))
        os.close(r)
        h.handler.close()
    finally:
        os.close(w)


def test_system_errors_without_reply_ack_raise_a_vhost_error(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A ValueError from the ring constructor (a gpa misaligned although the uva is aligned,
    because the region maps uva and gpa 8 bytes apart) leaves handle() as a ProtocolError."""
    h.request(Request.SET_PROTOCOL_FEATURES, U64(1 << PF.CONFIGURE_MEM_SLOTS))
    h.request(Request.ADD_MEM_REG, MemRegMsg(MemoryRegion(0, MEM_SIZE, UVA + 8, 0)), (h.guest_fd,))
    h.request(Request.SET_VRING_NUM, VringState(0, QSIZE))
    desc, avail, used, _ = split_layout(QSIZE, RING_GPA)
    h.request(Request.SET_VRING_ADDR, VringAddr(0, 0, UVA + desc, UVA + used, UVA + avail, 0))
    body = U64(0).encode()
    header = decode_header(encode_header(Request.SET_VRING_KICK, VERSION, len(body)))
    with pytest.raises(ProtocolError, match=r"SET_VRING_KICK: .*not 16-byte aligned") as info:
        h.handler.handle(Frame(header, body, [os.eventfd(0, os.EFD_CLOEXEC)]))
    assert isinstance(info.value.__cause__, ValueError)
    assert "closing the connection" in caplog.text


def test_every_request_before_set_owner(h: Harness) -> None:
    """Nothing before SET_OWNER crashes: each request succeeds or fails with a VhostError."""
    for request, spec in FRONTEND_REQUESTS.items():
        fresh = Harness(b"\0")
        try:
            fds = [fresh.factory.make("eventfd", 0) for _ in range(spec.fds[0])]
            examples: dict[type[Payload], Payload] = {
                VringState: VringState(0, 0),
                U64: U64(0),
                MemoryTable: MemoryTable(()),
                Config: Config(0, 0, bytes(4)),
                Inflight: Inflight(0, 0, 1, 8),
                SharedObject: SharedObject(uuid.UUID(int=1)),
                DeviceStateTransfer: DeviceStateTransfer(0, 0),
                RawPayload: RawPayload(b""),
                Log: Log(0x1000, 0),
                IotlbMsg: IotlbMsg(0, 0x1000, 0, 3, 2),
                MemRegMsg: MemRegMsg(MemoryRegion(0, 0x1000, UVA, 0)),
                VringAddr: VringAddr(0, 0, UVA, UVA, UVA, 0),
            }
            example = examples.get(spec.payload, Empty())
            if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
                close_fds(fds)
                example = U64(VRING_NOFD)
            fresh.send_raw(request, example, fds, False)
        finally:
            fresh.close()
