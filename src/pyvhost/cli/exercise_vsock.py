"""``pyvhost exercise vsock --kernel DEV --guest-cid CID``: this process plays the guest.

It hands vhost-vsock its memory and rings, takes guest CID ``CID`` and runs the guest's vsock
stack (:mod:`pyvhost.virtio.vsock`) over the rings. Then, at once: a host ``AF_VSOCK`` client
connects to a port the "guest" listens on and sends ``--bytes``; the "guest" connects to a host
``AF_VSOCK`` listener and sends as many. Both streams are compared byte for byte, with credit
flow control on both sides. ``--pause`` stops the device (VHOST_VSOCK_SET_RUNNING 0) halfway and
starts it again: nothing may be lost. Exits 1 on any loss, mismatch or timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import random
import select
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pyvhost.driver.session import DriverSession
from pyvhost.driver.vsock import VsockDriver
from pyvhost.kernel.devices import VhostVsock
from pyvhost.virtio import features as vf
from pyvhost.virtio.vsock import ConnectionOptions, VsockConnection, VsockEndpoint
from pyvhost.virtio.vsock.wire import HOST_CID, LAST_RESERVED_PORT, RX_QUEUE, TX_QUEUE

__all__ = [
    "VsockExerciseOptions",
    "VsockExerciseResult",
    "add_parser",
    "run",
    "run_vsock",
    "stream",
]

GUEST_PORT = 5201
HOST_PORT = 5202
_BLOCK = 65536
_MAX_DETAILS = 20
_H2G, _G2H = 1, 2


def stream(direction: int, offset: int, n: int) -> bytes:
    """``n`` bytes of a direction's stream from ``offset``: a 64 KiB block of bytes derived from
    the direction, repeated, so a lost, repeated or reordered piece shows at its offset."""
    block = _block(direction)
    start = offset % _BLOCK
    reps = (start + n) // _BLOCK + 1
    return (block * reps)[start : start + n]


_BLOCKS: dict[int, bytes] = {}


def _block(direction: int) -> bytes:
    if direction not in _BLOCKS:
        x = 0x9E3779B9 * direction & 0xFFFFFFFF
        out = bytearray(_BLOCK)
        for i in range(_BLOCK):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            out[i] = x >> 16 & 0xFF
        _BLOCKS[direction] = bytes(out)
    return _BLOCKS[direction]


@dataclass
class VsockExerciseOptions:
    """Which device and CID, how many bytes each way."""

    kernel: str
    guest_cid: int
    bytes: int = 1 << 20
    pause: bool = False
    timeout: float = 60.0
    buf_alloc: int = 64 * 1024


@dataclass
class VsockExerciseResult:
    """What happened; ``ok`` when both streams arrived whole and equal."""

    device: str
    guest_cid: int
    host_to_guest_bytes: int = 0
    guest_to_host_bytes: int = 0
    errors: int = 0
    seconds: float = 0.0
    rx_packets: int = 0
    tx_packets: int = 0
    paused: bool = False
    error_details: list[str] = field(default_factory=list)
    ok: bool = False

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_details) < _MAX_DETAILS:
            self.error_details.append(message)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Side:
    """One direction's progress: how much was sent and how much arrived intact."""

    def __init__(self, direction: int, total: int, name: str, result: VsockExerciseResult):
        self.direction = direction
        self.total = total
        self.name = name
        self.result = result
        self.sent = 0
        self.received = 0
        self.broken = False

    def next_chunk(self, limit: int = 16384) -> bytes:
        return stream(self.direction, self.sent, min(limit, self.total - self.sent))

    def arrived(self, data: bytes) -> None:
        if self.broken or not data:
            return
        want = stream(self.direction, self.received, len(data))
        if data != want or self.received + len(data) > self.total:
            first = next((i for i, (a, b) in enumerate(zip(data, want, strict=False)) if a != b), 0)
            self.result.error(
                f"{self.name}: bytes at offset {self.received + first} differ from what was sent"
            )
            self.broken = True
        self.received += len(data)

    @property
    def done(self) -> bool:
        return self.received >= self.total or self.broken


