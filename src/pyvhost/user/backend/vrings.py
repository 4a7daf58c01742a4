"""The vring requests: ring records, start and stop, SET_VRING_* / GET_VRING_BASE, inflight
areas."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pyvhost.errors import (
    ProtocolError,
    VhostError,
)
from pyvhost.user.backend.base import HandlerCore, Reply, Vring, log, power_of_two
from pyvhost.user.messages import (
    U64,
    VRING_F_LOG,
    VRING_INDEX_MASK,
    VRING_NOFD,
    Inflight,
    Message,
    VringAddr,
    VringState,
)
from pyvhost.virtio import features as vf
from pyvhost.virtio.features import has_bit
from pyvhost.virtio.inflight import InflightRegion
from pyvhost.virtio.packed import PackedQueue, decode_packed_base
from pyvhost.virtio.split import SplitQueue

if TYPE_CHECKING:
    from pyvhost.virtio.queue import DeviceQueue


class VringRequests(HandlerCore):
    """Ring state and the requests that change it; a ring starts when it has all it needs."""

    def _ring_gpa(self, what: str, vring: Vring, address: int, length: int) -> int:
        """Translate a ring address (a front-end user address) to a gpa."""
        try:
            return self.mem.uva_to_gpa(address, length)
        except VhostError as exc:
            raise ProtocolError(f"vring {vring.index}: {what}: {exc}") from exc

    def _build_queue(self, vring: Vring) -> DeviceQueue:
        addr = vring.addr
        assert addr is not None
        num, i = vring.num, vring.index
        event_idx = has_bit(self.features, vf.F_RING_EVENT_IDX)
        indirect = has_bit(self.features, vf.F_RING_INDIRECT_DESC)
        log_used = bool(addr.flags & VRING_F_LOG)
        region = self.inflight if self.inflight and i < self.inflight.num_queues else None
        if self.packed:
            base = 0x8000_8000 if vring.base is None else vring.base
            avail, avail_wrap, used, used_wrap = decode_packed_base(base)
            if base >> 16 == 0:
                # DPDK's and SPDK's virtio-user send only the avail side (idx | wrap << 15) and
                # expect the used side to follow it, as DPDK's own back-end does.
                used, used_wrap = avail, avail_wrap
            if avail >= num or used >= num:
                raise ProtocolError(
                    f"vring {i}: packed base {base:#x} has an index beyond the ring size {num}"
                )
            tracker = region.packed_queue(i) if region is not None else None
            desc, driver, device = self._ring_areas(
                vring,
                ("descriptor ring", addr.desc_user_addr, 16 * num),
                ("driver area", addr.avail_user_addr, 4),
                ("device area", addr.used_user_addr, 4),
            )
            return PackedQueue(
                self.mem,
                num,
                desc,
                driver,
                device,
                event_idx=event_idx,
                indirect=indirect,
                last_avail_idx=avail,
                avail_wrap=avail_wrap,
                used_idx=used,
                used_wrap=used_wrap,
                queue_index=i,
                log_used=log_used,
                inflight=tracker,
            )
        split_tracker = region.split_queue(i) if region is not None else None
        desc, avail, used = self._ring_areas(
            vring,
            ("descriptor table", addr.desc_user_addr, 16 * num),
            ("available ring", addr.avail_user_addr, 6 + 2 * num),
            ("used ring", addr.used_user_addr, 6 + 8 * num),
        )
        return SplitQueue(
            self.mem,
            num,
            desc,
            avail,
            used,
            event_idx=event_idx,
            indirect=indirect,
            last_avail_idx=(vring.base or 0) & 0xFFFF,
            queue_index=i,
            log_used=log_used,
            used_log_gpa=addr.log_guest_addr,
            inflight=split_tracker,
        )

    def _ring_areas(self, vring: Vring, *parts: tuple[str, int, int]) -> tuple[int, ...]:
        """Translate the ring parts ``(what, uva, length)`` to gpas."""
        return tuple(self._ring_gpa(what, vring, uva, n) for what, uva, n in parts)

    def _maybe_start(self, vring: Vring) -> None:
        """Start the ring once it has a kick, a size, addresses and memory to translate them."""
        if vring.started or not vring.kick_set:
            return
        if vring.num == 0 or vring.addr is None or len(self.mem) == 0:
            log.info(
                "%s: vring %d: kick set before size, addresses and memory; starts when complete",
                self.name,
                vring.index,
            )
            return
        queue = self._build_queue(vring)
        vring.queue = queue
        log.info("%s: vring %d started (size %d)", self.name, vring.index, vring.num)
        self.device.queue_started(vring.index, queue, vring.notifier)

    def _stop(self, vring: Vring) -> None:
        """Stop a started ring: the device lets go, we keep its index for a restart."""
        queue = vring.queue
        if queue is None:
            return
        vring.queue = None
        reported = None
        try:
            reported = self.device.queue_stopped(vring.index)
        finally:
            vring.base = queue.get_base() if reported is None else reported
            log.info("%s: vring %d stopped at base %#x", self.name, vring.index, vring.base)

    @contextlib.contextmanager
    def _rings_paused(self, *, removing: bool = False) -> Iterator[None]:
        """Stop the running rings around a memory change, then rebuild them on the new table.

        The change is committed once the body returns; a ring that no longer fits the new table
        stays stopped and does not stop the others. After SET_MEM_TABLE or ADD_MEM_REG that is
        an error (logged, its error notifier signalled). After REM_MEM_REG (``removing``) it is
        what QEMU does while running (virtio-mem, region merges): the ring waits, keeping its
        position, and restarts when a later ADD_MEM_REG brings its memory back, as
        libvhost-user remaps rings on demand.
        """
        running = [v for v in self.vrings if v.started]
        waiting = [v for v in self.vrings if v.kick_set and not v.started]
        for vring in running:
            self._stop(vring)
        try:
            yield
        finally:
            for vring in running:
                self._restart(vring, removing=removing)
            for vring in waiting:
                try:
                    self._maybe_start(vring)
                except (VhostError, ValueError) as exc:
                    if removing:
                        continue
                    log.error("%s: vring %d cannot start: %s", self.name, vring.index, exc)
                    with contextlib.suppress(VhostError, OSError):
                        vring.notifier.error()

    def _restart(self, vring: Vring, *, removing: bool = False) -> None:
        try:
            self._maybe_start(vring)
            if vring.started:
                return
            reason = "no memory is mapped"
        except (VhostError, ValueError) as exc:
            reason = str(exc)
        if removing:
            log.info(
                "%s: vring %d paused at base %#x until its memory is added back: %s",
                self.name,
                vring.index,
                vring.base or 0,
                reason,
            )
            return
        log.error(
            "%s: vring %d stopped: it cannot restart on the new memory table: %s",
            self.name,
            vring.index,
            reason,
        )
        with contextlib.suppress(VhostError, OSError):
            vring.notifier.error()

    def _enable(self, vring: Vring, enabled: bool) -> None:
        if vring.enabled != enabled:
            vring.enabled = enabled
            self.device.queue_enabled(vring.index, enabled)

    def _set_vring_num(self, msg: Message) -> None:
        state = msg.payload_as(VringState)
        vring = self._vring(msg.name, state.index)
        limit = self.device.max_queue_size
        if self.packed and not 1 <= state.num <= limit:
            raise ProtocolError(
                f"vring {state.index}: size {state.num} is not in 1..{limit}",
                request=msg.name,
                field="num",
            )
        if not self.packed and (not power_of_two(state.num) or state.num > limit):
            raise ProtocolError(
                f"vring {state.index}: size {state.num} is not a power of 2 in 1..{limit} "
                "(only packed rings may have other sizes)",
                request=msg.name,
                field="num",
            )
        if vring.started:
            raise ProtocolError(f"vring {state.index} is started", request=msg.name)
        vring.num = state.num
        self._maybe_start(vring)

    def _set_vring_addr(self, msg: Message) -> None:
        addr = msg.payload_as(VringAddr)
        vring = self._vring(msg.name, addr.index)
        self._stop(vring)
        vring.addr = addr
        self._maybe_start(vring)

    def _set_vring_base(self, msg: Message) -> None:
        state = msg.payload_as(VringState)
        vring = self._vring(msg.name, state.index)
        if vring.started:
            raise ProtocolError(f"vring {state.index} is started", request=msg.name)
        if not self.packed and state.num > 0xFFFF:
            raise ProtocolError(
                f"vring {state.index}: base {state.num:#x} has reserved bits 16..31 set",
                request=msg.name,
                field="num",
            )
        vring.base = state.num

    def _get_vring_base(self, msg: Message) -> Reply:
        state = msg.payload_as(VringState)
        vring = self._vring(msg.name, state.index)
        self._stop(vring)
        vring.notifier.set_kick_fd(None)
        vring.kick_set = False
        if vring.base is None:
            vring.base = 0x8000_8000 if self.packed else 0
        return Reply(VringState(state.index, vring.base))

    def _vring_fd(self, msg: Message) -> tuple[Vring, int | None]:
        value = msg.payload_as(U64).value
        vring = self._vring(msg.name, value & VRING_INDEX_MASK)
        fd = None if value & VRING_NOFD else self._take_fd(msg)
        return vring, fd

    def _set_vring_kick(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        self._stop(vring)
        vring.notifier.set_kick_fd(fd, polling=fd is None)
        vring.kick_set = True
        self._maybe_start(vring)

    def _set_vring_call(self, msg: Message) -> None:
        """Install the call fd and signal it once, as libvhost-user does: completions a crashed
        predecessor published without a notification are otherwise never noticed (a spurious
        call costs the driver one look at its used ring)."""
        vring, fd = self._vring_fd(msg)
        vring.notifier.set_call_fd(fd)
        if vring.started:
            self.device.queue_notifier_changed(vring.index, vring.notifier)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)

    def _set_vring_err(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        vring.notifier.set_err_fd(fd)
        if vring.started:
            self.device.queue_notifier_changed(vring.index, vring.notifier)

    def _set_vring_enable(self, msg: Message) -> None:
        state = msg.payload_as(VringState)
        self._enable(self._vring(msg.name, state.index), bool(state.num))

    def _vring_kick(self, msg: Message) -> None:
        """In-band kick: start the ring if needed (with an eventfd of our own), then signal it."""
        state = msg.payload_as(VringState)
        vring = self._vring(msg.name, state.index)
        if not vring.kick_set:
            vring.notifier.set_kick_fd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            vring.kick_set = True
            self._maybe_start(vring)
        if not vring.started:
            raise ProtocolError(
                f"vring {state.index} cannot start: size, addresses or memory missing",
                request=msg.name,
            )
        vring.notifier.kick()

    def _get_inflight_fd(self, msg: Message) -> Reply:
        want = msg.payload_as(Inflight)
        region, fd, size = InflightRegion.create(want.num_queues, want.queue_size, self.packed)
        self._replace_inflight(region)
        return Reply(Inflight(size, 0, want.num_queues, want.queue_size), (fd,))

    def _set_inflight_fd(self, msg: Message) -> None:
        info = msg.payload_as(Inflight)
        region = InflightRegion.adopt(
            self._take_fd(msg),
            info.mmap_size,
            info.mmap_offset,
            info.num_queues,
            info.queue_size,
            self.packed,
        )
        self._replace_inflight(region)

    def _replace_inflight(self, region: InflightRegion) -> None:
        if any(v.started for v in self.vrings):
            region.close()
            raise ProtocolError("inflight region changed while rings are started")
        old, self.inflight = self.inflight, region
        try:
            self.device.inflight_changed(region)
        finally:
            if old is not None:
                old.close()
        log.info(
            "%s: inflight region: %d queues of %d", self.name, region.num_queues, region.queue_size
        )
