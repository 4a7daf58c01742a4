"""``pyvhost serve``: what it says about guest-memory safety at start-up."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.qemu import PeerProcess, short_tmp
from pyvhost.cli.main import build_parser
from pyvhost.errors import ReplyError
from pyvhost.user.frontend import Frontend
from pyvhost.user.messages import MemoryRegion
from pyvhost.virtio import atomic

MiB = 1 << 20


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


def test_require_sealed_memory_flag_parses() -> None:
    parser = build_parser(("pyvhost.cli.serve",))
    for device in (["rng"], ["blk", "--image", "i"]):
        args = parser.parse_args(["serve", *device, "--socket", "s", "--require-sealed-memory"])
        assert args.require_sealed_memory is True
        args = parser.parse_args(["serve", *device, "--socket", "s"])
        assert args.require_sealed_memory is False


def _memfd(sealed: bool) -> int:
    fd = os.memfd_create("front-end-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, MiB)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


@pytest.mark.parametrize("required", [True, False])
def test_unsealed_guest_memory_is_refused_only_with_the_flag(workdir: Path, required: bool) -> None:
    sock = workdir / "rng.sock"
    argv = [sys.executable, "-m", "pyvhost", "serve", "rng", "--socket", str(sock)]
    if required:
        argv.append("--require-sealed-memory")
    region = MemoryRegion(0, MiB, 0x7000_0000_0000, 0)
    sealed, unsealed = _memfd(True), _memfd(False)
    try:
        with PeerProcess(argv, workdir, name="rng", timeout_s=60, socket=sock) as proc:
            fe = Frontend.connect(str(sock))
            try:
                fe.negotiate()
                assert fe.reply_ack
                if required:
                    with pytest.raises(ReplyError):
                        fe.set_mem_table([(region, unsealed)])
                else:
                    fe.set_mem_table([(region, unsealed)])
                fe.set_mem_table([(region, sealed)])
            finally:
                fe.close()
            assert proc.stop() == 0
    finally:
        os.close(sealed)
        os.close(unsealed)
    if required:
        assert "refused (--require-sealed-memory)" in proc.stderr
        assert "memory region gpa 0x0 size 0x100000: fd" in proc.stderr
        assert "sealed memory is required" in proc.stderr
    else:
        assert "accepted with a warning" in proc.stderr
        assert "no F_SEAL_SHRINK" in proc.stderr
