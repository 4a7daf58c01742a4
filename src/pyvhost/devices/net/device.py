"""virtio-net as a :class:`pyvhost.daemon.Device`: :class:`NetDevice`, queue pairs between the
guest and a :class:`~pyvhost.devices.net.backends.NetBackend`, and the control queue.

Queue pair ``p`` is receive queue ``2p`` and transmit queue ``2p + 1``; the control queue
follows the last pair the driver may use (index 2 without MQ). A pair's two queues and its TAP
queue share one worker thread, so its backlog needs no lock. The receive queue takes buffers
only when packets wait (``handle_queue`` returns True otherwise and the TAP watch or a looped
transmit calls ``schedule``); it returns True as well while a packet waits for more buffers than
the ring offers, with a kick armed for them.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable

from pyvhost.daemon.device import DEFAULT_RING_FEATURES, Device
from pyvhost.devices.net.backends import NetBackend, tun_offloads
from pyvhost.devices.net.config import (
    DEFAULT_MTU,
    S_ANNOUNCE,
    S_LINK_UP,
    NetConfig,
    base_features,
    check_mtu,
    format_mac,
    random_mac,
)
from pyvhost.devices.net.ctrl import (
    GUEST_OFFLOAD_FEATURES,
    CtrlCommandError,
    RxModes,
    rx_filter,
    serve_ctrl,
)
from pyvhost.devices.net.rarp import rarp_frame
from pyvhost.devices.net.rx import BACKLOG, RxPath
from pyvhost.devices.net.stats import Complaints, NetStats, StatsLogger
from pyvhost.devices.net.tx import TxPath
from pyvhost.user.protocol import ProtocolFeature
from pyvhost.virtio import features as vf
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.net import header_size
from pyvhost.virtio.queue import DeviceQueue

__all__ = ["RX_BUDGET", "NetDevice"]

log = logging.getLogger("pyvhost.devices.net")

RX_BUDGET = 64
"""Packets read from a TAP queue per wake-up before the worker serves its rings again."""


class NetDevice(Device):
    """A virtio-net device over ``backend`` (its queue pairs are the backend's).

    ``mac`` defaults to a random locally administered address; ``mtu`` goes in the config space
    (VIRTIO_NET_F_MTU); ``backlog`` bounds the packets waiting for receive buffers per pair;
    the counters are logged every ``stats_interval`` seconds (0: never) and at :meth:`close`.
    """

    device_id = 1
    ring_features = DEFAULT_RING_FEATURES | 1 << vf.F_RING_PACKED
    extra_protocol_features = 1 << ProtocolFeature.RARP | 1 << ProtocolFeature.MTU

    def __init__(
        self,
        backend: NetBackend,
        *,
        mac: bytes | None = None,
        mtu: int = DEFAULT_MTU,
        queue_size: int = 256,
        backlog: int = BACKLOG,
        stats_interval: float = 0.0,
    ) -> None:
        pairs = backend.pairs
        self.backend = backend
        self.max_pairs = pairs
        self.num_queues = 2 * pairs + 1
        self.queue_size = queue_size
        self.device_features = base_features(pairs) | backend.features
        self.config = NetConfig(mac or random_mac(), pairs, check_mtu(mtu))
        self._mac = self.config.mac
        self.stats = NetStats.for_pairs(pairs)
        self.complain = Complaints()
        self.rx = [RxPath(2 * p, self.stats.pairs[p], self.complain, backlog) for p in range(pairs)]
        self.tx = [
            TxPath(2 * p + 1, backend, self.rx[p], self.stats.pairs[p], self.complain)
            for p in range(pairs)
        ]
        self.rx_modes = RxModes()
        self._filter: Callable[[bytes], bool] | None = None
        self._filter_key: tuple[RxModes, int, bytes] | None = None
        self._lock = threading.Lock()
        self._applied: int | None = None
        self._hdr_size = 12
        self._mergeable = False
        self._ctrl_pairs = 1
        self._guest_offloads = GUEST_OFFLOAD_FEATURES
        self._rx_enabled = [False] * pairs
        self._fd_pair = {fd: p for p, fd in enumerate(backend.fds())}
        self._watched: set[int] = set()
        for fd, pair in self._fd_pair.items():
            self._watch_pair(fd, pair)
        self._stats_log = StatsLogger(self.stats, stats_interval, backend.name).start()

    # -- what the framework reads -----------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return self.config.encode()

    def worker_for_queue(self, index: int, workers: int) -> int:
        """A pair's queues (and its TAP queue) on one worker; the control queue on the first."""
        return 0 if index >= 2 * self.max_pairs else index // 2 % workers

    @property
    def hdr_size(self) -> int:
        """The virtio-net header size in use (12 with VERSION_1 or MRG_RXBUF)."""
        return self._hdr_size

    @property
    def active_pairs(self) -> int:
        """Pairs the driver uses: as set on the control queue, all of them when the front-end
        keeps the control queue to itself (QEMU), one without MQ."""
        features = self.acked_features
        if not vf.has_bit(features, vf.NET_F_MQ):
            return 1
        if vf.has_bit(features, vf.NET_F_CTRL_VQ):
            return self._ctrl_pairs
        return self.max_pairs

    def _ctrl_index(self, features: int) -> int:
        return 2 * (self.max_pairs if vf.has_bit(features, vf.NET_F_MQ) else 1)

    # -- rings ------------------------------------------------------------------------------------

    def handle_queue(self, index: int, queue: DeviceQueue, mem: GuestMemory) -> bool | None:
        features = self.acked_features
        if features != self._applied:
            self._apply(features)
        if index == self._ctrl_index(features):
            ok, err = serve_ctrl(queue, index, self, features, self.complain)
            self.stats.ctrl_ok += ok
            self.stats.ctrl_err += err
            return None
        pair, is_tx = divmod(index, 2)
        if pair >= self.max_pairs:
            self._unused_queue(index, queue)
            return None
        if is_tx:
            if self.tx[pair].process(queue, self._hdr_size, features):
                self.schedule(2 * pair)
            return None
        return True if self.rx[pair].deliver(queue, self._hdr_size, self._mergeable) else None

    def _unused_queue(self, index: int, queue: DeviceQueue) -> None:
        """A queue the features leave without a role: its chains go back untouched."""
        while chains := queue.pop_batch(64):
            self.complain("unused_queue", f"queue {index} has no role with these features")
            queue.push_batch([(c.head, 0) for c in chains])

    def _apply(self, features: int) -> None:
        """The driver's features, applied once: header size, merging, TAP offloads, pairs."""
        with self._lock:
            if features == self._applied:
                return
            self._hdr_size = header_size(features)
            self._mergeable = vf.has_bit(features, vf.NET_F_MRG_RXBUF)
            self._configure_backend(features)
            self._applied = features
            self._sync_attached()
        log.info(
            "net: features %#x: %d-byte header, MRG_RXBUF %s, %d of %d pair(s)",
            features,
            self._hdr_size,
            "on" if self._mergeable else "off",
            self.active_pairs,
            self.max_pairs,
        )

    def _configure_backend(self, features: int) -> None:
        self.backend.configure(self._hdr_size, tun_offloads(features & self._guest_offloads))

    # -- the host side ----------------------------------------------------------------------------

    def _watch_pair(self, fd: int, pair: int) -> None:
        self.watch(fd, self._host_frames, queue=2 * pair)
        self._watched.add(fd)

    def _host_frames(self, fd: int) -> None:
        """A TAP queue is readable: up to :data:`RX_BUDGET` packets into its pair's backlog."""
        pair = self._fd_pair[fd]
        rx = self.rx[pair]
        accepts = self._current_filter()
        hdr = self._hdr_size
        got = 0
        for _ in range(RX_BUDGET):
            try:
                packet = self.backend.read(pair)
            except OSError as exc:
                if exc.errno == errno.EBADFD:  # detached meanwhile: its watch is going away
                    break
                raise
            if packet is None:
                break
            if accepts is not None and not accepts(packet[hdr : hdr + 6]):
                rx.stats.drop("rx_filtered")
                continue
            rx.enqueue(packet)
            got += 1
        if got:
            self.schedule(2 * pair)

    def _current_filter(self) -> Callable[[bytes], bool] | None:
        """The receive filter for the modes, tables and MAC in force, rebuilt when one changed."""
        modes, mac = self.rx_modes, self.config.mac
        key = self._filter_key
        if key is None or key[0] is not modes or key[1] != modes.generation or key[2] != mac:
            self._filter = rx_filter(modes, mac)
            self._filter_key = (modes, modes.generation, mac)
        return self._filter

    def _sync_attached(self) -> None:
        """Multiqueue TAP: queue ``p`` takes frames only while pair ``p`` is in use and its
        receive ring enabled (queue 0 always), as QEMU's own TAP back end does."""
        fds = list(self._fd_pair)
        if len(fds) < 2:
            return
        active = self.active_pairs if self._applied is not None else self.max_pairs
        for pair in range(1, len(fds)):
            fd = fds[pair]
            want = pair < active and (self._rx_enabled[pair] or self._applied is None)
            if want == (fd in self._watched):
                continue
            if want:
                self.backend.set_attached(pair, True)
                self._watch_pair(fd, pair)
            else:
                self.unwatch(fd)
                self._watched.discard(fd)
                self.backend.set_attached(pair, False)

    # -- hooks ------------------------------------------------------------------------------------

    def queue_enabled(self, index: int, enabled: bool) -> None:
        pair, is_tx = divmod(index, 2)
        if is_tx or pair >= self.max_pairs:
            return
        with self._lock:
            self._rx_enabled[pair] = enabled
            self._sync_attached()

    def on_reset(self) -> None:
        """The configured MAC, one pair, every offload, modes cleared; waiting packets dropped."""
        with self._lock:
            self.config.mac = self._mac
            self.config.status = S_LINK_UP
            self._ctrl_pairs = 1
            self._guest_offloads = GUEST_OFFLOAD_FEATURES
            self.rx_modes = RxModes()
            self._applied = None
            self._rx_enabled = [False] * self.max_pairs
            self._sync_attached()
        for rx in self.rx:
            rx.clear()

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: a RARP broadcast for ``mac`` out of the TAP, so switches learn where the
        migrated guest is now."""
        packet = bytes(self._hdr_size) + rarp_frame(mac)
        if self.backend.announce(packet):
            self.stats.announced += 1
            log.info("net: RARP for %s sent through %s", format_mac(mac), self.backend.name)
        else:
            log.info(
                "net: RARP for %s not sent: %s has no network", format_mac(mac), self.backend.name
            )

    def net_set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU: the MTU the config space shows the driver from now on (and a TAP this
        process created takes)."""
        self.config.mtu = check_mtu(mtu)
        log.info("net: MTU %d (NET_SET_MTU)", mtu)
        self.backend.set_mtu(mtu)

    # -- what the control queue changes (CtrlTarget) ---------------------------------------------

    def set_mac(self, mac: bytes) -> None:
        self.config.mac = mac
        log.info("net: MAC %s (MAC_ADDR_SET)", format_mac(mac))

    def set_pairs(self, pairs: int) -> None:
        with self._lock:
            self._ctrl_pairs = pairs
            self._sync_attached()
        log.info("net: %d queue pair(s) in use (MQ_VQ_PAIRS_SET)", pairs)

    def set_guest_offloads(self, offloads: int) -> None:
        features = self.acked_features
        extra = offloads & ~(features & GUEST_OFFLOAD_FEATURES)
        if extra:
            raise CtrlCommandError(
                f"GUEST_OFFLOADS_SET {offloads:#x}: bits {extra:#x} are not negotiated offloads"
            )
        with self._lock:
            self._guest_offloads = offloads
            self._configure_backend(features)

    def announce_acked(self) -> None:
        self.config.status &= ~S_ANNOUNCE

    # -- life -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop watching the back end's fds and close it; log the counters a last time."""
        self._stats_log.stop()
        for fd in list(self._watched):
            self.unwatch(fd)
        self._watched.clear()
        self.backend.close()
