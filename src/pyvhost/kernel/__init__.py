"""Kernel vhost: ``/dev/vhost-net``, ``-vsock``, ``-scsi`` and ``-vdpa-N`` through their ioctls.

``ioctl`` holds the request numbers and structs, ``device`` the requests every vhost driver
answers, ``devices`` each driver's own, ``tap`` the TAP interfaces vhost-net moves frames through.
"""

from pyvhost.kernel.device import IotlbMessage, KernelVhostError, VhostKernelDevice
from pyvhost.kernel.devices import VhostNet, VhostScsi, VhostVdpa, VhostVsock, open_device
from pyvhost.kernel.ioctl import Ioctl, IotlbType, MemoryRegion
from pyvhost.kernel.tap import Tap, TapError

__all__ = [
    "Ioctl",
    "IotlbMessage",
    "IotlbType",
    "KernelVhostError",
    "MemoryRegion",
    "Tap",
    "TapError",
    "VhostKernelDevice",
    "VhostNet",
    "VhostScsi",
    "VhostVdpa",
    "VhostVsock",
    "open_device",
]
