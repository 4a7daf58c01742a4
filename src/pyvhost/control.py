"""One control interface for kernel and user vhost: what a VMM asks of any vhost back-end.

:class:`VhostControl` is implemented by the vhost-user :class:`~pyvhost.user.frontend.Frontend`
and by every kernel device (:class:`~pyvhost.kernel.device.VhostKernelDevice`), as rust-vmm's
``VhostBackend`` trait is. The caller speaks guest-physical addresses and hands over its
:class:`~pyvhost.virtio.memory.GuestMemory`; each implementation names the regions its own way
(fd and offset plus a label address for vhost-user, this process's own mapping address for the
kernel) and translates ring addresses accordingly. :func:`start_ring` is the usual sequence.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pyvhost.errors import GuestMemoryError
from pyvhost.virtio.memory import DirtyLog, GuestMemory, Region
from pyvhost.virtio.ring import RingAddresses

__all__ = ["RingAddresses", "VhostControl", "region_for", "start_ring"]


@runtime_checkable
class VhostControl(Protocol):
    """The requests every vhost back-end answers, kernel or user, in the same words."""

    def set_owner(self) -> None:
        """Bind the back-end to this front-end (the first request of a session)."""

    def reset_owner(self) -> None:
        """Give the back-end up: rings, memory table and owner are dropped."""

    def get_features(self) -> int:
        """The virtio feature bits (and vhost bits such as LOG_ALL) the back-end offers."""

    def set_features(self, features: int) -> None:
        """Acknowledge ``features`` (a subset of what was offered)."""

    def set_memory(self, memory: GuestMemory) -> None:
        """Share ``memory``'s regions; keep it mapped and unchanged while the back-end runs."""

    def set_dirty_log(self, log: DirtyLog, fd: int) -> None:
        """Log writes into guest memory in ``log`` (``fd`` is its memfd, for a user back-end)."""

    def set_log_fd(self, fd: int) -> None:
        """An eventfd the back-end signals after writing the log."""

    def set_vring_num(self, index: int, num: int) -> None:
        """Ring ``index`` has ``num`` entries."""

    def set_vring_base(self, index: int, base: int) -> None:
        """Where ring ``index`` resumes (avail index, or packed indices and wrap bits)."""

    def get_vring_base(self, index: int) -> int:
        """Stop ring ``index`` and return where it would resume."""

    def set_ring_addresses(self, index: int, ring: RingAddresses) -> None:
        """Ring ``index``'s areas, by guest-physical address in the memory given last."""

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """The eventfd the driver signals for ring ``index``."""

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """The eventfd the back-end signals when it used buffers of ring ``index``."""

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """The eventfd the back-end signals on an error in ring ``index``."""

    def enable_ring(self, index: int) -> None:
        """Let ring ``index`` run where the back-end waits to be told (vhost-user with protocol
        features, vDPA); nothing for kernel devices whose rings run once kicked."""

    def close(self) -> None:
        """Hang up; the back-end stops every ring."""


def start_ring(  # noqa: PLR0917 (the order of the requests)
    control: VhostControl,
    index: int,
    num: int,
    ring: RingAddresses,
    base: int,
    kick_fd: int | None,
    call_fd: int | None,
) -> None:
    """Start ring ``index``: size, base, addresses, the call and kick eventfds, enable.

    CALL goes before KICK: a kernel device starts polling at the kick, and its first used
    buffers must find the call eventfd in place.
    """
    control.set_vring_num(index, num)
    control.set_vring_base(index, base)
    control.set_ring_addresses(index, ring)
    control.set_vring_call(index, call_fd)
    control.set_vring_kick(index, kick_fd)
    control.enable_ring(index)


def region_for(memory: GuestMemory | None, gpa: int, what: str) -> tuple[Region, int]:
    """The region holding guest-physical ``gpa`` and the offset of ``gpa`` in it."""
    if memory is None:
        raise GuestMemoryError(f"{what} at gpa {gpa:#x}: no memory shared yet (set_memory first)")
    for region in memory.regions:
        if region.guest_phys_addr <= gpa < region.gpa_end:
            return region, gpa - region.guest_phys_addr
    raise GuestMemoryError(
        f"{what} at gpa {gpa:#x} is outside the shared memory", address=gpa, length=1
    )
