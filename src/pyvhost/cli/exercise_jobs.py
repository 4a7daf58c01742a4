"""``exercise blk --jobs N``: the driver side of one run spread over N processes.

One Python driver process tops out well below what a back-end with several queues on several
cores serves, so with ``--jobs N`` the session that negotiated (and did the checks) hands its
queues over: queue ``q`` goes to job ``q % N``, a fresh interpreter (``python -m
pyvhost.cli.exercise_jobs``) given the guest memory's memfd, its queues' kick and call
eventfds and, on stdin, a JSON description (ring layout and position: split rings' index, packed
rings' position and wrap counter; negotiated features, the config space, its slice of the buffer
heap and of the disk region). Each job maps the memory itself, drives its rings with the same
write / read-back / verify pipeline as a single-process run (its blocks numbered as in the whole
region, so the image checks the same way), flushes, and prints its result as one JSON object;
the parent sums them.

Split and packed rings; no reconnection: the connection stays in the parent, which keeps it
open (idle) until the jobs are done.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from typing import Any

from pyvhost.driver.session import _ALLOC_ALIGN, DriverSession, _Heap, _Queue
from pyvhost.errors import ReplyError
from pyvhost.virtio.memory import GuestMemory, RegionSpec
from pyvhost.virtio.packed import PackedDriver, packed_layout
from pyvhost.virtio.split import SplitDriver, split_layout

__all__ = ["JobSession", "main", "run_jobs"]


class JobSession(DriverSession):
    """A :class:`DriverSession` over queues another session negotiated and handed over.

    It owns the fds it was given (memfd, kicks, calls); it never talks to the back-end (no
    config requests: the config bytes come with the hand-over; no GET_VRING_BASE at close).
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self._spec = spec
        super().__init__(
            "job",
            num_queues=len(spec["queues"]),
            queue_size=spec["queue_size"],
            indirect=spec["indirect"],
            mem_size=spec["mem_size"],
            gpa_base=spec["gpa_base"],
        )
        self.features = spec["features"]
        self.protocol_features = spec["protocol_features"]
        self._config = bytes.fromhex(spec["config"])

    def _allocate(
        self, num_queues: int, queue_size: int, packed: bool, mem_size: int, gpa_base: int
    ) -> None:
        spec = self._spec
        self.mem = GuestMemory([RegionSpec(spec["memfd"], 0, mem_size, gpa_base, spec["uva"])])
        os.close(spec["memfd"])
        self.gpa_base = gpa_base
        self.mem_size = mem_size
        self.heap = _Heap(spec["heap"][0], spec["heap"][1])
        self.queues = []
        for i, q in enumerate(spec["queues"]):
            queue = _Queue(i, queue_size, q["base_gpa"], q["kick"], q["call"])
            if spec["packed"]:
                layout = packed_layout(queue_size, q["base_gpa"])
                queue.driver = PackedDriver(
                    self.mem,
                    queue_size,
                    layout.desc_gpa,
                    layout.driver_event_gpa,
                    layout.device_event_gpa,
                    event_idx=spec["event_idx"],
                    queue_index=q["index"],
                    start=(q["start"][0], q["start"][1]),
                )
            else:
                desc, avail, used, _ = split_layout(queue_size, q["base_gpa"])
                queue.driver = SplitDriver(
                    self.mem,
                    queue_size,
                    desc,
                    avail,
                    used,
                    event_idx=spec["event_idx"],
                    start_idx=q["start"],
                    queue_index=q["index"],
                )
            self.queues.append(queue)
            self._poll.register(q["call"], select.POLLIN)

    def config(self, offset: int, size: int) -> bytes:
        return self._config[offset : offset + size]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()


