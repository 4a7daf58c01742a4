"""The guest's virtio-vsock driver over a :class:`DriverSession`: a
:class:`~pyvhost.virtio.vsock.VsockEndpoint` at the guest's CID, its packets carried by the
receive queue (device -> guest) and the transmit queue (guest -> device).

It talks only to the session, so it drives the kernel's ``/dev/vhost-vsock`` and a vhost-user
vsock device alike. Each receive buffer takes one packet (header and payload); the device splits
longer payloads over several packets. A session with a third queue has the event queue too (a
vhost-user device; the kernel's has none, its VMM keeps it): a TRANSPORT_RESET there closes every
connection of the endpoint, as Linux does.
"""

from __future__ import annotations

import logging

from pyvhost.driver.session import DriverSession
from pyvhost.errors import ProtocolError
from pyvhost.virtio.vsock import EventId, VsockEndpoint, VsockEvent
from pyvhost.virtio.vsock.wire import EVENT_QUEUE, HEADER_SIZE, RX_QUEUE, TX_QUEUE

__all__ = ["DEFAULT_RX_PAYLOAD", "VsockDriver"]

DEFAULT_RX_PAYLOAD = 4096
"""Payload bytes a receive buffer holds after the header (Linux's default rx buffer)."""
EVENT_BUFFERS = 8
"""Event buffers kept posted (as Linux does)."""

log = logging.getLogger(__name__)


class VsockDriver:
    """Moves the endpoint's packets through the rings; :meth:`pump` does one round."""

    def __init__(
        self,
        session: DriverSession,
        endpoint: VsockEndpoint,
        *,
        rx_payload: int = DEFAULT_RX_PAYLOAD,
        tx_payload: int = DEFAULT_RX_PAYLOAD,
    ) -> None:
        self.session = session
        self.endpoint = endpoint
        self.rx_buffer_size = HEADER_SIZE + rx_payload
        self.tx_payload = tx_payload
        self._rx: dict[int, int] = {}
        self._tx: dict[int, int] = {}
        self.rx_packets = 0
        self.tx_packets = 0
        self.rx_malformed = 0
        """Used receive buffers shorter than a header or longer than posted (dropped)."""
        self.has_events = session.num_queues > EVENT_QUEUE
        self._events: dict[int, int] = {}
        self.transport_resets = 0
        """TRANSPORT_RESET events received (each closed every connection)."""

    def post_rx(self) -> int:
        """Fill the receive queue with empty buffers; returns how many were added."""
        session = self.session
        n = session.free_descriptors(RX_QUEUE)
        for _ in range(n):
            gpa = session.alloc(self.rx_buffer_size)
            token = session.submit(RX_QUEUE, [], [(gpa, self.rx_buffer_size)])
            self._rx[token] = gpa
        if n:
            session.kick(RX_QUEUE)
        if self.has_events:
            self._post_events()
        return n

    def _post_events(self) -> None:
        session = self.session
        added = 0
        while len(self._events) < EVENT_BUFFERS and session.free_descriptors(EVENT_QUEUE):
            gpa = session.alloc(VsockEvent.SIZE)
            self._events[session.submit(EVENT_QUEUE, [], [(gpa, VsockEvent.SIZE)])] = gpa
            added += 1
        if added:
            session.kick(EVENT_QUEUE)

    def pump(self) -> int:
        """Feed received packets to the endpoint and send what it has queued; returns how many
        packets moved either way (0: nothing to do until the device or the application acts)."""
        moved = self._events_in() if self.has_events else 0
        moved += self._receive()
        self.post_rx()
        self._reap_tx()
        moved += self._transmit()
        return moved

    def _receive(self) -> int:
        session = self.session
        done = session.poll(RX_QUEUE)
        for token, written in done:
            gpa = self._rx.pop(token)
            try:
                if HEADER_SIZE <= written <= self.rx_buffer_size:
                    self.endpoint.feed_packet(bytes(session.view(gpa, written)))
                    self.rx_packets += 1
                else:
                    self.rx_malformed += 1
            finally:
                session.free(gpa)
        return len(done)

    def _events_in(self) -> int:
        session = self.session
        done = session.poll(EVENT_QUEUE)
        for token, written in done:
            gpa = self._events.pop(token)
            try:
                event = VsockEvent.decode(bytes(session.view(gpa, VsockEvent.SIZE))[:written])
            except ProtocolError as exc:
                log.warning("event queue: %s", exc)
            else:
                self._event(event)
            finally:
                session.free(gpa)
        return len(done)

    def _event(self, event: VsockEvent) -> None:
        if event.id != EventId.TRANSPORT_RESET:
            log.warning("event queue: unknown event %d ignored", event.id)
            return
        self.transport_resets += 1
        log.info("TRANSPORT_RESET: %d connection(s) closed", len(self.endpoint.connections))
        self.endpoint.transport_reset()

    def _reap_tx(self) -> None:
        for token, _ in self.session.poll(TX_QUEUE):
            self.session.free(self._tx.pop(token))

    def _transmit(self) -> int:
        session = self.session
        sent = 0
        while session.free_descriptors(TX_QUEUE) > 0:
            packet = self.endpoint.next_packet(self.tx_payload)
            if packet is None:
                break
            data = packet.encode()
            gpa = session.alloc(len(data))
            session.view(gpa, len(data))[:] = data
            self._tx[session.submit(TX_QUEUE, [(gpa, len(data))], [])] = gpa
            sent += 1
        if sent:
            self.tx_packets += sent
            session.kick(TX_QUEUE)
        return sent

    def transmit_raw(self, data: bytes, *, kick: bool = True) -> None:
        """Put ``data`` on the transmit queue as one packet, whatever it holds (a tool's hostile
        or malformed packets; the endpoint knows nothing of it); ``kick=False`` leaves it for
        the next kick, so that several reach the device together."""
        session = self.session
        gpa = session.alloc(max(1, len(data)))
        session.view(gpa, len(data))[:] = data
        self._tx[session.submit(TX_QUEUE, [(gpa, len(data))], [])] = gpa
        self.tx_packets += 1
        if kick:
            session.kick(TX_QUEUE)

    @property
    def tx_in_flight(self) -> int:
        return len(self._tx)