class _Run:
    """The host sockets, the guest endpoint and the rings, pumped in one loop."""

    def __init__(self, opts: VsockExerciseOptions, session: DriverSession, device: VhostVsock):
        self.opts = opts
        self.result = VsockExerciseResult(opts.kernel, opts.guest_cid)
        self.session = session
        self.device = device
        options = ConnectionOptions(buf_alloc=opts.buf_alloc)
        first_port = random.randrange(LAST_RESERVED_PORT + 1, 0x7FFF_FFFF)
        self.endpoint = VsockEndpoint(
            opts.guest_cid, peer_cid=HOST_CID, options=options, first_port=first_port
        )
        self.driver = VsockDriver(session, self.endpoint)
        self.h2g = _Side(_H2G, opts.bytes, "host to guest", self.result)
        self.g2h = _Side(_G2H, opts.bytes, "guest to host", self.result)
        self.listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        self.client = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        self.accepted: socket.socket | None = None
        self.guest_in: VsockConnection | None = None
        self.guest_out: VsockConnection | None = None

    def close(self) -> None:
        for sock in (self.listener, self.client, self.accepted):
            if sock is not None:
                sock.close()

    def start(self) -> None:
        """Host listener up, guest listener up, both connections on their way."""
        self.listener.bind((socket.VMADDR_CID_ANY, HOST_PORT))
        self.listener.listen(1)
        self.listener.setblocking(False)
        self.endpoint.listen(GUEST_PORT)
        self.guest_out = self.endpoint.connect(HOST_CID, HOST_PORT, now=time.monotonic())
        self.client.setblocking(False)
        err = self.client.connect_ex((self.opts.guest_cid, GUEST_PORT))
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            raise OSError(err, f"host connect to {self.opts.guest_cid}:{GUEST_PORT}")
        self.driver.post_rx()

    def step(self) -> int:
        """One round of everything; returns a progress count (0: nothing happened)."""
        moved = self.driver.pump()
        moved += self._host_side()
        moved += self._guest_side()
        self.endpoint.tick(time.monotonic())
        return moved + self.driver.pump()

    def _host_side(self) -> int:
        moved = 0
        if self.accepted is None:
            with contextlib.suppress(BlockingIOError):
                self.accepted, _ = self.listener.accept()
                self.accepted.setblocking(False)
                moved += 1
        if self.accepted is not None and not self.g2h.done:
            with contextlib.suppress(BlockingIOError):
                data = self.accepted.recv(65536)
                self.g2h.arrived(data)
                moved += len(data)
        if self.h2g.sent < self.h2g.total:
            with contextlib.suppress(BlockingIOError, OSError):
                n = self.client.send(self.h2g.next_chunk())
                self.h2g.sent += n
                moved += n
        return moved

    def _guest_side(self) -> int:
        moved = 0
        if self.guest_in is None:
            self.guest_in = self.endpoint.accept()
        if self.guest_in is not None:
            data = self.guest_in.receive()
            self.h2g.arrived(data)
            moved += len(data)
        out = self.guest_out
        if out is not None and out.writable and self.g2h.sent < self.g2h.total:
            n = out.send(self.g2h.next_chunk())
            self.g2h.sent += n
            moved += n
        return moved

    def wait(self, timeout: float) -> None:
        """Until a call eventfd or a host socket is ready, or ``timeout``."""
        fds = [self.session.queues[q].call_fd for q in (RX_QUEUE, TX_QUEUE)]
        socks: list[Any] = [self.listener, self.client]
        if self.accepted is not None:
            socks.append(self.accepted)
        select.select(fds + socks, [], [], timeout)
        for q in (RX_QUEUE, TX_QUEUE):
            self.session.notifications(q)

    def pause(self) -> None:
        """Stop and restart the device, as a VMM does around a snapshot; then kick both rings,
        as a VMM must: a kick that arrived while the device was stopped is gone."""
        self.device.set_running(False)
        time.sleep(0.05)
        self.device.set_running(True)
        for q in (RX_QUEUE, TX_QUEUE):
            self.session.kick(q, force=True)
        self.result.paused = True

    def finish(self, elapsed: float) -> VsockExerciseResult:
        result = self.result
        result.seconds = round(elapsed, 3)
        result.host_to_guest_bytes = self.h2g.received if not self.h2g.broken else 0
        result.guest_to_host_bytes = self.g2h.received if not self.g2h.broken else 0
        result.rx_packets, result.tx_packets = self.driver.rx_packets, self.driver.tx_packets
        for side, conn in ((self.h2g, self.guest_in), (self.g2h, self.guest_out)):
            if not side.broken and side.received < side.total:
                state = "never accepted" if conn is None else f"{conn!r}: {conn.reason}"
                result.error(
                    f"{side.name}: {side.received} of {side.total} bytes arrived within "
                    f"{self.opts.timeout:g} s ({side.sent} sent; guest connection: {state})"
                )
        if self.driver.rx_malformed:
            result.error(f"{self.driver.rx_malformed} malformed receive buffer(s) from the device")
        result.ok = result.errors == 0
        return result


