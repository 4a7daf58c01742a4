"""A worker process of a daemon in process mode: ``python -m pyvhost.daemon.worker FD PPID``.

The daemon (:class:`pyvhost.daemon.procloop.ProcessLoop`) starts one per worker, a fresh
interpreter holding one end of a socketpair (fd ``FD``), and tells it over that socket what to
serve (:mod:`pyvhost.daemon.procwire`): first the device (a
:class:`~pyvhost.daemon.device.DeviceSpec` the worker builds its own twin from: the block device
opens the image itself), then the guest
memory table (the fds, mapped here again), the dirty log and the inflight region, and per queue
its ring, position, features and kick / call / err eventfds. The queues run on an ordinary
single-worker :class:`~pyvhost.daemon.loop.EventLoop` with a
:class:`~pyvhost.daemon.adapter.DeviceAdapter` around the twin, exactly as a thread worker runs
them: inflight recovery, notification suppression, broken rings and dirty logging are that
code's.

The main thread answers the daemon's requests one at a time (stop a queue: the reply carries
its base once the chains it holds are done; set enabled; a new memory table; reset); a queue
that breaks is reported (``broken``) as its error eventfd is signalled. The worker dies with the
daemon: at end of file on its socket, and by ``PR_SET_PDEATHSIG`` (SIGKILL) if the daemon is
killed outright, so that a worker never serves rings a new back-end has taken over.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from pyvhost.daemon.adapter import DeviceAdapter
from pyvhost.daemon.device import Device
from pyvhost.daemon.loop import EventLoop
from pyvhost.daemon.procwire import Channel, Message, WireError, build_queue, close_fds
from pyvhost.user.device import VringNotifier
from pyvhost.virtio.inflight import InflightRegion
from pyvhost.virtio.memory import DirtyLog, GuestMemory, RegionSpec

__all__ = ["Worker", "main"]

log = logging.getLogger("pyvhost.daemon.worker")

_PR_SET_PDEATHSIG = 1


def die_with_parent(ppid: int) -> None:
    """SIGKILL this process when the thread that started it ends (the daemon dying); exit now
    if the daemon is already gone."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: end of file on the socket still ends us
    if os.getppid() != ppid:
        os._exit(1)


class _Notifier(VringNotifier):
    """The worker's notifier of one queue: an error is also reported to the daemon."""

    def __init__(self, index: int, channel: Channel) -> None:
        super().__init__(index)
        self.channel = channel
        self.failed = False

    def error(self) -> None:
        self.failed = True
        super().error()
        with contextlib.suppress(OSError, WireError):
            self.channel.send("broken", {"index": self.index})


def _resolve(factory: str) -> Callable[..., Any]:
    module_name, _, qualname = factory.partition(":")
    if not module_name or not qualname:
        raise WireError(f"factory {factory!r} is not 'module:qualified.name'")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise WireError(f"factory {factory!r} is not callable")
    return target  # type: ignore[no-any-return]


