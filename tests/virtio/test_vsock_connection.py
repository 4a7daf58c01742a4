"""VsockConnection, one state transition at a time: the packets each step queues, the state it
leads to, and the credit each header carries."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from pyvhost.errors import VsockError
from pyvhost.virtio.vsock import (
    ConnectionOptions,
    ConnectionState,
    Op,
    Packet,
    Shutdown,
    Type,
    VsockConnection,
    VsockHeader,
)

GUEST, HOST = 3, 2
State = ConnectionState
BOTH = Shutdown.RCV | Shutdown.SEND


def guest(**options: int) -> VsockConnection:
    """The guest end, 3:1024 -> 2:5000."""
    return VsockConnection(GUEST, 1024, HOST, 5000, ConnectionOptions(**options))


def host(**options: int) -> VsockConnection:
    """The host end, 2:5000 -> 3:1024."""
    return VsockConnection(HOST, 5000, GUEST, 1024, ConnectionOptions(**options))


def incoming(
    op: Op, payload: bytes = b"", *, flags: int = 0, buf_alloc: int = 4096, fwd_cnt: int = 0
) -> VsockHeader:
    """A packet the host sends to the guest end."""
    return VsockHeader(HOST, GUEST, 5000, 1024, len(payload), Type.STREAM, op, flags, buf_alloc,
                       fwd_cnt)  # fmt: skip


def hear(conn: VsockConnection, op: Op, payload: bytes = b"", **fields: int) -> None:
    """Feed ``conn`` one packet from the host end."""
    conn.feed(incoming(op, payload, **fields), payload)


def ops(packets: list[Packet]) -> list[tuple[Op, int]]:
    return [(Op(p.header.op), p.header.flags) for p in packets]


def deliver(sender: VsockConnection, receiver: VsockConnection) -> list[Packet]:
    """Move every queued packet of ``sender`` into ``receiver``; return them."""
    packets = sender.packets_to_send()
    for packet in packets:
        receiver.feed(packet.header, packet.payload)
    return packets


def connected(**options: int) -> tuple[VsockConnection, VsockConnection]:
    """A guest end and a host end after REQUEST and RESPONSE."""
    g, h = guest(**options), host(**options)
    g.connect(now=0.0)
    deliver(g, h)
    deliver(h, g)
    assert g.state is h.state is State.CONNECTED
    return g, h


def established_guest(peer_buf_alloc: int = 4096, **options: int) -> VsockConnection:
    """A guest end that got its RESPONSE from a hand-made host advertising ``peer_buf_alloc``."""
    g = guest(**options)
    g.connect(now=0.0)
    g.packets_to_send()
    hear(g, Op.RESPONSE, buf_alloc=peer_buf_alloc)
    return g


# -- IDLE and connecting ---------------------------------------------------------------------


def test_a_new_connection_is_idle_and_silent() -> None:
    g = guest()
    assert g.state is State.IDLE
    assert (g.credit, g.readable, g.has_packets, g.writable) == (0, 0, False, False)
    assert g.next_packet() is None


def test_connect_queues_a_request_with_our_credit() -> None:
    g = guest(buf_alloc=8192)
    g.connect(now=10.0)
    assert g.state is State.CONNECTING
    assert g.deadline == 12.0
    [packet] = g.packets_to_send()
    assert packet.header == VsockHeader(GUEST, HOST, 1024, 5000, 0, Type.STREAM, Op.REQUEST, 0,
                                        8192, 0)  # fmt: skip
    assert packet.payload == b""


def test_connect_twice_is_misuse() -> None:
    g = guest()
    g.connect()
    with pytest.raises(VsockError, match="connect\\(\\) needs state idle"):
        g.connect()


def test_a_request_to_an_idle_end_is_answered_with_response() -> None:
    g, h = guest(buf_alloc=1000), host(buf_alloc=2000)
    g.connect()
    deliver(g, h)
    assert h.state is State.CONNECTED
    assert h.credit == 1000
    [response] = deliver(h, g)
    assert response.header.op == Op.RESPONSE
    assert response.header.buf_alloc == 2000
    assert g.state is State.CONNECTED
    assert g.credit == 2000
    assert g.deadline is None


def test_anything_but_request_to_an_idle_end_gets_rst() -> None:
    g = guest()
    hear(g, Op.RW, b"x")
    assert g.state is State.IDLE
    assert ops(g.packets_to_send()) == [(Op.RST, 0)]
    hear(g, Op.RST)
    assert g.packets_to_send() == []


def test_rst_while_connecting_is_a_refusal() -> None:
    g = guest()
    g.connect(now=0.0)
    g.packets_to_send()
    hear(g, Op.RST)
    assert (g.state, g.reason) == (State.CLOSED, "refused by the peer")
    assert g.packets_to_send() == []
    assert g.deadline is None


@pytest.mark.parametrize("op", [Op.RW, Op.REQUEST, Op.SHUTDOWN, Op.CREDIT_UPDATE, 9])
def test_anything_else_while_connecting_resets(op: int) -> None:
    g = guest()
    g.connect()
    g.packets_to_send()
    payload = b"x" if op == Op.RW else b""
    hear(g, op, payload)  # type: ignore[arg-type]
    assert g.state is State.CLOSED
    assert g.reason is not None and g.reason.startswith("protocol error")
    assert ops(g.packets_to_send()) == [(Op.RST, 0)]


def test_connect_timeout_from_now() -> None:
    g = guest()
    g.connect(now=100.0)
    g.packets_to_send()
    g.tick(101.9)
    assert g.state is State.CONNECTING
    g.tick(102.0)
    assert (g.state, g.reason) == (State.CLOSED, "connect timed out")
    assert ops(g.packets_to_send()) == [(Op.RST, 0)]


def test_connect_timeout_armed_by_the_first_tick() -> None:
    g = guest(connect_timeout=5)
    g.connect()
    assert g.deadline is None
    g.tick(50.0)
    assert g.deadline == 55.0
    g.tick(54.0)
    assert g.state is State.CONNECTING
    g.tick(55.0)
    assert (g.state, g.reason) == (State.CLOSED, "connect timed out")


# -- connected: data and credit --------------------------------------------------------------


def test_send_needs_a_connection() -> None:
    g = guest()
    with pytest.raises(VsockError, match="not writable"):
        g.send(b"x")


def test_send_takes_no_more_than_the_credit() -> None:
    g = established_guest(peer_buf_alloc=10)
    assert g.credit == 10
    assert g.send(b"0123456") == 7
    assert g.credit == 3
    assert g.send(bytearray(b"abcdef")) == 3
    assert g.send(b"more") == 0
    assert g.tx_cnt == 10
    packets = g.packets_to_send()
    assert [bytes(p.payload) for p in packets] == [b"0123456", b"abc"]
    assert all(p.header.op == Op.RW and p.header.len == len(p.payload) for p in packets)


def test_send_copies_the_data() -> None:
    g = established_guest()
    data = bytearray(b"hello")
    g.send(memoryview(data))
    data[:] = b"XXXXX"
    assert bytes(g.packets_to_send()[0].payload) == b"hello"


def test_the_peers_fwd_cnt_gives_credit_back() -> None:
    g = established_guest(peer_buf_alloc=10)
    g.send(b"0123456789")
    assert g.credit == 0
    hear(g, Op.CREDIT_UPDATE, buf_alloc=10, fwd_cnt=4)
    assert g.credit == 4
    hear(g, Op.CREDIT_UPDATE, buf_alloc=20, fwd_cnt=4)
    assert g.credit == 14


def test_a_shrunk_peer_buffer_gives_zero_credit_not_negative() -> None:
    g = established_guest(peer_buf_alloc=10)
    g.send(b"0123456789")
    hear(g, Op.CREDIT_UPDATE, buf_alloc=5, fwd_cnt=2)
    assert g.credit == 0


def test_credit_counters_wrap_at_32_bits() -> None:
    g = established_guest(peer_buf_alloc=100)
    g.tx_cnt = g.peer_fwd_cnt = 0xFFFF_FFF0
    assert g.send(bytes(40)) == 40
    assert g.tx_cnt == 0x18
    assert g.credit == 60
    hear(g, Op.CREDIT_UPDATE, buf_alloc=100, fwd_cnt=0x8)
    assert g.credit == 100 - 0x10


def test_every_header_carries_buf_alloc_and_fwd_cnt() -> None:
    g, h = connected(buf_alloc=64)
    h.send(b"abcdef")
    deliver(h, g)
    assert g.receive(4) == b"abcd"
    g.send(b"reply")
    g.shutdown(Shutdown.SEND)
    packets = g.packets_to_send()
    assert packets
    assert {(p.header.buf_alloc, p.header.fwd_cnt) for p in packets} == {(64, 4)}
    assert g.last_fwd_cnt == 4


def test_receive_returns_bytes_in_order_and_counts_them() -> None:
    g, h = connected(buf_alloc=100)
    h.send(b"abc")
    h.send(b"defg")
    deliver(h, g)
    assert g.readable == 7
    assert g.receive(2) == b"ab"
    assert g.receive() == b"cdefg"
    assert g.receive() == b""
    assert g.fwd_cnt == 7


def test_credit_update_once_half_the_buffer_is_consumed() -> None:
    g, h = connected(buf_alloc=100)
    h.send(bytes(100))
    deliver(h, g)
    assert h.credit == 0
    g.receive(49)
    assert g.packets_to_send() == []
    g.receive(1)
    [update] = deliver(g, h)
    assert (update.header.op, update.header.fwd_cnt) == (Op.CREDIT_UPDATE, 50)
    assert h.credit == 50


def test_credit_update_threshold_option() -> None:
    g, h = connected(buf_alloc=100, credit_update_threshold=10)
    h.send(bytes(30))
    deliver(h, g)
    g.receive(9)
    assert g.packets_to_send() == []
    g.receive(1)
    assert ops(g.packets_to_send()) == [(Op.CREDIT_UPDATE, 0)]


def test_one_credit_update_is_queued_at_a_time() -> None:
    g, h = connected(buf_alloc=100, credit_update_threshold=1)
    h.send(bytes(3))
    deliver(h, g)
    for _ in range(3):
        g.receive(1)
    [update] = g.packets_to_send()
    assert update.header.fwd_cnt == 3


def test_a_credit_update_made_stale_by_an_rw_is_not_sent() -> None:
    g, h = connected(buf_alloc=100, credit_update_threshold=1)
    h.send(bytes(3))
    deliver(h, g)
    g.send(b"data first")
    g.receive()
    [rw] = g.packets_to_send()
    assert (rw.header.op, rw.header.fwd_cnt) == (Op.RW, 3)


def test_has_packets_does_not_count_a_stale_credit_update() -> None:
    """A transport takes a ring buffer only when has_packets says so: it must not promise a
    packet that next_packet() then withholds."""
    g, h = connected(buf_alloc=100, credit_update_threshold=1)
    g.send(b"x")
    h.send(bytes(3))
    deliver(h, g)
    g.receive()
    assert g.has_packets
    rw = g.next_packet()
    assert rw is not None and (rw.header.op, rw.header.fwd_cnt) == (Op.RW, 3)
    assert not g.has_packets
    assert g.next_packet() is None


def test_has_packets_counts_an_asked_for_credit_update() -> None:
    g, h = connected()
    h.request_credit()
    deliver(h, g)
    assert g.has_packets
    assert ops(g.packets_to_send()) == [(Op.CREDIT_UPDATE, 0)]
    assert not g.has_packets


def test_unsent_counts_accepted_bytes_until_a_packet_carries_them() -> None:
    g, _ = connected(buf_alloc=1000)
    assert g.send(bytes(700)) == 700
    assert g.unsent == 700
    first = g.next_packet(300)
    assert first is not None and len(first.payload) == 300
    assert g.unsent == 400
    g.packets_to_send()
    assert g.unsent == 0
    g.send(bytes(10))
    g.reset()
    assert g.unsent == 0


def test_credit_request_is_answered_even_with_nothing_new() -> None:
    g, h = connected()
    h.request_credit()
    [request] = deliver(h, g)
    assert request.header.op == Op.CREDIT_REQUEST
    [update] = deliver(g, h)
    assert (update.header.op, update.header.fwd_cnt) == (Op.CREDIT_UPDATE, 0)


def test_request_credit_needs_a_connection() -> None:
    with pytest.raises(VsockError, match="request_credit"):
        guest().request_credit()


def test_rw_beyond_our_buffer_resets() -> None:
    g = established_guest(buf_alloc=8)
    hear(g, Op.RW, b"12345")
    hear(g, Op.RW, b"6789")
    assert g.state is State.CLOSED
    assert g.reason == (
        "protocol error: RW of 4 bytes beyond our credit (5 bytes unread, buf_alloc 8)"
    )
    assert ops(g.packets_to_send()) == [(Op.RST, 0)]
    assert g.receive() == b"12345"


def test_next_packet_cuts_rw_to_max_payload() -> None:
    g = established_guest(peer_buf_alloc=100, max_payload=8)
    g.send(bytes(range(20)))
    first = g.next_packet(max_payload=3)
    assert first is not None and bytes(first.payload) == bytes(range(3))
    rest = g.packets_to_send()
    assert [len(p.payload) for p in rest] == [8, 8, 1]
    assert b"".join(bytes(p.payload) for p in [first, *rest]) == bytes(range(20))
    with pytest.raises(ValueError, match="max_payload 0"):
        g.next_packet(0)


# -- shutdown and close ----------------------------------------------------------------------


def test_shutdown_send_is_eof_for_the_peer() -> None:
    g, h = connected()
    g.send(b"last words")
    g.shutdown(Shutdown.SEND)
    assert not g.writable
    with pytest.raises(VsockError, match="not writable"):
        g.send(b"more")
    assert ops(deliver(g, h)) == [(Op.RW, 0), (Op.SHUTDOWN, 2)]
    assert h.peer_shutdown == Shutdown.SEND
    assert not h.at_eof
    assert h.receive() == b"last words"
    assert h.at_eof
    h.send(b"still talking")
    deliver(h, g)
    assert g.receive() == b"still talking"


def test_shutdown_flags_accumulate() -> None:
    g, _ = connected()
    g.shutdown(Shutdown.RCV)
    g.shutdown(Shutdown.RCV)
    g.shutdown(Shutdown.SEND)
    assert ops(g.packets_to_send()) == [(Op.SHUTDOWN, 1), (Op.SHUTDOWN, 3)]
    assert g.state is State.CONNECTED


@pytest.mark.parametrize("flags", [0, 4, 7])
def test_shutdown_flags_must_be_rcv_or_send(flags: int) -> None:
    g, _ = connected()
    with pytest.raises(ValueError, match="not a non-empty subset"):
        g.shutdown(Shutdown(flags))


def test_shutdown_needs_a_connection() -> None:
    with pytest.raises(VsockError, match="shutdown"):
        guest().shutdown(Shutdown.SEND)


def test_peer_shutdown_rcv_stops_our_sending() -> None:
    g = established_guest()
    hear(g, Op.SHUTDOWN, flags=Shutdown.RCV)
    assert not g.writable
    with pytest.raises(VsockError, match=r"shut down: ours none, the peer's RCV\)$"):
        g.send(b"x")


def test_rw_after_the_peers_shutdown_send_resets() -> None:
    g = established_guest()
    hear(g, Op.SHUTDOWN, flags=Shutdown.SEND)
    hear(g, Op.RW, b"late")
    assert g.reason == "protocol error: RW after the peer's SHUTDOWN SEND"
    assert ops(g.packets_to_send()) == [(Op.RST, 0)]


def test_unknown_shutdown_flag_bits_are_ignored() -> None:
    g = established_guest()
    hear(g, Op.SHUTDOWN, flags=0xFC | Shutdown.SEND)
    assert g.peer_shutdown == Shutdown.SEND
    assert g.state is State.CONNECTED


def test_peer_shutdown_of_both_closes_with_rst_and_keeps_unread_data() -> None:
    g = established_guest()
    hear(g, Op.RW, b"unread")
    g.send(b"never sent")
    hear(g, Op.SHUTDOWN, flags=Shutdown.RCV)
    hear(g, Op.SHUTDOWN, flags=Shutdown.SEND)
    assert (g.state, g.reason) == (State.CLOSED, "closed by the peer")
    assert ops(g.packets_to_send()) == [(Op.RST, 0)]
    assert not g.at_eof
    assert g.receive() == b"unread"
    assert g.at_eof


def test_clean_close_both_ways() -> None:
    g, h = connected()
    g.send(b"bye")
    g.close(now=5.0)
    assert g.state is State.CLOSING
    assert g.deadline == 13.0
    assert ops(deliver(g, h)) == [(Op.RW, 0), (Op.SHUTDOWN, 3)]
    assert (h.state, h.reason) == (State.CLOSED, "closed by the peer")
    assert h.receive() == b"bye"
    assert ops(deliver(h, g)) == [(Op.RST, 0)]
    assert (g.state, g.reason) == (State.CLOSED, "closed")
    assert g.deadline is None
    assert g.packets_to_send() == h.packets_to_send() == []


def test_close_after_shutdown_of_both_sends_no_second_shutdown() -> None:
    g, _ = connected()
    g.shutdown(BOTH)
    g.close()
    assert ops(g.packets_to_send()) == [(Op.SHUTDOWN, 3)]
    assert g.state is State.CLOSING


def test_simultaneous_close() -> None:
    g, h = connected()
    g.close()
    h.close()
    deliver(g, h)
    deliver(h, g)
    assert g.state is h.state is State.CLOSED
    deliver(g, h)
    deliver(h, g)
    assert g.reason == h.reason == "closed"
    assert g.packets_to_send() == h.packets_to_send() == []


def test_closing_ignores_data_and_credit(caplog: pytest.LogCaptureFixture) -> None:
    g = established_guest()
    g.close()
    g.packets_to_send()
    with caplog.at_level(logging.DEBUG):
        hear(g, Op.RW, b"in flight")
    assert "closing, dropped 2:5000 -> 3:1024 RW" in caplog.text
    hear(g, Op.CREDIT_REQUEST)
    hear(g, Op.SHUTDOWN, flags=Shutdown.SEND)
    assert g.state is State.CLOSING
    assert g.packets_to_send() == []
    assert g.readable == 0


def test_close_timeout_resets() -> None:
    g = established_guest(close_timeout=1)
    g.close()
    g.packets_to_send()
    g.tick(20.0)
    assert g.deadline == 21.0
    g.tick(21.5)
    assert (g.state, g.reason) == (State.CLOSED, "close timed out")
    assert ops(g.packets_to_send()) == [(Op.RST, 0)]


def test_close_in_each_early_state() -> None:
    idle = guest()
    idle.close()
    assert (idle.state, idle.packets_to_send()) == (State.CLOSED, [])
    connecting = guest()
    connecting.connect()
    connecting.close()
    assert ops(connecting.packets_to_send()) == [(Op.RST, 0)]
    assert connecting.reason == "closed before the peer answered"
    connecting.close()
    assert connecting.packets_to_send() == []


def test_reset_drops_the_queue_and_sends_rst() -> None:
    g = established_guest()
    g.send(b"dropped")
    g.reset()
    assert (g.state, g.reason) == (State.CLOSED, "reset")
    assert ops(g.packets_to_send()) == [(Op.RST, 0)]
    g.reset()
    assert g.packets_to_send() == []
    idle = guest()
    idle.reset()
    assert (idle.state, idle.packets_to_send()) == (State.CLOSED, [])


def test_rst_from_the_peer_gets_no_rst() -> None:
    g = established_guest()
    g.send(b"dropped")
    hear(g, Op.RST)
    assert (g.state, g.reason) == (State.CLOSED, "reset by the peer")
    assert g.packets_to_send() == []


def test_a_closed_end_answers_with_rst_but_not_to_rst() -> None:
    g = established_guest()
    hear(g, Op.RST)
    hear(g, Op.RW, b"late")
    assert ops(g.packets_to_send()) == [(Op.RST, 0)]
    hear(g, Op.RST)
    assert g.packets_to_send() == []


def test_transport_reset_closes_silently() -> None:
    g = established_guest()
    g.send(b"dropped")
    g.transport_reset()
    assert (g.state, g.reason) == (State.CLOSED, "transport reset")
    assert g.packets_to_send() == []


# -- odd packets on an open connection -------------------------------------------------------


def test_request_on_an_established_connection_resets() -> None:
    g = established_guest()
    hear(g, Op.REQUEST)
    assert g.reason == "protocol error: REQUEST on an established connection"
    assert ops(g.packets_to_send()) == [(Op.RST, 0)]


def test_a_second_response_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    g = established_guest()
    hear(g, Op.RESPONSE)
    assert g.state is State.CONNECTED
    assert g.packets_to_send() == []
    assert "dropped a RESPONSE on an established connection" in caplog.text


def test_an_unknown_op_on_an_open_connection_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    g = established_guest()
    with caplog.at_level(logging.WARNING):
        hear(g, 42)  # type: ignore[arg-type]
    assert g.state is State.CONNECTED
    assert g.packets_to_send() == []
    assert "dropped: op42: virtio_vsock_hdr: op: 42 is not an operation" in caplog.text


def test_a_malformed_rst_closes_without_rst() -> None:
    g = established_guest()
    g.feed(replace(incoming(Op.RST), len=3), b"abc")
    assert g.state is State.CLOSED
    assert g.reason == "protocol error: RST: virtio_vsock_hdr: len: 3: only RW carries a payload"
    assert g.packets_to_send() == []


def test_feeding_another_connections_packet_is_misuse() -> None:
    g = established_guest()
    with pytest.raises(VsockError, match="fed a packet for 2:5001 -> 3:1024"):
        g.feed(replace(incoming(Op.RW), src_port=5001))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"buf_alloc": 1 << 32}, "buf_alloc"),
        ({"buf_alloc": -1}, "buf_alloc"),
        ({"max_payload": 0}, "max_payload"),
        ({"credit_update_threshold": 0}, "credit_update_threshold"),
    ],
)
def test_options_are_checked(options: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConnectionOptions(**options)


@pytest.mark.parametrize("address", [(-1, 1), (1 << 32, 1), (3, -1), (3, 0xFFFF_FFFF)], ids=str)
def test_addresses_are_checked(address: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="local"):
        VsockConnection(*address, HOST, 5000)
    with pytest.raises(ValueError, match="peer"):
        VsockConnection(GUEST, 1024, *address)


def test_a_malformed_packet_to_an_idle_end_gets_rst(caplog: pytest.LogCaptureFixture) -> None:
    g = guest()
    g.feed(replace(incoming(Op.REQUEST), type=Type.SEQPACKET))
    assert g.state is State.IDLE
    assert ops(g.packets_to_send()) == [(Op.RST, 0)]
    assert "refused: REQUEST: virtio_vsock_hdr: type: SEQPACKET is not supported" in caplog.text


def test_tick_leaves_open_and_idle_connections_alone() -> None:
    g, _ = connected()
    idle = guest()
    for conn in (g, idle):
        conn.tick(1e9)
    assert (g.state, idle.state) == (State.CONNECTED, State.IDLE)
    assert g.deadline is idle.deadline is None


def test_simultaneous_open_resets_both() -> None:
    """The first REQUEST to arrive resets its receiver, whose own REQUEST is never sent."""
    g, h = guest(), host()
    g.connect()
    h.connect()
    deliver(g, h)
    assert ops(deliver(h, g)) == [(Op.RST, 0)]
    assert h.reason == "protocol error: REQUEST while waiting for RESPONSE"
    assert g.reason == "refused by the peer"


def test_misuse_errors_say_why() -> None:
    g, _ = connected()
    g.close()
    with pytest.raises(VsockError, match=r"needs state connected \(shut down: ours RCV\|SEND,"):
        g.shutdown(Shutdown.SEND)
    g.reset()
    with pytest.raises(VsockError, match=r"needs state connected \(reset\)$"):
        g.request_credit()


def test_the_credit_update_threshold_is_capped_at_buf_alloc() -> None:
    """Found by the credit property test: a threshold above buf_alloc stalls a full window."""
    assert ConnectionOptions(buf_alloc=100, credit_update_threshold=300).threshold == 100
    assert ConnectionOptions(buf_alloc=100).threshold == 50
    assert ConnectionOptions(buf_alloc=0).threshold == 1
