"""Property test of credit flow control: random interleavings of sends, reads, credit requests and
packet delivery (a few packets at a time, cut to random sizes) between a guest and a host
connection with small, different buffers.

After every step: no connection was reset, neither sender has more bytes outstanding (sent and
not yet consumed by the reader) than the reader's buf_alloc, and what each side read is a prefix
of what the other sent. At the end, after delivering and reading everything: every byte arrived,
and each sender has credit again (no stall waiting for a CREDIT_UPDATE that never comes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost.virtio.vsock import (
    ConnectionOptions,
    ConnectionState,
    VsockConnection,
    VsockEndpoint,
)
from pyvhost.virtio.vsock.wire import U32_MASK

from .vsock_link import GUEST_CID, HOST_CID, Link


@dataclass
class Side:
    """One end of the connection and the bytes its application sent and read."""

    conn: VsockConnection
    seed: int
    sent: bytearray = field(default_factory=bytearray)
    read: bytearray = field(default_factory=bytearray)

    def next_bytes(self, count: int) -> bytes:
        start = len(self.sent)
        return bytes((self.seed + 7 * i) % 251 for i in range(start, start + count))


@dataclass
class Sim:
    link: Link
    sides: dict[str, Side]

    @classmethod
    def make(cls, guest: ConnectionOptions, host: ConnectionOptions, start: int = 0) -> Sim:
        """Connected ends whose byte counters all start at ``start`` (near 2**32 they wrap)."""
        link = Link(
            VsockEndpoint(GUEST_CID, options=guest),
            VsockEndpoint(HOST_CID, peer_cid=GUEST_CID, options=host),
        )
        link.host.listen(5000)
        g = link.guest.connect(HOST_CID, 5000)
        link.settle()
        h = link.host.accept()
        assert h is not None
        for sender, reader in ((g, h), (h, g)):
            sender.tx_cnt = sender.peer_fwd_cnt = reader.fwd_cnt = reader.last_fwd_cnt = start
        return cls(link, {"g": Side(g, 1), "h": Side(h, 2)})

    def endpoint(self, name: str) -> VsockEndpoint:
        return self.link.guest if name == "g" else self.link.host

    def send(self, name: str, count: int) -> None:
        side = self.sides[name]
        data = side.next_bytes(count)
        accepted = side.conn.send(data)
        assert 0 <= accepted <= count
        side.sent += data[:accepted]

    def read(self, name: str, count: int) -> None:
        side = self.sides[name]
        side.read += side.conn.receive(count)

    def ask(self, name: str) -> None:
        self.sides[name].conn.request_credit()

    def carry(self, name: str, packets: int, max_payload: int) -> None:
        self.link.carry(self.endpoint(name), packets, max_payload)

    def check(self) -> None:
        for name, other in (("g", "h"), ("h", "g")):
            sender, reader = self.sides[name], self.sides[other]
            assert sender.conn.state is ConnectionState.CONNECTED, sender.conn.reason
            outstanding = (sender.conn.tx_cnt - reader.conn.fwd_cnt) & U32_MASK
            assert outstanding <= reader.conn.buf_alloc, (name, outstanding)
            assert outstanding == len(sender.sent) - len(reader.read)
            assert reader.read == sender.sent[: len(reader.read)]

    def finish(self) -> None:
        """Deliver and read until nothing moves; then every byte is there and credit is back."""
        moving = True
        while moving:
            moving = bool(self.link.carry(self.link.guest) + self.link.carry(self.link.host))
            for name in self.sides:
                moving |= bool(self.sides[name].conn.readable)
                self.read(name, -1)
            self.check()
        for name, other in (("g", "h"), ("h", "g")):
            sender, reader = self.sides[name], self.sides[other]
            assert reader.read == sender.sent
            floor = reader.conn.buf_alloc - reader.conn.options.threshold + 1
            assert sender.conn.credit >= max(floor, min(1, reader.conn.buf_alloc)), name


Action = tuple[Any, ...]

sides = st.sampled_from("gh")
actions = st.lists(
    st.one_of(
        st.tuples(st.just("send"), sides, st.integers(0, 400)),
        st.tuples(st.just("read"), sides, st.integers(0, 400)),
        st.tuples(st.just("carry"), sides, st.integers(1, 6), st.integers(1, 80)),
        st.tuples(st.just("ask"), sides),
    ),
    min_size=30,
    max_size=300,
)
options = st.builds(
    ConnectionOptions,
    buf_alloc=st.integers(1, 300),
    max_payload=st.integers(1, 128),
    credit_update_threshold=st.none() | st.integers(1, 400),
)


def run(
    guest: ConnectionOptions, host: ConnectionOptions, steps: list[Action], start: int = 0
) -> None:
    sim = Sim.make(guest, host, start)
    calls: dict[str, Callable[..., None]] = {
        "send": sim.send,
        "read": sim.read,
        "carry": sim.carry,
        "ask": sim.ask,
    }
    for name, *args in steps:
        calls[name](*args)
        sim.check()
    sim.finish()


@settings(max_examples=300, deadline=None)
@given(options, options, actions, st.sampled_from([0, U32_MASK - 200]) | st.integers(0, U32_MASK))
def test_credit_is_never_exceeded_and_no_byte_is_lost(
    guest: ConnectionOptions, host: ConnectionOptions, steps: list[Action], start: int
) -> None:
    run(guest, host, steps, start)


FILL_THE_WINDOW: list[Action] = [
    ("send", "g", 400),
    ("carry", "g", 6, 80),
    ("send", "g", 400),
    ("carry", "g", 6, 80),
    ("read", "h", 400),
]


def test_a_credit_that_forgets_bytes_in_flight_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness can fail: a sender that ignores what it already sent overruns the reader."""
    broken = property(lambda conn: conn.peer_buf_alloc)
    monkeypatch.setattr(VsockConnection, "credit", broken)
    small = ConnectionOptions(buf_alloc=100)
    with pytest.raises(AssertionError):
        run(small, small, FILL_THE_WINDOW)


def test_a_credit_one_byte_too_generous_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def off_by_one(conn: VsockConnection) -> int:
        return conn.peer_buf_alloc - ((conn.tx_cnt - conn.peer_fwd_cnt) & U32_MASK) + 1

    monkeypatch.setattr(VsockConnection, "credit", property(off_by_one))
    small = ConnectionOptions(buf_alloc=100)
    with pytest.raises(AssertionError):
        run(small, small, FILL_THE_WINDOW)


def test_a_reader_that_never_gives_credit_back_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness catches a stall: no CREDIT_UPDATE ever leaves the reader."""
    monkeypatch.setattr(ConnectionOptions, "threshold", property(lambda options: 1 << 40))
    small = ConnectionOptions(buf_alloc=100)
    with pytest.raises(AssertionError):
        run(small, small, FILL_THE_WINDOW)


def test_the_unbroken_code_passes_the_same_steps() -> None:
    small = ConnectionOptions(buf_alloc=100)
    run(small, small, FILL_THE_WINDOW)
