"""Busy polling (``poll_us``): after work a worker polls its rings with kicks suppressed, then
re-arms notifications; served through the hand-made front-end so every kick can be seen."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import pytest

from peers.qemu import short_tmp
from pyvhost.daemon import Daemon
from pyvhost.daemon.loop import EventLoop
from pyvhost.virtio.split import VRING_USED_F_NO_NOTIFY

from .rig import Rig, drain, readable
from .toy import Upper


@pytest.fixture
def sock() -> Iterator[str]:
    with short_tmp("pvh-poll-") as d:
        yield str(d / "vhost.sock")


def _busy(daemon: Daemon) -> bool:
    loop = daemon._loop
    assert isinstance(loop, EventLoop)
    return any(w.busy_until for w in loop._threads)


def _wait_idle(daemon: Daemon, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _busy(daemon):
        assert time.monotonic() < deadline, "the worker never stopped polling"
        time.sleep(0.005)


def _add(rig: Rig, q: int, text: bytes) -> tuple[int, list[tuple[int, int]]]:
    """A chain published without kicking (the caller decides)."""
    return rig.submit(q, [text], [len(text) + 8], kick=False)


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event-idx"])
def test_polled_ring_needs_no_kick_then_asks_for_one_again(sock: str, event_idx: bool) -> None:
    daemon = Daemon(Upper(), sock, poll_us=300_000)
    with daemon.run_in_thread(), Rig(sock, event_idx=event_idx) as rig:
        ring = rig.rings[0]
        head, out = rig.submit(0, [b"first"], [16])
        [(got, written)] = rig.wait_used(0, 1)
        assert (got, rig.output(out, written)) == (head, b"FIRST")
        # Within the window: the device polls, the driver is told not to kick.
        for i in range(3):
            head, out = _add(rig, 0, b"polled %d" % i)
            assert not rig.kick(0), "the device asked for a kick while polling its ring"
            [(got, written)] = rig.wait_used(0, 1)
            assert (got, rig.output(out, written)) == (head, b"POLLED %d" % i)
        # The window passes without work: notifications are on again, a kick is needed.
        _wait_idle(daemon)
        if not event_idx:
            assert not ring.driver._used[0] & VRING_USED_F_NO_NOTIFY
        head, out = _add(rig, 0, b"kicked")
        assert rig.kick(0), "after the poll window the device must ask for kicks again"
        [(got, written)] = rig.wait_used(0, 1)
        assert (got, rig.output(out, written)) == (head, b"KICKED")


def test_chain_added_as_the_window_closes_is_not_stranded(sock: str) -> None:
    """Many short windows: each re-arm re-checks the ring, so no chain waits for a kick that
    the driver, told not to kick, never sends."""
    daemon = Daemon(Upper(), sock, poll_us=200)
    with daemon.run_in_thread(), Rig(sock, event_idx=True) as rig:
        for i in range(200):
            head, out = _add(rig, 0, b"n%d" % i)
            rig.kick(0)
            if i % 7 == 0:
                time.sleep(0.0003)
            [(got, written)] = rig.wait_used(0, 1, timeout=5.0)
            assert (got, rig.output(out, written)) == (head, b"N%d" % i)


def test_disabled_ring_does_not_keep_the_worker_spinning(sock: str) -> None:
    daemon = Daemon(Upper(), sock, poll_us=20_000)
    with daemon.run_in_thread(), Rig(sock) as rig:
        assert rig.fe is not None
        rig.submit(0, [b"a"], [8])
        rig.wait_used(0, 1)
        rig.fe.set_vring_enable(0, False)
        head, out = _add(rig, 0, b"held")
        rig.kick(0, force=True)
        time.sleep(0.1)
        _wait_idle(daemon)
        assert rig.rings[0].driver.get_used() == []
        rig.fe.set_vring_enable(0, True)
        [(got, written)] = rig.wait_used(0, 1)
        assert (got, rig.output(out, written)) == (head, b"HELD")


def test_hostile_chain_found_by_polling_stops_only_its_queue(
    sock: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "pyvhost.daemon")
    daemon = Daemon(Upper(), sock, poll_us=1_000_000)
    with daemon.run_in_thread(), Rig(sock, num_queues=2) as rig:
        rig.submit(0, [b"a"], [8])
        rig.wait_used(0, 1)
        ring0 = rig.rings[0]
        ring0.driver.add([(0xDEAD_0000_0000, 64)], [])  # outside guest memory; no kick
        ring0.driver.publish()
        deadline = time.monotonic() + 5
        while not readable(ring0.err) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert drain(ring0.err) == 1
        assert any("queue 0 stopped" in r.getMessage() for r in caplog.records)
        head, out = rig.submit(1, [b"other"], [16])
        [(got, written)] = rig.wait_used(1, 1)
        assert (got, rig.output(out, written)) == (head, b"OTHER")


def test_stop_and_memory_change_while_polling(sock: str) -> None:
    """A memory region added and GET_VRING_BASE while the worker polls: answered, and the ring
    restarted on the new table is served again."""
    from pyvhost.user.messages import MemoryRegion
    from pyvhost.virtio.memory import GuestMemory

    daemon = Daemon(Upper(), sock, poll_us=5_000_000)
    with daemon.run_in_thread(), Rig(sock) as rig:
        assert rig.fe is not None
        rig.submit(0, [b"a"], [8])
        rig.wait_used(0, 1)
        deadline = time.monotonic() + 5
        while not _busy(daemon):  # set once the worker's round is over, just after the push
            assert time.monotonic() < deadline
            time.sleep(0.001)
        extra = GuestMemory.anonymous(1 << 16, guest_phys_addr=0x8000_0000)
        try:
            r = extra.regions[0]
            assert r.fd is not None
            region = MemoryRegion(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)
            rig.fe.add_mem_reg(region, r.fd)
            head, out = _add(rig, 0, b"after")
            rig.kick(0, force=True)
            [(got, written)] = rig.wait_used(0, 1)
            assert (got, rig.output(out, written)) == (head, b"AFTER")
            started = time.monotonic()
            assert rig.fe.get_vring_base(0) == rig.rings[0].driver.avail_idx
            assert time.monotonic() - started < 2.5, "GET_VRING_BASE waited for the poll window"
        finally:
            extra.close()


def test_poll_window_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="poll_us"):
        EventLoop(poll_us=-1)


class _RacingQueue:
    """A ring whose driver adds a chain exactly while notifications are being re-enabled:
    told not to kick at that moment, it never will, so the re-arm must look again itself."""

    def __init__(self) -> None:
        self.pending = 1
        self.race = True
        self.handled = 0
        self.in_flight = 0

    def recover_inflight(self) -> list[object]:
        return []

    def disable_notifications(self) -> None:
        pass

    def enable_notifications(self) -> bool:
        if self.race:
            self.race = False
            self.pending += 1
        return self.pending > 0

    def needs_notification(self) -> bool:
        return False

    def has_available(self) -> bool:
        return self.pending > 0


class _Owner:
    name = "racing"

    def handle_queue(self, index: int, queue: _RacingQueue, mem: object) -> None:
        queue.handled += queue.pending
        queue.pending = 0


def test_rearm_serves_a_chain_added_while_notifications_come_back_on() -> None:
    from pyvhost.user.device import VringNotifier

    queue = _RacingQueue()
    loop = EventLoop(poll_us=2_000)
    notifier = VringNotifier(0)
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    notifier.set_kick_fd(kick)  # never written: only polling and the re-arm can find work
    owner = _Owner()
    try:
        loop.add_queue(owner, 0, queue, notifier, None)  # type: ignore[arg-type]
        loop.set_enabled(owner, 0, True)  # type: ignore[arg-type]
        deadline = time.monotonic() + 5
        while queue.handled < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert queue.handled == 2, "the chain added during the re-arm was stranded"
    finally:
        loop.stop()
        notifier.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_polling_on_both_sides_needs_neither_kicks_nor_calls(sock: str, packed: bool) -> None:
    """A DriverSession with ``poll_us`` against a polling daemon: requests complete with every
    byte right while the device signals almost no calls."""

    from pyvhost.daemon.device import DEFAULT_RING_FEATURES
    from pyvhost.driver.session import DriverSession
    from pyvhost.virtio import features as vf

    class AnyRing(Upper):
        ring_features = DEFAULT_RING_FEATURES | 1 << vf.F_RING_PACKED

    daemon = Daemon(AnyRing(), sock, poll_us=500_000)
    with (
        daemon.run_in_thread(),
        DriverSession.connect(sock, packed=packed, queue_size=16) as session,
    ):
        session.poll_us = 500_000
        for i in range(50):
            text = b"request %d" % i
            src, dst = session.alloc(len(text)), session.alloc(32)
            session.view(src, len(text))[:] = text
            token = session.submit(0, [(src, len(text))], [(dst, 32)])
            session.kick(0)
            [(got, written)] = session.wait(0, timeout=10)
            assert got == token
            assert bytes(session.view(dst, written)) == text.upper()
            session.free(src)
            session.free(dst)
        assert session.notifications(0) <= 2, "the device called a polling driver"
