"""``pyvhost exercise net``: this process is the VMM and the guest of a net device.

``--socket PATH`` drives a vhost-user net back-end (see :mod:`pyvhost.cli.exercise_net_socket`):
loopback (every frame comes back, compared), ``--tx-only`` (a sink: completions counted), or
``--tap NAME`` (the back-end's TAP: frames both ways through it, as below).

``--kernel DEV --tap NAME``: it creates (or attaches) the TAP, hands vhost-net its memory,
rings and the TAP, then sends ``--frames`` frames through the transmit ring and sees each arrive
on the interface (an AF_PACKET socket bound to it: vhost transmit is the host stack *receiving*),
then sends as many out of the interface and finds each in a posted receive buffer behind a valid
virtio-net header. Every byte is compared. Exits 1 on any loss, duplicate or mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pyvhost.driver.net import MAX_FRAME, NetDriver, Received
from pyvhost.driver.session import DEFAULT_GPA_BASE, DriverSession
from pyvhost.kernel.devices import VHOST_NET_F_VIRTIO_NET_HDR, VhostNet
from pyvhost.kernel.tap import Tap
from pyvhost.virtio import features as vf
from pyvhost.virtio.memory import PAGE_SIZE, DirtyLog
from pyvhost.virtio.net import ETH_HEADER_LEN

__all__ = [
    "NetExerciseOptions",
    "NetExerciseResult",
    "TapRun",
    "add_parser",
    "disable_ipv6",
    "frame",
    "packet_socket",
    "parse_frame",
    "run",
    "run_net",
]

MAGIC = b"PVHXNET1"
ETHERTYPE = 0x88B5
"""IEEE 802 local experimental EtherType: nothing on the host answers it."""
GUEST_MAC = bytes.fromhex("027076680001")
HOST_MAC = bytes.fromhex("027076680002")
_TX, _RX = 1, 2
_SEQ = struct.Struct("<BI")
_MIN_SIZE = ETH_HEADER_LEN + len(MAGIC) + _SEQ.size
_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4
_MAX_DETAILS = 20
_WINDOW = 64
"""Frames sent and not yet seen on the other side: bounds what the host stack must queue."""
_SOL_PACKET = 263
_PACKET_STATISTICS = 6
_TPACKET_STATS = struct.Struct("II")
_SO_RCVBUFFORCE = 33


_RAMP = bytes(range(256)) * 2
"""Byte ``i`` of the pattern of frame ``seq`` is ``(seq * 7 + i) & 0xFF``: a slice of this."""
_ETHERTYPE = ETHERTYPE.to_bytes(2, "big")


def frame(direction: int, seq: int, size: int) -> bytes:
    """Frame ``seq`` of a direction: Ethernet header, magic, direction and number, a pattern
    (``(seq * 7 + i) & 0xFF`` at byte ``i`` of it, repeated every 256 bytes)."""
    src, dst = (GUEST_MAC, HOST_MAC) if direction == _TX else (HOST_MAC, GUEST_MAC)
    head = dst + src + _ETHERTYPE + MAGIC + _SEQ.pack(direction, seq)
    start = seq * 7 & 0xFF
    fill = _RAMP[start : start + 256]
    body = (fill * (size // 256 + 1))[: size - len(head)]
    return head + body


def parse_frame(data: bytes) -> tuple[int, int] | None:
    """(direction, seq) of one of our frames, or None for anything else on the wire."""
    at = ETH_HEADER_LEN
    if len(data) < _MIN_SIZE or data[12:14] != ETHERTYPE.to_bytes(2, "big"):
        return None
    if data[at : at + len(MAGIC)] != MAGIC:
        return None
    direction, seq = _SEQ.unpack_from(data, at + len(MAGIC))
    return direction, seq


@dataclass
class NetExerciseOptions:
    """What to run: the device (a kernel device or a socket), the TAP, how many frames of what
    size, which features."""

    kernel: str | None
    tap: str | None
    socket: str | None = None
    frames: int = 1000
    size: int = 128
    queue_size: int = 256
    mergeable: bool = True
    event_idx: bool = True
    kernel_header: bool = False
    dirty_log: bool = False
    timeout: float = 30.0
    seconds: float | None = None
    tx_only: bool = False
    packed: bool = False
    connect_timeout: float = 10.0
    """Socket mode: seconds to wait for the back-end's socket at start."""


