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
Python statements is not a concern: each access happens in a separate C call reached through the
interpreter's dispatch loop, and the compiler cannot move accesses to escaped memory across such
opaque calls.

x86-64 (TSO): loads are not reordered with other loads and stores not with other stores, so the
read and write barriers are free (:data:`RW_BARRIERS_NEEDED` is False and the ring code skips
them). Only store-then-load can be reordered (the store buffer), which needs a locked instruction
or ``mfence``. CPython exposes neither directly; we use an uncontended ``threading.Lock``
acquire+release. On Linux CPython 3.11 builds locks on POSIX semaphores and glibc implements
``sem_trywait`` / ``sem_post`` with ``lock cmpxchg`` / ``lock xadd`` (the mutex+condvar
fallback would use ``lock cmpxchg`` too); every locked instruction is a full barrier on x86.
Cost: about 0.3 us here, paid once per batch or per notification decision, never per chain.
(Rejected: relying on the GIL, whose hand-off is not guaranteed to happen between our store and
load; libatomic's fence through ``ctypes``, correct but about five times slower than the lock.)

aarch64 and other weakly ordered CPUs: loads may pass loads and stores may pass stores, and
CPython offers no fence. A lock round trip only gives acquire/release ordering on the lock word
(glibc's semaphore CAS is acquire, its post is release), which does not order our unrelated ring
accesses against each other. So there we call ``atomic_thread_fence(memory_order_seq_cst)`` from
libatomic (GCC's runtime library; ``libatomic1`` on Debian) through ``ctypes``:
that is ``dmb ish`` on aarch64, a real full barrier, used for all three barriers. It costs a
ctypes call (about 1 us), paid per batch, or per push with the single-chain API. This path is
untested on real aarch64 hardware in this project. (Rejected: ``membarrier(2)``, whose
PRIVATE_EXPEDITED command returns early without any barrier when the process has one thread.)
If libatomic cannot be loaded we fall back to the lock and log a warning once: ring processing is
then *not* guaranteed correct on that machine.
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
_SEQ_CST = 5  # __ATOMIC_SEQ_CST

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


def _libatomic_fence() -> Callable[[], None] | None:
    """libatomic's ``atomic_thread_fence(seq_cst)`` as a callable, or None if unavailable."""
    name = ctypes.util.find_library("atomic")
    if name is None:
        return None
    try:
        fence_fn = ctypes.CDLL(name).atomic_thread_fence
    except (OSError, AttributeError):
        return None
    fence_fn.argtypes = [ctypes.c_int]
    fence_fn.restype = None

    def fence() -> None:
        fence_fn(_SEQ_CST)

    return fence


def _noop() -> None:
    """Read/write barrier on TSO machines: the hardware already orders these."""


if RW_BARRIERS_NEEDED:
    _weak_fence = _libatomic_fence()
    if _weak_fence is None:
        log.warning(
            "%s: libatomic not found; virtqueue memory ordering is not guaranteed on this CPU",
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
