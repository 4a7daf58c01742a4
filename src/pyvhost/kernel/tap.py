"""TAP interfaces for vhost-net and the vhost-user net device: create or attach, vnet header,
offloads, multiqueue, link up; all through ``/dev/net/tun`` and interface ioctls."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from pyvhost.closing import Closing
from pyvhost.errors import VhostError
from pyvhost.kernel.ioctl import IOC_READ, IOC_WRITE, ioc

__all__ = [
    "IFF_MULTI_QUEUE",
    "IFF_NO_PI",
    "IFF_TAP",
    "IFF_VNET_HDR",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "TUN_F_TSO_ECN",
    "TUN_F_UFO",
    "Tap",
    "TapError",
]

_TUN_TYPE = ord("T")
_INT = 4
TUNSETIFF = ioc(IOC_WRITE, _TUN_TYPE, 202, _INT)
TUNSETPERSIST = ioc(IOC_WRITE, _TUN_TYPE, 203, _INT)
TUNSETOFFLOAD = ioc(IOC_WRITE, _TUN_TYPE, 208, _INT)
TUNGETIFF = ioc(IOC_READ, _TUN_TYPE, 210, _INT)
TUNSETVNETHDRSZ = ioc(IOC_WRITE, _TUN_TYPE, 216, _INT)
TUNSETQUEUE = ioc(IOC_WRITE, _TUN_TYPE, 217, _INT)
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
"""Socket ioctls from <linux/sockios.h> (not _IOC-encoded)."""

IFF_UP = 0x1
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

_IFNAMSIZ = 16
_IFREQ = struct.Struct(f"={_IFNAMSIZ}sH22x")
"""struct ifreq with the short ifr_flags member of its union (40 bytes)."""
_IFREQ_INT = struct.Struct(f"={_IFNAMSIZ}si20x")
"""struct ifreq with the int ifr_mtu member of its union (40 bytes)."""


class TapError(VhostError):
    """A TAP operation failed: the message names the interface, the operation and the errno."""


def _ifreq(name: str, value: int = 0, layout: struct.Struct = _IFREQ) -> bytearray:
    """A struct ifreq for interface ``name`` (checked) with ``value`` in its union as
    ``layout`` says: the short flags (:data:`_IFREQ`) or the int MTU (:data:`_IFREQ_INT`)."""
    raw = name.encode("ascii")
    if not raw or len(raw) >= _IFNAMSIZ or b"/" in raw or b" " in raw:
        raise TapError(f"interface name {name!r} must be 1 to {_IFNAMSIZ - 1} characters, no '/'")
    return bytearray(layout.pack(raw, value))


_MEANINGS = {
    ("TUNSETIFF", errno.EINVAL): "an interface of that name exists and is not a TAP with these "
    "flags: a TUN, another kind of device, or other multi-queue / vnet header settings",
    (
        "TUNSETIFF",
        errno.EBUSY,
    ): "the TAP is already attached (single-queue)",
    ("TUNSETIFF", errno.EPERM): "creating or attaching a TAP needs CAP_NET_ADMIN or its owner",
    ("SIOCSIFMTU", errno.EINVAL): "outside the MTUs the interface takes (68 to 65535 for a TAP)",
    ("SIOCSIFMTU", errno.EPERM): "setting an MTU needs CAP_NET_ADMIN",
}


def _fail(name: str, what: str, exc: OSError) -> TapError:
    err = exc.errno or errno.EIO
    code = errno.errorcode.get(err, f"errno {err}")
    meaning = _MEANINGS.get((what, err)) or os.strerror(err).lower()
    return TapError(f"TAP {name}: {what}: {code} ({meaning})")


class Tap(Closing):
    """One TAP interface, or one queue of a multiqueue TAP; ``fds`` are its queue fds.

    ``Tap.open("tap0")`` creates the interface if it does not exist, attaches to it if it does
    (same flags required). ``vnet_hdr`` (on by default) prefixes every frame with a virtio-net
    header of ``vnet_hdr_size`` bytes, the layout vhost-net and virtio-net use.
    """

    def __init__(self, name: str, fds: list[int], flags: int) -> None:
        self.name = name
        self.fds = fds
        self.flags = flags
        self._closed = False

    @classmethod
    def open(
        cls,
        name: str,
        *,
        queues: int = 1,
        vnet_hdr: bool = True,
        vnet_hdr_size: int = 12,
    ) -> Tap:
        """Create or attach ``name`` with ``queues`` queue fds (IFF_MULTI_QUEUE when above 1)."""
        if queues < 1:
            raise TapError(f"TAP {name}: queues must be at least 1, got {queues}")
        flags = IFF_TAP | IFF_NO_PI
        if vnet_hdr:
            flags |= IFF_VNET_HDR
        if queues > 1:
            flags |= IFF_MULTI_QUEUE
        fds: list[int] = []
        tap = cls(name, fds, flags)
        try:
            for _ in range(queues):
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
                fds.append(fd)
                req = _ifreq(name, flags)
                try:
                    fcntl.ioctl(fd, TUNSETIFF, req, True)
                except OSError as exc:
                    raise _fail(name, "TUNSETIFF", exc) from exc
                tap.name = _IFREQ.unpack(req)[0].rstrip(b"\0").decode("ascii")
            if vnet_hdr:
                tap.set_vnet_hdr_size(vnet_hdr_size)
        except OSError as exc:
            tap.close()
            raise _fail(name, "open /dev/net/tun", exc) from exc
        except BaseException:
            tap.close()
            raise
        return tap

    @property
    def fd(self) -> int:
        """The first queue's fd (the only one of a single-queue TAP)."""
        return self.fds[0]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close every queue fd; a non-persistent interface then disappears."""
        if self._closed:
            return
        self._closed = True
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def _each(self, request: int, value: int, what: str, *, by_pointer: bool) -> None:
        """Apply ``request`` to every queue; the kernel reads some values through a pointer
        (TUNSETVNETHDRSZ) and takes others as the argument itself (TUNSETOFFLOAD, -PERSIST)."""
        arg: bytes | int = struct.pack("=i", value) if by_pointer else value
        for fd in self.fds:
            try:
                fcntl.ioctl(fd, request, arg)
            except OSError as exc:
                raise _fail(self.name, what, exc) from exc

    def set_vnet_hdr_size(self, size: int) -> None:
        """TUNSETVNETHDRSZ: 10 (legacy header), 12 (VERSION_1 or MRG_RXBUF) or more."""
        self._each(TUNSETVNETHDRSZ, size, f"TUNSETVNETHDRSZ {size}", by_pointer=True)

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD: the TUN_F_* offloads the reader of the TAP accepts."""
        self._each(TUNSETOFFLOAD, flags, f"TUNSETOFFLOAD {flags:#x}", by_pointer=False)

    def set_queue_attached(self, index: int, attached: bool) -> None:
        """TUNSETQUEUE: attach or detach queue ``index`` of a multiqueue TAP; the kernel spreads
        frames over attached queues only (a detached queue's fd reads nothing and polls as an
        error)."""
        if not self.flags & IFF_MULTI_QUEUE:
            raise TapError(f"TAP {self.name}: TUNSETQUEUE: only a multiqueue TAP has queues")
        flag = IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE
        what = f"TUNSETQUEUE {'attach' if attached else 'detach'} queue {index}"
        try:
            fcntl.ioctl(self.fds[index], TUNSETQUEUE, _ifreq(self.name, flag))
        except OSError as exc:
            raise _fail(self.name, what, exc) from exc

    def set_persist(self, persist: bool) -> None:
        """TUNSETPERSIST: keep the interface after its fds are closed."""
        self._each(TUNSETPERSIST, int(persist), "TUNSETPERSIST", by_pointer=False)

    def _link_ioctl(self, request: int, req: bytearray, what: str) -> bytearray:
        """A socket ioctl on the interface with the ifreq ``req`` (filled in); ``req``."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                fcntl.ioctl(sock, request, req, True)
            except OSError as exc:
                raise _fail(self.name, what, exc) from exc
        return req

    def set_up(self, up: bool = True) -> None:
        """Bring the link up (or down), as ``ip link set NAME up`` does."""
        what = "link up" if up else "link down"
        flags = _IFREQ.unpack(self._link_ioctl(SIOCGIFFLAGS, _ifreq(self.name), what))[1]
        flags = flags | IFF_UP if up else flags & ~IFF_UP
        self._link_ioctl(SIOCSIFFLAGS, _ifreq(self.name, flags), what)

    @property
    def mtu(self) -> int:
        """The interface's MTU (SIOCGIFMTU)."""
        req = _ifreq(self.name, 0, _IFREQ_INT)
        mtu: int = _IFREQ_INT.unpack(self._link_ioctl(SIOCGIFMTU, req, "SIOCGIFMTU"))[1]
        return mtu

    def set_mtu(self, mtu: int) -> None:
        """Set the interface's MTU, as ``ip link set NAME mtu N`` does (SIOCSIFMTU)."""
        if not 0 < mtu <= 0x7FFF_FFFF:
            raise TapError(f"TAP {self.name}: MTU {mtu} is not a positive 32-bit number")
        self._link_ioctl(SIOCSIFMTU, _ifreq(self.name, mtu, _IFREQ_INT), "SIOCSIFMTU")

    def is_up(self) -> bool:
        """Whether the interface has IFF_UP."""
        req = self._link_ioctl(SIOCGIFFLAGS, _ifreq(self.name), "SIOCGIFFLAGS")
        return bool(_IFREQ.unpack(req)[1] & IFF_UP)


def offload_flags(
    *,
    csum: bool = False,
    tso4: bool = False,
    tso6: bool = False,
    ecn: bool = False,
    ufo: bool = False,
) -> int:
    """TUN_F_* flags from what the guest acked (TSO and UFO need CSUM, as the kernel requires)."""
    flags = 0
    for on, bit in (
        (csum, TUN_F_CSUM),
        (tso4, TUN_F_TSO4),
        (tso6, TUN_F_TSO6),
        (ecn, TUN_F_TSO_ECN),
        (ufo, TUN_F_UFO),
    ):
        if on:
            flags |= bit
    if flags and not flags & TUN_F_CSUM:
        raise TapError("TSO/UFO offloads need checksum offload (TUN_F_CSUM) too")
    return flags
