"""virtio-blk over a raw image file or a block device (virtio 1.2 section 5.2).

- :mod:`.config`: the config space (:func:`encode_config`, :class:`BlkLimits`) and the serial;
- :mod:`.request`: :class:`BlkBackend`, the request processor (status choices, replay safety);
- :mod:`.device`: :class:`BlkDevice`, the backend behind the framework's
  :class:`pyvhost.daemon.Device`.
"""

from pyvhost.devices.blk.config import (
    CONFIG_SIZE,
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    BlkLimits,
    default_serial,
    encode_config,
)
from pyvhost.devices.blk.device import COMPLETE_BYTES, BlkDevice
from pyvhost.devices.blk.request import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlkBackend,
)

__all__ = [
    "COMPLETE_BYTES",
    "CONFIG_SIZE",
    "SECTOR_SIZE",
    "VIRTIO_BLK_ID_BYTES",
    "VIRTIO_BLK_S_IOERR",
    "VIRTIO_BLK_S_OK",
    "VIRTIO_BLK_S_UNSUPP",
    "VIRTIO_BLK_T_DISCARD",
    "VIRTIO_BLK_T_FLUSH",
    "VIRTIO_BLK_T_GET_ID",
    "VIRTIO_BLK_T_IN",
    "VIRTIO_BLK_T_OUT",
    "VIRTIO_BLK_T_WRITE_ZEROES",
    "VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP",
    "BlkBackend",
    "BlkDevice",
    "BlkLimits",
    "default_serial",
    "encode_config",
]
