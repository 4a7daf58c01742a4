"""One rulebook for both ends: every request's gate ("only legal if ... was negotiated") lives in
the request tables of ``pyvhost.user.messages``; these tests hold the tables to the spec and
check, gate by gate, that the front-end refuses to send and the back-end refuses to serve what
the negotiation does not allow, and that neither refuses what it does allow. The same for the
back-end channel: the back-end's Channel refuses to send, the front-end's handler to serve."""

from __future__ import annotations

import contextlib
import logging
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
    VhostError,
)
from pyvhost.user.channel import BackendRequestHandler, Channel
from pyvhost.user.connection import socketpair
from pyvhost.user.frontend import Frontend
from pyvhost.user.messages import (
    BACKEND_REQUESTS,
    F_PROTOCOL_FEATURES,
    FRONTEND_REQUESTS,
    U64,
    AnyRequest,
    BackendRequest,
    Config,
    DeviceStateTransfer,
    Empty,
    Inflight,
    IotlbMsg,
    Log,
    MemRegMsg,
    Message,
    MMapRequest,
    Negotiation,
    Payload,
    ProtocolFeature,
    RawPayload,
    Request,
    SharedObject,
    VringState,
    gate_refusal,
    spec_for,
)
from pyvhost.user.protocol import HANDLER_PROTOCOL_FEATURES
from pyvhost.virtio.features import F_ACCESS_PLATFORM

from .test_backend import Peer, StatefulDevice
from .test_frontend import ALL_PF, FEATURES, REGION, FakeBackend

PF = ProtocolFeature
Gate = tuple[str, int]
"""("protocol", bit): negotiated with SET_PROTOCOL_FEATURES; ("acked", bit): acked with
SET_FEATURES; ("offered", bit): offered by the back-end in GET_FEATURES."""

FRONTEND_GATES: dict[Request, Gate] = {
    # vhost-user.rst: "only legal if ... VHOST_USER_F_PROTOCOL_FEATURES" (offered by GET_FEATURES)
    Request.GET_PROTOCOL_FEATURES: ("offered", F_PROTOCOL_FEATURES),
    Request.SET_PROTOCOL_FEATURES: ("offered", F_PROTOCOL_FEATURES),
    Request.SET_VRING_ENABLE: ("offered", F_PROTOCOL_FEATURES),
    Request.IOTLB_MSG: ("acked", F_ACCESS_PLATFORM),
    Request.SET_LOG_BASE: ("protocol", PF.LOG_SHMFD),
    Request.GET_QUEUE_NUM: ("protocol", PF.MQ),
    Request.SEND_RARP: ("protocol", PF.RARP),
    Request.NET_SET_MTU: ("protocol", PF.MTU),
    Request.SET_BACKEND_REQ_FD: ("protocol", PF.BACKEND_REQ),
    Request.SET_VRING_ENDIAN: ("protocol", PF.CROSS_ENDIAN),
    Request.GET_CONFIG: ("protocol", PF.CONFIG),
    Request.SET_CONFIG: ("protocol", PF.CONFIG),
    Request.CREATE_CRYPTO_SESSION: ("protocol", PF.CRYPTO_SESSION),
    Request.CLOSE_CRYPTO_SESSION: ("protocol", PF.CRYPTO_SESSION),
    Request.POSTCOPY_ADVISE: ("protocol", PF.PAGEFAULT),
    Request.POSTCOPY_LISTEN: ("protocol", PF.PAGEFAULT),
    Request.POSTCOPY_END: ("protocol", PF.PAGEFAULT),
    Request.GET_INFLIGHT_FD: ("protocol", PF.INFLIGHT_SHMFD),
    Request.SET_INFLIGHT_FD: ("protocol", PF.INFLIGHT_SHMFD),
    Request.RESET_DEVICE: ("protocol", PF.RESET_DEVICE),
    Request.VRING_KICK: ("protocol", PF.INBAND_NOTIFICATIONS),
    Request.GET_MAX_MEM_SLOTS: ("protocol", PF.CONFIGURE_MEM_SLOTS),
    Request.ADD_MEM_REG: ("protocol", PF.CONFIGURE_MEM_SLOTS),
    Request.REM_MEM_REG: ("protocol", PF.CONFIGURE_MEM_SLOTS),
    Request.SET_STATUS: ("protocol", PF.STATUS),
    Request.GET_STATUS: ("protocol", PF.STATUS),
    Request.GET_SHARED_OBJECT: ("protocol", PF.SHARED_OBJECT),
    Request.SET_DEVICE_STATE_FD: ("protocol", PF.DEVICE_STATE),
    Request.CHECK_DEVICE_STATE: ("protocol", PF.DEVICE_STATE),
    Request.GET_SHMEM_CONFIG: ("protocol", PF.SHMEM),
}