def main() -> int:
    """The job: read the hand-over on stdin, run, print the result as JSON on stdout."""
    from pyvhost.cli.exercise import ExerciseOptions, ExerciseResult, _Runner
    from pyvhost.driver.blk import BlkDriver
    from pyvhost.virtio import features as vf

    spec = json.loads(sys.stdin.read())
    opts = ExerciseOptions(**spec["options"])
    result = ExerciseResult(
        opts.socket,
        block_size=opts.block_size,
        queue_depth=opts.queue_depth,
        queues=opts.queues,
        region=spec["blocks"] * opts.block_size,
    )
    session = JobSession(spec)
    session.poll_us = opts.poll_us
    try:
        blk = BlkDriver(session)
        runner = _Runner(blk, opts, result, first_block=spec["first_block"])
        cpu = time.process_time()
        result.elapsed = runner.run(None)
        if blk.has_feature(vf.BLK_F_FLUSH):
            blk.flush()
            result.flushes += 1
        result.cpu_seconds = round(time.process_time() - cpu, 3)
    except Exception as exc:
        result.fatal = f"{type(exc).__name__}: {exc}"
        result.errors += 1
    finally:
        session.close()
    print(json.dumps(result.to_json()))
    return 0


def run_jobs(
    session: DriverSession, opts: Any, result: Any, jobs: int, region: int
) -> tuple[float, list[dict[str, Any]]]:
    """Hand ``session``'s queues over to ``jobs`` processes, run them, return the longest
    elapsed time and each job's result."""
    if not 1 <= jobs <= session.num_queues:
        raise ValueError(f"--jobs {jobs}: must be between 1 and --queues ({session.num_queues})")
    if session.in_flight():
        raise ValueError("--jobs: the session still has requests in flight")
    region_mem = session.mem.regions[0]
    assert region_mem.fd is not None
    heap = session.heap
    start = -(-heap._next // _ALLOC_ALIGN) * _ALLOC_ALIGN
    chunk = (heap.end - start) // jobs // _ALLOC_ALIGN * _ALLOC_ALIGN
    blocks = region // opts.block_size
    try:
        config = session.config(0, 96)
    except ReplyError:
        config = session.config(0, 36)
    procs: list[subprocess.Popen[str]] = []
    try:
        for j in range(jobs):
            mine = [q for q in session.queues if q.index % jobs == j]
            fds = [region_mem.fd]
            queues = []
            for q in mine:
                driver = q.driver
                position: int | list[object]
                if isinstance(driver, PackedDriver):
                    position = list(driver.position)
                else:
                    assert isinstance(driver, SplitDriver)
                    position = driver.avail_idx
                queues.append(
                    {
                        "index": q.index,
                        "base_gpa": q.base_gpa,
                        "start": position,
                        "kick": q.kick_fd,
                        "call": q.call_fd,
                    }
                )
                fds += [q.kick_fd, q.call_fd]
            first, last = blocks * j // jobs, blocks * (j + 1) // jobs
            job_opts = {
                "socket": opts.socket,
                "seconds": opts.seconds,
                "queue_depth": opts.queue_depth,
                "block_size": opts.block_size,
                "queues": len(mine),
                "passes": opts.passes,
                "io_timeout": opts.io_timeout,
                "progress": False,
                "poll_us": opts.poll_us,
            }
            spec = {
                "options": job_opts,
                "memfd": region_mem.fd,
                "uva": region_mem.userspace_addr,
                "mem_size": session.mem_size,
                "gpa_base": session.gpa_base,
                "heap": [start + j * chunk, start + (j + 1) * chunk],
                "queue_size": session.queue_size,
                "queues": queues,
                "packed": session.packed,
                "indirect": session.use_indirect,
                "event_idx": session.event_idx,
                "features": session.features,
                "protocol_features": session.protocol_features,
                "config": config.hex(),
                "first_block": first,
                "blocks": last - first,
            }
            proc = subprocess.Popen(
                [sys.executable, "-m", "pyvhost.cli.exercise_jobs"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=fds,
                text=True,
            )
            procs.append(proc)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(spec))
            proc.stdin.close()
        outs = []
        limit = opts.seconds + opts.io_timeout + 60
        for proc in procs:
            proc.stdin = None  # written and closed: communicate() must not flush it
            out, _ = proc.communicate(timeout=limit)
            outs.append(json.loads(out) if out.strip() else {"fatal": "job printed nothing"})
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    elapsed = max(float(o.get("elapsed", 0.0)) for o in outs)
    return elapsed, outs


if __name__ == "__main__":
    sys.exit(main())
