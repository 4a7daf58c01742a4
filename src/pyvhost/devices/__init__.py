"""Ready-made vhost-user devices: :mod:`.blk` (virtio-blk) and :mod:`.rng` (virtio-rng)."""
