"""Frontend against a scripted fake back-end on a socketpair: request encoding, REPLY_ACK,
reply checks (flags, request, size, timeout) that close the Frontend, and feature gates."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest

from pyvhost.errors import (
    ConnectionClosedError,
    ProtocolError,
    ReplyError,
    UnsupportedRequestError,
)
from pyvhost.user.channel import BackendRequestHandler, Channel
from pyvhost.user.connection import Connection, socketpair
from pyvhost.user.frontend import Frontend, decode_log_base_reply
from pyvhost.user.messages import (
    DEVICE_STATE_NOFD,
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    U64,
    VRING_NOFD,
    Config,
    Empty,
    Header,
    Inflight,
    IotlbMsg,
    Log,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    Message,
    Negotiation,
    ProtocolFeature,
    Request,
    ShmemConfig,
    VringAddr,
    VringState,
    encode_header,
    encode_reply,
)
from pyvhost.virtio import features as vf

PF = ProtocolFeature
FEATURES = 1 << 32 | 1 << F_PROTOCOL_FEATURES | 1 << 1
ALL_PF = sum(1 << f for f in PF if f not in (PF.XEN_MMAP, 20, 21))
REGION = MemoryRegion(0, 0x10000, 0x7F0000000000, 0)

Out = Message | bytes
Script = Callable[[Message], list[Out] | None]


def _ack(msg: Message) -> list[Out]:
    return [encode_reply(msg.request, U64(0))] if msg.need_reply else []


class FakeBackend:
    """Answers front-end requests from a script; records every request it received.

    The default script behaves like a small healthy back-end; ``override`` replaces the answer
    for one request (raw bytes allowed, to send wrong replies).
    """

    def __init__(self, conn: Connection, features: int = FEATURES, protocol: int = ALL_PF) -> None:
        self.conn = conn
        self.features = features
        self.protocol = protocol
        self.received: list[Message] = []
        self.fds_seen: list[int] = []
        self.override: dict[Request, Script] = {}
        self.kept_fds: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def requests(self) -> list[Request]:
        return [Request(m.request) for m in self.received]

    def _default(self, msg: Message) -> list[Out]:
        r = msg.request
        answers: dict[Request, Callable[[], Message]] = {
            Request.GET_FEATURES: lambda: encode_reply(r, U64(self.features)),
            Request.GET_PROTOCOL_FEATURES: lambda: encode_reply(r, U64(self.protocol)),
            Request.GET_QUEUE_NUM: lambda: encode_reply(r, U64(4)),
            Request.GET_MAX_MEM_SLOTS: lambda: encode_reply(r, U64(16)),
            Request.GET_STATUS: lambda: encode_reply(r, U64(0xF)),
            Request.GET_VRING_BASE: lambda: encode_reply(
                r, VringState(msg.payload_as(VringState).index, 7)
            ),
            Request.GET_CONFIG: lambda: encode_reply(
                r,
                Config(
                    msg.payload_as(Config).offset,
                    0,
                    bytes(range(len(msg.payload_as(Config).data))),
                ),
            ),
            Request.IOTLB_MSG: lambda: encode_reply(r, U64(0)),
            Request.POSTCOPY_END: lambda: encode_reply(r, U64(0)),
            Request.CHECK_DEVICE_STATE: lambda: encode_reply(r, U64(0)),
            Request.GET_SHMEM_CONFIG: lambda: encode_reply(r, ShmemConfig((0x1000, 0, 0x2000))),
        }
        if r in answers:
            return [answers[Request(r)]()]
        return _ack(msg)

    def _run(self) -> None:
        while True:
            try:
                msg = self.conn.recv_request(timeout=30)
            except (ConnectionClosedError, ProtocolError, OSError):
                return
            self.received.append(msg)
            self.fds_seen.append(len(msg.fds))
            script = self.override.get(Request(msg.request), self._default)
            try:
                outs = script(msg) or []
                for out in outs:
                    if isinstance(out, Message):
                        self.conn.send(out)
                    else:
                        self.conn.send_bytes(out)
            except OSError:
                return
            finally:
                for fd in msg.fds:
                    if fd not in self.kept_fds:
                        os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.socket.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self.conn.close()
        for fd in self.kept_fds:
            os.close(fd)


@pytest.fixture
def pair() -> Iterator[tuple[Frontend, FakeBackend]]:
    a, b = socketpair()
    fe = Frontend(a, reply_timeout=2.0)
    be = FakeBackend(b)
    yield fe, be
    fe.close()
    be.close()


def _negotiated(fe: Frontend, protocol: int = ALL_PF) -> None:
    fe.get_features()
    fe.get_protocol_features()
    fe.set_protocol_features(protocol)


def _sync(fe: Frontend) -> None:
    """A round trip, so every request sent before it has been seen by the fake back-end."""
    fe.get_features()


# --- basic requests --------------------------------------------------------------------------


def test_get_features_and_flags(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    assert fe.get_features() == FEATURES
    assert fe.offered_features == FEATURES
    assert be.received[0].flags == 1  # version 1, no NEED_REPLY


def test_requests_without_reply_ack_do_not_wait(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe, ALL_PF & ~(1 << PF.REPLY_ACK))
    fe.set_vring_num(1, 256)
    fe.set_features(1 << 32)
    _sync(fe)
    sent = {Request(m.request): m for m in be.received}
    assert not sent[Request.SET_VRING_NUM].need_reply
    assert sent[Request.SET_VRING_NUM].payload == VringState(1, 256)
    assert sent[Request.SET_FEATURES].payload == U64(1 << 32)
    assert fe.features == 1 << 32


def test_reply_ack_sets_need_reply_and_nack_raises(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe)
    assert fe.reply_ack
    fe.set_owner()
    assert be.received[-1].need_reply
    be.override[Request.SET_VRING_ENABLE] = lambda m: [encode_reply(m.request, U64(5))]
    with pytest.raises(ReplyError, match=r"SET_VRING_ENABLE.*5"):
        fe.set_vring_enable(0, True)
    assert not fe.closed  # a NACK is an answer, not a wrong reply
    assert fe.get_queue_num() == 4


def test_requests_with_own_reply_never_get_need_reply(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe)
    assert fe.get_vring_base(3) == 7
    assert fe.get_config(4, 8) == bytes(range(8))
    assert not any(m.need_reply for m in be.received)


@pytest.mark.parametrize(
    ("what", "raw"),
    [
        ("flags", encode_header(Request.GET_FEATURES, 0x1, 8) + bytes(8)),  # REPLY bit missing
        ("flags", encode_header(Request.GET_FEATURES, 0xD, 8) + bytes(8)),  # NEED_REPLY too
        ("request", encode_header(Request.GET_QUEUE_NUM, 0x5, 8) + bytes(8)),
        ("size", encode_header(Request.GET_FEATURES, 0x5, 4) + bytes(4)),
    ],
)
def test_wrong_reply_raises_and_closes(
    pair: tuple[Frontend, FakeBackend], what: str, raw: bytes
) -> None:
    fe, be = pair
    be.override[Request.GET_FEATURES] = lambda m: [raw]
    with pytest.raises(ProtocolError, match="GET_FEATURES") as info:
        fe.get_features()
    assert info.value.field == what
    assert fe.closed
    with pytest.raises(ConnectionClosedError, match="wrong reply to GET_FEATURES"):
        fe.get_features()


def test_wrong_ack_payload_raises_and_closes(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe)
    be.override[Request.SET_OWNER] = lambda m: [encode_header(Request.SET_OWNER, 0x5, 0)]
    with pytest.raises(ProtocolError, match="SET_OWNER"):
        fe.set_owner()
    assert fe.closed


def test_reply_for_another_vring_raises(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    be.override[Request.GET_VRING_BASE] = lambda m: [encode_reply(m.request, VringState(1, 0))]
    with pytest.raises(ProtocolError, match="vring 1, asked 0"):
        fe.get_vring_base(0)
    assert fe.closed


def test_timeout_raises_and_closes() -> None:
    a, b = socketpair()
    fe = Frontend(a, reply_timeout=0.2)
    be = FakeBackend(b)
    be.override[Request.GET_FEATURES] = lambda m: []
    try:
        with pytest.raises(TimeoutError, match=r"GET_FEATURES.*0\.2 s"):
            fe.get_features()
        assert fe.closed
    finally:
        fe.close()
        be.close()


def test_peer_hang_up_raises_connection_closed() -> None:
    a, b = socketpair()
    fe = Frontend(a, reply_timeout=2)
    b.close()
    with pytest.raises(ConnectionClosedError):
        fe.get_features()
    assert fe.closed
    fe.close()


# --- gates -----------------------------------------------------------------------------------


def test_protocol_features_need_get_features_first(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    with pytest.raises(UnsupportedRequestError, match="get_features"):
        fe.get_protocol_features()
    assert be.received == []


def test_protocol_features_need_bit_30() -> None:
    a, b = socketpair()
    fe = Frontend(a, reply_timeout=2)
    be = FakeBackend(b, features=1 << 32)
    try:
        fe.get_features()
        with pytest.raises(UnsupportedRequestError, match=r"bit 30"):
            fe.get_protocol_features()
        with pytest.raises(UnsupportedRequestError, match=r"SET_VRING_ENABLE.*bit 30"):
            fe.set_vring_enable(0, True)
        assert be.requests() == [Request.GET_FEATURES]
    finally:
        fe.close()
        be.close()


@pytest.mark.parametrize(
    ("call", "feature"),
    [
        (lambda fe: fe.get_queue_num(), "MQ"),
        (lambda fe: fe.get_max_mem_slots(), "CONFIGURE_MEM_SLOTS"),
        (lambda fe: fe.add_mem_reg(REGION, 0), "CONFIGURE_MEM_SLOTS"),
        (lambda fe: fe.rem_mem_reg(REGION), "CONFIGURE_MEM_SLOTS"),
        (lambda fe: fe.get_config(0, 8), "CONFIG"),
        (lambda fe: fe.set_config(0, b"x"), "CONFIG"),
        (lambda fe: fe.set_backend_req_fd(), "BACKEND_REQ"),
        (lambda fe: fe.get_inflight_fd(1, 8), "INFLIGHT_SHMFD"),
        (lambda fe: fe.reset_device(), "RESET_DEVICE"),
        (lambda fe: fe.vring_kick(0), "INBAND_NOTIFICATIONS"),
        (lambda fe: fe.set_status(1), "STATUS"),
        (lambda fe: fe.get_shared_object(uuid.uuid4()), "SHARED_OBJECT"),
        (lambda fe: fe.check_device_state(), "DEVICE_STATE"),
        (lambda fe: fe.get_shmem_config(), "SHMEM"),
        (lambda fe: fe.postcopy_advise(), "PAGEFAULT"),
        (lambda fe: fe.send_rarp(b"\x52\x54\0\0\0\1"), "RARP"),
        (lambda fe: fe.net_set_mtu(1500), "MTU"),
        (lambda fe: fe.set_vring_endian(0, True), "CROSS_ENDIAN"),
        (lambda fe: fe.create_crypto_session(b"x"), "CRYPTO_SESSION"),
        (lambda fe: fe.set_log_base(4096, 0, 0), "LOG_SHMFD"),
    ],
)
def test_gated_requests_raise_before_sending(
    pair: tuple[Frontend, FakeBackend], call: Callable[[Frontend], object], feature: str
) -> None:
    fe, be = pair
    _negotiated(fe, 0)
    with pytest.raises(UnsupportedRequestError, match=rf"{feature} \(bit \d+\) was not negotiated"):
        call(fe)
    _sync(fe)
    assert be.requests() == [
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.SET_PROTOCOL_FEATURES,
        Request.GET_FEATURES,
    ]
    assert not fe.closed


def test_iotlb_needs_access_platform_acked(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    be.features = FEATURES | 1 << vf.F_ACCESS_PLATFORM
    fe.get_features()
    msg = IotlbMsg(0x1000, 0x1000, 0x7F0000000000, 3, 2)
    with pytest.raises(UnsupportedRequestError, match="ACCESS_PLATFORM"):
        fe.iotlb_msg(msg)
    fe.set_features(1 << 32 | 1 << vf.F_ACCESS_PLATFORM)
    assert fe.iotlb_msg(msg) == 0


def test_set_features_rejects_features_not_offered(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, _ = pair
    fe.get_features()
    with pytest.raises(UnsupportedRequestError, match=r"0x4 were not offered"):
        fe.set_features(FEATURES | 1 << 2)
    fe.get_protocol_features()
    with pytest.raises(UnsupportedRequestError, match="were not offered"):
        fe.set_protocol_features(1 << 25)


def test_check_features_off_sends_anyway(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    fe.check_features = False
    assert fe.get_queue_num() == 4
    assert be.requests() == [Request.GET_QUEUE_NUM]


def test_vring_index_out_of_range_is_a_value_error(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, _ = pair
    with pytest.raises(ValueError, match=r"SET_VRING_CALL: vring index 256"):
        fe.set_vring_call(256, None)


# --- request encoding and reply handling -----------------------------------------------------


def test_vring_fds_and_nofd(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe, 0)
    efd = os.eventfd(0)
    try:
        fe.set_vring_kick(2, efd)
        fe.set_vring_call(2, None)
        fe.set_vring_err(3, efd)
        _sync(fe)
    finally:
        os.close(efd)
    kick, call, err = be.received[3:6]
    assert (kick.payload, be.fds_seen[3]) == (U64(2), 1)
    assert (call.payload, be.fds_seen[4]) == (U64(2 | VRING_NOFD), 0)
    assert (err.payload, be.fds_seen[5]) == (U64(3), 1)


def test_negotiate_follows_qemu_order(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    result = fe.negotiate(features_mask=1 << 32)
    assert be.requests() == [
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.SET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_MAX_MEM_SLOTS,
        Request.SET_BACKEND_REQ_FD,
        Request.SET_OWNER,
    ]
    assert result.offered_features == FEATURES
    assert result.features == 1 << 32 | 1 << F_PROTOCOL_FEATURES
    assert result.protocol_features == ALL_PF
    assert (result.queue_num, result.max_mem_slots) == (4, 16)
    assert result.backend_handler is fe.backend_handler is not None
    assert be.fds_seen[5] == 1
    assert be.received[5].need_reply and be.received[6].need_reply


def test_negotiate_masks_protocol_features_and_inband_needs_its_partners(
    pair: tuple[Frontend, FakeBackend],
) -> None:
    fe, be = pair
    mask = 1 << PF.INBAND_NOTIFICATIONS | 1 << PF.REPLY_ACK | 1 << PF.XEN_MMAP
    result = fe.negotiate(protocol_mask=mask, set_owner=False)
    assert result.protocol_features == 1 << PF.REPLY_ACK
    _sync(fe)
    assert be.requests()[2] == Request.SET_PROTOCOL_FEATURES
    assert be.received[2].payload == U64(1 << PF.REPLY_ACK)


def test_negotiate_without_protocol_features(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    be.features = 1 << 32
    result = fe.negotiate()
    _sync(fe)
    assert be.requests() == [Request.GET_FEATURES, Request.SET_OWNER, Request.GET_FEATURES]
    assert result.offered_protocol_features == 0
    assert result.queue_num is None


def test_setup_memory_uses_add_mem_reg_with_mem_slots(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    fe.negotiate(set_owner=False)
    fd = os.memfd_create("t")
    try:
        second = MemoryRegion(0x10000, 0x10000, 0x7F0000010000, 0)
        fe.setup_memory([(REGION, fd), (second, fd)])
    finally:
        os.close(fd)
    adds = [m for m in be.received if m.request == Request.ADD_MEM_REG]
    assert [m.payload for m in adds] == [MemRegMsg(REGION), MemRegMsg(second)]
    assert all(m.need_reply for m in adds)


def test_setup_memory_uses_set_mem_table_otherwise(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe, 0)
    fd = os.memfd_create("t")
    try:
        fe.setup_memory([(REGION, fd)])
        _sync(fe)
    finally:
        os.close(fd)
    assert be.received[3].payload == MemoryTable((REGION,))
    assert be.fds_seen[3] == 1


def test_start_vring_order(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe, 0)
    addr = VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0)
    fe.start_vring(1, 128, addr, 5, None, None)
    _sync(fe)
    assert be.requests()[3:9] == [
        Request.SET_VRING_NUM,
        Request.SET_VRING_BASE,
        Request.SET_VRING_ADDR,
        Request.SET_VRING_KICK,
        Request.SET_VRING_CALL,
        Request.SET_VRING_ENABLE,
    ]
    assert be.received[4].payload == VringState(1, 5)
    assert be.received[5].payload == addr
    assert be.received[8].payload == VringState(1, 1)


def test_get_config_empty_reply_is_reply_error(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe)
    be.override[Request.GET_CONFIG] = lambda m: [encode_reply(m.request, Empty())]
    with pytest.raises(ReplyError, match=r"GET_CONFIG.*empty reply"):
        fe.get_config(0, 60)
    assert not fe.closed


def test_get_config_short_reply(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe)
    be.override[Request.GET_CONFIG] = lambda m: [encode_reply(m.request, Config(0, 0, b"abcd"))]
    assert fe.get_config(0, 8, exact=False) == b"abcd"
    with pytest.raises(ProtocolError, match="size 4, asked offset 0 size 8"):
        fe.get_config(0, 8)
    assert fe.closed


def test_get_inflight_fd_returns_fd(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe)
    memfd = os.memfd_create("inflight")
    os.ftruncate(memfd, 4096)
    be.kept_fds.append(memfd)
    be.override[Request.GET_INFLIGHT_FD] = lambda m: [
        encode_reply(m.request, Inflight(4096, 0, 2, 8), fds=[memfd])
    ]
    inflight, fd = fe.get_inflight_fd(2, 8)
    assert inflight == Inflight(4096, 0, 2, 8)
    assert fd is not None
    assert os.fstat(fd).st_size == 4096
    os.close(fd)
    assert be.received[-1].payload == Inflight(0, 0, 2, 8)


def test_get_inflight_fd_size_without_fd_is_wrong(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe)
    be.override[Request.GET_INFLIGHT_FD] = lambda m: [
        encode_reply(m.request, Inflight(4096, 0, 2, 8))
    ]
    with pytest.raises(ProtocolError, match="no fd"):
        fe.get_inflight_fd(2, 8)
    assert fe.closed


def test_device_state_and_misc_replies(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe)
    r, w = os.pipe()
    try:
        be.override[Request.SET_DEVICE_STATE_FD] = lambda m: [
            encode_reply(m.request, U64(DEVICE_STATE_NOFD))
        ]
        assert fe.set_device_state_fd(0, 0, w) is None
        be.override[Request.SET_DEVICE_STATE_FD] = lambda m: [encode_reply(m.request, U64(3))]
        with pytest.raises(ReplyError, match="error 3"):
            fe.set_device_state_fd(0, 0, w)
    finally:
        os.close(r)
        os.close(w)
    assert fe.check_device_state() == 0
    assert fe.get_shmem_config() == (0x1000, 0, 0x2000)
    assert fe.get_status() == 0xF
    be.override[Request.GET_SHARED_OBJECT] = lambda m: [encode_reply(m.request, U64(1))]
    assert fe.get_shared_object(uuid.uuid4()) is None


def test_send_rarp_encodes_mac(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe)
    fe.send_rarp(bytes.fromhex("525400123456"))
    assert be.received[-1].payload == U64(
        int.from_bytes(bytes.fromhex("5254001234560000"), "little")
    )
    with pytest.raises(ValueError, match="6 bytes"):
        fe.send_rarp(b"\x01")


def test_postcopy_mem_table_exchange(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe)
    bases = (MemoryRegion(0, 0x10000, 0x7FAA00000000, 0),)
    be.override[Request.POSTCOPY_ADVISE] = lambda m: [encode_reply(m.request, Empty(), fds=[uffd])]
    be.override[Request.SET_MEM_TABLE] = lambda m: (
        [encode_reply(m.request, MemoryTable(bases))] if m.payload_as(MemoryTable).regions else []
    )
    uffd = os.eventfd(0)
    be.kept_fds.append(uffd)
    got = fe.postcopy_advise()
    os.close(got)
    fe.postcopy_listen()
    fd = os.memfd_create("t")
    try:
        assert fe.set_mem_table([(REGION, fd)]) == bases
    finally:
        os.close(fd)
    _sync(fe)
    table, ack = [m for m in be.received if m.request == Request.SET_MEM_TABLE]
    assert not table.need_reply  # the spec: NEED_REPLY is not set in postcopy mode
    assert ack.payload == MemoryTable(()) and not ack.need_reply
    assert fe.postcopy_end() == 0
    assert not fe.postcopy_listening


def test_set_backend_req_fd_serves_backend_requests(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe)
    channel_sock: list[socket.socket] = []

    def keep(msg: Message) -> list[Out]:
        channel_sock.append(socket.socket(fileno=os.dup(msg.fds[0])))
        return _ack(msg)

    be.override[Request.SET_BACKEND_REQ_FD] = keep
    called = threading.Event()
    handler = fe.set_backend_req_fd(BackendRequestHandler(on_config_change=called.set))
    assert handler.running
    channel = Channel(
        Connection(channel_sock[0]),
        negotiation=Negotiation(protocol_features=1 << PF.REPLY_ACK | 1 << PF.CONFIG),
    )
    channel.config_change()
    assert called.is_set()
    channel.close()
    fe.close()
    assert handler.join(5)


def test_fd_hygiene(no_fd_leak: None) -> None:
    a, b = socketpair()
    fe = Frontend(a, reply_timeout=2)
    be = FakeBackend(b)
    fe.negotiate()
    fd = os.memfd_create("t")
    fe.setup_memory([(REGION, fd)])
    os.close(fd)
    fe.close()
    be.close()


def test_request_need_reply_flag_value(pair: tuple[Frontend, FakeBackend]) -> None:
    fe, be = pair
    _negotiated(fe)
    fe.set_vring_num(0, 8)
    assert be.received[-1].flags == 1 | FLAG_NEED_REPLY


def test_set_log_base_with_log_shmfd_waits_for_its_reply(
    pair: tuple[Frontend, FakeBackend],
) -> None:
    fe, be = pair
    _negotiated(fe)
    be.override[Request.SET_LOG_BASE] = lambda m: [encode_reply(m.request, U64(0))]
    memfd = os.memfd_create("log")
    try:
        fe.set_log_base(4096, 0, memfd)
        assert not be.received[-1].need_reply  # it always replies with LOG_SHMFD
        assert be.fds_seen[-1] == 1
        be.override[Request.SET_LOG_BASE] = lambda m: [encode_reply(m.request, U64(2))]
        with pytest.raises(ReplyError, match=r"SET_LOG_BASE.*status 2"):
            fe.set_log_base(4096, 0, memfd)
    finally:
        os.close(memfd)


# --- SET_LOG_BASE replies as real back-ends send them ------------------------------------------

LOG_BASE_REPLIES = {
    "u64 (spec)": encode_header(Request.SET_LOG_BASE, 0x5, 8) + U64(0).encode(),
    "empty (DPDK)": encode_header(Request.SET_LOG_BASE, 0x5, 0),
    "echoed log (rust-vmm)": encode_header(Request.SET_LOG_BASE, 0x5, 16)
    + Log(4096, 0x200).encode(),
}


@pytest.mark.parametrize("raw", LOG_BASE_REPLIES.values(), ids=LOG_BASE_REPLIES.keys())
def test_set_log_base_accepts_every_reply_form(
    pair: tuple[Frontend, FakeBackend], raw: bytes
) -> None:
    fe, be = pair
    _negotiated(fe)
    be.override[Request.SET_LOG_BASE] = lambda m: [raw]
    memfd = os.memfd_create("log")
    try:
        fe.set_log_base(4096, 0x200, memfd)
    finally:
        os.close(memfd)
    assert not fe.closed
    assert be.received[-1].payload == Log(4096, 0x200)
    assert fe.get_queue_num() == 4  # the stream is still in step


def test_set_log_base_reply_of_another_size_is_rejected(
    pair: tuple[Frontend, FakeBackend],
) -> None:
    fe, be = pair
    _negotiated(fe)
    raw = encode_header(Request.SET_LOG_BASE, 0x5, 5) + bytes(5)
    be.override[Request.SET_LOG_BASE] = lambda m: [raw]
    memfd = os.memfd_create("log")
    try:
        with pytest.raises(ProtocolError, match=r"SET_LOG_BASE: reply size 5 is wrong") as info:
            fe.set_log_base(4096, 0, memfd)
    finally:
        os.close(memfd)
    assert info.value.field == "size"
    assert "0 (empty, as DPDK replies)" in str(info.value)
    assert "16 (the log area echoed, as rust-vmm replies)" in str(info.value)
    assert fe.closed


@pytest.mark.parametrize(
    ("header", "payload", "nfds", "field"),
    [
        (Header(Request.SET_LOG_BASE, 0x1, 0), b"", 0, "flags"),  # REPLY bit missing
        (Header(Request.GET_FEATURES, 0x5, 16), bytes(16), 0, "request"),
        (Header(Request.SET_LOG_BASE, 0x5, 0), b"", 1, "fds"),
        (Header(Request.SET_LOG_BASE, 0x5, 16), bytes(8), 0, "size"),
        (Header(Request.SET_LOG_BASE, 0x5, 24), bytes(24), 0, "size"),
    ],
)
def test_tolerant_log_base_reply_still_checks_the_rest(
    header: Header, payload: bytes, nfds: int, field: str, no_fd_leak: None
) -> None:
    fds = [os.eventfd(0) for _ in range(nfds)]
    with pytest.raises(ProtocolError, match="SET_LOG_BASE") as info:
        decode_log_base_reply(header, payload, fds)
    assert info.value.field == field
    assert fds == []  # closed, as the codec does


def test_tolerant_log_base_reply_payloads() -> None:
    def decode(raw: bytes) -> object:
        header = Header(Request.SET_LOG_BASE, 0x5, len(raw) - 12)
        return decode_log_base_reply(header, raw[12:], []).payload

    assert decode(LOG_BASE_REPLIES["u64 (spec)"]) == U64(0)
    assert decode(LOG_BASE_REPLIES["empty (DPDK)"]) == Empty()
    assert decode(LOG_BASE_REPLIES["echoed log (rust-vmm)"]) == Log(4096, 0x200)
