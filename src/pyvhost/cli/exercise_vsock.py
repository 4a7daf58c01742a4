"""``pyvhost exercise vsock``: this process plays the guest of a vsock device, no VM needed.

Two devices, one exercise:

- ``--kernel DEV --guest-cid CID``: it hands the kernel's vhost-vsock its memory and rings and
  takes guest CID ``CID``; the host side is ``AF_VSOCK`` sockets.
- ``--socket PATH --uds-path UDS``: it is the front-end of a hybrid vhost-user vsock back-end
  (``pyvhost serve vsock``) and the guest CID is the device's (its config space); the host side
  is Unix sockets: a host program connecting to ``UDS`` with ``CONNECT <guest port>`` and a
  listener at ``UDS_<host port>`` that the guest reaches.

It runs the guest's vsock stack (:mod:`pyvhost.virtio.vsock`) over the rings. Then, at once: the
host connects to a port the "guest" listens on and sends ``--bytes``; the "guest" connects to a
host listener and sends as many. Both streams are compared byte for byte, with credit flow
control on both sides. ``--pause`` (kernel) stops the device (VHOST_VSOCK_SET_RUNNING 0) halfway
and starts it again: nothing may be lost. Exits 1 on any loss, mismatch or timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import select
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pyvhost.cli.vsock_hosts import GUEST_PORT, HOST_PORT, HostSide, KernelHost, UnixHost
from pyvhost.cli.vsock_streams import GUEST_TO_HOST, HOST_TO_GUEST, Stream, stream
from pyvhost.driver.session import DriverSession
from pyvhost.driver.vsock import VsockDriver
from pyvhost.kernel.devices import VhostVsock
from pyvhost.virtio import features as vf
from pyvhost.virtio.vsock import ConnectionOptions, VsockConfig, VsockConnection, VsockEndpoint
from pyvhost.virtio.vsock.wire import EVENT_QUEUE, HOST_CID, LAST_RESERVED_PORT

__all__ = [
    "VsockExerciseOptions",
    "VsockExerciseResult",
    "add_parser",
    "run",
    "run_vsock",
    "stream",
]

_MAX_DETAILS = 20
_NO_SEQPACKET = ~vf.bit_mask(vf.VSOCK_F_SEQPACKET)


@dataclass
class VsockExerciseOptions:
    """Which device (``kernel`` with ``guest_cid``, or ``socket`` with ``uds_path``), how many
    bytes each way."""

    kernel: str | None = None
    guest_cid: int | None = None
    bytes: int = 1 << 20
    pause: bool = False
    timeout: float = 60.0
    buf_alloc: int = 64 * 1024
    socket: str | None = None
    uds_path: str | None = None
    connect_timeout: float = 10.0
    """Socket mode: seconds to wait for the back-end's socket at start."""


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
    transport_resets: int = 0
    error_details: list[str] = field(default_factory=list)
    ok: bool = False

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_details) < _MAX_DETAILS:
            self.error_details.append(message)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Run:
    """The host sockets, the guest endpoint and the rings, pumped in one loop."""

    def __init__(
        self,
        opts: VsockExerciseOptions,
        session: DriverSession,
        result: VsockExerciseResult,
        host: HostSide,
    ) -> None:
        self.opts = opts
        self.result = result
        self.session = session
        self.host = host
        options = ConnectionOptions(buf_alloc=opts.buf_alloc)
        first_port = random.randrange(LAST_RESERVED_PORT + 1, 0x7FFF_FFFF)
        self.endpoint = VsockEndpoint(
            result.guest_cid, peer_cid=HOST_CID, options=options, first_port=first_port
        )
        self.driver = VsockDriver(session, self.endpoint)
        self.h2g = Stream(HOST_TO_GUEST, opts.bytes, "host to guest", result.error)
        self.g2h = Stream(GUEST_TO_HOST, opts.bytes, "guest to host", result.error)
        self.guest_in: VsockConnection | None = None
        self.guest_out: VsockConnection | None = None

    def start(self) -> None:
        """Guest listener up, then both connections on their way (the streams' pattern blocks
        made first, outside the timed transfer)."""
        stream(HOST_TO_GUEST, 0, 1)
        stream(GUEST_TO_HOST, 0, 1)
        self.endpoint.listen(GUEST_PORT)
        self.guest_out = self.endpoint.connect(HOST_CID, HOST_PORT, now=time.monotonic())
        self.host.start(self.result.guest_cid)
        self.driver.post_rx()

    def step(self) -> int:
        """One round of everything; returns a progress count (0: nothing happened)."""
        moved = self.driver.pump()
        moved += self.host.step(self.h2g, self.g2h)
        moved += self._guest_side()
        self.endpoint.tick(time.monotonic())
        return moved + self.driver.pump()

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
        queues = range(self.session.num_queues)
        fds: list[Any] = [self.session.queues[q].call_fd for q in queues]
        select.select(fds + self.host.sockets(), [], [], timeout)
        for q in queues:
            self.session.notifications(q)

    def finish(self, elapsed: float) -> VsockExerciseResult:
        result = self.result
        result.seconds = round(elapsed, 3)
        result.host_to_guest_bytes = self.h2g.received if not self.h2g.broken else 0
        result.guest_to_host_bytes = self.g2h.received if not self.g2h.broken else 0
        result.rx_packets, result.tx_packets = self.driver.rx_packets, self.driver.tx_packets
        result.transport_resets = self.driver.transport_resets
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


