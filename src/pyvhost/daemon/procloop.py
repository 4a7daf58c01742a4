"""Queues served by worker processes: :class:`ProcessLoop` and :class:`ProcessAdapter`.

``Daemon(..., workers=N, worker_mode="process")`` (``pyvhost serve blk --workers N
--worker-mode process``) serves the queues of a front-end from N worker processes instead of N
threads, so that ring work, which is Python bytecode and serialized by the GIL across threads,
runs on as many cores as there are workers.

The daemon keeps what it has in thread mode: the vhost-user connection, the protocol handler
(with its own mapping of guest memory, used to translate ring addresses and to answer
GET_VRING_BASE for a queue whose worker died) and the device instance, which answers the config
space and the hooks. :class:`ProcessAdapter` is the :class:`~pyvhost.daemon.adapter.DeviceAdapter`
of process mode: it asks the handler to keep the fds of guest memory and the dirty log, and
hands every state change on to :class:`ProcessLoop`, which has the same interface as
:class:`~pyvhost.daemon.loop.EventLoop` plus those changes.

Each worker is a fresh interpreter (``python -m pyvhost.daemon.worker``, see
:mod:`pyvhost.daemon.worker`), never a fork of the multi-threaded daemon, started when a
front-end connects and ended when it leaves (the next front-end gets new ones). It builds its
own twin of the device from :meth:`Device.process_spec <pyvhost.daemon.device.Device.process_spec>`
and runs its queues (``worker_for_queue(i, N)`` says whose) on an ordinary one-thread EventLoop
(with the daemon's ``poll_us``: a worker busy-polls its rings as a worker thread would).
Messages (:mod:`pyvhost.daemon.procwire`) go daemon -> worker and the daemon waits for the
answer: a queue started (ring, position, features, eventfds), stopped (the answer is its base,
once the chains in flight are done: GET_VRING_BASE), enabled; memory table, dirty log, inflight
region; status; reset. A worker reports a queue it stopped as broken (its error eventfd is
signalled by the worker; the daemon logs it).

A worker that dies (killed, crashed) is noticed at once by end of file on its socket and logged,
and a new worker takes its queues over on the same connection: it maps the memory, the dirty log
and the inflight region again, and starts each queue where its ring stopped (the used index of a
split ring, the inflight region's position of a packed one), redoing the chains that were in
flight from the inflight region first, as a restarted back-end does; the front-end notices
nothing but the delay. That needs the inflight region (INFLIGHT_SHMFD, which QEMU's
vhost-user-blk sets up): without it, which chains the dead worker completed is not known
exactly, and the queues fail as broken queues do (error eventfd signalled) for the front-end to
restart them; so do they once a worker has died :data:`RESPAWN_LIMIT` times for one front-end.
GET_VRING_BASE of a failed queue answers where the used ring is in guest memory, as QEMU resumes
after a back-end crash. A worker that does not answer a request within :data:`REPLY_TIMEOUT` is
killed and treated the same way. A packed ring without an inflight region whose worker died
restarts from the position it had when it started: only inflight tracking says where a packed
ring's work stopped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import pyvhost
from pyvhost.daemon.adapter import DeviceAdapter
from pyvhost.daemon.device import Device, DeviceSpec
from pyvhost.daemon.loop import DRAIN_TIMEOUT
from pyvhost.daemon.procwire import Channel, Message, WireError, queue_fields, socketpair
from pyvhost.errors import VhostError
from pyvhost.virtio.packed import PackedQueue, encode_packed_base
from pyvhost.virtio.split import SplitQueue

if TYPE_CHECKING:
    from pyvhost.user.device import VringNotifier
    from pyvhost.virtio.inflight import InflightRegion
    from pyvhost.virtio.memory import DirtyLog, GuestMemory
    from pyvhost.virtio.queue import DeviceQueue

__all__ = [
    "REPLY_TIMEOUT",
    "RESPAWN_LIMIT",
    "WORKER_MODES",
    "ProcessAdapter",
    "ProcessLoop",
    "WorkerDiedError",
]

log = logging.getLogger("pyvhost.daemon")

WORKER_MODES = ("thread", "process")
"""``worker_mode`` values: queues served by threads of the daemon or by worker processes."""

REPLY_TIMEOUT = 30.0
"""How long the daemon waits for a worker's answer (a stop waits ``DRAIN_TIMEOUT`` more)."""