class Worker:
    """The worker's state and its answers to the daemon's requests."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.device: Device | None = None
        self.loop: EventLoop | None = None
        self.host: DeviceAdapter | None = None
        self.mem = GuestMemory()
        self.inflight: InflightRegion | None = None
        self.queues: dict[int, tuple[Any, _Notifier]] = {}
        self._ops: dict[str, Callable[[Message], dict[str, Any] | None]] = {
            "hello": self._hello,
            "memory": self._memory,
            "log": self._log,
            "inflight": self._inflight,
            "start": self._start,
            "notifiers": self._notifiers,
            "stop": self._stop,
            "enable": self._enable,
            "status": self._status,
            "reset": self._reset,
            "stats": self._stats,
            "schedule": self._schedule,
            "notify": self._notify,
        }

    # -- the request loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Answer requests until the daemon says bye or goes away."""
        while True:
            try:
                msg = self.channel.recv()
            except (EOFError, OSError):
                return
            if msg.op == "bye":
                close_fds(msg.fds)
                return
            seq = msg.fields.get("seq")
            op = self._ops.get(msg.op)
            try:
                if op is None:
                    raise WireError(f"{msg.op!r} is not a request")
                result = op(msg) or {}
            except Exception as exc:
                log.debug("%s failed", msg.op, exc_info=True)
                if seq is not None:
                    self._reply("error", {"seq": seq, "message": f"{type(exc).__name__}: {exc}"})
                else:
                    log.error("%s: %s", msg.op, exc)
                continue
            finally:
                close_fds(msg.fds)
            if seq is not None:
                self._reply("ok", {"seq": seq, "result": result})

    def _reply(self, op: str, fields: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the daemon is gone: the next receive ends us
            self.channel.send(op, fields)

    def _host(self) -> DeviceAdapter:
        if self.host is None:
            raise WireError("no device yet (hello first)")
        return self.host

    # -- requests ---------------------------------------------------------------------------------

    def _hello(self, msg: Message) -> dict[str, Any]:
        f = msg.fields
        if self.host is not None:
            raise WireError("the device is already built")
        prefix = f"worker{f['worker']}[{os.getpid()}]"
        logging.basicConfig(
            stream=sys.stderr,
            level=f["log_level"],
            format=f"%(asctime)s %(levelname)s %(name)s {prefix}: %(message)s",
        )
        logging.getLogger("pyvhost").setLevel(f["log_level"])
        for entry in reversed(f["sys_path"]):
            if isinstance(entry, str) and entry not in sys.path:
                sys.path.insert(0, entry)
        device = _resolve(f["factory"])(**f["kwargs"])
        if not isinstance(device, Device):
            raise WireError(f"{f['factory']} returned a {type(device).__name__}, not a Device")
        self.device = device
        self.loop = EventLoop(1, name=f"{f['name']}-w{f['worker']}", poll_us=f["poll_us"])
        self.host = DeviceAdapter(device, self.loop)
        log.info("serving %s queues (%s)", type(device).__name__, f["name"])
        return {"pid": os.getpid()}

    def _memory(self, msg: Message) -> None:
        regions = msg.fields["regions"]
        if len(regions) != len(msg.fds):
            raise WireError(f"memory: {len(regions)} regions but {len(msg.fds)} fds")
        specs = []
        for fd, region in zip(msg.fds, regions, strict=True):
            offset, size, gpa, uva = (int(v) for v in region)
            specs.append(RegionSpec(fd, offset, size, gpa, uva))
        self.mem.replace(specs)
        self._host().memory_changed(self.mem)

    def _log(self, msg: Message) -> None:
        if not msg.fds:
            self.mem.set_log(None)
            return
        fd = msg.fds.pop()
        try:
            dirty = DirtyLog(fd, msg.fields["size"], msg.fields["offset"])
        finally:
            os.close(fd)
        self.mem.set_log(dirty)

    def _inflight(self, msg: Message) -> None:
        old, self.inflight = self.inflight, None
        if old is not None:
            old.close()
        if msg.fds:
            f = msg.fields
            self.inflight = InflightRegion.adopt(
                msg.fds.pop(),
                f["mmap_size"],
                f["mmap_offset"],
                f["num_queues"],
                f["queue_size"],
                f["packed"],
            )

    def _start(self, msg: Message) -> None:
        f = msg.fields
        host = self._host()
        index = f["index"]
        if index in self.queues:
            raise WireError(f"queue {index} is already started")
        names = f["fds"]
        if len(names) != len(msg.fds) or not set(names) <= {"kick", "call", "err"}:
            raise WireError(f"start: fds {names} do not match the {len(msg.fds)} sent")
        fds = dict(zip(names, msg.fds, strict=True))
        msg.fds.clear()
        notifier = _Notifier(index, self.channel)
        notifier.set_kick_fd(fds.get("kick"), polling=f["polling"])
        notifier.set_call_fd(fds.get("call"))
        notifier.set_err_fd(fds.get("err"))
        try:
            queue = build_queue(f["queue"], self.mem, self.inflight)
        except BaseException:
            notifier.close()
            raise
        host.acked_features = f["features"]
        assert self.loop is not None
        self.loop.set_enabled(host, index, f["enabled"])
        self.queues[index] = (queue, notifier)
        host.queue_started(index, queue, notifier)

    def _notifiers(self, msg: Message) -> None:
        entry = self.queues.get(msg.fields["index"])
        names = msg.fields["fds"]
        if len(names) != len(msg.fds):
            raise WireError(f"notifiers: fds {names} do not match the {len(msg.fds)} sent")
        fds = dict(zip(names, msg.fds, strict=True))
        msg.fds.clear()
        if entry is None:
            close_fds(list(fds.values()))
            return
        notifier = entry[1]
        if "call" in names:
            notifier.set_call_fd(fds.get("call"))
        if "err" in names:
            notifier.set_err_fd(fds.get("err"))

    def _stop(self, msg: Message) -> dict[str, Any]:
        index = msg.fields["index"]
        entry = self.queues.pop(index, None)
        if entry is None:
            return {}
        queue, notifier = entry
        try:
            self._host().queue_stopped(index)
            return {"base": queue.get_base(), "failed": notifier.failed}
        finally:
            notifier.close()
            queue.close()

    def _enable(self, msg: Message) -> None:
        self._host().queue_enabled(msg.fields["index"], msg.fields["enabled"])

    def _status(self, msg: Message) -> None:
        self._host().set_status(msg.fields["status"])

    def _reset(self, msg: Message) -> None:
        host = self._host()
        for index in list(self.queues):
            self._stop(Message("stop", {"index": index}, []))
        host.reset()

    def _stats(self, msg: Message) -> dict[str, Any]:
        assert self.loop is not None
        stats = self.loop.stats(self._host(), msg.fields["index"])
        return {} if stats is None else {"kicks": stats[0], "calls": stats[1]}

    def _schedule(self, msg: Message) -> None:
        self._host().schedule(msg.fields["index"])

    def _notify(self, msg: Message) -> None:
        self._host().notify(msg.fields["index"])

    # -- the end ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the queues and release the device, memory, inflight region and socket."""
        if self.loop is not None:
            self.loop.stop()
        for index in list(self.queues):
            queue, notifier = self.queues.pop(index)
            notifier.close()
            queue.close()
        if self.host is not None:
            self.host.close()
        close = getattr(self.device, "close", None)
        if callable(close):
            close()
        if self.inflight is not None:
            self.inflight.close()
        self.mem.close()
        self.channel.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m pyvhost.daemon.worker FD PPID", file=sys.stderr)
        return 2
    fd, ppid = int(args[0]), int(args[1])
    die_with_parent(ppid)
    import socket

    worker = Worker(Channel(socket.socket(fileno=fd)))
    try:
        worker.run()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
