"""QEMU 7.2 (vhost-user-blk-pci, SeaBIOS only) negotiates completely with a BackendHandler."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from peers.qemu import QemuVM, require, short_tmp
from pyvhost.daemon import Daemon
from pyvhost.testing import ConfigOnlyDevice
from pyvhost.user.messages import Message, Request, VringState
from pyvhost.user.protocol import ProtocolFeature
from pyvhost.virtio import features as vf

pytestmark = pytest.mark.qemu

R = Request
BLK_FEATURES = sum(
    1 << b
    for b in (vf.F_VERSION_1, vf.BLK_F_SEG_MAX, vf.BLK_F_BLK_SIZE, vf.BLK_F_FLUSH, vf.BLK_F_MQ)
)
PROTOCOL = sum(
    1 << b
    for b in (
        ProtocolFeature.MQ,
        ProtocolFeature.LOG_SHMFD,
        ProtocolFeature.REPLY_ACK,
        ProtocolFeature.BACKEND_REQ,
        ProtocolFeature.CONFIG,
        ProtocolFeature.BACKEND_SEND_FD,
        ProtocolFeature.CONFIGURE_MEM_SLOTS,
    )
)


def blk_config(num_queues: int, sectors: int = 2048) -> bytes:
    """virtio-blk config space, 60 bytes: capacity, seg_max 126, blk_size 512, num_queues."""
    cfg = bytearray(60)
    struct.pack_into("<QII", cfg, 0, sectors, 0, 126)
    struct.pack_into("<I", cfg, 20, 512)
    struct.pack_into("<H", cfg, 34, num_queues)
    return bytes(cfg)


def expected_startup(num_queues: int) -> list[Request]:
    """GUEST.md's observed QEMU 7.2 start-up sequence for a block back-end.

    SeaBIOS drives only queue 0 (it reads the boot sector through it); every queue is enabled.
    """
    seq = [
        R.GET_FEATURES,
        R.GET_PROTOCOL_FEATURES,
        R.SET_PROTOCOL_FEATURES,
        R.GET_QUEUE_NUM,
        R.GET_MAX_MEM_SLOTS,
        R.SET_BACKEND_REQ_FD,
        R.SET_OWNER,
        R.GET_FEATURES,
    ]
    for _ in range(num_queues):
        seq += [R.SET_VRING_CALL, R.SET_VRING_ERR]
    seq += [R.GET_CONFIG, R.SET_FEATURES, R.ADD_MEM_REG]
    seq += [R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ADDR, R.SET_VRING_KICK]
    seq += [R.SET_VRING_ENABLE] * num_queues
    return seq


def is_subsequence(wanted: list[Request], seen: Sequence[object]) -> bool:
    it = iter(seen)
    return all(any(request is got for got in it) for request in wanted)


@pytest.fixture
def workdir() -> Iterator[Path]:
    require("qemu-system-x86_64")
    require("timeout")
    with short_tmp("pvh-qb-") as path:
        yield path


@pytest.mark.parametrize(
    ("num_queues", "qemu_listens"),
    [(1, False), (2, False), (1, True)],
    ids=["1-queue", "2-queues", "qemu-server-mode"],
)
def test_qemu_negotiates_with_the_backend(
    workdir: Path, num_queues: int, qemu_listens: bool
) -> None:
    seen: list[Message] = []
    devices: list[ConfigOnlyDevice] = []

    def make_device() -> ConfigOnlyDevice:
        device = ConfigOnlyDevice(
            blk_config(num_queues),
            features=BLK_FEATURES,
            num_queues=num_queues,
            protocol_features=PROTOCOL,
        )
        devices.append(device)
        return device

    sock = workdir / "blk.sock"
    daemon = Daemon(make_device, sock, client=qemu_listens, trace=seen.append)
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    vm = QemuVM(workdir, memory="256M", timeout_s=60)
    vm.add_vhost_user_blk(sock, num_queues=num_queues, server=qemu_listens)
    try:
        if not qemu_listens:
            thread.start()
        vm.start()
        if qemu_listens:
            thread.start()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            enabled = {
                m.payload.index
                for m in list(seen)
                if m.request is R.SET_VRING_ENABLE and isinstance(m.payload, VringState)
            }
            if len(enabled) == num_queues or vm.returncode is not None:
                break
            time.sleep(0.1)
    finally:
        vm.stop()
        daemon.shutdown()
        thread.join(10)
    assert not thread.is_alive()
    requests = [m.request for m in seen]
    names = [r.name for r in requests]
    assert is_subsequence(expected_startup(num_queues), requests), names
    assert "vhost" not in vm.stderr.lower(), vm.stderr
    device = devices[0]
    assert ("queue_started", 0) in device.events
    enables = [value for name, value in device.events if name == "queue_enabled"]
    assert all(isinstance(e, tuple) for e in enables), enables
    assert [(i, True) for i in range(num_queues)] == [
        e for e in enables if isinstance(e, tuple) and e[1]
    ]
    acked = [value for name, value in device.events if name == "set_features"]
    assert acked and isinstance(acked[-1], int) and acked[-1] & 1 << vf.F_VERSION_1
    assert device.events[-1] == ("reset", None), "QEMU left: rings stopped and device reset"
