"""The memory requests: memory table, ADD/REM_MEM_REG, the dirty log and postcopy."""

from __future__ import annotations

import os

from pyvhost.errors import (
    GuestMemoryError,
    ProtocolError,
)
from pyvhost.user.backend.base import FatalProtocolError, Reply, log
from pyvhost.user.backend.vrings import VringRequests
from pyvhost.user.messages import (
    F_LOG_ALL,
    U64,
    Empty,
    Log,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    Message,
    Request,
    close_fds,
    encode_reply,
)
from pyvhost.user.postcopy import Userfaultfd
from pyvhost.virtio.features import has_bit
from pyvhost.virtio.memory import DirtyLog, Region, RegionSpec, view_address

POSTCOPY_ACK_TIMEOUT = 30.0
"""How long SET_MEM_TABLE in postcopy mode waits for the front-end's acknowledgement."""


class MemoryRequests(VringRequests):
    """Guest memory and its dirty log; rings using a region are paused while it changes."""

    def _apply_log(self) -> None:
        """Attach the dirty log to guest memory while LOG_ALL is acked; detach and drop it after.
        The device hears of each change (a kernel data path hands the log on)."""
        if has_bit(self.features, F_LOG_ALL):
            if self._dirty_log is not None and self.mem.log is not self._dirty_log:
                self.mem.set_log(self._dirty_log)
                self.device.dirty_log_changed(self._dirty_log)
        elif self.mem.log is not None:
            self.mem.set_log(None)
            self._dirty_log = None
            self.device.dirty_log_changed(None)

    def _replace_log_fd(self, fd: int | None) -> None:
        old, self._log_fd = self._log_fd, fd
        if old is not None:
            os.close(old)

    def _set_mem_table(self, msg: Message) -> Reply | None:
        table = msg.payload_as(MemoryTable)
        specs = [
            RegionSpec(fd, r.mmap_offset, r.memory_size, r.guest_phys_addr, r.userspace_addr)
            for r, fd in zip(table.regions, msg.fds, strict=True)
        ]
        if self.postcopy_listening:
            # The old regions are about to be unmapped: unregister them while they still are.
            self._uffd(msg).unregister_all()
        with self._rings_paused():
            self.mem.replace(specs)
            self.repeated_regions.clear()
            close_fds(msg.fds)
            self.device.memory_changed(self.mem)
        log.info("%s: memory table set: %d regions", self.name, len(self.mem))
        if self.postcopy_listening:
            self._postcopy_mem_table(msg)
        return None

    def _postcopy_mem_table(self, msg: Message) -> None:
        """Register the new regions, tell the front-end our bases, wait for its go-ahead."""
        uffd = self._uffd(msg)
        regions = []
        for region in self.mem.regions:
            base = view_address(region.view)
            uffd.register(base, region.size)
            regions.append(
                MemoryRegion(region.guest_phys_addr, region.size, base, region.mmap_offset)
            )
        self._send(encode_reply(Request.SET_MEM_TABLE, MemoryTable(tuple(regions))))
        ack = self.conn.recv_frame(POSTCOPY_ACK_TIMEOUT)
        close_fds(ack.fds)
        if ack.header.request != Request.SET_MEM_TABLE or ack.payload != bytes(8):
            raise FatalProtocolError(
                "postcopy: expected the front-end's SET_MEM_TABLE acknowledgement (u64 0)",
                request=msg.name,
            )

    def _add_mem_reg(self, msg: Message) -> Reply | None:
        region = msg.payload_as(MemRegMsg).region
        key = _key(region)
        if not self.postcopy_listening and any(_same(r, key) for r in self.mem.regions):
            close_fds(msg.fds)
            self.repeated_regions[key] = self.repeated_regions.get(key, 0) + 1
            log.info("%s: memory region added again, kept once: %s", self.name, region.describe())
            return None
        if len(self.mem) >= self.max_mem_slots:
            raise ProtocolError(
                f"all {self.max_mem_slots} memory slots are in use", request=msg.name
            )
        fd = self._take_fd(msg)
        try:
            with self._rings_paused():
                added = self.mem.add_region(
                    fd,
                    region.mmap_offset,
                    region.memory_size,
                    region.guest_phys_addr,
                    region.userspace_addr,
                )
                self.device.memory_changed(self.mem)
        finally:
            os.close(fd)
        log.info("%s: memory region added: %s", self.name, region.describe())
        if self.postcopy_listening:
            base = view_address(added.view)
            self._uffd(msg).register(base, added.size)
            reply = MemoryRegion(added.guest_phys_addr, added.size, base, added.mmap_offset)
            return Reply(MemRegMsg(reply))
        return None

    def _rem_mem_reg(self, msg: Message) -> None:
        region = msg.payload_as(MemRegMsg).region
        close_fds(msg.fds)  # the spec allows one fd here, to be closed unused
        key = _key(region)
        repeats = self.repeated_regions.pop(key, 0)
        if repeats:
            if repeats > 1:
                self.repeated_regions[key] = repeats - 1
            log.info(
                "%s: memory region removed once of %d: %s",
                self.name,
                repeats + 1,
                region.describe(),
            )
            return
        self._find_region(region)
        if self.postcopy_listening:
            for mapped in self.mem.regions:
                if mapped.guest_phys_addr == region.guest_phys_addr:
                    self._uffd(msg).unregister(view_address(mapped.view), mapped.size)
        with self._rings_paused(removing=True):
            self.mem.remove_region(
                region.guest_phys_addr, region.memory_size, region.userspace_addr
            )
            self.device.memory_changed(self.mem)
        log.info("%s: memory region removed: %s", self.name, region.describe())

    def _find_region(self, region: MemoryRegion) -> None:
        """Refuse (nothing changes) a REM_MEM_REG that names no mapped region, before any ring
        is paused: the two memory tables must never silently diverge."""
        key = _key(region)
        if not any(_same(r, key) for r in self.mem.regions):
            raise GuestMemoryError(
                f"no memory region with gpa {region.guest_phys_addr:#x} size "
                f"{region.memory_size:#x} userspace_addr {region.userspace_addr:#x} to remove "
                f"({len(self.mem)} regions mapped)",
                address=region.guest_phys_addr,
                length=region.memory_size,
            )

    def _set_log_base(self, msg: Message) -> Reply:
        area = msg.payload_as(Log)
        fd = self._take_fd(msg)
        try:
            new_log = DirtyLog(fd, area.size, area.offset, keep_fd=self.mem.keep_fds)
        finally:
            os.close(fd)
        old, self._dirty_log = self._dirty_log, new_log
        if old is not None and self.mem.log is not old:
            old.close()
        self._apply_log()
        log.info("%s: dirty log set: %d bytes", self.name, area.size)
        return Reply(U64(0))

    def _set_log_fd(self, msg: Message) -> None:
        """Keep the eventfd the front-end may be told through that the log changed."""
        self._replace_log_fd(self._take_fd(msg))

    def _uffd(self, msg: Message) -> Userfaultfd:
        if self.uffd is None:
            raise ProtocolError("POSTCOPY_ADVISE first: no userfaultfd", request=msg.name)
        return self.uffd

    def _postcopy_advise(self, msg: Message) -> Reply:
        if self.uffd is None:
            self.uffd = Userfaultfd.open()
        assert self.uffd.fd is not None
        log.info("%s: postcopy advised: userfaultfd opened", self.name)
        return Reply(Empty(), (self.uffd.fd,))

    def _postcopy_listen(self, msg: Message) -> None:
        uffd = self._uffd(msg)
        for region in self.mem.regions:
            uffd.register(view_address(region.view), region.size)
        self.postcopy_listening = True
        log.info("%s: postcopy listening: %d regions registered", self.name, len(self.mem))

    def _postcopy_end(self, msg: Message) -> Reply:
        uffd = self._uffd(msg)
        self.uffd = None
        self.postcopy_listening = False
        try:
            uffd.unregister_all()
        finally:
            uffd.close()
        log.info("%s: postcopy ended", self.name)
        return Reply(U64(0))


def _key(region: MemoryRegion) -> tuple[int, int, int]:
    return region.guest_phys_addr, region.memory_size, region.userspace_addr


def _same(mapped: Region, key: tuple[int, int, int]) -> bool:
    return (mapped.guest_phys_addr, mapped.size, mapped.userspace_addr) == key
