"""``pyvhost check`` against qemu-storage-daemon (vhost-user-blk export): the conformance checks
pass, and whatever the hostile checks find, the survival verdict agrees with the process."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peers.qemu import QemuStorageDaemon, require
from pyvhost.check import CHECKS
from pyvhost.cli.main import main

pytestmark = pytest.mark.qemu

CONFORMANCE = (
    "get-features",
    "protocol-features-bit",
    "set-features",
    "queue-num",
    "max-mem-slots",
    "get-config",
    "mem-table",
    "add-mem-reg",
    "split-ring-base",
)


@pytest.fixture
def daemon(peer_dir: Path, qsd_image: Path) -> Iterator[QemuStorageDaemon]:
    """Like the ``qsd`` fixture, but a daemon that dies under the checks is not an error here."""
    require("qemu-storage-daemon")
    qsd = QemuStorageDaemon(qsd_image, peer_dir / "qsd.sock").start()
    try:
        yield qsd
    finally:
        qsd.stop()


def run_check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    rc = main(["check", "--json", "--timeout", "5", *argv])
    out, _ = capsys.readouterr()
    return rc, json.loads(out)


def exited(qsd: QemuStorageDaemon, grace: float = 5.0) -> bool:
    """Whether qemu-storage-daemon has exited (waiting a little for a dying one)."""
    deadline = time.monotonic() + grace
    while qsd.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return qsd.returncode is not None


def check_report(qsd: QemuStorageDaemon, rc: int, report: dict[str, Any]) -> dict[str, Any]:
    lines = {c["name"]: c for c in report["checks"]}
    for name in CONFORMANCE:
        assert lines[name]["result"] == "pass", lines[name]
    # qemu-storage-daemon does not offer packed rings.
    assert lines["packed-ring-base"]["result"] == "n/a"
    assert report["survived_all"] == (not exited(qsd, 0 if report["survived_all"] else 5))
    assert rc == (0 if report["failed"] == 0 and report["survived_all"] else 1)
    return lines


def test_check_qsd(daemon: QemuStorageDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = run_check(capsys, "--socket", str(daemon.socket))
    lines = check_report(daemon, rc, report)
    died = [n for n, c in lines.items() if not c["survived"] and "not run" not in c["detail"]]
    if died:
        assert len(died) == 1 and lines[died[0]]["result"] == "fail"


def test_check_qsd_without_the_check_that_kills_it(
    daemon: QemuStorageDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """QEMU 7.2's qemu-storage-daemon dies of SIGBUS in mem-fd-too-small; the rest all run."""
    rc, report = run_check(capsys, "--socket", str(daemon.socket), "--skip", "mem-fd-too-small")
    lines = check_report(daemon, rc, report)
    assert list(lines) == [
        "get-features",
        *(c.name for c in CHECKS if c.name != "mem-fd-too-small"),
    ]
    assert all("not run" not in c["detail"] for c in lines.values())
