"""virtio-net (virtio 1.2 section 5.1) as a vhost-user back-end over a TAP, a loopback or a sink.

- :mod:`.config`: the config space, MAC addresses, the features offered;
- :mod:`.backends`: :class:`NetBackend` and its TAP, loopback and sink kinds;
- :mod:`.rx` / :mod:`.tx`: receive (bounded backlog, MRG_RXBUF) and transmit (checks, hand-off);
- :mod:`.ctrl`: the control queue's commands and their VIRTIO_NET_OK / _ERR answers;
- :mod:`.stats`: counters of frames, bytes and drops by reason, logged periodically;
- :mod:`.rarp`: the RARP frame of SEND_RARP;
- :mod:`.device`: :class:`NetDevice`, all of it behind the framework's
  :class:`pyvhost.daemon.Device`.
"""

from pyvhost.devices.net.backends import (
    BACKENDS,
    LoopbackBackend,
    NetBackend,
    SinkBackend,
    TapBackend,
    tun_offloads,
)
from pyvhost.devices.net.config import (
    CONFIG_SIZE,
    DEFAULT_MTU,
    S_ANNOUNCE,
    S_LINK_UP,
    NetConfig,
    format_mac,
    parse_mac,
    random_mac,
)
from pyvhost.devices.net.ctrl import ERR, OK
from pyvhost.devices.net.device import NetDevice
from pyvhost.devices.net.rarp import ETHERTYPE_RARP, rarp_frame
from pyvhost.devices.net.rx import BACKLOG
from pyvhost.devices.net.stats import NetStats, StatsLogger

__all__ = [
    "BACKENDS",
    "BACKLOG",
    "CONFIG_SIZE",
    "DEFAULT_MTU",
    "ERR",
    "ETHERTYPE_RARP",
    "OK",
    "S_ANNOUNCE",
    "S_LINK_UP",
    "LoopbackBackend",
    "NetBackend",
    "NetConfig",
    "NetDevice",
    "NetStats",
    "SinkBackend",
    "StatsLogger",
    "TapBackend",
    "format_mac",
    "parse_mac",
    "random_mac",
    "rarp_frame",
    "tun_offloads",
]
