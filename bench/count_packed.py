"""A fixed device-side ring workload, for counting instructions per chain under callgrind.

Python cannot count its own instructions, so this script only runs ``--chains N`` chains through
the device side of one ring (``pop_batch`` + ``push_batch``, or ``pop`` + ``push`` with
``--single``) and ``valgrind --tool=callgrind`` counts them. The driver does not run in the
measured part: the ring is filled once per lap by the driver, saved, and each round restores it
(packed: one copy of the descriptor ring; split: the descriptor table and available ring stay put
and only ``avail.idx`` moves), so the count is the device's work plus one small store per ring.
Instructions per chain come from two runs, which cancels the interpreter's start-up::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/count_packed.py packed 1 --chains 0       # "Collected : A"
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/count_packed.py packed 1 --chains 51200   # "Collected : B"
    # instructions per chain = (B - A) / 51200

``--valgrind`` does exactly that and prints the figure (``python bench/count_packed.py packed 1
--valgrind``); ``--chains 0`` still builds the rings and warms both laps up, so the two runs differ
only by the rounds. Arguments: ``kind`` is ``packed`` or ``split``; ``descs`` is ``1``, ``4`` (four
direct descriptors: three readable, one writable) or ``indirect`` (one ring descriptor naming a
four-entry indirect table). The count is deterministic to within a few hundred instructions per
run, whatever else the machine does.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from array import array

from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.packed import PackedDriver, PackedQueue, packed_layout
from pyvhost.virtio.split import SplitDriver, SplitQueue, split_layout

SIZE = 256
RING = 0x1000
DATA = 0x100000
TABLES = 0x200000
DEFAULT_CHAINS = 200 * SIZE


def _shape(descs: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]], bool]:
    """Readable and writable ``(gpa, len)`` of every chain, and whether it goes indirect."""
    if descs == "1":
        return [(DATA, 64)], [], False
    readable = [(DATA + 512 * k, 64) for k in range(3)]
    return readable, [(DATA + 0x10000, 64)], descs == "indirect"


def _fill(drv: PackedDriver | SplitDriver, descs: str) -> int:
    """Make as many chains available as fit (a whole ring's worth of descriptors)."""
    readable, writable, indirect = _shape(descs)
    need = 1 if indirect else len(readable) + len(writable)
    n = 0
    while drv.num_free >= need:
        table = TABLES + 0x100 * n if indirect else None
        drv.add(readable, writable, indirect_gpa=table)
        n += 1
    drv.publish()
    return n


def _drain(dev: PackedQueue | SplitQueue, batch: int, single: bool) -> int:
    """The measured work: take every available chain and give it back; the number taken."""
    done = 0
    if single:
        while (chain := dev.pop()) is not None:
            dev.push(chain.head, 0)
            done += 1
    else:
        while chains := dev.pop_batch(batch):
            dev.push_batch([(c.head, 0) for c in chains])
            done += len(chains)
    dev.needs_notification()
    return done


def run(kind: str, descs: str, chains: int, batch: int, single: bool) -> int:
    """Run ``chains`` chains (rounded up to whole rings) after a warm-up lap; chains done."""
    with GuestMemory.anonymous(4 << 20) as mem:
        if kind == "packed":
            lay = packed_layout(SIZE, RING)[:3]
            pdrv = PackedDriver(mem, SIZE, *lay)
            pdev = PackedQueue(mem, SIZE, *lay)
            ring = mem.view(lay[0], 16 * SIZE)
            laps = []
            for _ in range(2):  # one lap per driver wrap counter value; after both, back at 0
                _fill(pdrv, descs)
                laps.append(bytes(ring))
                _drain(pdev, batch, single)
                pdrv.get_used()
            done = 0
            lap = 0
            while done < chains:
                ring[:] = laps[lap]
                lap ^= 1
                done += _drain(pdev, batch, single)
            assert pdev.last_avail_idx == 0 and pdev.in_flight == 0
            ring.release()
            pdev.close()
            pdrv.close()
            return done
        lay3 = split_layout(SIZE, RING)[:3]
        sdrv = SplitDriver(mem, SIZE, *lay3)
        sdev = SplitQueue(mem, SIZE, *lay3)
        per_ring = _fill(sdrv, descs)
        _drain(sdev, batch, single)
        sdrv.get_used()
        _fill(sdrv, descs)
        # Those heads into every slot of the available ring: from now on only avail.idx moves.
        avail = mem.view(lay3[1], 4 + 2 * SIZE).cast("H")
        first = 2 + (avail[1] - per_ring) % SIZE
        heads = avail[first : first + per_ring].tolist()
        for group in range(SIZE // per_ring):
            avail[2 + group * per_ring : 2 + (group + 1) * per_ring] = array("H", heads)
        avail[1] = (avail[1] - per_ring) & 0xFFFF
        done = 0
        while done < chains:
            avail[1] = (avail[1] + per_ring) & 0xFFFF
            done += _drain(sdev, batch, single)
        avail.release()
        sdev.close()
        sdrv.close()
        return done


def _collected(argv: list[str]) -> int:
    """Instructions callgrind counted for this script run with ``argv``."""
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        os.path.abspath(__file__),
        *argv,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    match = re.search(r"Collected : (\d+)", proc.stderr)
    if match is None:
        raise RuntimeError(f"no 'Collected' line in callgrind's output:\n{proc.stderr}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["packed", "split"])
    parser.add_argument("descs", choices=["1", "4", "indirect"])
    parser.add_argument("--chains", type=int, default=DEFAULT_CHAINS)
    parser.add_argument("--batch", type=int, default=32, help="pop_batch size (default 32)")
    parser.add_argument("--single", action="store_true", help="pop + push one chain at a time")
    parser.add_argument(
        "--valgrind", action="store_true", help="run both counts under callgrind, print per chain"
    )
    args = parser.parse_args()
    if args.valgrind:
        rest = [args.kind, args.descs, "--batch", str(args.batch)]
        rest += ["--single"] if args.single else []
        base = _collected([*rest, "--chains", "0"])
        full = _collected([*rest, "--chains", str(args.chains)])
        mode = "pop+push" if args.single else f"batch {args.batch}"
        per = (full - base) / args.chains
        print(f"{args.kind} {args.descs} desc, {mode}: {per:,.0f} instructions per chain")
        return
    run(args.kind, args.descs, args.chains, args.batch, args.single)


if __name__ == "__main__":
    main()
