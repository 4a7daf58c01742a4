"""Codec throughput: messages encoded + decoded per second for a representative mix.

Run as ``python bench/bench_codec.py``; takes a few seconds.
"""

from __future__ import annotations

import time

from pyvhost.user.messages import (
    HEADER_SIZE,
    U64,
    Config,
    MemoryRegion,
    MemoryTable,
    Message,
    Request,
    VringAddr,
    VringState,
    decode_header,
    decode_request,
    encode_message,
    encode_request,
)

FAKE_FD = 900_000


def mix() -> list[Message]:
    table = MemoryTable(
        tuple(MemoryRegion(i << 30, 1 << 30, 0x7F00_0000_0000 + (i << 30), 0) for i in range(8))
    )
    return [
        encode_request(Request.SET_FEATURES, U64(1 << 32)),
        encode_request(Request.SET_VRING_NUM, VringState(0, 256)),
        encode_request(Request.SET_VRING_ADDR, VringAddr(0, 0, 0x1000, 0x2000, 0x3000, 0)),
        encode_request(Request.SET_MEM_TABLE, table, fds=[FAKE_FD + i for i in range(8)]),
        encode_request(Request.SET_CONFIG, Config(0, 0, bytes(60))),
    ]


def run(seconds: float = 1.0) -> None:
    messages = mix()
    for msg in messages:
        done = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            for _ in range(200):
                wire, fds = encode_message(msg)
                header = decode_header(wire[:HEADER_SIZE], backend_channel=False)
                decode_request(header, wire[HEADER_SIZE:], fds)
            done += 200
        print(f"{msg.name:<16} {type(msg.payload).__name__:<12} {done / elapsed:>10,.0f} msg/s")
    done = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for msg in messages:
            wire, fds = encode_message(msg)
            header = decode_header(wire[:HEADER_SIZE], backend_channel=False)
            decode_request(header, wire[HEADER_SIZE:], fds)
        done += len(messages)
    print(f"{'mix':<29} {done / elapsed:>10,.0f} msg/s (encode + decode)")


if __name__ == "__main__":
    run(0.6)
