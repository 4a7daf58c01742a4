"""Hooks a net device needs from the framework: a queue that waits for input of its own
(``handle_queue`` returning True, ``schedule``), ``queue_enabled``, SEND_RARP and NET_SET_MTU."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator

import pytest

from peers.qemu import short_tmp
from pyvhost.daemon import Daemon, Device
from pyvhost.errors import ReplyError
from pyvhost.user.messages import ProtocolFeature
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.queue import DeviceQueue

from .rig import Rig

PF = ProtocolFeature


@pytest.fixture
def sock() -> Iterator[str]:
    with short_tmp("pvh-sched-") as d:
        yield str(d / "vhost.sock")


class Feeder(Device):
    """Queue 0 takes a chain only when it has a message to put in it, as a receive queue does."""

    num_queues = 2
    queue_size = 64
    extra_protocol_features = 1 << PF.RARP | 1 << PF.MTU

    def __init__(self) -> None:
        self.pending: deque[bytes] = deque()
        self.rounds = 0
        self.enabled: list[tuple[int, bool]] = []
        self.rarps: list[bytes] = []
        self.mtus: list[int] = []

    def handle_queue(self, index: int, queue: DeviceQueue, mem: GuestMemory) -> bool | None:
        self.rounds += 1
        while self.pending:
            chain = queue.pop()
            if chain is None:
                return None  # starved: kicks on, the loop re-checks
            queue.push(chain.head, chain.write_at(0, self.pending.popleft()))
        return True

    def feed(self, message: bytes) -> None:
        self.pending.append(message)
        self.schedule(0)

    def queue_enabled(self, index: int, enabled: bool) -> None:
        self.enabled.append((index, enabled))

    def send_rarp(self, mac: bytes) -> None:
        self.rarps.append(mac)

    def net_set_mtu(self, mtu: int) -> None:
        self.mtus.append(mtu)


def test_waiting_queue_keeps_its_chains_without_spinning(sock: str) -> None:
    dev = Feeder()
    with Daemon(dev, sock).run_in_thread(), Rig(sock, num_queues=2) as rig:
        heads = [rig.submit(0, [], [16])[0] for _ in range(3)]
        time.sleep(0.3)
        assert rig.rings[0].driver.get_used() == []
        assert dev.rounds < 10  # woken by the start and the kicks, not looping on the chains
        dev.feed(b"first")
        [(head, written)] = rig.wait_used(0, 1)
        assert (head, written) == (heads[0], 5)
        dev.feed(b"second")
        dev.feed(b"third")
        assert [h for h, _ in rig.wait_used(0, 2)] == heads[1:]


def test_starved_queue_resumes_when_the_driver_posts(sock: str) -> None:
    dev = Feeder()
    with Daemon(dev, sock).run_in_thread(), Rig(sock, num_queues=2) as rig:
        dev.feed(b"early")
        time.sleep(0.2)  # no chain yet: the message waits, kicks are on
        head, out = rig.submit(0, [], [16])
        [(got, written)] = rig.wait_used(0, 1)
        assert (got, rig.output(out, written)) == (head, b"early")


def test_schedule_without_a_front_end_is_a_no_op() -> None:
    dev = Feeder()
    dev.schedule(0)
    dev.feed(b"kept")
    assert list(dev.pending) == [b"kept"]


def test_enable_rarp_and_mtu_reach_the_device(sock: str) -> None:
    dev = Feeder()
    with Daemon(dev, sock).run_in_thread(), Rig(sock, num_queues=2) as rig:
        assert rig.fe is not None
        rig.fe.set_vring_enable(1, False)
        rig.fe.send_rarp(bytes.fromhex("525400123456"))
        rig.fe.net_set_mtu(9000)
        rig.fe.set_vring_enable(1, True)
        deadline = time.monotonic() + 5
        while (1, True) not in dev.enabled[2:] and time.monotonic() < deadline:
            time.sleep(0.01)
    assert (1, False) in dev.enabled and dev.enabled[-1] == (1, True)
    assert dev.rarps == [bytes.fromhex("525400123456")]
    assert dev.mtus == [9000]


class Plain(Device):
    num_queues = 1
    extra_protocol_features = 1 << PF.RARP | 1 << PF.MTU

    def handle_queue(self, index: int, queue: DeviceQueue, mem: GuestMemory) -> None:
        return None


def test_rarp_and_mtu_are_refused_by_default(sock: str, caplog: pytest.LogCaptureFixture) -> None:
    with Daemon(Plain(), sock).run_in_thread(), Rig(sock) as rig:
        assert rig.fe is not None
        with pytest.raises(ReplyError, match="SEND_RARP"):
            rig.fe.send_rarp(bytes(6))
        with pytest.raises(ReplyError, match="NET_SET_MTU"):
            rig.fe.net_set_mtu(1500)
    assert "SEND_RARP: not supported" in caplog.text
    assert "NET_SET_MTU: not supported" in caplog.text


def test_schedule_from_another_thread_while_serving(sock: str) -> None:
    dev = Feeder()
    with Daemon(dev, sock).run_in_thread(), Rig(sock, num_queues=2) as rig:
        for _ in range(12):
            rig.submit(0, [], [8])

        def feed_all() -> None:
            for i in range(12):
                dev.feed(b"%d" % i)

        feeder = threading.Thread(target=feed_all)
        feeder.start()
        feeder.join()
        assert len(rig.wait_used(0, 12)) == 12
