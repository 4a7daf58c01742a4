"""NetDevice served by the real Daemon, driven over a Unix socket by DriverSession / NetDriver:
loopback and sink data paths with every ring and feature combination, config space, queue pairs,
the bounded receive backlog, SEND_RARP / NET_SET_MTU and the dirty log."""

from __future__ import annotations

import logging
import os
import time

import pytest

from pyvhost.devices.net import (
    CONFIG_SIZE,
    S_LINK_UP,
    LoopbackBackend,
    NetDevice,
    SinkBackend,
)
from pyvhost.devices.net.config import OFFLOAD_FEATURES
from pyvhost.driver.net import NetDriver, Received
from pyvhost.virtio import features as vf
from pyvhost.virtio.memory import PAGE_SIZE, DirtyLog

from .net_rig import MAC, connect, ctrl_command, exchange, frame, served, without


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mergeable", [True, False], ids=["mrg", "no-mrg"])
@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_loopback_returns_every_frame_intact(
    packed: bool, mergeable: bool, event_idx: bool
) -> None:
    dropped = []
    if not mergeable:
        dropped.append(vf.NET_F_MRG_RXBUF)
    if not event_idx:
        dropped.append(vf.F_RING_EVENT_IDX)
    dev = NetDevice(LoopbackBackend(), mac=MAC)
    with served(dev) as sock, connect(sock, packed=packed, mask=without(*dropped)) as session:
        assert session.packed == packed
        assert session.has_feature(vf.NET_F_MRG_RXBUF) == mergeable
        assert session.event_idx == event_idx
        net = NetDriver(session, rx_buffer_size=512 if mergeable else None)
        net.post_rx()
        frames = [frame(i, size) for i, size in enumerate([60, 200, 1000, 1514] * 5)]
        got = exchange(net, frames)
        assert [g.frame for g in got] == frames
        assert net.rx_errors == []
        if mergeable:
            assert [g.buffers for g in got[:4]] == [1, 1, 2, 3]  # 512-byte buffers, 12-byte header
        assert all(g.header.flags == 0 and g.header.gso_type == 0 for g in got)
    totals = dev.stats.totals()
    assert (totals.tx_frames, totals.rx_frames) == (20, 20)
    assert totals.tx_bytes == totals.rx_bytes == sum(len(f) for f in frames)
    assert not totals.drops


def test_sink_consumes_and_counts() -> None:
    dev = NetDevice(SinkBackend(), mac=MAC)
    with served(dev) as sock, connect(sock) as session:
        net = NetDriver(session)
        net.post_rx()
        for i in range(100):
            if net.tx_room() == 0:
                net.flush()
                net.reap_tx(2.0)
            net.send(frame(i))
        net.flush()
        done = 0
        while net.tx_in_flight:
            done += net.reap_tx(2.0)
        assert net.receive(timeout=0.2) == []
    assert dev.stats.totals().tx_frames == 100
    assert dev.stats.totals().rx_frames == 0


def test_config_space_and_offered_features() -> None:
    dev = NetDevice(LoopbackBackend(pairs=2), mac=MAC, mtu=9000)
    assert dev.num_queues == 5
    with served(dev) as sock, connect(sock, pairs=2) as session:
        raw = session.config(0, CONFIG_SIZE)
        assert raw[:6] == MAC
        assert int.from_bytes(raw[6:8], "little") == S_LINK_UP
        assert int.from_bytes(raw[8:10], "little") == 2
        assert int.from_bytes(raw[10:12], "little") == 9000
        offered = session.offered_features
        for bit in (
            vf.NET_F_MAC,
            vf.NET_F_STATUS,
            vf.NET_F_MTU,
            vf.NET_F_MQ,
            vf.NET_F_CTRL_VQ,
            vf.NET_F_MRG_RXBUF,
            vf.F_RING_PACKED,
            vf.F_RING_EVENT_IDX,
        ):
            assert vf.has_bit(offered, bit), vf.feature_names(1 << bit, "net")
        assert not offered & OFFLOAD_FEATURES  # a loopback cannot checksum or segment
        assert session.frontend.protocol_features >> 2 & 1  # RARP
        assert session.frontend.protocol_features >> 4 & 1  # MTU
    one = NetDevice(SinkBackend())
    assert not vf.has_bit(one.features, vf.NET_F_MQ)
    assert one.config.mac[0] & 3 == 2  # random, locally administered, unicast


