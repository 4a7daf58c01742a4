"""Random request sequences against a BlkBackend, checked against a bytearray model of the disk."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvhost.devices.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlkBackend,
)

from .test_blk import BlkRig, pattern

SECTOR = 512
SECTORS = 48

sectors = st.integers(0, SECTORS + 4)  # a few past the end: must fail without effect
counts = st.integers(0, 9)


def _pieces(total: int) -> st.SearchStrategy[list[int]]:
    """Ways to cut ``total`` bytes into descriptor-sized pieces."""
    if total == 0:
        return st.just([])
    return st.lists(st.integers(1, total), max_size=5).map(
        lambda cuts: _sizes(sorted(set(c for c in cuts if c < total)), total)
    )


def _sizes(cuts: list[int], total: int) -> list[int]:
    bounds = [0, *cuts, total]
    return [b - a for a, b in itertools.pairwise(bounds)]


@st.composite
def requests(draw: st.DrawFn) -> tuple[object, ...]:
    kind = draw(st.sampled_from(["read", "write", "discard", "zeroes", "flush"]))
    sector = draw(sectors)
    n = draw(counts)
    indirect = draw(st.booleans())
    if kind in ("read", "write"):
        pieces = draw(_pieces(n * SECTOR))
        alone = draw(st.booleans()) or not pieces  # status in its own buffer or after the data
        return (kind, sector, n, pieces, indirect, draw(st.integers(0, 255)), alone)
    if kind in ("discard", "zeroes"):
        segs = draw(st.lists(st.tuples(sectors, st.integers(0, 9)), min_size=1, max_size=3))
        unmap = draw(st.integers(0, 1)) if kind == "zeroes" else 0
        return (kind, segs, unmap, indirect)
    return (kind,)


def _in_range(sector: int, n: int) -> bool:
    return sector + n <= SECTORS


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(), min_size=1, max_size=12), st.booleans())
def test_random_requests_match_the_model(ops: list[tuple[object, ...]], packed: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.img"
        model = bytearray(pattern(SECTORS * SECTOR, seed=8))
        path.write_bytes(model)
        with BlkBackend.open(path) as backend:
            rig = BlkRig(backend, qsize=16, packed=packed)
            try:
                for op in ops:
                    _apply(rig, model, op)
                assert path.read_bytes() == bytes(model)
            finally:
                rig.close()
        assert os.path.getsize(path) == SECTORS * SECTOR


def _apply(rig: BlkRig, model: bytearray, op: tuple[object, ...]) -> None:
    kind = op[0]
    if kind == "flush":
        assert rig.request(VIRTIO_BLK_T_FLUSH).status == VIRTIO_BLK_S_OK
        return
    if kind in ("read", "write"):
        _, sector, n, pieces, indirect, seed, alone = op
        assert isinstance(sector, int) and isinstance(n, int) and isinstance(seed, int)
        assert isinstance(alone, bool)
        assert isinstance(pieces, list) and isinstance(indirect, bool)
        ok = _in_range(sector, n)
        lo, hi = sector * SECTOR, (sector + n) * SECTOR
        if kind == "read":
            reply = rig.read(sector, n * SECTOR, segs=pieces, indirect=indirect, status_alone=alone)
            assert reply.status == (VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR)
            if ok:
                assert reply.data == bytes(model[lo:hi])
            assert reply.used == n * SECTOR + 1
        else:
            data = pattern(n * SECTOR, seed=seed)
            reply = rig.request(VIRTIO_BLK_T_OUT, sector, data, out_split=pieces, indirect=indirect)
            assert reply.status == (VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR)
            if ok:
                model[lo:hi] = data
        return
    _, segs, unmap, indirect = op
    assert isinstance(segs, list) and isinstance(unmap, int) and isinstance(indirect, bool)
    rtype = VIRTIO_BLK_T_DISCARD if kind == "discard" else VIRTIO_BLK_T_WRITE_ZEROES
    reply = rig.segments(rtype, *[(s, c, unmap) for s, c in segs], indirect=indirect)
    ok = all(_in_range(s, c) for s, c in segs)
    assert reply.status == (VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR)
    if ok:
        for s, c in segs:
            model[s * SECTOR : (s + c) * SECTOR] = bytes(c * SECTOR)
