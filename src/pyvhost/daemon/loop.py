"""The event loop: kick eventfds in ``select.epoll``, queues spread over worker threads.

Each worker thread has its own epoll set and serves a fixed subset of the queues (the one the
caller names: the adapter asks the device's ``worker_for_queue``, ``i % workers`` by default), so a
queue is never handled by two threads and needs no lock of its own beyond the one that lets
``queue_stopped`` wait for the worker to let go. With ``workers=1`` (the default) one loop thread
serves every queue; the connection thread only speaks the protocol. The loop knows no device class:
it serves a :class:`QueueOwner` (the daemon's adapter).

A worker also serves watches: other fds (a device's TAP, a listening socket) whose callback runs on
that worker whenever the fd is readable. A callback that raises is logged and its watch removed.

On a kick the worker drains the eventfd and runs the standard race-free pattern::

    while True:
        queue.disable_notifications()          # no kicks while we are busy anyway
        device.handle_queue(index, queue, mem) # pops every available chain, pushes them back
        if queue.needs_notification():         # NO_INTERRUPT flag or used_event (EVENT_IDX)
            notifier.call()
        if not queue.enable_notifications():   # re-check: a chain added meanwhile is seen here
            break

A device that takes chains only when it has something to put in them (a net device's receive
queue waits for frames) returns True from ``handle_queue``: the loop then leaves the chains and
the kicks off instead of re-checking, which would spin, until the device calls
:meth:`EventLoop.schedule` for that queue.

Busy polling (``poll_us``, ``serve --poll-us``; off by default). At queue depth 1 every request
pays two wake-ups: the driver's kick (an eventfd write that wakes this worker out of epoll) and
our call. With ``poll_us > 0`` a worker that did work passes over its rings once with
notifications left *off* (the driver is told not to kick: NO_NOTIFY, or with EVENT_IDX an
avail_event it will not cross) and keeps looking at their avail indexes, and at its epoll set
without sleeping, until ``poll_us`` microseconds pass with nothing to do; then it turns
notifications back on, re-checks each ring (a chain added just before is served, not stranded)
and sleeps again. Kicks, epoll wake-ups and eventfd reads vanish while requests keep coming,
which is what the kernel's VHOST_SET_VRING_BUSYLOOP_TIMEOUT and SPDK's pollers buy too; the price
is a core kept busy for ``poll_us`` after each burst (``bench/bench_blk.py`` prints the gain and
the CPU per request side by side). It pays only where a core is spare: measured on the 2-vCPU
development machine, one queue at depth 1 went from 0.83x to 1.30x qemu-storage-daemon (io_uring),
but two queues driven by two driver processes lost 25-40 % (the polling worker took CPU the
drivers needed), hence off by default. A ring the device is waiting on (``handle_queue`` returned
True) or that is disabled is not polled.

A ring without a kick eventfd (SET_VRING_KICK with NOFD) is polled every millisecond. A queue whose
driver breaks the rules (``VirtqueueError``, ``GuestMemoryError``) or whose device code raises is
stopped: the error is logged with the queue index and reason, the error eventfd signalled, and the
other queues and the connection carry on.

The GIL and multi-queue throughput
----------------------------------
Python runs one thread's bytecode at a time. Ring work (popping chains, building memoryviews,
parsing request headers, pushing used elements) is bytecode, so it is serialized across workers
whatever their number: with a device that only computes, ``workers > 1`` adds thread switches and
buys nothing. Threads overlap only where the device releases the GIL, which the standard library
does around blocking system calls: ``os.preadv`` / ``os.pwritev`` / ``os.fsync`` into and out of
guest-memory views (the block device), ``os.getrandom``, socket I/O. The design therefore:

- keeps ring handling in the loop thread by default (no handoff per request, no lock per chain);
- batches (``pop_batch`` / ``push_batch``: one used-index store and one notification decision per
  batch) so the per-request bytecode stays small;
- lets a device whose time is spent in system calls spread queues over ``workers`` threads, so
  that one queue's I/O wait overlaps another queue's ring work.

Measured on the 2-core development machine (shared, so within about 20 %), a toy device on
2 queues driven from another process at queue depth 16 per queue:

==========================================  ===========  ===========
per request                                 workers=1    workers=2
==========================================  ===========  ===========
1 ms wait with the GIL released (disk I/O)  830 req/s    1 700 req/s
pure bytecode, about 2.5 ms                 395 req/s    240 req/s
pure bytecode, about 0.25 ms                1 900 req/s  2 840 req/s
==========================================  ===========  ===========

I/O-bound queues scale with workers; compute-bound ones lose to GIL hand-offs when the work per
request is long, and gain a little when it is short (the eventfd and epoll system calls of one
worker overlap the other's bytecode). Hence the default of one worker, and ``--workers N`` for
block devices on real disks.

Worker processes
----------------
``Daemon(..., workers=N, worker_mode="process")`` (``pyvhost serve blk --workers N
--worker-mode process``) puts the queues on N worker processes instead: see
:mod:`pyvhost.daemon.procloop`. Each worker is a fresh interpreter that maps guest memory from
the front-end's fds, owns its queues' eventfds, builds its own twin of the device and runs its
queues on an ordinary one-worker :class:`EventLoop`, this very code; the daemon keeps the
connection and asks the worker for every state change (a queue stopped answers with its base).
Ring work then runs on as many cores as there are workers, which threads cannot give; the cost
is a process start per worker and front-end and one message round trip per control request,
none per request. Figures: ``bench/README.md`` (``bench_blk.py --scaling``).

Profiling: ``PYVHOST_PROFILE=/tmp/prof pyvhost serve ...`` runs each worker thread under
cProfile and writes its stats when the daemon stops (SIGTERM); the connection thread is not
included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pyvhost.errors import GuestMemoryError, InflightError, VirtqueueError

if TYPE_CHECKING:
    from pyvhost.user.device import VringNotifier
    from pyvhost.virtio.chain import DescriptorChain
    from pyvhost.virtio.memory import GuestMemory
    from pyvhost.virtio.queue import DeviceQueue
    from pyvhost.virtio.ring import RingAddresses

__all__ = ["DRAIN_TIMEOUT", "EventLoop", "QueueOwner", "ResumedQueue"]

log = logging.getLogger("pyvhost.daemon")

POLL_INTERVAL_MS = 1
"""How often a ring without a kick eventfd is looked at."""

PROFILE_ENV = "PYVHOST_PROFILE"
"""Set to a path prefix to run each worker thread under cProfile (for ``bench/``): the stats go
to ``PREFIX.<worker name>.<pid>`` when the loop stops (``python -m pstats`` reads them)."""

_EPOLL_FLAGS = select.EPOLLIN

DRAIN_TIMEOUT = 10.0
"""How long stopping a queue (GET_VRING_BASE, a memory change) waits for chains the device
popped and has not pushed back: the spec wants the reply after in-flight requests are done."""


class QueueOwner(Protocol):
    """What the loop serves queues for (the daemon's adapter): it processes a queue with work."""

    @property
    def name(self) -> str:
        """For logs: the device's name."""
        ...

    def handle_queue(self, index: int, queue: DeviceQueue, mem: GuestMemory) -> bool | None:
        """Process the queue; True: the chains left are kept for later on purpose (see
        :func:`_service`)."""
        ...


class ResumedQueue:
    """A queue that hands out recovered chains first, then what the ring has (a DeviceQueue)."""

    def __init__(self, queue: DeviceQueue, chains: Sequence[DescriptorChain]) -> None:
        self.inner = queue
        self.pending = list(chains)

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def areas(self) -> RingAddresses:
        return self.inner.areas

    def pop(self) -> DescriptorChain | None:
        if self.pending:
            return self.pending.pop(0)
        return self.inner.pop()

    def pop_batch(self, max_n: int) -> list[DescriptorChain]:
        if self.pending:
            out, self.pending = self.pending[:max_n], self.pending[max_n:]
            return out
        return self.inner.pop_batch(max_n)

    def push(self, head: int, written: int) -> None:
        self.inner.push(head, written)

    def push_batch(self, items: Sequence[tuple[int, int]]) -> None:
        self.inner.push_batch(items)

    def needs_notification(self) -> bool:
        return self.inner.needs_notification()

    def enable_notifications(self) -> bool:
        return self.inner.enable_notifications() or bool(self.pending)

    def disable_notifications(self) -> None:
        self.inner.disable_notifications()

    def unpop(self, chains: Sequence[DescriptorChain]) -> bool:
        if self.pending:
            raise ValueError("unpop: recovered chains are still pending")
        return self.inner.unpop(chains)

    def get_base(self) -> int:
        return self.inner.get_base()

    def has_available(self) -> bool:
        return bool(self.pending) or self.inner.has_available()

    @property
    def in_flight(self) -> int:
        return self.inner.in_flight

    def recover_inflight(self) -> list[DescriptorChain]:
        return []


# -- queues and workers -------------------------------------------------------------------------


@dataclass(eq=False)
class _QueueState:
    """One started ring as the loop sees it."""

    device: QueueOwner
    index: int
    queue: DeviceQueue
    notifier: VringNotifier
    mem: GuestMemory
    worker: _Worker
    enabled: bool = False
    stopped: bool = False
    failed: bool = False
    """Stopped by a broken ring or a device error: its popped chains will never be pushed."""
    kick_fd: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    kicks: int = 0
    calls: int = 0
    quiet: bool = False
    """Left with notifications off after a pass: the worker is polling the ring (``poll_us``)."""


@dataclass(eq=False)
class _Watch:
    """One watched fd: ``callback(fd)`` runs on ``worker`` while it is readable."""

    owner: object
    fd: int
    callback: Callable[[int], None]
    on_error: Callable[[int], None] | None
    worker: _Worker
    loop: EventLoop
    removed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Worker:
    """One loop thread: an epoll set of kick fds and watched fds plus a wake-up eventfd."""

    def __init__(self, name: str, poll_ns: int = 0) -> None:
        self.name = name
        self.poll_ns = poll_ns
        self.busy_until = 0
        """While non-zero (a ``time.monotonic_ns`` deadline) the worker polls its quiet rings."""
        self.quiet: set[_QueueState] = set()
        self.epoll = select.epoll()
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.epoll.register(self.wake_fd, _EPOLL_FLAGS)
        self.lock = threading.Lock()
        self.by_fd: dict[int, _QueueState] = {}
        self.watches: dict[int, _Watch] = {}
        self.polling: set[_QueueState] = set()
        self.ready: list[_QueueState] = []
        self.running = True
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_fd, (1).to_bytes(8, "little"))

    def attach(self, state: _QueueState) -> None:
        fd = state.notifier.kick_fd
        with self.lock:
            if fd is not None:
                self.epoll.register(fd, _EPOLL_FLAGS)
                state.kick_fd = fd
                self.by_fd[fd] = state
            else:
                self.polling.add(state)
        self.schedule(state)

    def detach(self, state: _QueueState) -> None:
        """Stop watching ``state`` (any thread but this worker's may wait for it to finish)."""
        with self.lock:
            self._forget(state)
        if threading.current_thread() is self.thread:
            state.stopped = True
            return
        with state.lock:
            state.stopped = True

    def _forget(self, state: _QueueState) -> None:
        fd = state.kick_fd
        if fd is not None and self.by_fd.get(fd) is state:
            del self.by_fd[fd]
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)
        state.kick_fd = None
        self.polling.discard(state)
        self.quiet.discard(state)
        if state in self.ready:
            self.ready.remove(state)

    def add_watch(self, watch: _Watch) -> None:
        with self.lock:
            self.epoll.register(watch.fd, _EPOLL_FLAGS)
            self.watches[watch.fd] = watch

    def remove_watch(self, watch: _Watch) -> None:
        """Stop serving ``watch``; from another thread, wait for a running callback to return."""
        with self.lock:
            if self.watches.get(watch.fd) is watch:
                del self.watches[watch.fd]
                with contextlib.suppress(OSError, ValueError):
                    self.epoll.unregister(watch.fd)
        if threading.current_thread() is self.thread:
            watch.removed = True
            return
        with watch.lock:
            watch.removed = True

    def schedule(self, state: _QueueState) -> None:
        """Process ``state`` soon even without a kick (start, enable, recovered chains)."""
        with self.lock:
            if state not in self.ready:
                self.ready.append(state)
        self.wake()

    def stop(self) -> None:
        self.running = False
        self.wake()
        if threading.current_thread() is not self.thread:
            self.thread.join(5.0)
        with self.lock:
            self.epoll.close()
            os.close(self.wake_fd)

    def _run(self) -> None:
        path = os.environ.get(PROFILE_ENV)
        if not path:
            self._loop()
            return
        import cProfile

        profile = cProfile.Profile()
        try:
            profile.runcall(self._loop)
        finally:
            out = f"{path}.{self.name}.{os.getpid()}"
            profile.dump_stats(out)
            log.info("%s: profile written to %s", self.name, out)

    def _loop(self) -> None:
        while self.running:
            try:
                events = self.epoll.poll(self._timeout())
            except (OSError, ValueError):
                if not self.running:
                    return
                raise
            # In a function of its own: no reference to a queue outlives the round, or a
            # stopped queue's views would keep the last front-end's memory mapped while we sleep.
            self._round(events)

    def _timeout(self) -> float:
        """Seconds to sleep: none while busy polling; a tick while a ring has no kick fd."""
        if self.busy_until:
            return 0.0
        return POLL_INTERVAL_MS / 1000 if self.polling else -1.0

    def _round(self, events: list[tuple[int, int]]) -> None:
        due, watched = self._sort_events(events)
        if not self.poll_ns:
            _service_all(due)
        else:
            if self.busy_until:
                self._add_quiet_with_work(due)
            for state, kicked in due:
                self._keep_quiet(state, _service(state, kicked, quiet=True))
        for watch in watched:
            _run_watch(watch)
        if self.poll_ns:
            now = time.monotonic_ns()
            if due or watched:
                self.busy_until = now + self.poll_ns
            elif self.busy_until and now >= self.busy_until:
                self.busy_until = 0
                self._rearm()

    def _keep_quiet(self, state: _QueueState, quiet: bool) -> None:
        with self.lock:
            if quiet and not state.stopped:
                self.quiet.add(state)
            else:
                self.quiet.discard(state)

    def _add_quiet_with_work(self, due: list[tuple[_QueueState, bool]]) -> None:
        """Busy polling: the quiet rings the driver added chains to join this round."""
        with self.lock:
            quiet = [s for s in self.quiet if all(s is not d for d, _ in due)]
        for state in quiet:
            with state.lock:
                if state.stopped or not state.enabled:
                    continue
                try:
                    work = state.queue.has_available()
                except (VirtqueueError, GuestMemoryError):
                    work = True  # the pass stops the queue with the reason
            if work:
                due.append((state, False))

    def _rearm(self) -> None:
        """The poll window passed without work: notifications on again, each ring re-checked
        (a chain added just before is served now instead of waiting for a kick)."""
        with self.lock:
            quiet, self.quiet = self.quiet, set()
        for state in quiet:
            with state.lock:
                if state.stopped or not state.quiet:
                    continue
                state.quiet = False
                try:
                    work = state.queue.enable_notifications()
                except (VirtqueueError, GuestMemoryError):
                    work = True
            if work:
                self.schedule(state)

    def _sort_events(
        self, events: list[tuple[int, int]]
    ) -> tuple[list[tuple[_QueueState, bool]], list[_Watch]]:
        """The queues due this round (kicked or ready or polled) and the device fds that fired."""
        due: list[tuple[_QueueState, bool]] = []
        watched: list[_Watch] = []
        with self.lock:
            for fd, _ in events:
                if fd == self.wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.read(fd, 8)
                    continue
                state = self.by_fd.get(fd)
                if state is not None:
                    due.append((state, True))
                elif (watch := self.watches.get(fd)) is not None:
                    watched.append(watch)
            if self.ready:
                due.extend((s, False) for s in self.ready if all(s is not d for d, _ in due))
                self.ready.clear()
            if self.polling:
                due.extend((s, False) for s in self.polling)
        return due, watched


