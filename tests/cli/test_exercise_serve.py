"""``pyvhost exercise blk`` against ``pyvhost serve blk``, and the restart proof: SIGKILL the
server in the middle of a run, start it again on the same socket and image; exercise reconnects,
what was in flight is redone, and verification passes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peers.qemu import PeerProcess, make_raw_image
from pyvhost.cli.exercise import check_block

IMAGE_SIZE = 32 << 20


def serve(
    workdir: Path,
    sock: Path,
    image: Path,
    *,
    queues: int = 1,
    name: str = "serve",
    mode: str = "thread",
    extra: tuple[str, ...] = (),
) -> PeerProcess:
    argv = [sys.executable, "-m", "pyvhost", "serve", "blk", "--socket", str(sock)]
    argv += ["--image", str(image), "--queues", str(queues)]
    argv += ["--workers", str(queues), "--worker-mode", mode, *extra]
    return PeerProcess(argv, workdir, name=name, timeout_s=120, socket=sock)


def exercise(sock: Path, *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "pyvhost", "exercise", "blk", "--socket", str(sock), "--json"]
    return subprocess.Popen(
        ["timeout", "-k", "5", "120", *argv, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def check_image(image: Path, result: dict[str, object]) -> None:
    data = image.read_bytes()
    bs = int(result["block_size"])  # type: ignore[call-overload]
    region = int(result["region"])  # type: ignore[call-overload]
    passes = int(result["passes"])  # type: ignore[call-overload]
    next_block = int(result["next_block"])  # type: ignore[call-overload]
    for b in range(region // bs):
        want = passes if b < next_block else passes - 1
        assert check_block(data[b * bs : (b + 1) * bs], bs, b) == want, f"block {b}"
    assert data[region:] == bytes(len(data) - region)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_exercise_against_pyvhost_serve(peer_dir: Path, mode: str) -> None:
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    sock = peer_dir / "blk.sock"
    with serve(peer_dir, sock, image, queues=2, mode=mode) as daemon:
        proc = exercise(
            sock, "--seconds", "1", "--queues", "2", "--queue-depth", "8", "--region", "2M"
        )
        out, err = proc.communicate(timeout=120)
        log = daemon.stderr
    result = json.loads(out)
    assert proc.returncode == 0, err
    assert result["errors"] == 0 and result["verified_bytes"] > 0
    assert result["queues"] == 2 and result["reconnects"] == 0
    check_image(image, result)
    if mode == "process":  # both queues were served by worker processes
        assert "worker0[" in log and "worker1[" in log, log[-2000:]


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_exercise_against_serve_with_busy_polling(peer_dir: Path, ring: str, mode: str) -> None:
    """serve --poll-us: depth 1 (the driver told not to kick while the rings are polled; with
    and without the driver polling too) and depth 8 on two queues, every byte verified; in
    process mode the worker processes poll."""
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    sock = peer_dir / "blk.sock"
    packed = ("--packed",) if ring == "packed" else ()
    with serve(peer_dir, sock, image, queues=2, mode=mode, extra=("--poll-us", "300")):
        for depth, driver_poll in (("1", "0"), ("1", "200"), ("8", "0")):
            proc = exercise(
                sock, "--seconds", "1", "--queues", "2", "--queue-depth", depth,
                "--region", "2M", "--poll-us", driver_poll, *packed,
            )  # fmt: skip
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            result = json.loads(out)
            assert result["errors"] == 0 and result["verified_bytes"] > 0


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_restart_of_serve_mid_run(peer_dir: Path, mode: str) -> None:
    """The whole back-end SIGKILLed (in process mode: the daemon and its workers)."""
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    sock = peer_dir / "blk.sock"
    queues = 2 if mode == "process" else 1
    first = serve(peer_dir, sock, image, name="serve1", queues=queues, mode=mode).start()
    second = None
    try:
        proc = exercise(
            sock,
            "--seconds",
            "5",
            "--queue-depth",
            "16",
            "--region",
            "4M",
            "--reconnect-timeout",
            "60",
            "--queues",
            str(queues),
        )
        time.sleep(2.0)
        assert proc.poll() is None, proc.communicate()
        assert first.proc is not None
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.stop()
        sock.unlink(missing_ok=True)
        second = serve(peer_dir, sock, image, name="serve2", queues=queues, mode=mode).start()
        out, err = proc.communicate(timeout=120)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert out, err
    result = json.loads(out)
    assert proc.returncode == 0, f"{result}\n{err}"
    assert result["errors"] == 0
    assert result["reconnects"] >= 1
    assert result["in_flight_at_loss"] > 0  # the kill did hit requests in flight
    assert "went away" in err and "reconnected" in err
    check_image(image, result)


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_exercise_jobs_drive_each_queue_from_its_own_process(
    peer_dir: Path, mode: str, ring: str
) -> None:
    """``exercise blk --jobs 2``: after negotiation each queue is driven by a process of its own,
    from where the negotiating session left its ring (a packed ring's position and wrap counter);
    the results are summed, and every block of the region holds a verified pattern on disk."""
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    sock = peer_dir / "blk.sock"
    with serve(peer_dir, sock, image, queues=2, mode=mode):
        proc = exercise(
            sock,
            *("--seconds", "1", "--queues", "2", "--jobs", "2", "--queue-depth", "8"),
            *("--region", "2M"),
            *(("--packed",) if ring == "packed" else ()),
        )
        out, err = proc.communicate(timeout=120)
    result = json.loads(out)
    assert proc.returncode == 0, err
    assert result["jobs"] == 2 and result["errors"] == 0 and result["fatal"] is None
    assert result["packed"] is (ring == "packed")
    assert result["verified_blocks"] >= 512 and result["reads"] == result["writes"]
    assert result["cpu_seconds"] > 0
    data = image.read_bytes()
    bs = 4096
    for b in range(result["region"] // bs):  # each job wrote its half, block numbers global
        assert check_block(data[b * bs : (b + 1) * bs], bs, b) >= 0, f"block {b}"
    assert data[result["region"] :] == bytes(len(data) - result["region"])


def test_exercise_jobs_must_fit_the_queues(peer_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pyvhost", "exercise", "blk", "--socket", str(peer_dir / "x"),
         "--queues", "2", "--jobs", "3"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--jobs must be between 1 and --queues" in done.stderr
