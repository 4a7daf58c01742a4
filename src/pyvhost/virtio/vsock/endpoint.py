"""All the stream connections of one CID: listening ports, local port allocation, dispatch.

A :class:`VsockEndpoint` is what sits on one side of a virtio-vsock device: the guest's CID for a
driver, the host's (2) for a device back-end. The transport feeds it every packet from the ring
and takes the packets to send from :meth:`VsockEndpoint.next_packet`. Peer input never raises:
a packet not addressed to us is dropped, one for no connection is answered with RST (never an RST
for an RST), and each is logged with the reason.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Collection, Mapping
from types import MappingProxyType

from pyvhost.errors import ProtocolError, VsockError
from pyvhost.virtio.vsock.connection import (
    ConnectionKey,
    ConnectionOptions,
    ConnectionState,
    VsockConnection,
)
from pyvhost.virtio.vsock.wire import (
    LAST_RESERVED_PORT,
    U32_MASK,
    VMADDR_CID_ANY,
    VMADDR_PORT_ANY,
    Bytes,
    Op,
    Packet,
    VsockHeader,
    check_packet,
    op_name,
    rst_reply,
)

log = logging.getLogger(__name__)

BACKLOG = 128
"""Incoming connections waiting for accept() beyond which a REQUEST is refused."""
MAX_REPLIES = 1024
"""RST replies to unknown connections queued beyond which more are dropped, not queued."""


class VsockEndpoint:
    """The connections of CID ``cid``; ``peer_cid`` (if given) is the only CID accepted as source.

    ``listen(VMADDR_PORT_ANY)`` accepts a REQUEST to any port no other listener has, as a hybrid
    device back-end that forwards each port to its own Unix socket wants. Local ports for
    :meth:`connect` count up from ``first_port``; an endpoint that plays a guest against a real
    kernel should start at a random one, as Linux does: the host's end of a connection closed a
    moment ago lingers (up to 8 s) and swallows a REQUEST that reuses its ports.
    """

    def __init__(
        self,
        cid: int,
        *,
        peer_cid: int | None = None,
        options: ConnectionOptions | None = None,
        backlog: int = BACKLOG,
        max_replies: int = MAX_REPLIES,
        first_port: int = LAST_RESERVED_PORT + 1,
    ) -> None:
        if not LAST_RESERVED_PORT < first_port < VMADDR_PORT_ANY:
            raise ValueError(f"first_port {first_port} is not in {LAST_RESERVED_PORT + 1}..2**32-2")
        self._cid = _valid_cid(cid)
        self.peer_cid = None if peer_cid is None else _valid_cid(peer_cid)
        self.options = options or ConnectionOptions()
        self.backlog = backlog
        self.max_replies = max_replies
        self._listening: set[int] = set()
        self._connections: dict[ConnectionKey, VsockConnection] = {}
        self._accept: deque[VsockConnection] = deque()
        self._replies: deque[Packet] = deque()
        self._next_port = first_port

    def __repr__(self) -> str:
        return f"VsockEndpoint(cid={self._cid}, {len(self._connections)} connections)"

    @property
    def cid(self) -> int:
        return self._cid

    @property
    def connections(self) -> Mapping[ConnectionKey, VsockConnection]:
        """The connections still alive (a CLOSED one leaves once its last packet is sent)."""
        return MappingProxyType(self._connections)

    @property
    def listening(self) -> frozenset[int]:
        return frozenset(self._listening)

    # -- the application's calls -------------------------------------------------------------

    def listen(self, port: int) -> None:
        """Accept connections to ``port`` (VMADDR_PORT_ANY: to any port)."""
        if not 0 <= port <= VMADDR_PORT_ANY:
            raise ValueError(f"port {port} does not fit in u32")
        if port in self._listening:
            raise VsockError(f"{self}: already listening on port {port}")
        self._listening.add(port)

    def unlisten(self, port: int) -> None:
        """Stop accepting connections to ``port``; the ones it accepted live on."""
        if port not in self._listening:
            raise VsockError(f"{self}: not listening on port {port}")
        self._listening.remove(port)

    def connect(
        self,
        peer_cid: int,
        peer_port: int,
        *,
        local_port: int | None = None,
        now: float | None = None,
    ) -> VsockConnection:
        """A new connection to (peer_cid, peer_port), its REQUEST queued; a free local port unless
        ``local_port`` names one."""
        if peer_cid in (self._cid, VMADDR_CID_ANY):
            raise ValueError(f"cannot connect to cid {peer_cid} from cid {self._cid}")
        port = self._allocate_port() if local_port is None else local_port
        conn = VsockConnection(self._cid, port, peer_cid, peer_port, self.options)
        if conn.key in self._connections:
            raise VsockError(f"{self}: connection {conn.key} already exists")
        conn.connect(now)
        self._connections[conn.key] = conn
        return conn

    def accept(self) -> VsockConnection | None:
        """The oldest incoming connection not yet accepted, or None."""
        return self._accept.popleft() if self._accept else None

    def tick(self, now: float) -> None:
        """Run every connection's timers (see VsockConnection.tick)."""
        for conn in list(self._connections.values()):
            conn.tick(now)
            self._forget_if_done(conn)

    @property
    def next_deadline(self) -> float | None:
        """The earliest armed deadline, for the caller's timer."""
        deadlines = [c.deadline for c in self._connections.values() if c.deadline is not None]
        return min(deadlines, default=None)

    def transport_reset(
        self, cid: int | None = None, *, keep: Collection[ConnectionKey] = ()
    ) -> None:
        """TRANSPORT_RESET: every connection but those in ``keep`` is CLOSED without a packet;
        listeners stay, and the CID changes to ``cid`` if given (the guest re-reads its config
        after a migration)."""
        for key, conn in list(self._connections.items()):
            if key not in keep:
                conn.transport_reset()
                del self._connections[key]
        self._accept.clear()
        self._replies.clear()
        if cid is not None:
            self._cid = _valid_cid(cid)

    # -- the transport's calls ---------------------------------------------------------------

    def feed(self, header: VsockHeader, payload: Bytes = b"") -> VsockConnection | None:
        """Take one packet from the peer; return the connection it went to (new ones included)."""
        problem = self._misaddressed(header)
        if problem:
            log.warning("dropped %s: %s", header.describe(), problem)
            return None
        key = ConnectionKey(header.dst_cid, header.dst_port, header.src_cid, header.src_port)
        conn = self._connections.get(key)
        if conn is None:
            return self._feed_unknown(key, header, payload)
        conn.feed(header, payload)
        self._forget_if_done(conn)
        return conn

    def feed_packet(self, data: Bytes) -> VsockConnection | None:
        """feed() a packet given as one buffer (header, then payload); a short one is dropped."""
        try:
            packet = Packet.decode(data)
        except ProtocolError as exc:
            log.warning("dropped a packet: %s", exc)
            return None
        return self.feed(packet.header, packet.payload)

    def next_packet(self, max_payload: int | None = None) -> Packet | None:
        """The next packet to send: RST replies first, then connections in turn, so that one
        busy connection does not starve the others."""
        if self._replies:
            return self._replies.popleft()
        for conn in list(self._connections.values()):
            packet = conn.next_packet(max_payload)
            self._forget_if_done(conn)
            if packet is not None:
                if conn.key in self._connections:
                    self._connections[conn.key] = self._connections.pop(conn.key)
                return packet
        return None

    @property
    def has_packets(self) -> bool:
        """next_packet() would return a packet now (a device takes a ring buffer only then)."""
        return bool(self._replies) or any(c.has_packets for c in self._connections.values())

    def packets_to_send(self, max_payload: int | None = None) -> list[Packet]:
        """Every packet ready to send (see next_packet)."""
        packets = []
        while (packet := self.next_packet(max_payload)) is not None:
            packets.append(packet)
        return packets

    # -- inside -------------------------------------------------------------------------------

    def _misaddressed(self, header: VsockHeader) -> str | None:
        """Why a packet is not for this endpoint (dropped without reply), or None."""
        if header.dst_cid != self._cid:
            return f"dst_cid {header.dst_cid} is not ours ({self._cid})"
        if header.src_cid > U32_MASK:
            return f"src_cid {header.src_cid:#x} sets the reserved upper 32 bits"
        if self.peer_cid is not None and header.src_cid != self.peer_cid:
            return f"src_cid {header.src_cid} is not the peer's ({self.peer_cid})"
        if header.src_cid in (self._cid, VMADDR_CID_ANY):
            return f"src_cid {header.src_cid} cannot be a peer of cid {self._cid}"
        if VMADDR_PORT_ANY in (header.src_port, header.dst_port):
            return f"port {VMADDR_PORT_ANY:#x} (VMADDR_PORT_ANY) is not an address"
        return None

    def _feed_unknown(
        self, key: ConnectionKey, header: VsockHeader, payload: Bytes
    ) -> VsockConnection | None:
        """A packet for no connection: a valid REQUEST to a listener opens one, the rest get RST."""
        try:
            check_packet(header, payload)
        except ProtocolError as exc:
            self._reply_rst(header, str(exc), logging.WARNING)
            return None
        if header.op != Op.REQUEST:
            self._reply_rst(header, f"{op_name(header.op)} for no connection", logging.INFO)
            return None
        if not self._listening & {header.dst_port, VMADDR_PORT_ANY}:
            self._reply_rst(header, f"no listener on port {header.dst_port}", logging.INFO)
            return None
        if len(self._accept) >= self.backlog:
            self._reply_rst(header, f"{self.backlog} connections wait for accept()", logging.INFO)
            return None
        conn = VsockConnection(*key, options=self.options)
        conn.feed(header, payload)
        self._connections[key] = conn
        self._accept.append(conn)
        return conn

    def _reply_rst(self, header: VsockHeader, reason: str, level: int) -> None:
        if header.op == Op.RST:
            log.debug("ignored %s: %s", header.describe(), reason)
        elif len(self._replies) >= self.max_replies:
            log.warning(
                "dropped %s: %s; no RST: %d replies queued",
                header.describe(),
                reason,
                len(self._replies),
            )
        else:
            log.log(level, "RST for %s: %s", header.describe(), reason)
            self._replies.append(Packet(rst_reply(header)))

    def _forget_if_done(self, conn: VsockConnection) -> None:
        if conn.state is ConnectionState.CLOSED and not conn.has_packets:
            self._connections.pop(conn.key, None)

    def _allocate_port(self) -> int:
        """The next port above LAST_RESERVED_PORT that no listener or connection here uses."""
        used = self._listening | {key.local_port for key in self._connections}
        for _ in range(len(used) + 1):
            port = self._next_port
            self._next_port = port + 1 if port + 1 < VMADDR_PORT_ANY else LAST_RESERVED_PORT + 1
            if port not in used:
                return port
        raise VsockError(f"{self}: no free local port")  # pragma: no cover - 4e9 ports in use


def _valid_cid(cid: int) -> int:
    if not 0 <= cid < VMADDR_CID_ANY:
        raise ValueError(f"cid {cid} is not in 0..{VMADDR_CID_ANY - 1}")
    return cid