def _drain(fd: int) -> int:
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except (BlockingIOError, OSError):
        return 0


def _service_all(due: list[tuple[_QueueState, bool]]) -> None:
    for state, kicked in due:
        _service(state, kicked)


def _service(state: _QueueState, kicked: bool, *, quiet: bool = False) -> bool:
    """Handle one queue until its ring is empty with notifications re-enabled; ``quiet``: one
    pass, notifications left off (the worker polls the ring). True if the queue was left quiet."""
    with state.lock:
        if state.stopped:
            return False
        if kicked and state.kick_fd is not None:
            state.kicks += _drain(state.kick_fd)
        if not state.enabled:
            return False
        queue = state.queue
        try:
            state.quiet = _passes(state, queue, quiet)
        except (VirtqueueError, GuestMemoryError) as exc:
            _stop_broken(state, f"{exc}")
            state.quiet = False
        except Exception as exc:
            log.exception(
                "queue %d: %s.handle_queue raised", state.index, type(state.device).__name__
            )
            _stop_broken(state, f"device error: {type(exc).__name__}: {exc}")
            state.quiet = False
        if isinstance(queue, ResumedQueue) and not queue.pending:
            state.queue = queue.inner
        return state.quiet


def _passes(state: _QueueState, queue: DeviceQueue, quiet: bool) -> bool:
    """The device's passes over the ring (see the module docstring); True if left quiet."""
    device, index, notifier = state.device, state.index, state.notifier
    while True:
        queue.disable_notifications()
        waiting = device.handle_queue(index, queue, state.mem)
        if queue.needs_notification():
            state.calls += 1
            notifier.call()
        # A device waiting for input of its own leaves the chains and the kicks off until it
        # schedules the queue again; re-checking would spin on them.
        if waiting:
            return False
        if quiet:
            return True
        if not queue.enable_notifications():
            return False


