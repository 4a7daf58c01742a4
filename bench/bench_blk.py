"""Block back-ends compared: ``python bench/bench_blk.py [--seconds S]``.

Runs ``pyvhost exercise blk`` (the same driver for both) against ``pyvhost serve blk`` and against
``qemu-storage-daemon --export type=vhost-user-blk``, each on a fresh raw image of the same size,
at 4 KiB and 64 KiB blocks and queue depth 1 and 32, and prints the IOPS of both and the ratio
ours / theirs. Every run writes, reads back and verifies, so a fast wrong answer cannot win.

The driver is Python too, so it caps both sides; the ratio says how much of the driver's budget
each back-end leaves, not what a VM would see. Target: ratio >= 1 at 64 KiB, >= 0.5 at 4 KiB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CASES = [(4096, 1), (4096, 32), (65536, 1), (65536, 32)]
PEER_TIMEOUT = 600


@contextlib.contextmanager
def peer(argv: list[str], sock: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run a back-end under ``timeout`` in its own process group until the block ends."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            ["timeout", "-k", "5", str(PEER_TIMEOUT), *argv],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def exercise(sock: Path, seconds: float, block: int, depth: int, region: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "pyvhost", "exercise", "blk", "--socket", str(sock), "--json"]
    argv += ["--quiet", "--seconds", str(seconds), "--block-size", str(block)]
    argv += ["--queue-depth", str(depth), "--region", str(region), "--reconnect-timeout", "0"]
    proc = subprocess.run(
        ["timeout", "-k", "5", str(seconds * 4 + 60), *argv],
        check=False,
        capture_output=True,
        text=True,
    )
    if not proc.stdout.strip():
        raise RuntimeError(f"exercise failed (status {proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"exercise found errors: {result.get('fatal')} {result['error_details']}"
        )
    return result


def backends(work: Path, image_size: int) -> dict[str, tuple[list[str], Path]]:
    out: dict[str, tuple[list[str], Path]] = {}
    for name in ("pyvhost", "qsd"):
        image = work / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(image_size)
        sock = work / f"{name}.sock"
        if name == "pyvhost":
            argv = [sys.executable, "-m", "pyvhost", "serve", "blk", "--quiet"]
            argv += ["--socket", str(sock), "--image", str(image)]
        else:
            qsd = shutil.which("qemu-storage-daemon")
            if qsd is None:
                raise SystemExit(
                    "qemu-storage-daemon not installed: apt-get install qemu-system-common"
                )
            argv = [
                qsd,
                "--blockdev",
                f"driver=file,node-name=file0,filename={image}",
                "--blockdev",
                "driver=raw,node-name=disk0,file=file0",
                "--export",
                f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                f"addr.path={sock},writable=on,num-queues=1",
            ]
        out[name] = (argv, sock)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per case (default 3)")
    parser.add_argument("--size", type=int, default=256 << 20, help="image size (default 256M)")
    parser.add_argument("--region", type=int, default=64 << 20, help="bytes used (default 64M)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pvh-bench-", dir="/tmp"))
    results: dict[tuple[str, int, int], dict[str, Any]] = {}
    try:
        for name, (argv, sock) in backends(work, args.size).items():
            with peer(argv, sock, work / f"{name}.log"):
                for block, depth in CASES:
                    results[name, block, depth] = exercise(
                        sock, args.seconds, block, depth, args.region
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"exercise blk, {args.seconds:g} s per case, {args.size >> 20} MiB image, "
        f"{args.region >> 20} MiB used, 1 queue; every request verified"
    )
    print(
        f"{'block':>6} {'depth':>5} | {'pyvhost IOPS':>12} {'qsd IOPS':>10} {'ratio':>6} | "
        f"{'pyvhost MB/s':>12} {'qsd MB/s':>9} | target"
    )
    for block, depth in CASES:
        ours = results["pyvhost", block, depth]
        theirs = results["qsd", block, depth]
        ratio = ours["iops"] / theirs["iops"] if theirs["iops"] else float("nan")
        target = 1.0 if block >= 65536 else 0.5
        verdict = "met" if ratio >= target else "MISSED"
        print(
            f"{block // 1024:>5}K {depth:>5} | {ours['iops']:>12.0f} {theirs['iops']:>10.0f} "
            f"{ratio:>6.2f} | {ours['mb_per_s']:>12.1f} {theirs['mb_per_s']:>9.1f} | "
            f">= {target:g}: {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