@dataclass
class NetExerciseResult:
    """What happened; ``ok`` when every frame arrived once, intact, both ways."""

    device: str
    tap: str | None
    mode: str = "kernel"
    features: int = 0
    tx_frames: int = 0
    rx_frames: int = 0
    errors: int = 0
    tx_pps: float = 0.0
    rx_pps: float = 0.0
    foreign_frames: int = 0
    tx_notifications: int = 0
    rx_notifications: int = 0
    dirty_pages: int = 0
    log_signalled: bool = False
    error_details: list[str] = field(default_factory=list)
    ok: bool = False

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_details) < _MAX_DETAILS:
            self.error_details.append(message)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _features_mask(opts: NetExerciseOptions) -> int:
    mask = (1 << 64) - 1
    if not opts.mergeable:
        mask &= ~(1 << vf.NET_F_MRG_RXBUF)
    if not opts.event_idx:
        mask &= ~(1 << vf.F_RING_EVENT_IDX)
    if not opts.kernel_header:
        mask &= ~(1 << VHOST_NET_F_VIRTIO_NET_HDR)
    return mask


def disable_ipv6(name: str) -> None:
    """Keep the host's IPv6 router and MLD frames out of the receive ring."""
    with (
        contextlib.suppress(OSError),
        open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f,
    ):
        f.write("1")


