"""VsockEndpoint: listening, local ports, dispatch, accept, RST for unknown connections, fair
draining, timers and transport reset, between a guest endpoint (CID 3) and a host one (CID 2)."""

from __future__ import annotations

import logging

import pytest

from pyvhost.errors import VsockError
from pyvhost.virtio.vsock import (
    VMADDR_CID_ANY,
    VMADDR_PORT_ANY,
    ConnectionKey,
    ConnectionState,
    Op,
    Packet,
    Shutdown,
    Type,
    VsockEndpoint,
    VsockHeader,
)

from .vsock_link import GUEST_CID, HOST_CID, Link, from_guest

State = ConnectionState


def test_connect_listen_accept_and_talk() -> None:
    link = Link.make()
    link.host.listen(5000)
    g = link.guest.connect(HOST_CID, 5000)
    assert g.key == ConnectionKey(GUEST_CID, 1024, HOST_CID, 5000)
    assert link.host.accept() is None
    link.settle()
    h = link.host.accept()
    assert h is not None
    assert h.key == ConnectionKey(HOST_CID, 5000, GUEST_CID, 1024)
    assert g.state is h.state is State.CONNECTED
    assert link.host.accept() is None
    g.send(b"ping")
    link.settle()
    assert h.receive() == b"ping"
    h.send(b"pong")
    link.settle()
    assert g.receive() == b"pong"


def test_has_packets_follows_replies_and_connections() -> None:
    link = Link.make()
    assert not link.host.has_packets
    link.host.listen(5000)
    link.guest.connect(HOST_CID, 5000)
    assert link.guest.has_packets and not link.host.has_packets
    link.settle()
    assert not link.guest.has_packets and not link.host.has_packets
    link.host.feed(*from_guest(Op.RW, b"?", src_port=4000))
    assert link.host.has_packets
    [rst] = link.host.packets_to_send()
    assert rst.header.op == Op.RST
    assert not link.host.has_packets


def test_feed_returns_the_connection_it_fed() -> None:
    link = Link.make()
    link.host.listen(5000)
    g = link.guest.connect(HOST_CID, 5000)
    [request] = link.guest.packets_to_send()
    h = link.host.feed(request.header, request.payload)
    assert h is not None and h is link.host.connections[h.key]
    [response] = link.host.packets_to_send()
    assert link.guest.feed(response.header, response.payload) is g


def test_local_ports_are_allocated_above_the_reserved_ones() -> None:
    ep = VsockEndpoint(GUEST_CID)
    ep.listen(1025)
    ports = [ep.connect(HOST_CID, 80).key.local_port for _ in range(3)]
    assert ports == [1024, 1026, 1027]
    assert ep.connect(HOST_CID, 81, local_port=1024).key.local_port == 1024


def test_port_allocation_wraps_and_skips_ports_in_use() -> None:
    ep = VsockEndpoint(GUEST_CID)
    ep.connect(HOST_CID, 80, local_port=1024)
    ep._next_port = VMADDR_PORT_ANY - 1
    assert ep.connect(HOST_CID, 80).key.local_port == VMADDR_PORT_ANY - 1
    assert ep.connect(HOST_CID, 80).key.local_port == 1025


def test_a_closed_connection_frees_its_port_once_its_rst_is_sent() -> None:
    link = Link.make()
    g = link.guest.connect(HOST_CID, 5000, local_port=4000)
    g.reset()
    assert g.key in link.guest.connections
    assert [p.header.op for p in link.guest.packets_to_send()] == [Op.RST]
    assert link.guest.connections == {}
    again = link.guest.connect(HOST_CID, 5000, local_port=4000)
    assert again.state is State.CONNECTING


@pytest.mark.parametrize("peer_cid", [GUEST_CID, VMADDR_CID_ANY])
def test_connect_to_ourselves_or_any_is_refused(peer_cid: int) -> None:
    with pytest.raises(ValueError, match="cannot connect to cid"):
        VsockEndpoint(GUEST_CID).connect(peer_cid, 80)


def test_connect_misuse() -> None:
    ep = VsockEndpoint(GUEST_CID)
    ep.connect(HOST_CID, 80, local_port=2000)
    with pytest.raises(VsockError, match="already exists"):
        ep.connect(HOST_CID, 80, local_port=2000)
    with pytest.raises(ValueError, match="peer port"):
        ep.connect(HOST_CID, VMADDR_PORT_ANY)
    with pytest.raises(ValueError, match="local port"):
        ep.connect(HOST_CID, 80, local_port=-1)


