"""``pyvhost demo``: one command serves a temporary image and exercises it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pyvhost.cli.demo import _check_image, format_report
from pyvhost.cli.exercise import ExerciseResult, pattern


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pyvhost", "demo", "--seconds", "0.5", "--size", "8M", *args]
    return subprocess.run(
        ["timeout", "-k", "5", "120", *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=130,
    )


def test_demo_human_report() -> None:
    proc = run_demo()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "result     OK" in out
    assert "bytes written, read back and compared" in out
    assert "IOPS" in out and "MB/s" in out
    assert "8388608 bytes checked in the image file" in out  # the whole 8 MiB region


def test_demo_json() -> None:
    proc = run_demo("--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["errors"] == 0
    assert report["iops"] > 0 and report["mb_per_s"] > 0
    assert report["verified_bytes"] >= 8 << 20
    assert report["image_bytes_checked"] == 8 << 20
    assert report["exercise"]["id"] == "pyvhost-demo"
    assert "FAILED" not in format_report(report)


def test_demo_report_on_failure() -> None:
    text = format_report({"ok": False, "fatal": "the back-end did not start (exit status 1)"})
    assert "FAILED" in text and "did not start" in text


def test_image_check_of_a_run_shorter_than_one_pass(tmp_path: Path) -> None:
    """A slow run (coverage, a busy machine) may end before writing every block: those blocks
    must still be zeros, and data there is reported."""
    bs = 4096
    image = tmp_path / "disk.img"
    image.write_bytes(pattern(bs, 0, 0) + bytes(3 * bs))
    result = ExerciseResult("sock", block_size=bs, region=4 * bs, passes=0, next_block=1)
    assert _check_image(image, result) == (4 * bs, None)
    image.write_bytes(pattern(bs, 0, 0) + bytes(2 * bs) + b"\x01" + bytes(bs - 1))
    checked, problem = _check_image(image, result)
    assert checked == 3 * bs
    assert problem == "image file: block 3 was never written, holds data"
