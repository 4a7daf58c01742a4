"""virtio rings and guest memory; knows nothing of vhost."""
