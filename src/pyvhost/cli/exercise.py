"""``pyvhost exercise blk``: drive any vhost-user-blk back-end as a guest would, and verify it.

Acts as front-end and guest driver at once (no VM): negotiates, shares memory, then writes
patterns through the virtqueues, reads them back and compares, with FLUSH and GET_ID along the
way. Every 512-byte sector of a pattern block starts with a header naming the pass, the block
and the sector, so stale data (an older pass), misplaced data (another block or sector) and
garbage are told apart. Reports IOPS and MB/s (10^6 bytes); exits 1 on any mismatch or error.
"""

from __future__ import annotations

import argparse
import functools
import json
import struct
import sys
import time
from array import array
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from pyvhost.cli import exercise_net, exercise_scsi, exercise_vsock
from pyvhost.driver.blk import SECTOR_SIZE, BlkCompletion, BlkDriver
from pyvhost.driver.session import DriverSession
from pyvhost.errors import VhostError
from pyvhost.virtio import features as vf
from pyvhost.virtio.features import feature_names

__all__ = [
    "ExerciseOptions",
    "ExerciseResult",
    "check_block",
    "parse_size",
    "pattern",
    "register",
    "run",
    "run_exercise",
]

MAGIC = b"PVHXBLK1"
_SECTOR_HEADER = struct.Struct("<8sQQII")  # magic, pass, block, sector in block, block size
_MAX_DETAILS = 20
_MAGIC_WORD = int.from_bytes(MAGIC, "little")
_WORDS_PER_SECTOR = SECTOR_SIZE // 8
_U64 = 1 << 64
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``16M``, ``1G`` (binary units; an optional trailing B or iB)."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in _SIZE_SUFFIXES and s[-1:] else ""
    try:
        value = int(s[: len(s) - len(unit)]) * _SIZE_SUFFIXES[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 64K, 16M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _seed(pass_no: int, block: int) -> int:
    return (
        (pass_no + 1) * 0x9E3779B97F4A7C15 ^ (block + 1) * 0xC2B2AE3D27D4EB4F
    ) & 0xFFFF_FFFF_FFFF_FFFF


def _pattern_slow(block_size: int, pass_no: int, block: int) -> bytes:
    """:func:`pattern` sector by sector with struct (the reference; big-endian hosts use it)."""
    filler = struct.pack("<Q", _seed(pass_no, block)) * ((SECTOR_SIZE - _SECTOR_HEADER.size) // 8)
    return b"".join(
        _SECTOR_HEADER.pack(MAGIC, pass_no, block, k, block_size) + filler
        for k in range(block_size // SECTOR_SIZE)
    )


@functools.lru_cache(maxsize=8)
def _sector_words(block_size: int) -> tuple[array[int], array[int]]:
    """Per block size: each sector's magic word and its ``sector | block_size << 32`` word."""
    n = block_size // SECTOR_SIZE
    return array("Q", [_MAGIC_WORD]) * n, array("Q", [k | block_size << 32 for k in range(n)])


def pattern(block_size: int, pass_no: int, block: int) -> bytes:
    """The data written to ``block`` in ``pass_no``: unique per block, per pass and per sector.

    Built as 64-bit words with strided slice assignments (each sector is 64 words: magic, pass,
    block, sector and block size, then the seed 60 times): the driver makes one per request, and
    the per-sector struct version cost as much CPU as the back-end being measured.
    """
    n = block_size // SECTOR_SIZE
    if sys.byteorder != "little" or not 0 <= pass_no < _U64 or not 0 <= block < _U64 or n == 0:
        return _pattern_slow(block_size, pass_no, block)
    magic, sectors = _sector_words(block_size)
    words = array("Q", [_seed(pass_no, block)]) * (n * _WORDS_PER_SECTOR)
    words[0::_WORDS_PER_SECTOR] = magic
    words[1::_WORDS_PER_SECTOR] = array("Q", [pass_no]) * n
    words[2::_WORDS_PER_SECTOR] = array("Q", [block]) * n
    words[3::_WORDS_PER_SECTOR] = sectors
    return words.tobytes()


def check_block(data: bytes, block_size: int, block: int) -> int:
    """The pass whose pattern ``data`` (a whole block read back) holds; ValueError otherwise."""
    magic, pass_no, _, _, _ = _SECTOR_HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise ValueError(f"block {block}: no pattern header (first bytes {data[:16].hex()})")
    if data != pattern(block_size, pass_no, block):
        raise ValueError(f"block {block}: {describe_mismatch(data, block_size, pass_no, block)}")
    return int(pass_no)


def describe_mismatch(data: bytes, block_size: int, pass_no: int, block: int) -> str:
    """Say how ``data`` differs from the expected pattern: stale, misplaced or garbage."""
    expected = pattern(block_size, pass_no, block)
    if len(data) != len(expected):
        return f"read {len(data)} bytes, expected {len(expected)}"
    for k in range(0, block_size, SECTOR_SIZE):
        got = data[k : k + SECTOR_SIZE]
        if got == expected[k : k + SECTOR_SIZE]:
            continue
        first = next(i for i in range(SECTOR_SIZE) if got[i] != expected[k + i])
        magic, p, b, s, _ = _SECTOR_HEADER.unpack_from(got, 0)
        where = f"sector {k // SECTOR_SIZE} of the block, byte {k + first}"
        if magic == MAGIC and (p, b, s) != (pass_no, block, k // SECTOR_SIZE):
            return (
                f"{where}: holds pass {p} block {b} sector {s}, expected pass {pass_no} "
                f"block {block} sector {k // SECTOR_SIZE}"
                + (" (stale data)" if b == block and p != pass_no else " (misplaced data)")
            )
        return (
            f"{where}: read {got[first : first + 8].hex()}, "
            f"expected {expected[k + first : k + first + 8].hex()} (corrupted)"
        )
    return "no difference"  # pragma: no cover - only called on a mismatch


@dataclass
class ExerciseOptions:
    """What ``exercise blk`` does; the command-line flags map one to one."""

    socket: str
    seconds: float = 5.0
    queue_depth: int = 1
    block_size: int = 4096
    queues: int = 1
    region: int | None = None
    passes: int | None = None
    reconnect: float = 30.0
    io_timeout: float = 30.0
    connect_timeout: float = 10.0
    """Seconds to wait for the back-end's socket at start (``--connect-timeout``)."""
    packed: bool = False
    indirect: bool = False
    poll_us: int = 0
    """The driver polls the used rings this long before sleeping on the call eventfds."""
    progress: bool = True
    jobs: int = 1
    """Driver processes after negotiation (``--jobs``): job ``q % jobs`` drives queue ``q``."""


@dataclass
class ExerciseResult:
    """What ``exercise blk`` found; :meth:`to_json` is the ``--json`` object."""

    socket: str
    ok: bool = False
    errors: int = 0
    error_details: list[str] = field(default_factory=list)
    fatal: str | None = None
    iops: float = 0.0
    mb_per_s: float = 0.0
    elapsed: float = 0.0
    cpu_seconds: float = 0.0
    """CPU time (user + system) this process spent in the timed run: the driver's cost."""
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    verified_bytes: int = 0
    verified_blocks: int = 0
    flushes: int = 0
    passes: int = 0
    next_block: int = 0
    block_size: int = 0
    queue_depth: int = 0
    queues: int = 0
    region: int = 0
    capacity: int = 0
    blk_size: int = 0
    id: str = ""
    features: str = "0x0"
    feature_names: list[str] = field(default_factory=list)
    protocol_features: str = "0x0"
    read_only: bool = False
    packed: bool = False
    inflight_mode: bool = False
    reconnects: int = 0
    resubmitted: int = 0
    in_flight_at_loss: int = 0
    checks: list[str] = field(default_factory=list)
    jobs: int = 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_details) < _MAX_DETAILS:
            self.error_details.append(message)


def _queue_size(depth: int) -> int:
    size = 128
    while size < 3 * depth:
        size *= 2
    return size


class _Runner:
    """The write / read-back / verify pipeline over all queues, ``queue_depth`` deep each."""

    def __init__(
        self,
        blk: BlkDriver,
        opts: ExerciseOptions,
        result: ExerciseResult,
        *,
        first_block: int = 0,
    ) -> None:
        self.blk = blk
        self.opts = opts
        self.result = result
        self.bs = opts.block_size
        self.sectors_per_block = opts.block_size // SECTOR_SIZE
        self.first_block = first_block
        """Block numbers (the pattern's and the disk's) start here: a job's slice of the region."""
        self.blocks = result.region // opts.block_size
        self.pass_no = 0
        self.next_block = 0
        self.busy: dict[int, tuple[str, int, int]] = {}  # token -> (kind, block, pass)
        self.in_use: set[int] = set()
        self.expected: dict[int, bytes] = {}  # block -> the pattern written, until verified
        self.ready_reads: deque[tuple[int, int]] = deque()
        self.per_queue = [0] * opts.queues
        self.done_blocks = 0

    def _pick_queue(self) -> int | None:
        best = None
        for q, n in enumerate(self.per_queue):
            if n < self.opts.queue_depth and (best is None or n < self.per_queue[best]):
                best = q
        return best

    def _issue(self, stopping: bool) -> set[int]:
        kicked: set[int] = set()
        while True:
            q = self._pick_queue()
            if q is None:
                break
            if self.ready_reads:
                block, p = self.ready_reads.popleft()
                token = self.blk.submit_read(
                    block * self.sectors_per_block, self.bs, queue=q, kick=False
                )
                self.busy[token] = ("read", block, p)
            elif (
                not stopping
                and self.first_block + self.next_block not in self.in_use
                and (self.opts.passes is None or self.pass_no < self.opts.passes)
            ):
                block, p = self.first_block + self.next_block, self.pass_no
                data = pattern(self.bs, p, block)
                token = self.blk.submit_write(
                    block * self.sectors_per_block, data, queue=q, kick=False
                )
                self.busy[token] = ("write", block, p)
                self.in_use.add(block)
                self.expected[block] = data
                self.next_block += 1
                if self.next_block == self.blocks:
                    self.next_block = 0
                    self.pass_no += 1
            else:
                break
            self.per_queue[q] += 1
            kicked.add(q)
        for q in kicked:
            self.blk.kick(q)
        return kicked

    def _complete(self, done: BlkCompletion) -> None:
        kind, block, p = self.busy.pop(done.token)
        self.per_queue[done.queue] -= 1
        res = self.result
        if not done.ok:
            res.error(f"{done.error()} (block {block}, pass {p})")
            self.in_use.discard(block)
            self.expected.pop(block, None)
            return
        if kind == "write":
            res.writes += 1
            res.bytes_written += self.bs
            self.ready_reads.append((block, p))
            return
        res.reads += 1
        res.bytes_read += self.bs
        self.in_use.discard(block)
        data = done.data or b""
        expected = self.expected.pop(block, None)
        if data == (pattern(self.bs, p, block) if expected is None else expected):
            res.verified_bytes += self.bs
            res.verified_blocks += 1
            self.done_blocks += 1
        else:
            res.error(
                f"IN sector {block * self.sectors_per_block} (block {block}, pass {p}): "
                f"{describe_mismatch(data, self.bs, p, block)}"
            )

    def _finished(self, start: float, now: float) -> bool:
        opts = self.opts
        if opts.passes is not None and self.pass_no >= opts.passes:
            return True
        if opts.seconds <= 0 and opts.passes is not None:
            return False
        minimum = min(self.blocks, opts.queues * opts.queue_depth)
        return now - start >= opts.seconds and self.done_blocks >= minimum

    def run(self, progress: IO[str] | None) -> float:
        start = time.monotonic()
        next_report = start + 1.0
        last_progress = start
        stopping = False
        while True:
            now = time.monotonic()
            if not stopping and self._finished(start, now):
                stopping = True
            self._issue(stopping)
            if not self.busy and not self.ready_reads:
                if stopping:
                    break
                continue
            got = self.blk.reap(min(1.0, self.opts.io_timeout))
            now = time.monotonic()
            if got:
                last_progress = now
            elif now - last_progress > self.opts.io_timeout:
                raise TimeoutError(
                    f"no request completed for {self.opts.io_timeout:g} s "
                    f"({len(self.busy)} in flight)"
                )
            for done in got:
                self._complete(done)
            if progress is not None and now >= next_report:
                next_report = now + 1.0
                self._report(progress, now - start)
        self.result.passes = self.pass_no
        self.result.next_block = self.next_block
        return time.monotonic() - start

    def _report(self, out: IO[str], elapsed: float) -> None:
        res = self.result
        ios = res.reads + res.writes
        mb = (res.bytes_read + res.bytes_written) / 1e6
        print(
            f"exercise: {elapsed:5.1f} s  {ios / elapsed:9.0f} IOPS  {mb / elapsed:8.1f} MB/s  "
            f"pass {self.pass_no}  errors {res.errors}  reconnects {self.blk.session.reconnects}",
            file=out,
            flush=True,
        )


def _checks(blk: BlkDriver, result: ExerciseResult, block_size: int) -> None:
    """FLUSH, GET_ID, and WRITE_ZEROES / DISCARD when offered, on the first block of the region."""
    result.id = blk.serial()
    result.checks.append(f"GET_ID: {result.id!r}")
    if blk.has_feature(vf.BLK_F_FLUSH):
        blk.flush()
        result.flushes += 1
        result.checks.append("FLUSH: ok")
    if result.read_only:
        return
    sectors = block_size // SECTOR_SIZE
    if blk.has_feature(vf.BLK_F_WRITE_ZEROES):
        blk.write(0, b"\xa5" * block_size)
        blk.write_zeroes(0, sectors)
        if blk.read(0, block_size) != bytes(block_size):
            result.error("WRITE_ZEROES sector 0: the block does not read back as zeros")
        else:
            result.checks.append(f"WRITE_ZEROES: {sectors} sectors read back as zeros")
    if blk.has_feature(vf.BLK_F_DISCARD):
        blk.discard(0, sectors)
        result.checks.append(f"DISCARD: {sectors} sectors ok")


def _memory_size(opts: ExerciseOptions) -> int:
    """Guest memory for the run: buffers of every request in flight plus the rings, in 2 MiB."""
    depth = opts.queue_depth * opts.queues
    mem_size = 4 << 20
    mem_size += depth * (opts.block_size + 256) * 2
    mem_size += opts.queues * 16 * 4 * _queue_size(opts.queue_depth)
    return -(-mem_size // (2 << 20)) * (2 << 20)


def run_exercise(opts: ExerciseOptions, progress: IO[str] | None = None) -> ExerciseResult:
    """Run the whole exercise against ``opts.socket``; never raises for back-end faults."""
    result = ExerciseResult(
        opts.socket,
        block_size=opts.block_size,
        queue_depth=opts.queue_depth,
        queues=opts.queues,
        jobs=opts.jobs,
    )
    if opts.block_size % SECTOR_SIZE or opts.block_size <= 0:
        result.fatal = f"block size {opts.block_size} is not a multiple of {SECTOR_SIZE}"
        result.errors += 1
        return result
    mem_size = _memory_size(opts)
    session: DriverSession | None = None
    try:
        session = DriverSession.connect(
            opts.socket,
            num_queues=opts.queues,
            queue_size=_queue_size(opts.queue_depth),
            mem_size=mem_size,
            packed=opts.packed,
            indirect=opts.indirect,
            reconnect=opts.reconnect,
            connect_timeout=opts.connect_timeout,
        )
        session.poll_us = opts.poll_us
        blk = BlkDriver(session)
        cfg = blk.config
        result.capacity = cfg.capacity_bytes
        result.blk_size = cfg.blk_size
        result.features = f"{session.features:#x}"
        result.feature_names = feature_names(session.features, "blk")
        result.protocol_features = f"{session.protocol_features:#x}"
        result.read_only = blk.read_only
        result.packed = session.packed
        result.inflight_mode = session.inflight_mode
        region = min(cfg.capacity_bytes, opts.region or 64 << 20)
        region -= region % opts.block_size
        result.region = region
        if region == 0:
            raise VhostError(
                f"the disk ({cfg.capacity_bytes} bytes) is smaller than one block "
                f"({opts.block_size} bytes)"
            )
        _checks(blk, result, opts.block_size)
        if opts.jobs > 1:
            elapsed = _run_jobs(session, opts, result, region)
        else:
            elapsed = _run_here(blk, opts, result, progress)
        result.elapsed = elapsed
        ios = result.reads + result.writes
        result.iops = round(ios / elapsed, 1) if elapsed > 0 else 0.0
        moved = result.bytes_read + result.bytes_written
        result.mb_per_s = round(moved / 1e6 / elapsed, 2) if elapsed > 0 else 0.0
    except (VhostError, OSError, TimeoutError) as exc:
        result.fatal = f"{type(exc).__name__}: {exc}"
        result.errors += 1
    finally:
        if session is not None:
            result.reconnects = session.reconnects
            result.resubmitted = session.resubmitted
            result.in_flight_at_loss = session.in_flight_at_loss
            session.close()
    result.ok = result.errors == 0 and result.fatal is None
    return result


def _run_here(
    blk: BlkDriver, opts: ExerciseOptions, result: ExerciseResult, progress: IO[str] | None
) -> float:
    """The timed run in this process; the final FLUSH; the elapsed time."""
    runner = _Runner(blk, opts, result)
    cpu_start = time.process_time()
    elapsed = runner.run(progress)
    result.cpu_seconds = round(time.process_time() - cpu_start, 3)
    if blk.has_feature(vf.BLK_F_FLUSH):
        blk.flush()
        result.flushes += 1
    return elapsed


_SUMMED = (
    "errors", "reads", "writes", "bytes_read", "bytes_written", "verified_bytes",
    "verified_blocks", "flushes", "cpu_seconds",
)  # fmt: skip


def _run_jobs(
    session: DriverSession, opts: ExerciseOptions, result: ExerciseResult, region: int
) -> float:
    """``--jobs``: the queues driven by job processes (:mod:`pyvhost.cli.exercise_jobs`); their
    results summed into ``result``; the longest job's elapsed time returned."""
    from pyvhost.cli.exercise_jobs import run_jobs

    try:
        elapsed, outs = run_jobs(session, opts, result, opts.jobs, region)
    except ValueError as exc:
        raise VhostError(str(exc)) from exc
    for job, out in enumerate(outs):
        for key in _SUMMED:
            setattr(result, key, getattr(result, key) + out.get(key, 0))
        for detail in out.get("error_details", []):
            if len(result.error_details) < _MAX_DETAILS:
                result.error_details.append(f"job {job}: {detail}")
        if out.get("fatal"):
            result.errors += 1
            result.error_details.append(f"job {job}: {out['fatal']}")
    result.cpu_seconds = round(result.cpu_seconds, 3)
    result.passes = min(int(out.get("passes", 0)) for out in outs)
    return elapsed


def format_report(result: ExerciseResult) -> str:
    """The human report: what was found, what was verified, how fast."""
    lines = [
        f"back-end      {result.socket}",
        f"disk          {result.capacity} bytes ({result.capacity // (1 << 20)} MiB), "
        f"blk_size {result.blk_size}, id {result.id!r}"
        + (", read-only" if result.read_only else ""),
        f"features      {result.features} {' '.join(result.feature_names)}",
        f"protocol      {result.protocol_features}"
        + (" (inflight tracking)" if result.inflight_mode else ""),
        f"run           {result.queues} queue(s) x depth {result.queue_depth}, "
        f"{result.block_size}-byte blocks over {result.region} bytes, "
        f"{result.passes} full pass(es)"
        + (f", driven by {result.jobs} job processes" if result.jobs > 1 else ""),
    ]
    lines += [f"check         {c}" for c in result.checks]
    lines.append(
        f"verified      {result.verified_bytes} bytes in {result.verified_blocks} blocks "
        f"({result.writes} writes, {result.reads} reads, {result.flushes} flushes)"
    )
    lines.append(f"speed         {result.iops:.0f} IOPS, {result.mb_per_s:.1f} MB/s")
    if result.reconnects:
        lines.append(
            f"reconnects    {result.reconnects} ({result.in_flight_at_loss} requests in flight, "
            f"driver resubmitted {result.resubmitted}"
            + (", back-end resubmitted from its inflight region)" if result.inflight_mode else ")")
        )
    if result.fatal:
        lines.append(f"FAILED        {result.fatal}")
    lines += [f"ERROR         {d}" for d in result.error_details]
    if result.errors > len(result.error_details):
        lines.append(f"              ... {result.errors - len(result.error_details)} more")
    lines.append("result        " + ("OK" if result.ok else f"{result.errors} error(s)"))
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``exercise blk``, ``net``, ``scsi`` and ``vsock``."""
    parser = subparsers.add_parser(
        "exercise",
        help="drive a vhost-user back-end as a guest driver would, and verify it",
        description="Act as front-end and guest driver at once (no VM) and verify a back-end.",
    )
    devices = parser.add_subparsers(dest="device", metavar="DEVICE", required=True)
    blk = devices.add_parser(
        "blk",
        help="write, read back and verify patterns on a vhost-user-blk back-end",
        description=__doc__,
    )
    blk.add_argument("--socket", required=True, help="the back-end's Unix socket")
    blk.add_argument("--seconds", type=float, default=5.0, help="how long to run (default 5)")
    blk.add_argument("--queue-depth", type=int, default=1, help="requests in flight per queue")
    blk.add_argument(
        "--block-size", type=parse_size, default=4096, help="bytes per request (default 4K)"
    )
    blk.add_argument("--queues", type=int, default=1, help="virtqueues to use (default 1)")
    blk.add_argument(
        "--region",
        type=parse_size,
        default=None,
        help="bytes of the disk to use, from sector 0 (default: min(disk, 64M))",
    )
    blk.add_argument(
        "--passes", type=int, default=None, help="stop after this many passes over the region"
    )
    blk.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the back-end's socket at start (0: one try; default 10)",
    )
    blk.add_argument(
        "--reconnect-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for a back-end that went away (0: fail at once)",
    )
    blk.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help=(
            "driver processes: after negotiation queue q is driven by process q %% N, so that "
            "the driver is not the bottleneck of a multi-queue back-end (split or packed "
            "rings, no reconnection; default 1)"
        ),
    )
    blk.add_argument("--packed", action="store_true", help="use packed virtqueues")
    blk.add_argument("--indirect", action="store_true", help="use indirect descriptors")
    blk.add_argument(
        "--poll-us",
        type=int,
        default=0,
        metavar="US",
        help="poll the used rings this long (interrupts off) before sleeping (default 0)",
    )
    blk.add_argument("--json", action="store_true", help="print one JSON object")
    blk.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    exercise_net.add_parser(devices)
    exercise_scsi.add_parser(devices)
    exercise_vsock.add_parser(devices)


def run(args: argparse.Namespace) -> int:
    """Run ``exercise DEVICE``; 0 when everything verified, 1 otherwise."""
    if args.device in _KERNEL_TOOLS:
        return _run_kernel(args)
    if args.queue_depth < 1 or args.queues < 1:
        print("exercise: --queue-depth and --queues must be at least 1", file=sys.stderr)
        return 2
    if not 1 <= args.jobs <= args.queues:
        print("exercise: --jobs must be between 1 and --queues", file=sys.stderr)
        return 2
    opts = ExerciseOptions(
        socket=args.socket,
        seconds=args.seconds,
        queue_depth=args.queue_depth,
        block_size=args.block_size,
        queues=args.queues,
        region=args.region,
        passes=args.passes,
        reconnect=args.reconnect_timeout,
        connect_timeout=args.connect_timeout,
        packed=args.packed,
        indirect=args.indirect,
        jobs=args.jobs,
        poll_us=max(0, args.poll_us),
    )
    result = run_exercise(opts, None if args.quiet else sys.stderr)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_report(result))
    return 0 if result.ok else 1


_KERNEL_TOOLS: dict[str, Any] = {
    "net": exercise_net,
    "scsi": exercise_scsi,
    "vsock": exercise_vsock,
}


def _run_kernel(args: argparse.Namespace) -> int:
    """``exercise net|scsi|vsock`` (kernel devices): one report, exit 1 on any error."""
    tool = _KERNEL_TOOLS[args.device]
    try:
        result = tool.run(args)
    except (VhostError, ValueError, OSError) as exc:
        print(f"exercise {args.device}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(tool.format_report(result))
    return 0 if result.ok else 1
