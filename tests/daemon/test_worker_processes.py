"""Queues served by worker processes (``worker_mode="process"``), side by side with threads.

Each test runs in both modes where the front-end's view must be the same; the process-only ones
kill workers, count them, and check what a device without ``process_spec`` gets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.qemu import PeerProcess, short_tmp
from pyvhost.daemon import Daemon, Device
from pyvhost.daemon.procloop import RESPAWN_LIMIT, ProcessLoop
from pyvhost.errors import VhostError
from pyvhost.virtio import features as vf

from .rig import GPA, MEM_SIZE, Rig, drain, readable
from .toy import LateUpper, Upper

TOY = str(Path(__file__).with_name("toy.py"))
MODES = ["thread", "process"]


@pytest.fixture
def sock() -> Iterator[str]:
    with short_tmp("pvh-wp-") as d:
        yield str(d / "vhost.sock")


def children(pid: int | str = "self") -> list[int]:
    """The live child processes of ``pid`` (all its threads'), zombies left out."""
    found: list[int] = []
    task_dir = f"/proc/{pid}/task"
    for tid in os.listdir(task_dir):
        with contextlib.suppress(OSError), open(f"{task_dir}/{tid}/children") as f:
            found += [int(c) for c in f.read().split()]
    alive = []
    for child in found:
        with contextlib.suppress(OSError), open(f"/proc/{child}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(child)
    return alive


def wait_for(cond: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return bool(cond())  # type: ignore[operator]


def serve(device: Device, path: str, mode: str, workers: int = 2) -> Daemon:
    return Daemon(device, path, workers=workers, worker_mode=mode)


def worker_pids(daemon: Daemon) -> list[int]:
    loop = daemon._loop
    return loop.worker_pids() if isinstance(loop, ProcessLoop) else []


@pytest.mark.parametrize("mode", MODES)
def test_every_queue_served_and_nothing_left_behind(sock: str, mode: str, no_fd_leak: None) -> None:
    before = children()
    with serve(Upper(), sock, mode).run_in_thread() as daemon:
        for round_no in range(2):
            with Rig(sock, num_queues=2) as rig:
                subs = {q: rig.submit(q, [f"hello {q} {round_no}".encode()], [32]) for q in (0, 1)}
                for q, (head, out) in subs.items():
                    [(got, written)] = rig.wait_used(q, 1)
                    assert (got, rig.output(out, written)) == (
                        head,
                        f"HELLO {q} {round_no}".encode(),
                    )
                pids = worker_pids(daemon)
                assert len(pids) == (2 if mode == "process" else 0)
                assert set(pids) <= set(children())
            # between front-ends: no worker process, no fd (no_fd_leak checks the end)
            assert wait_for(lambda: children() == before), children()
    assert children() == before


@pytest.mark.parametrize("mode", MODES)
def test_hostile_chain_stops_only_its_queue(
    sock: str, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pyvhost")
    with serve(Upper(), sock, mode).run_in_thread(), Rig(sock, num_queues=2) as rig:
        head, out = rig.submit(0, [b"before"], [16])
        assert rig.wait_used(0, 1) == [(head, 6)]
        ring0 = rig.rings[0]
        ring0.driver.add([(0xDEAD_0000_0000, 64)], [])  # outside guest memory
        ring0.driver.publish()
        rig.kick(0, force=True)
        assert wait_for(lambda: readable(ring0.err), 5)
        assert drain(ring0.err) == 1
        # Queue 0 no longer serves; queue 1 and the connection carry on.
        rig.submit(0, [b"ignored"], [8], kick=False)
        rig.kick(0, force=True)
        head, out = rig.submit(1, [b"still here"], [16])
        [(got, written)] = rig.wait_used(1, 1)
        assert (got, rig.output(out, written)) == (head, b"STILL HERE")
        assert rig.rings[0].driver.get_used() == []
        assert rig.fe is not None
        # GET_VRING_BASE of the failed queue: where it stopped (the bad chain not taken)
        assert rig.fe.get_vring_base(0) == 1
        assert rig.fe.get_features() & 1 << vf.F_VERSION_1
        if mode == "process":
            assert any("stopped as broken" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", MODES)
def test_device_exception_stops_its_queue_and_signals_err(sock: str, mode: str) -> None:
    with serve(Upper(), sock, mode).run_in_thread(), Rig(sock, num_queues=2) as rig:
        rig.submit(1, [b"boom"], [8])
        assert wait_for(lambda: readable(rig.rings[1].err), 5)
        assert drain(rig.rings[1].err) == 1
        head, _out = rig.submit(0, [b"fine"], [8])
        assert rig.wait_used(0, 1)[0][0] == head


@pytest.mark.parametrize("mode", MODES)
def test_malformed_get_vring_base_is_refused_and_serving_goes_on(sock: str, mode: str) -> None:
    with serve(Upper(), sock, mode).run_in_thread() as daemon:
        with Rig(sock, num_queues=2) as rig:
            assert rig.fe is not None
            with pytest.raises((VhostError, OSError)):
                rig.fe.get_vring_base(7)  # the device has 2 queues
            with contextlib.suppress(VhostError, OSError):  # the connection may have closed
                rig.submit(1, [b"next"], [8])
                rig.wait_used(1, 1, timeout=2)
        with Rig(sock, num_queues=2) as rig:  # the daemon serves the next front-end
            head, out = rig.submit(1, [b"after"], [8])
            [(got, written)] = rig.wait_used(1, 1)
            assert (got, rig.output(out, written)) == (head, b"AFTER")
        assert daemon.connections == 2


@pytest.mark.parametrize("mode", MODES)
def test_front_end_vanishing_mid_io(sock: str, mode: str) -> None:
    before = children()
    with serve(Upper(), sock, mode).run_in_thread():
        with Rig(sock, num_queues=2, qsize=64) as rig:
            for _ in range(30):  # 2 descriptors each: the rings are full
                for q in (0, 1):
                    rig.submit(q, [b"x" * 512], [512], kick=False)
            for q in (0, 1):
                rig.kick(q, force=True)
            assert rig.fe is not None
            rig.fe.close()  # gone without GET_VRING_BASE, chains in flight
            rig.fe = None
        with Rig(sock, num_queues=2) as rig:
            head, out = rig.submit(0, [b"again"], [8])
            [(got, written)] = rig.wait_used(0, 1)
            assert (got, rig.output(out, written)) == (head, b"AGAIN")
    assert wait_for(lambda: children() == before)


@pytest.mark.parametrize("mode", MODES)
def test_disabled_ring_holds_its_chains_until_enabled(sock: str, mode: str) -> None:
    with serve(Upper(), sock, mode).run_in_thread(), Rig(sock) as rig:
        assert rig.fe is not None
        rig.fe.set_vring_enable(0, False)
        head, out = rig.submit(0, [b"later"], [8], kick=False)
        rig.kick(0, force=True)
        time.sleep(0.1)
        assert rig.rings[0].driver.get_used() == []
        rig.fe.set_vring_enable(0, True)
        [(got, written)] = rig.wait_used(0, 1)
        assert (got, rig.output(out, written)) == (head, b"LATER")


@pytest.mark.parametrize("mode", MODES)
def test_memory_change_while_running_keeps_serving(sock: str, mode: str) -> None:
    from pyvhost.user.messages import MemoryRegion
    from pyvhost.virtio.memory import GuestMemory

    with serve(Upper(), sock, mode).run_in_thread(), Rig(sock, num_queues=2) as rig:
        rig.submit(0, [b"one"], [8])
        rig.wait_used(0, 1)
        extra = GuestMemory.anonymous(1 << 16, guest_phys_addr=0x8000_0000)
        try:
            r = extra.regions[0]
            assert rig.fe is not None and r.fd is not None
            region = MemoryRegion(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)
            rig.fe.add_mem_reg(region, r.fd)
            # a buffer in the new region: the workers mapped it too
            extra.write(0x8000_0000, b"in the new region")
            ring = rig.rings[1]
            head = ring.driver.add([(0x8000_0000, 17)], [(0x8000_1000, 32)])
            ring.driver.publish()
            rig.kick(1, force=True)
            [(got, written)] = rig.wait_used(1, 1)
            assert (got, extra.read(0x8000_1000, written)) == (head, b"IN THE NEW REGION")
            rig.fe.rem_mem_reg(region)
            head, out = rig.submit(0, [b"two"], [8])
            [(got, written)] = rig.wait_used(0, 1)
            assert (got, rig.output(out, written)) == (head, b"TWO")
        finally:
            extra.close()


@pytest.mark.parametrize("mode", MODES)
def test_dirty_log_marks_what_the_worker_wrote(sock: str, mode: str) -> None:
    from pyvhost.user.messages import VringAddr
    from pyvhost.virtio.memory import DirtyLog
    from pyvhost.virtio.split import split_layout

    log_size = (GPA + MEM_SIZE) // 4096 // 8
    dirty, log_fd = DirtyLog.anonymous(log_size)
    try:
        with serve(Upper(), sock, mode).run_in_thread(), Rig(sock) as rig:
            fe = rig.fe
            assert fe is not None
            fe.set_features(fe.features | 1 << vf.F_LOG_ALL)
            fe.set_log_base(log_size, 0, log_fd)
            _, _, used, _ = split_layout(rig.qsize, GPA)
            old = rig.rings[0].addr
            fe.set_vring_addr(
                VringAddr(0, 1, old.desc_user_addr, old.used_user_addr, old.avail_user_addr, used)
            )
            rig.alloc(3 * 4096)
            head, out = rig.submit(0, [b"log me"], [4096 * 2])
            [(got, written)] = rig.wait_used(0, 1)
            assert (got, written) == (head, 6)
            pages = set(dirty.dirty_pages())
            assert out[0][0] // 4096 in pages
            assert (out[0][0] + 4096) // 4096 not in pages
            assert used // 4096 in pages
    finally:
        dirty.close()
        os.close(log_fd)


@pytest.mark.parametrize("mode", MODES)
def test_reset_device_stops_the_rings(sock: str, mode: str) -> None:
    dev = Upper()
    with serve(dev, sock, mode).run_in_thread(), Rig(sock) as rig:
        rig.submit(0, [b"x"], [4])
        rig.wait_used(0, 1)
        assert rig.fe is not None
        rig.fe.reset_device()
        assert dev.resets == 1
        rig.submit(0, [b"y"], [4])
        time.sleep(0.1)
        assert rig.rings[0].driver.get_used() == []


@pytest.mark.parametrize("mode", MODES)
def test_get_vring_base_waits_for_chains_the_worker_still_holds(sock: str, mode: str) -> None:
    with serve(LateUpper(delay=0.4), sock, mode, workers=1).run_in_thread(), Rig(sock) as rig:
        for _ in range(3):
            rig.submit(0, [b"x"], [4], kick=False)
        rig.kick(0, force=True)
        time.sleep(0.1)  # popped, held for 0.4 s
        assert rig.rings[0].driver.get_used() == []
        assert rig.fe is not None
        assert rig.fe.get_vring_base(0) == 3
        assert len(rig.rings[0].driver.get_used()) == 3  # every completion before the reply


def test_device_without_process_spec_is_refused_at_start(sock: str) -> None:
    from pyvhost.testing import ConfigOnlyDevice

    class Plain(Device):
        pass

    with pytest.raises(ValueError, match="does not support worker processes"):
        Daemon(Plain(), sock, worker_mode="process")
    with pytest.raises(ValueError, match="does not support worker processes"):
        Daemon(Plain, sock, worker_mode="process")
    with pytest.raises(ValueError, match=r"not a pyvhost\.daemon\.Device"):
        Daemon(ConfigOnlyDevice(), sock, worker_mode="process")
    with pytest.raises(ValueError, match="worker_mode"):
        Daemon(Upper(), sock, worker_mode="fibers")


def test_serve_rng_in_process_mode_is_a_clear_error(sock: str) -> None:
    import subprocess

    argv = [sys.executable, "-m", "pyvhost", "serve", "rng", "--socket", sock]
    done = subprocess.run(
        [*argv, "--worker-mode", "process"], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "RngDevice does not support worker processes" in done.stderr
    assert not Path(sock).exists()


# -- workers that die ------------------------------------------------------------------------------


def _toy(sock: Path, workdir: Path, *args: str, name: str = "toy") -> PeerProcess:
    return PeerProcess(
        [sys.executable, TOY, str(sock), *args], workdir, name=name, timeout_s=90, socket=sock
    )


def _output(proc: PeerProcess, what: str, timeout: float = 20) -> bool:
    return wait_for(lambda: what in proc.stdout + proc.stderr, timeout)


def test_sigkilled_worker_is_replaced_and_redoes_its_chains_in_flight() -> None:
    """A worker killed with a chain in flight (completions out of order): a new worker takes its
    queue over on the same connection and redoes that chain from the inflight region, once, with
    no error signalled and nothing asked of the front-end; the other worker's queue serves on.
    After :data:`RESPAWN_LIMIT` replacements the queue fails instead (err eventfd) and the
    front-end's restart of it recovers as a restarted back-end does."""
    with short_tmp("pvh-wk-") as workdir:
        sock = workdir / "toy.sock"
        flag = workdir / "hung-once"
        daemon = _toy(sock, workdir, "--workers", "2", "--worker-mode", "process",
                      "--hang-once", str(flag))  # fmt: skip
        with daemon, Rig(str(sock), num_queues=2, inflight=True) as rig:
            subs = {}
            for w in (b"hang", b"bravo", b"charlie"):
                head, out = rig.submit(0, [w], [16], kick=False)
                subs[head] = (w, out)
            rig.kick(0, force=True)
            done = rig.wait_used(0, 2)
            assert _output(daemon, "hanging")
            pid = _daemon_pid(daemon)
            assert len(children(pid)) == 2
            victim = _worker_pid(daemon, 0)
            os.kill(victim, signal.SIGKILL)
            done += rig.wait_used(0, 1)  # "hang", redone by the new worker
            time.sleep(0.2)
            assert rig.rings[0].driver.get_used() == []  # nothing completed twice
            assert sorted(h for h, _ in done) == sorted(subs)
            for head, written in done:
                word, out = subs[head]
                assert rig.output(out, written) == word.upper()
            ring0 = rig.rings[0]
            assert not readable(ring0.err), "the front-end was told of an error"
            assert _output(daemon, "died (killed by SIGKILL)")
            assert _output(daemon, "queues [0] resume where their rings stopped")
            assert "1 in-flight requests recovered" in daemon.stderr
            replacement = _worker_pid(daemon, 0)
            assert replacement != victim and replacement in children(pid)
            assert len(children(pid)) == 2
            for q, word in ((0, b"delta"), (1, b"other")):
                _echoes(rig, q, word)

            # a worker that keeps dying is replaced RESPAWN_LIMIT times, then its queue fails
            for n in range(RESPAWN_LIMIT):
                victim = _worker_pid(daemon, 0)
                os.kill(victim, signal.SIGKILL)
                if n < RESPAWN_LIMIT - 1:
                    assert _output(daemon, f"replaced worker 0 (pid {victim})")
            assert wait_for(lambda: readable(ring0.err), 10)
            assert wait_for(lambda: victim not in children(pid) and len(children(pid)) == 1)
            assert _output(daemon, f"worker 0 died {RESPAWN_LIMIT + 1} times for this front-end")
            assert rig.fe is not None
            base = rig.fe.get_vring_base(0)
            assert base == 4  # the used index
            rig.fe.start_vring(0, rig.qsize, ring0.addr, base, ring0.kick, ring0.call)
            _echoes(rig, 0, b"foxtrot")


def test_a_worker_killed_while_it_replaces_another_is_replaced_too() -> None:
    with short_tmp("pvh-wk-") as workdir:
        sock = workdir / "toy.sock"
        daemon = _toy(sock, workdir, "--workers", "2", "--worker-mode", "process")
        with daemon, Rig(str(sock), num_queues=2, inflight=True) as rig:
            _echoes(rig, 0, b"alpha")
            first = _worker_pid(daemon, 0)
            os.kill(first, signal.SIGKILL)
            assert wait_for(lambda: _worker_pid(daemon, 0) != first, 10)
            second = _worker_pid(daemon, 0)
            os.kill(second, signal.SIGKILL)  # as it starts: before or while it takes queue 0 over
            assert wait_for(lambda: _worker_pid(daemon, 0) not in (first, second), 10)
            assert _output(daemon, f"worker 0 (pid {_worker_pid(daemon, 0)}) replaced worker 0")
            for word in (b"bravo", b"charlie"):
                _echoes(rig, 0, word)
            assert not readable(rig.rings[0].err)


def test_sigkilled_worker_without_an_inflight_region_fails_its_queues() -> None:
    """Without an inflight region which chains a dead worker completed is not known exactly: its
    queue fails (err eventfd, the reason logged), and the front-end's restart gets a new worker."""
    with short_tmp("pvh-wk-") as workdir:
        sock = workdir / "toy.sock"
        daemon = _toy(sock, workdir, "--workers", "2", "--worker-mode", "process")
        with daemon, Rig(str(sock), num_queues=2, inflight=False) as rig:
            _echoes(rig, 0, b"alpha")
            pid = _daemon_pid(daemon)
            victim = _worker_pid(daemon, 0)
            os.kill(victim, signal.SIGKILL)
            ring0 = rig.rings[0]
            assert wait_for(lambda: readable(ring0.err), 10)
            assert _output(daemon, "queues [0] have no inflight region")
            assert len(children(pid)) == 1
            _echoes(rig, 1, b"other")
            assert rig.fe is not None
            base = rig.fe.get_vring_base(0)
            assert base == 1
            rig.fe.start_vring(0, rig.qsize, ring0.addr, base, ring0.kick, ring0.call)
            _echoes(rig, 0, b"bravo")
            assert victim not in children(pid) and len(children(pid)) == 2


def test_a_replacement_that_fails_fails_the_queues(
    sock: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever goes wrong while replacing a dead worker, its queues are not left hanging: the
    front-end is told (err eventfd) and the reason logged."""

    def broken(self: ProcessLoop, dead: object) -> object:
        raise RuntimeError("replacement broken on purpose")

    monkeypatch.setattr(ProcessLoop, "_restart", broken)
    with (
        serve(Upper(), sock, "process").run_in_thread() as daemon,
        Rig(sock, num_queues=2, inflight=True) as rig,
    ):
        _echoes(rig, 0, b"alpha")
        victim = worker_pids(daemon)[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: readable(rig.rings[0].err), 10)
        assert not readable(rig.rings[1].err)
        _echoes(rig, 1, b"other")
    assert "replacing worker 0" in caplog.text and "broken on purpose" in caplog.text


def _echoes(rig: Rig, q: int, word: bytes) -> None:
    """Queue ``q`` answers ``word`` upper-cased (the toy device is serving it)."""
    head, out = rig.submit(q, [word], [16])
    [(got, written)] = rig.wait_used(q, 1)
    assert (got, rig.output(out, written)) == (head, word.upper())


def _daemon_pid(peer: PeerProcess) -> int:
    """The Python daemon under the peer's ``timeout`` wrapper."""
    assert peer.pid is not None
    [pid] = children(peer.pid)
    return pid


def _worker_pid(daemon: PeerProcess, index: int) -> int:
    import re

    found = re.findall(rf"worker {index} \(pid (\d+)\) started", daemon.stderr)
    assert found, daemon.stderr[-2000:]
    return int(found[-1])


def test_sigkilled_daemon_takes_its_workers_and_the_next_daemon_recovers() -> None:
    """SIGKILL the daemon alone (not its process group): its workers die with it
    (PR_SET_PDEATHSIG), and the next daemon's workers redo what was in flight."""
    with short_tmp("pvh-wk-") as workdir:
        sock = workdir / "toy.sock"
        args = ("--workers", "2", "--worker-mode", "process")
        first = _toy(sock, workdir, "--hang", *args, name="first")
        second = _toy(sock, workdir, *args, name="second")
        with first, Rig(str(sock), num_queues=2, inflight=True) as rig:
            subs = {}
            for w in (b"hang", b"bravo", b"charlie"):
                head, out = rig.submit(0, [w], [16], kick=False)
                subs[head] = (w, out)
            rig.kick(0, force=True)
            done = rig.wait_used(0, 2)
            assert _output(first, "hanging")
            pid = _daemon_pid(first)
            workers = children(pid)
            assert len(workers) == 2
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: not any(os.path.exists(f"/proc/{w}/stat") and _alive(w)
                                            for w in workers), 10)  # fmt: skip
            first.stop()
            sock.unlink(missing_ok=True)
            with second:
                rig.reconnect()
                done += rig.wait_used(0, 1)
                time.sleep(0.2)
                assert rig.rings[0].driver.get_used() == []
                assert sorted(h for h, _ in done) == sorted(subs)
                for head, written in done:
                    word, out = subs[head]
                    assert rig.output(out, written) == word.upper()
            assert "1 in-flight requests recovered" in second.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