BACKEND_GATES: dict[BackendRequest, Gate] = {
    BackendRequest.IOTLB_MSG: ("acked", F_ACCESS_PLATFORM),
    BackendRequest.CONFIG_CHANGE_MSG: ("protocol", PF.CONFIG),
    BackendRequest.VRING_HOST_NOTIFIER_MSG: ("protocol", PF.HOST_NOTIFIER),
    BackendRequest.VRING_CALL: ("protocol", PF.INBAND_NOTIFICATIONS),
    BackendRequest.VRING_ERR: ("protocol", PF.INBAND_NOTIFICATIONS),
    BackendRequest.SHARED_OBJECT_ADD: ("protocol", PF.SHARED_OBJECT),
    BackendRequest.SHARED_OBJECT_REMOVE: ("protocol", PF.SHARED_OBJECT),
    BackendRequest.SHARED_OBJECT_LOOKUP: ("protocol", PF.SHARED_OBJECT),
    BackendRequest.SHMEM_MAP: ("protocol", PF.SHMEM),
    BackendRequest.SHMEM_UNMAP: ("protocol", PF.SHMEM),
}

FRONTEND_GATED = sorted(FRONTEND_GATES)
BACKEND_GATED = sorted(BACKEND_GATES)


def spec_gate(request: AnyRequest) -> Gate | None:
    """The gate the spec gives ``request`` (the two enums share numbers: look up by type)."""
    if isinstance(request, BackendRequest):
        return BACKEND_GATES.get(request)
    return FRONTEND_GATES.get(request)


ALL_OFFERED = FEATURES | 1 << F_ACCESS_PLATFORM
OPEN = Negotiation(ALL_OFFERED, ALL_OFFERED, ALL_PF)


def table_gate(request: AnyRequest) -> Gate | None:
    spec = spec_for(request)
    gates: list[Gate] = []
    if spec.offered_feature is not None:
        gates.append(("offered", spec.offered_feature))
    if spec.acked_feature is not None:
        gates.append(("acked", spec.acked_feature))
    if spec.protocol_feature is not None:
        gates.append(("protocol", int(spec.protocol_feature)))
    assert len(gates) <= 1, f"{request!r} has several gates: {gates}"
    return gates[0] if gates else None


def closed(gate: Gate) -> Negotiation:
    """The open negotiation with only ``gate``'s bit missing."""
    kind, bit = gate
    if kind == "offered":
        offered = ALL_OFFERED & ~(1 << bit)
        return Negotiation(offered, offered, ALL_PF)
    if kind == "acked":
        return Negotiation(ALL_OFFERED, ALL_OFFERED & ~(1 << bit), ALL_PF)
    return Negotiation(ALL_OFFERED, ALL_OFFERED, ALL_PF & ~(1 << bit))


@pytest.mark.parametrize(
    "request_",
    [*FRONTEND_REQUESTS, *BACKEND_REQUESTS],
    ids=lambda r: f"{type(r).__name__}.{r.name}",
)
def test_tables_hold_the_spec_gates(request_: AnyRequest) -> None:
    assert table_gate(request_) == spec_gate(request_)


@pytest.mark.parametrize(
    "request_", [*FRONTEND_GATED, *BACKEND_GATED], ids=lambda r: f"{type(r).__name__}.{r.name}"
)
def test_refusal_names_the_gate_only_when_closed(request_: AnyRequest) -> None:
    gate = spec_gate(request_)
    assert gate is not None
    kind, bit = gate
    assert gate_refusal(request_, OPEN) is None
    refusal = gate_refusal(request_, closed((kind, bit)))
    assert refusal is not None and f"(bit {bit})" in refusal
    if kind == "protocol":
        assert f"protocol feature {PF(bit).name} (bit {bit}) was not negotiated" in refusal


# --- front-end: refuses before sending --------------------------------------------------------

UUID = uuid.UUID(int=5)


def _fd() -> int:
    return os.memfd_create("gate", os.MFD_CLOEXEC)


def _with_fd(call: Callable[[Frontend, int], object]) -> Callable[[Frontend], object]:
    def run(fe: Frontend) -> object:
        fd = _fd()
        try:
            return call(fe, fd)
        finally:
            os.close(fd)

    return run


