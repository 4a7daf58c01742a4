"""pyvhost's virtio-net driver side (DriverSession + NetDriver) against DPDK's vhost library:
testpmd's net_vhost port sends every frame back (io or macswap), and the frames, the virtio-net
headers and testpmd's own counters must all agree with what was sent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peers.dpdk import Testpmd, require_testpmd, vhost_backend
from pyvhost.driver.net import MAX_FRAME, NetDriver, Received
from pyvhost.driver.session import DriverSession
from pyvhost.user.connection import Listener
from pyvhost.user.frontend import Frontend
from pyvhost.virtio import features as vf
from pyvhost.virtio.net import GSO_NONE

pytestmark = pytest.mark.dpdk

RINGS = vf.bit_mask(vf.F_VERSION_1, vf.F_RING_EVENT_IDX, vf.F_RING_INDIRECT_DESC)
"""Ring features only: no offloads, and no CTRL_VQ (the VMM's queue, not the back-end's)."""
MERGEABLE = RINGS | vf.bit_mask(vf.NET_F_MRG_RXBUF)
GUEST_MAC = bytes.fromhex("027076680001")
HOST_MAC = bytes.fromhex("027076680002")
ETHERTYPE = (0x88B5).to_bytes(2, "big")
SIZES = (60, 61, 64, 127, 128, 255, 256, 511, 1000, 1023, 1500, MAX_FRAME)
WINDOW = 16
"""Frames in flight: with 256-byte receive buffers a full frame takes 7 of the 128 posted."""
FRAMES = 400


def make_frame(seq: int, size: int) -> bytes:
    head = HOST_MAC + GUEST_MAC + ETHERTYPE + seq.to_bytes(4, "big")
    fill = bytes((seq * 7 + i) & 0xFF for i in range(256)) * (size // 256 + 1)
    return head + fill[: size - len(head)]


def swapped(frame: bytes) -> bytes:
    """What testpmd's macswap mode sends back: destination and source MAC exchanged."""
    return frame[6:12] + frame[0:6] + frame[12:]


def bounce(
    net: NetDriver, frames: list[bytes], pmd: Testpmd, timeout: float = 20
) -> list[Received]:
    """Send ``frames`` (at most WINDOW unanswered) and collect as many frames back."""
    net.post_rx()
    got: list[Received] = []
    sent = 0
    deadline = time.monotonic() + timeout
    while len(got) < len(frames):
        while sent < len(frames) and sent - len(got) < WINDOW and net.tx_room():
            net.send(frames[sent])
            sent += 1
        net.flush()
        got += net.receive(timeout=0.1)
        net.reap_tx()
        if time.monotonic() > deadline:
            pytest.fail(
                f"{len(got)} of {len(frames)} frames back ({sent} sent) within {timeout} s; "
                f"testpmd: {pmd.stats()}; driver errors: {net.rx_errors}"
            )
    while net.tx_in_flight:
        net.reap_tx(timeout=1)
    return got


@pytest.fixture
def sock(peer_dir: Path) -> Path:
    require_testpmd()
    return peer_dir / "vhost.sock"


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mergeable", [True, False], ids=["mrg_rxbuf", "no_mrg_rxbuf"])
def test_macswap_returns_every_frame(
    peer_dir: Path, sock: Path, packed: bool, mergeable: bool
) -> None:
    frames = [make_frame(i, SIZES[i % len(SIZES)]) for i in range(FRAMES)]
    with vhost_backend(peer_dir, sock, forward_mode="macswap") as pmd:
        pmd.start_forwarding()
        session = DriverSession.connect(
            sock, num_queues=2, packed=packed, features_mask=MERGEABLE if mergeable else RINGS
        )
        try:
            assert session.packed == packed
            assert session.has_feature(vf.NET_F_MRG_RXBUF) == mergeable
            # Small receive buffers make DPDK spread a frame over several when it may.
            net = NetDriver(session, rx_buffer_size=256 if mergeable else None)
            got = bounce(net, frames, pmd)
        finally:
            session.close()
        fwd = pmd.stop_forwarding()[0]
        stats = pmd.stats()

    assert [r.frame for r in got] == [swapped(f) for f in frames]
    assert net.rx_errors == []
    assert {(r.header.flags, r.header.gso_type) for r in got} == {(0, GSO_NONE)}
    if mergeable:
        assert all(r.header.num_buffers == r.buffers for r in got)
        assert max(r.buffers for r in got) == -(-(12 + MAX_FRAME) // 256)
    total = sum(map(len, frames))
    assert (stats.ipackets, stats.opackets) == (FRAMES, FRAMES)
    assert (stats.ibytes, stats.obytes) == (total, total)
    assert (stats.imissed, stats.ierrors, stats.oerrors, stats.rx_nombuf) == (0, 0, 0, 0)
    assert (fwd.rx_packets, fwd.tx_packets, fwd.tx_dropped) == (FRAMES, FRAMES, 0)


def test_io_mode_serves_two_queue_pairs_apart(peer_dir: Path, sock: Path) -> None:
    per_pair = 200
    frames = {
        p: [make_frame(p << 16 | i, SIZES[i % len(SIZES)]) for i in range(per_pair)] for p in (0, 1)
    }
    with vhost_backend(peer_dir, sock, queues=2, forward_mode="io") as pmd:
        pmd.start_forwarding()
        session = DriverSession.connect(sock, num_queues=4, features_mask=MERGEABLE)
        try:
            got = {p: bounce(NetDriver(session, pair=p), frames[p], pmd) for p in (0, 1)}
        finally:
            session.close()
        stats = pmd.stats()

    for p in (0, 1):
        assert [r.frame for r in got[p]] == frames[p]
    assert stats.q_ipackets[:3] == (per_pair, per_pair, 0)
    assert stats.q_opackets[:3] == (per_pair, per_pair, 0)


def test_client_mode_connects_to_a_listening_front_end(peer_dir: Path, sock: Path) -> None:
    with Listener(sock) as listener, vhost_backend(peer_dir, sock, client=True) as pmd:
        with Frontend.accept(listener, timeout=15) as fe:
            result = fe.negotiate()
        assert vf.has_bit(result.offered_features, vf.F_VERSION_1)
        assert vf.has_bit(result.offered_features, vf.NET_F_MRG_RXBUF)
        assert vf.has_bit(result.offered_features, vf.F_RING_PACKED)
        assert pmd.returncode is None


@pytest.mark.parametrize("extra", [[], ["--packed", "--no-mrg-rxbuf"]], ids=["split", "packed"])
def test_exercise_net_cli_against_net_vhost(peer_dir: Path, sock: Path, extra: list[str]) -> None:
    """`pyvhost exercise net --socket` against testpmd's io forwarding: every frame comes back
    unchanged, in order, and testpmd counted each one."""
    frames = 300
    with vhost_backend(peer_dir, sock, forward_mode="io") as pmd:
        pmd.start_forwarding()
        cmd = [sys.executable, "-m", "pyvhost", "exercise", "net", "--socket", str(sock)]
        done = subprocess.run(
            [*cmd, "--frames", str(frames), "--size", "1000", "--json", *extra],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        fwd = pmd.stop_forwarding()[0]
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["errors"] == 0
    assert (report["tx_frames"], report["rx_frames"]) == (frames, frames)
    assert (fwd.rx_packets, fwd.tx_packets, fwd.tx_dropped) == (frames, frames, 0)
