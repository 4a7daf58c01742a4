"""The framework's event loop with a toy device, driven through a hand-made front-end."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.qemu import short_tmp
from pyvhost.daemon import Daemon, Device
from pyvhost.daemon.device import DEFAULT_RING_FEATURES
from pyvhost.errors import ReplyError
from pyvhost.user.channel import BackendRequestHandler
from pyvhost.user.messages import ProtocolFeature
from pyvhost.virtio import features as vf
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.queue import DeviceQueue
from pyvhost.virtio.split import VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY

from .rig import Rig, drain, readable
from .toy import Upper

PF = ProtocolFeature


@pytest.fixture
def sock() -> Iterator[str]:
    with short_tmp("pvh-loop-") as d:
        yield str(d / "vhost.sock")


def _serve(device: Device, path: str, workers: int = 1) -> Daemon:
    return Daemon(device, path, workers=workers)


def test_requests_on_every_queue_are_processed(sock: str, no_fd_leak: None) -> None:
    dev = Upper()
    with _serve(dev, sock).run_in_thread(), Rig(sock, num_queues=2) as rig:
        subs = {q: rig.submit(q, [f"hello {q}".encode()], [32]) for q in (0, 1)}
        for q, (head, out) in subs.items():
            [(got_head, written)] = rig.wait_used(q, 1)
            assert got_head == head
            assert rig.output(out, written) == f"HELLO {q}".encode()
    assert sorted(dev.handled) == [(0, b"hello 0"), (1, b"hello 1")]


def test_many_chains_split_over_pieces_and_indirect(sock: str) -> None:
    with _serve(Upper(), sock).run_in_thread(), Rig(sock, qsize=16) as rig:
        expected: dict[int, tuple[list[tuple[int, int]], bytes]] = {}
        for i in range(40):  # more than the ring holds: wait and reuse descriptors
            if rig.rings[0].driver.num_free < 3:
                for head, written in rig.wait_used(0, 1):
                    buffers, want = expected.pop(head)
                    assert rig.output(buffers, written) == want
            msg = f"chain number {i} ".encode() * 3
            head, out = rig.submit(0, [msg[:7], msg[7:]], [10, 100])
            expected[head] = (out, msg.upper())
        for head, written in rig.wait_used(0, len(expected)):
            buffers, want = expected.pop(head)
            assert rig.output(buffers, written) == want
        assert not expected


def test_call_written_only_when_the_driver_wants_it(sock: str) -> None:
    with _serve(Upper(), sock).run_in_thread(), Rig(sock) as rig:
        ring = rig.rings[0]
        rig.submit(0, [b"a"], [8])
        rig.wait_used(0, 1)
        time.sleep(0.05)
        assert drain(ring.call) == 1
        # Driver turns interrupts off (VRING_AVAIL_F_NO_INTERRUPT): work done, no call.
        ring.driver.disable_interrupts()
        assert ring.driver._avail[0] & VRING_AVAIL_F_NO_INTERRUPT
        rig.submit(0, [b"b"], [8])
        rig.wait_used(0, 1)
        time.sleep(0.05)
        assert not readable(ring.call)
        # After processing, the device asks for kicks again (NO_NOTIFY cleared).
        assert not ring.driver._used[0] & VRING_USED_F_NO_NOTIFY


def test_event_idx_call_follows_used_event(sock: str) -> None:
    with _serve(Upper(), sock).run_in_thread(), Rig(sock, event_idx=True) as rig:
        assert rig.fe is not None and rig.fe.features >> vf.F_RING_EVENT_IDX & 1
        ring = rig.rings[0]
        rig.submit(0, [b"a"], [8])
        rig.wait_used(0, 1)
        time.sleep(0.05)
        assert drain(ring.call) == 1
        # used_event far ahead: the device must not call for the next completion.
        ring.driver._avail[2 + rig.qsize] = 100
        rig.submit(0, [b"b"], [8])
        rig.wait_used(0, 1)
        time.sleep(0.05)
        assert not readable(ring.call)
        # used_event = the next used index: the completion that reaches it is signalled.
        ring.driver._avail[2 + rig.qsize] = ring.driver.last_used_idx
        rig.submit(0, [b"c"], [8])
        rig.wait_used(0, 1)
        time.sleep(0.05)
        assert drain(ring.call) == 1
        # EVENT_IDX kick suppression: avail_event tells the driver where to kick next.
        assert ring.driver._used[2 + 4 * rig.qsize] == ring.driver.avail_idx


def test_hostile_chain_stops_only_its_queue(sock: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "pyvhost.daemon")
    with _serve(Upper(), sock).run_in_thread(), Rig(sock, num_queues=2) as rig:
        ring0 = rig.rings[0]
        ring0.driver.add([(0xDEAD_0000_0000, 64)], [])  # outside guest memory
        ring0.driver.publish()
        rig.kick(0, force=True)
        deadline = time.monotonic() + 5
        while not readable(ring0.err) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert drain(ring0.err) == 1
        assert any("queue 0 stopped" in r.getMessage() for r in caplog.records)
        # Queue 0 no longer serves; queue 1 and the connection carry on.
        rig.submit(0, [b"ignored"], [8], kick=False)
        rig.kick(0, force=True)
        head, out = rig.submit(1, [b"still here"], [16])
        [(got, written)] = rig.wait_used(1, 1)
        assert (got, rig.output(out, written)) == (head, b"STILL HERE")
        assert rig.rings[0].driver.get_used() == []
        assert rig.fe is not None
        assert rig.fe.get_features() & 1 << vf.F_VERSION_1


def test_device_exception_stops_its_queue_and_signals_err(
    sock: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "pyvhost.daemon")
    with _serve(Upper(), sock).run_in_thread(), Rig(sock, num_queues=2) as rig:
        rig.submit(1, [b"boom"], [8])
        deadline = time.monotonic() + 5
        while not readable(rig.rings[1].err) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert drain(rig.rings[1].err) == 1
        assert any("queue 1 stopped: device error" in r.getMessage() for r in caplog.records)
        head, _out = rig.submit(0, [b"fine"], [8])
        assert rig.wait_used(0, 1)[0][0] == head


def test_disabled_ring_holds_its_chains_until_enabled(sock: str) -> None:
    with _serve(Upper(), sock).run_in_thread(), Rig(sock) as rig:
        assert rig.fe is not None
        rig.fe.set_vring_enable(0, False)
        head, out = rig.submit(0, [b"later"], [8], kick=False)
        rig.kick(0, force=True)
        time.sleep(0.1)
        assert rig.rings[0].driver.get_used() == []
        rig.fe.set_vring_enable(0, True)
        [(got, written)] = rig.wait_used(0, 1)
        assert (got, rig.output(out, written)) == (head, b"LATER")


def test_two_workers_serve_queues_in_their_own_threads(sock: str) -> None:
    dev = Upper()
    with _serve(dev, sock, workers=2).run_in_thread(), Rig(sock, num_queues=2) as rig:
        for _ in range(3):
            for q in (0, 1):
                rig.submit(q, [b"x"], [4])
            for q in (0, 1):
                rig.wait_used(q, 1)
    assert len(dev.threads[0]) == len(dev.threads[1]) == 1
    assert dev.threads[0] != dev.threads[1]


def test_memory_change_while_running_keeps_serving(sock: str) -> None:
    from pyvhost.user.messages import MemoryRegion
    from pyvhost.virtio.memory import GuestMemory

    with _serve(Upper(), sock).run_in_thread(), Rig(sock) as rig:
        rig.submit(0, [b"one"], [8])
        rig.wait_used(0, 1)
        extra = GuestMemory.anonymous(1 << 16, guest_phys_addr=0x8000_0000)
        try:
            r = extra.regions[0]
            assert rig.fe is not None and r.fd is not None
            region = MemoryRegion(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)
            rig.fe.add_mem_reg(region, r.fd)
            head, out = rig.submit(0, [b"two"], [8])
            [(got, written)] = rig.wait_used(0, 1)
            assert (got, rig.output(out, written)) == (head, b"TWO")
        finally:
            extra.close()


def test_config_status_and_features(sock: str) -> None:
    dev = Upper()
    with _serve(dev, sock).run_in_thread(), Rig(sock) as rig:
        fe = rig.fe
        assert fe is not None
        assert fe.offered_features is not None
        assert fe.offered_features & DEFAULT_RING_FEATURES == DEFAULT_RING_FEATURES
        offered_pf = fe.offered_protocol_features
        assert offered_pf is not None
        for bit in (
            PF.REPLY_ACK, PF.CONFIG, PF.MQ, PF.CONFIGURE_MEM_SLOTS, PF.INFLIGHT_SHMFD,
            PF.LOG_SHMFD, PF.RESET_DEVICE, PF.STATUS, PF.BACKEND_REQ,
        ):  # fmt: skip
            assert offered_pf >> bit & 1, bit.name
        assert fe.get_queue_num() == 2
        assert fe.get_config(0, 15) == b"toy-config-0123"
        assert fe.get_config(4, 6) == b"config"
        fe.set_config(4, b"CONF")
        assert fe.get_config(0, 15) == b"toy-CONFig-0123"
        with pytest.raises(ReplyError):
            fe.set_config(0, b"x")  # the device refuses: read-only part
        with pytest.raises(ReplyError):
            fe.get_config(10, 10)  # beyond the config space: error reply
        fe.set_status(0x0F)
        assert fe.get_status() == 0x0F
    assert dev.statuses == [0x0F]


def test_notify_config_change_reaches_the_front_end(sock: str) -> None:
    changed = threading.Event()

    def on_change() -> int:
        changed.set()
        return 0

    dev = Upper()
    handler = BackendRequestHandler(on_config_change=on_change)
    with _serve(dev, sock).run_in_thread(), Rig(sock, backend_handler=handler):
        deadline = time.monotonic() + 5
        while dev.channel is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dev.notify_config_change()
        assert changed.wait(5)


def test_front_end_leaves_and_the_next_one_is_served(
    sock: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pyvhost")
    dev = Upper()
    with _serve(dev, sock).run_in_thread() as daemon:
        with Rig(sock) as rig:
            rig.submit(0, [b"first"], [8])
            rig.wait_used(0, 1)
        with Rig(sock) as rig:
            head, out = rig.submit(0, [b"second"], [8])
            [(got, written)] = rig.wait_used(0, 1)
            assert (got, rig.output(out, written)) == (head, b"SECOND")
        deadline = time.monotonic() + 5
        while dev.resets < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert daemon.connections == 2
    assert dev.resets >= 2
    messages = [r.getMessage() for r in caplog.records]
    assert sum("front-end connected" in m for m in messages) == 2
    assert sum("front-end left" in m for m in messages) == 2
    assert not Path(sock).exists()


def test_factory_makes_a_device_per_connection(sock: str) -> None:
    made: list[Upper] = []

    def factory() -> Upper:
        made.append(Upper())
        return made[-1]

    with Daemon(factory, sock).run_in_thread():
        for word in (b"one", b"two"):
            with Rig(sock) as rig:
                rig.submit(0, [word], [8])
                rig.wait_used(0, 1)
    assert [d.handled for d in made] == [[(0, b"one")], [(0, b"two")]]


def test_client_mode_connects_and_reconnects(no_fd_leak: None) -> None:
    from pyvhost.user.connection import Listener
    from pyvhost.user.frontend import Frontend

    with short_tmp("pvh-cli-") as d:
        path = str(d / "fe.sock")
        listener = Listener(path)
        try:
            with Daemon(Upper(), path, client=True).run_in_thread() as daemon:
                for _ in range(2):
                    fe = Frontend.accept(listener, 10)
                    try:
                        assert fe.get_features() & 1 << vf.F_VERSION_1
                    finally:
                        fe.close()
                deadline = time.monotonic() + 5
                while daemon.connections < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                # the daemon may already be connecting again (the listener's backlog accepts)
                assert daemon.connections >= 2
        finally:
            listener.close()


def test_client_mode_waits_for_the_front_end_to_appear() -> None:
    from pyvhost.user.connection import Listener
    from pyvhost.user.frontend import Frontend

    with short_tmp("pvh-cli-") as d:
        path = str(d / "fe.sock")
        with Daemon(Upper(), path, client=True).run_in_thread():
            time.sleep(0.5)  # nothing listens yet: the daemon keeps retrying
            with Listener(path) as listener:
                fe = Frontend.accept(listener, 10)
                try:
                    assert fe.get_features() & 1 << vf.F_VERSION_1
                finally:
                    fe.close()


def test_shutdown_while_a_front_end_is_connected(sock: str) -> None:
    daemon = Daemon(Upper(), sock)
    with daemon.run_in_thread(), Rig(sock) as rig:
        rig.submit(0, [b"x"], [4])
        rig.wait_used(0, 1)
        t0 = time.monotonic()
        daemon.shutdown()
        deadline = t0 + 5
        while Path(sock).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not Path(sock).exists()
        assert daemon.stopping


def test_worker_count_must_be_positive() -> None:
    from pyvhost.daemon.loop import EventLoop

    with pytest.raises(ValueError, match="workers"):
        EventLoop(0)


def test_handle_chain_is_required_unless_handle_queue_is_overridden(sock: str) -> None:
    class Lazy(Device):
        pass

    with Daemon(Lazy(), sock).run_in_thread(), Rig(sock) as rig:
        rig.submit(0, [b"x"], [4])
        deadline = time.monotonic() + 5
        while not readable(rig.rings[0].err) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert drain(rig.rings[0].err) == 1


def test_dirty_log_marks_what_the_device_wrote(sock: str) -> None:
    """LOG_SHMFD without effort: chain writes and used-ring updates land in the dirty log."""
    from pyvhost.user.messages import VringAddr
    from pyvhost.virtio.memory import DirtyLog
    from pyvhost.virtio.split import split_layout

    from .rig import GPA, MEM_SIZE

    log_size = (GPA + MEM_SIZE) // 4096 // 8
    dirty, log_fd = DirtyLog.anonymous(log_size)
    try:
        with _serve(Upper(), sock).run_in_thread(), Rig(sock) as rig:
            fe = rig.fe
            assert fe is not None
            fe.set_features(fe.features | 1 << vf.F_LOG_ALL)
            fe.set_log_base(log_size, 0, log_fd)
            _, _, used, _ = split_layout(rig.qsize, GPA)
            old = rig.rings[0].addr
            fe.set_vring_addr(
                VringAddr(0, 1, old.desc_user_addr, old.used_user_addr, old.avail_user_addr, used)
            )
            rig.alloc(3 * 4096)  # the reply buffer lands on a page of its own
            head, out = rig.submit(0, [b"log me"], [4096 * 2])
            [(got, written)] = rig.wait_used(0, 1)
            assert (got, written) == (head, 6)
            pages = set(dirty.dirty_pages())
            assert out[0][0] // 4096 in pages  # the page the device wrote
            assert (out[0][0] + 4096) // 4096 not in pages  # written 6 bytes: one page only
            assert used // 4096 in pages  # the used ring
    finally:
        dirty.close()
        import os

        os.close(log_fd)


def test_reset_device_stops_the_rings_and_calls_on_reset(sock: str) -> None:
    dev = Upper()
    with _serve(dev, sock).run_in_thread(), Rig(sock) as rig:
        rig.submit(0, [b"x"], [4])
        rig.wait_used(0, 1)
        assert rig.fe is not None
        rig.fe.reset_device()
        assert dev.resets == 1
        assert dev.acked_features == 0
        rig.submit(0, [b"y"], [4])
        time.sleep(0.1)
        assert rig.rings[0].driver.get_used() == []  # the ring is gone with the reset


class LateCompleter(Device):
    """Pops chains in handle_queue and completes them later from a thread of its own."""

    num_queues = 1
    queue_size = 16
    delay = 0.4

    def __init__(self) -> None:
        self.completed_at: list[float] = []
        self.popped = threading.Event()

    def handle_queue(self, index: int, queue: DeviceQueue, mem: GuestMemory) -> None:
        chains = queue.pop_batch(16)
        if not chains:
            return
        self.popped.set()

        def complete() -> None:
            time.sleep(self.delay)
            queue.push_batch([(c.head, 0) for c in chains])
            self.completed_at.append(time.monotonic())
            self.notify(index)

        threading.Thread(target=complete, daemon=True).start()


def test_get_vring_base_waits_for_chains_the_device_still_holds(sock: str) -> None:
    """The spec: GET_VRING_BASE replies once in-flight requests are done; the base then says
    where the device stopped and the used ring holds every completion."""
    dev = LateCompleter()
    with _serve(dev, sock).run_in_thread(), Rig(sock) as rig:
        for _ in range(3):
            rig.submit(0, [b"x"], [], kick=False)
        rig.kick(0, force=True)
        assert dev.popped.wait(5)
        assert not dev.completed_at
        assert rig.fe is not None
        base = rig.fe.get_vring_base(0)
        replied = time.monotonic()
        assert dev.completed_at and dev.completed_at[0] <= replied
        assert base == 3
        assert len(rig.rings[0].driver.get_used()) == 3
