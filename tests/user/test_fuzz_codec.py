"""Fuzzing the vhost-user codec and the socket framing with hypothesis.

Contract under test: whatever bytes and fds arrive, decoding either returns a Message that owns
the fds or raises ProtocolError having closed every fd; nothing else ever comes out (no
struct.error, ValueError, IndexError, OverflowError, UnicodeError...). ``recv_frame`` over a
real socketpair raises only ProtocolError, ConnectionClosedError or TimeoutError and leaks no fd.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pyvhost.errors import ConnectionClosedError, ProtocolError
from pyvhost.user.connection import Connection, socketpair
from pyvhost.user.messages import (
    BACKEND_REQUESTS,
    FRONTEND_REQUESTS,
    HEADER_SIZE,
    MAX_FDS,
    U64,
    AnyRequest,
    BackendRequest,
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
    MMapRequest,
    Payload,
    RawPayload,
    Request,
    RequestSpec,
    SharedObject,
    ShmemConfig,
    VringAddr,
    VringArea,
    VringState,
    close_fds,
    decode_header,
    decode_reply,
    decode_request,
    decode_request_bytes,
    encode_header,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

ALL_REQUESTS: list[AnyRequest] = [*FRONTEND_REQUESTS, *BACKEND_REQUESTS]


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def make_fds(n: int) -> list[int]:
    """``n`` real, distinct fds (eventfds), so closing them is observable."""
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def _region(i: int) -> MemoryRegion:
    return MemoryRegion(0x10_0000 * i, 0x1000, 0x7F00_0000_0000 + 0x10_0000 * i, 0)


def sample_payload(cls: type[Payload]) -> Payload:
    """One valid payload of each layout (the seeds the mutations start from)."""
    samples: dict[type[Payload], Payload] = {
        Empty: Empty(),
        U64: U64(1),
        VringState: VringState(0, 0),
        VringAddr: VringAddr(1, 0, 0x1000, 0x2000, 0x3000, 0),
        MemoryTable: MemoryTable((_region(0), _region(1))),
        MemRegMsg: MemRegMsg(_region(0)),
        Log: Log(0x1000, 0),
        IotlbMsg: IotlbMsg(0x1000, 0x1000, 0x7F00_0000_0000, 3, 2),
        Config: Config(0, 0, bytes(8)),
        VringArea: VringArea(1, 0x1000, 0),
        Inflight: Inflight(0x1000, 0, 2, 128),
        SharedObject: SharedObject(uuid.UUID(int=42)),
        DeviceStateTransfer: DeviceStateTransfer(0, 0),
        MMapRequest: MMapRequest(0, 0, 0, 0x1000, 1),
        ShmemConfig: ShmemConfig((0x1000, 0, 0x2000)),
        RawPayload: RawPayload(b"raw"),
    }
    return samples[cls]


def _spec(request: AnyRequest) -> RequestSpec:
    if isinstance(request, BackendRequest):
        return BACKEND_REQUESTS[request]
    return FRONTEND_REQUESTS[request]


def _seed(request: AnyRequest) -> tuple[bytes, bool, int]:
    """A valid encoded request ``request`` (header + payload), its channel and its fd count."""
    spec = _spec(request)
    payload = sample_payload(spec.payload)
    nfds = spec.fds[0]
    if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        payload, nfds = U64(1), 1
    elif request is BackendRequest.VRING_HOST_NOTIFIER_MSG:
        payload, nfds = VringArea(1, 0x1000, 0), 1
    elif request is Request.SET_MEM_TABLE:
        nfds = 2
    body = payload.encode()
    return encode_header(request, 1, len(body)) + body, isinstance(request, BackendRequest), nfds


def _check_outcome(fds: list[int], decode: Callable[[], Message]) -> Message | None:
    """Run ``decode``; on success close the Message's fds; on rejection check ours are closed."""
    given_fds = list(fds)
    try:
        msg = decode()
    except ProtocolError as exc:
        assert str(exc), "a ProtocolError must say what is wrong"
        assert not fds, "the fd list must be emptied on rejection"
        still_open = [fd for fd in given_fds if _is_open(fd)]
        assert not still_open, f"fds {still_open} left open after {exc}"
        return None
    assert sorted(msg.fds) == sorted(given_fds), "the Message owns exactly the fds given"
    msg.describe()  # the tracer prints every decoded message: it must not fail either
    close_fds(msg.fds)
    return msg


