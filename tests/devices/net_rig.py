"""Helpers for the net device tests: a Daemon serving a NetDevice on a short socket path, our own
driver session on it, control commands, frames that say which one they are."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from peers.qemu import short_tmp
from pyvhost.daemon import Daemon
from pyvhost.devices.net import NetDevice
from pyvhost.driver.net import NetDriver, Received
from pyvhost.driver.session import DriverSession
from pyvhost.virtio import features as vf

ALL = (1 << 64) - 1
MAC = bytes.fromhex("02aabbccddee")
PEER = bytes.fromhex("02aabbccdd01")


def frame(seq: int, size: int = 200, pair: int = 0) -> bytes:
    """An Ethernet frame from the guest's MAC numbered ``seq``, with a pattern after it."""
    head = PEER + MAC + (0x88B5).to_bytes(2, "big") + seq.to_bytes(4, "big") + bytes([pair])
    body = bytes((seq * 7 + i) & 0xFF for i in range(size - len(head)))
    return head + body


@contextlib.contextmanager
def socket_path() -> Iterator[Path]:
    with short_tmp("pvh-net-") as d:
        yield d / "net.sock"


@contextlib.contextmanager
def served(device: NetDevice, workers: int = 1) -> Iterator[Path]:
    """``device`` behind a Daemon in this process; yields its socket path."""
    with socket_path() as sock:
        try:
            with Daemon(device, sock, workers=workers).run_in_thread():
                yield sock
        finally:
            device.close()


def connect(
    sock: Path,
    *,
    pairs: int = 1,
    ctrl: bool = True,
    packed: bool = False,
    mask: int = ALL,
    queue_size: int = 64,
) -> DriverSession:
    """A driver session with ``pairs`` queue pairs and, with ``ctrl``, the control queue."""
    queues = 2 * pairs + (1 if ctrl else 0)
    return DriverSession.connect(
        sock, num_queues=queues, queue_size=queue_size, packed=packed, features_mask=mask
    )


def without(*bits: int) -> int:
    return ALL & ~vf.bit_mask(*bits)


def ctrl_command(session: DriverSession, index: int, command: bytes) -> int:
    """Send one control command on queue ``index``; the ack byte the device wrote."""
    cmd = session.alloc(len(command))
    session.view(cmd, len(command))[:] = command
    ack = session.alloc(1)
    session.view(ack, 1)[0] = 0xEE
    session.submit(index, [(cmd, len(command))], [(ack, 1)])
    session.kick(index)
    [(_, written)] = session.wait(index, 5.0)
    value = session.view(ack, 1)[0] if written == 1 else -written
    session.free(cmd)
    session.free(ack)
    return value


def exchange(net: NetDriver, frames: list[bytes], timeout: float = 5.0) -> list[Received]:
    """Send ``frames`` and collect as many received frames (loopback), in order of arrival."""
    got: list[Received] = []
    for f in frames:
        net.send(f)
    net.flush()
    deadline = time.monotonic() + timeout
    while len(got) < len(frames) and time.monotonic() < deadline:
        net.reap_tx()
        got += net.receive(timeout=0.2)
    net.reap_tx()
    return got


def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` passes."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
