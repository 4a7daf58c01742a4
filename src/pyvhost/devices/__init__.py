"""Ready-made vhost-user devices: :mod:`~pyvhost.devices.blk` (virtio-blk) and
:mod:`~pyvhost.devices.rng` (virtio-rng)."""