FRONTEND_CALLS: dict[Request, Callable[[Frontend], object]] = {
    Request.GET_PROTOCOL_FEATURES: lambda fe: fe.get_protocol_features(),
    Request.SET_PROTOCOL_FEATURES: lambda fe: fe.set_protocol_features(0),
    Request.SET_VRING_ENABLE: lambda fe: fe.set_vring_enable(0, True),
    Request.IOTLB_MSG: lambda fe: fe.iotlb_msg(IotlbMsg(0x1000, 0x1000, 0x7F00_0000_0000, 3, 2)),
    Request.SET_LOG_BASE: _with_fd(lambda fe, fd: fe.set_log_base(4096, 0, fd)),
    Request.GET_QUEUE_NUM: lambda fe: fe.get_queue_num(),
    Request.SEND_RARP: lambda fe: fe.send_rarp(b"\x52\x54\0\0\0\1"),
    Request.NET_SET_MTU: lambda fe: fe.net_set_mtu(1500),
    Request.SET_BACKEND_REQ_FD: lambda fe: fe.set_backend_req_fd(),
    Request.SET_VRING_ENDIAN: lambda fe: fe.set_vring_endian(0, False),
    Request.GET_CONFIG: lambda fe: fe.get_config(0, 8),
    Request.SET_CONFIG: lambda fe: fe.set_config(0, b"x"),
    Request.CREATE_CRYPTO_SESSION: lambda fe: fe.create_crypto_session(b"x"),
    Request.CLOSE_CRYPTO_SESSION: lambda fe: fe.close_crypto_session(1),
    Request.POSTCOPY_ADVISE: lambda fe: fe.postcopy_advise(),
    Request.POSTCOPY_LISTEN: lambda fe: fe.postcopy_listen(),
    Request.POSTCOPY_END: lambda fe: fe.postcopy_end(),
    Request.GET_INFLIGHT_FD: lambda fe: fe.get_inflight_fd(1, 8),
    Request.SET_INFLIGHT_FD: _with_fd(
        lambda fe, fd: fe.set_inflight_fd(Inflight(4096, 0, 1, 8), fd)
    ),
    Request.RESET_DEVICE: lambda fe: fe.reset_device(),
    Request.VRING_KICK: lambda fe: fe.vring_kick(0),
    Request.GET_MAX_MEM_SLOTS: lambda fe: fe.get_max_mem_slots(),
    Request.ADD_MEM_REG: _with_fd(lambda fe, fd: fe.add_mem_reg(REGION, fd)),
    Request.REM_MEM_REG: lambda fe: fe.rem_mem_reg(REGION),
    Request.SET_STATUS: lambda fe: fe.set_status(1),
    Request.GET_STATUS: lambda fe: fe.get_status(),
    Request.GET_SHARED_OBJECT: lambda fe: fe.get_shared_object(UUID),
    Request.SET_DEVICE_STATE_FD: _with_fd(lambda fe, fd: fe.set_device_state_fd(0, 0, fd)),
    Request.CHECK_DEVICE_STATE: lambda fe: fe.check_device_state(),
    Request.GET_SHMEM_CONFIG: lambda fe: fe.get_shmem_config(),
}

AFTER_SENDING = (TimeoutError, ProtocolError, ReplyError, ConnectionClosedError, OSError)
"""What a call may raise once the request went out to the scripted peer (beside the point)."""


def test_every_gated_request_has_a_frontend_call() -> None:
    assert sorted(FRONTEND_CALLS) == FRONTEND_GATED


@contextlib.contextmanager
def frontend_in(state: Negotiation) -> Iterator[tuple[Frontend, FakeBackend]]:
    """A Frontend whose negotiation with a scripted peer reached ``state``."""
    a, b = socketpair()
    fe = Frontend(a, reply_timeout=0.5)
    be = FakeBackend(b, features=state.offered_features or 0, protocol=ALL_PF)
    try:
        fe.get_features()
        if state.offered_features is not None and state.offered_features >> F_PROTOCOL_FEATURES & 1:
            fe.get_protocol_features()
            fe.set_protocol_features(state.protocol_features)
        fe.set_features(state.features)
        fe.get_features()  # a round trip: the peer has seen everything so far
        yield fe, be
    finally:
        fe.close()
        be.close()


