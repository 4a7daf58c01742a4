"""virtio-vsock (type 19) as a :class:`pyvhost.daemon.Device`: the host's end (CID 2) of the
guest's stream sockets, each bridged to a Unix socket (see :mod:`.bridge`).

Queues: 0 rx (device to guest), 1 tx (guest to device), 2 event. All three, and every Unix
socket, are served by worker 0 of the daemon's loop, so they share the endpoint without a lock of
their own; :attr:`UnixBridge.lock` keeps the connection thread's reset out.

- tx: every packet goes to the :class:`~pyvhost.virtio.vsock.VsockEndpoint` (hostile ones are
  refused there, with the reason logged) and each chain is returned at once.
- rx: a chain is popped only when a packet is ready for it and returned at once; with nothing to
  send the queue waits (``handle_queue`` returns True) until the device schedules it, so stopping
  the ring never waits for the device.
- event: TRANSPORT_RESET when the device starts under a driver whose connections it does not
  know: the rx or tx ring starts past index 0 (the driver used it before) on a device that has
  not served this driver (a restarted back-end, or a reset or departed front-end whose
  connections this device closed). A ring starting at 0 is a new driver, which has no
  connections to reset. (QEMU's vhost-user-vsock keeps the event queue to itself and never
  starts it here.)
"""

from __future__ import annotations

import logging
import random
import weakref

from pyvhost.daemon.device import BATCH, Device
from pyvhost.devices.vsock.bridge import UnixBridge
from pyvhost.devices.vsock.rings import read_packet, write_packet
from pyvhost.errors import ProtocolError
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.queue import DeviceQueue
from pyvhost.virtio.vsock import (
    EVENT_QUEUE,
    HEADER_SIZE,
    HOST_CID,
    RX_QUEUE,
    TX_QUEUE,
    VMADDR_PORT_ANY,
    ConnectionKey,
    ConnectionOptions,
    ConnectionState,
    EventId,
    Op,
    VsockConfig,
    VsockEndpoint,
    VsockEvent,
)

__all__ = ["FIRST_PORT_RANGE", "VsockDevice"]

log = logging.getLogger("pyvhost.devices.vsock")

FIRST_PORT_RANGE = (1 << 30, 1 << 31)
"""Host ports for CONNECT start at a random port in this range (as Linux picks at random): a
restarted back-end would otherwise reuse 4-tuples the guest may still hold."""


