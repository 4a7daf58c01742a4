"""The four kernel vhost drivers: each adds its own ioctls to :class:`VhostKernelDevice`."""

from __future__ import annotations

import errno

from pyvhost.kernel.device import KernelVhostError, VhostKernelDevice
from pyvhost.kernel.ioctl import (
    INT,
    IOVA_RANGE,
    SCSI_ABI_VERSION,
    SCSI_TARGET,
    SCSI_WWPN_SIZE,
    U8,
    U16,
    U32,
    VDPA_CONFIG,
    Ioctl,
)

__all__ = ["VHOST_NET_F_VIRTIO_NET_HDR", "VhostNet", "VhostScsi", "VhostVdpa", "VhostVsock"]

VHOST_NET_F_VIRTIO_NET_HDR = 27
"""vhost-net feature bit: the kernel adds and strips the virtio-net header (the TAP has none)."""


class VhostNet(VhostKernelDevice):
    """``/dev/vhost-net``: rings 0 (receive) and 1 (transmit) of one queue pair, backed by a TAP."""

    default_path = "/dev/vhost-net"

    def set_backend(self, index: int, fd: int | None) -> None:
        """VHOST_NET_SET_BACKEND: serve ring ``index`` from the TAP (or socket) ``fd``; None
        detaches it (the ring stops)."""
        self._file(Ioctl.NET_SET_BACKEND, index, fd)


class VhostVsock(VhostKernelDevice):
    """``/dev/vhost-vsock``: rings 0 (receive) and 1 (transmit) of a guest CID; the event ring
    (2) is not the kernel's (the VMM serves it), so ring index 2 is out of range (ENOBUFS)."""

    default_path = "/dev/vhost-vsock"

    def set_guest_cid(self, cid: int) -> None:
        """VHOST_VSOCK_SET_GUEST_CID: the CID host sockets reach this device's guest at."""
        self._set_u64(Ioctl.VSOCK_SET_GUEST_CID, cid)

    def set_running(self, running: bool) -> None:
        """VHOST_VSOCK_SET_RUNNING: start or stop moving packets."""
        self._call(Ioctl.VSOCK_SET_RUNNING, INT.pack(int(running)))


def _target(wwpn: str, tpgt: int) -> bytes:
    """A ``vhost_scsi_target``: ABI version first, then the NUL-padded WWPN and the TPG tag."""
    raw = wwpn.encode("ascii")
    if not raw or len(raw) >= SCSI_WWPN_SIZE:
        raise ValueError(f"WWPN {wwpn!r} must be 1 to {SCSI_WWPN_SIZE - 1} ASCII characters")
    if not 0 <= tpgt <= 0xFFFF:
        raise ValueError(f"TPG tag {tpgt} is not in 0..65535")
    return SCSI_TARGET.pack(SCSI_ABI_VERSION, raw, tpgt, 0)


_SCSI_MEANINGS: dict[tuple[Ioctl, int], str] = {
    (Ioctl.SCSI_SET_ENDPOINT, errno.EFAULT): (
        "the rings are not set up: no memory table yet (VHOST_SET_OWNER, VHOST_SET_MEM_TABLE "
        "first) or a ring address is not accessible"
    ),
    (Ioctl.SCSI_SET_ENDPOINT, errno.ENODEV): (
        "no free LIO vhost target with that WWPN: none exists, its portal groups have no "
        "nexus, or another vhost-scsi device holds them"
    ),
    (Ioctl.SCSI_SET_ENDPOINT, errno.EEXIST): "the device is already attached to that target",
    (Ioctl.SCSI_SET_ENDPOINT, errno.EOPNOTSUPP): "the reserved field is not 0",
    (Ioctl.SCSI_CLEAR_ENDPOINT, errno.EFAULT): (
        "the rings are not set up: no memory table yet (VHOST_SET_MEM_TABLE first)"
    ),
    (Ioctl.SCSI_CLEAR_ENDPOINT, errno.EINVAL): "the device is attached to another WWPN",
}
"""What vhost-scsi's errnos mean (Linux 6.1 drivers/vhost/scsi.c), ahead of the generic table."""