def test_queue_pairs_each_loop_back_on_their_own_pair() -> None:
    dev = NetDevice(LoopbackBackend(pairs=2), mac=MAC)
    with served(dev, workers=2) as sock, connect(sock, pairs=2) as session:
        assert ctrl_command(session, 4, bytes([4, 0]) + (2).to_bytes(2, "little")) == 0
        assert dev.active_pairs == 2
        nets = [NetDriver(session, pair=p) for p in (0, 1)]
        for net in nets:
            net.post_rx()
        for p, net in enumerate(nets):
            frames = [frame(i, 300, pair=p) for i in range(10)]
            assert [g.frame for g in exchange(net, frames)] == frames
    assert [(p.tx_frames, p.rx_frames) for p in dev.stats.pairs] == [(10, 10), (10, 10)]


def test_backlog_is_bounded_and_drops_are_counted() -> None:
    dev = NetDevice(LoopbackBackend(), mac=MAC, backlog=8)
    with served(dev) as sock, connect(sock) as session:
        net = NetDriver(session)
        for i in range(20):
            net.send(frame(i))
        net.flush()
        while net.tx_in_flight:
            assert net.reap_tx(2.0), "transmit waited for receive buffers"
        assert dev.stats.pairs[0].drops["rx_backlog_full"] == 12
        net.post_rx()
        got: list[Received] = []
        deadline = time.monotonic() + 5
        while len(got) < 8 and time.monotonic() < deadline:
            got += net.receive(timeout=0.2)
        assert [g.frame for g in got] == [frame(i) for i in range(8)]
        assert net.receive(timeout=0.2) == []
    assert dev.stats.totals().rx_frames == 8


def test_stopping_the_rings_never_waits_for_receive_buffers() -> None:
    dev = NetDevice(LoopbackBackend(), mac=MAC)
    with served(dev) as sock:
        session = connect(sock)
        net = NetDriver(session)
        net.post_rx()  # every buffer posted, no frame: the device must not take them
        time.sleep(0.2)
        started = time.monotonic()
        session.close()  # GET_VRING_BASE on every ring
        assert time.monotonic() - started < 2.0


def test_send_rarp_and_net_set_mtu(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "pyvhost.devices.net")
    dev = NetDevice(LoopbackBackend(), mac=MAC)
    with served(dev) as sock, connect(sock) as session:
        session.frontend.net_set_mtu(4000)
        assert int.from_bytes(session.config(10, 2), "little") == 4000
        session.frontend.send_rarp(MAC)
    assert "RARP for 02:aa:bb:cc:dd:ee not sent: loopback has no network" in caplog.text
    assert "MTU 4000 (NET_SET_MTU)" in caplog.text


@pytest.mark.parametrize("mtu", [20, 70000])
def test_an_impossible_net_set_mtu_is_refused_and_serving_goes_on(mtu: int) -> None:
    from pyvhost.errors import ReplyError

    dev = NetDevice(LoopbackBackend(), mac=MAC, mtu=1500)
    with served(dev) as sock, connect(sock) as session:
        assert session.frontend.reply_ack
        with pytest.raises(ReplyError):
            session.frontend.net_set_mtu(mtu)
        assert int.from_bytes(session.config(10, 2), "little") == 1500
        net = NetDriver(session)
        net.post_rx(4)
        assert len(exchange(net, [frame(1, 100)])) == 1


def test_received_bytes_are_dirty_logged() -> None:
    dev = NetDevice(LoopbackBackend(), mac=MAC)
    with served(dev) as sock, connect(sock) as session:
        end = session.heap.end
        log, fd = DirtyLog.anonymous(-(-end // PAGE_SIZE // 8))
        try:
            session.enable_dirty_log(log, fd)
            net = NetDriver(session, rx_buffer_size=4096)
            net.post_rx(4)
            got = exchange(net, [frame(i, 1500) for i in range(4)])
            assert len(got) == 4
            pages = {a // PAGE_SIZE for g in got for a in g.addresses}
            assert all(log.is_dirty(p) for p in pages)
        finally:
            session.close()
            log.close()
            os.close(fd)


def test_stats_line_names_drop_reasons() -> None:
    dev = NetDevice(LoopbackBackend(pairs=2), mac=MAC)
    dev.stats.pairs[1].drop("rx_backlog_full", 3)
    dev.stats.pairs[0].tx_frames = 5
    line = dev.stats.line()
    assert "tx 5 frames" in line and "rx_backlog_full 3" in line and "[1] tx 0 rx 0" in line
    assert dev.stats.as_dict()["drops"] == {"rx_backlog_full": 3}
