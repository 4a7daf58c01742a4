"""A queue that waits for input of its own: ``handle_queue`` returning True leaves the driver's
chains in the ring without the loop spinning on them, and ``Device.schedule`` brings it back."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator

import pytest

from peers.qemu import short_tmp
from pyvhost.daemon import Daemon, Device
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.queue import DeviceQueue

from .rig import Rig


@pytest.fixture
def sock() -> Iterator[str]:
    with short_tmp("pvh-wait-") as d:
        yield str(d / "vhost.sock")


class Mailbox(Device):
    """Queue 0 takes a chain only when a message waits for it, as a receive queue does."""

    num_queues = 1
    queue_size = 64

    def __init__(self) -> None:
        self.messages: deque[bytes] = deque()
        self.rounds = 0
        self.lock = threading.Lock()

    def handle_queue(self, index: int, queue: DeviceQueue, mem: GuestMemory) -> bool | None:
        with self.lock:
            self.rounds += 1
            while self.messages:
                chain = queue.pop()
                if chain is None:
                    return None
                queue.push(chain.head, chain.write_at(0, self.messages.popleft()))
        return True

    def post(self, message: bytes) -> None:
        with self.lock:
            self.messages.append(message)
        self.schedule(0)


def test_chains_wait_for_a_message_without_spinning(sock: str) -> None:
    dev = Mailbox()
    with Daemon(dev, sock).run_in_thread(), Rig(sock) as rig:
        heads = [rig.submit(0, [], [16])[0] for _ in range(3)]
        time.sleep(0.3)
        assert rig.rings[0].driver.get_used() == []
        assert dev.rounds < 10
        dev.post(b"one")
        assert rig.wait_used(0, 1) == [(heads[0], 3)]
        dev.post(b"two")
        dev.post(b"three")
        assert [head for head, _ in rig.wait_used(0, 2)] == heads[1:]


def test_a_message_waits_for_a_chain(sock: str) -> None:
    dev = Mailbox()
    with Daemon(dev, sock).run_in_thread(), Rig(sock) as rig:
        dev.post(b"early")
        time.sleep(0.2)
        head, out = rig.submit(0, [], [16])
        [(got, written)] = rig.wait_used(0, 1)
        assert (got, rig.output(out, written)) == (head, b"early")


def test_schedule_without_a_front_end_does_nothing() -> None:
    dev = Mailbox()
    dev.post(b"kept")
    assert list(dev.messages) == [b"kept"]
