"""Restarting ``pyvhost serve blk`` under a running Linux guest loses no request.

QEMU's vhost-user-blk-pci reconnects to a back-end that went away when its chardev has
``reconnect=1``, and hands the new back-end the inflight region (SET_INFLIGHT_FD) its predecessor
filled in. The guest writes and reads back a few MiB in 4 KiB O_DIRECT requests while the test
SIGKILLs the back-end twice (once while writing, once while reading), at a moment its inflight
region shows requests in flight, or none, and starts a new one on the same socket and image.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from peers.guest import GuestAssets, GuestResult, boot_guest
from peers.qemu import PeerProcess, QemuVM, make_raw_image

from .blk_support import SECTOR, kill_at, problems, serve_blk
from .test_guest_blk import AWK_PATTERN, sector_pattern

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

IMAGE_SIZE = 16 << 20
OFFSET_BLOCKS = 256
"""The pattern starts at 1 MiB (in 4 KiB blocks)."""
CHUNKS = 64
CHUNK_BLOCKS = 16
PATTERN_SIZE = CHUNKS * CHUNK_BLOCKS * 4096
QUEUE_SIZE = 128
GUEST_TIMEOUT = 100

STREAMS = 4
"""Writers (then readers) running at once, each on every STREAMS-th chunk."""

SCRIPT = f"""set -e
{AWK_PATTERN.replace("COUNT", str(PATTERN_SIZE // SECTOR))} >/tmp/pattern
echo "pattern $(sha256sum </tmp/pattern)"
writer() {{
    i=$1
    while [ $i -lt {CHUNKS} ]; do
        dd if=/tmp/pattern of=/dev/vda bs=4k skip=$((i * {CHUNK_BLOCKS})) \\
            seek=$(({OFFSET_BLOCKS} + i * {CHUNK_BLOCKS})) count={CHUNK_BLOCKS} \\
            oflag=direct 2>/dev/null || {{ echo "write error $i"; exit 1; }}
        echo "wrote $i"
        i=$((i + {STREAMS}))
    done
}}
reader() {{
    i=$1
    while [ $i -lt {CHUNKS} ]; do
        dd if=/dev/vda of=/tmp/chunk.$i bs=4k skip=$(({OFFSET_BLOCKS} + i * {CHUNK_BLOCKS})) \\
            count={CHUNK_BLOCKS} iflag=direct 2>/dev/null || {{ echo "read error $i"; exit 1; }}
        echo "read $i"
        i=$((i + {STREAMS}))
    done
}}
for step in writer reader; do
    pids=""
    s=0
    while [ $s -lt {STREAMS} ]; do $step $s & pids="$pids $!"; s=$((s + 1)); done
    for p in $pids; do wait $p; done
done
i=0
while [ $i -lt {CHUNKS} ]; do cat /tmp/chunk.$i; i=$((i + 1)); done >/tmp/readback
echo "readback $(sha256sum </tmp/readback)"
"""

KILL_AT = {
    "in_flight": ("wrote 4\n", "wrote 32\n"),
    "idle": ("wrote 8\n", "read 8\n"),
}
"""Result-port lines after which the back-end is killed. Reads keep a back-end busy too briefly
to be caught in the act reliably, so the in-flight kills both land while writing."""


STALL_S = 20.0
"""The guest printing nothing for this long (it prints a line per 64 KiB) means it hangs."""


def _watch(vm: QemuVM, guest: threading.Thread, line: str | None) -> None:
    """Wait until the guest prints `line` (None: until it powers off); fail fast when it stalls."""
    path = vm.workdir / "result.log"
    seen, since = -1, time.monotonic()
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if line is not None and line in text:
            return
        if not guest.is_alive():
            if line is None:
                return
            raise AssertionError(f"guest finished before printing {line!r}")
        if len(text) != seen:
            seen, since = len(text), time.monotonic()
        elif time.monotonic() - since > STALL_S and "PYVHOST-RESULT-BEGIN" in text:
            vm.stop()
            guest.join(30)
            raise AssertionError(
                f"guest made no progress for {STALL_S:g} s; last output:\n{text[-500:]}"
            )
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("ring", "moment"),
    [
        ("split", "in_flight"),
        ("split", "idle"),
        ("packed", "in_flight"),
        ("packed", "idle"),
    ],
)
def test_backend_restart_under_running_guest_loses_no_request(
    peer_dir: Path, guest_vm: QemuVM, guest_assets: GuestAssets, ring: str, moment: str
) -> None:
    packed = ring == "packed"
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    sock = peer_dir / "blk.sock"
    daemons: list[PeerProcess] = [serve_blk(peer_dir, "serve-0", sock, image)]
    guest_vm.extra_args += [
        "-chardev",
        f"socket,id=rc0,path={sock},reconnect=1",
        "-device",
        f"vhost-user-blk-pci,chardev=rc0,num-queues=1,queue-size={QUEUE_SIZE}"
        + (",packed=on" if packed else ""),
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
        for line in KILL_AT[moment]:
            _watch(guest_vm, guest, line)
            killed_with.append(
                kill_at(
                    daemons[-1],
                    want_in_flight=moment == "in_flight",
                    queue_size=QUEUE_SIZE,
                    packed=packed,
                )
            )
            sock.unlink()  # a SIGKILLed daemon leaves its socket behind
            time.sleep(0.3)  # the guest keeps queueing requests meanwhile
            daemons.append(serve_blk(peer_dir, f"serve-{len(daemons)}", sock, image))
        _watch(guest_vm, guest, None)
    finally:
        guest.join(GUEST_TIMEOUT + 30)
        for daemon in daemons:
            daemon.stop()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    result = outcome["result"]
    assert isinstance(result, GuestResult)
    logs = [d.stderr for d in daemons]
    context = f"\nguest output tail:\n{result.output[-1500:]}\nQEMU:\n{guest_vm.stderr[-2000:]}"
    assert result.exit_code == 0, context + "\nlast serve log:\n" + logs[-1][-4000:]

    expected = sector_pattern(PATTERN_SIZE // SECTOR)
    digest = hashlib.sha256(expected).hexdigest()
    lines = dict(line.split(" ", 1) for line in result.output.splitlines() if " " in line)
    assert lines["pattern"].split()[0] == digest
    assert lines["readback"].split()[0] == digest
    data = image.read_bytes()
    start = OFFSET_BLOCKS * 4096
    assert data[start : start + PATTERN_SIZE] == expected
    assert data[:start].count(0) == start
    assert data[start + PATTERN_SIZE :].count(0) == IMAGE_SIZE - start - PATTERN_SIZE

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
