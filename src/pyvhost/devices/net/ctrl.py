"""The control queue (virtio 1.2 section 5.1.6.5): commands from the driver, answered with
VIRTIO_NET_OK or VIRTIO_NET_ERR in the chain's first writable byte.

A command is ``class, command, data`` in the readable part. Each (class, command) has a handler
in :data:`HANDLERS` with the feature it needs; a command whose feature was not negotiated, an
unknown class or command, or data of the wrong length is answered ERR and logged with the
reason. The effects (MAC, receive modes, queue pairs, offloads) go to a :class:`CtrlTarget`;
receive modes and MAC tables become the filter of frames from the host (:func:`rx_filter`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pyvhost.devices.net.stats import Complaints
from pyvhost.virtio import features as vf
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.queue import DeviceQueue

__all__ = [
    "CLASS_ANNOUNCE",
    "CLASS_GUEST_OFFLOADS",
    "CLASS_MAC",
    "CLASS_MQ",
    "CLASS_RX",
    "CLASS_VLAN",
    "ERR",
    "GUEST_OFFLOAD_FEATURES",
    "HANDLERS",
    "OK",
    "CtrlCommandError",
    "CtrlTarget",
    "RxModes",
    "run_command",
    "rx_filter",
    "serve_ctrl",
]

OK = 0
ERR = 1

CLASS_RX = 0
CLASS_MAC = 1
CLASS_VLAN = 2
CLASS_ANNOUNCE = 3
CLASS_MQ = 4
CLASS_GUEST_OFFLOADS = 5

RX_MODES = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")
"""VIRTIO_NET_CTRL_RX_PROMISC .. _NOBCAST, by command number."""

GUEST_OFFLOAD_FEATURES = vf.bit_mask(
    vf.NET_F_GUEST_CSUM,
    vf.NET_F_GUEST_TSO4,
    vf.NET_F_GUEST_TSO6,
    vf.NET_F_GUEST_ECN,
    vf.NET_F_GUEST_UFO,
)
"""The offloads GUEST_OFFLOADS_SET may turn on and off (each only if negotiated)."""

_MAX_MAC_ENTRIES = 4096
_CLASS_NAMES = {
    0: "RX",
    1: "MAC",
    2: "VLAN",
    3: "ANNOUNCE",
    4: "MQ",
    5: "GUEST_OFFLOADS",
    6: "NOTF_COAL",
}
_NOT_OFFERED = {
    (CLASS_VLAN, 0): "CTRL_VLAN",
    (CLASS_VLAN, 1): "CTRL_VLAN",
    (CLASS_MQ, 1): "RSS",
    (CLASS_MQ, 2): "HASH_REPORT",
    (6, 0): "NOTF_COAL",
    (6, 1): "NOTF_COAL",
}
"""Commands of features this device does not offer, for the refusal's reason."""


class CtrlCommandError(Exception):
    """A command the device refuses (answered VIRTIO_NET_ERR); the message says why."""


def _initial_modes() -> dict[str, bool]:
    """Promiscuous until the driver says otherwise (as QEMU's own device: a driver that never
    sends RX commands still gets every frame), everything else off."""
    modes = dict.fromkeys(RX_MODES, False)
    modes["promisc"] = True
    return modes


@dataclass
class RxModes:
    """Receive modes and MAC filter tables the driver set; :func:`rx_filter` turns them into the
    test frames from the host pass before they reach a receive buffer."""

    modes: dict[str, bool] = field(default_factory=_initial_modes)
    unicast: list[bytes] = field(default_factory=list)
    multicast: list[bytes] = field(default_factory=list)
    generation: int = 0
    """Bumped by every change, so a cached filter knows it is stale."""


BROADCAST = b"\xff" * 6


