"""Kernel vhost driven from Python: ``python bench/bench_kernel.py [--frames N] [--ios N]``.

Boots the test guest (tests/peers/pyguest.py; ``scripts/fetch-pyguest`` builds it) and, inside it,
measures frames per second both ways through ``pyvhost exercise net --kernel /dev/vhost-net``:
frames go through rings this process owns, the kernel moves them to and from a TAP, an AF_PACKET
socket on the interface sends and sees them, every byte compared. The peer in the same run is
the same traffic with Python doing the TAP's syscalls itself (``write()`` / ``read()`` on the TAP
fd, the same AF_PACKET side and checks): the ratio says what handing the data path to the kernel
gains or costs a Python VMM. Then 4 KiB IOPS through ``pyvhost exercise scsi --kernel
/dev/vhost-scsi`` to a LIO fileio LUN (WRITE(16) + READ(16) pairs, compared), beside the same
writes, reads and compares done by Python with ``os.pwrite`` / ``os.pread`` on the LUN's backing
file. Alternating, medians of ``--reps``; the guest runs under TCG, so absolute figures are far
below a real machine's and only the ratios mean anything. (No vhost-user net or scsi device
exists yet to set beside these.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from peers import lio
from peers.pyguest import run_in_guest

GUEST = textwrap.dedent(
    """
    import json, os, select, socket, sys, time
    from pyvhost.cli.exercise_net import NetExerciseOptions, frame, run_net, parse_frame as _parse
    from pyvhost.kernel.tap import Tap

    frames, reps, sizes = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    ios = int(sys.argv[4])
    sys.path.insert(0, os.environ["PYGUEST_FILES"])
    import lio
    from pyvhost.cli.exercise_scsi import ScsiExerciseOptions, pattern, run_scsi

    def tap_direct(size):
        tap = Tap.open("pvb1", vnet_hdr=False)
        with open(f"/proc/sys/net/ipv6/conf/{tap.name}/disable_ipv6", "w") as f:
            f.write("1")
        tap.set_up()
        wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        wire.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        wire.bind((tap.name, 0))
        try:
            out = {}
            seen, start = set(), time.monotonic()
            for seq in range(frames):
                os.write(tap.fd, frame(1, seq, size))
                while True:
                    try:
                        data, addr = wire.recvfrom(65536, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    p = _parse(data)
                    if addr[2] != 4 and p and p[0] == 1 and data == frame(1, p[1], size):
                        seen.add(p[1])
            while len(seen) < frames and select.select([wire], [], [], 1)[0]:
                data, addr = wire.recvfrom(65536)
                p = _parse(data)
                if addr[2] != 4 and p and p[0] == 1 and data == frame(1, p[1], size):
                    seen.add(p[1])
            out["tx_pps"] = len(seen) / (time.monotonic() - start)
            assert len(seen) == frames, f"tap tx lost {frames - len(seen)}"
            seen, sent, start = set(), 0, time.monotonic()
            while len(seen) < frames:
                while sent < frames and sent - len(seen) < 32:
                    wire.send(frame(2, sent, size))
                    sent += 1
                if not select.select([tap.fd], [], [], 1)[0]:
                    break
                while True:
                    try:
                        data = os.read(tap.fd, 65536)
                    except BlockingIOError:
                        break
                    p = _parse(data)
                    if p and p[0] == 2 and data == frame(2, p[1], size):
                        seen.add(p[1])
            out["rx_pps"] = len(seen) / (time.monotonic() - start)
            assert len(seen) == frames, f"tap rx lost {frames - len(seen)}"
            return out
        finally:
            wire.close()
            tap.close()

    def vhost(size):
        r = run_net(NetExerciseOptions("/dev/vhost-net", "pvb0", frames=frames, size=size))
        assert r.ok, r.error_details
        return {"tx_pps": r.tx_pps, "rx_pps": r.rx_pps}

    def scsi(target):
        r = run_scsi(ScsiExerciseOptions("/dev/vhost-scsi", target.wwpn, ios=ios))
        assert r.ok, r.error_details
        return {"iops": r.iops}

    def file_direct(target):
        fd = os.open(target.backing, os.O_RDWR)
        try:
            start = time.monotonic()
            for i in range(ios):
                lba = 8 * (1 + i % 1000)
                data = pattern(lba, 4096)
                os.pwrite(fd, data, lba * 512)
                assert os.pread(fd, 4096, lba * 512) == data
            return {"iops": 2 * ios / (time.monotonic() - start)}
        finally:
            os.close(fd)

    results = []
    for rep in range(reps):
        for size in sizes:
            order = [("vhost-net", vhost), ("tap-direct", tap_direct)]
            if rep % 2:
                order.reverse()
            for name, fn in order:
                results.append({"rep": rep, "size": size, "how": name, **fn(size)})
    with lio.vhost_target(size_mib=16) as target:
        for rep in range(reps):
            order = [("vhost-scsi", scsi), ("file-direct", file_direct)]
            if rep % 2:
                order.reverse()
            for name, fn in order:
                results.append({"rep": rep, "size": 4096, "how": name, **fn(target)})
    print(json.dumps(results))
    """
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000, help="frames each way (default 2000)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--sizes", default="64,1514", help="frame sizes (default 64,1514)")
    parser.add_argument("--ios", type=int, default=500, help="4 KiB write+read pairs (500)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    run = run_in_guest(
        GUEST,
        timeout=600,
        argv=[str(args.frames), str(args.reps), json.dumps(sizes), str(args.ios)],
        files={lio.GUEST_NAME: Path(lio.__file__)},
        modules=["tun", "vhost_net", *lio.MODULES],
    ).check()
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"kernel vhost-net from Python, in the test guest (TCG): {args.frames} frames each way")
    print(f"medians of {args.reps} alternating runs; ratio = vhost-net / tap-direct (range)")
    head = f"{'size':>6} {'dir':>3} {'vhost-net f/s':>14} {'tap-direct f/s':>15} {'ratio':>7}"
    print(f"{head}  range")
    for size in sizes:
        for key, label in (("tx_pps", "tx"), ("rx_pps", "rx")):
            ours = [r[key] for r in rows if r["size"] == size and r["how"] == "vhost-net"]
            peer = [r[key] for r in rows if r["size"] == size and r["how"] == "tap-direct"]
            ratios = [a / b for a, b in zip(ours, peer, strict=True)]
            mo, mp = statistics.median(ours), statistics.median(peer)
            print(
                f"{size:>6} {label:>3} {mo:>14.0f} {mp:>15.0f} {mo / mp:>7.2f}  "
                f"{min(ratios):.2f}-{max(ratios):.2f}"
            )
    print()
    ours = [r["iops"] for r in rows if r["how"] == "vhost-scsi"]
    peer = [r["iops"] for r in rows if r["how"] == "file-direct"]
    ratios = [a / b for a, b in zip(ours, peer, strict=True)]
    mo, mp = statistics.median(ours), statistics.median(peer)
    print(f"vhost-scsi to a LIO fileio LUN, {args.ios} 4 KiB WRITE(16)+READ(16) pairs, compared;")
    print("ratio = vhost-scsi / Python pwrite+pread on the backing file (range)")
    print(f"{'vhost-scsi IOPS':>16} {'file-direct IOPS':>17} {'ratio':>7}  range")
    print(f"{mo:>16.0f} {mp:>17.0f} {mo / mp:>7.2f}  {min(ratios):.2f}-{max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
