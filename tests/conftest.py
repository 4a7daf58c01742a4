"""Shared pytest configuration."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

pytest_plugins = ["peers.fixtures"]

# A Python peer that PeerProcess has to abort writes every thread's stack to its stderr.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves file descriptors open that it did not have before."""
    before = _open_fds()
    yield
    leaked = sorted(_open_fds() - before)
    details = []
    for fd in leaked:
        try:
            details.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            details.append(str(fd))
    assert not leaked, "leaked file descriptors: " + ", ".join(details)
