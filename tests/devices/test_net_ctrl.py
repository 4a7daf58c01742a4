"""The net device's control queue: every command answered VIRTIO_NET_OK or VIRTIO_NET_ERR as the
spec says, refusals logged with the reason, the device carrying on."""

from __future__ import annotations

import struct

import pytest

from pyvhost.devices.net import ERR, OK, LoopbackBackend, NetDevice, SinkBackend
from pyvhost.devices.net.ctrl import CtrlCommandError, run_command
from pyvhost.driver.net import NetDriver
from pyvhost.virtio import features as vf

from .net_rig import MAC, connect, ctrl_command, exchange, frame, served, without

NEW_MAC = bytes.fromhex("02123456789a")


def _table(*macs: bytes) -> bytes:
    return struct.pack("<I", len(macs)) + b"".join(macs)


COMMANDS = [
    ("promisc on", bytes([0, 0, 1]), OK),
    ("allmulti off", bytes([0, 1, 0]), OK),
    ("nobcast on (RX_EXTRA)", bytes([0, 5, 1]), OK),
    ("rx mode without data", bytes([0, 0]), ERR),
    ("rx command 6", bytes([0, 6, 1]), ERR),
    ("mac table", bytes([1, 0]) + _table(NEW_MAC) + _table(b"\x33\x33\x00\x00\x00\x01"), OK),
    ("mac table cut short", bytes([1, 0]) + struct.pack("<I", 3) + NEW_MAC, ERR),
    ("mac table trailing", bytes([1, 0]) + _table() + _table() + b"x", ERR),
    ("mac addr multicast", bytes([1, 1]) + b"\x01" * 6, ERR),
    ("vlan not offered", bytes([2, 0, 5, 0]), ERR),
    ("announce ack", bytes([3, 0]), OK),
    ("mq pairs 0", bytes([4, 0, 0, 0]), ERR),
    ("mq pairs beyond", bytes([4, 0, 3, 0]), ERR),
    ("mq rss", bytes([4, 1]), ERR),
    ("offloads none", bytes([5, 0]) + bytes(8), OK),
    ("offloads not negotiated", bytes([5, 0]) + struct.pack("<Q", 1 << vf.NET_F_GUEST_CSUM), ERR),
    ("bad class", bytes([99, 0]), ERR),
    ("one byte", bytes([0]), ERR),
]


def test_every_command_gets_its_answer(caplog: pytest.LogCaptureFixture) -> None:
    dev = NetDevice(LoopbackBackend(pairs=2), mac=MAC)
    with served(dev) as sock, connect(sock, pairs=2) as session:
        answers = {name: ctrl_command(session, 4, cmd) for name, cmd, _ in COMMANDS}
        assert answers == {name: want for name, _, want in COMMANDS}
        assert dev.rx_modes.modes["promisc"] and dev.rx_modes.modes["nobcast"]
        assert dev.rx_modes.unicast == [NEW_MAC]
        assert ctrl_command(session, 4, bytes([1, 1]) + NEW_MAC) == OK
        assert session.config(0, 6) == NEW_MAC
        net = NetDriver(session)
        net.post_rx()
        assert len(exchange(net, [frame(1)])) == 1  # the device carries on
    assert "control command refused: class 99 is not a control class" in caplog.text
    assert (
        "class VLAN command 0 needs VIRTIO_NET_F_CTRL_VLAN, which this device does" in caplog.text
    )
    assert "class RX has no command 6" in caplog.text
    assert "MQ_VQ_PAIRS_SET: 3 pairs, the device has 1..2" in caplog.text
    assert dev.stats.ctrl_ok == 7 and dev.stats.ctrl_err == len(COMMANDS) - 6
    assert dev.config.mac == MAC  # back to the configured one when the driver left


def test_commands_need_their_features() -> None:
    dev = NetDevice(SinkBackend(), mac=MAC)
    mask = without(vf.NET_F_CTRL_RX_EXTRA, vf.NET_F_CTRL_MAC_ADDR, vf.NET_F_GUEST_ANNOUNCE)
    with served(dev) as sock, connect(sock, mask=mask) as session:
        assert ctrl_command(session, 2, bytes([0, 0, 1])) == OK
        assert ctrl_command(session, 2, bytes([0, 2, 1])) == ERR
        assert ctrl_command(session, 2, bytes([1, 1]) + NEW_MAC) == ERR
        assert ctrl_command(session, 2, bytes([3, 0])) == ERR
        assert ctrl_command(session, 2, bytes([4, 0, 1, 0])) == ERR  # one pair: no MQ


def test_chain_without_an_ack_byte_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    dev = NetDevice(SinkBackend(), mac=MAC)
    with served(dev) as sock, connect(sock) as session:
        cmd = session.alloc(3)
        session.view(cmd, 3)[:] = bytes([0, 0, 1])
        session.submit(2, [(cmd, 3)], [])
        session.kick(2)
        assert session.wait(2, 5.0)[0][1] == 0
        assert ctrl_command(session, 2, bytes([0, 0, 0])) == OK
    assert "has no ack byte" in caplog.text


class _Target:
    max_pairs = 4

    def __init__(self) -> None:
        from pyvhost.devices.net.ctrl import RxModes

        self.rx_modes = RxModes()
        self.pairs = 0

    def set_mac(self, mac: bytes) -> None: ...

    def set_pairs(self, pairs: int) -> None:
        self.pairs = pairs

    def set_guest_offloads(self, offloads: int) -> None: ...

    def announce_acked(self) -> None: ...


def test_run_command_alone() -> None:
    target = _Target()
    run_command(target, 1 << vf.NET_F_MQ, bytes([4, 0, 4, 0]))
    assert target.pairs == 4
    with pytest.raises(CtrlCommandError, match="MAC_TABLE_SET: unicast table has no entry count"):
        run_command(target, 1 << vf.NET_F_CTRL_RX, bytes([1, 0, 1]))
    huge = bytes([1, 0]) + struct.pack("<I", 1 << 30)
    with pytest.raises(CtrlCommandError, match="table of 1073741824 entries does not fit"):
        run_command(target, 1 << vf.NET_F_CTRL_RX, huge)
