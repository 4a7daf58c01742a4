"""Packets in and out of descriptor chains: a tx chain read as header and payload (a view into
guest memory when it lies in one buffer), a packet written into an rx chain."""

from __future__ import annotations

import logging

from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.vsock import HEADER_SIZE, Packet, VsockHeader
from pyvhost.virtio.vsock.wire import Bytes

__all__ = ["read_packet", "write_packet"]

log = logging.getLogger("pyvhost.devices.vsock")


def read_packet(chain: DescriptorChain, max_payload: int) -> tuple[VsockHeader, Bytes] | None:
    """The packet a tx chain carries, or None (logged) if it cannot hold one. A payload longer
    than ``max_payload`` is cut there: no valid packet is that long, and the endpoint refuses
    it by its ``len`` without this device copying what a guest may make huge."""
    size = chain.read_len
    if size < HEADER_SIZE:
        log.warning("tx chain %d: %d readable bytes, less than a header", chain.head, size)
        return None
    header = VsockHeader.decode(chain.read_at(0, HEADER_SIZE))
    size -= HEADER_SIZE
    if size > max_payload:
        log.warning("tx chain %d: %d payload bytes, cut to %d", chain.head, size, max_payload)
        size = max_payload
    return header, chain.readable_view_at(HEADER_SIZE, size) if size else b""


def write_packet(chain: DescriptorChain, packet: Packet) -> int:
    """Write ``packet`` (its payload already cut to fit) into an rx chain; bytes written."""
    written = chain.write_at(0, packet.header.encode())
    if packet.payload:
        written += chain.write_at(HEADER_SIZE, packet.payload)
    return written
