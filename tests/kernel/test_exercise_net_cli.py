"""`pyvhost exercise net` on the host: bad input fails with the reason before touching the network
(the device is opened before any TAP is created)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pyvhost", "exercise", "net", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kernel", "/nonexistent/vhost-net"], "open on /nonexistent/vhost-net: ENOENT"),
        (["--kernel", "/dev/null", "--size", "13"], "--size 13: frames are"),
    ],
)
def test_bad_input_is_one_line(args: list[str], message: str) -> None:
    done = _run("--tap", "pvh-never", *args)
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_usage_names_the_required_options() -> None:
    done = _run()
    assert done.returncode == 2
    assert "--kernel" in done.stderr and "--tap" in done.stderr
