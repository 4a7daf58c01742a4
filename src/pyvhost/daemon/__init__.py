"""The back-end framework: subclass :class:`Device`, serve it with :class:`Daemon`.

:class:`DeviceAdapter` is what the daemon puts between a :class:`Device` and the protocol handler;
authors do not need it, tests and tools that drive a handler without a daemon do.
"""

from pyvhost.daemon.adapter import DeviceAdapter
from pyvhost.daemon.device import Device
from pyvhost.daemon.loop import EventLoop
from pyvhost.daemon.server import Daemon

__all__ = ["Daemon", "Device", "DeviceAdapter", "EventLoop"]