# -- arbitrary bytes ----------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=HEADER_SIZE + 8), backend=st.booleans())
def test_decode_header_raises_only_protocol_error(data: bytes, backend: bool) -> None:
    try:
        header = decode_header(data, backend_channel=backend)
    except ProtocolError:
        return
    assert len(data) == HEADER_SIZE and header.size <= 4096


@FUZZ
@given(
    request=st.integers(0, 0xFFFF_FFFF) | st.sampled_from([int(r) for r in ALL_REQUESTS]),
    flags=st.integers(0, 0xFFFF_FFFF) | st.sampled_from([1, 5, 9, 13]),
    payload=st.binary(max_size=300),
    size_delta=st.sampled_from([0, 0, 0, -1, 1, 4096]),
    nfds=st.integers(0, MAX_FDS + 2),
    backend=st.booleans(),
)
def test_decode_request_arbitrary(
    *, request: int, flags: int, payload: bytes, size_delta: int, nfds: int, backend: bool
) -> None:
    size = max(0, len(payload) + size_delta) & 0xFFFF_FFFF
    raw = encode_header(request, flags, size)
    fds = make_fds(nfds)
    try:
        header = decode_header(raw, backend_channel=backend)
    except ProtocolError:
        close_fds(fds)
        return
    _check_outcome(fds, lambda: decode_request(header, payload, fds, backend_channel=backend))


@FUZZ
@given(data=st.binary(max_size=400), nfds=st.integers(0, MAX_FDS), backend=st.booleans())
def test_decode_request_bytes_arbitrary(data: bytes, nfds: int, backend: bool) -> None:
    fds = make_fds(nfds)
    _check_outcome(fds, lambda: decode_request_bytes(data, fds, backend_channel=backend))


@FUZZ
@given(
    request=st.sampled_from(ALL_REQUESTS),
    header_request=st.integers(0, 0xFFFF_FFFF) | st.just(-1),
    flags=st.sampled_from([5, 1, 4, 13, 0xFFFF_FFFF]),
    payload=st.binary(max_size=300)
    | st.sampled_from([bytes(8), bytes(16), bytes(24), bytes(40), bytes(2056)]),
    nfds=st.integers(0, 3),
    backend=st.booleans(),
)
def test_decode_reply_arbitrary(
    *,
    request: AnyRequest,
    header_request: int,
    flags: int,
    payload: bytes,
    nfds: int,
    backend: bool,
) -> None:
    if header_request < 0:
        header_request = int(request)
    assume(len(payload) <= 4096)
    header = decode_header(encode_header(header_request, 1, len(payload)))
    header.flags = flags
    fds = make_fds(nfds)
    _check_outcome(
        fds, lambda: decode_reply(request, header, payload, fds, backend_channel=backend)
    )


# -- mutations of valid messages ----------------------------------------------------------------

Mutation = tuple[str, int, int]

MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "truncate", "size", "append", "byte"]),
        st.integers(0, 1 << 16),
        st.integers(0, 0xFFFF_FFFF),
    ),
    min_size=1,
    max_size=4,
)