class VhostScsi(VhostKernelDevice):
    """``/dev/vhost-scsi``: rings 0 (control), 1 (events), 2.. (requests) to a LIO vhost target.

    Linux checks every ring's addresses against the memory table before it attaches or detaches
    a target, so VHOST_SET_OWNER and VHOST_SET_MEM_TABLE (an empty table will do) come first.
    """

    default_path = "/dev/vhost-scsi"

    def set_endpoint(self, wwpn: str, tpgt: int) -> None:
        """VHOST_SCSI_SET_ENDPOINT: attach to the LIO vhost target ``wwpn``.

        Linux matches the WWPN only and attaches every portal group of it that has a nexus;
        ``tpgt`` is passed along (as QEMU does) but not looked at. The target id of a request's
        LUN field is then the TPG tag.
        """
        self._call(Ioctl.SCSI_SET_ENDPOINT, _target(wwpn, tpgt))

    def clear_endpoint(self, wwpn: str, tpgt: int) -> None:
        """VHOST_SCSI_CLEAR_ENDPOINT: detach from the target ``wwpn`` (a no-op when detached).
        Closing the device detaches it too."""
        self._call(Ioctl.SCSI_CLEAR_ENDPOINT, _target(wwpn, tpgt))

    def get_abi_version(self) -> int:
        """VHOST_SCSI_GET_ABI_VERSION."""
        version: int = INT.unpack(self._call(Ioctl.SCSI_GET_ABI_VERSION, bytes(INT.size)))[0]
        return version

    def set_events_missed(self, missed: bool) -> None:
        """VHOST_SCSI_SET_EVENTS_MISSED: whether events were dropped for lack of event buffers."""
        self._call(Ioctl.SCSI_SET_EVENTS_MISSED, U32.pack(int(missed)))

    def get_events_missed(self) -> bool:
        """VHOST_SCSI_GET_EVENTS_MISSED."""
        return bool(U32.unpack(self._call(Ioctl.SCSI_GET_EVENTS_MISSED, bytes(U32.size)))[0])

    def _error(self, request: Ioctl, exc: OSError) -> KernelVhostError:
        """The generic error, with vhost-scsi's own meaning of the errno where it has one."""
        meaning = _SCSI_MEANINGS.get((request, exc.errno or errno.EIO))
        if meaning is None:
            return super()._error(request, exc)
        return KernelVhostError(request.spec_name, self.path, exc.errno or errno.EIO, meaning)


