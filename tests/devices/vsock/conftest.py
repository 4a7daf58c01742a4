"""Fixtures of the vsock device tests: the device served in a thread, a guest, host programs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.qemu import short_tmp

from .support import Guest, Host, Served, serve_vsock


@pytest.fixture
def folder() -> Iterator[Path]:
    with short_tmp("pvh-vsock-") as d:
        yield d


@pytest.fixture
def served(folder: Path) -> Iterator[Served]:
    with serve_vsock(folder) as s:
        yield s


@pytest.fixture
def host(served: Served) -> Iterator[Host]:
    h = Host(served.uds)
    yield h
    h.close()


@pytest.fixture
def guest(served: Served) -> Iterator[Guest]:
    with Guest(served.sock) as g:
        yield g
