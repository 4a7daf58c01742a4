"""``pyvhost exercise net --socket PATH``: drive a vhost-user net back-end as its guest.

- loopback (the default, for ``serve net --backend loopback``): frames go out of the transmit
  queue and each must come back, in order and byte for byte, in the receive buffers; frames in
  flight are bounded by the receive buffers posted, so a correct back-end never drops one;
- ``--tx-only`` (for ``--backend sink``): frames are only sent and their completions counted;
- ``--tap NAME`` (for ``serve net --tap NAME``, same network namespace): frames sent are seen on
  the interface with a packet socket, and frames sent out of the interface arrive in receive
  buffers (:class:`~pyvhost.cli.exercise_net.TapRun`, as in the kernel exercise).

``--frames`` frames, or as many as ``--seconds`` allow; ``--timeout`` bounds the wait for the last.
"""

from __future__ import annotations

import contextlib
import time

from pyvhost.cli.exercise_net import (
    NetExerciseOptions,
    NetExerciseResult,
    TapRun,
    disable_ipv6,
    frame,
    packet_socket,
    parse_frame,
)
from pyvhost.devices.net.backends import interface_exists
from pyvhost.driver.net import NetDriver, Received
from pyvhost.driver.session import DriverSession
from pyvhost.virtio import features as vf

__all__ = ["run_socket"]

_TX = 1
_MERGE_BUFFER = 1024


def _mask(opts: NetExerciseOptions) -> int:
    mask = (1 << 64) - 1
    if not opts.mergeable:
        mask &= ~(1 << vf.NET_F_MRG_RXBUF)
    if not opts.event_idx:
        mask &= ~(1 << vf.F_RING_EVENT_IDX)
    return mask


def _mode(opts: NetExerciseOptions) -> str:
    if opts.tap:
        return "tap"
    return "tx-only" if opts.tx_only else "loopback"


def run_socket(opts: NetExerciseOptions) -> NetExerciseResult:
    """Connect to ``opts.socket`` and run the mode the options name."""
    assert opts.socket is not None
    result = NetExerciseResult(opts.socket, opts.tap, mode=_mode(opts))
    if opts.tap and not interface_exists(opts.tap):
        raise ValueError(
            f"--tap {opts.tap}: no such interface here (the back-end makes it: "
            f"serve net --tap {opts.tap}; run both in one network namespace)"
        )
    mem = max(16 << 20, 4 * opts.queue_size * (opts.size + 4096))
    with contextlib.ExitStack() as stack:
        session = DriverSession.connect(
            opts.socket,
            num_queues=2,
            queue_size=opts.queue_size,
            features_mask=_mask(opts),
            mem_size=mem,
            packed=opts.packed,
            connect_timeout=opts.connect_timeout,
        )
        stack.callback(session.close)
        result.features = session.features
        if opts.tap:
            disable_ipv6(opts.tap)
            run = TapRun(opts, result, session, opts.tap, packet_socket(opts.tap, stack))
            run.transmit()
            run.receive()
        elif opts.tx_only:
            _transmit_only(opts, result, session)
        else:
            _Loopback(opts, result, session).run()
        result.tx_notifications = session.notifications(1)
        result.rx_notifications = session.notifications(0)
    result.ok = result.errors == 0
    return result


def _sending(opts: NetExerciseOptions, sent: int, end: float | None) -> bool:
    return sent < opts.frames if end is None else time.monotonic() < end


def _transmit_only(
    opts: NetExerciseOptions, result: NetExerciseResult, session: DriverSession
) -> None:
    """Keep the transmit ring full; count completions."""
    net = NetDriver(session)
    start = time.monotonic()
    end = None if opts.seconds is None else start + opts.seconds
    sent = done = 0
    while _sending(opts, sent, end):
        while net.tx_room() > 0 and _sending(opts, sent, end):
            net.send(frame(_TX, sent, opts.size))
            sent += 1
        net.flush()
        done += net.reap_tx(0.05)
    deadline = time.monotonic() + opts.timeout
    while net.tx_in_flight and time.monotonic() < deadline:
        done += net.reap_tx(0.1)
    elapsed = time.monotonic() - start
    result.tx_frames = done
    result.tx_pps = round(done / elapsed, 1) if elapsed > 0 else 0.0
    if done < sent:
        result.error(f"transmit: {sent - done} of {sent} frames never completed")


class _Loopback:
    """Every frame sent must come back next, intact."""

    def __init__(
        self, opts: NetExerciseOptions, result: NetExerciseResult, session: DriverSession
    ) -> None:
        self.opts = opts
        self.result = result
        rx_size = _MERGE_BUFFER if session.has_feature(vf.NET_F_MRG_RXBUF) else None
        self.net = NetDriver(session, rx_buffer_size=rx_size)
        self.expected = 0

    def run(self) -> None:
        opts, net, result = self.opts, self.net, self.result
        net.post_rx()
        per_frame = -(-(net.hdr_size + opts.size) // net.rx_buffer_size)
        window = max(1, net.rx_posted // per_frame)
        start = time.monotonic()
        end = None if opts.seconds is None else start + opts.seconds
        sent = 0
        deadline = (end or start) + opts.timeout
        while (_sending(opts, sent, end) or self.expected < sent) and time.monotonic() < deadline:
            # Completions first: a window as large as the ring would otherwise find no room
            # after the frames came back, send nothing, and wait for a receive that cannot come.
            net.reap_tx()
            while _sending(opts, sent, end) and sent - self.expected < window and net.tx_room() > 0:
                net.send(frame(_TX, sent, opts.size))
                sent += 1
            net.flush()
            for got in net.receive(timeout=0.05):
                self._check(got)
        elapsed = time.monotonic() - start
        result.tx_frames = sent
        result.rx_frames = self.expected
        result.tx_pps = round(sent / elapsed, 1) if elapsed > 0 else 0.0
        result.rx_pps = round(self.expected / elapsed, 1) if elapsed > 0 else 0.0
        for reason in net.rx_errors:
            result.error(f"receive: {reason}")
        if net.rx_returned:
            result.error(f"receive: {net.rx_returned} buffer(s) given back empty")
        if self.expected < sent:
            result.error(
                f"loopback: {sent - self.expected} of {sent} frames never came back within "
                f"{opts.timeout:g} s (first missing: {self.expected})"
            )

    def _check(self, got: Received) -> None:
        parsed = parse_frame(got.frame)
        if parsed is None or parsed[0] != _TX:
            self.result.foreign_frames += 1
            return
        seq = parsed[1]
        if seq != self.expected:
            self.result.error(f"loopback: frame {seq} came back, expected {self.expected}")
        elif got.frame != frame(_TX, seq, self.opts.size):
            self.result.error(f"loopback: frame {seq} came back changed ({len(got.frame)} bytes)")
        self.expected = max(self.expected, seq + 1)
