"""The generic kernel vhost device: one open ``/dev/vhost-*`` and the requests all of them share.

Each method is one ioctl; every failure raises :class:`KernelVhostError` naming the request, the
device and the errno, with what that errno means for that request where the kernel's meaning is
known (``VHOST_SET_OWNER on /dev/vhost-net: EBUSY (device already has an owner)``).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pyvhost.closing import Closing
from pyvhost.control import RingAddresses, region_for
from pyvhost.errors import VhostError
from pyvhost.kernel.ioctl import (
    INT,
    IOTLB,
    IOTLB_MSG,
    IOTLB_MSG_V2,
    MSG,
    MSG_V2,
    U64,
    VRING_ADDR,
    VRING_FILE,
    VRING_STATE,
    VRING_WORKER,
    WORKER_STATE,
    Ioctl,
    IotlbType,
    MemoryRegion,
    encode_memory,
)
from pyvhost.virtio.memory import DirtyLog, GuestMemory

__all__ = ["IotlbMessage", "KernelVhostError", "VhostKernelDevice"]

_NO_WORKERS = "not supported by this kernel (per-ring workers need Linux 6.5 or later)"
_NO_CROSS_ENDIAN = "not supported by this kernel (built without CONFIG_VHOST_CROSS_ENDIAN_LEGACY)"
_NOT_READY = "no memory table, or a ring not set up or not mapped (in this process or the IOTLB)"
_MEANINGS: dict[tuple[Ioctl | None, int], str] = {
    (Ioctl.SET_OWNER, errno.EBUSY): "device already has an owner",
    # A driver without RESET_OWNER hands it to the ring requests, which read a ring index at 0.
    (Ioctl.RESET_OWNER, errno.EFAULT): "not supported by this driver: close and reopen the device",
    (None, errno.ENOTTY): "not supported by this kernel",
    (None, errno.EPERM): "this process is not the device's owner (VHOST_SET_OWNER first)",
    (None, errno.ENOBUFS): "ring index out of range",
    (Ioctl.SET_MEM_TABLE, errno.E2BIG): "more regions than vhost's max_mem_regions (64 by default)",
    (Ioctl.SET_MEM_TABLE, errno.EFAULT): "a region is outside this process's address space",
    (Ioctl.SET_VRING_ADDR, errno.EOPNOTSUPP): "ring flags other than VHOST_VRING_F_LOG",
    (Ioctl.SET_VRING_ADDR, errno.EINVAL): (
        "misaligned ring or log address, or (on a running ring) one outside this process"
    ),
    (Ioctl.SET_VRING_NUM, errno.EINVAL): "ring size is 0, too large or not a power of two",
    (Ioctl.SET_VRING_NUM, errno.EBUSY): "the ring is running (detach its backend first)",
    (Ioctl.SET_VRING_BASE, errno.EINVAL): "base above 65535 (split ring)",
    (Ioctl.SET_VRING_BASE, errno.EBUSY): "the ring is running (detach its backend first)",
    (Ioctl.SET_VRING_ENDIAN, errno.ENOTTY): _NO_CROSS_ENDIAN,
    (Ioctl.GET_VRING_ENDIAN, errno.ENOTTY): _NO_CROSS_ENDIAN,
    (Ioctl.SET_FEATURES, errno.EOPNOTSUPP): "features the device does not offer",
    (Ioctl.SET_BACKEND_FEATURES, errno.EOPNOTSUPP): "backend features the device does not offer",
    (Ioctl.NET_SET_BACKEND, errno.EFAULT): _NOT_READY,
    (Ioctl.NET_SET_BACKEND, errno.ENOTSOCK): "the backend fd is not a TAP, TUN or AF_PACKET socket",
    (Ioctl.SCSI_SET_ENDPOINT, errno.ENODEV): "no LIO vhost target with that WWPN and TPGT",
    (Ioctl.SCSI_SET_ENDPOINT, errno.EEXIST): "the device already has an endpoint",
    (Ioctl.VSOCK_SET_GUEST_CID, errno.EADDRINUSE): "another device uses that CID",
    (Ioctl.VSOCK_SET_GUEST_CID, errno.EINVAL): "CID reserved (0, 1, 2, -1) or above 32 bits",
    (Ioctl.VSOCK_SET_RUNNING, errno.EFAULT): _NOT_READY,
    (Ioctl.NEW_WORKER, errno.ENOTTY): _NO_WORKERS,
    (Ioctl.FREE_WORKER, errno.ENOTTY): _NO_WORKERS,
    # Before 6.5 the ring requests read the worker id as a ring index.
    (Ioctl.FREE_WORKER, errno.ENOBUFS): _NO_WORKERS,
    (Ioctl.ATTACH_VRING_WORKER, errno.ENOTTY): _NO_WORKERS,
    (Ioctl.GET_VRING_WORKER, errno.ENOTTY): _NO_WORKERS,
}
_IOTLB_MEANINGS = {
    errno.EFAULT: "entry refused: no IOTLB until VIRTIO_F_ACCESS_PLATFORM is acked",
    errno.EINVAL: "unknown message type, or an UPDATE or INVALIDATE of size 0",
    errno.EBADFD: "no IOTLB until VIRTIO_F_ACCESS_PLATFORM is acked, so no miss can come",
}
"""What the errno of an IOTLB message read or write on the device fd means."""
_ERRNO_NAMES = {errno.EOPNOTSUPP: "EOPNOTSUPP"}
"""The kernel's name where Python's table gives a userspace alias (ENOTSUP for 95)."""


class KernelVhostError(VhostError):
    """A vhost ioctl failed: ``request``, ``path`` and ``errno`` say which, where and why."""

    def __init__(self, request: str, path: str, err: int, meaning: str) -> None:
        name = _ERRNO_NAMES.get(err) or errno.errorcode.get(err, f"errno {err}")
        super().__init__(f"{request} on {path}: {name} ({meaning})")
        self.request = request
        self.path = path
        self.errno = err


@dataclass(frozen=True)
class IotlbMessage:
    """One ``vhost_iotlb_msg`` (with its address space id, for IOTLB_MSG_V2)."""

    type: IotlbType
    iova: int
    size: int = 0
    uaddr: int = 0
    perm: int = 0
    asid: int = 0

    def encode(self, v2: bool) -> bytes:
        """The ``vhost_msg`` (or ``vhost_msg_v2``) that carries this entry."""
        body = IOTLB.pack(self.iova, self.size, self.uaddr, self.perm, self.type)
        if v2:
            return MSG_V2.pack(IOTLB_MSG_V2, self.asid, body)
        return MSG.pack(IOTLB_MSG, body)

    @classmethod
    def decode(cls, data: bytes, v2: bool) -> IotlbMessage:
        """Parse a message the device wrote (a miss or an access failure)."""
        layout = MSG_V2 if v2 else MSG
        if len(data) < layout.size:
            raise VhostError(f"IOTLB message of {len(data)} bytes, expected {layout.size}")
        if v2:
            kind, asid, body = MSG_V2.unpack_from(data)
        else:
            kind, body = MSG.unpack_from(data)
            asid = 0
        expected = IOTLB_MSG_V2 if v2 else IOTLB_MSG
        if kind != expected:
            raise VhostError(f"IOTLB message type {kind}, expected {expected}")
        iova, size, uaddr, perm, type_ = IOTLB.unpack_from(body)
        try:
            entry_type = IotlbType(type_)
        except ValueError:
            raise VhostError(f"IOTLB entry type {type_} is not a VHOST_IOTLB_* type") from None
        return cls(entry_type, iova, size, uaddr, perm, asid)


class VhostKernelDevice(Closing):
    """An open kernel vhost device; the requests every vhost driver answers.

    ``path`` is opened read-write (``O_CLOEXEC``) unless an already open ``fd`` is given, which
    the device then owns. Devices are not thread-safe.
    """

    default_path = "/dev/vhost-net"

    def __init__(self, path: str | None = None, *, fd: int | None = None) -> None:
        self.path = path or self.default_path
        if fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise KernelVhostError(
                    "open", self.path, exc.errno or errno.EIO, _open_meaning(exc)
                ) from exc
        self.fd: int = fd
        self.memory: GuestMemory | None = None
        """The guest memory given to :meth:`set_memory`: keep it mapped while the device runs."""
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the device: the kernel stops its rings and drops everything it was given."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def fileno(self) -> int:
        return self.fd

    # --- the ioctl machinery ------------------------------------------------------------------

    def _check_open(self, request: Ioctl) -> None:
        if self._closed:
            raise KernelVhostError(request.spec_name, self.path, errno.EBADF, "device is closed")

    def _plain(self, request: Ioctl) -> None:
        """An ioctl without an argument (``_IO``)."""
        self._check_open(request)
        try:
            fcntl.ioctl(self.fd, request, 0)
        except OSError as exc:
            raise self._error(request, exc) from exc

    def _call(self, request: Ioctl, arg: bytes) -> bytes:
        """An ioctl whose argument the kernel reads and may write back: the buffer after it."""
        self._check_open(request)
        buf = bytearray(arg)
        try:
            fcntl.ioctl(self.fd, request, buf, True)
        except OSError as exc:
            raise self._error(request, exc) from exc
        return bytes(buf)

    def _error(self, request: Ioctl, exc: OSError) -> KernelVhostError:
        err = exc.errno or errno.EIO
        meaning = (
            _MEANINGS.get((request, err)) or _MEANINGS.get((None, err)) or os.strerror(err).lower()
        )
        return KernelVhostError(request.spec_name, self.path, err, meaning)

    def _get_u64(self, request: Ioctl) -> int:
        value: int = U64.unpack(self._call(request, bytes(U64.size)))[0]
        return value

    def _set_u64(self, request: Ioctl, value: int) -> None:
        self._call(request, U64.pack(value))

    def _state(self, request: Ioctl, index: int, num: int = 0) -> int:
        num_out: int = VRING_STATE.unpack(self._call(request, VRING_STATE.pack(index, num)))[1]
        return num_out

    def _file(self, request: Ioctl, index: int, fd: int | None) -> None:
        self._call(request, VRING_FILE.pack(index, -1 if fd is None else fd))

    # --- generic requests ---------------------------------------------------------------------

    def get_features(self) -> int:
        """VHOST_GET_FEATURES: the virtio and vhost feature bits the device offers."""
        return self._get_u64(Ioctl.GET_FEATURES)

    def set_features(self, features: int) -> None:
        """VHOST_SET_FEATURES: the bits acked (LOG_ALL turns dirty logging on)."""
        self._set_u64(Ioctl.SET_FEATURES, features)

    def set_owner(self) -> None:
        """VHOST_SET_OWNER: bind the device to this process (its memory, its worker threads)."""
        self._plain(Ioctl.SET_OWNER)

    def reset_owner(self) -> None:
        """VHOST_RESET_OWNER: drop the memory table, rings and owner."""
        self._plain(Ioctl.RESET_OWNER)

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        """VHOST_SET_MEM_TABLE: guest-physical ranges and where this process maps them."""
        self._call(Ioctl.SET_MEM_TABLE, encode_memory(list(regions)))

    def set_log_base(self, address: int) -> None:
        """VHOST_SET_LOG_BASE: this process's address of the dirty bitmap (a bit per 4 KiB page)."""
        self._set_u64(Ioctl.SET_LOG_BASE, address)

    def set_log_fd(self, fd: int | None) -> None:
        """VHOST_SET_LOG_FD: an eventfd signalled after the log is written (None: none)."""
        self._call(Ioctl.SET_LOG_FD, INT.pack(-1 if fd is None else fd))

    def set_vring_num(self, index: int, num: int) -> None:
        """VHOST_SET_VRING_NUM: the ring's size (a power of two for split rings)."""
        self._state(Ioctl.SET_VRING_NUM, index, num)

    def set_vring_addr(
        self,
        index: int,
        *,
        desc: int,
        used: int,
        avail: int,
        log_guest_addr: int = 0,
        log: bool = False,
    ) -> None:
        """VHOST_SET_VRING_ADDR: ring addresses in this process; ``log`` logs used-ring writes
        at guest-physical ``log_guest_addr``."""
        flags = 1 << 0 if log else 0
        self._call(
            Ioctl.SET_VRING_ADDR,
            VRING_ADDR.pack(index, flags, desc, used, avail, log_guest_addr),
        )

    def set_vring_base(self, index: int, base: int) -> None:
        """VHOST_SET_VRING_BASE: where the device resumes reading the available ring."""
        self._state(Ioctl.SET_VRING_BASE, index, base)

    def get_vring_base(self, index: int) -> int:
        """VHOST_GET_VRING_BASE: the ring's position; stops the ring."""
        return self._state(Ioctl.GET_VRING_BASE, index)

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """VHOST_SET_VRING_KICK: the eventfd the driver signals (None unbinds)."""
        self._file(Ioctl.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """VHOST_SET_VRING_CALL: the eventfd the device signals on used buffers (None unbinds)."""
        self._file(Ioctl.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """VHOST_SET_VRING_ERR: the eventfd the device signals on a ring error (None unbinds)."""
        self._file(Ioctl.SET_VRING_ERR, index, fd)

    def set_vring_endian(self, index: int, big: bool) -> None:
        """VHOST_SET_VRING_ENDIAN (legacy cross-endian rings; needs CONFIG_VHOST_CROSS_ENDIAN)."""
        self._state(Ioctl.SET_VRING_ENDIAN, index, int(big))

    def get_vring_endian(self, index: int) -> bool:
        """VHOST_GET_VRING_ENDIAN: True for a big-endian ring."""
        return bool(self._state(Ioctl.GET_VRING_ENDIAN, index))

    def set_vring_busyloop_timeout(self, index: int, microseconds: int) -> None:
        """VHOST_SET_VRING_BUSYLOOP_TIMEOUT: poll this long before sleeping (0: never)."""
        self._state(Ioctl.SET_VRING_BUSYLOOP_TIMEOUT, index, microseconds)

    def get_vring_busyloop_timeout(self, index: int) -> int:
        """VHOST_GET_VRING_BUSYLOOP_TIMEOUT in microseconds."""
        return self._state(Ioctl.GET_VRING_BUSYLOOP_TIMEOUT, index)

    def get_backend_features(self) -> int:
        """VHOST_GET_BACKEND_FEATURES: a mask of ``1 << BACKEND_F_*`` bits (IOTLB_MSG_V2, ...)."""
        return self._get_u64(Ioctl.GET_BACKEND_FEATURES)

    def set_backend_features(self, features: int) -> None:
        """VHOST_SET_BACKEND_FEATURES."""
        self._set_u64(Ioctl.SET_BACKEND_FEATURES, features)

    # --- workers (Linux 6.5+) ------------------------------------------------------------------

    def new_worker(self) -> int:
        """VHOST_NEW_WORKER: a new worker thread for this device; its id."""
        worker: int = WORKER_STATE.unpack(self._call(Ioctl.NEW_WORKER, bytes(4)))[0]
        return worker

    def free_worker(self, worker_id: int) -> None:
        """VHOST_FREE_WORKER: free a worker no ring uses."""
        self._call(Ioctl.FREE_WORKER, WORKER_STATE.pack(worker_id))

    def attach_vring_worker(self, index: int, worker_id: int) -> None:
        """VHOST_ATTACH_VRING_WORKER: serve ring ``index`` from worker ``worker_id``."""
        self._call(Ioctl.ATTACH_VRING_WORKER, VRING_WORKER.pack(index, worker_id))

    def get_vring_worker(self, index: int) -> int:
        """VHOST_GET_VRING_WORKER: the id of the worker serving ring ``index``."""
        out = self._call(Ioctl.GET_VRING_WORKER, VRING_WORKER.pack(index, 0))
        worker: int = VRING_WORKER.unpack(out)[1]
        return worker

    # --- IOTLB messages (read and written on the device fd) -----------------------------------

    def write_iotlb(self, message: IotlbMessage, *, v2: bool = True) -> None:
        """Send an IOTLB update, invalidation or batch marker to the device."""
        data = message.encode(v2)
        try:
            written = os.write(self.fd, data)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise KernelVhostError(
                f"IOTLB {message.type.name} write", self.path, err, _iotlb_meaning(err)
            ) from exc
        if written != len(data):
            raise KernelVhostError(
                f"IOTLB {message.type.name} write", self.path, errno.EIO, "short write"
            )

    def read_iotlb(self, *, v2: bool = True) -> IotlbMessage:
        """Read one message the device sent (an IOTLB miss or access failure); blocks."""
        size = (MSG_V2 if v2 else MSG).size
        try:
            data = os.read(self.fd, size)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise KernelVhostError("IOTLB read", self.path, err, _iotlb_meaning(err)) from exc
        return IotlbMessage.decode(data, v2)

    # --- the control interface shared with vhost-user (pyvhost.control) ----------------------

    def set_memory(self, memory: GuestMemory) -> None:
        """VHOST_SET_MEM_TABLE naming each region by where this process maps it.

        The kernel reads and writes guest memory through those mappings: ``memory`` must stay
        open, and its regions mapped, for as long as the device uses them.
        """
        self.set_mem_table(
            [MemoryRegion(r.guest_phys_addr, r.size, r.host_address) for r in memory.regions]
        )
        self.memory = memory

    def set_dirty_log(self, log: DirtyLog, fd: int) -> None:
        """VHOST_SET_LOG_BASE at this process's mapping of ``log`` (``fd`` is not needed)."""
        del fd
        self.set_log_base(log.host_address)

    def set_ring_addresses(self, index: int, ring: RingAddresses) -> None:
        """VHOST_SET_VRING_ADDR from guest-physical addresses in the memory given last."""
        self.set_vring_addr(
            index,
            desc=self._host(ring.desc, f"vring {index} descriptor area"),
            used=self._host(ring.device, f"vring {index} device area"),
            avail=self._host(ring.driver, f"vring {index} driver area"),
            log_guest_addr=ring.device,
            log=ring.log,
        )

    def _host(self, gpa: int, what: str) -> int:
        region, offset = region_for(self.memory, gpa, what)
        return region.host_address + offset

    def enable_ring(self, index: int) -> None:
        """Nothing to do: the kernel's rings run once kicked (vDPA overrides this)."""
        del index


def _iotlb_meaning(err: int) -> str:
    return _IOTLB_MEANINGS.get(err) or os.strerror(err).lower()


def _open_meaning(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such device: is the vhost module loaded (modprobe vhost_net / vhost_vsock ...)?"
    if exc.errno == errno.EACCES:
        return "permission denied: vhost devices usually need root or the kvm group"
    return os.strerror(exc.errno or errno.EIO).lower()
