"""Live migration of a Linux guest whose disk is served by ``pyvhost serve blk``.

Source and destination QEMU run on this host, each with its own ``pyvhost serve blk`` on the
same raw image (peers/migration.py). The guest writes a pattern to the disk and reads it back,
O_DIRECT and buffered, phase after phase, each pass on a fresh stretch of the disk; the test
migrates it while it does so, and the guest stops after a whole phase run on the destination.
Meanwhile one long-lived ``dd iflag=direct`` reads another stretch slowly (a drain throttles it
through a FIFO): its buffer is written by the back-end again and again but never by the guest's
CPU, so a page the source back-end fails to log stays stale on the destination, where the RAM
comparison sees it (pages the CPU writes too are re-sent anyway and would hide the bug).

What that shows:
- no request is lost or corrupted across the switch: every read-back has the pattern's checksum,
  and the image holds exactly the passes the guest reported;
- the source back-end's dirty log covers every page it wrote into guest RAM: right after the
  migration, the destination still paused, both guests' RAM is the same page for page (a page
  written without being logged keeps its old content on the destination);
- the source back-end did I/O while the migration ran: the migration is held from converging
  until the guest has reported two more I/O steps after QEMU's first pass over RAM, whatever the
  host's load, and the back-end's byte counters moved in between;
- the destination back-end takes the rings over where the source left them (the guest finishes
  its I/O there and reports through the destination's serial port).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from peers.guest import RESULT_END, GuestAssets
from peers.migration import (
    GUEST_RAM_MEMFD,
    PAGE,
    SIDE_PATH,
    MigrationPair,
    Side,
    describe_pages,
    page_detail,
)
from peers.qemu import PeerProcess, make_raw_image

from .blk_support import (
    SECTOR,
    main_pid,
    problems,
    serve_blk,
    stopped_bases,
)
from .test_guest_blk import AWK_PATTERN, sector_pattern

pytestmark = [pytest.mark.qemu, pytest.mark.guest, pytest.mark.timeout(150)]

MIB = 1 << 20
MEMORY = "262152K"
"""256 MiB + 8 KiB: QEMU 7.2 under TCG loses guest writes in its dirty bitmap when guest RAM is
a multiple of 256 KiB (GUEST.md)."""
MAX_BANDWIDTH = 64 * MIB
PATTERN_MIB = 32
MAX_PHASES = 6
"""Each phase writes two passes (O_DIRECT, buffered), each on its own slot of the image."""
SLOTS = 2 * MAX_PHASES
READER_AT = SLOTS * PATTERN_MIB * MIB
READER_SIZE = 64 * MIB
"""The slow reader's stretch of the image, after the slots: filled by the host, every sector
different (`_filler`)."""
READER_BS = 64 << 10
IMAGE_SIZE = READER_AT + READER_SIZE
LOG_ALL_BIT = 26
WRITES = "source-writes.txt"
"""Where the source back-end records what it may write (`RECORDING`)."""

BOOT_TIMEOUT = 40.0
"""Until the guest says its I/O loop has started."""
FINISH_TIMEOUT = 60.0
STALL_S = 15.0
"""The guest printing nothing for this long (it prints a line for every 32 MiB moved) hangs."""

SCRIPT = f"""set -e
side() {{ read -r word <{SIDE_PATH}; echo "$word"; }}
{AWK_PATTERN.replace("COUNT", str(PATTERN_MIB * MIB // SECTOR))} >/tmp/pattern
echo "pattern $(sha256sum </tmp/pattern)"
pass() {{
    if [ $2 = direct ]; then w=oflag=direct r=iflag=direct; else w= r=; fi
    dd if=/tmp/pattern of=/dev/vda bs=1M seek=$(($3 * {PATTERN_MIB})) $w 2>/dev/null
    sync
    echo "wrote $1 $2 $3"
    echo 3 >/proc/sys/vm/drop_caches
    sum=$(dd if=/dev/vda bs=1M skip=$(($3 * {PATTERN_MIB})) count={PATTERN_MIB} $r 2>/dev/null \\
        | sha256sum)
    echo "read $1 $2 $3 $sum"
}}
mkfifo /tmp/slow
dd if=/dev/vda of=/tmp/slow bs={READER_BS} skip={READER_AT // READER_BS} \
    count={READER_SIZE // READER_BS} iflag=direct 2>/dev/null &
reader=$!
(while :; do head -c {READER_BS} >/dev/null; sleep 0.05; done) </tmp/slow &
drain=$!
echo "io started on $(side)"
phase=0
while :; do
    phase=$((phase + 1))
    if [ $phase -gt {MAX_PHASES} ]; then
        echo "still not migrated after {MAX_PHASES} phases"; exit 1
    fi
    begin=$(side)
    pass $phase direct $((2 * phase - 2))
    pass $phase buffered $((2 * phase - 1))
    echo "phase $phase $begin $(side)"
    if [ $begin = target ]; then break; fi
done
if kill $reader 2>/dev/null; then echo "reader stopped"; else echo "reader had finished"; fi
kill $drain
"""

RECORDING = """import ctypes, sys, time
from pyvhost.cli.main import main
from pyvhost.devices.blk import BlkBackend
from pyvhost.virtio.memory import DirtyLog
from pyvhost.virtio.packed import PackedQueue
from pyvhost.virtio.split import SplitQueue

out = open(sys.argv[1], "a")
args = sys.argv[2:]
if args[0] == "--unlogged":
    DirtyLog.mark = lambda self, gpa, length: None
    args = args[1:]

def record(tag, views):
    lines = []
    for view in views:
        try:
            at = ctypes.addressof(ctypes.c_char.from_buffer(view))
        except (TypeError, ValueError):
            continue
        if view.nbytes:
            lines.append(f"{tag} {at:x} {view.nbytes:x}\\n")
    out.write("".join(lines))
    out.flush()

handle = BlkBackend.handle
def recorded(self, chain, queue=0):
    used = handle(self, chain, queue)
    record(f"{time.monotonic():.6f}", chain.writable)
    return used
BlkBackend.handle = recorded

def rings(cls):
    init = cls.__init__
    def wrapped(self, *a, **k):
        init(self, *a, **k)
        record("ring", [v for v in vars(self).values() if isinstance(v, memoryview)])
    cls.__init__ = wrapped
rings(PackedQueue)
rings(SplitQueue)
sys.exit(main(args))
"""
"""``pyvhost serve`` (``python -c RECORDING FILE [--unlogged] ARGS``) that appends to FILE the
host address and length of every writable buffer of each request it completes (with the time)
and of every ring area it maps ("ring"): the pages the back-end may write, recorded apart from
its dirty log. With ``--unlogged`` its dirty log never gets a bit set."""

_PHASE = re.compile(r"^phase (\d+) (\w+) (\w+)$", re.M)
_WROTE = re.compile(r"^wrote (\d+) (\w+) (\d+)$", re.M)
_STEP = re.compile(r"^(?:wrote|read) ", re.M)
_READ = re.compile(r"^read (\d+) (\w+) (\d+) ([0-9a-f]{64})", re.M)
_SET_FEATURES = re.compile(r"<- SET_FEATURES (?:need_reply )?u64=(0x[0-9a-f]+)")
_LOGGED_VRING = re.compile(r"<- SET_VRING_ADDR (?:need_reply )?index=0 flags=0x1 ")


def _io_bytes(proc: PeerProcess) -> int:
    """Bytes the back-end has read and written so far (rchar + wchar: its preadv and pwritev
    between the image and guest RAM, plus a little socket and eventfd traffic)."""
    fields = dict(
        line.split(": ") for line in Path(f"/proc/{main_pid(proc)}/io").read_text().splitlines()
    )
    return int(fields["rchar"]) + int(fields["wchar"])


def _steps(side: Side) -> int:
    """I/O steps (a 32 MiB write or read-back) the guest reported through `side`'s port."""
    return len(_STEP.findall(side.result_text))


def _until_steps(side: Side, steps: int = 2) -> Callable[[], bool]:
    """A `MigrationPair.migrate` hold: True until the guest has reported `steps` more I/O steps
    on `side` than when first asked (once the migration's first pass over RAM is done)."""
    start: list[int] = []

    def hold() -> bool:
        done = _steps(side)
        if not start:
            start.append(done)
        return done < start[0] + steps

    return hold


def _wait_for(side: Side, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in side.result_text:
        if side.vm.returncode is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"the guest did not print {text!r} on the {side.role} within {timeout:g} s\n"
                f"result port:\n{side.result_text[-2000:]}\nconsole:\n{side.vm.console[-3000:]}\n"
                f"{side.describe()}"
            )
        time.sleep(0.05)


def _vring_lines(log: str) -> str:
    """What a serve log says about starting and stopping rings and the bases it was given."""
    keep = ("vring", "VRING_BASE", "INFLIGHT_FD")
    return "\n".join(line for line in log.splitlines() if any(k in line for k in keep))[-3000:]


def _written_pages(record: Path, pid: int, since: float) -> set[int]:
    """RAM offsets of the pages the source back-end (pid `pid`) may have written since `since`
    (time.monotonic): its rings at any time, the writable buffers of requests it completed
    from then on (the `RECORDING` file `record`), through its mappings of the guest's memfd."""
    maps = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(GUEST_RAM_MEMFD):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            maps.append((start, end, int(fields[2], 16)))
    pages: set[int] = set()
    for line in record.read_text().splitlines():
        tag, at_hex, size_hex = line.split()
        if tag != "ring" and float(tag) < since:
            continue
        at, size = int(at_hex, 16), int(size_hex, 16)
        for start, end, offset in maps:
            if start <= at < end:
                first = (offset + at - start) // PAGE
                last = (offset + at - start + size - 1) // PAGE
                pages.update(page * PAGE for page in range(first, last + 1))
    return pages


def _ram_report(pair: MigrationPair, pages: list[tuple[int, int]], what: str) -> str:
    """Which pages differ and how."""
    src, dst = pair.source.ram, pair.destination.ram
    details = [page_detail(src, dst, at) for at, _ in pages[:4]]
    return "\n".join([f"{what}: " + describe_pages(pages, src.stat().st_size), *details])


def _run_to_end(pair: MigrationPair, backend: PeerProcess) -> None:
    """Wait for the destination guest to power off; on a stall, pause it (the back-end then
    logs where its rings stopped) and fail with what the guest and back-end said."""
    dst = pair.destination
    deadline = time.monotonic() + FINISH_TIMEOUT
    seen, since = -1, time.monotonic()
    while dst.vm.returncode is None:
        text = dst.result_text
        if len(text) != seen:
            seen, since = len(text), time.monotonic()
        now = time.monotonic()
        if now - since > STALL_S or now > deadline:
            dst.qmp.execute("stop")
            time.sleep(1)
            raise AssertionError(
                f"guest on the destination made no progress for {now - since:.0f} s; its last "
                f"lines on the source:\n{pair.source.result_text[-600:]}\n-- migrated --\n"
                f"{text[-1500:]}\ndestination back-end's vrings:\n"
                f"{_vring_lines(backend.stderr)}\nproblems: {problems(backend.stderr)}"
            )
        time.sleep(0.05)


def _filler() -> bytes:
    """The reader's stretch: each sector names itself, unlike any sector of the pattern."""
    fill = b"0123456789" * 52
    parts = []
    for s in range(READER_SIZE // SECTOR):
        head = f"pyvhost filler {s:06d}\n".encode()
        parts.append(head + fill[: SECTOR - len(head)])
    return b"".join(parts)


def _check_image(image: Path, written: set[int]) -> None:
    """Slots the guest wrote hold the pattern, the others are still zero, the filler is intact."""
    pattern = sector_pattern(PATTERN_MIB * MIB // SECTOR)
    zero = bytes(len(pattern))
    wrong = []
    with open(image, "rb") as f:
        for slot in range(SLOTS):
            data = f.read(len(pattern))
            if data != (pattern if slot in written else zero):
                wrong.append(slot)
        filler_intact = f.read() == _filler()
    assert not wrong, f"image slots {wrong} differ (written: {sorted(written)})"
    assert filler_intact, "the reader's stretch of the image changed"


@contextlib.contextmanager
def _pair(
    peer_dir: Path, assets: GuestAssets, ring: str, *, unlogged_source: bool = False
) -> Iterator[tuple[MigrationPair, PeerProcess, PeerProcess, Path]]:
    """Source and destination QEMU, each with its own back-end on one image, booted up to the
    guest's "io started" (the source) and "waiting for the migration" (the destination)."""
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    with open(image, "r+b") as f:
        f.seek(READER_AT)
        f.write(_filler())
    pair = MigrationPair(peer_dir, assets, SCRIPT, memory=MEMORY)
    backends: list[PeerProcess] = []
    try:
        for side in pair.sides:
            sock = peer_dir / f"blk-{side.role}.sock"
            name = f"serve-{side.role}"
            if side is pair.source:
                argv = [sys.executable, "-c", RECORDING, str(peer_dir / WRITES)]
                argv += ["--unlogged"] if unlogged_source else []
                argv += ["-vv", "serve", "blk", "--socket", str(sock), "--image", str(image)]
                backends.append(PeerProcess(argv, peer_dir, name=name, socket=sock).start())
            else:
                backends.append(serve_blk(peer_dir, name, sock, image))
            side.vm.add_vhost_user_blk(sock, packed=ring == "packed")
        pair.start()
        try:
            _wait_for(pair.source, "io started on source", BOOT_TIMEOUT)
        except AssertionError as e:
            logs = [f"{b.name} (status {b.returncode}):\n{b.stderr[-1500:]}" for b in backends]
            raise AssertionError("\n".join([str(e), *logs])) from None
        yield pair, backends[0], backends[1], image
    finally:
        pair.stop()
        for backend in backends:
            backend.stop()


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_guest_io_survives_live_migration(
    peer_dir: Path, guest_assets: GuestAssets, ring: str
) -> None:
    started = time.monotonic()
    with _pair(peer_dir, guest_assets, ring) as (pair, src_backend, dst_backend, image):
        booted = time.monotonic()
        before, steps = _io_bytes(src_backend), _steps(pair.source)
        info = pair.migrate(max_bandwidth=MAX_BANDWIDTH, hold=_until_steps(pair.source))
        moved, steps = _io_bytes(src_backend) - before, _steps(pair.source) - steps
        migrated = time.monotonic()

        pages = pair.ram_differences()
        backend_pages = _written_pages(peer_dir / WRITES, main_pid(src_backend), booted)
        ours = [page for page in pages if page[0] in backend_pages]
        assert not ours, _ram_report(
            pair, ours, "pages the source back-end wrote differ on the destination"
        )
        if pages:
            print(_ram_report(pair, pages, "NOTE: pages only the guest CPU wrote differ (QEMU)"))
        pair.cont()
        _run_to_end(pair, dst_backend)
        finished = time.monotonic()
    print(
        f"{ring}: boot {booted - started:.1f} s, migration {migrated - booted:.1f} s "
        f"(downtime {info.get('downtime')} ms, {info['ram']['dirty-sync-count']} syncs), "
        f"then {finished - migrated:.1f} s on the destination; during the migration the guest "
        f"did {steps} I/O steps, the back-end moved {moved / MIB:.0f} MiB; RAM identical; "
        f"source got {src_backend.stderr.count('<- SET_LOG_BASE')} SET_LOG_BASE, "
        f"{src_backend.stderr.count('<- SET_VRING_ADDR')} SET_VRING_ADDR; phases (begin, end) "
        f"{_PHASE.findall(pair.source.result_text + pair.destination.result_text)}"
    )

    src_log, dst_log = src_backend.stderr, dst_backend.stderr
    result = pair.result()
    assert result is not None, pair.destination.result_text[-2000:]
    exit_code, output = result
    assert exit_code == 0, output[-2000:]
    assert RESULT_END in pair.destination.result_text
    assert RESULT_END not in pair.source.result_text

    digest = hashlib.sha256(sector_pattern(PATTERN_MIB * MIB // SECTOR)).hexdigest()
    assert f"\npattern {digest} " in "\n" + output, output[:500]
    reads = _READ.findall(output)
    assert reads and all(r[3] == digest for r in reads), reads
    written = [int(w[2]) for w in _WROTE.findall(output)]
    assert sorted(written) == sorted(int(r[2]) for r in reads) == list(range(len(written)))
    _check_image(image, set(written))

    phases = [(b, e) for _, b, e in _PHASE.findall(output)]
    sides = [side for phase in phases for side in phase]
    assert sides[0] == "source", phases
    assert sides == sorted(sides, key=lambda side: side == "target"), phases
    assert phases[-1] == ("target", "target"), phases
    assert f"\nphase {len(phases)} target target\n" in pair.destination.result_text
    assert "\nreader stopped\n" in output, "the slow reader did not last the whole run"

    assert steps >= 2, f"the guest did {steps} I/O steps while the migration ran"
    assert moved >= MIB, f"the source back-end moved {moved} bytes while the migration ran"
    assert "SET_LOG_BASE" in src_log
    migrating = src_log.split("<- SET_LOG_BASE", 1)[-1]
    assert any(int(f, 16) >> LOG_ALL_BIT & 1 for f in _SET_FEATURES.findall(migrating)), migrating
    assert _LOGGED_VRING.search(migrating), migrating
    assert "SET_LOG_BASE" not in dst_log
    assert not problems(src_log), problems(src_log)
    assert not problems(dst_log), problems(dst_log)
    base = stopped_bases(src_log)[0]
    assert f"<- SET_VRING_BASE index=0 num={base}\n" in dst_log, _vring_lines(dst_log)


def test_ram_comparison_finds_pages_a_backend_wrote_without_logging(
    peer_dir: Path, guest_assets: GuestAssets
) -> None:
    """The RAM check above can fail: a source back-end that never marks its dirty log leaves
    pages it wrote during the migration stale on the destination, and the comparison lists
    them."""
    with _pair(peer_dir, guest_assets, "split", unlogged_source=True) as (pair, src, _, _):
        since = time.monotonic()
        pair.migrate(max_bandwidth=MAX_BANDWIDTH, hold=_until_steps(pair.source))
        pages = pair.ram_differences()
        backend_pages = _written_pages(peer_dir / WRITES, main_pid(src), since)
        ours = [page for page in pages if page[0] in backend_pages]
        total = pair.source.ram.stat().st_size
    assert ours, "an unlogging back-end went unnoticed: the pages it wrote are identical"
    print("unlogged back-end:", describe_pages(ours, total))