@pytest.mark.parametrize("request_", FRONTEND_GATED, ids=lambda r: r.name)
def test_frontend_refuses_a_closed_gate_before_sending(request_: Request) -> None:
    state = closed(FRONTEND_GATES[request_])
    refusal = gate_refusal(request_, state)
    assert refusal is not None
    with frontend_in(state) as (fe, be):
        seen = len(be.received)
        with pytest.raises(UnsupportedRequestError) as info:
            FRONTEND_CALLS[request_](fe)
        assert str(info.value) == f"{request_.name}: {refusal}"
        fe.get_features()
        assert [m.request for m in be.received[seen:]] == [Request.GET_FEATURES]
        assert not fe.closed


@pytest.mark.parametrize("request_", FRONTEND_GATED, ids=lambda r: r.name)
def test_frontend_sends_through_an_open_gate(request_: Request) -> None:
    with frontend_in(OPEN) as (fe, be):
        with contextlib.suppress(*AFTER_SENDING):
            FRONTEND_CALLS[request_](fe)
        with contextlib.suppress(*AFTER_SENDING):
            fe.get_features()
        assert request_ in [m.request for m in be.received]


# --- back-end: refuses to serve ---------------------------------------------------------------


def _payload(request: Request) -> tuple[Payload | None, Callable[[], list[int]]]:
    """A well-formed payload for ``request`` and a maker of the fds it needs."""

    def none() -> list[int]:
        return []

    def one() -> list[int]:
        return [_fd()]

    def sock() -> list[int]:
        a, b = socket.socketpair()
        a.close()
        return [b.detach()]

    def pipe() -> list[int]:
        r, w = os.pipe()
        os.close(r)
        return [w]

    table: dict[Request, tuple[Payload | None, Callable[[], list[int]]]] = {
        Request.GET_PROTOCOL_FEATURES: (None, none),
        Request.SET_PROTOCOL_FEATURES: (U64(0), none),
        Request.SET_VRING_ENABLE: (VringState(0, 1), none),
        Request.IOTLB_MSG: (IotlbMsg(0x1000, 0x1000, 0x7F00_0000_0000, 3, 2), none),
        Request.SET_LOG_BASE: (Log(4096, 0), one),
        Request.GET_QUEUE_NUM: (None, none),
        Request.SEND_RARP: (U64(0x0100_0000_5452), none),
        Request.NET_SET_MTU: (U64(1500), none),
        Request.SET_BACKEND_REQ_FD: (None, sock),
        Request.SET_VRING_ENDIAN: (VringState(0, 0), none),
        Request.GET_CONFIG: (Config(0, 0, bytes(8)), none),
        Request.SET_CONFIG: (Config(0, 0, b"x"), none),
        Request.CREATE_CRYPTO_SESSION: (RawPayload(b"x" * 8), none),
        Request.CLOSE_CRYPTO_SESSION: (U64(1), none),
        Request.POSTCOPY_ADVISE: (None, none),
        Request.POSTCOPY_LISTEN: (None, none),
        Request.POSTCOPY_END: (None, none),
        Request.GET_INFLIGHT_FD: (Inflight(0, 0, 1, 8), none),
        Request.SET_INFLIGHT_FD: (Inflight(4096, 0, 1, 8), one),
        Request.RESET_DEVICE: (None, none),
        Request.VRING_KICK: (VringState(0, 0), none),
        Request.GET_MAX_MEM_SLOTS: (None, none),
        Request.ADD_MEM_REG: (MemRegMsg(REGION), one),
        Request.REM_MEM_REG: (MemRegMsg(REGION), none),
        Request.SET_STATUS: (U64(1), none),
        Request.GET_STATUS: (None, none),
        Request.GET_SHARED_OBJECT: (SharedObject(UUID), none),
        Request.SET_DEVICE_STATE_FD: (DeviceStateTransfer(0, 0), pipe),
        Request.CHECK_DEVICE_STATE: (None, none),
        Request.GET_SHMEM_CONFIG: (None, none),
    }
    return table[request]


def test_every_gated_request_has_a_backend_payload() -> None:
    for request in FRONTEND_GATED:
        _payload(request)


@contextlib.contextmanager
def backend_in(protocol_features: int) -> Iterator[Peer]:
    """Our BackendHandler after negotiating ``protocol_features`` and acking what it offers."""
    if not protocol_features >> PF.BACKEND_REQ & 1:
        protocol_features &= ~(1 << PF.INBAND_NOTIFICATIONS)  # which needs BACKEND_REQ
    device = StatefulDevice(
        num_queues=1, features=1 << 32, protocol_features=HANDLER_PROTOCOL_FEATURES
    )
    peer = Peer(device)
    try:
        peer.negotiate(protocol_features, features=peer.handler.offered_features)
        yield peer
    finally:
        peer.close()


