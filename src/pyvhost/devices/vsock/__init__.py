"""virtio-vsock as a vhost-user back-end in the hybrid style of Firecracker and rust-vmm's
vhost-device-vsock: the guest's stream sockets end in Unix sockets on the host.

- :mod:`.device`: :class:`VsockDevice`, the queues and the transport reset;
- :mod:`.bridge`: :class:`UnixBridge`, the Unix sockets (``UDS_PATH`` and ``UDS_PATH_<port>``);
- :mod:`.link`: one connection pumped both ways with back-pressure;
- :mod:`.handshake`: the ``CONNECT <port>`` / ``OK <port>`` lines;
- :mod:`.rings`: packets in and out of descriptor chains;
- :mod:`.waits`: writability and the timer, which the daemon's loop does not watch.

The protocol itself (credit, states, hostile packets) is :mod:`pyvhost.virtio.vsock`'s.
"""

from pyvhost.devices.vsock.bridge import UnixBridge
from pyvhost.devices.vsock.device import VsockDevice
from pyvhost.devices.vsock.handshake import HandshakeError, ok_line, parse_connect
from pyvhost.devices.vsock.link import CHUNK, MAX_UNSENT

__all__ = [
    "CHUNK",
    "MAX_UNSENT",
    "HandshakeError",
    "UnixBridge",
    "VsockDevice",
    "ok_line",
    "parse_connect",
]
