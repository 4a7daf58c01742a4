"""The in-guest side of tests/peers/pyguest.py: load modules, run the test script, save its result.

Runs as `python3 /pyguest/pyguest_runner.py` inside the Debian root (chrooted by the initramfs);
standard library only. It reads /pyguest/job.json, loads the kernel modules named there with
modprobe, mounts configfs, brings `lo` up, runs the script with /pyguest/src on PYTHONPATH and
copies its stdout and stderr to /pyguest/result and, line by line, to the console (so a host that
kills a hung guest still sees what the script printed). Exits with the script's status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

BASE = Path("/pyguest")
RESULT = BASE / "result"
CONSOLE = "/dev/console"
RUNNER_FAILED = 125
"""Exit status when the runner itself fails before the script runs (a module does not load)."""


class _Console:
    """Serialized, prefixed line writes to the kernel console; silent if it cannot be opened."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        try:
            self.file: IO[bytes] | None = open(CONSOLE, "wb", buffering=0)  # noqa: SIM115
        except OSError:
            self.file = None

    def line(self, prefix: bytes, data: bytes) -> None:
        if self.file is None:
            return
        with self.lock:
            try:
                self.file.write(prefix + data.rstrip(b"\n") + b"\n")
            except OSError:
                self.file = None


def _pump(source: IO[bytes], target: Path, console: _Console, prefix: bytes) -> None:
    """Copy `source` to `target` and to the console until EOF, flushing every line."""
    with open(target, "wb") as out:
        for line in iter(source.readline, b""):
            out.write(line)
            out.flush()
            console.line(prefix, line)
        os.fsync(out.fileno())


def _setup(job: dict[str, Any], console: _Console) -> list[str]:
    """Load the job's modules, mount configfs, bring lo up; return error lines (empty if fine)."""
    errors = []
    for module in job.get("modules", []):
        proc = subprocess.run(["modprobe", module], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            errors.append(f"modprobe {module} failed ({proc.returncode}): {proc.stderr.strip()}")
    config = Path("/sys/kernel/config")
    if config.is_dir() and not os.path.ismount(config):
        subprocess.run(["mount", "-t", "configfs", "configfs", str(config)], check=False)
    subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True, check=False)
    for error in errors:
        console.line(b"pyguest-runner: ", error.encode())
    return errors


def main() -> int:
    """Run the job; the exit status is the script's (negative signals as 128 + signal)."""
    job = json.loads((BASE / "job.json").read_text())
    RESULT.mkdir(exist_ok=True)
    (BASE / "out").mkdir(exist_ok=True)
    console = _Console()
    started = time.monotonic()
    errors = _setup(job, console)
    status: dict[str, Any] = {
        "setup_s": round(time.monotonic() - started, 3),
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
    }
    if errors:
        status.update(returncode=None, error="\n".join(errors))
        (RESULT / "status.json").write_text(json.dumps(status))
        print("\n".join(errors), file=sys.stderr)
        return RUNNER_FAILED
    env = dict(os.environ)
    env.update(job.get("env", {}))
    env.update(
        PYTHONPATH=str(BASE / "src"),
        PYGUEST_OUT=str(BASE / "out"),
        PYGUEST_FILES=str(BASE / "files"),
        HOME="/root",
        PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    )
    console.line(b"pyguest-runner: ", f"running {job['script']}".encode())
    script_started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-u", str(BASE / job["script"]), *job.get("argv", [])],
        cwd=BASE / "files",
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, RESULT / "stdout", console, b"| ")),
        threading.Thread(target=_pump, args=(proc.stderr, RESULT / "stderr", console, b"! ")),
    ]
    for pump in pumps:
        pump.start()
    returncode = proc.wait()
    for pump in pumps:
        pump.join()
    status.update(returncode=returncode, script_s=round(time.monotonic() - script_started, 3))
    with open(RESULT / "status.json", "w") as f:
        json.dump(status, f)
        f.flush()
        os.fsync(f.fileno())
    console.line(b"pyguest-runner: ", f"script exited with {returncode}".encode())
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(main())