def test_listen_misuse() -> None:
    ep = VsockEndpoint(HOST_CID)
    ep.listen(80)
    with pytest.raises(VsockError, match="already listening on port 80"):
        ep.listen(80)
    with pytest.raises(VsockError, match="not listening on port 81"):
        ep.unlisten(81)
    with pytest.raises(ValueError, match="does not fit in u32"):
        ep.listen(1 << 32)
    assert ep.listening == {80}
    ep.unlisten(80)
    assert ep.listening == frozenset()


@pytest.mark.parametrize("cid", [-1, VMADDR_CID_ANY, 1 << 32])
def test_cids_are_checked(cid: int) -> None:
    with pytest.raises(ValueError, match="cid"):
        VsockEndpoint(cid)
    with pytest.raises(ValueError, match="cid"):
        VsockEndpoint(HOST_CID, peer_cid=cid)


def test_a_request_with_no_listener_gets_rst(caplog: pytest.LogCaptureFixture) -> None:
    host = VsockEndpoint(HOST_CID)
    request, _ = from_guest(Op.REQUEST)
    with caplog.at_level(logging.INFO):
        assert host.feed(request) is None
    [rst] = host.packets_to_send()
    assert rst == Packet(VsockHeader(HOST_CID, GUEST_CID, 5000, 1024, 0, Type.STREAM, Op.RST,
                                     0, 0, 0))  # fmt: skip
    assert "no listener on port 5000" in caplog.text
    assert host.connections == {}


def test_the_guest_sees_a_refusal() -> None:
    link = Link.make()
    g = link.guest.connect(HOST_CID, 5000)
    link.settle()
    assert (g.state, g.reason) == (State.CLOSED, "refused by the peer")
    assert link.guest.connections == link.host.connections == {}


@pytest.mark.parametrize("op", [Op.RW, Op.RESPONSE, Op.SHUTDOWN, Op.CREDIT_REQUEST])
def test_a_packet_for_no_connection_gets_rst(op: Op) -> None:
    host = VsockEndpoint(HOST_CID)
    host.listen(5000)
    payload = b"data" if op is Op.RW else b""
    assert host.feed(*from_guest(op, payload)) is None
    assert [p.header.op for p in host.packets_to_send()] == [Op.RST]


def test_an_rst_for_no_connection_gets_nothing() -> None:
    host = VsockEndpoint(HOST_CID)
    host.listen(5000)
    host.feed(*from_guest(Op.RST))
    host.feed(*from_guest(Op.RST, type=Type.SEQPACKET))
    assert host.packets_to_send() == []


def test_a_wildcard_listener_takes_ports_nobody_else_listens_on() -> None:
    host = VsockEndpoint(HOST_CID)
    host.listen(VMADDR_PORT_ANY)
    host.listen(22)
    for port in (22, 52, 1 << 20):
        conn = host.feed(*from_guest(Op.REQUEST, dst_port=port))
        assert conn is not None and conn.key.local_port == port
    assert [c.key.local_port for c in iter(host.accept, None)] == [22, 52, 1 << 20]


def test_unlisten_keeps_accepted_connections() -> None:
    link = Link.make()
    link.host.listen(5000)
    g = link.guest.connect(HOST_CID, 5000)
    link.settle()
    link.host.unlisten(5000)
    h = link.host.accept()
    assert h is not None
    g.send(b"still here")
    link.settle()
    assert h.receive() == b"still here"
    refused = link.guest.connect(HOST_CID, 5000)
    link.settle()
    assert refused.reason == "refused by the peer"


def test_backlog_refuses_beyond_its_size() -> None:
    host = VsockEndpoint(HOST_CID, backlog=2)
    host.listen(5000)
    for port in (1, 2, 3):
        host.feed(*from_guest(Op.REQUEST, src_port=port))
    answers = [(p.header.op, p.header.dst_port) for p in host.packets_to_send()]
    assert answers == [(Op.RST, 3), (Op.RESPONSE, 1), (Op.RESPONSE, 2)]
    host.accept()
    host.feed(*from_guest(Op.REQUEST, src_port=4))
    assert [p.header.op for p in host.packets_to_send()] == [Op.RESPONSE]


def test_rst_replies_are_capped(caplog: pytest.LogCaptureFixture) -> None:
    host = VsockEndpoint(HOST_CID, max_replies=2)
    for port in range(3):
        host.feed(*from_guest(Op.REQUEST, src_port=port))
    assert "no RST: 2 replies queued" in caplog.text
    assert len(host.packets_to_send()) == 2