def run_vsock(opts: VsockExerciseOptions) -> VsockExerciseResult:
    """Run the exercise; device errors raise VhostError, socket errors OSError."""
    if opts.bytes < 1:
        raise ValueError("--bytes must be at least 1")
    device = VhostVsock(opts.kernel)
    with contextlib.ExitStack() as stack:
        stack.callback(device.close)
        mask = ~vf.bit_mask(vf.VSOCK_F_SEQPACKET)
        session = DriverSession.kernel(device, num_queues=2, queue_size=128, features_mask=mask)
        stack.callback(session.close)
        device.set_guest_cid(opts.guest_cid)
        device.set_running(True)
        stack.callback(_stop, device)
        run = _Run(opts, session, device)
        stack.callback(run.close)
        run.start()
        start = time.monotonic()
        deadline = start + opts.timeout
        while not (run.h2g.done and run.g2h.done) and time.monotonic() < deadline:
            if opts.pause and not run.result.paused and run.h2g.received * 2 >= opts.bytes:
                run.pause()
            if not run.step():
                run.wait(0.05)
        result = run.finish(time.monotonic() - start)
    return result


def _stop(device: VhostVsock) -> None:
    with contextlib.suppress(OSError):
        device.set_running(False)


def add_parser(devices: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``exercise vsock`` to the ``exercise`` sub-commands."""
    vsock = devices.add_parser(
        "vsock",
        help="streams both ways between host AF_VSOCK sockets and a guest played through "
        "kernel vhost-vsock, every byte verified",
        description=__doc__,
    )
    vsock.add_argument("--kernel", required=True, metavar="DEV", help="e.g. /dev/vhost-vsock")
    vsock.add_argument("--guest-cid", required=True, type=int, help="the CID to play (3 or more)")
    vsock.add_argument("--bytes", type=int, default=1 << 20, help="bytes each way (default 1 MiB)")
    vsock.add_argument(
        "--pause", action="store_true", help="SET_RUNNING 0 then 1 halfway: nothing may be lost"
    )
    vsock.add_argument("--timeout", type=float, default=60.0, help="seconds for the transfer")
    vsock.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> VsockExerciseResult:
    """Options from the command line, then :func:`run_vsock`."""
    return run_vsock(
        VsockExerciseOptions(
            kernel=args.kernel,
            guest_cid=args.guest_cid,
            bytes=args.bytes,
            pause=args.pause,
            timeout=args.timeout,
        )
    )


def format_report(result: VsockExerciseResult) -> str:
    """The human-readable summary."""
    rate = (result.host_to_guest_bytes + result.guest_to_host_bytes) / max(result.seconds, 1e-9)
    lines = [
        f"exercise vsock: {result.device} as guest CID {result.guest_cid}",
        f"  host to guest: {result.host_to_guest_bytes} bytes verified",
        f"  guest to host: {result.guest_to_host_bytes} bytes verified",
        f"  {result.seconds:.2f} s, {rate / 1e6:.2f} MB/s both ways together, "
        f"{result.rx_packets} packets in, {result.tx_packets} out"
        + (", device paused and resumed" if result.paused else ""),
    ]
    lines.extend(f"  error: {e}" for e in result.error_details)
    lines.append("  OK" if result.ok else f"  FAILED: {result.errors} error(s)")
    return "\n".join(lines)