def _serve(peer: Peer, request: Request) -> tuple[Message | None, BaseException | None]:
    payload, fds = _payload(request)
    sent = fds()
    try:
        return peer.send(request, payload, fds=sent, need_reply=True), None
    except VhostError as exc:
        return peer.reply(request), exc
    finally:
        for fd in sent:
            os.close(fd)


@pytest.mark.parametrize("request_", FRONTEND_GATED, ids=lambda r: r.name)
def test_backend_refuses_a_closed_gate(request_: Request, caplog: pytest.LogCaptureFixture) -> None:
    kind, bit = FRONTEND_GATES[request_]
    if kind == "offered":
        with backend_in(HANDLER_PROTOCOL_FEATURES) as peer:
            assert peer.handler.offered_features >> bit & 1, "never closed on this back-end"
        return
    every = HANDLER_PROTOCOL_FEATURES
    with backend_in(every & ~(1 << bit) if kind == "protocol" else every) as peer:
        if kind == "acked":
            assert not peer.handler.features >> bit & 1, "never offered: always closed"
        refusal = gate_refusal(request_, peer.handler.negotiation)
        assert refusal is not None
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pyvhost"):
            reply, error = _serve(peer, request_)
        assert refusal in caplog.text
        spec = spec_for(request_)
        if spec.replies(peer.handler.protocol_features) and spec.error_reply is not None:
            assert error is None and reply is not None
            assert reply.payload == spec.error_reply(reply), "the spec's error form"
        elif spec.replies(peer.handler.protocol_features):
            assert error is not None and refusal in str(error), "no error form: closes"
        else:
            assert error is None and reply is not None and reply.payload == U64(1), "NACK"


@pytest.mark.parametrize(
    "request_",
    [r for r in FRONTEND_GATED if FRONTEND_GATES[r][0] == "protocol"],
    ids=lambda r: r.name,
)
def test_backend_serves_through_an_open_gate(
    request_: Request, caplog: pytest.LogCaptureFixture
) -> None:
    _, bit = FRONTEND_GATES[request_]
    with backend_in(HANDLER_PROTOCOL_FEATURES) as peer:
        if not peer.handler.offered_protocol_features >> bit & 1:
            assert request_ is Request.SET_VRING_ENDIAN, "only CROSS_ENDIAN is never offered"
            return
        with caplog.at_level(logging.WARNING, logger="pyvhost"):
            _serve(peer, request_)
        assert "was not negotiated" not in caplog.text


# --- the back-end channel: Channel refuses to send, the front-end's handler to serve -------------


CHANNEL_CALLS: dict[BackendRequest, Callable[[Channel], object]] = {
    BackendRequest.IOTLB_MSG: lambda ch: ch.iotlb(IotlbMsg(0x1000, 0x1000, 0, 1, 1)),
    BackendRequest.CONFIG_CHANGE_MSG: lambda ch: ch.config_change(),
    BackendRequest.VRING_HOST_NOTIFIER_MSG: lambda ch: ch.vring_host_notifier(0, None, 0, 0),
    BackendRequest.VRING_CALL: lambda ch: ch.vring_call(0, sync=True),
    BackendRequest.VRING_ERR: lambda ch: ch.vring_err(0, sync=True),
    BackendRequest.SHARED_OBJECT_ADD: lambda ch: ch.shared_object_add(UUID),
    BackendRequest.SHARED_OBJECT_REMOVE: lambda ch: ch.shared_object_remove(UUID),
    BackendRequest.SHARED_OBJECT_LOOKUP: lambda ch: ch.shared_object_lookup(UUID),
    BackendRequest.SHMEM_MAP: lambda ch: _with_memfd(ch, MMapRequest(0, 0, 0, 4096, 1)),
    BackendRequest.SHMEM_UNMAP: lambda ch: ch.shmem_unmap(MMapRequest(0, 0, 0, 4096, 0)),
}

CALLBACKS = {
    BackendRequest.IOTLB_MSG: "on_iotlb",
    BackendRequest.CONFIG_CHANGE_MSG: "on_config_change",
    BackendRequest.VRING_HOST_NOTIFIER_MSG: "on_vring_host_notifier",
    BackendRequest.VRING_CALL: "on_vring_call",
    BackendRequest.VRING_ERR: "on_vring_err",
    BackendRequest.SHARED_OBJECT_ADD: "on_shared_object_add",
    BackendRequest.SHARED_OBJECT_REMOVE: "on_shared_object_remove",
    BackendRequest.SHARED_OBJECT_LOOKUP: "on_shared_object_lookup",
    BackendRequest.SHMEM_MAP: "on_shmem_map",
    BackendRequest.SHMEM_UNMAP: "on_shmem_unmap",
}