def test_replies_first_then_connections_in_turn() -> None:
    link = Link.make(max_payload=10)
    link.host.listen(5000)
    a = link.guest.connect(HOST_CID, 5000)
    b = link.guest.connect(HOST_CID, 5000)
    link.settle()
    a.send(bytes(30))
    b.send(bytes(30))
    link.guest.feed(*_host_rst_to_unknown())
    packets = link.guest.packets_to_send()
    assert packets[0].header.op == Op.RST
    ports = [p.header.src_port for p in packets[1:]]
    assert ports == [a.key.local_port, b.key.local_port] * 3


def _host_rst_to_unknown() -> tuple[VsockHeader, bytes]:
    """A CREDIT_REQUEST from the host to a guest port with no connection."""
    header = VsockHeader(HOST_CID, GUEST_CID, 9, 9, 0, Type.STREAM, Op.CREDIT_REQUEST, 0, 0, 0)
    return header, b""


def test_timers_through_the_endpoint() -> None:
    link = Link.make(connect_timeout=2, close_timeout=8)
    link.host.listen(5000)
    waiting = link.guest.connect(HOST_CID, 5001, now=10.0)
    g = link.guest.connect(HOST_CID, 5000, now=11.0)
    link.carry(link.guest)
    link.carry(link.host)
    assert waiting.state is State.CLOSED
    assert link.guest.next_deadline is None
    g.close(now=20.0)
    assert link.guest.next_deadline == 28.0
    assert [p.header.op for p in link.guest.packets_to_send()] == [Op.SHUTDOWN]
    link.guest.tick(27.0)
    assert g.state is State.CLOSING
    link.guest.tick(28.0)
    assert (g.state, g.reason) == (State.CLOSED, "close timed out")
    assert [p.header.op for p in link.guest.packets_to_send()] == [Op.RST]
    assert link.guest.connections == {}


def test_tick_forgets_connections_that_closed_silently() -> None:
    ep = VsockEndpoint(GUEST_CID)
    conn = ep.connect(HOST_CID, 80)
    conn.transport_reset()
    ep.tick(0.0)
    assert ep.connections == {}


def test_transport_reset_closes_everything_keeps_listeners_and_changes_the_cid() -> None:
    link = Link.make()
    link.host.listen(5000)
    link.guest.listen(7000)
    g = link.guest.connect(HOST_CID, 5000)
    link.settle()
    g.send(b"lost")
    pending = link.guest.connect(HOST_CID, 5000)
    link.guest.transport_reset(cid=4)
    assert g.reason == pending.reason == "transport reset"
    assert link.guest.packets_to_send() == []
    assert (link.guest.cid, link.guest.listening) == (4, frozenset({7000}))
    with pytest.raises(ValueError, match="cid"):
        link.guest.transport_reset(cid=VMADDR_CID_ANY)
    fresh = link.guest.connect(HOST_CID, 5000)
    assert fresh.key.local_cid == 4


def test_transport_reset_drops_unaccepted_connections() -> None:
    host = VsockEndpoint(HOST_CID)
    host.listen(5000)
    host.feed(*from_guest(Op.REQUEST))
    host.transport_reset()
    assert host.accept() is None
    assert host.packets_to_send() == []


def test_feed_packet_decodes_and_drops_short_buffers(caplog: pytest.LogCaptureFixture) -> None:
    host = VsockEndpoint(HOST_CID)
    host.listen(5000)
    header, _ = from_guest(Op.REQUEST)
    conn = host.feed_packet(memoryview(header.encode()))
    assert conn is not None and conn.state is State.CONNECTED
    assert host.feed_packet(header.encode()[:20]) is None
    assert "dropped a packet: virtio_vsock_hdr: size: 20 bytes, shorter than" in caplog.text


def test_half_close_through_endpoints() -> None:
    link = Link.make()
    link.host.listen(5000)
    g = link.guest.connect(HOST_CID, 5000)
    link.settle()
    h = link.host.accept()
    assert h is not None
    g.shutdown(Shutdown.SEND)
    link.settle()
    assert h.at_eof
    h.send(b"answer")
    h.close()
    link.settle()
    assert g.receive() == b"answer"
    assert (g.state, g.reason) == (State.CLOSED, "closed by the peer")
    assert (h.state, h.reason) == (State.CLOSED, "closed")
    assert link.guest.connections == link.host.connections == {}


def test_local_ports_count_up_from_first_port() -> None:
    guest = VsockEndpoint(GUEST_CID, first_port=40000)
    assert guest.connect(HOST_CID, 5000).key.local_port == 40000
    assert guest.connect(HOST_CID, 5000).key.local_port == 40001
    for bad in (1023, 0xFFFF_FFFF):
        with pytest.raises(ValueError, match="first_port"):
            VsockEndpoint(GUEST_CID, first_port=bad)
