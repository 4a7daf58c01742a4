"""Hostile guest packets through the device's tx queue: each is refused with its reason logged
(the endpoint's table in docs/vsock.md), and the device, its queues and its other connections go
on."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from pyvhost.virtio.vsock import (
    HOST_CID,
    ConnectionOptions,
    ConnectionState,
    Op,
    Type,
    VsockConnection,
    VsockHeader,
)
from pyvhost.virtio.vsock.wire import Bytes

from .support import GUEST_CID, Guest, Host, read_exactly, serve_vsock


def raw(op: int, payload: bytes = b"", *, src_port: int = 4000, **fields: int) -> bytes:
    """A packet from the guest to host port 5000, with ``fields`` changed."""
    values = {
        "src_cid": GUEST_CID,
        "dst_cid": HOST_CID,
        "src_port": src_port,
        "dst_port": 5000,
        "len": len(payload),
        "type": Type.STREAM,
        "op": op,
        "flags": 0,
        "buf_alloc": 4096,
        "fwd_cnt": 0,
    }
    values.update(fields)
    return VsockHeader(**values).encode() + payload


def _still_works(guest: Guest, host: Host, port: int = 5100) -> None:
    listener = host.listen(port)
    result = host.run(lambda: read_exactly(host.accept(listener), 10_000))
    conn = guest.connect(port)
    data = os.urandom(10_000)
    guest.send_all(conn, data)
    guest.until(result.done, what="a good connection after the hostile packets")
    assert result.result() == data


def _replies(guest: Guest, send: bytes) -> list[int]:
    """The ops of the packets the device answers ``send`` with (pumped for a while)."""
    ops: list[int] = []
    feed = guest.endpoint.feed

    def recording(header: VsockHeader, payload: Bytes = b"") -> VsockConnection | None:
        ops.append(header.op)
        return feed(header, payload)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(guest.endpoint, "feed", recording)
        guest.driver.transmit_raw(send)
        guest.until(lambda: guest.driver.tx_in_flight == 0, what="the packet taken")
        for _ in range(20):
            guest.pump(0.01)
    return ops


CASES = [
    ("short chain", b"\0" * 10, "less than a header", 0),
    ("not for us", raw(Op.REQUEST, dst_cid=7), "dst_cid 7 is not ours (2)", 0),
    ("another guest's CID", raw(Op.REQUEST, src_cid=9), "src_cid 9 is not the peer's (3)", 0),
    ("upper CID bits", raw(Op.REQUEST, src_cid=3 | 1 << 40), "reserved upper 32 bits", 0),
    ("len mismatch", raw(Op.REQUEST, len=5), "len: 5 but the payload is 0 bytes", 1),
    ("payload on a REQUEST", raw(Op.REQUEST, b"xx"), "only RW carries a payload", 1),
    ("unknown op", raw(99), "99 is not an operation", 1),
    ("SEQPACKET", raw(Op.REQUEST, type=Type.SEQPACKET), "SEQPACKET is not supported", 1),
    ("RW for no connection", raw(Op.RW, b"data"), "RW for no connection", 1),
    ("RST for no connection", raw(Op.RST), "", 0),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_packet_is_refused_and_the_device_goes_on(
    guest: Guest, host: Host, caplog: pytest.LogCaptureFixture, case: tuple[str, bytes, str, int]
) -> None:
    name, data, logged, rsts = case
    caplog.set_level(logging.DEBUG, "pyvhost")
    assert _replies(guest, data) == [Op.RST] * rsts, name
    assert logged in caplog.text
    _still_works(guest, host)
    assert "stopped" not in caplog.text and "Traceback" not in caplog.text


def test_rw_beyond_the_credit_resets_that_connection_only(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pyvhost")
    with (
        serve_vsock(folder, options=ConnectionOptions(buf_alloc=4096)) as served,
        Guest(served.sock) as guest,
    ):
        host = Host(served.uds)
        try:
            host.listen(5000)
            conn = guest.connect(5000)
            port = conn.key.local_port
            guest.driver.transmit_raw(raw(Op.RW, bytes(3000), src_port=port), kick=False)
            guest.driver.transmit_raw(raw(Op.RW, bytes(3000), src_port=port))
            guest.until(lambda: conn.state is ConnectionState.CLOSED, what="the reset")
            assert conn.reason == "reset by the peer"
            assert "beyond our credit" in caplog.text
            _still_works(guest, host)
        finally:
            host.close()


def test_a_huge_tx_chain_is_not_copied_whole(
    guest: Guest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pyvhost")
    big = raw(Op.RW, len=1 << 20) + bytes(1 << 20)
    assert _replies(guest, big) == [Op.RST]
    assert "1048576 payload bytes, cut to 262144" in caplog.text