STOP_TIMEOUT = 5.0
"""How long a worker told to end has before it is killed."""

RESPAWN_LIMIT = 3
"""How many times a worker that died is replaced for one front-end; after that its queues fail
(a request that kills every worker would otherwise kill them for ever)."""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _controlled(
    method: Callable[Concatenate[ProcessLoop, _P], _R],
) -> Callable[Concatenate[ProcessLoop, _P], _R]:
    """Run a :class:`ProcessLoop` state change under its control lock."""

    def run(loop: ProcessLoop, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with loop._control:
            return method(loop, *args, **kwargs)

    functools.update_wrapper(run, method)
    return run


class WorkerDiedError(VhostError):
    """A worker process is gone (or stopped answering and was killed)."""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


class _Child:
    """One worker process and the daemon's end of its socket (a reader thread takes answers
    and reports)."""

    def __init__(
        self,
        index: int,
        name: str,
        spec: DeviceSpec,
        *,
        poll_us: int,
        on_report: Callable[[_Child, Message], None],
        on_death: Callable[[_Child], None],
    ) -> None:
        self.index = index
        self.on_report = on_report
        self.on_death = on_death
        ours, theirs = socketpair()
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(pyvhost.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pyvhost.daemon.worker",
                    str(theirs.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = self.proc.pid
        self.channel = Channel(ours)
        self.alive = True
        self.stopping = False
        self._cond = threading.Condition()
        self._seq = 0
        self._replies: dict[int, Message] = {}
        self._reader = threading.Thread(
            target=self._read, name=f"{name}-worker{index}-reader", daemon=True
        )
        self._reader.start()
        level = logging.getLogger("pyvhost").getEffectiveLevel()
        self._hello = self._send(
            "hello",
            {
                "factory": spec.factory,
                "kwargs": spec.kwargs,
                "name": name,
                "worker": index,
                "log_level": level,
                "poll_us": poll_us,
                "sys_path": [p for p in sys.path if isinstance(p, str) and p],
            },
        )
        self._greeted = False

    def __repr__(self) -> str:
        return f"worker {self.index} (pid {self.pid})"

    def _send(self, op: str, fields: dict[str, Any], fds: Sequence[int] = ()) -> int:
        with self._cond:
            self._seq += 1
            seq = self._seq
        try:
            self.channel.send(op, {**fields, "seq": seq}, fds)
        except OSError as exc:
            raise WorkerDiedError(f"{self}: {op}: {exc}") from exc
        return seq

    def _wait(self, op: str, seq: int, timeout: float) -> dict[str, Any]:
        with self._cond:
            self._cond.wait_for(lambda: seq in self._replies or not self.alive, timeout)
            reply = self._replies.pop(seq, None)
        if reply is None:
            if self.alive:
                log.error("%s did not answer %s within %g s: killed", self, op, timeout)
                self.kill()
                raise WorkerDiedError(f"{self} did not answer {op} within {timeout:g} s")
            how = _describe_exit(self.proc.poll())
            raise WorkerDiedError(f"{self} died ({how}) before answering {op}")
        if reply.op == "error":
            raise VhostError(f"{self}: {op}: {reply.fields['message']}")
        result: dict[str, Any] = reply.fields["result"]
        return result

    def ready(self) -> None:
        """Wait for the answer to hello (the device built) once."""
        if not self._greeted:
            self._wait("hello", self._hello, REPLY_TIMEOUT)
            self._greeted = True

    def request(
        self,
        op: str,
        fields: dict[str, Any] | None = None,
        fds: Sequence[int] = (),
        timeout: float = REPLY_TIMEOUT,
    ) -> dict[str, Any]:
        """Send a request and wait for its answer (WorkerDiedError, or VhostError with the worker's
        error message)."""
        self.ready()
        if not self.alive:
            raise WorkerDiedError(f"{self} is dead")
        return self._wait(op, self._send(op, fields or {}, fds), timeout)

    def post(self, op: str, fields: dict[str, Any]) -> None:
        """A one-way message (lost if the worker is gone)."""
        with contextlib.suppress(OSError):
            self.channel.send(op, fields)

    def _read(self) -> None:
        while True:
            try:
                msg = self.channel.recv()
            except (EOFError, OSError, WireError):
                break
            if msg.op in ("ok", "error"):
                with self._cond:
                    self._replies[msg.fields["seq"]] = msg
                    self._cond.notify_all()
            else:
                try:
                    self.on_report(self, msg)
                except Exception:
                    log.exception("%s: report %s", self, msg.op)
        with self._cond:
            self.alive = False
            self._cond.notify_all()
        if not self.stopping:
            self.on_death(self)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def stop(self) -> None:
        """End the worker (bye, then SIGKILL if it lingers) and release its socket."""
        self.stopping = True
        self.post("bye", {})
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("%s did not end within %g s: killed", self, STOP_TIMEOUT)
            self.kill()
            self.proc.wait()
        self.channel.shutdown()
        if self._reader is not threading.current_thread():
            self._reader.join(STOP_TIMEOUT)
        self.channel.close()


@dataclass(eq=False)
class _Queue:
    """A queue started on a worker, as the daemon sees it."""

    index: int
    worker: int
    child: _Child
    queue: DeviceQueue
    """The handler's queue: its position at start, its rings in the daemon's mapping."""
    notifier: VringNotifier
    mem: GuestMemory
    failed: bool = False
    """Its worker died: the worker's position is lost."""


class ProcessLoop:
    """Worker processes serving the started queues of one device at a time (the EventLoop
    interface, plus the state changes a worker has to hear of: see the module docstring)."""

    def __init__(self, workers: int = 1, *, name: str = "pyvhost", poll_us: int = 0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if poll_us < 0:
            raise ValueError(f"poll_us must not be negative, got {poll_us}")
        self.workers = workers
        self.name = name
        self.poll_us = poll_us
        """Busy-poll window of each worker's EventLoop (see :class:`EventLoop`)."""
        self._lock = threading.Lock()
        self._children: list[_Child | None] = [None] * workers
        self._owner: ProcessAdapter | None = None
        self._spec: DeviceSpec | None = None
        self._queues: dict[int, _Queue] = {}
        self._enabled: dict[int, bool] = {}
        self._closed = False
        self._control = threading.RLock()
        """Held by every state change the handler hands on and by the replacement of a worker
        that died, so that neither sees the other half done."""
        self._respawns = [0] * workers
        self._replacing: set[int] = set()
        """Workers (by index) whose replacement is under way."""

    # -- workers ----------------------------------------------------------------------------------

    def bind(self, owner: ProcessAdapter, spec: DeviceSpec) -> None:
        """Serve ``owner`` from now on: its workers start now (the device twins build while the
        front-end negotiates)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"process loop {self.name} is stopped")
            previous = self._owner
        if previous is not None and previous is not owner:
            self.release(previous)
        with self._lock:
            self._owner, self._spec = owner, spec
            self._respawns = [0] * self.workers
        for i in range(self.workers):
            self._spawn(i)

    def _spawn(self, index: int) -> _Child:
        assert self._spec is not None
        child = _Child(
            index,
            self.name,
            self._spec,
            poll_us=self.poll_us,
            on_report=self._report,
            on_death=self._died,
        )
        with self._lock:
            self._children[index] = child
        log.info("%s: %s started", self.name, child)
        return child

    def _child(self, index: int) -> _Child:
        """Worker ``index``, alive and up to date (a new one if the last died)."""
        with self._lock:
            child = self._children[index]
            owner = self._owner
        if owner is None:
            raise RuntimeError(f"process loop {self.name} serves no device")
        if child is not None and child.alive:
            child.ready()
            return child
        if child is not None:
            child.stop()
        child = self._spawn(index)
        child.ready()
        mem = owner.mem
        if mem is not None and len(mem):
            self._send_memory(child, mem)
        if mem is not None and mem.log is not None:
            self._send_log(child, mem.log)
        if owner.inflight is not None:
            self._send_inflight(child, owner.inflight)
        if owner.status:
            child.request("status", {"status": owner.status})
        return child

    def _live(self) -> list[_Child]:
        with self._lock:
            return [c for c in self._children if c is not None and c.alive]

    def _report(self, child: _Child, msg: Message) -> None:
        if msg.op == "broken":
            log.info("%s: queue %d stopped as broken by %s", self.name, msg.fields["index"], child)

    def _died(self, child: _Child) -> None:
        try:
            code = child.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            code = None
        with self._lock:
            queues = [q for q in self._queues.values() if q.child is child and not q.failed]
            for q in queues:
                q.failed = True
            replacing = child.index in self._replacing
            self._replacing.add(child.index)
        log.error(
            "%s: %s died (%s); its queues %s stop",
            self.name,
            child,
            _describe_exit(code),
            [q.index for q in queues],
        )
        if replacing:
            return  # a replacement of this worker is under way and will see it
        threading.Thread(
            target=self._replace,
            args=(child,),
            name=f"{self.name}-worker{child.index}-replace",
            daemon=True,
        ).start()

    def _replace(self, dead: _Child) -> None:
        """A new worker for ``dead`` takes its queues over where their rings stopped, again if
        it dies while doing so; the queues that cannot be taken over fail (error eventfd).

        This thread then waits for the new worker to end: the kernel sends a worker its
        PR_SET_PDEATHSIG when the *thread* that started it ends, not only the daemon.
        """
        while True:
            child: _Child | None = None
            failed: list[_Queue] = []
            with self._control:
                try:
                    child, failed = self._restart(dead)
                except Exception:
                    log.exception("%s: replacing %s failed", self.name, dead)
                    with self._lock:
                        failed = [q for q in self._queues.values() if q.child is dead and q.failed]
            for q in failed:
                with contextlib.suppress(Exception):
                    q.notifier.error()
            with self._lock:
                if child is None or child.alive:
                    self._replacing.discard(dead.index)
                    break
            dead = child  # it died too, before it was done
        if child is not None:
            child.proc.wait()

    def _restart(self, dead: _Child) -> tuple[_Child | None, list[_Queue]]:
        """Start the queues of ``dead`` again on a new worker, each at its base
        (:func:`_dead_base`) with the chains in flight redone from the inflight region; the
        worker started, and the queues that fail instead."""
        index = dead.index
        with self._lock:
            if self._closed or self._owner is None or self._children[index] is not dead:
                return None, []  # the front-end left, the loop stopped, or a start replaced it
            queues = [q for q in self._queues.values() if q.child is dead and q.failed]
        if not queues:
            return None, []  # none started: the next start gets a new worker
        blind = [q.index for q in queues if not _tracked(q.queue)]
        if blind:
            log.error(
                "%s: %s not replaced: queues %s have no inflight region, so where their rings "
                "stopped is not known exactly; the front-end has to restart them",
                self.name,
                dead,
                blind,
            )
            return None, queues
        while True:
            self._respawns[index] += 1
            if self._respawns[index] > RESPAWN_LIMIT:
                log.error(
                    "%s: worker %d died %d times for this front-end: not replaced again",
                    self.name,
                    index,
                    self._respawns[index],
                )
                return None, queues
            try:
                child = self._child(index)
            except WorkerDiedError as exc:
                log.error("%s: %s", self.name, exc)
                continue
            break
        started = []
        for q in queues:
            base = _dead_base(q)
            fields = queue_fields(q.queue)
            fields["base"] = base
            if not fields["packed"]:
                fields["used_idx"] = base
            state = _Queue(q.index, q.worker, child, q.queue, q.notifier, q.mem)
            if self._start_on(state, fields):
                started.append(q.index)
        log.info(
            "%s: %s replaced %s; queues %s resume where their rings stopped",
            self.name,
            child,
            dead,
            started,
        )
        return child, []

    def _stop_children(self) -> None:
        with self._lock:
            children = [c for c in self._children if c is not None]
            self._children = [None] * self.workers
        for child in children:
            child.stop()
            log.info("%s: %s ended (%s)", self.name, child, _describe_exit(child.proc.returncode))

    # -- what the adapter hands on ----------------------------------------------------------------

    def _send_memory(self, child: _Child, mem: GuestMemory) -> None:
        regions, fds = [], []
        for region in mem.regions:
            if region.fd is None:
                where = f"memory region gpa {region.guest_phys_addr:#x}"
                raise VhostError(f"{where}: its fd was not kept")
            regions.append([region.mmap_offset, region.size, region.guest_phys_addr,
                            region.userspace_addr])  # fmt: skip
            fds.append(region.fd)
        child.request("memory", {"regions": regions}, fds)

    @staticmethod
    def _send_log(child: _Child, dirty: DirtyLog | None) -> None:
        if dirty is None:
            child.request("log", {"size": 0, "offset": 0})
            return
        if dirty.fd is None:
            raise VhostError("dirty log: its fd was not kept")
        child.request("log", {"size": dirty.size, "offset": dirty.offset}, [dirty.fd])

    @staticmethod
    def _send_inflight(child: _Child, region: InflightRegion | None) -> None:
        if region is None:
            fields = {"mmap_size": 0, "mmap_offset": 0, "num_queues": 0, "queue_size": 0}
            child.request("inflight", {**fields, "packed": False})
            return
        fields = {
            "mmap_size": region.mmap_size,
            "mmap_offset": region.mmap_offset,
            "num_queues": region.num_queues,
            "queue_size": region.queue_size,
            "packed": region.packed,
        }
        child.request("inflight", fields, [region.fd])

    def _each(self, send: Callable[[_Child], None]) -> None:
        for child in self._live():
            try:
                send(child)
            except WorkerDiedError as exc:
                log.error("%s: %s", self.name, exc)

    @_controlled
    def set_memory(self, mem: GuestMemory) -> None:
        """The memory table changed (every queue is stopped): workers map it again."""
        self._each(lambda c: self._send_memory(c, mem))

    @_controlled
    def set_log(self, dirty: DirtyLog | None) -> None:
        """Dirty logging started (the log) or stopped (None)."""
        self._each(lambda c: self._send_log(c, dirty))

    @_controlled
    def set_inflight(self, region: InflightRegion | None) -> None:
        """The inflight region changed (no queue is started)."""
        self._each(lambda c: self._send_inflight(c, region))

    @_controlled
    def set_status(self, status: int) -> None:
        """The driver wrote the device status: the twins hear of it too."""

        def send(child: _Child) -> None:
            child.request("status", {"status": status})

        self._each(send)

    @_controlled
    def notifier_changed(self, index: int, notifier: VringNotifier) -> None:
        """A started queue's call or error eventfd changed (SET_VRING_CALL / ERR)."""
        with self._lock:
            state = self._queues.get(index)
        if state is None or state.failed:
            return
        names, fds = [], []
        for name, fd in (("call", notifier.call_fd), ("err", notifier.err_fd)):
            if fd is not None:
                names.append(name)
                fds.append(fd)
        try:
            state.child.request("notifiers", {"index": index, "fds": names}, fds)
        except WorkerDiedError as exc:
            log.error("%s: %s", self.name, exc)

    # -- the EventLoop interface ------------------------------------------------------------------

    def add_queue(
        self,
        device: object,
        index: int,
        queue: DeviceQueue,
        notifier: VringNotifier,
        mem: GuestMemory,
        *,
        worker: int | None = None,
    ) -> None:
        """Start ``queue`` on worker ``worker`` (default ``index % workers``)."""
        self.remove_queue(device, index)
        which = index % self.workers if worker is None else worker
        if not 0 <= which < self.workers:
            raise ValueError(f"worker {which} out of range (the loop has {self.workers})")
        with self._control:
            state = _Queue(index, which, self._child(which), queue, notifier, mem)
            if not self._start_on(state, queue_fields(queue)):
                with contextlib.suppress(Exception):
                    notifier.error()

    def _start_on(self, state: _Queue, queue_state: dict[str, Any]) -> bool:
        """Have ``state.child`` serve the queue from ``queue_state``; False if it died first."""
        index, child, notifier = state.index, state.child, state.notifier
        owner = self._owner
        assert owner is not None
        names, fds = [], []
        for name, fd in (
            ("kick", notifier.kick_fd),
            ("call", notifier.call_fd),
            ("err", notifier.err_fd),
        ):
            if fd is not None:
                names.append(name)
                fds.append(fd)
        fields = {
            "index": index,
            "features": owner.acked_features,
            "enabled": self._enabled.get(index, False),
            "queue": queue_state,
            "fds": names,
            "polling": notifier.kick_polling,
        }
        with self._lock:
            self._queues[index] = state
        try:
            child.request("start", fields, fds)
        except WorkerDiedError as exc:
            log.error("%s: queue %d not started: %s", self.name, index, exc)
            state.failed = True
            return False
        except BaseException:
            with self._lock:
                self._queues.pop(index, None)
            raise
        return True

    @_controlled
    def remove_queue(
        self, device: object, index: int, *, drain: float = DRAIN_TIMEOUT
    ) -> int | None:
        """Stop a queue; its base (GET_VRING_BASE), once the worker pushed back what it popped
        (or from guest memory if the worker is dead); None if it was not started."""
        with self._lock:
            state = self._queues.pop(index, None)
        if state is None:
            return None
        if not state.failed:
            try:
                reply = state.child.request("stop", {"index": index}, timeout=REPLY_TIMEOUT + drain)
                base = reply.get("base")
                if type(base) is int:
                    return base
            except WorkerDiedError as exc:
                log.error("%s: queue %d: %s", self.name, index, exc)
        return _dead_base(state)

    @_controlled
    def remove_device(self, device: object) -> None:
        """Stop every queue and reset the workers' twins (RESET_DEVICE, the front-end left)."""
        with self._lock:
            indices = list(self._queues)
            self._enabled.clear()
        for index in indices:
            self.remove_queue(device, index)

        def send(child: _Child) -> None:
            child.request("reset")

        self._each(send)

    @_controlled
    def set_enabled(self, device: object, index: int, enabled: bool) -> None:
        """SET_VRING_ENABLE: remembered for the queue's start, and told to its worker."""
        with self._lock:
            self._enabled[index] = enabled
            owner = self._owner
            child = None if owner is None else self._children[owner.worker_of(index)]
        if child is not None and child.alive:
            try:
                child.request("enable", {"index": index, "enabled": enabled})
            except WorkerDiedError as exc:
                log.error("%s: %s", self.name, exc)

    def schedule(self, device: object, index: int) -> None:
        with self._lock:
            state = self._queues.get(index)
        if state is not None:
            state.child.post("schedule", {"index": index})

    def notify(self, device: object, index: int) -> None:
        with self._lock:
            state = self._queues.get(index)
        if state is not None:
            state.child.post("notify", {"index": index})

    def add_watch(
        self,
        owner: object,
        fd: int,
        callback: Callable[[int], None],
        *,
        worker: int = 0,
        on_error: Callable[[int], None] | None = None,
    ) -> None:
        """Not in process mode: the worker's twin of the device watches its own fds."""
        raise ValueError(
            "process mode: the daemon's device cannot watch fds (its worker twins serve the "
            "queues and watch their own)"
        )

    def remove_watch(self, owner: object, fd: int) -> None:
        """Nothing is watched in the daemon in process mode."""

    def stats(self, device: object, index: int) -> tuple[int, int] | None:
        """``(kicks, calls)`` the worker counted for a started queue, or None."""
        with self._lock:
            state = self._queues.get(index)
        if state is None or state.failed:
            return None
        try:
            reply = state.child.request("stats", {"index": index})
        except WorkerDiedError:
            return None
        if "kicks" not in reply:
            return None
        return int(reply["kicks"]), int(reply["calls"])

    def worker_pids(self) -> list[int]:
        """The pids of the live workers (for tests and tools)."""
        return [c.pid for c in self._live()]

    @_controlled
    def release(self, owner: ProcessAdapter) -> None:
        """``owner``'s front-end left: its workers end (the next front-end gets new ones)."""
        with self._lock:
            if self._owner is not owner:
                return
            self._owner = None
            self._queues.clear()
            self._enabled.clear()
        self._stop_children()

    @_controlled
    def idle(self) -> None:
        """Between front-ends: no worker is left running."""
        with self._lock:
            if self._queues:
                return
            self._owner = None
        self._stop_children()

    @_controlled
    def stop(self) -> None:
        """End every worker; the loop cannot be used again."""
        with self._lock:
            self._closed = True
            self._owner = None
            self._queues.clear()
        self._stop_children()

    def __enter__(self) -> ProcessLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tracked(queue: DeviceQueue) -> bool:
    """Whether ``queue`` reports to an inflight region (which says exactly where it stopped)."""
    return isinstance(queue, SplitQueue | PackedQueue) and queue.inflight is not None


def _dead_base(state: _Queue) -> int:
    """GET_VRING_BASE of a queue whose worker died: where the used ring is (split), or where
    the inflight region says it is (packed), as QEMU resumes after a back-end crash; the chains
    still in flight are recovered from the inflight region when the queue starts again."""
    queue = state.queue
    try:
        if isinstance(queue, SplitQueue):
            used = int.from_bytes(state.mem.read(queue.areas.device + 2, 2), "little")
            log.info("queue %d: its worker died; base from the used ring: %d", state.index, used)
            return used
        tracker = queue.inflight if isinstance(queue, PackedQueue) else None
        if tracker is not None:
            idx, wrap = tracker.used_idx, tracker.used_wrap
            return encode_packed_base(idx, wrap, idx, wrap)
    except VhostError as exc:
        log.error("queue %d: where its ring stopped cannot be read: %s", state.index, exc)
    log.error(
        "queue %d: its worker died and nothing says where its ring stopped: the base it "
        "started at is answered",
        state.index,
    )
    return queue.get_base()


class ProcessAdapter(DeviceAdapter):
    """The :class:`DeviceAdapter` of process mode: the daemon's device answers the protocol,
    worker processes (:class:`ProcessLoop`) serve its queues on twins built from its
    ``process_spec()``."""

    needs_memory_fds = True

    def __init__(self, device: Device, loop: ProcessLoop) -> None:
        spec = device.process_spec()
        if spec is None:
            raise ValueError(
                f"{type(device).__name__} cannot be served by worker processes "
                "(its process_spec() is None); use worker_mode='thread'"
            )
        self.inflight: InflightRegion | None = None
        self.process_loop = loop
        super().__init__(device, loop)
        loop.bind(self, spec)

    def worker_of(self, index: int) -> int:
        """The worker that serves queue ``index``."""
        return self._workers[index]

    def close(self) -> None:
        super().close()
        self.process_loop.release(self)

    def set_status(self, status: int) -> None:
        super().set_status(status)
        self.process_loop.set_status(status)

    def memory_changed(self, mem: GuestMemory) -> None:
        super().memory_changed(mem)
        self.process_loop.set_memory(mem)

    def dirty_log_changed(self, log: DirtyLog | None) -> None:
        self.process_loop.set_log(log)

    def inflight_changed(self, region: InflightRegion | None) -> None:
        self.inflight = region
        self.process_loop.set_inflight(region)

    def queue_notifier_changed(self, index: int, notifier: VringNotifier) -> None:
        self.process_loop.notifier_changed(index, notifier)