def _run_watch(watch: _Watch) -> None:
    """Call a watch's callback; one that raises is logged and its watch removed."""
    with watch.lock:
        if watch.removed:
            return
        try:
            watch.callback(watch.fd)
            return
        except Exception:
            name = getattr(watch.callback, "__qualname__", repr(watch.callback))
            log.exception("fd %d: watch callback %s raised; watch removed", watch.fd, name)
    watch.loop.remove_watch(watch.owner, watch.fd)
    if watch.on_error is not None:
        try:
            watch.on_error(watch.fd)
        except Exception:
            log.exception("fd %d: cleaning up the failed watch raised", watch.fd)


def _stop_broken(state: _QueueState, reason: str) -> None:
    """Stop a queue the driver broke (or the device failed on); signal its error eventfd."""
    prefix = f"queue {state.index}: "
    reason = reason.removeprefix(prefix)
    log.error("queue %d stopped: %s", state.index, reason)
    with state.worker.lock:
        state.worker._forget(state)
    state.failed = state.stopped = True
    with contextlib.suppress(Exception):
        state.notifier.error()


class EventLoop:
    """Worker threads serving the started queues of the devices attached to it."""

    def __init__(self, workers: int = 1, *, name: str = "pyvhost", poll_us: int = 0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if poll_us < 0:
            raise ValueError(f"poll_us must not be negative, got {poll_us}")
        self.workers = workers
        self.name = name
        self.poll_us = poll_us
        """After work, how long (microseconds) a worker polls its rings before sleeping again."""
        self._lock = threading.Lock()
        self._threads: list[_Worker] = []
        self._states: dict[tuple[int, int], _QueueState] = {}
        self._enabled: dict[tuple[int, int], bool] = {}
        self._watches: dict[int, _Watch] = {}
        self._closed = False

    def _worker(self, index: int) -> _Worker:
        if not 0 <= index < self.workers:
            raise ValueError(f"worker {index} out of range (the loop has {self.workers})")
        with self._lock:
            if self._closed:
                raise RuntimeError(f"event loop {self.name} is stopped")
            if not self._threads:
                self._threads = [
                    _Worker(f"{self.name}-worker{i}", self.poll_us * 1000)
                    for i in range(self.workers)
                ]
            return self._threads[index]

    def add_queue(
        self,
        device: QueueOwner,
        index: int,
        queue: DeviceQueue,
        notifier: VringNotifier,
        mem: GuestMemory,
        *,
        worker: int | None = None,
    ) -> None:
        """Serve ``queue`` (recovering inflight chains first) on worker ``worker`` (default
        ``index % workers``) until :meth:`remove_queue`."""
        key = (id(device), index)
        self.remove_queue(device, index)
        try:
            recovered = queue.recover_inflight()
        except (VirtqueueError, GuestMemoryError, InflightError) as exc:
            log.error("queue %d: inflight recovery failed: %s", index, exc)
            recovered = []
        if recovered:
            log.info(
                "queue %d: %d in-flight requests recovered, redone first", index, len(recovered)
            )
            queue = ResumedQueue(queue, recovered)
        thread = self._worker(index % self.workers if worker is None else worker)
        state = _QueueState(device, index, queue, notifier, mem, thread)
        state.enabled = self._enabled.get(key, False)
        with self._lock:
            self._states[key] = state
        thread.attach(state)

    def remove_queue(self, device: QueueOwner, index: int, *, drain: float = DRAIN_TIMEOUT) -> None:
        """Stop serving a queue; returns once no worker touches it any more and the chains the
        device popped are pushed back (waits up to ``drain`` seconds for a device that completes
        them later, then logs what is left)."""
        with self._lock:
            state = self._states.pop((id(device), index), None)
        if state is None:
            return
        state.worker.detach(state)
        queue = state.queue
        deadline = time.monotonic() + drain
        while queue.in_flight and not state.failed:
            if time.monotonic() >= deadline:
                log.error(
                    "queue %d stopped with %d chains still in flight after %g s: the device "
                    "never completed them",
                    index,
                    queue.in_flight,
                    drain,
                )
                return
            time.sleep(0.001)

    def remove_device(self, device: QueueOwner) -> None:
        """Stop every queue of ``device`` and forget its enable states (reset)."""
        with self._lock:
            keys = [k for k in self._states if k[0] == id(device)]
            for key in [k for k in self._enabled if k[0] == id(device)]:
                del self._enabled[key]
        for _, index in keys:
            self.remove_queue(device, index)

    def set_enabled(self, device: QueueOwner, index: int, enabled: bool) -> None:
        """SET_VRING_ENABLE: a disabled queue's kicks are drained but its chains wait."""
        key = (id(device), index)
        with self._lock:
            self._enabled[key] = enabled
            state = self._states.get(key)
        if state is not None:
            state.enabled = enabled
            if enabled:
                state.worker.schedule(state)

    def schedule(self, device: QueueOwner, index: int) -> None:
        """Process queue ``index`` soon, kicked or not (a device with new work for it, such as
        frames for a receive queue); nothing happens while it is not started."""
        with self._lock:
            state = self._states.get((id(device), index))
        if state is not None:
            state.worker.schedule(state)

    def notify(self, device: QueueOwner, index: int) -> None:
        """Signal queue ``index``'s call eventfd (a device completing chains itself)."""
        with self._lock:
            state = self._states.get((id(device), index))
        if state is not None:
            state.calls += 1
            state.notifier.call()

    def add_watch(
        self,
        owner: object,
        fd: int,
        callback: Callable[[int], None],
        *,
        worker: int = 0,
        on_error: Callable[[int], None] | None = None,
    ) -> None:
        """Call ``callback(fd)`` on worker ``worker`` whenever ``fd`` is readable, until
        :meth:`remove_watch`. A callback that raises is logged, its watch removed, and
        ``on_error(fd)`` called (on the worker) so that its owner forgets it too."""
        thread = self._worker(worker)
        watch = _Watch(owner, fd, callback, on_error, thread, self)
        with self._lock:
            if fd in self._watches:
                raise ValueError(f"fd {fd} is already watched")
            self._watches[fd] = watch
        try:
            thread.add_watch(watch)
        except BaseException:
            with self._lock:
                del self._watches[fd]
            raise

    def remove_watch(self, owner: object, fd: int) -> None:
        """Stop watching ``fd`` for ``owner``; once this returns its callback is not running
        (unless called from that callback) and will not run again."""
        with self._lock:
            watch = self._watches.get(fd)
            if watch is None or watch.owner is not owner:
                return
            del self._watches[fd]
        watch.worker.remove_watch(watch)

    def stats(self, device: QueueOwner, index: int) -> tuple[int, int] | None:
        """``(kicks, calls)`` counted for a started queue, or None (for tests and tools)."""
        with self._lock:
            state = self._states.get((id(device), index))
        return None if state is None else (state.kicks, state.calls)

    def idle(self) -> None:
        """Stop the worker threads while no queue or watch is served (made again when needed):
        a daemon between front-ends then holds exactly the fds it held before the first."""
        with self._lock:
            if self._states or self._watches:
                return
            threads, self._threads = self._threads, []
        for worker in threads:
            worker.stop()

    def stop(self) -> None:
        """Stop every queue and join the worker threads."""
        with self._lock:
            states = list(self._states.values())
            self._states.clear()
            self._watches.clear()
            threads, self._threads = self._threads, []
            self._closed = True
        for state in states:
            state.worker.detach(state)
        for worker in threads:
            worker.stop()

    def __enter__(self) -> EventLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
