"""Round-trip properties of every payload class and of whole messages."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost.errors import ProtocolError
from pyvhost.user.messages import (
    BACKEND_REQUESTS,
    FRONTEND_REQUESTS,
    HEADER_SIZE,
    PAYLOAD_TYPES,
    U64,
    VRING_NOFD,
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
    SharedObject,
    ShmemConfig,
    VringAddr,
    VringArea,
    VringState,
    decode_header,
    decode_reply,
    decode_request,
    decode_request_bytes,
    encode_message,
    encode_reply,
    encode_request,
    spec_for,
)

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFF_FFFF)
U64_MAX = (1 << 64) - 1
U64S = st.integers(0, U64_MAX)
FAKE_FD = 900_000  # never open: closing it on a (wrong) rejection path is harmless


def _aligned(align: int) -> st.SearchStrategy[int]:
    return st.integers(0, U64_MAX // align).map(lambda v: v * align)


@st.composite
def regions(draw: st.DrawFn, count: int | None = None) -> tuple[MemoryRegion, ...]:
    """Non-overlapping regions, placed in a shuffled order in both address spaces."""
    n = draw(st.integers(0, 8)) if count is None else count
    sizes = draw(st.lists(st.integers(1, 1 << 36), min_size=n, max_size=n))

    def place() -> list[int]:
        order = draw(st.permutations(range(n)))
        starts = [0] * n
        cursor = draw(st.integers(0, 1 << 40))
        for i in order:
            starts[i] = cursor
            cursor += sizes[i] + draw(st.integers(0, 1 << 30))
        return starts

    gpas, uaddrs = place(), place()
    offsets = [draw(st.integers(0, U64_MAX - s)) for s in sizes]
    return tuple(MemoryRegion(gpas[i], sizes[i], uaddrs[i], offsets[i]) for i in range(n))


@st.composite
def configs(draw: st.DrawFn) -> Config:
    offset = draw(st.integers(0, 256))
    data = draw(st.binary(max_size=256 - offset))
    return Config(offset, draw(st.integers(0, 1)), data)


PAYLOADS: dict[type[Any], st.SearchStrategy[Any]] = {
    Empty: st.just(Empty()),
    U64: st.builds(U64, U64S),
    VringState: st.builds(VringState, U32, U32),
    VringAddr: st.builds(
        VringAddr, U32, st.integers(0, 1), _aligned(16), _aligned(4), _aligned(2), U64S
    ),
    MemoryTable: regions().map(MemoryTable),
    MemRegMsg: regions(1).map(lambda r: MemRegMsg(r[0])),
    Log: st.builds(Log, U64S, U64S),
    IotlbMsg: st.builds(IotlbMsg, U64S, U64S, U64S, st.integers(0, 3), st.integers(1, 6)),
    Config: configs(),
    VringArea: st.builds(VringArea, st.integers(0, 0x1FF), U64S, U64S),
    Inflight: st.builds(Inflight, U64S, U64S, U16, U16),
    SharedObject: st.builds(SharedObject, st.uuids()),
    DeviceStateTransfer: st.builds(DeviceStateTransfer, st.integers(0, 1), st.just(0)),
    MMapRequest: st.builds(MMapRequest, U8, U64S, U64S, U64S, st.integers(0, 1)),
    ShmemConfig: st.lists(U64S, max_size=256).map(lambda s: ShmemConfig(tuple(s))),
    RawPayload: st.binary(max_size=4096).map(RawPayload),
}

# Byte ranges a decoder ignores (padding): encode(decode(b)) zeroes them.
PADDING: dict[type[Any], list[slice]] = {
    MemRegMsg: [slice(0, 8)],
    IotlbMsg: [slice(26, 32)],
    Inflight: [slice(20, 24)],
    MMapRequest: [slice(1, 8)],
    MemoryTable: [slice(4, 8)],
    ShmemConfig: [slice(4, 8)],
}


def test_every_payload_class_has_a_strategy() -> None:
    assert set(PAYLOADS) == set(PAYLOAD_TYPES)


@pytest.mark.parametrize("cls", PAYLOAD_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=60)
@given(data=st.data())
def test_decode_encode_inverse(cls: type[Payload], data: st.DataObject) -> None:
    value = data.draw(PAYLOADS[cls])
    wire = value.encode()
    assert cls.SIZE is None or len(wire) == cls.SIZE
    decoded = cls.decode(wire, request="TEST")
    assert decoded == value
    assert decoded.encode() == wire
    assert cls.decode(memoryview(wire), request="TEST") == value


def _zero_padding(cls: type[Any], raw: bytes) -> bytes:
    buf = bytearray(raw)
    for cut in PADDING.get(cls, []):
        buf[cut] = bytes(len(buf[cut]))
    return bytes(buf)


@pytest.mark.parametrize("cls", [c for c in PAYLOAD_TYPES if c.SIZE], ids=lambda c: c.__name__)
@settings(max_examples=80)
@given(data=st.data())
def test_any_valid_bytes_reencode_identically(cls: type[Payload], data: st.DataObject) -> None:
    assert cls.SIZE is not None
    raw = data.draw(st.binary(min_size=cls.SIZE, max_size=cls.SIZE))
    try:
        decoded = cls.decode(raw, request="TEST")
    except ProtocolError as exc:
        assert exc.request == "TEST"
        assert exc.field
        return
    assert decoded.encode() == _zero_padding(cls, raw)


@pytest.mark.parametrize("cls", PAYLOAD_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=40)
@given(raw=st.binary(max_size=600))
def test_decode_arbitrary_bytes_only_raises_protocol_error(cls: type[Payload], raw: bytes) -> None:
    try:
        cls.decode(raw, request="TEST")
    except ProtocolError as exc:
        assert exc.field


def test_memory_table_with_trailing_padding_field_reencodes_with_zero() -> None:
    table = MemoryTable((MemoryRegion(0, 4096, 0x10000, 0),))
    wire = bytearray(table.encode())
    wire[4:8] = b"\xff\xff\xff\xff"
    assert MemoryTable.decode(bytes(wire), request="T") == table


def test_shmem_config_counts_non_zero_regions_and_drops_trailing_zeros() -> None:
    config = ShmemConfig((0, 4096, 0, 8192, 0, 0))
    assert config.memory_sizes == (0, 4096, 0, 8192)
    assert config.nregions == 2
    assert config.encode()[:4] == (2).to_bytes(4, "little")
    assert len(config.encode()) == 8 + 256 * 8


def test_wire_sizes_match_the_c_structs() -> None:
    assert len(IotlbMsg(0, 0, 0, 0, 1).encode()) == 32  # struct vhost_iotlb_msg
    assert len(Inflight(0, 0, 0, 0).encode()) == 24
    assert len(MemRegMsg(MemoryRegion(0, 1, 0, 0)).encode()) == 40
    assert len(MMapRequest(0, 0, 0, 0, 0).encode()) == 40
    assert len(VringAddr(0, 0, 0, 0, 0, 0).encode()) == 40
    assert len(MemoryTable(()).encode()) == 8


def test_vring_addr_wire_order_is_index_flags_desc_used_avail_log() -> None:
    wire = VringAddr(1, 0, 0x10, 0x20, 0x30, 0x40).encode()
    fields = [int.from_bytes(wire[i : i + 8], "little") for i in range(8, 40, 8)]
    assert wire[:8] == (1).to_bytes(4, "little") + bytes(4)
    assert fields == [0x10, 0x20, 0x30, 0x40]


def test_shared_object_uuid_is_big_endian_rfc4122() -> None:
    import uuid

    value = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
    assert SharedObject(value).encode() == bytes.fromhex("00112233445566778899aabbccddeeff")


# --- whole messages ---------------------------------------------------------------------

# Keyed by name: Request and BackendRequest numbers collide as IntEnum dict keys.
_CHECKED_PAYLOADS: dict[str, st.SearchStrategy[Any]] = {
    "SET_VRING_KICK": st.integers(0, 0x1FF).map(U64),
    "SET_VRING_CALL": st.integers(0, 0x1FF).map(U64),
    "SET_VRING_ERR": st.integers(0, 0x1FF).map(U64),
    "GET_VRING_BASE": st.builds(VringState, U32, st.just(0)),
    "VRING_KICK": st.builds(VringState, U32, st.just(0)),
    "SET_VRING_ENDIAN": st.builds(VringState, U32, st.integers(0, 1)),
    "SET_VRING_ENABLE": st.builds(VringState, U32, st.integers(0, 1)),
    "BACKEND_VRING_CALL": st.builds(VringState, U32, st.just(0)),
    "BACKEND_VRING_ERR": st.builds(VringState, U32, st.just(0)),
}


def _key(request: Request | BackendRequest) -> str:
    return f"BACKEND_{request.name}" if isinstance(request, BackendRequest) else request.name


def _fd_count(request: Request | BackendRequest, payload: Payload) -> int:
    if isinstance(payload, MemoryTable):
        return len(payload.regions)
    if isinstance(payload, U64) and _key(request) in _CHECKED_PAYLOADS:
        return 0 if payload.value & VRING_NOFD else 1
    if isinstance(payload, VringArea):
        return 0 if payload.nofd else 1
    return spec_for(request).fds[1]


@st.composite
def requests(draw: st.DrawFn) -> tuple[Message, bool]:
    backend = draw(st.booleans())
    table: Any = BACKEND_REQUESTS if backend else FRONTEND_REQUESTS
    request = draw(st.sampled_from(sorted(table)))
    spec = table[request]
    payload = draw(_CHECKED_PAYLOADS.get(_key(request), PAYLOADS[spec.payload]))
    fds = [FAKE_FD + i for i in range(_fd_count(request, payload))]
    return encode_request(request, payload, need_reply=draw(st.booleans()), fds=fds), backend


@settings(max_examples=300)
@given(case=requests())
def test_request_roundtrip_through_encode_message(case: tuple[Message, bool]) -> None:
    msg, backend = case
    wire, fds = encode_message(msg)
    header = decode_header(wire[:HEADER_SIZE], backend_channel=backend)
    assert header.size == len(wire) - HEADER_SIZE
    decoded = decode_request(header, wire[HEADER_SIZE:], list(fds), backend_channel=backend)
    assert decoded == msg
    assert encode_message(decoded) == (wire, fds)
    assert decode_request_bytes(wire, list(fds), backend_channel=backend) == msg
    assert decoded.describe().startswith(msg.name)


@st.composite
def replies(draw: st.DrawFn) -> tuple[Message, bool]:
    backend = draw(st.booleans())
    table: Any = BACKEND_REQUESTS if backend else FRONTEND_REQUESTS
    request = draw(st.sampled_from(sorted(r for r in table if table[r].reply is not None)))
    spec = table[request]
    payload = draw(PAYLOADS[spec.reply])
    nfds = spec.reply_fds[1]
    if request is Request.SET_DEVICE_STATE_FD:
        payload = U64(draw(st.sampled_from([0, 0x100, 0x101])))
        nfds = 0 if payload.value else 1
    if request is BackendRequest.SHARED_OBJECT_LOOKUP:
        payload = U64(0)
    if not spec.always_replies and spec.reply is not U64 and len(payload.encode()) == 8:
        payload = U64(0)  # an 8-byte reply to a NEED_REPLY request is the ack
        nfds = 0
    fds = [FAKE_FD + i for i in range(nfds)]
    return encode_reply(request, payload, fds=fds), backend


@settings(max_examples=200)
@given(case=replies())
def test_reply_roundtrip(case: tuple[Message, bool]) -> None:
    msg, backend = case
    wire, fds = encode_message(msg)
    header = decode_header(wire[:HEADER_SIZE], backend_channel=backend)
    decoded = decode_reply(
        msg.request, header, wire[HEADER_SIZE:], list(fds), backend_channel=backend
    )
    assert decoded == msg
    assert decoded.is_reply and not decoded.need_reply


@pytest.mark.parametrize(
    "request_", [Request.SET_MEM_TABLE, Request.SET_VRING_NUM, Request.ADD_MEM_REG]
)
def test_u64_ack_accepted_for_requests_that_reply_only_on_need_reply(
    request_: Request,
) -> None:
    msg = encode_reply(request_, U64(0))
    wire, _ = encode_message(msg)
    header = decode_header(wire[:HEADER_SIZE], backend_channel=False)
    assert decode_reply(request_, header, wire[HEADER_SIZE:], []).payload == U64(0)


def test_get_config_empty_reply_signals_failure() -> None:
    msg = encode_reply(Request.GET_CONFIG, Empty())
    wire, _ = encode_message(msg)
    header = decode_header(wire[:HEADER_SIZE], backend_channel=False)
    assert decode_reply(Request.GET_CONFIG, header, b"", []).payload == Empty()


def test_describe_names_request_fields_and_fds() -> None:
    msg = encode_request(
        Request.SET_VRING_ADDR, VringAddr(3, 1, 0x1000, 0x2000, 0x3000, 0), need_reply=True
    )
    text = msg.describe()
    assert text.startswith("SET_VRING_ADDR need_reply index=3 flags=0x1 desc=0x1000")
    kick = encode_request(Request.SET_VRING_KICK, U64(2), fds=[FAKE_FD])
    assert kick.describe() == "SET_VRING_KICK u64=0x2 fds=1"
    reply = encode_reply(Request.GET_PROTOCOL_FEATURES, U64(0b1001))
    assert reply.describe() == "GET_PROTOCOL_FEATURES reply u64=0x9 (MQ|REPLY_ACK)"
    backend = encode_request(BackendRequest.CONFIG_CHANGE_MSG)
    assert backend.describe() == "BACKEND_CONFIG_CHANGE_MSG"
