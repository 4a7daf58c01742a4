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
    extra: tuple[str, ...] = (),
) -> PeerProcess:
    argv = [sys.executable, "-m", "pyvhost", "serve", "blk", "--socket", str(sock)]
    argv += ["--image", str(image), "--queues", str(queues), *extra]
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


def test_exercise_against_pyvhost_serve(peer_dir: Path) -> None:
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    sock = peer_dir / "blk.sock"
    with serve(peer_dir, sock, image, queues=2):
        proc = exercise(
            sock, "--seconds", "1", "--queues", "2", "--queue-depth", "8", "--region", "2M"
        )
        out, err = proc.communicate(timeout=120)
    result = json.loads(out)
    assert proc.returncode == 0, err
    assert result["errors"] == 0 and result["verified_bytes"] > 0
    assert result["queues"] == 2 and result["reconnects"] == 0
    check_image(image, result)


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_exercise_against_serve_with_busy_polling(peer_dir: Path, ring: str) -> None:
    """serve --poll-us: depth 1 (the driver told not to kick while the rings are polled; with
    and without the driver polling too) and depth 8 on two queues, every byte verified."""
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    sock = peer_dir / "blk.sock"
    packed = ("--packed",) if ring == "packed" else ()
    with serve(peer_dir, sock, image, queues=2, extra=("--poll-us", "300")):
        for depth, driver_poll in (("1", "0"), ("1", "200"), ("8", "0")):
            proc = exercise(
                sock, "--seconds", "1", "--queues", "2", "--queue-depth", depth,
                "--region", "2M", "--poll-us", driver_poll, *packed,
            )  # fmt: skip
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            result = json.loads(out)
            assert result["errors"] == 0 and result["verified_bytes"] > 0


def test_restart_of_serve_mid_run(peer_dir: Path) -> None:
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    sock = peer_dir / "blk.sock"
    first = serve(peer_dir, sock, image, name="serve1").start()
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
        )
        time.sleep(2.0)
        assert proc.poll() is None, proc.communicate()
        assert first.proc is not None
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.stop()
        sock.unlink(missing_ok=True)
        second = serve(peer_dir, sock, image, name="serve2").start()
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
