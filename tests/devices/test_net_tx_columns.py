"""The net transmit path over the split ring's columns (``pop_columns``) against the chain path
(``pop_batch``, what the packed ring and loopback use): the same packets reach the back end in
the same order, the same counters, drops and complaints, the same lengths back to the driver.

Each scenario runs twice on a fresh device, once as served and once with ``pop_columns``
refusing every batch, and the two runs are compared; the columns run must also have sent whole
batches without falling back to chains. The sink, a back end that keeps what it is given (and
refuses some), and a real TAP (in a network namespace of our own) are each checked.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pyvhost.devices.net import NetBackend, NetDevice, SinkBackend, TapBackend
from pyvhost.devices.net.config import OFFLOAD_FEATURES
from pyvhost.devices.net.tx import MAX_PACKET, TxPath
from pyvhost.driver.session import DriverSession
from pyvhost.virtio import features as vf
from pyvhost.virtio.columns import ReadColumns
from pyvhost.virtio.net import GSO_TCPV4, HDR_F_NEEDS_CSUM, NetHeader
from pyvhost.virtio.split import SplitQueue

from .net_rig import MAC, connect, frame, served, without

TX = 1
HDR = NetHeader().encode()
CSUM = NetHeader(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16).encode()
BAD_CSUM = NetHeader(flags=HDR_F_NEEDS_CSUM, csum_start=60000, csum_offset=16).encode()
"""A header the device accepts (CSUM is negotiated) and a TAP refuses (EINVAL): the checksum
lies beyond the frame."""
TAP_NAME = "pvhc0"

Chain = tuple[list[bytes], list[int]]
"""Readable pieces, and the sizes of device-writable buffers after them."""


def plain(seq: int, size: int = 64, header: bytes = HDR) -> Chain:
    return [header + frame(seq, size)], []


def scenario() -> list[list[Chain]]:
    """Batches (all made available with one kick): odd chains of every kind first (the chain
    path, which also learns the valid headers), then runs the columns can take whole, then runs
    with one odd chain each (the columns path hands those to the chain checks)."""
    odd: list[Chain] = [
        plain(0),
        ([b"\0" * 5], []),  # shorter than the header
        ([HDR + frame(1)[:10]], []),  # header and a part of an Ethernet header
        ([NetHeader(flags=0x80).encode() + frame(2)], []),  # unknown flag bit
        ([NetHeader(gso_type=GSO_TCPV4).encode() + frame(3)], []),  # TSO4 masked off below
        ([], [100]),  # device-writable only
        ([HDR + frame(4)], [10]),  # readable then writable
        ([b""], []),  # one empty descriptor
        ([HDR, frame(5)], []),  # the header in its own descriptor
        ([HDR + bytes(MAX_PACKET + 1)], []),  # longer than any frame
        plain(6, 1500, CSUM),
        plain(7),
    ]
    whole = [plain(100 + i, 60 + i) for i in range(40)]
    mixed = [plain(200 + i, 64, CSUM if i % 3 else HDR) for i in range(30)]
    refused = [plain(300 + i, 64, BAD_CSUM if i in (3, 7) else CSUM) for i in range(12)]
    with_short = [plain(400 + i) for i in range(20)]
    with_short[9] = ([HDR + frame(409)[:6]], [])
    with_long = [plain(500 + i) for i in range(20)]
    with_long[0] = ([HDR + bytes(MAX_PACKET + 5)], [])
    with_bad_header = [plain(600 + i) for i in range(20)]
    with_bad_header[19] = ([NetHeader(gso_type=0x33).encode() + frame(619)], [])
    return [odd, whole, mixed, refused, with_short, with_long, with_bad_header, whole]


FAST_BATCHES = 4
"""Batches of :func:`scenario` the columns path takes without chains where checksum offload is
negotiated: whole, mixed, refused and the repeat of whole (a sink offers no CSUM: two)."""


class Recording(NetBackend):
    """Keeps every packet it is given; refuses those whose header asks for an impossible
    checksum (as a TAP does). Offers the TAP's offloads, so such headers pass the device."""

    features = OFFLOAD_FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def transmit(self, pair: int, packet: Sequence[memoryview]) -> None:
        data = b"".join(packet)
        if data.startswith(BAD_CSUM):
            raise OSError(errno.EINVAL, "Invalid argument")
        self.sent.append(data)


