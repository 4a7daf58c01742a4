"""virtio-vsock STREAM sockets as a sans-I/O core, shared by a device back-end and a driver.

``wire`` is the packet header and its numbers; see docs/vsock.md.
"""
