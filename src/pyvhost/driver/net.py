"""A virtio-net guest driver over a :class:`DriverSession`: frames out of the transmit queue, into
posted receive buffers, with the header and MRG_RXBUF merging done as a guest's driver does.

The same code drives a vhost-user net back-end and the kernel's ``/dev/vhost-net``: it talks
only to the session. Queue pair ``p`` is receive queue ``2p`` and transmit queue ``2p + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyvhost.driver.session import DriverSession, QueueFullError
from pyvhost.errors import ProtocolError
from pyvhost.virtio import features as vf
from pyvhost.virtio.net import ETH_HEADER_LEN, NetHeader, header_size

__all__ = ["MAX_FRAME", "NetDriver", "Received"]

MAX_FRAME = 1514
"""The largest frame without a larger MTU: 1500 bytes of payload and the Ethernet header."""


@dataclass
class Received:
    """One frame taken from the receive queue, with its header and the buffers it spanned."""

    header: NetHeader
    frame: bytes
    buffers: int
    addresses: tuple[int, ...] = ()
    """Guest-physical addresses of the buffers, in order (already reposted or freed)."""


@dataclass
class _RxState:
    posted: dict[int, int] = field(default_factory=dict)
    """Token -> guest-physical address of a posted receive buffer."""
    partial: list[bytes] = field(default_factory=list)
    partial_gpas: list[int] = field(default_factory=list)
    partial_header: NetHeader | None = None
    partial_left: int = 0


class NetDriver:
    """The driver side of one virtio-net queue pair.

    ``rx_buffer_size`` is each receive buffer's size, header included: without MRG_RXBUF it
    must hold a whole frame; with MRG_RXBUF a frame may span several.
    """

    def __init__(
        self, session: DriverSession, *, pair: int = 0, rx_buffer_size: int | None = None
    ) -> None:
        self.session = session
        self.rx_queue = 2 * pair
        self.tx_queue = 2 * pair + 1
        self.hdr_size = header_size(session.features)
        self.mergeable = session.has_feature(vf.NET_F_MRG_RXBUF)
        whole = self.hdr_size + MAX_FRAME
        self.rx_buffer_size = rx_buffer_size or whole
        if not self.mergeable and self.rx_buffer_size < whole:
            raise ValueError(
                f"receive buffers of {self.rx_buffer_size} bytes cannot hold a {MAX_FRAME}-byte "
                "frame and MRG_RXBUF was not negotiated"
            )
        if self.rx_buffer_size <= self.hdr_size:
            raise ValueError(f"receive buffers of {self.rx_buffer_size} bytes hold no data")
        self._rx = _RxState()
        self._tx: dict[int, int] = {}
        self.rx_errors: list[str] = []
        """Frames dropped as malformed (bad header, bad num_buffers), with the reason."""
        self.rx_returned = 0
        """Receive buffers the device gave back with nothing in them (it could not use them)."""

    # --- transmit -----------------------------------------------------------------------------

    def tx_room(self) -> int:
        """Frames that can be queued for transmit now."""
        return self.session.free_descriptors(self.tx_queue)

    def send(self, frame: bytes, header: NetHeader | None = None) -> int:
        """Queue ``frame`` (an Ethernet frame without FCS) for transmit; publish with :meth:`flush`.

        Header and frame go in one buffer, as Linux's virtio-net does with ANY_LAYOUT/VERSION_1.
        """
        if len(frame) < ETH_HEADER_LEN:
            raise ValueError(f"frame of {len(frame)} bytes is shorter than an Ethernet header")
        if self.session.free_descriptors(self.tx_queue) < 1:
            raise QueueFullError("transmit queue full: reap completions first", queue=self.tx_queue)
        size = self.hdr_size + len(frame)
        gpa = self.session.alloc(size)
        view = self.session.view(gpa, size)
        view[: self.hdr_size] = (header or NetHeader()).encode(self.hdr_size)
        view[self.hdr_size :] = frame
        token = self.session.submit(self.tx_queue, [(gpa, size)], [])
        self._tx[token] = gpa
        return token

    def flush(self) -> None:
        """Make queued transmits visible to the device and notify it."""
        self.session.kick(self.tx_queue)

    def reap_tx(self, timeout: float | None = 0.0) -> int:
        """Free the buffers of completed transmits; returns how many completed."""
        done = (
            self.session.poll(self.tx_queue)
            if timeout == 0
            else self.session.wait(self.tx_queue, timeout)
        )
        for token, _ in done:
            self.session.free(self._tx.pop(token))
        return len(done)

    @property
    def tx_in_flight(self) -> int:
        return len(self._tx)

    # --- receive ------------------------------------------------------------------------------

    def post_rx(self, count: int | None = None) -> int:
        """Post up to ``count`` empty receive buffers (all the ring has room for by default)."""
        room = self.session.free_descriptors(self.rx_queue)
        n = room if count is None else min(count, room)
        for _ in range(n):
            gpa = self.session.alloc(self.rx_buffer_size)
            token = self.session.submit(self.rx_queue, [], [(gpa, self.rx_buffer_size)])
            self._rx.posted[token] = gpa
        if n:
            self.session.kick(self.rx_queue)
        return n

    @property
    def rx_posted(self) -> int:
        return len(self._rx.posted)

    def receive(self, timeout: float | None = 0.0) -> list[Received]:
        """Frames the device put in receive buffers; reposts as many buffers as it took."""
        done = (
            self.session.poll(self.rx_queue)
            if timeout == 0
            else self.session.wait(self.rx_queue, timeout)
        )
        frames: list[Received] = []
        for token, written in done:
            gpa = self._rx.posted.pop(token)
            try:
                data = bytes(self.session.view(gpa, min(written, self.rx_buffer_size)))
            finally:
                self.session.free(gpa)
            if written > self.rx_buffer_size:
                self._drop(f"device wrote {written} bytes into a {self.rx_buffer_size}-byte buffer")
                continue
            if written == 0 and not self._rx.partial_left:
                self.rx_returned += 1
                continue
            frame = self._take(data, gpa)
            if frame is not None:
                frames.append(frame)
        if done:
            self.post_rx(len(done))
        return frames

    def _drop(self, reason: str) -> None:
        self.rx_errors.append(reason)
        self._rx.partial, self._rx.partial_header, self._rx.partial_left = [], None, 0
        self._rx.partial_gpas = []

    def _take(self, data: bytes, gpa: int) -> Received | None:
        """One used buffer: a frame's first buffer (header first) or a later one (data only)."""
        rx = self._rx
        if rx.partial_left:
            rx.partial.append(data)
            rx.partial_gpas.append(gpa)
            rx.partial_left -= 1
            if rx.partial_left:
                return None
            header = rx.partial_header
            assert header is not None
            got = Received(header, b"".join(rx.partial), header.num_buffers, tuple(rx.partial_gpas))
            rx.partial, rx.partial_gpas, rx.partial_header = [], [], None
            return got
        try:
            header = NetHeader.decode(data, self.hdr_size)
        except ProtocolError as exc:
            self._drop(str(exc))
            return None
        buffers = header.num_buffers if self.mergeable else 1
        if buffers < 1:
            self._drop(f"num_buffers {header.num_buffers} in a mergeable receive header")
            return None
        body = data[self.hdr_size :]
        if buffers == 1:
            return Received(header, body, 1, (gpa,))
        rx.partial, rx.partial_header, rx.partial_left = [body], header, buffers - 1
        rx.partial_gpas = [gpa]
        return None
