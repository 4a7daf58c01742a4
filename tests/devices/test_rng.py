"""virtio-rng over the real protocol: a Daemon serving RngDevice, a hand-driven front-end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daemon.rig import Rig
from peers.qemu import short_tmp
from pyvhost.daemon import Daemon
from pyvhost.daemon.adapter import DeviceAdapter
from pyvhost.devices.rng import MAX_REQUEST, RngDevice
from pyvhost.virtio import features as vf


@pytest.fixture(params=[False, True], ids=["plain", "event_idx"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    with short_tmp("pvh-rng-") as d:
        sock = str(d / "rng.sock")
        with Daemon(RngDevice(), sock).run_in_thread(), Rig(sock, event_idx=request.param) as r:
            yield r


def test_random_bytes_arrive(rig: Rig) -> None:
    outputs = []
    for _ in range(2):
        head, out = rig.submit(0, [], [64])
        [(got, written)] = rig.wait_used(0, 1)
        assert (got, written) == (head, 64)
        outputs.append(rig.output(out, written))
    assert outputs[0] != outputs[1]
    assert all(len(set(o)) > 8 for o in outputs)  # 64 random bytes: many distinct values


def test_sizes_are_honoured_across_pieces(rig: Rig) -> None:
    sizes = [1, 100, 4096]
    head, out = rig.submit(0, [], sizes)
    [(got, written)] = rig.wait_used(0, 1)
    assert (got, written) == (head, sum(sizes))
    big = rig.mem.read(out[2][0], 4096)
    assert big.count(0) < 100


def test_indirect_chain_and_readable_parts(rig: Rig) -> None:
    assert rig.fe is not None and rig.fe.features >> vf.F_RING_INDIRECT_DESC & 1
    table = rig.alloc(16 * 3)
    out = [(rig.alloc(32), 32), (rig.alloc(32), 32)]
    head = rig.rings[0].driver.add([rig.put(b"ignored")], out, indirect_gpa=table)
    rig.rings[0].driver.publish()
    rig.kick(0, force=True)
    [(got, written)] = rig.wait_used(0, 1)
    assert (got, written) == (head, 64)
    assert rig.output(out, 64) != bytes(64)


def test_readable_only_chain_gets_nothing(rig: Rig) -> None:
    head, _ = rig.submit(0, [b"no room"], [])
    assert rig.wait_used(0, 1) == [(head, 0)]


def test_huge_request_is_capped(rig: Rig) -> None:
    head, _out = rig.submit(0, [], [MAX_REQUEST + 4096])
    [(got, written)] = rig.wait_used(0, 1)
    assert (got, written) == (head, MAX_REQUEST)


def test_device_description() -> None:
    dev = RngDevice()
    assert dev.device_id == 4
    assert dev.num_queues == 1
    assert dev.features >> vf.F_RING_EVENT_IDX & 1
    assert dev.features >> vf.F_RING_INDIRECT_DESC & 1
    with DeviceAdapter(dev) as served:
        assert served.get_config(0, 0) == b""