class TapRun:
    """Frames both ways between a driver session and a TAP, seen there with a packet socket
    (the kernel exercise, and the socket exercise with ``--tap``)."""

    def __init__(
        self,
        opts: NetExerciseOptions,
        result: NetExerciseResult,
        session: DriverSession,
        tap: str,
        wire: socket.socket,
    ) -> None:
        self.opts = opts
        self.result = result
        self.session = session
        self.tap = tap
        self.wire = wire
        rx_size = 1024 if opts.mergeable else None
        self.net = NetDriver(session, rx_buffer_size=rx_size)
        self.rx_gpas: list[int] = []

    def transmit(self) -> None:
        """Every frame through the transmit ring, each seen once on the interface."""
        opts, result, net = self.opts, self.result, self.net
        seen: set[int] = set()
        sent = 0
        start = time.monotonic()
        deadline = start + opts.timeout
        while len(seen) < opts.frames and time.monotonic() < deadline:
            while sent < opts.frames and net.tx_room() > 0 and sent - len(seen) < _WINDOW:
                net.send(frame(_TX, sent, opts.size))
                sent += 1
            net.flush()
            net.reap_tx()
            if not self._wire_frames(seen):
                select.select([self.wire], [], [], 0.01)
                net.reap_tx(0.0)
        elapsed = time.monotonic() - start
        while net.tx_in_flight and net.reap_tx(0.5):
            pass
        result.tx_frames = len(seen)
        result.tx_pps = round(len(seen) / elapsed, 1) if elapsed > 0 else 0.0
        if len(seen) < opts.frames:
            missing = sorted(set(range(opts.frames)) - seen)
            result.error(
                f"transmit: {len(missing)} of {opts.frames} frames never reached {self.tap} "
                f"within {opts.timeout:g} s (first missing: {missing[:5]}){self._socket_drops()}"
            )

    def _socket_drops(self) -> str:
        """Frames our own packet socket dropped (its receive buffer was full), if any: a loss
        that is this program's, not the device's."""
        raw = self.wire.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, _TPACKET_STATS.size)
        drops = _TPACKET_STATS.unpack(raw)[1]
        return f"; the packet socket itself dropped {drops}" if drops else ""

    def _wire_frames(self, seen: set[int]) -> int:
        """Frames read off the interface now; each of ours checked byte for byte."""
        n = 0
        while True:
            try:
                data, addr = self.wire.recvfrom(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return n
            n += 1
            if addr[2] == _PACKET_OUTGOING:
                continue
            parsed = parse_frame(data)
            if parsed is None or parsed[0] != _TX:
                self.result.foreign_frames += 1
                continue
            seq = parsed[1]
            self._check(data, _TX, seq, seen, "transmit")

    def _check(self, data: bytes, direction: int, seq: int, seen: set[int], what: str) -> None:
        expected = frame(direction, seq, self.opts.size) if seq < self.opts.frames else b""
        if data != expected:
            self.result.error(
                f"{what}: frame {seq} differs ({len(data)} bytes, expected {len(expected)})"
            )
        elif seq in seen:
            self.result.error(f"{what}: frame {seq} arrived twice")
        seen.add(seq)

    def receive(self) -> None:
        """Every frame sent out of the interface, each found once in a receive buffer."""
        opts, result, net = self.opts, self.result, self.net
        net.post_rx()
        seen: set[int] = set()
        sent = 0
        start = time.monotonic()
        deadline = start + opts.timeout
        while len(seen) < opts.frames and time.monotonic() < deadline:
            window = min(_WINDOW, net.rx_posted)
            while sent < opts.frames and sent - len(seen) < window:
                self.wire.send(frame(_RX, sent, opts.size))
                sent += 1
            for got in net.receive(timeout=0.05):
                self._received(got, seen)
        elapsed = time.monotonic() - start
        result.rx_frames = len(seen)
        result.rx_pps = round(len(seen) / elapsed, 1) if elapsed > 0 else 0.0
        for reason in net.rx_errors:
            result.error(f"receive: {reason}")
        if len(seen) < opts.frames:
            missing = sorted(set(range(opts.frames)) - seen)
            result.error(
                f"receive: {len(missing)} of {opts.frames} frames sent out of {self.tap} "
                f"never reached a receive buffer (first missing: {missing[:5]})"
            )

    def _received(self, got: Received, seen: set[int]) -> None:
        self.rx_gpas.extend(got.addresses)
        parsed = parse_frame(got.frame)
        if parsed is None or parsed[0] != _RX:
            self.result.foreign_frames += 1
            return
        self._check(got.frame, _RX, parsed[1], seen, "receive")


def _check_log(run: TapRun, log: DirtyLog, log_event: int) -> None:
    """Every page the kernel wrote (receive buffers, used rings) is marked; the eventfd fired."""
    result, session = run.result, run.session
    result.dirty_pages = len(log.dirty_pages())
    try:
        result.log_signalled = os.eventfd_read(log_event) > 0
    except BlockingIOError:
        result.log_signalled = False
    if not result.log_signalled:
        result.error("dirty log: the log eventfd was never signalled")
    pages = {gpa // PAGE_SIZE for gpa in run.rx_gpas}
    for q in session.queues:
        assert q.ring is not None
        pages.add(q.ring.device // PAGE_SIZE)
    unmarked = sorted(p for p in pages if not log.is_dirty(p))
    if unmarked:
        result.error(
            f"dirty log: {len(unmarked)} written page(s) not marked "
            f"(first: {[hex(p * PAGE_SIZE) for p in unmarked[:5]]})"
        )


def run_net(opts: NetExerciseOptions) -> NetExerciseResult:
    """Run the exercise; errors of the device or the TAP propagate as VhostError."""
    if not _MIN_SIZE <= opts.size <= MAX_FRAME:
        raise ValueError(f"--size {opts.size}: frames are {_MIN_SIZE}..{MAX_FRAME} bytes")
    if opts.socket is not None:
        from pyvhost.cli.exercise_net_socket import run_socket

        return run_socket(opts)
    if opts.kernel is None or opts.tap is None:
        raise ValueError("--kernel needs --tap NAME (the TAP this process gives vhost-net)")
    if opts.tx_only or opts.seconds is not None or opts.packed:
        raise ValueError("--tx-only, --seconds and --packed are for --socket")
    return _run_kernel(opts, opts.kernel, opts.tap)


def _run_kernel(opts: NetExerciseOptions, kernel: str, tap_name: str) -> NetExerciseResult:
    """Through kernel vhost-net and a TAP of this process (the body of :func:`run_net`)."""
    result = NetExerciseResult(kernel, tap_name)
    device = VhostNet(kernel)
    stack = contextlib.ExitStack()
    with stack:
        stack.callback(device.close)
        tap = Tap.open(tap_name, vnet_hdr=not opts.kernel_header)
        stack.callback(tap.close)
        disable_ipv6(tap.name)
        tap.set_up()
        result.tap = tap.name
        wire = packet_socket(tap.name, stack)
        mem = max(16 << 20, 2 * opts.queue_size * (opts.size + 4096))
        # Made before the session, so it is unmapped only after the device is closed.
        log = _make_log(DEFAULT_GPA_BASE + mem, stack) if opts.dirty_log else None
        session = DriverSession.kernel(
            device,
            num_queues=2,
            queue_size=opts.queue_size,
            features_mask=_features_mask(opts),
            mem_size=mem,
        )
        stack.callback(session.close)
        result.features = session.features
        run = TapRun(opts, result, session, tap.name, wire)
        log_event = None if log is None else _start_log(session, *log, stack)
        for ring in (0, 1):
            device.set_backend(ring, tap.fd)
            stack.callback(device.set_backend, ring, None)
        run.transmit()
        run.receive()
        result.tx_notifications = session.notifications(1)
        result.rx_notifications = session.notifications(0)
        if log_event is not None:
            assert session.dirty_log is not None
            _check_log(run, session.dirty_log, log_event)
    result.ok = result.errors == 0
    return result


def packet_socket(name: str, stack: contextlib.ExitStack) -> socket.socket:
    """A raw AF_PACKET socket bound to interface ``name`` (closed with ``stack``)."""
    wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    stack.callback(wire.close)
    _big_receive_buffer(wire)
    wire.bind((name, 0))
    return wire


def _big_receive_buffer(wire: socket.socket) -> None:
    """4 MiB for the packet socket: above net.core.rmem_max where we may (root), else the cap."""
    try:
        wire.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 4 << 20)
    except PermissionError:
        wire.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)


def _make_log(end: int, stack: contextlib.ExitStack) -> tuple[DirtyLog, int]:
    """A dirty log covering guest-physical addresses below ``end``, and its memfd."""
    log, fd = DirtyLog.anonymous(-(-end // PAGE_SIZE // 8))
    stack.callback(log.close)
    stack.callback(os.close, fd)
    return log, fd


def _start_log(session: DriverSession, log: DirtyLog, fd: int, stack: contextlib.ExitStack) -> int:
    """Dirty logging on, as at the start of a migration; returns the log eventfd."""
    event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    stack.callback(os.close, event)
    session.control.set_log_fd(event)
    session.enable_dirty_log(log, fd)
    return event


def add_parser(devices: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``exercise net`` to the ``exercise`` sub-commands."""
    net = devices.add_parser(
        "net",
        help="frames both ways through kernel vhost-net and a TAP, every byte verified",
        description=__doc__,
    )
    device = net.add_mutually_exclusive_group(required=True)
    device.add_argument("--kernel", metavar="DEV", help="e.g. /dev/vhost-net (needs --tap)")
    device.add_argument("--socket", metavar="PATH", help="a vhost-user net back-end's socket")
    net.add_argument(
        "--tap",
        metavar="NAME",
        help="kernel: TAP to create or attach; socket: the back-end's TAP, watched here",
    )
    net.add_argument("--frames", type=int, default=1000, help="frames each way (default 1000)")
    net.add_argument("--size", type=int, default=128, help="frame length in bytes (default 128)")
    net.add_argument("--queue-size", type=int, default=256, help="ring size (default 256)")
    net.add_argument("--no-mrg-rxbuf", action="store_true", help="do not ack MRG_RXBUF")
    net.add_argument("--no-event-idx", action="store_true", help="do not ack EVENT_IDX")
    net.add_argument(
        "--kernel-header",
        action="store_true",
        help="ack VHOST_NET_F_VIRTIO_NET_HDR: the kernel adds the header, the TAP has none",
    )
    net.add_argument(
        "--dirty-log", action="store_true", help="log writes and check every written page"
    )
    net.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="socket loopback / --tx-only: send for this long instead of --frames",
    )
    net.add_argument(
        "--tx-only",
        action="store_true",
        help="socket: only transmit and count completions (a sink back-end)",
    )
    net.add_argument("--packed", action="store_true", help="socket: use packed rings")
    net.add_argument("--timeout", type=float, default=30.0, help="seconds per direction")
    net.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the back-end's socket at start (0: one try; default 10)",
    )
    net.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> NetExerciseResult:
    """Options from the command line, then :func:`run_net`."""
    opts = NetExerciseOptions(
        kernel=args.kernel,
        tap=args.tap,
        socket=args.socket,
        frames=args.frames,
        size=args.size,
        queue_size=args.queue_size,
        mergeable=not args.no_mrg_rxbuf,
        event_idx=not args.no_event_idx,
        kernel_header=args.kernel_header,
        dirty_log=args.dirty_log,
        timeout=args.timeout,
        seconds=args.seconds,
        tx_only=args.tx_only,
        packed=args.packed,
        connect_timeout=args.connect_timeout,
    )
    return run_net(opts)


def format_report(result: NetExerciseResult) -> str:
    """The human-readable summary."""
    where = f"TAP {result.tap}" if result.tap else result.mode
    lines = [
        f"exercise net: {result.device} ({where}), features {result.features:#x}",
        f"  transmit: {result.tx_frames} frames verified, {result.tx_pps:.0f} frames/s, "
        f"{result.tx_notifications} call(s)",
        f"  receive:  {result.rx_frames} frames verified, {result.rx_pps:.0f} frames/s, "
        f"{result.rx_notifications} call(s)",
    ]
    if result.foreign_frames:
        lines.append(f"  {result.foreign_frames} other frame(s) seen and ignored")
    if result.dirty_pages:
        lines.append(f"  dirty log: {result.dirty_pages} page(s) marked")
    lines.extend(f"  error: {e}" for e in result.error_details)
    lines.append("  OK" if result.ok else f"  FAILED: {result.errors} error(s)")
    return "\n".join(lines)