class VsockDevice(Device):
    """The host's vsock end for the guest ``guest_cid``, bridged to Unix sockets at ``uds_path``
    (listening there for CONNECT, connecting to ``<uds_path>_<port>`` for the guest)."""

    device_id = 19
    num_queues = 3
    queue_size = 256
    uses_inflight = True
    """A front-end that keeps the inflight region across a back-end restart also keeps its
    rings, and their index then tells the new device that a driver ran before it."""

    def __init__(
        self, guest_cid: int, uds_path: str, *, options: ConnectionOptions | None = None
    ) -> None:
        try:
            self._config = VsockConfig(guest_cid).encode()
        except ProtocolError as exc:
            raise ValueError(f"guest CID {guest_cid}: {exc}") from None
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.endpoint = VsockEndpoint(
            HOST_CID,
            peer_cid=guest_cid,
            options=options,
            first_port=random.randrange(*FIRST_PORT_RANGE),
        )
        self.endpoint.listen(VMADDR_PORT_ANY)
        self.max_tx_payload = self.endpoint.options.buf_alloc
        self.bridge = UnixBridge(self.endpoint, guest_cid, uds_path, self)
        self.resets_sent = 0
        """TRANSPORT_RESET events written into the event queue."""
        self._reset_pending = False
        self._driver_known = False
        self._seen: dict[int, weakref.ref[DeviceQueue]] = {}
        """The queue each ring last started with (weakly: it holds views into guest memory)."""
        self._bases: dict[int, int] = {}

    # -- what the framework reads ------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return self._config

    def worker_for_queue(self, index: int, workers: int) -> int:
        """Every queue on worker 0, with the Unix sockets: they share the endpoint."""
        return 0

    def packets_ready(self) -> None:
        self.schedule(RX_QUEUE)

    # -- queues ------------------------------------------------------------------------------------

    def handle_queue(self, index: int, queue: DeviceQueue, mem: GuestMemory) -> bool | None:
        with self.bridge.lock:
            self._note_start(index, queue)
            if index == TX_QUEUE:
                self._transmitted(queue)
                self.bridge.settle()
                return None
            if index == RX_QUEUE:
                waiting = self._receive(queue)
                self.bridge.arm_timer()
                return waiting
            return self._event(queue)

    def _note_start(self, index: int, queue: DeviceQueue) -> None:
        """A ring seen for the first time since it started: does its driver know more than we?"""
        seen = self._seen.get(index)
        previous = None if seen is None else seen()
        if queue is previous or getattr(previous, "inner", None) is queue:
            return
        self._seen[index] = weakref.ref(queue)
        if index == EVENT_QUEUE:
            return
        base = queue.get_base()
        self._bases[index] = base
        if base and not self._driver_known:
            log.info(
                "ring %d starts at %d: a driver this device did not serve; transport reset",
                index,
                base,
            )
            self._reset_pending = True
            self.schedule(EVENT_QUEUE)
        elif index == TX_QUEUE and not base and not self._bases.get(RX_QUEUE):
            self._new_driver()
        self._driver_known = True

    def _new_driver(self) -> None:
        """Both rings start at 0 (the tx ring starts after the rx ring): a driver that never ran,
        with no connection to be told about; ours were its predecessor's. Host connections still
        waiting for the guest's answer stay: made while no driver ran, their request is for this
        one (the rx ring, started first, may have handed it over already)."""
        self._reset_pending = False
        connections = self.endpoint.connections
        keep = {k for k, c in connections.items() if c.state is ConnectionState.CONNECTING}
        if len(connections) > len(keep):
            log.info(
                "rings start at 0: a new driver; the old one's connections end (%d kept: "
                "connecting)",
                len(keep),
            )
            self.bridge.release(self.bridge.detach_except(keep))
            self.endpoint.transport_reset(keep=keep)

    def _transmitted(self, queue: DeviceQueue) -> None:
        endpoint = self.endpoint
        while chains := queue.pop_batch(BATCH):
            keys: set[ConnectionKey] = set()
            for chain in chains:
                packet = read_packet(chain, self.max_tx_payload)
                if packet is not None and (conn := endpoint.feed(*packet)) is not None:
                    keys.add(conn.key)
            queue.push_batch([(chain.head, 0) for chain in chains])
            self.bridge.guest_spoke(keys)

    def _receive(self, queue: DeviceQueue) -> bool | None:
        """Fill rx chains while packets are ready: True (wait for schedule) once none is left,
        None when the driver gave too few chains (its next kick brings us back)."""
        while True:
            starved, keys = self._fill(queue)
            self.bridge.guest_listened(keys)
            if starved:
                return None
            if not self.endpoint.has_packets:
                return True

    def _fill(self, queue: DeviceQueue) -> tuple[bool, set[ConnectionKey]]:
        endpoint = self.endpoint
        done: list[tuple[int, int]] = []
        keys: set[ConnectionKey] = set()
        try:
            while endpoint.has_packets:
                chain = queue.pop()
                if chain is None:
                    return True, keys
                room = chain.write_len - HEADER_SIZE
                if room < 1:
                    log.warning(
                        "rx chain %d: %d writable bytes, no room for a packet",
                        chain.head,
                        chain.write_len,
                    )
                    done.append((chain.head, 0))
                    continue
                packet = endpoint.next_packet(room)
                assert packet is not None  # has_packets is exact
                done.append((chain.head, write_packet(chain, packet)))
                if packet.header.op == Op.RW:
                    h = packet.header
                    keys.add(ConnectionKey(h.src_cid, h.src_port, h.dst_cid, h.dst_port))
            return False, keys
        finally:
            if done:
                queue.push_batch(done)

    def _event(self, queue: DeviceQueue) -> bool | None:
        if not self._reset_pending:
            return True
        chain = queue.pop()
        if chain is None:
            return None
        event = VsockEvent(EventId.TRANSPORT_RESET).encode()
        written = chain.write_at(0, event)
        queue.push(chain.head, written)
        if written < len(event):
            log.warning(
                "event chain %d: %d writable bytes, TRANSPORT_RESET cut",
                chain.head,
                chain.write_len,
            )
        self._reset_pending = False
        self.resets_sent += 1
        log.info("TRANSPORT_RESET sent to the guest")
        return True

    # -- hooks -------------------------------------------------------------------------------------

    def on_reset(self) -> None:
        """The front-end reset the device or left: every connection ends (Unix sockets closed);
        a driver that comes back with its rings where they were hears of it by TRANSPORT_RESET."""
        with self.bridge.lock:
            count = len(self.endpoint.connections)
            sockets = self.bridge.detach_all()
            self.endpoint.transport_reset()
            self._seen.clear()
            self._bases.clear()
            self._driver_known = False
        self.bridge.release(sockets)
        if count:
            log.info("reset: %d connection(s) closed", count)

    def close(self) -> None:
        """Close every Unix socket and the listener (``pyvhost serve`` calls this at exit)."""
        self.bridge.close()
