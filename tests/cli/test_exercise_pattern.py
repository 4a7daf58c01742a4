"""The exercise pattern: byte-exact with its documented layout, for any size, pass and block."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from pyvhost.cli.exercise import MAGIC, check_block, pattern

HEADER = struct.Struct("<8sQQII")  # magic, pass, block, sector in block, block size


def reference(block_size: int, pass_no: int, block: int) -> bytes:
    """Sector by sector: the header, then the block's 64-bit seed repeated to 512 bytes."""
    seed = ((pass_no + 1) * 0x9E3779B97F4A7C15 ^ (block + 1) * 0xC2B2AE3D27D4EB4F) & (2**64 - 1)
    sectors = []
    for k in range(block_size // 512):
        head = HEADER.pack(MAGIC, pass_no, block, k, block_size)
        sectors.append(head + struct.pack("<Q", seed) * ((512 - len(head)) // 8))
    return b"".join(sectors)


@given(
    block_size=st.sampled_from([512, 1024, 4096, 65536, 3 * 512, 1 << 20]),
    pass_no=st.integers(0, 2**64 - 1),
    block=st.integers(0, 2**64 - 1),
)
def test_pattern_matches_the_sector_layout(block_size: int, pass_no: int, block: int) -> None:
    data = pattern(block_size, pass_no, block)
    assert data == reference(block_size, pass_no, block)
    assert check_block(data, block_size, block) == pass_no


def test_patterns_differ_by_pass_block_and_sector() -> None:
    a, b, c = pattern(4096, 1, 7), pattern(4096, 2, 7), pattern(4096, 1, 8)
    assert len({a, b, c}) == 3
    assert a[:512] != a[512:1024]
    assert pattern(0, 0, 0) == b""
