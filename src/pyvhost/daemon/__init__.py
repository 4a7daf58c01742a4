"""The back-end framework: subclass :class:`Device`, serve it with :class:`Daemon`."""

from pyvhost.daemon.device import Device
from pyvhost.daemon.loop import EventLoop
from pyvhost.daemon.server import Daemon

__all__ = ["Daemon", "Device", "EventLoop"]