def _mutate(data: bytes, mutations: list[Mutation]) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in mutations:
        if kind == "flip" and buf:
            bit = pos % (8 * len(buf))
            buf[bit // 8] ^= 1 << (bit % 8)
        elif kind == "byte" and buf:
            buf[pos % len(buf)] = value & 0xFF
        elif kind == "truncate":
            del buf[pos % (len(buf) + 1) :]
        elif kind == "size" and len(buf) >= HEADER_SIZE:
            choices = [0, len(buf) - HEADER_SIZE + 1, max(0, len(buf) - HEADER_SIZE - 1), value]
            struct.pack_into("<I", buf, 8, choices[pos % 4])
        elif kind == "append":
            buf += bytes([value & 0xFF]) * (1 + pos % 64)
    return bytes(buf)


@FUZZ
@given(
    request=st.sampled_from(ALL_REQUESTS),
    mutations=MUTATIONS,
    fd_delta=st.integers(-1, 2),
)
def test_mutated_valid_requests(
    request: AnyRequest, mutations: list[Mutation], fd_delta: int
) -> None:
    data, backend, nfds = _seed(request)
    fds = make_fds(max(0, nfds + fd_delta))
    _check_outcome(
        fds, lambda: decode_request_bytes(_mutate(data, mutations), fds, backend_channel=backend)
    )


def test_seeds_are_valid() -> None:
    """The seeds decode unmutated (otherwise the mutation test fuzzes only rejections)."""
    for request in ALL_REQUESTS:
        data, backend, nfds = _seed(request)
        fds = make_fds(nfds)
        msg = _check_outcome(
            fds, functools.partial(decode_request_bytes, data, fds, backend_channel=backend)
        )
        assert msg is not None, f"seed of {request!r} does not decode"


@FUZZ
@given(
    request=st.sampled_from(list(FRONTEND_REQUESTS)),
    reply_cls=st.sampled_from(
        [
            Empty,
            U64,
            VringState,
            MemoryTable,
            MemRegMsg,
            Config,
            Inflight,
            SharedObject,
            ShmemConfig,
            RawPayload,
        ]
    ),
    mutations=st.lists(
        st.tuples(
            st.sampled_from(["flip", "truncate", "size", "append", "byte"]),
            st.integers(0, 1 << 16),
            st.integers(0, 0xFFFF_FFFF),
        ),
        max_size=3,
    ),
    nfds=st.integers(0, 2),
)
def test_mutated_replies(
    request: Request, reply_cls: type[Payload], mutations: list[Mutation], nfds: int
) -> None:
    body = sample_payload(reply_cls).encode()
    data = _mutate(encode_header(request, 5, len(body)) + body, mutations)
    fds = make_fds(nfds)
    try:
        header = decode_header(data[:HEADER_SIZE])
    except ProtocolError:
        close_fds(fds)
        return
    _check_outcome(fds, lambda: decode_reply(request, header, data[HEADER_SIZE:], fds))


# -- the socket framing -------------------------------------------------------------------------

FD_KINDS = st.sampled_from(["eventfd", "memfd", "pipe", "devnull", "socket"])


def _make_fd(kind: str) -> int:
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == "memfd":
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4096)
        return fd
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    if kind == "devnull":
        return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    a, b = socket.socketpair()
    b.close()
    return a.detach()


CHUNKS = st.lists(
    st.tuples(
        st.binary(max_size=64)
        | st.builds(
            lambda req, flags, size, tail: encode_header(req, flags, size) + tail,
            st.sampled_from([int(r) for r in Request]) | st.integers(0, 0xFFFF_FFFF),
            st.sampled_from([1, 5, 9]) | st.integers(0, 0xFF),
            st.integers(0, 64) | st.integers(0, 0xFFFF_FFFF),
            st.binary(max_size=64),
        ),
        st.lists(FD_KINDS, max_size=MAX_FDS + 3),
    ),
    max_size=6,
)


@pytest.fixture
def pair() -> Iterator[tuple[Connection, Connection]]:
    a, b = socketpair()
    yield a, b
    a.close()
    b.close()


@FUZZ
@given(chunks=CHUNKS, backend=st.booleans(), eof=st.booleans())
def test_recv_frame_random_chunks(
    chunks: list[tuple[bytes, list[str]]], backend: bool, eof: bool
) -> None:
    before = _open_fds()
    sender, receiver = socketpair()
    try:
        for data, kinds in chunks:
            if not data:
                continue
            fds = [_make_fd(kind) for kind in kinds]
            try:
                if fds:
                    socket.send_fds(sender.socket, [data], fds)
                else:
                    sender.socket.sendall(data)
            finally:
                close_fds(fds)
        if eof:
            sender.socket.shutdown(socket.SHUT_WR)
        for _ in range(len(chunks) + 2):
            try:
                frame = receiver.recv_frame(0.05 if not eof else 2.0, backend_channel=backend)
            except (ConnectionClosedError, TimeoutError):
                break
            except ProtocolError as exc:
                assert str(exc)
                with pytest.raises(ProtocolError, match="out of sync"):
                    receiver.recv_frame(0.05)
                break
            assert len(frame.payload) == frame.header.size
            assert len(frame.fds) <= MAX_FDS
            close_fds(frame.fds)
    finally:
        sender.close()
        receiver.close()
    leaked = _open_fds() - before
    assert not leaked, f"fds leaked: {sorted(leaked)}"


def test_recv_frame_more_than_max_fds_closes_them_all(
    pair: tuple[Connection, Connection], no_fd_leak: None
) -> None:
    sender, receiver = pair
    fds = [_make_fd("eventfd") for _ in range(MAX_FDS + 4)]
    try:
        socket.send_fds(sender.socket, [encode_header(Request.SET_OWNER, 1, 0)], fds)
    finally:
        close_fds(fds)
    with pytest.raises(ProtocolError, match="fds"):
        receiver.recv_frame(2)
