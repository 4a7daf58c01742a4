"""One virtio-vsock stream connection as a sans-I/O state machine, the same for device and driver.

The application calls :meth:`VsockConnection.connect`, ``send``, ``receive``, ``shutdown``,
``close`` and ``reset``; the transport hands every packet for this connection to ``feed`` and takes
the packets to put in a ring from ``next_packet``. Nothing here reads a clock: timeouts run on the
``now`` the caller passes to ``connect``/``close``/``tick``.

Credit (virtio spec, "Flow control"): the sender never has more than
``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes outstanding; the receiver puts its ``buf_alloc``
and ``fwd_cnt`` in every header and sends CREDIT_UPDATE when the bytes it consumed since it last
told the peer reach a threshold, and whenever the peer sends CREDIT_REQUEST.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from pyvhost.errors import ProtocolError, VsockError
from pyvhost.virtio.vsock.wire import (
    DEFAULT_BUF_ALLOC,
    MAX_PKT_BUF_SIZE,
    SHUTDOWN_BOTH,
    U32_MASK,
    VMADDR_PORT_ANY,
    Bytes,
    Op,
    Packet,
    Shutdown,
    Type,
    VsockHeader,
    check_packet,
    op_name,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
"""Seconds a REQUEST waits for its RESPONSE (Linux's default connect timeout)."""
CLOSE_TIMEOUT = 8.0
"""Seconds a closing connection waits for the peer's RST (Linux's VSOCK_CLOSE_TIMEOUT)."""


class ConnectionState(Enum):
    """Where a connection is; half-closed is CONNECTED with shutdown flags set."""

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSING = "closing"
    CLOSED = "closed"


class ConnectionKey(NamedTuple):
    """The four numbers that name a connection, from this side's point of view."""

    local_cid: int
    local_port: int
    peer_cid: int
    peer_port: int

    def __str__(self) -> str:
        return f"{self.local_cid}:{self.local_port} <-> {self.peer_cid}:{self.peer_port}"


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """Per-connection settings: buffer size advertised, packet size, timeouts, credit threshold.

    ``credit_update_threshold`` is how many consumed bytes the peer has not heard of yet make a
    CREDIT_UPDATE; None means half of ``buf_alloc``. It is capped at ``buf_alloc``, so a sender
    with a full window always gets one by the time the reader has drained everything.
    """

    buf_alloc: int = DEFAULT_BUF_ALLOC
    max_payload: int = MAX_PKT_BUF_SIZE
    connect_timeout: float = CONNECT_TIMEOUT
    close_timeout: float = CLOSE_TIMEOUT
    credit_update_threshold: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.buf_alloc <= U32_MASK:
            raise ValueError(f"buf_alloc {self.buf_alloc} does not fit in u32")
        if not 1 <= self.max_payload <= U32_MASK:
            raise ValueError(f"max_payload {self.max_payload} is not in 1..2**32-1")
        if self.credit_update_threshold is not None and self.credit_update_threshold < 1:
            raise ValueError(f"credit_update_threshold {self.credit_update_threshold} is below 1")

    @property
    def threshold(self) -> int:
        """The credit-update threshold in bytes, never above buf_alloc: a sender whose whole
        window was read would otherwise wait for an update that never comes."""
        wanted = self.credit_update_threshold
        if wanted is None:
            wanted = self.buf_alloc // 2
        return max(1, min(wanted, self.buf_alloc))


class _Item(NamedTuple):
    """A packet waiting to be sent; its header is built when it leaves, with fresh credit."""

    op: Op
    flags: int = 0
    payload: memoryview | bytes = b""


def _flag_names(flags: Shutdown) -> str:
    return "|".join(flag.name or "" for flag in Shutdown if flag in flags) or "none"


def _check_address(what: str, cid: int, port: int) -> None:
    if not 0 <= cid <= U32_MASK:
        raise ValueError(f"{what} cid {cid} does not fit in u32")
    if not 0 <= port < VMADDR_PORT_ANY:
        raise ValueError(f"{what} port {port} is not in 0..{VMADDR_PORT_ANY - 1}")


class VsockConnection:
    """A STREAM connection between (local_cid, local_port) and (peer_cid, peer_port).

    States: IDLE -connect()-> CONNECTING -RESPONSE-> CONNECTED; IDLE -REQUEST-> CONNECTED (the
    RESPONSE is queued); CONNECTED -close()-> CLOSING -RST-> CLOSED; a peer SHUTDOWN of both
    directions, an RST, reset(), a timeout or a protocol violation lead to CLOSED.
    """

    def __init__(
        self,
        local_cid: int,
        local_port: int,
        peer_cid: int,
        peer_port: int,
        options: ConnectionOptions | None = None,
    ) -> None:
        _check_address("local", local_cid, local_port)
        _check_address("peer", peer_cid, peer_port)
        self.key = ConnectionKey(local_cid, local_port, peer_cid, peer_port)
        self.options = options or ConnectionOptions()
        self.state = ConnectionState.IDLE
        self.reason: str | None = None
        """Why the connection is CLOSED (None while it is not)."""
        self.local_shutdown = Shutdown(0)
        self.peer_shutdown = Shutdown(0)
        self.buf_alloc = self.options.buf_alloc
        self.fwd_cnt = 0
        self.last_fwd_cnt = 0
        """The fwd_cnt of the last header sent: what the peer may know of our reading."""
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.deadline: float | None = None
        """When tick() gives up on CONNECTING or CLOSING (None: not armed, or no timer)."""
        self._timeout: float | None = None
        self._rx = bytearray()
        self._queue: deque[_Item] = deque()
        self._credit_update_queued = False
        self._credit_update_asked = False
        self._unsent = 0

    def __repr__(self) -> str:
        return f"VsockConnection({self.key}, {self.state.value})"

    # -- what the application sees -----------------------------------------------------------

    @property
    def credit(self) -> int:
        """Bytes send() may accept now: the peer's free buffer space as far as we know it."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32_MASK
        return max(0, self.peer_buf_alloc - in_flight)

    @property
    def readable(self) -> int:
        """Bytes received and not yet taken by receive()."""
        return len(self._rx)

    @property
    def at_eof(self) -> bool:
        """No byte will ever be readable again: everything was read and the peer sends no more."""
        done = self.state is ConnectionState.CLOSED or bool(self.peer_shutdown & Shutdown.SEND)
        return done and not self._rx

    @property
    def writable(self) -> bool:
        """send() is allowed (it may still accept 0 bytes for lack of credit)."""
        return (
            self.state is ConnectionState.CONNECTED
            and not self.local_shutdown & Shutdown.SEND
            and not self.peer_shutdown & Shutdown.RCV
        )

    @property
    def has_packets(self) -> bool:
        """next_packet() would return a packet now: a transport may take a ring buffer for it.

        A lone CREDIT_UPDATE that a later packet made stale does not count (it is never sent).
        """
        queue = self._queue
        if not queue:
            return False
        if len(queue) > 1 or queue[0].op is not Op.CREDIT_UPDATE:
            return True
        return self._credit_update_asked or self.fwd_cnt != self.last_fwd_cnt

    @property
    def unsent(self) -> int:
        """Payload bytes send() accepted that no packet carried yet (the caller's own bound on
        what it buffers, whatever credit the peer gives)."""
        return self._unsent

    # -- application calls -------------------------------------------------------------------

    def connect(self, now: float | None = None) -> None:
        """Queue the REQUEST; without ``now`` the connect timeout starts at the first tick()."""
        self._require(ConnectionState.IDLE, "connect()")
        self.state = ConnectionState.CONNECTING
        self._queue.append(_Item(Op.REQUEST))
        self._arm(now, self.options.connect_timeout)

    def send(self, data: Bytes) -> int:
        """Queue as much of ``data`` as the peer's credit allows and return how much that was."""
        if not self.writable:
            raise VsockError(f"{self}: send() on a connection that is not writable{self._why()}")
        view = memoryview(data).cast("B")
        accepted = min(len(view), self.credit)
        if accepted:
            self._queue.append(_Item(Op.RW, 0, memoryview(bytes(view[:accepted]))))
            self.tx_cnt = (self.tx_cnt + accepted) & U32_MASK
            self._unsent += accepted
        return accepted

    def receive(self, max_bytes: int = -1) -> bytes:
        """Take up to ``max_bytes`` received bytes (all of them if negative); b"" if none."""
        count = len(self._rx) if max_bytes < 0 else min(max_bytes, len(self._rx))
        if not count:
            return b""
        data = bytes(self._rx[:count])
        del self._rx[:count]
        self.fwd_cnt = (self.fwd_cnt + count) & U32_MASK
        unannounced = (self.fwd_cnt - self.last_fwd_cnt) & U32_MASK
        if self._expects_data() and unannounced >= self.options.threshold:
            self._queue_credit_update(asked=False)
        return data

    def shutdown(self, how: Shutdown) -> None:
        """Tell the peer we stop receiving (RCV) and/or sending (SEND); permanent, cumulative."""
        if not how or int(how) & ~int(SHUTDOWN_BOTH):
            raise ValueError(f"shutdown flags {int(how):#x} are not a non-empty subset of RCV|SEND")
        self._require(ConnectionState.CONNECTED, "shutdown()")
        flags = self.local_shutdown | how
        if flags != self.local_shutdown:
            self.local_shutdown = flags
            self._queue.append(_Item(Op.SHUTDOWN, int(flags)))

    def close(self, now: float | None = None) -> None:
        """Close gracefully: SHUTDOWN both ways, then wait for the peer's RST (or the timeout)."""
        state = self.state
        if state is ConnectionState.IDLE:
            self._end("closed")
        elif state is ConnectionState.CONNECTING:
            self._end_with_rst("closed before the peer answered")
        elif state is ConnectionState.CONNECTED:
            if self.local_shutdown != SHUTDOWN_BOTH:
                self.local_shutdown = SHUTDOWN_BOTH
                self._queue.append(_Item(Op.SHUTDOWN, int(SHUTDOWN_BOTH)))
            self.state = ConnectionState.CLOSING
            self._arm(now, self.options.close_timeout)

    def reset(self) -> None:
        """Abort: drop what is queued, send RST (unless nothing was ever sent), go CLOSED."""
        if self.state is ConnectionState.IDLE:
            self._end("reset")
        elif self.state is not ConnectionState.CLOSED:
            self._end_with_rst("reset")

    def request_credit(self) -> None:
        """Ask the peer for a CREDIT_UPDATE (when our view of its credit may be stale)."""
        self._require(ConnectionState.CONNECTED, "request_credit()")
        self._queue.append(_Item(Op.CREDIT_REQUEST))

    def transport_reset(self) -> None:
        """The transport lost its state (TRANSPORT_RESET event): CLOSED, nothing more is sent."""
        if self.state is not ConnectionState.CLOSED:
            self._end("transport reset")

    def tick(self, now: float) -> None:
        """Let time pass: start a timer waiting for its first ``now``, or expire it."""
        if self.state not in (ConnectionState.CONNECTING, ConnectionState.CLOSING):
            return
        if self.deadline is None:
            if self._timeout is not None:
                self.deadline = now + self._timeout
            return
        if now >= self.deadline:
            what = "connect" if self.state is ConnectionState.CONNECTING else "close"
            log.info("%s: %s timed out", self.key, what)
            self._end_with_rst(f"{what} timed out")

    # -- the transport's side ----------------------------------------------------------------

    def feed(self, header: VsockHeader, payload: Bytes = b"") -> None:
        """Take one packet the peer sent on this connection; the answer, if any, is queued.

        A packet that breaks the protocol resets the connection (or is dropped, see
        docs/vsock.md) and is logged with the reason; only a packet for another connection raises.
        """
        got = (header.dst_cid, header.dst_port, header.src_cid, header.src_port)
        if got != self.key:
            raise VsockError(f"{self}: fed a packet for {header.describe()}")
        try:
            check_packet(header, payload)
        except ProtocolError as exc:
            self._refuse(header, exc)
            return
        if self.state is not ConnectionState.CLOSED:
            self.peer_buf_alloc = header.buf_alloc
            self.peer_fwd_cnt = header.fwd_cnt
        _BY_STATE[self.state](self, header, payload)

    def next_packet(self, max_payload: int | None = None) -> Packet | None:
        """The next packet to send, an RW cut to ``max_payload`` bytes if given; None if none."""
        if max_payload is not None and max_payload < 1:
            raise ValueError(f"max_payload {max_payload} is below 1")
        limit = min(max_payload or self.options.max_payload, self.options.max_payload)
        while self._queue:
            item = self._queue[0]
            if item.op is Op.RW and len(item.payload) > limit:
                self._queue[0] = item._replace(payload=item.payload[limit:])
                self._unsent -= limit
                return self._packet(item.op, 0, item.payload[:limit])
            self._queue.popleft()
            self._unsent -= len(item.payload)
            if item.op is not Op.CREDIT_UPDATE or self._credit_update_due():
                return self._packet(item.op, item.flags, item.payload)
        return None

    def packets_to_send(self, max_payload: int | None = None) -> list[Packet]:
        """Every queued packet (see next_packet)."""
        packets = []
        while (packet := self.next_packet(max_payload)) is not None:
            packets.append(packet)
        return packets

    # -- inside -------------------------------------------------------------------------------

    def _require(self, state: ConnectionState, call: str) -> None:
        if self.state is not state:
            raise VsockError(f"{self}: {call} needs state {state.value}{self._why()}")

    def _why(self) -> str:
        if self.reason:
            return f" ({self.reason})"
        if self.local_shutdown or self.peer_shutdown:
            ours, theirs = _flag_names(self.local_shutdown), _flag_names(self.peer_shutdown)
            return f" (shut down: ours {ours}, the peer's {theirs})"
        return ""

    def _arm(self, now: float | None, timeout: float) -> None:
        self._timeout = timeout
        self.deadline = None if now is None else now + timeout

    def _expects_data(self) -> bool:
        return self.state is ConnectionState.CONNECTED and not self.peer_shutdown & Shutdown.SEND

    def _queue_credit_update(self, *, asked: bool) -> None:
        self._credit_update_asked |= asked
        if not self._credit_update_queued:
            self._credit_update_queued = True
            self._queue.append(_Item(Op.CREDIT_UPDATE))

    def _credit_update_due(self) -> bool:
        """Whether a queued CREDIT_UPDATE still says something (or was asked for)."""
        due = self._credit_update_asked or self.fwd_cnt != self.last_fwd_cnt
        self._credit_update_queued = self._credit_update_asked = False
        return due

    def _packet(self, op: Op, flags: int, payload: memoryview | bytes) -> Packet:
        local_cid, local_port, peer_cid, peer_port = self.key
        header = VsockHeader(
            local_cid,
            peer_cid,
            local_port,
            peer_port,
            len(payload),
            Type.STREAM,
            op,
            flags,
            self.buf_alloc,
            self.fwd_cnt,
        )
        self.last_fwd_cnt = self.fwd_cnt
        return Packet(header, payload)

    def _end(self, reason: str) -> None:
        """CLOSED without a word to the peer; what was queued is dropped."""
        self._queue.clear()
        self._unsent = 0
        self._credit_update_queued = self._credit_update_asked = False
        self.state = ConnectionState.CLOSED
        self.reason = reason
        self.deadline = self._timeout = None

    def _end_with_rst(self, reason: str) -> None:
        self._end(reason)
        self._queue.append(_Item(Op.RST))

    def _violation(self, header: VsockHeader, reason: str) -> None:
        """The peer broke the protocol on this connection: reset it (an RST gets no RST back)."""
        log.warning("%s: reset: %s (packet %s)", self.key, reason, header.describe())
        if header.op == Op.RST:
            self._end(f"protocol error: {reason}")
        else:
            self._end_with_rst(f"protocol error: {reason}")

    def _refuse(self, header: VsockHeader, exc: ProtocolError) -> None:
        """A packet check_packet rejected: an unknown op on an open connection is dropped (a
        later spec may define it, as Linux does); anything else resets or is answered with RST."""
        state = self.state
        if exc.field == "op" and state in (ConnectionState.CONNECTED, ConnectionState.CLOSING):
            log.warning("%s: dropped: %s (packet %s)", self.key, exc, header.describe())
        elif state in (ConnectionState.IDLE, ConnectionState.CLOSED):
            log.warning("%s: refused: %s (packet %s)", self.key, exc, header.describe())
            self._answer_rst(header)
        else:
            self._violation(header, str(exc))

    def _answer_rst(self, header: VsockHeader) -> None:
        if header.op != Op.RST:
            self._queue.append(_Item(Op.RST))

    # -- packets by state ---------------------------------------------------------------------

    def _on_idle(self, header: VsockHeader, payload: Bytes) -> None:
        if header.op == Op.REQUEST:
            self.state = ConnectionState.CONNECTED
            self._queue.append(_Item(Op.RESPONSE))
        else:
            log.info("%s: no connection for %s", self.key, header.describe())
            self._answer_rst(header)

    def _on_connecting(self, header: VsockHeader, payload: Bytes) -> None:
        if header.op == Op.RESPONSE:
            self.state = ConnectionState.CONNECTED
            self.deadline = self._timeout = None
        elif header.op == Op.RST:
            self._end("refused by the peer")
        else:
            self._violation(header, f"{op_name(header.op)} while waiting for RESPONSE")

    def _on_connected(self, header: VsockHeader, payload: Bytes) -> None:
        _CONNECTED_OPS[Op(header.op)](self, header, payload)

    def _on_closing(self, header: VsockHeader, payload: Bytes) -> None:
        if header.op == Op.RST:
            self._end("closed")
        elif header.op == Op.SHUTDOWN:
            self.peer_shutdown |= Shutdown(header.flags & SHUTDOWN_BOTH)
            if self.peer_shutdown == SHUTDOWN_BOTH:
                self._end_with_rst("closed")
        else:
            log.debug("%s: closing, dropped %s", self.key, header.describe())

    def _on_closed(self, header: VsockHeader, payload: Bytes) -> None:
        self._answer_rst(header)

    def _on_rw(self, header: VsockHeader, payload: Bytes) -> None:
        if self.peer_shutdown & Shutdown.SEND:
            self._violation(header, "RW after the peer's SHUTDOWN SEND")
        elif len(self._rx) + len(payload) > self.buf_alloc:
            self._violation(
                header,
                f"RW of {len(payload)} bytes beyond our credit ({len(self._rx)} bytes unread,"
                f" buf_alloc {self.buf_alloc})",
            )
        else:
            self._rx += payload

    def _on_credit_request(self, header: VsockHeader, payload: Bytes) -> None:
        self._queue_credit_update(asked=True)

    def _on_credit_update(self, header: VsockHeader, payload: Bytes) -> None:
        """Nothing more to do: feed() took the peer's credit from the header already."""

    def _on_shutdown(self, header: VsockHeader, payload: Bytes) -> None:
        self.peer_shutdown |= Shutdown(header.flags & SHUTDOWN_BOTH)
        if self.peer_shutdown == SHUTDOWN_BOTH:
            self._end_with_rst("closed by the peer")

    def _on_rst(self, header: VsockHeader, payload: Bytes) -> None:
        self._end("reset by the peer")

    def _on_request(self, header: VsockHeader, payload: Bytes) -> None:
        self._violation(header, "REQUEST on an established connection")

    def _on_response(self, header: VsockHeader, payload: Bytes) -> None:
        log.warning("%s: dropped a RESPONSE on an established connection", self.key)


_Handler = Callable[[VsockConnection, VsockHeader, Bytes], None]

_BY_STATE: dict[ConnectionState, _Handler] = {
    ConnectionState.IDLE: VsockConnection._on_idle,
    ConnectionState.CONNECTING: VsockConnection._on_connecting,
    ConnectionState.CONNECTED: VsockConnection._on_connected,
    ConnectionState.CLOSING: VsockConnection._on_closing,
    ConnectionState.CLOSED: VsockConnection._on_closed,
}

_CONNECTED_OPS: dict[Op, _Handler] = {
    Op.REQUEST: VsockConnection._on_request,
    Op.RESPONSE: VsockConnection._on_response,
    Op.RST: VsockConnection._on_rst,
    Op.SHUTDOWN: VsockConnection._on_shutdown,
    Op.RW: VsockConnection._on_rw,
    Op.CREDIT_UPDATE: VsockConnection._on_credit_update,
    Op.CREDIT_REQUEST: VsockConnection._on_credit_request,
}