def _transfer(run: _Run, opts: VsockExerciseOptions, pause: Any = None) -> VsockExerciseResult:
    """Start both streams and pump until they arrived or the timeout; ``pause()`` once halfway."""
    run.start()
    start = time.monotonic()
    deadline = start + opts.timeout
    while not (run.h2g.done and run.g2h.done) and time.monotonic() < deadline:
        if pause is not None and not run.result.paused and run.h2g.received * 2 >= opts.bytes:
            pause()
            run.result.paused = True
        if not run.step():
            run.wait(0.05)
    return run.finish(time.monotonic() - start)


def run_vsock(opts: VsockExerciseOptions) -> VsockExerciseResult:
    """Run the exercise; device errors raise VhostError, socket errors OSError."""
    if opts.bytes < 1:
        raise ValueError("--bytes must be at least 1")
    if opts.socket is not None:
        return _run_user(opts)
    if opts.kernel is None or opts.guest_cid is None:
        raise ValueError("--kernel DEV needs --guest-cid CID")
    return _run_kernel(opts, opts.kernel, opts.guest_cid)


def _run_kernel(opts: VsockExerciseOptions, path: str, guest_cid: int) -> VsockExerciseResult:
    device = VhostVsock(path)
    with contextlib.ExitStack() as stack:
        stack.callback(device.close)
        session = DriverSession.kernel(
            device, num_queues=2, queue_size=128, features_mask=_NO_SEQPACKET
        )
        stack.callback(session.close)
        device.set_guest_cid(guest_cid)
        device.set_running(True)
        stack.callback(_stop, device)
        host = KernelHost()
        stack.callback(host.close)
        run = _Run(opts, session, VsockExerciseResult(path, guest_cid), host)

        def pause() -> None:
            """Stop and restart the device, as a VMM does around a snapshot; then kick both
            rings, as a VMM must: a kick that arrived while the device was stopped is gone."""
            device.set_running(False)
            time.sleep(0.05)
            device.set_running(True)
            for q in range(session.num_queues):
                session.kick(q, force=True)

        return _transfer(run, opts, pause if opts.pause else None)
    raise AssertionError("unreachable")  # pragma: no cover


def _run_user(opts: VsockExerciseOptions) -> VsockExerciseResult:
    if opts.uds_path is None:
        raise ValueError("--socket PATH needs --uds-path UDS (the device's --uds-path)")
    if opts.pause:
        raise ValueError("--pause is for --kernel (SET_RUNNING)")
    assert opts.socket is not None
    with contextlib.ExitStack() as stack:
        session = DriverSession.connect(
            opts.socket,
            num_queues=EVENT_QUEUE + 1,
            queue_size=128,
            features_mask=_NO_SEQPACKET,
            mem_size=32 << 20,
            connect_timeout=opts.connect_timeout,
        )
        stack.callback(session.close)
        guest_cid = VsockConfig.decode(session.config(0, VsockConfig.SIZE)).guest_cid
        if opts.guest_cid is not None and opts.guest_cid != guest_cid:
            raise ValueError(f"--guest-cid {opts.guest_cid}: the device says {guest_cid}")
        result = VsockExerciseResult(opts.socket, guest_cid)
        host = UnixHost(opts.uds_path, result.error)
        stack.callback(host.close)
        return _transfer(_Run(opts, session, result, host), opts)
    raise AssertionError("unreachable")  # pragma: no cover


def _stop(device: VhostVsock) -> None:
    with contextlib.suppress(OSError):
        device.set_running(False)


def add_parser(devices: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``exercise vsock`` to the ``exercise`` sub-commands."""
    vsock = devices.add_parser(
        "vsock",
        help="streams both ways between host sockets and a guest played through kernel "
        "vhost-vsock or a hybrid vhost-user vsock back-end, every byte verified",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    device = vsock.add_mutually_exclusive_group(required=True)
    device.add_argument("--kernel", metavar="DEV", help="e.g. /dev/vhost-vsock")
    device.add_argument("--socket", metavar="PATH", help="a vhost-user vsock back-end's socket")
    vsock.add_argument(
        "--guest-cid",
        type=int,
        help="the CID to play (--kernel; 3 or more); with --socket, checked against the device's",
    )
    vsock.add_argument(
        "--uds-path", metavar="UDS", help="the back-end's Unix socket for host programs (--socket)"
    )
    vsock.add_argument("--bytes", type=int, default=1 << 20, help="bytes each way (default 1 MiB)")
    vsock.add_argument(
        "--pause", action="store_true", help="SET_RUNNING 0 then 1 halfway: nothing may be lost"
    )
    vsock.add_argument("--timeout", type=float, default=60.0, help="seconds for the transfer")
    vsock.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the back-end's socket at start (0: one try; default 10)",
    )
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
            socket=args.socket,
            uds_path=args.uds_path,
            connect_timeout=args.connect_timeout,
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
