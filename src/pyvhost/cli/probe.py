"""``pyvhost probe``: report what a vhost-user back-end (``--socket``) or a kernel vhost device
(``--kernel``) offers.

Kernel devices are asked with read-only ioctls (GET_FEATURES, GET_BACKEND_FEATURES; vhost-scsi its
ABI version; vhost-vdpa its device id, config space and maximum ring size): no SET_OWNER. A driver
without GET_BACKEND_FEATURES (vhost-scsi in Linux 6.1) shows ``backend_features`` as null.

Read-only: GET_FEATURES, GET/SET_PROTOCOL_FEATURES (only MQ, CONFIG and CONFIGURE_MEM_SLOTS, the
bits the queries below need), GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, GET_CONFIG, then a plain hang-up.
No SET_OWNER, memory or vring is sent, so the back-end is left as it was and accepts the next
front-end (qemu-storage-daemon, libvhost-user and rust-vmm back-ends answer these without owner).

Config size: the spec has no request for it. With ``--config-size`` that size is asked; for a
block device 60 bytes (what QEMU 7.2 asks of a block back-end); otherwise 256 (the maximum)
and, when the back-end refuses that (empty reply, as libvhost-user does past its config), the
largest size it accepts, found by bisection. A shorter reply than asked is accepted.

Device type (which names the device-specific feature bits, and for blk decodes the config): the
vhost-user protocol carries no virtio device id, so for a socket it is ``--device-type`` (or
``--device blk``); without one, a config of 57..96 bytes is taken as virtio-blk's (no other
common device has one in that range) and any other device's bits stay ``bit<N>``. A kernel
device tells its own: by its node (vhost-net, -vsock, -scsi) or, for vhost-vdpa, by
VHOST_VDPA_GET_DEVICE_ID; ``--device-type`` names the bits of a vdpa device of another id.
"""

from __future__ import annotations

import argparse
import errno
import json
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from pyvhost.errors import ReplyError, VhostError
from pyvhost.kernel import (
    KernelVhostError,
    VhostKernelDevice,
    VhostNet,
    VhostScsi,
    VhostVdpa,
    VhostVsock,
    open_device,
)
from pyvhost.kernel.devices import VHOST_NET_F_VIRTIO_NET_HDR
from pyvhost.user.frontend import Frontend
from pyvhost.user.messages import (
    F_PROTOCOL_FEATURES,
    MAX_CONFIG_SIZE,
    ProtocolFeature,
    protocol_feature_names,
)
from pyvhost.virtio.features import DEVICE_FEATURES, DEVICE_IDS, feature_names, has_bit

__all__ = [
    "BLK_CONFIG_SIZE",
    "ProbeResult",
    "decode_blk_config",
    "probe",
    "probe_kernel",
    "register",
    "run",
]

BLK_CONFIG_SIZE = 60
"""Bytes of virtio-blk config QEMU 7.2 asks for (up to write_zeroes_may_unmap and padding)."""

_BLK_SIZES = range(57, 97)

_PROBE_PROTOCOL_FEATURES = (
    1 << ProtocolFeature.MQ | 1 << ProtocolFeature.CONFIG | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
)

# (name, offset, struct format) of virtio-blk config fields (virtio spec 5.2.4, little-endian).
_BLK_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("capacity", 0, "<Q"),
    ("size_max", 8, "<I"),
    ("seg_max", 12, "<I"),
    ("cylinders", 16, "<H"),
    ("heads", 18, "<B"),
    ("sectors", 19, "<B"),
    ("blk_size", 20, "<I"),
    ("physical_block_exp", 24, "<B"),
    ("alignment_offset", 25, "<B"),
    ("min_io_size", 26, "<H"),
    ("opt_io_size", 28, "<I"),
    ("writeback", 32, "<B"),
    ("num_queues", 34, "<H"),
    ("max_discard_sectors", 36, "<I"),
    ("max_discard_seg", 40, "<I"),
    ("discard_sector_alignment", 44, "<I"),
    ("max_write_zeroes_sectors", 48, "<I"),
    ("max_write_zeroes_seg", 52, "<I"),
    ("write_zeroes_may_unmap", 56, "<B"),
    ("max_secure_erase_sectors", 60, "<I"),
    ("max_secure_erase_seg", 64, "<I"),
    ("secure_erase_sector_alignment", 68, "<I"),
)


