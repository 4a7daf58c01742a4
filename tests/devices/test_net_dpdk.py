"""NetDevice under another driver than ours: DPDK 22.11 testpmd's net_virtio_user port drives
the sink and the loopback, and testpmd's counters agree with the device's."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from peers.dpdk import require_testpmd, virtio_user_frontend
from pyvhost.daemon import Daemon
from pyvhost.devices.net import LoopbackBackend, NetDevice, SinkBackend
from pyvhost.virtio import features as vf

pytestmark = pytest.mark.dpdk

PORT_MAC = "02:70:76:68:00:0a"
BURST = 32
TXONLY_LEN = 64


def _wait(what: str, done: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.01)


@pytest.fixture
def sock(peer_dir: Path) -> Path:
    require_testpmd()
    return peer_dir / "net.sock"


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_sink_counts_what_testpmd_sends(peer_dir: Path, sock: Path, packed: bool) -> None:
    device = NetDevice(SinkBackend())
    with Daemon(device, sock).run_in_thread():
        with virtio_user_frontend(
            peer_dir, sock, packed=packed, mac=PORT_MAC, forward_mode="txonly"
        ) as pmd:
            pmd.start_forwarding()
            _wait("5000 frames at the device", lambda: device.stats.totals().tx_frames >= 5000)
            pmd.stop_forwarding()
            stats = pmd.stats()
            _wait(
                f"the device to count {stats.opackets} frames",
                lambda: device.stats.totals().tx_frames == stats.opackets,
            )
            features = device.acked_features
        device.close()
    assert vf.has_bit(features, vf.F_RING_PACKED) == packed
    totals = device.stats.totals()
    assert totals.tx_bytes == stats.obytes == TXONLY_LEN * stats.opackets
    assert not totals.drops and stats.oerrors == 0


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mergeable", [True, False], ids=["mrg_rxbuf", "no_mrg_rxbuf"])
def test_loopback_returns_testpmd_frames(
    peer_dir: Path, sock: Path, packed: bool, mergeable: bool
) -> None:
    sent = 4 * BURST
    device = NetDevice(LoopbackBackend())
    with Daemon(device, sock).run_in_thread():
        with virtio_user_frontend(
            peer_dir, sock, packed=packed, mrg_rxbuf=mergeable, mac=PORT_MAC, forward_mode="rxonly"
        ) as pmd:
            pmd.start_forwarding(tx_first=4)
            stats = pmd.wait_stats(lambda s: s.ipackets >= sent)
            pmd.stop_forwarding()
            features = device.acked_features
        device.close()
    assert vf.has_bit(features, vf.NET_F_MRG_RXBUF) == mergeable
    totals = device.stats.totals()
    assert (totals.tx_frames, totals.rx_frames, dict(totals.drops)) == (sent, sent, {})
    assert (stats.opackets, stats.ipackets) == (sent, sent)
    assert stats.ibytes == stats.obytes == sent * TXONLY_LEN
    assert (stats.ierrors, stats.imissed, stats.rx_nombuf) == (0, 0, 0)
