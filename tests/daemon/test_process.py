"""The daemon as a real process: signals; a SIGKILLed back-end resumed from its inflight region."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.qemu import PeerProcess, short_tmp

from .rig import Rig

TOY = str(Path(__file__).with_name("toy.py"))


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tmp("pvh-proc-") as d:
        yield d


def _kill(proc: PeerProcess) -> None:
    """SIGKILL the peer's whole process group (``timeout`` and the daemon under it)."""
    assert proc.proc is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait(10)
    proc.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_daemon_and_removes_the_socket(workdir: Path, sig: int) -> None:
    sock = workdir / "rng.sock"
    argv = [sys.executable, "-m", "pyvhost", "serve", "rng", "--socket", str(sock)]
    with PeerProcess(argv, workdir, name="serve", timeout_s=60, socket=sock) as proc:
        with Rig(str(sock)) as rig:  # a front-end connected while the signal arrives
            rig.submit(0, [], [16])
            rig.wait_used(0, 1)
            assert proc.proc is not None
            # timeout(1) only forwards SIGTERM: signal the daemon itself.
            child = int(
                Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children").read_text().split()[0]
            )
            os.kill(child, sig)
            assert proc.proc.wait(10) == 0
        assert not sock.exists()
        err = proc.stderr
        assert "listening on" in err
        assert "front-end connected" in err
        assert f"{signal.Signals(sig).name} received" in err
        assert "socket" in err and "removed" in err


def test_sigkilled_daemon_resumes_inflight_requests(workdir: Path) -> None:
    """Requests in flight when the back-end dies are redone by the next one, each exactly once."""
    sock = workdir / "toy.sock"
    first = PeerProcess(
        [sys.executable, TOY, str(sock), "--hang"],
        workdir,
        name="first",
        timeout_s=60,
        socket=sock,
    )
    second = PeerProcess(
        [sys.executable, TOY, str(sock)], workdir, name="second", timeout_s=60, socket=sock
    )
    with first, Rig(str(sock), inflight=True) as rig:
        # Out of order: bravo and charlie complete (used.idx 2) while "hang" (avail slot 0) is
        # held. The front-end resumes at base 2 = used.idx, as QEMU does; only the inflight
        # region tells the new back-end that slot 0 is pending and slots 1-2 are done.
        words = [b"hang", b"bravo", b"charlie"]
        subs = {}
        for w in words:
            head, out = rig.submit(0, [w], [16], kick=False)
            subs[head] = (w, out)
        rig.kick(0, force=True)
        done = rig.wait_used(0, 2)
        deadline = time.monotonic() + 10
        while "hanging" not in first.stdout and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "hanging" in first.stdout
        assert rig.rings[0].driver.get_used() == []
        _kill(first)
        sock.unlink(missing_ok=True)  # as after a crash, the stale socket may or may not remain
        with second:
            rig.reconnect()
            done += rig.wait_used(0, 1)
            time.sleep(0.2)
            assert rig.rings[0].driver.get_used() == []  # nothing completed twice
            heads = [h for h, _ in done]
            assert sorted(heads) == sorted(subs)
            for head, written in done:
                word, out = subs[head]
                assert rig.output(out, written) == word.upper()
            # The resumed queue carries on with new work.
            head, out = rig.submit(0, [b"foxtrot"], [16])
            [(got, written)] = rig.wait_used(0, 1)
            assert (got, rig.output(out, written)) == (head, b"FOXTROT")
        assert "1 in-flight requests recovered" in second.stderr


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_driver_session_reconnects_and_gets_every_reply(workdir: Path, mode: str) -> None:
    """The same crash seen through DriverSession (the driver engineer's front-end), reconnecting
    by itself: every request is answered exactly once and correctly (queues served by threads,
    or by worker processes that die with the daemon's process group)."""
    from pyvhost.driver.session import DriverSession

    sock = workdir / "toy.sock"
    args = ["--workers", "2", "--worker-mode", mode]
    first = PeerProcess(
        [sys.executable, TOY, str(sock), "--hang", *args],
        workdir,
        name="first",
        timeout_s=60,
        socket=sock,
    )
    second = PeerProcess(
        [sys.executable, TOY, str(sock), *args],
        workdir,
        name="second",
        timeout_s=60,
        socket=sock,
    )
    with first:
        session = DriverSession.connect(str(sock), num_queues=2, queue_size=16, reconnect=20)
        try:
            words = [b"hang", b"one", b"two", b"three"]
            subs = {}
            for w in words:
                src, dst = session.alloc(len(w)), session.alloc(16)
                session.view(src, len(w))[:] = w
                subs[session.submit(0, [(src, len(w))], [(dst, 16)])] = (w, dst)
            session.kick(0)
            done: list[tuple[int, int]] = []
            while len(done) < 3:
                done += session.wait(0, 10)
            _kill(first)
            sock.unlink(missing_ok=True)
            with second:
                deadline = time.monotonic() + 20
                while len(done) < len(words) and time.monotonic() < deadline:
                    done += session.wait(0, 1)
                assert session.reconnects == 1
                for token, written in done:
                    word, dst = subs[token]
                    assert bytes(session.view(dst, written)) == word.upper()
        finally:
            session.close()
    assert sorted(t for t, _ in done) == sorted(subs)
    assert "1 in-flight requests recovered" in second.stderr
