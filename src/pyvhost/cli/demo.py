"""``pyvhost demo``: serve a block device on a temporary image and exercise it, in one command.

The back-end is :class:`pyvhost.daemon.Daemon` serving a :class:`pyvhost.devices.blk.BlkDevice`
in a child process (so guest memory really is shared between two processes, through a memfd,
as with a VM); the front-end and guest driver is ``exercise blk`` in this process. Afterwards
the image file itself is read and checked block by block. No VM, no root, nothing to set up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pyvhost.cli.exercise import (
    ExerciseOptions,
    ExerciseResult,
    check_block,
    parse_size,
    run_exercise,
)

__all__ = ["register", "run", "run_demo"]

DEMO_QUEUES = 2
DEMO_DEPTH = 16
DEMO_BLOCK = 4096
DEMO_REGION = 16 << 20


def _serve(image: str, sock: str, queues: int) -> None:
    """Child process: serve the image until SIGTERM."""
    from pyvhost.daemon import Daemon
    from pyvhost.devices.blk import BlkDevice

    device = BlkDevice.from_args(image, queues=queues, serial="pyvhost-demo")
    Daemon(device, sock).run()


def _check_image(image: Path, result: ExerciseResult) -> tuple[int, str | None]:
    """Read the image file directly: every block of the region must hold its last pattern, or
    zeros if the run ended before its first write."""
    bs = result.block_size
    checked = 0
    with open(image, "rb") as f:
        for block in range(result.region // bs):
            want = result.passes if block < result.next_block else result.passes - 1
            data = f.read(bs)
            if want < 0:
                # A short run (a slow machine, coverage) never reached this block: still zeros.
                if data.count(0) != len(data):
                    return checked, f"image file: block {block} was never written, holds data"
                checked += bs
                continue
            try:
                got = check_block(data, bs, block)
            except ValueError as exc:
                return checked, f"image file: {exc}"
            if got != want:
                return checked, f"image file: block {block} holds pass {got}, expected {want}"
            checked += bs
    return checked, None


def run_demo(seconds: float, size: int) -> dict[str, Any]:
    """Run the demo; returns the report as a dict (``ok``, ``iops``, ``mb_per_s``, ...)."""
    workdir = Path(tempfile.mkdtemp(prefix="pvh-demo-", dir="/tmp"))
    image = workdir / "disk.img"
    sock = workdir / "blk.sock"
    report: dict[str, Any] = {"ok": False, "image_size": size}
    child = None
    try:
        with open(image, "wb") as f:
            f.truncate(size)
        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(
            target=_serve, args=(str(image), str(sock), DEMO_QUEUES), name="pyvhost-demo-serve"
        )
        child.start()
        deadline = time.monotonic() + 10
        while not sock.exists():
            if not child.is_alive() or time.monotonic() > deadline:
                report["fatal"] = f"the back-end did not start (exit status {child.exitcode})"
                return report
            time.sleep(0.02)
        report["backend_pid"] = child.pid
        opts = ExerciseOptions(
            str(sock),
            seconds=seconds,
            queue_depth=DEMO_DEPTH,
            block_size=DEMO_BLOCK,
            queues=DEMO_QUEUES,
            region=min(size, DEMO_REGION),
            reconnect=0,
            progress=False,
        )
        result = run_exercise(opts, sys.stderr if seconds >= 2 else None)
        report["exercise"] = result.to_json()
        checked, problem = _check_image(image, result) if result.ok else (0, None)
        report.update(
            iops=result.iops,
            mb_per_s=result.mb_per_s,
            errors=result.errors + (problem is not None),
            verified_bytes=result.verified_bytes,
            image_bytes_checked=checked,
            image_problem=problem,
            ok=result.ok and problem is None,
        )
        return report
    finally:
        if child is not None and child.pid is not None:
            if child.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join(5)
        shutil.rmtree(workdir, ignore_errors=True)


def format_report(report: dict[str, Any]) -> str:
    """A few lines a person reads: what ran, what was verified, how fast."""
    lines = ["pyvhost demo: a vhost-user-blk back-end and a guest driver, no VM"]
    res = report.get("exercise")
    if res is None:
        lines.append(f"  FAILED     {report.get('fatal')}")
        return "\n".join(lines)
    mib = report["image_size"] >> 20
    lines += [
        f"  back-end   pyvhost.daemon.Daemon + BlkDevice in process {report.get('backend_pid')}, "
        f"on a {mib} MiB temporary image",
        f"  driver     {res['queues']} queues x depth {res['queue_depth']}, "
        f"{res['block_size']}-byte requests over {res['region'] >> 20} MiB",
        f"  features   {' '.join(res['feature_names'])}"
        + ("; inflight tracking" if res["inflight_mode"] else ""),
        "  checks     " + ", ".join(res["checks"]),
        f"  verified   {res['verified_bytes']} bytes written, read back and compared "
        f"({res['writes']} writes, {res['reads']} reads, {res['passes']} full passes)",
        f"  image      {report.get('image_bytes_checked', 0)} bytes checked in the image file",
        f"  speed      {res['iops']:.0f} IOPS, {res['mb_per_s']:.1f} MB/s",
    ]
    if res.get("fatal"):
        lines.append(f"  FAILED     {res['fatal']}")
    lines += [f"  ERROR      {d}" for d in res["error_details"]]
    if report.get("image_problem"):
        lines.append(f"  ERROR      {report['image_problem']}")
    lines.append("  result     " + ("OK" if report["ok"] else f"{report['errors']} error(s)"))
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="serve a block device on a temporary image and exercise it (no VM, no root)",
        description=__doc__,
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to run (default 3)")
    parser.add_argument(
        "--size", type=parse_size, default=64 << 20, help="image size (default 64M)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when everything verified."""
    if args.size < DEMO_BLOCK:
        print(f"demo: --size must be at least {DEMO_BLOCK} bytes", file=sys.stderr)
        return 2
    report = run_demo(args.seconds, args.size)
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["ok"] else 1
