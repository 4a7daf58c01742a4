"""`exercise net --socket`: the frames it sends are the pattern every peer (bench_kernel, the
guest tests) expects, however they are built, and the loopback run never waits for frames it has
not sent."""

from __future__ import annotations

from typing import Any

import pytest

from pyvhost.cli.exercise_net import GUEST_MAC, HOST_MAC, frame, parse_frame
from pyvhost.driver.net import Received


def reference(direction: int, seq: int, size: int) -> bytes:
    """The definition: header, magic, direction and number, then (seq * 7 + i) & 0xFF."""
    from pyvhost.cli.exercise_net import _SEQ, ETHERTYPE, MAGIC

    src, dst = (GUEST_MAC, HOST_MAC) if direction == 1 else (HOST_MAC, GUEST_MAC)
    head = dst + src + ETHERTYPE.to_bytes(2, "big") + MAGIC + _SEQ.pack(direction, seq)
    fill = bytes((seq * 7 + i) & 0xFF for i in range(256))
    return head + (fill * (size // 256 + 1))[: size - len(head)]


@pytest.mark.parametrize("size", [60, 64, 255, 256, 257, 1000, 1514, 9000])
@pytest.mark.parametrize("seq", [0, 1, 36, 37, 255, 256, 65535, 2**31 - 1])
@pytest.mark.parametrize("direction", [1, 2])
def test_frame_is_the_defined_pattern(direction: int, seq: int, size: int) -> None:
    got = frame(direction, seq, size)
    assert got == reference(direction, seq, size)
    assert len(got) == size
    assert parse_frame(got) == (direction, seq)


@pytest.mark.parametrize("size", [64, 1500])
def test_loopback_never_waits_with_nothing_in_flight(
    monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """With a window as large as the ring (64-byte frames, one buffer each), the exercise must
    reap its transmit completions before it sends again: it once found no room, sent nothing,
    and waited out its receive timeout each round."""
    from devices.net_rig import served
    from pyvhost.cli.exercise_net import NetExerciseOptions
    from pyvhost.cli.exercise_net_socket import run_socket
    from pyvhost.devices.net import LoopbackBackend, NetDevice
    from pyvhost.driver.net import NetDriver

    counts = {"sent": 0, "back": 0, "idle_waits": 0}
    send, receive = NetDriver.send, NetDriver.receive

    def counted_send(self: NetDriver, *args: Any, **kwargs: Any) -> int:
        counts["sent"] += 1
        return send(self, *args, **kwargs)

    def counted_receive(self: NetDriver, timeout: float | None = 0.0) -> list[Received]:
        if timeout != 0 and counts["sent"] == counts["back"]:
            counts["idle_waits"] += 1
        got = receive(self, timeout)
        counts["back"] += len(got)
        return got

    monkeypatch.setattr(NetDriver, "send", counted_send)
    monkeypatch.setattr(NetDriver, "receive", counted_receive)
    with served(NetDevice(LoopbackBackend(), queue_size=64)) as sock:
        opts = NetExerciseOptions(None, None, socket=str(sock), frames=1000, size=size)
        opts.queue_size = 64
        result = run_socket(opts)
    assert result.ok, result.error_details
    assert (result.tx_frames, result.rx_frames) == (1000, 1000)
    assert counts["idle_waits"] == 0
