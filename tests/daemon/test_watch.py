"""A device's own fds on the event loop (``watch`` / ``unwatch``) and its choice of worker per
queue (``worker_for_queue``), through a Daemon driven by the hand-made front-end."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from peers.qemu import short_tmp
from pyvhost.daemon import Daemon, Device
from pyvhost.daemon.adapter import DeviceAdapter
from pyvhost.daemon.loop import EventLoop
from pyvhost.errors import VhostError
from pyvhost.user.frontend import Frontend
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory

from .rig import Rig


@pytest.fixture
def sock() -> Iterator[str]:
    with short_tmp("pvh-watch-") as d:
        yield str(d / "vhost.sock")


class Watcher(Device):
    """Two queues that echo; records the thread of every queue and of every callback."""

    num_queues = 2
    queue_size = 64

    def __init__(self) -> None:
        self.queue_threads: dict[int, set[str]] = {}
        self.calls: list[tuple[int, bytes, str]] = []
        self.called = threading.Condition()

    def handle_chain(self, index: int, chain: DescriptorChain, mem: GuestMemory) -> int:
        self.queue_threads.setdefault(index, set()).add(threading.current_thread().name)
        return chain.write_at(0, chain.read_all())

    def record(self, fd: int, data: bytes) -> None:
        with self.called:
            self.calls.append((fd, data, threading.current_thread().name))
            self.called.notify_all()

    def wait_calls(self, n: int, timeout: float = 5.0) -> list[tuple[int, bytes, str]]:
        with self.called:
            assert self.called.wait_for(lambda: len(self.calls) >= n, timeout), self.calls
            return list(self.calls)

    def on_eventfd(self, fd: int) -> None:
        self.record(fd, os.read(fd, 8))

    def on_socket(self, fd: int) -> None:
        self.record(fd, os.read(fd, 4096))


def _signal(fd: int) -> None:
    os.write(fd, (1).to_bytes(8, "little"))


def _echo(rig: Rig, q: int, data: bytes) -> None:
    head, out = rig.submit(q, [data], [len(data)])
    [(got, written)] = rig.wait_used(q, 1)
    assert (got, rig.output(out, written)) == (head, data)


def test_eventfd_callback_runs_on_the_worker_of_its_queue(sock: str, no_fd_leak: None) -> None:
    dev = Watcher()
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        dev.watch(efd, dev.on_eventfd, queue=1)
        with Daemon(dev, sock, workers=2).run_in_thread(), Rig(sock, num_queues=2) as rig:
            _echo(rig, 1, b"queue one")
            _signal(efd)
            [(fd, data, thread)] = dev.wait_calls(1)
            assert (fd, int.from_bytes(data, "little")) == (efd, 1)
            assert dev.queue_threads[1] == {thread}
            _echo(rig, 0, b"queue zero")
            assert dev.queue_threads[0] != {thread}
    finally:
        os.close(efd)


def test_socket_callback_until_unwatch(sock: str) -> None:
    dev = Watcher()
    ours, theirs = socket.socketpair()
    try:
        with Daemon(dev, sock).run_in_thread(), Rig(sock, num_queues=2) as rig:
            dev.watch(ours.fileno(), dev.on_socket)  # while served: live at once
            theirs.sendall(b"first")
            assert [c[1] for c in dev.wait_calls(1)] == [b"first"]
            dev.unwatch(ours.fileno())
            dev.unwatch(ours.fileno())  # not watched any more: nothing to do
            theirs.sendall(b"second")
            time.sleep(0.2)
            assert len(dev.calls) == 1
            assert ours.recv(16) == b"second"
            _echo(rig, 0, b"still served")
    finally:
        ours.close()
        theirs.close()


def test_a_raising_callback_loses_its_watch_and_nothing_else(
    sock: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "pyvhost.daemon")
    dev = Watcher()
    bad = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    good = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    raised = threading.Event()

    def explode(fd: int) -> None:
        os.read(fd, 8)
        raised.set()
        raise RuntimeError("callback bug on purpose")

    try:
        dev.watch(bad, explode)
        dev.watch(good, dev.on_eventfd)
        with Daemon(dev, sock).run_in_thread(), Rig(sock, num_queues=2) as rig:
            _signal(bad)
            assert raised.wait(5)
            deadline = time.monotonic() + 5
            while not any("watch removed" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            raised.clear()
            _signal(bad)
            _signal(good)
            assert [c[0] for c in dev.wait_calls(1)] == [good]
            assert not raised.wait(0.2)
            _echo(rig, 0, b"daemon lives")
            assert rig.fe is not None
            assert rig.fe.get_queue_num() == 2
            dev.watch(bad, dev.on_eventfd)  # forgotten by the device too: may be watched again
            assert [c[0] for c in dev.wait_calls(2)] == [good, bad]  # the pending signal
    finally:
        os.close(bad)
        os.close(good)


def test_watches_are_served_only_while_a_front_end_is_connected(sock: str) -> None:
    dev = Watcher()
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        dev.watch(efd, dev.on_eventfd)
        with Daemon(dev, sock).run_in_thread():
            _signal(efd)
            time.sleep(0.2)
            assert dev.calls == []  # no front-end yet
            with Rig(sock, num_queues=2):
                assert len(dev.wait_calls(1)) == 1
            deadline = time.monotonic() + 5
            while any(t.name.startswith("Watcher-worker") for t in threading.enumerate()):
                assert time.monotonic() < deadline  # the daemon idles once the watch is gone
                time.sleep(0.01)
            _signal(efd)
            time.sleep(0.2)
            assert len(dev.calls) == 1  # front-end gone: the watch is not served
            with Rig(sock, num_queues=2):
                assert len(dev.wait_calls(2)) == 2  # the next one serves it again
    finally:
        os.close(efd)


def test_watch_arguments_are_checked() -> None:
    dev = Watcher()
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with pytest.raises(ValueError, match=r"queue 2 out of range \(device has 2 queues\)"):
            dev.watch(efd, dev.on_eventfd, queue=2)
        dev.watch(efd, dev.on_eventfd)
        with pytest.raises(ValueError, match=f"fd {efd} is already watched"):
            dev.watch(efd, dev.on_eventfd)
    finally:
        os.close(efd)


class OneWorker(Watcher):
    def worker_for_queue(self, index: int, workers: int) -> int:
        return workers - 1


def test_worker_for_queue_chooses_the_thread(sock: str) -> None:
    dev = OneWorker()
    with Daemon(dev, sock, workers=2).run_in_thread(), Rig(sock, num_queues=2) as rig:
        for q in (0, 1):
            _echo(rig, q, b"x")
    assert dev.queue_threads[0] == dev.queue_threads[1]
    [name] = dev.queue_threads[0]
    assert name.endswith("-worker1")


class Wrong(Watcher):
    def worker_for_queue(self, index: int, workers: int) -> int:
        return index + workers


def test_worker_for_queue_out_of_range_is_refused(
    sock: str, caplog: pytest.LogCaptureFixture
) -> None:
    message = r"Wrong.worker_for_queue\(0, 2\) returned 2: not a worker index \(0..1\)"
    with EventLoop(2) as loop, pytest.raises(ValueError, match=message):
        DeviceAdapter(Wrong(), loop)
    caplog.set_level(logging.ERROR, "pyvhost.daemon")
    with Daemon(Wrong(), sock, workers=2).run_in_thread():
        fe = Frontend.connect(sock, 5)
        try:
            with pytest.raises((VhostError, OSError)):
                fe.get_features()
        finally:
            fe.close()
    assert any(
        "dropping the front-end" in r.getMessage() and "returned 2" in r.getMessage()
        for r in caplog.records
    )