def decode_blk_config(data: bytes) -> dict[str, int]:
    """The virtio-blk config fields that fit entirely in ``data`` (capacity in 512-byte sectors)."""
    fields: dict[str, int] = {}
    for name, offset, fmt in _BLK_FIELDS:
        if offset + struct.calcsize(fmt) <= len(data):
            fields[name] = struct.unpack_from(fmt, data, offset)[0]
    return fields


@dataclass
class ProbeResult:
    """Everything the probe learned; ``None`` where the back-end does not offer the query."""

    socket: str
    features: int
    protocol_features: int | None = None
    queue_num: int | None = None
    max_mem_slots: int | None = None
    config: bytes | None = None
    config_error: str | None = None
    device: str | None = None
    device_from: str | None = None
    blk: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: integers for the feature words, the config as a hex string."""
        out: dict[str, Any] = {
            "socket": self.socket,
            "features": self.features,
            "feature_names": feature_names(self.features, self.device),
            "protocol_features": self.protocol_features,
            "protocol_feature_names": protocol_feature_names(self.protocol_features or 0),
            "queue_num": self.queue_num,
            "max_mem_slots": self.max_mem_slots,
            "config": None if self.config is None else self.config.hex(),
            "config_size": None if self.config is None else len(self.config),
            "device": self.device,
            "device_type": self.device,
            "device_type_from": self.device_from,
        }
        if self.config_error is not None:
            out["config_error"] = self.config_error
        if self.device == "blk":
            out["capacity"] = self.blk.get("capacity")
            out["blk"] = self.blk
        return out

    def to_text(self) -> str:
        """Human-readable lines: hex values with their names."""
        lines = [
            f"socket: {self.socket}",
            f"device type: {_device_text(self.device, self.device_from)}",
        ]
        names = "|".join(feature_names(self.features, self.device))
        lines.append(f"features: {self.features:#x} ({names})")
        if self.protocol_features is None:
            lines.append("protocol features: not offered (no VHOST_USER_F_PROTOCOL_FEATURES)")
        else:
            pnames = "|".join(protocol_feature_names(self.protocol_features))
            lines.append(f"protocol features: {self.protocol_features:#x} ({pnames})")
        if self.queue_num is not None:
            lines.append(f"queues: {self.queue_num}")
        if self.max_mem_slots is not None:
            lines.append(f"max memory slots: {self.max_mem_slots}")
        if self.config is not None:
            lines.append(f"config ({len(self.config)} bytes): {self.config.hex()}")
        elif self.config_error is not None:
            lines.append(f"config: unavailable ({self.config_error})")
        if self.device == "blk":
            lines.append("block device:")
            capacity = self.blk.get("capacity")
            if capacity is not None:
                lines.append(f"  capacity: {capacity} sectors ({capacity * 512} bytes)")
            lines.extend(f"  {k}: {v}" for k, v in self.blk.items() if k != "capacity")
        return "\n".join(lines)


def _device_text(device: str | None, source: str | None) -> str:
    """``blk (given)``, ``net (from the device node)``, or how to name the device bits."""
    if device is None:
        return "not known (device bits show as bit<N>; name them with --device-type)"
    return f"{device} ({'given' if source == 'given' else f'from the {source}'})"


def _config_size(fe: Frontend) -> int:
    """The largest config size the back-end accepts, by bisection below MAX_CONFIG_SIZE."""
    good, bad = 0, MAX_CONFIG_SIZE
    while bad - good > 1:
        mid = (good + bad) // 2
        try:
            fe.get_config(0, mid, exact=False)
        except ReplyError:
            bad = mid
        else:
            good = mid
    return good


def _read_config(fe: Frontend, size: int | None, device: str) -> bytes:
    if size is not None:
        return fe.get_config(0, size, exact=False)
    if device == "blk":
        return fe.get_config(0, BLK_CONFIG_SIZE, exact=False)
    try:
        return fe.get_config(0, MAX_CONFIG_SIZE, exact=False)
    except ReplyError:
        found = _config_size(fe)
        if found == 0:
            raise
        return fe.get_config(0, found, exact=False)


def probe(
    path: str, *, timeout: float = 10.0, device: str = "auto", config_size: int | None = None
) -> ProbeResult:
    """Connect to the back-end at ``path``, ask what it offers, hang up.

    ``device``: a :data:`~pyvhost.virtio.features.DEVICE_FEATURES` type, or "auto" (blk when the
    config size fits virtio-blk's, else not known).
    """
    if device != "auto" and device not in DEVICE_FEATURES:
        raise ValueError(f"unknown device type {device!r}")
    with Frontend.connect(path, deadline=timeout, reply_timeout=timeout) as fe:
        result = ProbeResult(socket=path, features=fe.get_features())
        if result.features >> F_PROTOCOL_FEATURES & 1:
            offered = fe.get_protocol_features()
            result.protocol_features = offered
            fe.set_protocol_features(offered & _PROBE_PROTOCOL_FEATURES)
            if fe.has_protocol_feature(ProtocolFeature.MQ):
                result.queue_num = fe.get_queue_num()
            if fe.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS):
                result.max_mem_slots = fe.get_max_mem_slots()
            if fe.has_protocol_feature(ProtocolFeature.CONFIG):
                try:
                    result.config = _read_config(fe, config_size, device)
                except ReplyError as exc:
                    result.config_error = str(exc)
    if device != "auto":
        result.device, result.device_from = device, "given"
    elif result.config is not None and len(result.config) in _BLK_SIZES:
        result.device, result.device_from = "blk", "config size"
    if result.device == "blk":
        result.blk = decode_blk_config(result.config or b"")
    return result


_KERNEL_TYPES: tuple[tuple[type[VhostKernelDevice], str], ...] = (
    (VhostNet, "net"),
    (VhostVsock, "vsock"),
    (VhostScsi, "scsi"),
)


def _kernel_device_type(device: VhostKernelDevice) -> tuple[str | None, str | None]:
    """The device type a kernel device tells, and how: by its node's class or its vdpa id."""
    for cls, name in _KERNEL_TYPES:
        if isinstance(device, cls):
            return name, "device node"
    if isinstance(device, VhostVdpa):
        return DEVICE_IDS.get(device.get_device_id()), "vdpa device id"
    return None, None


def probe_kernel(path: str, device_type: str | None = None) -> dict[str, Any]:
    """Ask the kernel vhost device at ``path`` what it offers (read-only ioctls, no owner).

    ``device_type`` names the device bits when the device does not tell its type (a vdpa device
    of an id with no table); it must agree with a type the device does tell.
    """
    with open_device(path) as device:
        told, source = _kernel_device_type(device)
        if told is None and device_type is not None:
            told, source = device_type, "given"
        elif device_type not in (None, told):
            raise VhostError(f"{path} is a {told} device, not {device_type}")
        features = device.get_features()
        result: dict[str, Any] = {
            "device": path,
            "device_type": told,
            "device_type_from": source if told is not None else None,
            "features": features,
            "feature_names": _kernel_feature_names(features, told, device),
            "backend_features": _backend_features(device),
        }
        if isinstance(device, VhostScsi):
            result["abi_version"] = device.get_abi_version()
        if isinstance(device, VhostVdpa):
            result["device_id"] = device.get_device_id()
            result["config"] = device.get_config(0, device.get_config_size()).hex()
            result["queue_num"] = device.get_vring_num()
    return result


def _kernel_feature_names(features: int, told: str | None, device: VhostKernelDevice) -> list[str]:
    """Feature names; on vhost-net bit 27 is the kernel's VHOST_NET_F_VIRTIO_NET_HDR (the number
    legacy virtio calls ANY_LAYOUT)."""
    names = feature_names(features, told)
    if isinstance(device, VhostNet) and has_bit(features, VHOST_NET_F_VIRTIO_NET_HDR):
        names = ["VHOST_NET_F_VIRTIO_NET_HDR" if n == "ANY_LAYOUT" else n for n in names]
    return names


def _backend_features(device: VhostKernelDevice) -> int | None:
    """GET_BACKEND_FEATURES, or None from a driver without it: its ioctl then falls through to the
    generic requests, which answer EPERM to a non-owner (ENOTTY to the owner)."""
    try:
        return device.get_backend_features()
    except KernelVhostError as exc:
        if exc.errno in (errno.EPERM, errno.ENOTTY):
            return None
        raise


def _kernel_text(result: dict[str, Any]) -> str:
    device_type = _device_text(result["device_type"], result["device_type_from"])
    backend = result["backend_features"]
    shown = "none (no GET_BACKEND_FEATURES in this driver)" if backend is None else f"{backend:#x}"
    lines = [
        f"device:           {result['device']}",
        f"device type:      {device_type}",
        f"features:         {result['features']:#x} ({' '.join(result['feature_names'])})",
        f"backend features: {shown}",
    ]
    for key in ("abi_version", "device_id", "queue_num", "config"):
        if key in result:
            lines.append(f"{key.replace('_', ' ') + ':':<18}{result[key]}")
    return "\n".join(lines)


def _config_size_arg(text: str) -> int:
    value = int(text, 0)
    if not 0 < value <= MAX_CONFIG_SIZE:
        raise argparse.ArgumentTypeError(f"config size must be 1..{MAX_CONFIG_SIZE}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``probe`` sub-command."""
    parser = subparsers.add_parser(
        "probe",
        help="show the features, queues and config of a vhost-user back-end or kernel device",
        description="Connect to a vhost-user back-end as a front-end, print what it offers "
        "(virtio and protocol features, queue count, memory slots, config space) and hang up; "
        "or ask a kernel vhost device its features. Sends no SET_OWNER, memory or vring setup.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--socket", metavar="PATH", help="a vhost-user back-end's Unix socket")
    target.add_argument(
        "--kernel",
        metavar="DEV",
        help="a kernel vhost device: /dev/vhost-net, -vsock, -scsi or -vdpa-N",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the socket and for each reply (default 10)",
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--device-type",
        choices=tuple(DEVICE_FEATURES),
        default=None,
        metavar="TYPE",
        help="the virtio device behind the socket, to name its device feature bits (blk also "
        "decodes the config): " + ", ".join(DEVICE_FEATURES) + ". A kernel device tells its "
        "own (a vhost-vdpa one of an unnamed device id takes this)",
    )
    kind.add_argument(
        "--device",
        choices=("auto", "blk"),
        default="auto",
        help="blk: as --device-type blk; auto (default): blk when the config size fits",
    )
    parser.add_argument(
        "--config-size",
        type=_config_size_arg,
        default=None,
        metavar="N",
        help="config bytes to ask for (default: 60 for blk, else the largest accepted)",
    )


def run(args: argparse.Namespace) -> int:
    """Probe and print; 0 on success, 1 with a one-line message on stderr on failure."""
    if args.kernel is not None:
        try:
            found = probe_kernel(args.kernel, args.device_type)
        except VhostError as exc:
            print(f"pyvhost probe: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(found) if args.json else _kernel_text(found))
        return 0
    try:
        result = probe(
            args.socket,
            timeout=args.timeout,
            device=args.device_type or args.device,
            config_size=args.config_size,
        )
    except (VhostError, OSError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"pyvhost probe: {args.socket}: {message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(result.to_text())
    return 0