class VhostVdpa(VhostKernelDevice):
    """``/dev/vhost-vdpa-N``: a vDPA device (hardware or simulator) driven like a virtio device."""

    default_path = "/dev/vhost-vdpa-0"

    def _get(self, request: Ioctl, size: int) -> bytes:
        return self._call(request, bytes(size))

    def get_device_id(self) -> int:
        """VHOST_VDPA_GET_DEVICE_ID: the virtio device type (1 net, 2 block, ...)."""
        value: int = U32.unpack(self._get(Ioctl.VDPA_GET_DEVICE_ID, U32.size))[0]
        return value

    def get_status(self) -> int:
        """VHOST_VDPA_GET_STATUS: the virtio device status byte."""
        value: int = U8.unpack(self._get(Ioctl.VDPA_GET_STATUS, U8.size))[0]
        return value

    def set_status(self, status: int) -> None:
        """VHOST_VDPA_SET_STATUS."""
        self._call(Ioctl.VDPA_SET_STATUS, U8.pack(status))

    def get_config_size(self) -> int:
        """VHOST_VDPA_GET_CONFIG_SIZE: bytes of device config space."""
        value: int = U32.unpack(self._get(Ioctl.VDPA_GET_CONFIG_SIZE, U32.size))[0]
        return value

    def get_config(self, offset: int, length: int) -> bytes:
        """VHOST_VDPA_GET_CONFIG: ``length`` bytes of config space at ``offset``."""
        out = self._call(Ioctl.VDPA_GET_CONFIG, VDPA_CONFIG.pack(offset, length) + bytes(length))
        return out[VDPA_CONFIG.size :]

    def set_config(self, offset: int, data: bytes) -> None:
        """VHOST_VDPA_SET_CONFIG: write ``data`` at ``offset``."""
        self._call(Ioctl.VDPA_SET_CONFIG, VDPA_CONFIG.pack(offset, len(data)) + bytes(data))

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """VHOST_VDPA_SET_VRING_ENABLE."""
        self._state(Ioctl.VDPA_SET_VRING_ENABLE, index, int(enable))

    def enable_ring(self, index: int) -> None:
        """VHOST_VDPA_SET_VRING_ENABLE: a vDPA device waits for it before using a ring."""
        self.set_vring_enable(index, True)

    def get_vring_num(self) -> int:
        """VHOST_VDPA_GET_VRING_NUM: the largest ring size the device supports."""
        value: int = U16.unpack(self._get(Ioctl.VDPA_GET_VRING_NUM, U16.size))[0]
        return value

    def set_config_call(self, fd: int | None) -> None:
        """VHOST_VDPA_SET_CONFIG_CALL: the eventfd signalled on a config change (None: none)."""
        self._call(Ioctl.VDPA_SET_CONFIG_CALL, INT.pack(-1 if fd is None else fd))

    def get_iova_range(self) -> tuple[int, int]:
        """VHOST_VDPA_GET_IOVA_RANGE: first and last usable IOVA (inclusive)."""
        first, last = IOVA_RANGE.unpack(self._get(Ioctl.VDPA_GET_IOVA_RANGE, IOVA_RANGE.size))
        return first, last

    def get_as_num(self) -> int:
        """VHOST_VDPA_GET_AS_NUM: how many address spaces the device has."""
        value: int = U32.unpack(self._get(Ioctl.VDPA_GET_AS_NUM, U32.size))[0]
        return value

    def get_vring_group(self, index: int) -> int:
        """VHOST_VDPA_GET_VRING_GROUP: the group ring ``index`` belongs to."""
        return self._state(Ioctl.VDPA_GET_VRING_GROUP, index)

    def set_group_asid(self, group: int, asid: int) -> None:
        """VHOST_VDPA_SET_GROUP_ASID: put a ring group in an address space."""
        self._state(Ioctl.VDPA_SET_GROUP_ASID, group, asid)

    def suspend(self) -> None:
        """VHOST_VDPA_SUSPEND: stop processing rings, state kept (backend feature SUSPEND)."""
        self._plain(Ioctl.VDPA_SUSPEND)

    def resume(self) -> None:
        """VHOST_VDPA_RESUME: continue after suspend (backend feature RESUME)."""
        self._plain(Ioctl.VDPA_RESUME)

    def get_vqs_count(self) -> int:
        """VHOST_VDPA_GET_VQS_COUNT: how many rings the device has."""
        value: int = U32.unpack(self._get(Ioctl.VDPA_GET_VQS_COUNT, U32.size))[0]
        return value


def open_device(path: str) -> VhostKernelDevice:
    """Open ``path`` as the device class its name says (vhost-net, -vsock, -scsi, -vdpa-N)."""
    name = path.rsplit("/", 1)[-1]
    for prefix, cls in (
        ("vhost-net", VhostNet),
        ("vhost-vsock", VhostVsock),
        ("vhost-scsi", VhostScsi),
        ("vhost-vdpa", VhostVdpa),
    ):
        if name.startswith(prefix):
            return cls(path)
    raise KernelVhostError(
        "open",
        path,
        errno.ENODEV,
        "not a vhost device name (vhost-net, vhost-vsock, vhost-scsi, vhost-vdpa-N)",
    )