def rx_filter(modes: RxModes, mac: bytes) -> Callable[[bytes], bool] | None:
    """The test a destination MAC must pass to be delivered, or None when every frame is
    (promiscuous). The order is the spec's and QEMU's: broadcast (unless NOBCAST), then
    multicast (NOMULTI, ALLMULTI, the multicast table), then unicast (NOUNI, ALLUNI, the
    device's own MAC, the unicast table)."""
    m = modes.modes
    if m["promisc"]:
        return None
    broadcast = not m["nobcast"]
    all_multi = m["allmulti"] and not m["nomulti"]
    multi = frozenset() if m["nomulti"] else frozenset(modes.multicast)
    all_uni = m["alluni"] and not m["nouni"]
    uni = frozenset() if m["nouni"] else frozenset([mac, *modes.unicast])

    def accepts(dest: bytes) -> bool:
        if len(dest) != 6:
            return False
        if dest[0] & 1:
            if dest == BROADCAST:
                return broadcast
            return all_multi or dest in multi
        return all_uni or dest in uni

    return accepts


class CtrlTarget(Protocol):
    """What the control commands change: the device."""

    rx_modes: RxModes

    def set_mac(self, mac: bytes) -> None: ...

    def set_pairs(self, pairs: int) -> None: ...

    def set_guest_offloads(self, offloads: int) -> None: ...

    def announce_acked(self) -> None: ...

    @property
    def max_pairs(self) -> int: ...


Handler = Callable[[CtrlTarget, int, bytes], None]


def _exact(data: bytes, size: int, what: str) -> bytes:
    if len(data) != size:
        raise CtrlCommandError(f"{what}: {len(data)} bytes of data, need {size}")
    return data


def _rx_mode(target: CtrlTarget, cmd: int, data: bytes) -> None:
    name = RX_MODES[cmd]
    target.rx_modes.modes[name] = bool(_exact(data, 1, f"RX {name}")[0])
    target.rx_modes.generation += 1


def _mac_table(data: bytes, at: int, which: str) -> tuple[list[bytes], int]:
    if len(data) < at + 4:
        raise CtrlCommandError(f"MAC_TABLE_SET: {which} table has no entry count")
    (entries,) = struct.unpack_from("<I", data, at)
    end = at + 4 + 6 * entries
    if entries > _MAX_MAC_ENTRIES or end > len(data):
        raise CtrlCommandError(
            f"MAC_TABLE_SET: {which} table of {entries} entries does not fit the "
            f"{len(data)} bytes of data"
        )
    return [data[k : k + 6] for k in range(at + 4, end, 6)], end


def _mac_table_set(target: CtrlTarget, cmd: int, data: bytes) -> None:
    unicast, at = _mac_table(data, 0, "unicast")
    multicast, end = _mac_table(data, at, "multicast")
    if end != len(data):
        raise CtrlCommandError(f"MAC_TABLE_SET: {len(data) - end} bytes after the tables")
    target.rx_modes.unicast, target.rx_modes.multicast = unicast, multicast
    target.rx_modes.generation += 1


def _mac_addr_set(target: CtrlTarget, cmd: int, data: bytes) -> None:
    mac = _exact(data, 6, "MAC_ADDR_SET")
    if mac[0] & 1:
        raise CtrlCommandError(f"MAC_ADDR_SET: {mac.hex(':')} is a multicast address")
    target.set_mac(mac)


def _announce_ack(target: CtrlTarget, cmd: int, data: bytes) -> None:
    _exact(data, 0, "ANNOUNCE_ACK")
    target.announce_acked()


def _vq_pairs_set(target: CtrlTarget, cmd: int, data: bytes) -> None:
    (pairs,) = struct.unpack("<H", _exact(data, 2, "MQ_VQ_PAIRS_SET"))
    if not 1 <= pairs <= target.max_pairs:
        raise CtrlCommandError(
            f"MQ_VQ_PAIRS_SET: {pairs} pairs, the device has 1..{target.max_pairs}"
        )
    target.set_pairs(pairs)


def _guest_offloads_set(target: CtrlTarget, cmd: int, data: bytes) -> None:
    (offloads,) = struct.unpack("<Q", _exact(data, 8, "GUEST_OFFLOADS_SET"))
    target.set_guest_offloads(offloads)


