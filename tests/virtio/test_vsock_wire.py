"""The virtio-vsock wire format: numbers and layout against this machine's C headers, the header
codec (every field, round trip), field-naming errors, and check_packet's verdicts."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import fields, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvhost.errors import ProtocolError
from pyvhost.virtio.features import feature_names
from pyvhost.virtio.vsock import wire
from pyvhost.virtio.vsock.wire import (
    Op,
    Packet,
    Shutdown,
    Type,
    VsockConfig,
    VsockEvent,
    VsockHeader,
    check_packet,
    rst_reply,
)

HEADERS = (Path("/usr/include/linux/virtio_vsock.h"), Path("/usr/include/linux/vm_sockets.h"))
WIDTHS = {
    "src_cid": 64,
    "dst_cid": 64,
    "src_port": 32,
    "dst_port": 32,
    "len": 32,
    "type": 16,
    "op": 16,
    "flags": 32,
    "buf_alloc": 32,
    "fwd_cnt": 32,
}
CONSTANTS = {
    "VIRTIO_VSOCK_F_SEQPACKET": wire.F_SEQPACKET,
    "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET": wire.EventId.TRANSPORT_RESET,
    "VIRTIO_VSOCK_TYPE_STREAM": Type.STREAM,
    "VIRTIO_VSOCK_TYPE_SEQPACKET": Type.SEQPACKET,
    **{f"VIRTIO_VSOCK_OP_{op.name}": op for op in Op},
    "VIRTIO_VSOCK_SHUTDOWN_RCV": Shutdown.RCV,
    "VIRTIO_VSOCK_SHUTDOWN_SEND": Shutdown.SEND,
    "VIRTIO_VSOCK_SEQ_EOM": wire.SEQ_EOM,
    "VIRTIO_VSOCK_SEQ_EOR": wire.SEQ_EOR,
    "VMADDR_CID_ANY": wire.VMADDR_CID_ANY,
    "VMADDR_PORT_ANY": wire.VMADDR_PORT_ANY,
    "VMADDR_CID_HYPERVISOR": wire.VMADDR_CID_HYPERVISOR,
    "VMADDR_CID_LOCAL": wire.VMADDR_CID_LOCAL,
    "VMADDR_CID_HOST": wire.VMADDR_CID_HOST,
}


def header(**changes: int) -> VsockHeader:
    """A valid STREAM RW header from 3:1024 to 2:5000, with ``changes``."""
    base = VsockHeader(3, 2, 1024, 5000, 0, Type.STREAM, Op.RW, 0, 4096, 0)
    return replace(base, **changes)


@pytest.fixture(scope="module")
def from_c(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Every constant, struct size and header field offset as the C compiler sees them."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not all(path.exists() for path in HEADERS):
        pytest.skip("needs a C compiler and linux-libc-dev (apt-get install gcc linux-libc-dev)")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <sys/socket.h>",
        "#include <linux/virtio_vsock.h>",
        "#include <linux/vm_sockets.h>",
        "int main(void) {",
    ]
    for name in CONSTANTS:
        lines.append(f' printf("{name} %lu\\n", (unsigned long){name});')
    for struct in ("virtio_vsock_hdr", "virtio_vsock_config", "virtio_vsock_event"):
        lines.append(f' printf("sizeof_{struct} %zu\\n", sizeof(struct {struct}));')
    for field in WIDTHS:
        lines.append(
            f' printf("offsetof_{field} %zu\\n", offsetof(struct virtio_vsock_hdr, {field}));'
        )
        lines.append(
            f' printf("sizeof_{field} %zu\\n", sizeof(((struct virtio_vsock_hdr *)0)->{field}));'
        )
    lines.append(" return 0;\n}")
    folder = tmp_path_factory.mktemp("vsock-h")
    source, binary = folder / "numbers.c", folder / "numbers"
    source.write_text("\n".join(lines))
    subprocess.run([cc, "-o", str(binary), str(source)], check=True, capture_output=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def test_every_constant_matches_the_headers(from_c: dict[str, int]) -> None:
    for name, value in CONSTANTS.items():
        assert int(value) == from_c[name], name


def test_struct_sizes_match_the_headers(from_c: dict[str, int]) -> None:
    assert wire.HEADER_SIZE == VsockHeader.SIZE == from_c["sizeof_virtio_vsock_hdr"] == 44
    assert from_c["sizeof_virtio_vsock_config"] == VsockConfig.SIZE
    assert from_c["sizeof_virtio_vsock_event"] == VsockEvent.SIZE


def test_every_field_sits_where_the_header_puts_it(from_c: dict[str, int]) -> None:
    """Each field encoded alone lands at the C offset, little-endian, with the C width."""
    assert [f.name for f in fields(VsockHeader)] == list(WIDTHS)
    for name, bits in WIDTHS.items():
        zero = VsockHeader(*([0] * len(WIDTHS)))
        value = (1 << bits) - 2
        encoded = replace(zero, **{name: value}).encode()
        offset, size = from_c[f"offsetof_{name}"], from_c[f"sizeof_{name}"]
        assert size * 8 == bits, name
        expected = bytearray(44)
        expected[offset : offset + size] = value.to_bytes(size, "little")
        assert encoded == bytes(expected), name


def test_the_other_numbers() -> None:
    """Queue numbers and CID 2 from the virtio spec; Linux's packet and buffer sizes."""
    assert (wire.RX_QUEUE, wire.TX_QUEUE, wire.EVENT_QUEUE) == (0, 1, 2)
    assert wire.HOST_CID == 2
    assert wire.MAX_PKT_BUF_SIZE == 64 * 1024
    assert wire.DEFAULT_BUF_ALLOC == 256 * 1024
    assert feature_names(0b11, "vsock") == ["STREAM", "SEQPACKET"]


