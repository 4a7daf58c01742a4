"""Restarting ``pyvhost serve blk`` under a running Linux guest loses no request.

QEMU's vhost-user-blk-pci reconnects to a back-end that went away when its chardev has
``reconnect=1``, and hands the new back-end the inflight region (SET_INFLIGHT_FD) its predecessor
filled in. The guest writes and reads back a few MiB in 4 KiB O_DIRECT requests while the test
SIGKILLs the back-end twice, at a moment its inflight region shows requests in flight, or none,
and starts a new one on the same socket and image.

The guest does not race the test: its write phase and its read phase repeat (each write pass on
a fresh stretch of the disk, each later read pass compared with the first) until the test says
on a virtio-serial control port that the phase may end, which it does only once the kills of
that phase are done and the new back-end is serving.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from peers.guest import GuestAssets, GuestResult, boot_guest
from peers.qemu import PeerProcess, QemuVM, make_raw_image

from .blk_support import SECTOR, kill_at, problems, serve_blk, wait_started
from .test_guest_blk import AWK_PATTERN, sector_pattern

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

IMAGE_SIZE = 256 << 20
OFFSET_BLOCKS = 256
"""The first write pass starts at 1 MiB (in 4 KiB blocks); pass P at P - 1 patterns further."""
CHUNKS = 64
CHUNK_BLOCKS = 16
CHUNK_SIZE = CHUNK_BLOCKS * 4096
PATTERN_SIZE = CHUNKS * CHUNK_SIZE
MAX_PASSES = (IMAGE_SIZE - OFFSET_BLOCKS * 4096) // PATTERN_SIZE
QUEUE_SIZE = 128
GUEST_TIMEOUT = 100
CONTROL_PORT = "pyvhost.ctl"

STREAMS = 4
"""Writers (then readers) running at once, each on every STREAMS-th chunk."""

SCRIPT = f"""set -e
{AWK_PATTERN.replace("COUNT", str(PATTERN_SIZE // SECTOR))} >/tmp/pattern
echo "pattern $(sha256sum </tmp/pattern)"
control=
for port in /sys/class/virtio-ports/*; do
    if [ "$(cat $port/name)" = {CONTROL_PORT} ]; then control=/dev/${{port##*/}}; fi
done
[ -n "$control" ] || {{ echo "no virtio-serial port named {CONTROL_PORT}"; exit 1; }}
exec 3<"$control"
(
    while :; do
        if read -r word <&3; then touch "/tmp/stop-$word"; echo "host: stop $word"
        else sleep 0.2; fi
    done
) &
listener=$!
writer() {{
    i=$1 pass=1
    while :; do
        if [ $i -ge {CHUNKS} ]; then i=$1; pass=$((pass + 1)); fi
        if [ $pass -gt 1 ] && [ -e /tmp/stop-write ]; then return 0; fi
        if [ $pass -gt {MAX_PASSES} ]; then
            echo "writer $1: no stop after {MAX_PASSES} passes"; return 1
        fi
        dd if=/tmp/pattern of=/dev/vda bs=4k skip=$((i * {CHUNK_BLOCKS})) \\
            seek=$(({OFFSET_BLOCKS} + (pass - 1) * {CHUNKS * CHUNK_BLOCKS} + i * {CHUNK_BLOCKS})) \\
            count={CHUNK_BLOCKS} oflag=direct 2>/dev/null || {{
            echo "write error $pass $i"; return 1
        }}
        echo "wrote $pass $i"
        i=$((i + {STREAMS}))
    done
}}
reader() {{
    i=$1 pass=1
    while :; do
        if [ $i -ge {CHUNKS} ]; then i=$1; pass=$((pass + 1)); fi
        if [ $pass -gt 1 ] && [ -e /tmp/stop-read ]; then return 0; fi
        if [ $pass -gt {MAX_PASSES} ]; then
            echo "reader $1: no stop after {MAX_PASSES} passes"; return 1
        fi
        out=/tmp/chunk.$i
        if [ $pass -gt 1 ]; then out=/tmp/again.$1; fi
        dd if=/dev/vda of=$out bs=4k skip=$(({OFFSET_BLOCKS} + i * {CHUNK_BLOCKS})) \\
            count={CHUNK_BLOCKS} iflag=direct 2>/dev/null || {{
            echo "read error $pass $i"; return 1
        }}
        if ! cmp -s $out /tmp/chunk.$i; then echo "read mismatch $pass $i"; return 1; fi
        echo "read $pass $i"
        i=$((i + {STREAMS}))
    done
}}
for step in writer reader; do
    pids=""
    s=0
    while [ $s -lt {STREAMS} ]; do $step $s & pids="$pids $!"; s=$((s + 1)); done
    for p in $pids; do wait $p; done
done
kill $listener 2>/dev/null || true
i=0
while [ $i -lt {CHUNKS} ]; do cat /tmp/chunk.$i; i=$((i + 1)); done >/tmp/readback
echo "readback $(sha256sum </tmp/readback)"
"""

KILLS = {
    "in_flight": (("write", 4), ("write", 32)),
    "idle": (("write", 8), ("read", 8)),
}
"""(phase, chunk of its first pass) after which the back-end is killed. Reads keep a back-end
busy too briefly to be caught in the act reliably, so the in-flight kills both land while
writing."""
PHASE_LINE = {"write": "wrote", "read": "read"}

STALL_S = 20.0
"""The guest printing nothing for this long (it prints a line per 64 KiB) means it hangs."""


class _Control:
    """Host end of the guest's control port: QEMU connects to it at start-up; each word sent
    (a line) lets the guest's phase of that name end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sent: list[str] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._conn: socket.socket | None = None

    def qemu_args(self) -> list[str]:
        return [
            "-chardev",
            f"socket,id=ctl0,path={self.path}",
            "-device",
            "virtio-serial-pci",
            "-device",
            f"virtserialport,chardev=ctl0,name={CONTROL_PORT}",
        ]

    def stop(self, phase: str) -> None:
        if self._conn is None:
            self._listener.settimeout(10)
            self._conn, _ = self._listener.accept()
        self._conn.sendall(f"{phase}\n".encode())
        self.sent.append(phase)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._listener.close()


def _watch(vm: QemuVM, guest: threading.Thread, line: str | None) -> None:
    """Wait until the guest prints `line` (None: until it powers off); fail fast when it stalls."""
    path = vm.workdir / "result.log"
    seen, since = -1, time.monotonic()
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if line is not None and f"\n{line}\n" in text.replace("\r\n", "\n"):
            return
        if not guest.is_alive():
            if line is None:
                return
            raise AssertionError(f"guest finished before printing {line!r}")
        if len(text) != seen:
            seen, since = len(text), time.monotonic()
        elif time.monotonic() - since > STALL_S and "PYVHOST-RESULT-BEGIN" in text:
            raise AssertionError(
                f"guest made no progress for {STALL_S:g} s; last output:\n{text[-500:]}"
            )
        time.sleep(0.02)


def _guest_phase(vm: QemuVM, control: _Control) -> str:
    """What the guest was doing: its last lines and the phase ends it was sent."""
    lines = vm.serial_text(1).replace("\r\n", "\n").strip().splitlines()
    return f"guest's last lines {lines[-3:]}, phase ends sent {control.sent}"


def _written(output: str) -> set[tuple[int, int]]:
    """(pass, chunk) of every write the guest reported done."""
    found = set()
    for line in output.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "wrote":
            found.add((int(words[1]), int(words[2])))
    return found


def _expected_image(written: set[tuple[int, int]]) -> bytes:
    """The image after those writes: each pass's chunks hold the pattern, all else is zero."""
    pattern = sector_pattern(PATTERN_SIZE // SECTOR)
    image = bytearray(IMAGE_SIZE)
    for pass_, chunk in written:
        at = OFFSET_BLOCKS * 4096 + (pass_ - 1) * PATTERN_SIZE + chunk * CHUNK_SIZE
        image[at : at + CHUNK_SIZE] = pattern[chunk * CHUNK_SIZE : (chunk + 1) * CHUNK_SIZE]
    return bytes(image)


def _first_difference(a: bytes, b: bytes) -> int | None:
    """Offset of the first byte where `a` and `b` differ (None when equal)."""
    if a == b:
        return None
    step = 4096
    for at in range(0, min(len(a), len(b)), step):
        x, y = a[at : at + step], b[at : at + step]
        if x != y:
            return at + next(i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q)
    return min(len(a), len(b))


@pytest.mark.parametrize(
    ("ring", "moment", "mode"),
    [
        ("split", "in_flight", "thread"),
        ("split", "idle", "thread"),
        ("packed", "in_flight", "thread"),
        ("split", "in_flight", "process"),
        ("packed", "in_flight", "process"),
        ("split", "in_flight", "worker"),
        ("packed", "in_flight", "worker"),
    ],
)
def test_backend_restart_under_running_guest_loses_no_request(
    peer_dir: Path,
    guest_vm: QemuVM,
    guest_assets: GuestAssets,
    *,
    ring: str,
    moment: str,
    mode: str,
) -> None:
    """In process mode the daemon is killed with its worker process (which serves the queue and
    holds the requests in flight): the worker dies with it, and the next daemon's worker redoes
    them from the inflight region. Mode ``worker``: only the worker process is killed; the
    daemon replaces it on the same connection (QEMU notices nothing) and the new worker redoes
    the requests from the inflight region."""
    packed = ring == "packed"
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    sock = peer_dir / "blk.sock"
    control = _Control(peer_dir / "ctl.sock")
    workers_only = mode == "worker"
    mode_args = ("--worker-mode", "process" if workers_only else mode)
    daemons: list[PeerProcess] = [serve_blk(peer_dir, "serve-0", sock, image, *mode_args)]
    guest_vm.extra_args += [
        "-chardev",
        f"socket,id=rc0,path={sock},reconnect=1",
        "-device",
        f"vhost-user-blk-pci,chardev=rc0,num-queues=1,queue-size={QUEUE_SIZE}"
        + (",packed=on" if packed else ""),
        *control.qemu_args(),
    ]
    outcome: dict[str, GuestResult | BaseException] = {}

    def run_guest() -> None:
        try:
            outcome["result"] = boot_guest(
                guest_vm, SCRIPT, timeout=GUEST_TIMEOUT, assets=guest_assets
            )
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    guest = threading.Thread(target=run_guest, name="guest")
    guest.start()
    killed_with: list[int] = []
    try:
        for k in range(len(KILLS[moment])):
            killed_with.append(
                _kill_at_point(
                    guest_vm,
                    guest,
                    control,
                    daemons,
                    moment=moment,
                    k=k,
                    sock=sock,
                    packed=packed,
                    workers_only=workers_only,
                )
            )
            if workers_only:
                _wait_replaced(daemons[0], k + 1)
            else:
                daemons.append(
                    serve_blk(peer_dir, f"serve-{len(daemons)}", sock, image, *mode_args)
                )
                wait_started(daemons[-1])
            _stop_finished_phases(control, KILLS[moment][k + 1 :])
        _watch(guest_vm, guest, None)
    except BaseException:
        guest_vm.stop()
        raise
    finally:
        guest.join(GUEST_TIMEOUT + 30)
        control.close()
        for daemon in daemons:
            daemon.stop()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    result = outcome["result"]
    assert isinstance(result, GuestResult)
    logs = [d.stderr for d in daemons]
    context = f"\nguest output tail:\n{result.output[-1500:]}\nQEMU:\n{guest_vm.stderr[-2000:]}"
    assert result.exit_code == 0, context + "\nlast serve log:\n" + logs[-1][-4000:]
    _check_image(result, image)
    if workers_only:
        _check_worker_log(logs[0], killed_with)
    else:
        _check_logs(logs, moment, killed_with)


def _kill_at_point(
    guest_vm: QemuVM,
    guest: threading.Thread,
    control: _Control,
    daemons: list[PeerProcess],
    *,
    moment: str,
    k: int,
    sock: Path,
    packed: bool,
    workers_only: bool = False,
) -> int:
    """Wait for kill ``k``'s point in the guest's I/O, SIGKILL the running back-end there and
    remove its socket (or kill only its worker process); how many requests it held."""
    phase, chunk = KILLS[moment][k]
    _watch(guest_vm, guest, f"{PHASE_LINE[phase]} 1 {chunk}")
    held = kill_at(
        daemons[-1],
        want_in_flight=moment == "in_flight",
        queue_size=QUEUE_SIZE,
        packed=packed,
        describe=lambda: _guest_phase(guest_vm, control),
        workers_only=workers_only,
    )
    if workers_only:
        return held
    sock.unlink()  # a SIGKILLed daemon leaves its socket behind
    time.sleep(0.3)  # the guest keeps queueing requests meanwhile
    return held


def _wait_replaced(daemon: PeerProcess, times: int, timeout: float = 30) -> None:
    """Wait until the daemon has replaced its worker ``times`` times."""
    deadline = time.monotonic() + timeout
    while daemon.stderr.count("resume where their rings stopped") < times:
        if time.monotonic() > deadline:
            raise AssertionError(f"worker not replaced {times} times:\n{daemon.stderr[-3000:]}")
        time.sleep(0.05)


def _stop_finished_phases(control: _Control, later_kills: Sequence[tuple[str, int]]) -> None:
    """Let the guest leave every I/O phase no later kill waits for."""
    later = {p for p, _ in later_kills}
    for done in ("write", "read"):
        if done not in later and done not in control.sent:
            control.stop(done)


def _check_worker_log(log: str, killed_with: list[int]) -> None:
    """One connection throughout; each killed worker replaced, its requests redone, no error."""
    assert all(n > 0 for n in killed_with)
    assert log.count("front-end connected") == 1, log[-3000:]
    assert log.count("died (killed by SIGKILL)") == len(killed_with), log[-3000:]
    assert log.count("queues [0] resume where their rings stopped") == len(killed_with)
    assert log.count("in-flight requests recovered") == len(killed_with), log[-3000:]
    assert "not replaced" not in log and "Traceback" not in log, log[-3000:]
    assert not [p for p in problems(log) if "died (killed by SIGKILL)" not in p], problems(log)


def _check_image(result: GuestResult, image: Path) -> None:
    """The guest saw its pattern and every chunk read back; the image holds the last writes."""
    expected = sector_pattern(PATTERN_SIZE // SECTOR)
    digest = hashlib.sha256(expected).hexdigest()
    lines = dict(line.split(" ", 1) for line in result.output.splitlines() if " " in line)
    assert lines["pattern"].split()[0] == digest
    assert lines["readback"].split()[0] == digest
    written = _written(result.output)
    assert {c for p, c in written if p == 1} == set(range(CHUNKS)), sorted(written)
    reads = {line for line in result.output.splitlines() if line.startswith("read 1 ")}
    assert len(reads) == CHUNKS
    data = image.read_bytes()
    at = _first_difference(data, _expected_image(written))
    passes = max(p for p, _ in written)
    assert at is None, f"image differs from the {passes} write passes' pattern at byte {at:#x}"


def _check_logs(logs: list[str], moment: str, killed_with: list[int]) -> None:
    """Each restarted back-end took the region over and recovered exactly when it had to."""
    if moment == "in_flight":
        assert all(n > 0 for n in killed_with)
    else:
        assert killed_with == [0, 0]
    for i, log in enumerate(logs[1:], 1):
        assert "front-end connected" in log, f"serve-{i} never saw QEMU reconnect"
        assert "SET_INFLIGHT_FD" in log and "GET_INFLIGHT_FD" not in log, log[-3000:]
        assert "vring 0 started" in log
        assert not problems(log), problems(log)
        recovered = "in-flight requests recovered" in log
        assert recovered == (moment == "in_flight"), log[-3000:]
    assert not problems(logs[0])
