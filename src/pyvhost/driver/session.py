"""DriverSession: a vhost-user front-end and a virtio guest driver in one object (no VM).

It negotiates with a back-end, shares one anonymous memfd as guest memory, lays out the rings
and data buffers in it, and submits chains / collects completions the way a guest driver does.

Reconnect (the back-end went away: EOF, EPIPE or ECONNRESET on the socket, or a failed request).
The session keeps its guest memory, connects again within ``reconnect`` seconds and redoes the
whole set-up; nothing that was submitted is lost. Two ways of resuming, as QEMU does them:

* inflight mode (split rings, back-end offers INFLIGHT_SHMFD): the rings are left exactly as they
  are, the inflight fd obtained with GET_INFLIGHT_FD is handed back with SET_INFLIGHT_FD and
  SET_VRING_BASE is the used index found in the ring (QEMU's ``restore_last_avail_idx``). The
  back-end resubmits what its inflight region says was popped and not completed, then carries on
  with the entries after it.
* resubmit mode (no inflight tracking, or packed rings): the driver first collects whatever the
  old back-end completed, then re-creates every ring from scratch (base 0) and adds the chains
  it has not seen completed again, oldest first, with the same buffers. Tokens stay valid: the
  caller never notices, except in :attr:`DriverSession.reconnects`. A write may thus reach the
  disk twice and a read be served twice; both are harmless for a block device.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

from pyvhost.closing import Closing
from pyvhost.control import RingAddresses, VhostControl, start_ring
from pyvhost.errors import (
    ConnectionClosedError,
    GuestMemoryError,
    ProtocolError,
    UnsupportedRequestError,
    VhostError,
    VirtqueueError,
)
from pyvhost.kernel.device import VhostKernelDevice
from pyvhost.user.frontend import Frontend
from pyvhost.user.messages import Inflight, ProtocolFeature
from pyvhost.user.protocol import FRONTEND_PROTOCOL_FEATURES
from pyvhost.virtio import features as vf
from pyvhost.virtio.memory import DirtyLog, GuestMemory
from pyvhost.virtio.packed import PackedDriver, encode_packed_base, packed_layout
from pyvhost.virtio.split import SplitDriver, split_layout

__all__ = [
    "DEFAULT_GPA_BASE",
    "DriverSession",
    "QueueFullError",
]

log = logging.getLogger(__name__)

PF = ProtocolFeature

DEFAULT_GPA_BASE = 0x4000_0000
"""Guest-physical address of the shared memory (not 0, so a back-end that ignores it fails)."""

_ALL = (1 << 64) - 1
_RING_ALIGN = 4096
_ALLOC_ALIGN = 64
_STATUS_DRIVER_OK = 0x1 | 0x2 | 0x8 | 0x4  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
_NOT_IMPLEMENTED = sum(
    1 << bit
    for bit in (
        vf.F_ACCESS_PLATFORM,
        vf.F_IN_ORDER,
        vf.F_NOTIFICATION_DATA,
        vf.F_RING_RESET,
        vf.F_ADMIN_VQ,
        vf.F_SR_IOV,
        vf.F_NOTIF_CONFIG_DATA,
        vf.F_ORDER_PLATFORM,
        vf.F_LOG_ALL,
        vf.F_RING_PACKED,
    )
)
"""Transport bits this driver does not implement: never acknowledged (packed only on request)."""
_LOST = (ConnectionClosedError, ConnectionError, BrokenPipeError, TimeoutError, OSError)

Buffers = Sequence[tuple[int, int]]


class QueueFullError(VirtqueueError):
    """Not enough free descriptors for the chain: reap completions first."""


class _Heap:
    """A bump allocator with exact-size free lists, over ``[start, end)`` of guest memory."""

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self._next = start
        self._free: dict[int, list[int]] = {}
        self._sizes: dict[int, int] = {}

    def alloc(self, size: int) -> int:
        if size <= 0:
            raise ValueError(f"alloc: size {size} must be positive")
        rounded = -(-size // _ALLOC_ALIGN) * _ALLOC_ALIGN
        bucket = self._free.get(rounded)
        if bucket:
            gpa = bucket.pop()
        else:
            gpa = self._next
            if gpa + rounded > self.end:
                in_use = sum(self._sizes.values())
                raise GuestMemoryError(
                    f"driver memory exhausted: cannot allocate {size} bytes "
                    f"({in_use} bytes in use, heap {self.start:#x}..{self.end:#x})",
                    address=gpa,
                    length=size,
                )
            self._next = gpa + rounded
        self._sizes[gpa] = rounded
        return gpa

    def free(self, gpa: int) -> None:
        size = self._sizes.pop(gpa, None)
        if size is None:
            raise ValueError(f"free: {gpa:#x} was not allocated (or freed twice)")
        self._free.setdefault(size, []).append(gpa)

    @property
    def in_use(self) -> int:
        return sum(self._sizes.values())


@dataclass
class _Pending:
    """A chain submitted and not seen completed: enough to add it again after a reconnect."""

    token: int
    readable: tuple[tuple[int, int], ...]
    writable: tuple[tuple[int, int], ...]
    indirect_gpa: int | None


@dataclass
class _Queue:
    index: int
    size: int
    base_gpa: int
    kick_fd: int
    call_fd: int
    driver: SplitDriver | PackedDriver | None = None
    ring: RingAddresses | None = None
    by_head: dict[int, int] = field(default_factory=dict)
    pending: dict[int, _Pending] = field(default_factory=dict)
    done: list[tuple[int, int]] = field(default_factory=list)
    calls: int = 0


class DriverSession(Closing):
    """Front-end plus guest driver over one Unix socket; see the module docstring for reconnect.

    Single-threaded: one thread submits, kicks and waits. ``submit`` returns a token; ``wait``
    returns ``(token, written)`` pairs, ``written`` being the length the back-end reported.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        num_queues: int = 1,
        queue_size: int = 128,
        features_mask: int = _ALL,
        protocol_mask: int = FRONTEND_PROTOCOL_FEATURES,
        mem_size: int = 16 << 20,
        packed: bool = False,
        indirect: bool = False,
        reconnect: float = 0.0,
        use_inflight: bool = True,
        connect_timeout: float = 10.0,
        reply_timeout: float = 10.0,
        gpa_base: int = DEFAULT_GPA_BASE,
    ) -> None:
        if num_queues < 1:
            raise ValueError(f"num_queues {num_queues} must be at least 1")
        self.path = os.fspath(path)
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.features_mask = features_mask
        self.protocol_mask = protocol_mask
        self.want_packed = packed
        self.use_indirect = indirect
        self.reconnect_timeout = reconnect
        self.use_inflight = use_inflight
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.reconnects = 0
        """How many times the session reconnected to a back-end that went away."""
        self.resubmitted = 0
        """Chains added again by the driver after reconnects (resubmit mode)."""
        self.in_flight_at_loss = 0
        """Chains not yet completed when back-ends went away (summed over reconnects)."""
        self.offered_features = 0
        self.features = 0
        self.offered_protocol_features = 0
        self.protocol_features = 0
        self.queue_num: int | None = None
        self.inflight_mode = False
        self._inflight: Inflight | None = None
        self._inflight_fd: int | None = None
        self._frontend: Frontend | None = None
        self._kernel: VhostKernelDevice | None = None
        self.log_rings = False
        self.dirty_log: DirtyLog | None = None
        """The log given to :meth:`enable_dirty_log` (the caller owns and closes it)."""
        """Rings are started with VHOST_VRING_F_LOG (used-ring writes logged; LOG_ALL acked)."""
        self.poll_us = 0
        """Before sleeping on the call eventfds, poll the used rings this many microseconds with
        interrupts off (the back-end then skips its eventfd write, and we the wake-up)."""
        self._next_token = 1
        self._closed = False
        self._poll = select.poll()
        self._polled_sock: int | None = None

        self._allocate(num_queues, queue_size, packed, mem_size, gpa_base)

    def _allocate(
        self, num_queues: int, queue_size: int, packed: bool, mem_size: int, gpa_base: int
    ) -> None:
        """The session's guest memory (rings first, then the buffer heap) and eventfds."""
        ring_bytes = num_queues * self._ring_span(queue_size, packed)
        if ring_bytes + _ALLOC_ALIGN > mem_size:
            raise ValueError(
                f"mem_size {mem_size:#x} cannot hold {num_queues} rings of {queue_size} "
                f"({ring_bytes:#x} bytes) and any buffer"
            )
        self.mem = GuestMemory.anonymous(mem_size, gpa_base)
        self.gpa_base = gpa_base
        self.mem_size = mem_size
        self.heap = _Heap(gpa_base + ring_bytes, gpa_base + mem_size)
        self.queues: list[_Queue] = []
        try:
            base = gpa_base
            for i in range(num_queues):
                kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self.queues.append(_Queue(i, queue_size, base, kick, call))
                self._poll.register(call, select.POLLIN)
                base += self._ring_span(queue_size, packed)
        except BaseException:
            self._release()
            raise

    @staticmethod
    def _ring_span(size: int, packed: bool) -> int:
        total = packed_layout(size, 0).size_bytes if packed else split_layout(size, 0)[3]
        return -(-total // _RING_ALIGN) * _RING_ALIGN

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        num_queues: int = 1,
        queue_size: int = 128,
        features_mask: int = _ALL,
        mem_size: int = 16 << 20,
        packed: bool = False,
        reconnect: float = 0.0,
        indirect: bool = False,
        use_inflight: bool = True,
        protocol_mask: int = FRONTEND_PROTOCOL_FEATURES,
        connect_timeout: float = 10.0,
        reply_timeout: float = 10.0,
    ) -> Self:
        """Connect to the back-end at ``path`` and set everything up; rings ready to use.

        ``features_mask`` limits the virtio features acknowledged; ``packed`` asks for packed
        rings (an error if not offered); ``indirect`` makes multi-buffer chains use indirect
        tables when INDIRECT_DESC was negotiated; ``reconnect`` is how many seconds to keep
        trying when the back-end goes away (0: raise ConnectionClosedError at once).
        """
        session = cls(
            path,
            num_queues=num_queues,
            queue_size=queue_size,
            features_mask=features_mask,
            protocol_mask=protocol_mask,
            mem_size=mem_size,
            packed=packed,
            indirect=indirect,
            reconnect=reconnect,
            use_inflight=use_inflight,
            connect_timeout=connect_timeout,
            reply_timeout=reply_timeout,
        )
        try:
            session._start(Frontend.connect(path, connect_timeout, reply_timeout=reply_timeout))
        except BaseException:
            session.close()
            raise
        return session

    @classmethod
    def kernel(
        cls,
        device: VhostKernelDevice,
        *,
        num_queues: int = 1,
        queue_size: int = 128,
        features_mask: int = _ALL,
        mem_size: int = 16 << 20,
        indirect: bool = False,
    ) -> Self:
        """Drive a kernel vhost device: this process is the VMM and the guest driver.

        SET_OWNER, features, the memory table (this process's own mapping of the session's
        memory) and every ring, by the same requests a vhost-user session sends. The session
        owns ``device`` from then on and closes it. Device-specific set-up (a TAP for vhost-net,
        the CID for vhost-vsock) is the caller's, on ``device``, once the rings are started.
        """
        session = cls(
            device.path,
            num_queues=num_queues,
            queue_size=queue_size,
            features_mask=features_mask,
            mem_size=mem_size,
            indirect=indirect,
            use_inflight=False,
        )
        session._kernel = device
        try:
            device.set_owner()
            offered = device.get_features()
            session.offered_features = offered
            session.features = session._choose_features(offered)
            device.set_features(session.features)
            session._share_and_start(device, keep=False)
        except BaseException:
            session.close()
            raise
        log.info(
            "%s: kernel driver session up: features %#x, %d queue(s) of %d",
            device.path,
            session.features,
            num_queues,
            queue_size,
        )
        return session

    @property
    def control(self) -> VhostControl:
        """What the session sends its requests to: the vhost-user front-end or the device."""
        if self._kernel is not None:
            return self._kernel
        return self.frontend

    @property
    def kernel_device(self) -> VhostKernelDevice | None:
        """The kernel vhost device driven (None for a vhost-user session)."""
        return self._kernel

    def enable_dirty_log(self, log: DirtyLog, fd: int) -> None:
        """Start logging as a migration does: log base, LOG_ALL acked, rings re-addressed with
        their used-ring writes logged. ``fd`` is the log's memfd (sent to a user back-end)."""
        if not vf.has_bit(self.offered_features, vf.F_LOG_ALL):
            raise UnsupportedRequestError(
                f"{self.path}: the back-end does not offer VHOST_F_LOG_ALL (bit {vf.F_LOG_ALL})"
            )
        control = self.control
        control.set_dirty_log(log, fd)
        self.dirty_log = log
        self.features |= 1 << vf.F_LOG_ALL
        control.set_features(self.features)
        self.log_rings = True
        for q in self.queues:
            assert q.ring is not None
            q.ring = RingAddresses(q.ring.desc, q.ring.driver, q.ring.device, log=True)
            control.set_ring_addresses(q.index, q.ring)

    @property
    def frontend(self) -> Frontend:
        """The current front-end connection (replaced on reconnect)."""
        if self._frontend is None:
            raise ConnectionClosedError(f"{self.path}: the driver session is not connected")
        return self._frontend

    @property
    def packed(self) -> bool:
        return bool(self.features >> vf.F_RING_PACKED & 1)

    @property
    def event_idx(self) -> bool:
        return bool(self.features >> vf.F_RING_EVENT_IDX & 1)

    @property
    def indirect_negotiated(self) -> bool:
        return bool(self.features >> vf.F_RING_INDIRECT_DESC & 1)

    def has_feature(self, bit: int) -> bool:
        """Whether virtio feature ``bit`` was acknowledged."""
        return vf.has_bit(self.features, bit)

    # --- set-up -----------------------------------------------------------------------------

    def _choose_features(self, offered: int) -> int:
        if not offered >> vf.F_VERSION_1 & 1:
            raise UnsupportedRequestError(
                f"GET_FEATURES: back-end does not offer VIRTIO_F_VERSION_1 (bit {vf.F_VERSION_1}) "
                f"in {offered:#x}; legacy devices are not supported"
            )
        if self.want_packed and not offered >> vf.F_RING_PACKED & 1:
            raise UnsupportedRequestError(
                f"GET_FEATURES: packed rings asked for, but the back-end does not offer "
                f"VIRTIO_F_RING_PACKED (bit {vf.F_RING_PACKED}) in {offered:#x}"
            )
        chosen = offered & self.features_mask & ~_NOT_IMPLEMENTED
        chosen |= 1 << vf.F_VERSION_1
        if self.want_packed:
            chosen |= 1 << vf.F_RING_PACKED
        if offered >> vf.F_PROTOCOL_FEATURES & 1:
            chosen |= 1 << vf.F_PROTOCOL_FEATURES
        return chosen

    def _start(self, fe: Frontend, *, resume: bool = False) -> None:
        """The whole start-up on a fresh connection (first time, or after a reconnect)."""
        self._frontend = fe
        result = fe.negotiate(self.features_mask, self.protocol_mask)
        features = self._choose_features(result.offered_features)
        if resume and features != self.features:
            raise VhostError(
                f"{self.path}: the back-end came back with features {features:#x}, "
                f"the session runs with {self.features:#x}"
            )
        if result.queue_num is not None and result.queue_num < self.num_queues:
            raise UnsupportedRequestError(
                f"GET_QUEUE_NUM: back-end has {result.queue_num} queues, "
                f"{self.num_queues} were asked for"
            )
        self.offered_features = result.offered_features
        self.offered_protocol_features = result.offered_protocol_features
        self.protocol_features = result.protocol_features
        self.queue_num = result.queue_num
        fe.set_features(features)
        self.features = features

        inflight = (
            self.use_inflight and not self.packed and fe.has_protocol_feature(PF.INFLIGHT_SHMFD)
        )
        keep_rings = resume and inflight and self._inflight_fd is not None
        if inflight:
            if self._inflight_fd is None:
                info, fd = fe.get_inflight_fd(self.num_queues, self.queue_size)
                if fd is not None:
                    self._inflight, self._inflight_fd = info, fd
            if self._inflight is not None and self._inflight_fd is not None:
                fe.set_inflight_fd(self._inflight, self._inflight_fd)
        self.inflight_mode = inflight and self._inflight_fd is not None

        self._share_and_start(fe, keep=keep_rings)
        if fe.has_protocol_feature(PF.STATUS):
            fe.set_status(_STATUS_DRIVER_OK)
        sock = fe.conn.fileno()
        if self._polled_sock is not None:
            with contextlib.suppress(KeyError):
                self._poll.unregister(self._polled_sock)
        self._poll.register(sock, select.POLLIN | select.POLLRDHUP)
        self._polled_sock = sock
        log.info(
            "%s: driver session up: features %#x, protocol features %#x, %d queue(s) of %d%s",
            self.path,
            self.features,
            self.protocol_features,
            self.num_queues,
            self.queue_size,
            ", inflight tracking" if self.inflight_mode else "",
        )

    def _share_and_start(self, control: VhostControl, *, keep: bool) -> None:
        """Share the memory and start every ring: the same requests for kernel and user vhost."""
        control.set_memory(self.mem)
        for q in self.queues:
            base = self._prepare_ring(q, keep=keep)
            assert q.ring is not None
            start_ring(control, q.index, q.size, q.ring, base, q.kick_fd, q.call_fd)

    def _prepare_ring(self, q: _Queue, *, keep: bool) -> int:
        """(Re)create the driver side of ring ``q``; return its SET_VRING_BASE value."""
        if keep and isinstance(q.driver, SplitDriver):
            used_gpa = split_layout(q.size, q.base_gpa)[2]
            # QEMU's restore_last_avail_idx: resume from the used index found in the ring.
            return int.from_bytes(self.mem.read(used_gpa + 2, 2), "little")
        old = q.driver
        if old is not None:
            with contextlib.suppress(VirtqueueError):
                for head, written in old.get_used():
                    token = q.by_head.pop(head, None)
                    if token is not None:
                        self._retire(q, token)
                        q.done.append((token, written))
            q.by_head.clear()
            old.close()
            q.driver = None
        if self.packed:
            layout = packed_layout(q.size, q.base_gpa)
            q.driver = PackedDriver(
                self.mem,
                q.size,
                layout.desc_gpa,
                layout.driver_event_gpa,
                layout.device_event_gpa,
                event_idx=self.event_idx,
                queue_index=q.index,
            )
            q.ring = RingAddresses(
                layout.desc_gpa, layout.driver_event_gpa, layout.device_event_gpa, self.log_rings
            )
            base = encode_packed_base(0, True, 0, True)
        else:
            desc, avail, used, _ = split_layout(q.size, q.base_gpa)
            q.driver = SplitDriver(
                self.mem, q.size, desc, avail, used, event_idx=self.event_idx, queue_index=q.index
            )
            q.ring = RingAddresses(desc, avail, used, self.log_rings)
            base = 0
        if q.pending:
            for p in sorted(q.pending.values(), key=lambda p: p.token):
                head = q.driver.add(p.readable, p.writable, indirect_gpa=p.indirect_gpa)
                q.by_head[head] = p.token
                self.resubmitted += 1
            q.driver.publish()
        return base

    # --- reconnect --------------------------------------------------------------------------

    def _backend_gone(self, why: str) -> None:
        """The back-end went away: reconnect within the deadline, or raise."""
        fe, self._frontend = self._frontend, None
        if fe is not None:
            fe.close()
        if self._closed:
            raise ConnectionClosedError(f"{self.path}: session closed")
        if self.reconnect_timeout <= 0:
            raise ConnectionClosedError(f"{self.path}: back-end went away ({why})")
        lost = sum(len(q.pending) for q in self.queues)
        self.in_flight_at_loss += lost
        log.warning(
            "%s: back-end went away (%s) with %d chain(s) in flight; reconnecting",
            self.path,
            why,
            lost,
        )
        deadline = time.monotonic() + self.reconnect_timeout
        last: BaseException | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionClosedError(
                    f"{self.path}: back-end went away ({why}) and did not come back within "
                    f"{self.reconnect_timeout:g} s (last error: {last})"
                )
            try:
                fe = Frontend.connect(self.path, max(left, 0.05), reply_timeout=self.reply_timeout)
            except _LOST as exc:
                last = exc
                time.sleep(0.05)
                continue
            try:
                self._start(fe, resume=True)
            except _LOST as exc:
                log.info("%s: set-up after reconnecting failed (%s); retrying", self.path, exc)
                last = exc
                fe.close()
                self._frontend = None
                time.sleep(0.05)
                continue
            except BaseException:
                fe.close()
                self._frontend = None
                raise
            break
        self.reconnects += 1
        for q in self.queues:
            self._kick_now(q)
        log.warning("%s: reconnected (%d so far)", self.path, self.reconnects)

    def config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: ``size`` bytes of the device config space at ``offset``."""
        if self._kernel is not None:
            raise UnsupportedRequestError(
                f"{self.path}: a kernel vhost device has no config space (the VMM emulates it)"
            )
        try:
            return self.frontend.get_config(offset, size)
        except _LOST as exc:
            self._backend_gone(f"GET_CONFIG: {exc}")
            return self.frontend.get_config(offset, size)

    # --- memory -----------------------------------------------------------------------------

    def alloc(self, size: int) -> int:
        """Guest-physical address of ``size`` fresh bytes (64-byte aligned) of shared memory."""
        return self.heap.alloc(size)

    def free(self, gpa: int) -> None:
        """Give back a buffer from :meth:`alloc` (only once nothing in flight refers to it)."""
        self.heap.free(gpa)

    def view(self, gpa: int, n: int) -> memoryview:
        """A writable view of ``n`` bytes of guest memory at ``gpa``."""
        return self.mem.view(gpa, n)

    # --- data path --------------------------------------------------------------------------

    def submit(
        self,
        queue: int,
        readable: Buffers,
        writable: Buffers,
        *,
        indirect: bool | None = None,
    ) -> int:
        """Add a chain of ``(gpa, len)`` buffers to ``queue``; return its token.

        The chain becomes visible to the back-end at the next :meth:`kick`. Raises
        QueueFullError when the ring has no room (collect completions first).
        """
        q = self.queues[queue]
        driver = q.driver
        if driver is None:
            raise ConnectionClosedError(f"{self.path}: queue {queue} is not set up")
        n = len(readable) + len(writable)
        use = self.use_indirect if indirect is None else indirect
        indirect_gpa = None
        if use and n > 1:
            if not self.indirect_negotiated:
                raise UnsupportedRequestError(
                    f"queue {queue}: indirect descriptors asked for, but "
                    "VIRTIO_F_RING_INDIRECT_DESC was not negotiated"
                )
            need = 1
        else:
            need = n
        if driver.num_free < need:
            raise QueueFullError(
                f"chain of {n} buffers needs {need} descriptors, {driver.num_free} free",
                queue=queue,
            )
        if use and n > 1:
            indirect_gpa = self.heap.alloc(16 * n)
        head = driver.add(readable, writable, indirect_gpa=indirect_gpa)
        token = self._next_token
        self._next_token += 1
        q.by_head[head] = token
        q.pending[token] = _Pending(token, tuple(readable), tuple(writable), indirect_gpa)
        return token

    def free_descriptors(self, queue: int) -> int:
        """Descriptors of ``queue`` not in the back-end's hands."""
        driver = self.queues[queue].driver
        return 0 if driver is None else driver.num_free

    def in_flight(self, queue: int | None = None) -> int:
        """Chains submitted and not yet returned by :meth:`wait` (on ``queue`` or all)."""
        qs = self.queues if queue is None else [self.queues[queue]]
        return sum(len(q.pending) + len(q.done) for q in qs)

    def _kick_now(self, q: _Queue) -> None:
        if q.driver is None:
            return
        q.driver.publish()
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(q.kick_fd, 1)

    def kick(self, queue: int, *, force: bool = False) -> None:
        """Publish what was submitted on ``queue`` and notify the back-end if it wants it;
        ``force`` notifies regardless (after the device was stopped and started again, a kick
        it swallowed while stopped is not repeated by event suppression)."""
        q = self.queues[queue]
        driver = q.driver
        if driver is None:
            return
        driver.publish()
        if force or driver.should_kick():
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(q.kick_fd, 1)

    def _collect(self, q: _Queue) -> list[tuple[int, int]]:
        out = q.done
        q.done = []
        driver = q.driver
        if driver is None:
            return out
        for head, written in driver.get_used():
            token = q.by_head.pop(head)
            self._retire(q, token)
            out.append((token, written))
        return out

    def _retire(self, q: _Queue, token: int) -> None:
        """Chain ``token`` completed: forget it and free its indirect table."""
        p = q.pending.pop(token)
        if p.indirect_gpa is not None:
            self.heap.free(p.indirect_gpa)

    def poll(self, queue: int) -> list[tuple[int, int]]:
        """Completions on ``queue`` available now, without waiting."""
        return self._collect(self.queues[queue])

    def wait(self, queue: int, timeout: float | None = None) -> list[tuple[int, int]]:
        """Completions on ``queue``: at least one, or [] after ``timeout`` seconds."""
        return [(t, n) for _, t, n in self._wait([self.queues[queue]], timeout)]

    def wait_any(self, timeout: float | None = None) -> list[tuple[int, int, int]]:
        """Completions on any queue as ``(queue, token, written)``; [] after ``timeout``."""
        return self._wait(self.queues, timeout)

    def _spin(self, qs: list[_Queue]) -> list[tuple[int, int, int]]:
        """Poll the used rings of ``qs`` for :attr:`poll_us` with interrupts off."""
        for q in qs:
            if q.driver is not None:
                q.driver.disable_interrupts()
        end = time.monotonic_ns() + self.poll_us * 1000
        while time.monotonic_ns() < end:
            out = [(q.index, t, n) for q in qs for t, n in self._collect(q)]
            if out:
                return out
        return []

    def _wait(self, qs: list[_Queue], timeout: float | None) -> list[tuple[int, int, int]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            out = [(q.index, t, n) for q in qs for t, n in self._collect(q)]
            if out:
                return out
            if self.poll_us and (out := self._spin(qs)):
                return out
            for q in qs:
                if q.driver is not None and q.driver.enable_interrupts():
                    break
            else:
                if deadline is None:
                    wait_ms = 1000
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return []
                    wait_ms = max(1, min(1000, int(left * 1000)))
                for fd, _ in self._poll.poll(wait_ms):
                    if fd == self._polled_sock:
                        self._check_socket()
                    else:
                        self._drain_call(fd)

    def _drain_call(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            count = os.eventfd_read(fd)
            for q in self.queues:
                if q.call_fd == fd:
                    q.calls += count

    def notifications(self, queue: int) -> int:
        """How many times the back-end signalled ``queue``'s call eventfd so far."""
        q = self.queues[queue]
        self._drain_call(q.call_fd)
        return q.calls

    def _check_socket(self) -> None:
        """The control socket is readable outside a request: EOF / reset means the back-end died."""
        fe = self._frontend
        if fe is None:
            return
        sock = fe.conn.socket
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self._backend_gone(f"control socket: {errno.errorcode.get(exc.errno or 0, exc)}")
            return
        if not data:
            self._backend_gone("EOF on the control socket")
            return
        raise ProtocolError(
            "the back-end sent a message on the front-end socket without being asked"
        )

    def check_backend(self) -> None:
        """Notice a back-end that went away while nothing was waited for (and reconnect)."""
        for fd, _ in self._poll.poll(0):
            if fd == self._polled_sock:
                self._check_socket()

    # --- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the rings (GET_VRING_BASE), hang up and release memory and fds."""
        if self._closed:
            return
        self._closed = True
        device, self._kernel = self._kernel, None
        if device is not None:
            with contextlib.suppress(VhostError, OSError):
                for q in self.queues:
                    if q.driver is not None:
                        device.get_vring_base(q.index)
            device.close()
        fe, self._frontend = self._frontend, None
        if fe is not None:
            with contextlib.suppress(VhostError, OSError, TimeoutError):
                for q in self.queues:
                    if q.driver is not None:
                        fe.get_vring_base(q.index)
            fe.close()
        self._release()

    def _release(self) -> None:
        for q in self.queues:
            if q.driver is not None:
                q.driver.close()
                q.driver = None
            for fd in (q.kick_fd, q.call_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.queues = []
        if self._inflight_fd is not None:
            os.close(self._inflight_fd)
            self._inflight_fd = None
        self.mem.close()
