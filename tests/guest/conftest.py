"""Fixtures for the real-guest tests: ``pyvhost serve`` as a real subprocess."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from peers.qemu import PeerProcess

Serve = Callable[..., PeerProcess]


@pytest.fixture
def serve(peer_dir: Path) -> Iterator[Serve]:
    """Start ``python -m pyvhost serve DEVICE --socket SOCK ARGS...``; stopped after the test."""
    started: list[PeerProcess] = []

    def start(device: str, sock: Path, *args: str, timeout_s: float = 120) -> PeerProcess:
        argv = [sys.executable, "-m", "pyvhost", "serve", device, "--socket", str(sock), *args]
        proc = PeerProcess(
            argv,
            peer_dir,
            name=f"serve-{device}-{len(started)}",
            timeout_s=timeout_s,
            socket=sock,
        )
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()