HANDLERS: dict[tuple[int, int], tuple[Handler, int]] = {
    **{(CLASS_RX, c): (_rx_mode, vf.NET_F_CTRL_RX) for c in (0, 1)},
    **{(CLASS_RX, c): (_rx_mode, vf.NET_F_CTRL_RX_EXTRA) for c in (2, 3, 4, 5)},
    (CLASS_MAC, 0): (_mac_table_set, vf.NET_F_CTRL_RX),
    (CLASS_MAC, 1): (_mac_addr_set, vf.NET_F_CTRL_MAC_ADDR),
    (CLASS_ANNOUNCE, 0): (_announce_ack, vf.NET_F_GUEST_ANNOUNCE),
    (CLASS_MQ, 0): (_vq_pairs_set, vf.NET_F_MQ),
    (CLASS_GUEST_OFFLOADS, 0): (_guest_offloads_set, vf.NET_F_CTRL_GUEST_OFFLOADS),
}
"""(class, command) -> (handler, the feature it needs)."""


def run_command(target: CtrlTarget, features: int, command: bytes) -> None:
    """Carry out one command (``class, command, data``); CtrlCommandError says why it is refused."""
    if len(command) < 2:
        raise CtrlCommandError(f"{len(command)} readable bytes, need at least class and command")
    cls, cmd, data = command[0], command[1], command[2:]
    entry = HANDLERS.get((cls, cmd))
    if entry is None:
        if cls not in _CLASS_NAMES:
            raise CtrlCommandError(f"class {cls} is not a control class")
        feature = _NOT_OFFERED.get((cls, cmd))
        if feature is not None:
            raise CtrlCommandError(
                f"class {_CLASS_NAMES[cls]} command {cmd} needs VIRTIO_NET_F_{feature}, "
                "which this device does not offer"
            )
        raise CtrlCommandError(f"class {_CLASS_NAMES[cls]} has no command {cmd}")
    handler, needs = entry
    if not vf.has_bit(features, needs):
        name = vf.DEVICE_FEATURES["net"][needs]
        raise CtrlCommandError(
            f"class {_CLASS_NAMES[cls]} command {cmd} needs VIRTIO_NET_F_{name}, not negotiated"
        )
    handler(target, cmd, data)


_MAX_COMMAND = 4 + 2 * (4 + 6 * _MAX_MAC_ENTRIES)
"""The longest command read: two full MAC tables."""


def _answer(
    target: CtrlTarget, features: int, chain: DescriptorChain, complain: Complaints, index: int
) -> tuple[int, bool]:
    """(bytes written, ok) for one command chain."""
    if not chain.write_len:
        complain("ctrl_no_ack", f"queue {index}: control chain {chain.head} has no ack byte")
        return 0, False
    try:
        if chain.read_len > _MAX_COMMAND:
            raise CtrlCommandError(f"{chain.read_len} readable bytes, more than any command")
        run_command(target, features, chain.read_at(0, chain.read_len))
    except CtrlCommandError as exc:
        cls = chain.read_at(0, 1)
        kind = _CLASS_NAMES.get(cls[0], "unknown") if cls else "empty"
        complain(f"ctrl_err_{kind}", f"queue {index}: control command refused: {exc}")
        return chain.write_at(0, bytes([ERR])), False
    return chain.write_at(0, bytes([OK])), True


def serve_ctrl(
    queue: DeviceQueue,
    index: int,
    target: CtrlTarget,
    features: int,
    complain: Complaints,
) -> tuple[int, int]:
    """Answer every command waiting in the control queue; returns (ok, refused) counts."""
    ok = err = 0
    while chains := queue.pop_batch(16):
        done = []
        for chain in chains:
            written, good = _answer(target, features, chain, complain, index)
            done.append((chain.head, written))
            ok += good
            err += not good
        queue.push_batch(done)
    return ok, err
