"""A connection that ends releases everything it brought: fds, mappings, threads."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peers.qemu import PeerProcess, short_tmp

IMAGE_SIZE = 16 << 20


def _fds(pid: int) -> dict[str, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[name] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
    return out


def _shared_mappings(pid: int) -> list[str]:
    """Shared writable mappings (guest memory, logs, inflight regions): none may outlive a
    session."""
    with open(f"/proc/{pid}/maps") as f:
        return [line.strip() for line in f if " rw-s " in line]


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return found


def _settled(pid: int, want: dict[str, str]) -> dict[str, str]:
    deadline = time.monotonic() + 5
    while (now := _fds(pid)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize("packed", [False, True])
def test_serve_holds_what_it_held_before_after_each_front_end(packed: bool, mode: str) -> None:
    with short_tmp("pvh-rel-") as tmp:
        image = Path(tmp) / "disk.img"
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        sock = Path(tmp) / "blk.sock"
        serve = PeerProcess(
            [
                sys.executable,
                "-m",
                "pyvhost",
                "serve",
                "blk",
                "--socket",
                str(sock),
                "--image",
                str(image),
                "--queues",
                "2",
                "--workers",
                "2",
                "--worker-mode",
                mode,
            ],
            Path(tmp),
            name="serve",
            timeout_s=120,
            socket=sock,
        ).start()
        try:
            assert serve.pid is not None
            [pid] = _children(serve.pid)  # the daemon under `timeout`
            time.sleep(0.3)
            idle_fds, idle_threads = _fds(pid), _threads(pid)
            assert _shared_mappings(pid) == []
            for _ in range(2):
                argv = [sys.executable, "-m", "pyvhost", "exercise", "blk", "--socket", str(sock)]
                argv += ["--seconds", "0.5", "--queue-depth", "8", "--queues", "2"]
                if packed:
                    argv.append("--packed")
                done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, done.stdout + done.stderr
                assert _settled(pid, idle_fds) == idle_fds
                assert _shared_mappings(pid) == [], "the front-end's memory is still mapped"
                assert _threads(pid) == idle_threads
                deadline = time.monotonic() + 5
                while _children(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert _children(pid) == [], "worker processes outlived the front-end"
            assert serve.returncode is None
        finally:
            serve.stop()
