"""Memory barriers for rings shared with another CPU, from CPython.

A virtqueue needs three orderings (virtio spec, "Supplying Buffers" / "Notification
Suppression"; Linux's ``virtio_rmb`` / ``virtio_wmb`` / ``virtio_mb``):

* read barrier: load avail.idx (or used.idx), *then* load the ring entries and descriptors;
* write barrier: store the used (or avail) ring entries, *then* store the index that publishes them;
* full barrier: store the index (or the event field / flags) *then* load the other side's event
  field / flags (the store-load case, which no ordinary instruction orders).

How each is obtained here:

Single stores and loads of ring indices go through native ``memoryview.cast("H")`` items, which
CPython implements as a 2-byte ``memcpy`` the C compiler turns into one 16-bit load or store:
no tearing on aligned fields (the rings are checked for alignment). ``struct`` with ``"<"`` would
pack byte by byte and could tear, so it is never used for an index. Compiler reordering across
Python statements is not a concern: each access is a separate call made from the interpreter's
dispatch loop, which the C compiler cannot move memory accesses across.

x86-64 (TSO): loads are not reordered with other loads and stores not with other stores, so the
read and write barriers are free (:data:`RW_BARRIERS_NEEDED` is False and the ring code skips
them). Only store-then-load can be reordered (the store buffer), which needs a locked instruction
or ``mfence``. CPython exposes neither directly; we use an uncontended ``threading.Lock``
acquire+release. On Linux CPython 3.11 builds locks on POSIX semaphores and glibc implements
``sem_trywait`` / ``sem_post`` with ``lock cmpxchg`` / ``lock xadd`` (the mutex+condvar
fallback would use ``lock cmpxchg`` too); every locked instruction is a full barrier on x86.
Cost: about 0.3 us here, paid once per batch or per notification decision, never per chain.
(Rejected: relying on the GIL, whose hand-off is not guaranteed to happen between our store and
load; ``ctypes`` tricks, which cost more than the lock.)

aarch64 and other weakly ordered CPUs: loads may pass loads and stores may pass stores, and
CPython offers no fence. A lock round trip only gives acquire/release ordering on the lock word,
which does not order our unrelated ring accesses. So there we issue
``membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`` through ``ctypes``: the kernel executes
``smp_mb()`` on entry and exit of that call (kernel/sched/membarrier.c), which is a real full
barrier for the calling thread. We use it for all three barriers. It costs a system call plus
IPIs to this process's other running threads (microseconds), and it is untested on real aarch64
hardware in this project. If it is unavailable (old kernel, seccomp) we fall back to the lock and
log a warning once: ring processing is then *not* guaranteed correct on that machine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import threading
from collections.abc import Callable

__all__ = ["RW_BARRIERS_NEEDED", "full_barrier", "read_barrier", "write_barrier"]

log = logging.getLogger(__name__)

_TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i486", "i586", "i686", "x86"})
_MEMBARRIER_NR = {"aarch64": 283, "arm64": 283, "riscv64": 283, "ppc64le": 365, "s390x": 356}
_MEMBARRIER_CMD_PRIVATE_EXPEDITED = 1 << 3
_MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED = 1 << 4

_machine = platform.machine().lower()

RW_BARRIERS_NEEDED: bool = _machine not in _TSO_MACHINES
"""False on x86 (TSO): read and write barriers are no-ops and the ring code skips them."""

_fence_lock = threading.Lock()
_acquire = _fence_lock.acquire
_release = _fence_lock.release


def _lock_fence() -> None:
    """Full barrier on x86: one uncontended lock round trip (locked instructions in glibc)."""
    _acquire()
    _release()


def _membarrier_fence() -> Callable[[], None] | None:
    """A membarrier(2)-based full barrier for weakly ordered CPUs, or None if not available."""
    nr = _MEMBARRIER_NR.get(_machine)
    libc_name = ctypes.util.find_library("c")
    if nr is None or libc_name is None:
        return None
    try:
        syscall = ctypes.CDLL(libc_name, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    if syscall(nr, _MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0) != 0:
        return None

    def fence() -> None:
        syscall(nr, _MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0)

    return fence


def _noop() -> None:
    """Read/write barrier on TSO machines: the hardware already orders these."""


if RW_BARRIERS_NEEDED:
    _weak_fence = _membarrier_fence()
    if _weak_fence is None:
        log.warning(
            "%s: no membarrier(2); virtqueue memory ordering is not guaranteed on this CPU",
            _machine,
        )
        _weak_fence = _lock_fence
    full_barrier: Callable[[], None] = _weak_fence
    read_barrier: Callable[[], None] = _weak_fence
    write_barrier: Callable[[], None] = _weak_fence
else:
    full_barrier = _lock_fence
    read_barrier = _noop
    write_barrier = _noop