class Spy:
    """Counts the columns path's batches and those it handed to the chain checks."""

    def __init__(self) -> None:
        self.columns = 0
        self.as_chains = 0


@contextmanager
def watched(columns: bool) -> Iterator[Spy]:
    """While it lasts: the columns path counted, or (``columns`` False) refused to every
    batch, which leaves the chain path."""
    spy = Spy()
    columns_path, chains = TxPath._columns, ReadColumns.chains

    def counted_columns(self: TxPath, cols: ReadColumns, hdr_size: int, features: int) -> None:
        spy.columns += 1
        columns_path(self, cols, hdr_size, features)

    def counted_chains(self: ReadColumns) -> Any:
        spy.as_chains += 1
        return chains(self)

    def refused(self: SplitQueue, max_n: int) -> None:
        return None

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TxPath, "_columns", counted_columns)
        patch.setattr(ReadColumns, "chains", counted_chains)
        if not columns:
            patch.setattr(SplitQueue, "pop_columns", refused)
        yield spy


def submit_batch(session: DriverSession, chains: list[Chain]) -> list[int]:
    """All ``chains`` made available at once (one kick); the lengths the device reported."""
    tokens = []
    for readable, writable in chains:
        bufs = []
        for data in readable:
            gpa = session.alloc(max(len(data), 1))
            session.view(gpa, len(data))[:] = data
            bufs.append((gpa, len(data)))
        tokens.append(session.submit(TX, bufs, [(session.alloc(n), n) for n in writable]))
    session.kick(TX)
    done: dict[int, int] = {}
    while len(done) < len(tokens):
        done.update(session.wait(TX, 5.0))
    return [done[t] for t in tokens]


class Warnings(logging.Handler):
    """The device's complaints as they were logged."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run(
    backend: NetBackend, columns: bool, mask: int, seen: Callable[[int], object] | None = None
) -> dict[str, Any]:
    """The scenario through a fresh device over ``backend``: what can be compared, and the spy's
    counts; ``seen(frames sent)``, called while the device still runs, adds what it returns."""
    dev = NetDevice(backend, mac=MAC, queue_size=256)
    handler = Warnings()
    logger = logging.getLogger("pyvhost.devices.net")
    logger.addHandler(handler)
    try:
        with (
            watched(columns) as spy,
            served(dev) as sock,
            connect(sock, mask=mask, queue_size=256) as session,
        ):
            lengths = [submit_batch(session, batch) for batch in scenario()]
            extra = {} if seen is None else {"seen": seen(dev.stats.pairs[0].tx_frames)}
    finally:
        logger.removeHandler(handler)
    stats = dev.stats.pairs[0]  # the transmit side (a TAP also brings the host's own frames)
    return {
        **extra,
        "lengths": lengths,
        "stats": {
            "tx_frames": stats.tx_frames,
            "tx_bytes": stats.tx_bytes,
            "drops": {k: v for k, v in stats.drops.items() if k.startswith("tx_")},
        },
        "complaints": {k: v for k, v in dev.complain.seen.items() if k.startswith("tx_")},
        "warnings": [m for m in handler.messages if "transmit" in m or "refused" in m],
        "spy": (spy.columns, spy.as_chains),
    }


def compare(
    run_once: Callable[[bool], dict[str, Any]], fast_batches: int = FAST_BATCHES
) -> dict[str, Any]:
    """Run with columns and without; assert they agree and that the columns path took at
    least ``fast_batches`` batches whole; the columns run's result."""
    fast = run_once(True)
    slow = run_once(False)
    fast_spy = fast.pop("spy")
    assert slow.pop("spy") == (0, 0)
    assert fast == slow
    batches, as_chains = fast_spy
    assert batches - as_chains >= fast_batches, fast_spy
    assert as_chains >= 1, "the runs with one odd chain go to the chain checks"
    return fast