def test_every_backend_request_has_a_channel_call() -> None:
    assert sorted(CHANNEL_CALLS) == sorted(CALLBACKS) == BACKEND_GATED == sorted(BackendRequest)


@contextlib.contextmanager
def channel_between(
    sender: Negotiation, receiver: Negotiation
) -> Iterator[tuple[Channel, list[BackendRequest]]]:
    """A Channel negotiated as ``sender`` talking to a handler negotiated as ``receiver``;
    the list records every callback the handler made."""
    called: list[BackendRequest] = []
    lock = threading.Lock()

    def recorder(request: BackendRequest) -> Callable[..., int | None]:
        def record(*args: object) -> int | None:
            with lock:
                called.append(request)
            return os.dup(0) if request is BackendRequest.SHARED_OBJECT_LOOKUP else 0

        return record

    handler = BackendRequestHandler()
    for r, name in CALLBACKS.items():
        setattr(handler, name, recorder(r))
    handler.negotiation = lambda: receiver
    a, b = socketpair()
    handler.start(a)
    channel = Channel(b, negotiation=sender, reply_timeout=5)
    try:
        yield channel, called
    finally:
        channel.close()
        handler.close()


def _with_memfd(channel: Channel, request: MMapRequest) -> None:
    fd = _fd()
    try:
        channel.shmem_map(request, fd)
    finally:
        os.close(fd)


def _round_trip(channel: Channel, besides: BackendRequest) -> BackendRequest:
    """Send a request whose gate differs from ``besides``'s and wait for it to be handled."""
    other = next(r for r in BACKEND_GATED if BACKEND_GATES[r] != BACKEND_GATES[besides])
    CHANNEL_CALLS[other](channel)
    return other


def _send_fd(call: Callable[[Channel], object], channel: Channel) -> object:
    result = call(channel)
    if isinstance(result, int):
        os.close(result)
    return result


@pytest.mark.parametrize("request_", BACKEND_GATED, ids=lambda r: r.name)
def test_channel_refuses_a_closed_gate_before_sending(request_: BackendRequest) -> None:
    state = closed(BACKEND_GATES[request_])
    refusal = gate_refusal(request_, state)
    with channel_between(state, OPEN) as (channel, called):
        with pytest.raises(UnsupportedRequestError) as info:
            CHANNEL_CALLS[request_](channel)
        assert str(info.value) == f"BACKEND_{request_.name}: {refusal}"
        other = _round_trip(channel, request_)
        assert called == [other]


@pytest.mark.parametrize("request_", BACKEND_GATED, ids=lambda r: r.name)
def test_frontend_handler_refuses_a_closed_gate(
    request_: BackendRequest, caplog: pytest.LogCaptureFixture
) -> None:
    state = closed(BACKEND_GATES[request_])
    refusal = gate_refusal(request_, state)
    assert refusal is not None
    with channel_between(OPEN, state) as (channel, called), caplog.at_level(logging.WARNING):
        with pytest.raises(ReplyError):
            _send_fd(CHANNEL_CALLS[request_], channel)
        assert called == []
        assert refusal in caplog.text


@pytest.mark.parametrize("request_", BACKEND_GATED, ids=lambda r: r.name)
def test_channel_and_handler_serve_an_open_gate(request_: BackendRequest) -> None:
    with channel_between(OPEN, OPEN) as (channel, called):
        _send_fd(CHANNEL_CALLS[request_], channel)
        assert called[0] is request_


def test_a_handler_without_a_negotiation_serves_everything() -> None:
    """A standalone handler (no Frontend to ask) has no negotiation to hold requests to."""
    got: list[int] = []
    handler = BackendRequestHandler(on_vring_call=got.append)
    a, b = socketpair()
    handler.start(a)
    channel = Channel(b, negotiation=OPEN, reply_timeout=5)
    try:
        channel.vring_call(3, sync=True)
        assert got == [3]
    finally:
        channel.close()
        handler.close()


def test_empty_payload_requests_are_empty() -> None:
    """The gated requests without a payload in the sample table carry Empty on the wire."""
    for request in FRONTEND_GATED:
        payload, _ = _payload(request)
        if payload is None:
            assert spec_for(request).payload is Empty
