"""``pyvhost check`` against DPDK 22.11's vhost library (testpmd's net_vhost port): the
conformance checks pass, the checks needing what DPDK does not offer are n/a, and the survival
verdict agrees with the process. docs/check.md records the whole table."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from peers.dpdk import Testpmd, require_testpmd, vhost_backend
from pyvhost.check import CHECKS
from pyvhost.cli.main import main

pytestmark = pytest.mark.dpdk

CONFORMANCE = (
    "get-features",
    "protocol-features-bit",
    "set-features",
    "queue-num",
    "reply-ack",
    "mem-table",
    "split-ring-base",
)
NOT_OFFERED = ("max-mem-slots", "get-config", "add-mem-reg", "add-mem-reg-without-fd")
"""DPDK 22.11 offers neither CONFIGURE_MEM_SLOTS nor CONFIG to a net back-end's front-end."""


def run_check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    rc = main(["check", "--json", "--timeout", "5", *argv])
    out, _ = capsys.readouterr()
    return rc, json.loads(out)


def exit_status(pmd: Testpmd, grace: float) -> int | None:
    """testpmd's exit status, waiting up to ``grace`` seconds for a dying one."""
    deadline = time.monotonic() + grace
    while pmd.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return pmd.returncode


def test_check_testpmd_without_the_check_that_kills_it(
    peer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_testpmd()
    sock = peer_dir / "vhost.sock"
    pmd = vhost_backend(peer_dir, sock).start()
    try:
        rc, report = run_check(capsys, "--socket", str(sock), "--skip", "mem-fd-too-small")
        alive = exit_status(pmd, 0) is None
    finally:
        pmd.quit()
    lines = {c["name"]: c for c in report["checks"]}
    assert list(lines) == [
        "get-features",
        *(c.name for c in CHECKS if c.name != "mem-fd-too-small"),
    ]
    for name in CONFORMANCE:
        assert lines[name]["result"] == "pass", lines[name]
    for name in NOT_OFFERED:
        assert lines[name]["result"] == "n/a", lines[name]
    assert report["survived_all"] and alive
    assert rc == (0 if report["failed"] == 0 else 1)


def test_mem_fd_too_small_kills_testpmd(peer_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 1 MiB region on a 4 KiB memfd: DPDK maps it and touches a ring past the fd's end."""
    require_testpmd()
    sock = peer_dir / "vhost.sock"
    pmd = vhost_backend(peer_dir, sock).start()
    try:
        rc, report = run_check(capsys, "--socket", str(sock), "--only", "mem-fd-too-small")
        status = exit_status(pmd, 5)
    finally:
        pmd.stop()
    (line,) = (c for c in report["checks"] if c["name"] == "mem-fd-too-small")
    assert (line["result"], line["survived"], rc) == ("fail", False, 1)
    assert status == -signal.SIGBUS, pmd.log[-2000:]