MASK = without(vf.NET_F_HOST_TSO4)


def test_sink_counts_and_drops_alike() -> None:
    """The sink is handed nothing on the columns path, yet counts and drops as before. It
    offers no checksum offload, so every NEEDS_CSUM header is a bad one here."""
    out = compare(lambda columns: run(SinkBackend(), columns, MASK), fast_batches=2)
    stats = out["stats"]
    csum = sum(b"".join(c[0]).startswith((CSUM, BAD_CSUM)) for b in scenario() for c in b)
    assert stats["drops"] == {
        "tx_short": 4,  # one of them the empty descriptor
        "tx_bad_header": 3 + csum,
        "tx_writable": 2,
        "tx_too_long": 2,
    }
    assert stats["tx_frames"] == sum(len(b) for b in scenario()) - 11 - csum
    assert all(n == 0 for batch in out["lengths"] for n in batch)


def test_a_back_end_that_keeps_and_refuses_sees_the_same_packets() -> None:
    sent: dict[bool, list[bytes]] = {}

    def once(columns: bool) -> dict[str, Any]:
        backend = Recording()
        result = run(backend, columns, MASK)
        sent[columns] = backend.sent
        return result

    out = compare(once)
    assert sent[True] == sent[False]
    assert len(sent[True]) == out["stats"]["tx_frames"]
    assert out["stats"]["tx_bytes"] == sum(len(p) - len(HDR) for p in sent[True])
    assert out["stats"]["drops"]["tx_backend_error"] == 2
    assert sum("refused a 76-byte packet: [Errno 22]" in m for m in out["warnings"]) == 2


def test_the_columns_path_gives_views_only_to_a_back_end_that_looks() -> None:
    class Counting(SinkBackend):
        def transmit(self, pair: int, packet: Sequence[memoryview]) -> None:
            pass

    assert not SinkBackend().wants_views and not NetBackend().wants_views
    assert Counting().wants_views and Recording().wants_views
    assert TapBackend.transmit_batch is not NetBackend.transmit_batch


# -- a real TAP ----------------------------------------------------------------------------------


def tap_run(columns: bool) -> dict[str, Any]:
    """In a network namespace of our own: the scenario into a TAP, and the frames seen on it
    (read while the TAP exists: closing it takes the capture's interface away)."""
    capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    capture.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    capture.settimeout(0.5)

    def seen(expected: int) -> list[str]:
        frames: list[str] = []
        deadline = time.monotonic() + 5
        while len(frames) < expected and time.monotonic() < deadline:
            try:
                data, address = capture.recvfrom(1 << 17)
            except TimeoutError:
                continue
            if address[2] != socket.PACKET_OUTGOING and data[12:14] == b"\x88\xb5":
                frames.append(data.hex())
        return frames

    try:
        backend = TapBackend(TAP_NAME)
        capture.bind((TAP_NAME, 0))
        return run(backend, columns, MASK, seen)
    finally:
        capture.close()


def tap_main() -> None:
    """Entry point of the namespaced child (see the test)."""
    out = {"columns": tap_run(True), "chains": tap_run(False)}
    print(json.dumps(out))


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("unshare") is None,
    reason="needs root, /dev/net/tun and unshare(1) for a private network namespace",
)
def test_a_tap_receives_the_same_frames() -> None:
    """The TAP's own writev refuses the two bad-checksum packets (EINVAL), in both runs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    tests = str(Path(__file__).resolve().parent.parent)
    code = f"import sys; sys.path.insert(0, {tests!r}); import devices.test_net_tx_columns as t"
    code += "; t.tap_main()"
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    fast, slow = out["columns"], out["chains"]
    assert len(fast["seen"]) == fast["stats"]["tx_frames"] > 100
    fast_spy = fast.pop("spy")
    assert slow.pop("spy") == [0, 0]
    assert fast == slow
    assert fast_spy[0] - fast_spy[1] >= FAST_BATCHES
    assert fast["stats"]["drops"]["tx_backend_error"] == 2
