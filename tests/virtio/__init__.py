"""Tests of pyvhost.virtio."""