header_values = st.builds(
    VsockHeader, **{name: st.integers(0, (1 << bits) - 1) for name, bits in WIDTHS.items()}
)


@given(header_values)
def test_header_round_trip(original: VsockHeader) -> None:
    encoded = original.encode()
    assert len(encoded) == 44
    assert VsockHeader.decode(encoded) == original
    assert VsockHeader.decode(memoryview(bytearray(encoded))) == original


@given(st.binary(min_size=44, max_size=44))
def test_any_44_bytes_decode_and_encode_back(data: bytes) -> None:
    assert VsockHeader.decode(data).encode() == data


@pytest.mark.parametrize("size", [0, 43, 45, 88])
def test_decode_names_the_size(size: int) -> None:
    with pytest.raises(ProtocolError, match=rf"size: {size} bytes, expected 44") as info:
        VsockHeader.decode(bytes(size))
    assert info.value.field == "size"


@pytest.mark.parametrize(("name", "bits"), WIDTHS.items())
@pytest.mark.parametrize("too_big", [False, True])
def test_an_out_of_range_field_is_named(name: str, bits: int, too_big: bool) -> None:
    value = 1 << bits if too_big else -1
    with pytest.raises(ProtocolError, match=rf"{name}: {value} does not fit in u{bits}") as info:
        header(**{name: value})
    assert info.value.field == name


@pytest.mark.parametrize(
    ("changes", "payload", "field", "text"),
    [
        ({"type": Type.SEQPACKET}, b"", "type", "SEQPACKET is not supported"),
        ({"type": 0}, b"", "type", "0 is not a socket type"),
        ({"type": 9}, b"", "type", "9 is not a socket type"),
        ({"op": 0}, b"", "op", "0 is not an operation"),
        ({"op": 8}, b"", "op", "8 is not an operation"),
        ({"op": 0xFFFF}, b"", "op", "65535 is not an operation"),
        ({"len": 5}, b"abc", "len", "5 but the payload is 3 bytes"),
        ({"len": 0}, b"abc", "len", "0 but the payload is 3 bytes"),
        ({"op": Op.REQUEST, "len": 2}, b"ab", "len", "2: only RW carries a payload"),
        ({"op": Op.RST, "len": 1}, b"a", "len", "1: only RW carries a payload"),
    ],
)
def test_check_packet_names_the_field(
    changes: dict[str, int], payload: bytes, field: str, text: str
) -> None:
    with pytest.raises(ProtocolError, match=text) as info:
        check_packet(header(**changes), payload)
    assert info.value.field == field


@pytest.mark.parametrize("op", [op for op in Op if op is not Op.INVALID])
def test_check_packet_accepts_every_stream_op(op: Op) -> None:
    payload = b"xyz" if op is Op.RW else b""
    check_packet(header(op=op, len=len(payload)), payload)


def test_check_packet_error_names_the_op() -> None:
    with pytest.raises(ProtocolError) as info:
        check_packet(header(op=Op.SHUTDOWN, len=1), b"x")
    assert info.value.request == "SHUTDOWN"
    assert str(info.value) == "SHUTDOWN: virtio_vsock_hdr: len: 1: only RW carries a payload"


def test_rst_reply_swaps_the_addresses_and_keeps_the_type() -> None:
    asked = header(op=Op.REQUEST, type=Type.SEQPACKET, flags=3, buf_alloc=9, fwd_cnt=7)
    assert rst_reply(asked) == VsockHeader(2, 3, 5000, 1024, 0, Type.SEQPACKET, Op.RST, 0, 0, 0)


def test_packet_codec() -> None:
    packet = Packet(header(len=5), b"hello")
    data = packet.encode()
    assert data == packet.header.encode() + b"hello"
    assert Packet.decode(data) == packet
    assert Packet.decode(data[:44]).payload == b""
    with pytest.raises(ProtocolError, match="43 bytes, shorter than the 44-byte header"):
        Packet.decode(data[:43])


def test_describe_names_the_op() -> None:
    assert header(op=Op.CREDIT_UPDATE).describe() == (
        "3:1024 -> 2:5000 CREDIT_UPDATE type=1 len=0 flags=0x0 buf_alloc=4096 fwd_cnt=0"
    )
    assert "op99" in header(op=99).describe()


def test_config_codec_and_reserved_cids() -> None:
    assert VsockConfig.decode(VsockConfig(3).encode()) == VsockConfig(3)
    assert VsockConfig(3).encode() == (3).to_bytes(8, "little")
    for cid in (0, 1, 2, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF):
        with pytest.raises(ProtocolError, match=r"guest_cid: .* is reserved") as info:
            VsockConfig.decode(cid.to_bytes(8, "little"))
        assert info.value.field == "guest_cid"
    with pytest.raises(ProtocolError, match="reserved upper 32 bits"):
        VsockConfig(1 << 32 | 3)
    with pytest.raises(ProtocolError, match="size: 4 bytes, expected 8"):
        VsockConfig.decode(bytes(4))


def test_event_codec() -> None:
    reset = VsockEvent(wire.EventId.TRANSPORT_RESET)
    assert reset.encode() == bytes(4)
    assert VsockEvent.decode(bytes(4)) == reset
    assert VsockEvent.decode((7).to_bytes(4, "little")).id == 7
    with pytest.raises(ProtocolError, match="size: 8 bytes, expected 4"):
        VsockEvent.decode(bytes(8))
    with pytest.raises(ProtocolError, match="id: 4294967296 does not fit in u32"):
        VsockEvent(1 << 32)
