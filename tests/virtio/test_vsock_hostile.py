"""Hostile packets from the guest to a host endpoint: each is dropped or answered with RST, with a
logged reason, and none raises out of feed(); an RST never gets an RST back."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvhost.virtio.vsock import (
    ConnectionOptions,
    ConnectionState,
    Op,
    Type,
    VsockConnection,
    VsockEndpoint,
    VsockHeader,
)

from .vsock_link import GUEST_CID, HOST_CID, from_guest

State = ConnectionState
BUF_ALLOC = 64


def host_with_connection() -> tuple[VsockEndpoint, VsockConnection]:
    """A host endpoint that accepted 3:1024 -> 2:5000 and sent its RESPONSE."""
    host = VsockEndpoint(
        HOST_CID, peer_cid=GUEST_CID, options=ConnectionOptions(buf_alloc=BUF_ALLOC)
    )
    host.listen(5000)
    conn = host.feed(*from_guest(Op.REQUEST))
    assert conn is not None
    assert [p.header.op for p in host.packets_to_send()] == [Op.RESPONSE]
    return host, conn


# (name, the packet, what the host does, the logged reason)
ON_THE_CONNECTION = [
    (
        "seqpacket",
        from_guest(Op.RW, b"x", type=Type.SEQPACKET),
        "reset",
        "type: SEQPACKET is not supported (only STREAM)",
    ),
    ("unknown type", from_guest(Op.RW, b"x", type=7), "reset", "type: 7 is not a socket type"),
    (
        "len above payload",
        from_guest(Op.RW, b"abc", len=10),
        "reset",
        "len: 10 but the payload is 3 bytes",
    ),
    ("len below payload", from_guest(Op.RW, b"abc", len=1), "reset", "len: 1 but the payload"),
    (
        "payload on a shutdown",
        from_guest(Op.SHUTDOWN, b"x", flags=3),
        "reset",
        "len: 1: only RW carries a payload",
    ),
    (
        "beyond credit",
        from_guest(Op.RW, bytes(BUF_ALLOC + 1)),
        "reset",
        f"RW of {BUF_ALLOC + 1} bytes beyond our credit (0 bytes unread, buf_alloc {BUF_ALLOC})",
    ),
    ("unknown op", from_guest(99), "drop", "op: 99 is not an operation"),
    ("invalid op", from_guest(Op.INVALID), "drop", "op: 0 is not an operation"),
    ("dst_cid not ours", from_guest(Op.RW, b"x", dst_cid=7), "drop", "dst_cid 7 is not ours (2)"),
    (
        "src_cid upper bits",
        from_guest(Op.RW, b"x", src_cid=1 << 32 | GUEST_CID),
        "drop",
        "src_cid 0x100000003 sets the reserved upper 32 bits",
    ),
    (
        "src_cid of another guest",
        from_guest(Op.RW, b"x", src_cid=4),
        "drop",
        "src_cid 4 is not the peer's (3)",
    ),
]


@pytest.mark.parametrize(
    ("packet", "outcome", "reason"),
    [case[1:] for case in ON_THE_CONNECTION],
    ids=[case[0] for case in ON_THE_CONNECTION],
)
def test_hostile_packet_on_a_connection(
    caplog: pytest.LogCaptureFixture,
    packet: tuple[VsockHeader, bytes],
    outcome: str,
    reason: str,
) -> None:
    host, conn = host_with_connection()
    with caplog.at_level(logging.WARNING):
        host.feed(*packet)
    assert reason in caplog.text
    sent = host.packets_to_send()
    if outcome == "reset":
        assert conn.state is State.CLOSED
        assert conn.reason is not None and reason in conn.reason
        assert [(p.header.op, p.header.dst_port) for p in sent] == [(Op.RST, 1024)]
        assert host.connections == {}
    else:
        assert conn.state is State.CONNECTED
        assert sent == []
        assert conn.readable == 0


NO_CONNECTION = [
    ("seqpacket request", from_guest(Op.REQUEST, type=Type.SEQPACKET, src_port=7), "SEQPACKET"),
    (
        "unknown type",
        from_guest(Op.REQUEST, type=0x1234, src_port=7),
        "type: 4660 is not a socket type",
    ),
    ("len mismatch", from_guest(Op.RW, b"abc", len=4, src_port=7), "len: 4 but the payload"),
    ("payload on a request", from_guest(Op.REQUEST, b"hi", src_port=7), "len: 2: only RW carries"),
    ("unknown op", from_guest(200, src_port=7), "op: 200 is not an operation"),
]


@pytest.mark.parametrize(
    ("packet", "reason"),
    [case[1:] for case in NO_CONNECTION],
    ids=[case[0] for case in NO_CONNECTION],
)
def test_hostile_packet_for_no_connection_gets_rst(
    caplog: pytest.LogCaptureFixture, packet: tuple[VsockHeader, bytes], reason: str
) -> None:
    host, conn = host_with_connection()
    header, payload = packet
    assert host.feed(header, payload) is None
    assert reason in caplog.text
    [rst] = host.packets_to_send()
    assert (rst.header.op, rst.header.type) == (Op.RST, header.type)
    assert (rst.header.dst_cid, rst.header.dst_port) == (header.src_cid, header.src_port)
    assert conn.state is State.CONNECTED
    assert host.accept() is conn
    assert host.accept() is None


@pytest.mark.parametrize(
    "packet",
    [from_guest(Op.REQUEST, src_port=0xFFFF_FFFF), from_guest(Op.REQUEST, dst_port=0xFFFF_FFFF)],
    ids=["src_port", "dst_port"],
)
def test_port_any_is_not_an_address(
    caplog: pytest.LogCaptureFixture, packet: tuple[VsockHeader, bytes]
) -> None:
    host, _ = host_with_connection()
    host.listen(0xFFFF_FFFF)
    host.feed(*packet)
    assert "port 0xffffffff (VMADDR_PORT_ANY) is not an address" in caplog.text
    assert host.packets_to_send() == []


def test_a_packet_from_ourselves_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    host = VsockEndpoint(HOST_CID)
    host.listen(5000)
    host.feed(*from_guest(Op.REQUEST, src_cid=HOST_CID))
    assert "src_cid 2 cannot be a peer of cid 2" in caplog.text
    assert host.packets_to_send() == []


def test_a_flood_of_requests_stops_at_the_backlog() -> None:
    host = VsockEndpoint(HOST_CID, backlog=4, max_replies=8)
    host.listen(5000)
    for port in range(100):
        host.feed(*from_guest(Op.REQUEST, src_port=port))
    assert len(host.connections) == 4
    sent = host.packets_to_send()
    assert [p.header.op for p in sent].count(Op.RST) == 8


def test_rw_filling_the_buffer_exactly_is_fine_one_more_byte_is_not() -> None:
    host, conn = host_with_connection()
    host.feed(*from_guest(Op.RW, bytes(BUF_ALLOC - 1)))
    host.feed(*from_guest(Op.RW, b"x"))
    assert conn.readable == BUF_ALLOC
    host.feed(*from_guest(Op.RW, b"y"))
    assert conn.state is State.CLOSED


fields = {
    "src_cid": st.sampled_from([GUEST_CID, HOST_CID, 4, 1 << 32 | GUEST_CID]),
    "dst_cid": st.sampled_from([HOST_CID, GUEST_CID, 0xFFFF_FFFF]),
    "src_port": st.sampled_from([1024, 1025, 0xFFFF_FFFF]),
    "dst_port": st.sampled_from([5000, 5001]),
    "type": st.sampled_from([Type.STREAM, Type.SEQPACKET, 0, 3]),
    "op": st.integers(0, 9),
    "flags": st.integers(0, 0xFFFF_FFFF),
    "buf_alloc": st.integers(0, 0xFFFF_FFFF),
    "fwd_cnt": st.integers(0, 0xFFFF_FFFF),
}


@st.composite
def packets(draw: st.DrawFn) -> tuple[VsockHeader, bytes]:
    payload = draw(st.binary(max_size=2 * BUF_ALLOC))
    length = draw(st.sampled_from([len(payload), 0, len(payload) + 1, 0xFFFF_FFFF]))
    values = {name: draw(strategy) for name, strategy in fields.items()}
    return VsockHeader(len=length, **values), payload


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(packets(), max_size=12))
def test_no_sequence_of_packets_raises_or_answers_rst_with_rst(
    sequence: list[tuple[VsockHeader, bytes]],
) -> None:
    host, _ = host_with_connection()
    host.listen(5001)
    for header, payload in sequence:
        before = len(host.connections)
        host.feed(header, payload)
        sent = host.packets_to_send()
        if header.op == Op.RST:
            assert sent == [], header.describe()
        assert len(sent) <= 1 + (len(host.connections) > before)
        for packet in sent:
            assert packet.header.src_cid == HOST_CID
            assert packet.header.len == len(packet.payload)
