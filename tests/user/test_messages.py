"""Validation rules of the codec: one test per rule, each checking request and field names."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from pyvhost.errors import ProtocolError
from pyvhost.user.messages import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    U64,
    VERSION,
    BackendRequest,
    Config,
    DeviceStateTransfer,
    Empty,
    Header,
    IotlbMsg,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    Message,
    MMapRequest,
    RawPayload,
    Request,
    ShmemConfig,
    VringAddr,
    VringArea,
    VringState,
    decode_header,
    decode_reply,
    decode_request,
    encode_message,
    encode_reply,
    encode_request,
    protocol_feature_names,
    replies_expected,
    spec_for,
)
from pyvhost.virtio.features import feature_names

REGION = MemoryRegion(0x0, 0x10000, 0x7F00_0000_0000, 0)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def make_fds(n: int) -> list[int]:
    return [os.eventfd(0) for _ in range(n)]


def header_for(request: int, payload: bytes, flags: int = VERSION) -> Header:
    return Header(request, flags, len(payload))


def reject(
    request: int,
    payload: bytes,
    *,
    nfds: int = 0,
    flags: int = VERSION,
    backend_channel: bool = False,
) -> ProtocolError:
    """Decode a request that must be rejected; check its fds were closed; return the error."""
    before = open_fds()
    fds = make_fds(nfds)
    with pytest.raises(ProtocolError) as info:
        decode_request(
            header_for(request, payload, flags), payload, fds, backend_channel=backend_channel
        )
    assert fds == []
    assert open_fds() == before
    return info.value


def accept(
    request: int, payload: bytes, *, nfds: int = 0, backend_channel: bool = False
) -> Message:
    fds = make_fds(nfds)
    msg = decode_request(
        header_for(request, payload), payload, fds, backend_channel=backend_channel
    )
    assert len(msg.fds) == nfds
    for fd in msg.fds:
        os.close(fd)
    return msg


def assert_names(err: ProtocolError, request: str, field: str) -> None:
    assert err.request == request
    assert err.field == field
    assert str(err).startswith(f"{request}: ")
    assert field in str(err)


# --- header ---------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3])
def test_header_version_must_be_1(flags: int) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_header(struct.pack("<III", 1, flags, 0), backend_channel=False)
    assert_names(info.value, "GET_FEATURES", "flags")
    assert "version" in str(info.value)


@pytest.mark.parametrize("bit", [4, 5, 16, 31])
def test_header_reserved_flag_bits_rejected(bit: int) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_header(struct.pack("<III", 2, VERSION | 1 << bit, 8), backend_channel=False)
    assert_names(info.value, "SET_FEATURES", "flags")
    assert "reserved" in str(info.value)


def test_header_size_over_4096_rejected() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_header(struct.pack("<III", 5, VERSION, MAX_PAYLOAD_SIZE + 1), backend_channel=False)
    assert_names(info.value, "SET_MEM_TABLE", "size")


def test_header_must_be_12_bytes() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_header(b"\x01\x00\x00\x00", backend_channel=False)
    assert info.value.field == "header"


def test_header_names_backend_requests_on_the_backend_channel() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_header(struct.pack("<III", 2, 0, 0), backend_channel=True)
    assert_names(info.value, "BACKEND_CONFIG_CHANGE_MSG", "flags")


def test_header_accepts_need_reply_and_reply_flags() -> None:
    raw = struct.pack("<III", 1, VERSION | FLAG_REPLY | FLAG_NEED_REPLY, 8)
    assert decode_header(raw, backend_channel=False) == Header(1, 0xD, 8)


# --- request-level rules ------------------------------------------------------------------


def test_reply_flag_on_a_request_rejected() -> None:
    err = reject(Request.SET_FEATURES, U64(1).encode(), flags=VERSION | FLAG_REPLY)
    assert_names(err, "SET_FEATURES", "flags")
    assert "REPLY" in str(err)


@pytest.mark.parametrize("number", [0, 45, 1000, 0xFFFFFFFF])
def test_unknown_frontend_request_rejected(number: int) -> None:
    err = reject(number, b"", nfds=1)
    assert_names(err, f"request {number}", "request")


@pytest.mark.parametrize("number", [0, 11, 22])
def test_unknown_backend_request_rejected(number: int) -> None:
    err = reject(number, b"", backend_channel=True)
    assert_names(err, f"request {number}", "request")
    assert "back-end" in str(err)


@pytest.mark.parametrize(
    ("request_", "size"),
    [
        (Request.SET_FEATURES, 4),
        (Request.SET_VRING_NUM, 12),
        (Request.SET_VRING_ADDR, 32),
        (Request.IOTLB_MSG, 26),
        (Request.SET_INFLIGHT_FD, 20),
        (Request.GET_FEATURES, 8),
        (Request.ADD_MEM_REG, 32),
        (Request.SET_DEVICE_STATE_FD, 16),
        (Request.GET_SHARED_OBJECT, 15),
        (Request.SET_LOG_BASE, 8),
    ],
)
def test_fixed_layout_payload_size_must_be_exact(request_: Request, size: int) -> None:
    err = reject(request_, bytes(size), nfds=spec_for(request_).fds[0])
    assert_names(err, request_.name, "size")


def test_header_size_must_match_payload_length() -> None:
    before = open_fds()
    fds = make_fds(1)
    with pytest.raises(ProtocolError) as info:
        decode_request(Header(Request.SET_VRING_KICK, VERSION, 16), U64(0).encode(), fds)
    assert_names(info.value, "SET_VRING_KICK", "size")
    assert open_fds() == before


def test_variable_payload_bounded_by_4096() -> None:
    payload = bytes(MAX_PAYLOAD_SIZE + 1)
    err = reject(Request.CREATE_CRYPTO_SESSION, payload)
    assert_names(err, "CREATE_CRYPTO_SESSION", "size")
    with pytest.raises(ProtocolError):
        RawPayload.decode(payload, request="CREATE_CRYPTO_SESSION")


@pytest.mark.parametrize(
    ("request_", "payload", "nfds"),
    [
        (Request.SET_MEM_TABLE, MemoryTable((REGION,)).encode(), 0),
        (Request.SET_MEM_TABLE, MemoryTable((REGION,)).encode(), 2),
        (Request.ADD_MEM_REG, MemRegMsg(REGION).encode(), 0),
        (Request.ADD_MEM_REG, MemRegMsg(REGION).encode(), 2),
        (Request.REM_MEM_REG, MemRegMsg(REGION).encode(), 2),
        (Request.SET_VRING_KICK, U64(0).encode(), 0),
        (Request.SET_VRING_CALL, U64(0x100).encode(), 1),
        (Request.SET_VRING_ERR, U64(1).encode(), 2),
        (Request.SET_LOG_BASE, bytes(16), 2),
        (Request.SET_LOG_FD, b"", 0),
        (Request.SET_BACKEND_REQ_FD, b"", 0),
        (Request.SET_INFLIGHT_FD, bytes(24), 0),
        (Request.SET_DEVICE_STATE_FD, bytes(8), 0),
        (Request.GPU_SET_SOCKET, b"", 2),
        (Request.SET_FEATURES, U64(0).encode(), 1),
        (Request.GET_FEATURES, b"", 1),
        (Request.SET_VRING_ADDR, bytes(40), 1),
    ],
)
def test_fd_count_per_request(request_: Request, payload: bytes, nfds: int) -> None:
    err = reject(request_, payload, nfds=nfds)
    assert_names(err, request_.name, "fds")
    assert f"got {nfds} fds" in str(err)


@pytest.mark.parametrize(
    ("request_", "payload", "nfds"),
    [
        (Request.SET_MEM_TABLE, MemoryTable((REGION,)).encode(), 1),
        (Request.SET_MEM_TABLE, MemoryTable(()).encode(), 0),
        (Request.ADD_MEM_REG, MemRegMsg(REGION).encode(), 1),
        (Request.REM_MEM_REG, MemRegMsg(REGION).encode(), 0),
        (Request.REM_MEM_REG, MemRegMsg(REGION).encode(), 1),
        (Request.SET_VRING_KICK, U64(0xFF).encode(), 1),
        (Request.SET_VRING_KICK, U64(0x1FF).encode(), 0),
        (Request.SET_LOG_BASE, bytes(16), 0),
        (Request.SET_LOG_BASE, bytes(16), 1),
        (Request.SET_LOG_FD, b"", 1),
        (Request.SET_BACKEND_REQ_FD, b"", 1),
        (Request.GPU_SET_SOCKET, b"", 1),
    ],
)
def test_fd_counts_accepted(request_: Request, payload: bytes, nfds: int) -> None:
    assert accept(request_, payload, nfds=nfds).request is request_


def test_set_mem_table_needs_exactly_nregions_fds() -> None:
    table = MemoryTable((REGION, MemoryRegion(0x100000, 0x1000, 0x1000, 0)))
    err = reject(Request.SET_MEM_TABLE, table.encode(), nfds=1)
    assert_names(err, "SET_MEM_TABLE", "fds")
    assert "nregions 2" in str(err)
    assert len(accept(Request.SET_MEM_TABLE, table.encode(), nfds=2).fds) == 2


@pytest.mark.parametrize("value", [0x200, 1 << 63, 0x1_0000_0000])
def test_vring_fd_u64_bits_above_nofd_rejected(value: int) -> None:
    err = reject(Request.SET_VRING_CALL, U64(value).encode(), nfds=1)
    assert_names(err, "SET_VRING_CALL", "u64")


def test_host_notifier_u64_bits_above_nofd_rejected() -> None:
    payload = VringArea(0x200, 0x1000, 0).encode()
    err = reject(BackendRequest.VRING_HOST_NOTIFIER_MSG, payload, nfds=1, backend_channel=True)
    assert_names(err, "BACKEND_VRING_HOST_NOTIFIER_MSG", "u64")


def test_host_notifier_fd_follows_nofd_bit() -> None:
    with_fd = VringArea(1, 0x1000, 0).encode()
    without = VringArea(0x101, 0, 0).encode()
    err = reject(BackendRequest.VRING_HOST_NOTIFIER_MSG, with_fd, backend_channel=True)
    assert_names(err, "BACKEND_VRING_HOST_NOTIFIER_MSG", "fds")
    msg = accept(BackendRequest.VRING_HOST_NOTIFIER_MSG, without, backend_channel=True)
    assert msg.payload == VringArea(0x101, 0, 0)
    assert msg.payload_as(VringArea).nofd and msg.payload_as(VringArea).index == 1


# --- memory regions -----------------------------------------------------------------------


def table(*regions: MemoryRegion) -> bytes:
    return MemoryTable(regions).encode()


@pytest.mark.parametrize(
    ("region", "field"),
    [
        (MemoryRegion(0, 0, 0, 0), "memory_size"),
        (MemoryRegion((1 << 64) - 0x1000, 0x2000, 0, 0), "guest_phys_addr"),
        (MemoryRegion(0, 0x2000, (1 << 64) - 0x1000, 0), "userspace_addr"),
        (MemoryRegion(0, 0x2000, 0, (1 << 64) - 0x1000), "mmap_offset"),
    ],
)
def test_memory_region_rejected(region: MemoryRegion, field: str) -> None:
    err = reject(Request.SET_MEM_TABLE, table(REGION, region), nfds=2)
    assert_names(err, "SET_MEM_TABLE", field)
    assert "regions[1]" in str(err)
    err = reject(Request.ADD_MEM_REG, MemRegMsg(region).encode(), nfds=1)
    assert_names(err, "ADD_MEM_REG", field)


def test_memory_region_ending_exactly_at_2_64_accepted() -> None:
    region = MemoryRegion((1 << 64) - 0x1000, 0x1000, (1 << 64) - 0x1000, 0)
    assert accept(Request.SET_MEM_TABLE, table(region), nfds=1).payload == MemoryTable((region,))


def test_memory_table_guest_ranges_must_not_overlap() -> None:
    a = MemoryRegion(0x0, 0x2000, 0x10000, 0)
    b = MemoryRegion(0x1000, 0x1000, 0x20000, 0)
    err = reject(Request.SET_MEM_TABLE, table(a, b), nfds=2)
    assert_names(err, "SET_MEM_TABLE", "guest_phys_addr")
    assert "regions[0] and regions[1] overlap" in str(err)


def test_memory_table_user_ranges_must_not_overlap() -> None:
    a = MemoryRegion(0x100000, 0x1000, 0x20000, 0)
    b = MemoryRegion(0x0, 0x2000, 0x1F000, 0)
    c = MemoryRegion(0x200000, 0x1000, 0x1000, 0)
    err = reject(Request.SET_MEM_TABLE, table(a, c, b), nfds=3)
    assert_names(err, "SET_MEM_TABLE", "userspace_addr")
    assert "regions[0] and regions[2]" in str(err)


def test_memory_table_adjacent_regions_accepted() -> None:
    a = MemoryRegion(0x0, 0x1000, 0x10000, 0)
    b = MemoryRegion(0x1000, 0x1000, 0x11000, 0x1000)
    assert len(accept(Request.SET_MEM_TABLE, table(a, b), nfds=2).fds) == 2


def test_memory_table_more_than_8_regions_rejected() -> None:
    raw = struct.pack("<II", 9, 0) + b"".join(
        MemoryRegion(i << 20, 0x1000, i << 20, 0).encode() for i in range(9)
    )
    err = reject(Request.SET_MEM_TABLE, raw, nfds=8)
    assert_names(err, "SET_MEM_TABLE", "nregions")


def test_memory_table_size_must_match_nregions() -> None:
    raw = struct.pack("<II", 2, 0) + REGION.encode()
    err = reject(Request.SET_MEM_TABLE, raw, nfds=2)
    assert_names(err, "SET_MEM_TABLE", "size")
    err = reject(Request.SET_MEM_TABLE, b"\x00\x00\x00", nfds=0)
    assert_names(err, "SET_MEM_TABLE", "size")


# --- config -------------------------------------------------------------------------------


def test_config_size_over_256_rejected() -> None:
    raw = struct.pack("<III", 0, 257, 0) + bytes(257)
    err = reject(Request.SET_CONFIG, raw)
    assert_names(err, "SET_CONFIG", "size")


def test_config_offset_plus_size_over_256_rejected() -> None:
    raw = struct.pack("<III", 200, 60, 0) + bytes(60)
    err = reject(Request.GET_CONFIG, raw)
    assert_names(err, "GET_CONFIG", "offset")


def test_config_payload_length_must_match_size_field() -> None:
    raw = struct.pack("<III", 0, 8, 0) + bytes(4)
    err = reject(Request.SET_CONFIG, raw)
    assert_names(err, "SET_CONFIG", "size")


def test_config_flags_must_be_0_or_1() -> None:
    raw = Config(0, 0, b"ab").encode()
    raw = raw[:8] + struct.pack("<I", 2) + raw[12:]
    err = reject(Request.SET_CONFIG, raw)
    assert_names(err, "SET_CONFIG", "flags")


def test_config_full_window_accepted() -> None:
    msg = accept(Request.SET_CONFIG, Config(0, 1, bytes(range(256))).encode())
    assert msg.payload_as(Config).data == bytes(range(256))


# --- vrings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "field"),
    [
        (VringAddr(0, 0, 0x1008, 0x2000, 0x3000, 0), "desc_user_addr"),
        (VringAddr(0, 0, 0x1000, 0x2002, 0x3000, 0), "used_user_addr"),
        (VringAddr(0, 0, 0x1000, 0x2000, 0x3001, 0), "avail_user_addr"),
        (VringAddr(0, 2, 0x1000, 0x2000, 0x3000, 0), "flags"),
    ],
)
def test_vring_addr_alignment_and_flags(addr: VringAddr, field: str) -> None:
    err = reject(Request.SET_VRING_ADDR, addr.encode())
    assert_names(err, "SET_VRING_ADDR", field)


def test_vring_addr_minimum_alignments_accepted() -> None:
    addr = VringAddr(1, 1, 0x1010, 0x2004, 0x3002, 0x5)
    assert accept(Request.SET_VRING_ADDR, addr.encode()).payload == addr


@pytest.mark.parametrize("num", [2, 0xFFFFFFFF])
def test_set_vring_endian_num_must_be_0_or_1(num: int) -> None:
    err = reject(Request.SET_VRING_ENDIAN, VringState(0, num).encode())
    assert_names(err, "SET_VRING_ENDIAN", "num")


def test_get_vring_base_num_must_be_0() -> None:
    err = reject(Request.GET_VRING_BASE, VringState(1, 1).encode())
    assert_names(err, "GET_VRING_BASE", "num")
    assert accept(Request.GET_VRING_BASE, VringState(1, 0).encode()).payload == VringState(1, 0)


def test_inband_kick_num_must_be_0() -> None:
    err = reject(Request.VRING_KICK, VringState(1, 1).encode())
    assert_names(err, "VRING_KICK", "num")


def test_set_vring_enable_num_must_be_0_or_1() -> None:
    err = reject(Request.SET_VRING_ENABLE, VringState(0, 2).encode())
    assert_names(err, "SET_VRING_ENABLE", "num")


# --- other payload values -----------------------------------------------------------------


def test_iotlb_perm_and_type_checked() -> None:
    err = reject(Request.IOTLB_MSG, IotlbMsg(0, 0x1000, 0, 4, 2).encode())
    assert_names(err, "IOTLB_MSG", "perm")
    err = reject(Request.IOTLB_MSG, IotlbMsg(0, 0x1000, 0, 3, 0).encode())
    assert_names(err, "IOTLB_MSG", "type")


def test_device_state_direction_and_phase_checked() -> None:
    err = reject(Request.SET_DEVICE_STATE_FD, DeviceStateTransfer(2, 0).encode(), nfds=1)
    assert_names(err, "SET_DEVICE_STATE_FD", "direction")
    err = reject(Request.SET_DEVICE_STATE_FD, DeviceStateTransfer(1, 1).encode(), nfds=1)
    assert_names(err, "SET_DEVICE_STATE_FD", "phase")


def test_mmap_request_unknown_flags_rejected() -> None:
    raw = MMapRequest(0, 0, 0, 0x1000, 2).encode()
    err = reject(BackendRequest.SHMEM_UNMAP, raw, backend_channel=True)
    assert_names(err, "BACKEND_SHMEM_UNMAP", "flags")


def test_shmem_config_nregions_must_count_non_zero_sizes() -> None:
    raw = bytearray(ShmemConfig((4096, 0, 4096)).encode())
    raw[0:4] = struct.pack("<I", 3)
    with pytest.raises(ProtocolError) as info:
        ShmemConfig.decode(bytes(raw), request="GET_SHMEM_CONFIG")
    assert_names(info.value, "GET_SHMEM_CONFIG", "nregions")


# --- replies ------------------------------------------------------------------------------


def reply_reject(
    request: Request | BackendRequest,
    payload: bytes,
    *,
    flags: int = VERSION | FLAG_REPLY,
    number: int | None = None,
    nfds: int = 0,
    backend_channel: bool = False,
) -> ProtocolError:
    before = open_fds()
    fds = make_fds(nfds)
    header = Header(int(request) if number is None else number, flags, len(payload))
    with pytest.raises(ProtocolError) as info:
        decode_reply(request, header, payload, fds, backend_channel=backend_channel)
    assert fds == []
    assert open_fds() == before
    return info.value


@pytest.mark.parametrize("flags", [VERSION, VERSION | FLAG_REPLY | FLAG_NEED_REPLY, FLAG_REPLY])
def test_reply_flags_must_be_exactly_reply_version(flags: int) -> None:
    err = reply_reject(Request.GET_FEATURES, U64(0).encode(), flags=flags, nfds=1)
    assert_names(err, "GET_FEATURES", "flags")


def test_reply_must_answer_the_same_request() -> None:
    err = reply_reject(Request.GET_FEATURES, U64(0).encode(), number=Request.GET_PROTOCOL_FEATURES)
    assert_names(err, "GET_FEATURES", "request")
    assert "GET_PROTOCOL_FEATURES" in str(err)


def test_reply_payload_size_checked() -> None:
    err = reply_reject(Request.GET_FEATURES, bytes(4))
    assert_names(err, "GET_FEATURES", "size")
    err = reply_reject(Request.GET_VRING_BASE, bytes(16))
    assert_names(err, "GET_VRING_BASE", "size")


def test_reply_fds_checked() -> None:
    err = reply_reject(Request.GET_FEATURES, U64(0).encode(), nfds=1)
    assert_names(err, "GET_FEATURES", "fds")
    err = reply_reject(Request.SET_DEVICE_STATE_FD, U64(0).encode(), nfds=0)
    assert_names(err, "SET_DEVICE_STATE_FD", "fds")
    err = reply_reject(Request.SET_DEVICE_STATE_FD, U64(0x100).encode(), nfds=1)
    assert_names(err, "SET_DEVICE_STATE_FD", "fds")


def test_backend_lookup_reply_failure_carries_no_fd() -> None:
    err = reply_reject(
        BackendRequest.SHARED_OBJECT_LOOKUP, U64(1).encode(), nfds=1, backend_channel=True
    )
    assert_names(err, "BACKEND_SHARED_OBJECT_LOOKUP", "fds")


def test_reply_with_fd_is_kept() -> None:
    fds = make_fds(1)
    payload = U64(0).encode()
    header = Header(Request.SET_DEVICE_STATE_FD, VERSION | FLAG_REPLY, 8)
    msg = decode_reply(Request.SET_DEVICE_STATE_FD, header, payload, fds)
    assert msg.fds == fds
    os.close(fds[0])


def test_encode_request_checks_payload_type_and_fds() -> None:
    with pytest.raises(TypeError, match="SET_FEATURES"):
        encode_request(Request.SET_FEATURES, Empty())
    with pytest.raises(ProtocolError) as info:
        encode_request(Request.SET_VRING_KICK, U64(0))
    assert_names(info.value, "SET_VRING_KICK", "fds")
    with pytest.raises(TypeError):
        encode_reply(Request.GET_FEATURES, VringState(0, 0))


def test_encode_message_bounds_fds_and_size() -> None:
    msg = Message(Request.SET_FEATURES, VERSION, U64(0), list(range(9)))
    with pytest.raises(ProtocolError) as info:
        encode_message(msg)
    assert_names(info.value, "SET_FEATURES", "fds")
    big = Message(Request.CREATE_CRYPTO_SESSION, VERSION, RawPayload(bytes(4097)))
    with pytest.raises(ProtocolError) as info:
        encode_message(big)
    assert_names(info.value, "CREATE_CRYPTO_SESSION", "size")


def test_replies_expected() -> None:
    assert replies_expected(encode_request(Request.GET_FEATURES))
    assert not replies_expected(encode_request(Request.SET_FEATURES, U64(0)))
    assert replies_expected(encode_request(Request.SET_FEATURES, U64(0), need_reply=True))
    log = Message(Request.SET_LOG_BASE, VERSION, U64(0))
    assert not replies_expected(log)
    assert replies_expected(log, protocol_features=1 << 1)


# --- fd hygiene ---------------------------------------------------------------------------


@pytest.fixture
def fd_leak_check() -> Iterator[None]:
    before = open_fds()
    yield
    assert open_fds() == before


@pytest.mark.usefixtures("fd_leak_check")
def test_many_rejections_leak_no_fds() -> None:
    for number in (Request.SET_MEM_TABLE, Request.SET_VRING_KICK, 99):
        fds = make_fds(8)
        with pytest.raises(ProtocolError):
            decode_request(Header(number, VERSION, 3), b"xyz", fds)
        assert fds == []


# --- names --------------------------------------------------------------------------------


def test_feature_and_protocol_feature_names() -> None:
    assert protocol_feature_names((1 << 0) | (1 << 3) | (1 << 22) | (1 << 40)) == [
        "MQ",
        "REPLY_ACK",
        "SHMEM",
        "bit40",
    ]
    bits = (1 << 32) | (1 << 30) | (1 << 26) | (1 << 9) | (1 << 12)
    assert feature_names(bits, "blk") == [
        "FLUSH",
        "MQ",
        "LOG_ALL",
        "PROTOCOL_FEATURES",
        "VERSION_1",
    ]
    assert feature_names(1 << 15, "net") == ["MRG_RXBUF"]
    assert feature_names(1 << 15) == ["bit15"]


def test_request_enums_match_spec_numbers() -> None:
    assert Request.SET_BACKEND_REQ_FD.value == 21
    assert Request.GPU_SET_SOCKET.value == 33
    assert Request.GET_SHMEM_CONFIG.value == 44
    assert len(Request) == 44
    assert [r.value for r in Request] == list(range(1, 45))
    assert [r.value for r in BackendRequest] == list(range(1, 11))
    assert HEADER_SIZE == 12


def test_memory_table_full_eight_slot_form_accepted() -> None:
    """The spec draws all eight slots: a front-end may send them, unused ones zero."""
    raw = table(REGION) + bytes(32 * 7)
    msg = accept(Request.SET_MEM_TABLE, raw, nfds=1)
    assert msg.payload == MemoryTable((REGION,))
    raw = struct.pack("<II", 2, 0) + REGION.encode() + bytes(32 * 5)
    err = reject(Request.SET_MEM_TABLE, raw, nfds=2)
    assert_names(err, "SET_MEM_TABLE", "size")
