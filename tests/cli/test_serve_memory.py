"""``pyvhost serve``: what it says about guest-memory safety at start-up."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.qemu import short_tmp
from pyvhost.virtio import atomic


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tmp("pvh-serve-mem-") as d:
        yield d


def _serve(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["timeout", "30", sys.executable, "-m", "pyvhost", "serve", *argv],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_serve_says_how_dirty_log_bits_are_set(workdir: Path) -> None:
    (workdir / "s").write_text("not a socket")  # start up, log, then stop at once
    proc = _serve("rng", "--socket", str(workdir / "s"))
    assert proc.returncode == 1
    assert f"dirty log: bits set with {atomic.default_impl()} (atomic OR)" in proc.stderr
