"""Test helpers: two VsockEndpoints wired back to back, a guest (CID 3) and a host (CID 2)."""

from __future__ import annotations

from dataclasses import dataclass

from pyvhost.virtio.vsock import (
    ConnectionOptions,
    Packet,
    Type,
    VsockEndpoint,
    VsockHeader,
)

GUEST_CID, HOST_CID = 3, 2


@dataclass
class Link:
    """A guest and a host endpoint; ``carry`` moves packets from one to the other."""

    guest: VsockEndpoint
    host: VsockEndpoint

    @classmethod
    def make(cls, **options: int) -> Link:
        opts = ConnectionOptions(**options)
        return cls(
            VsockEndpoint(GUEST_CID, options=opts),
            VsockEndpoint(HOST_CID, peer_cid=GUEST_CID, options=opts),
        )

    def carry(
        self, source: VsockEndpoint, limit: int | None = None, max_payload: int | None = None
    ) -> list[Packet]:
        """Move up to ``limit`` packets (all if None) from ``source`` to the other endpoint,
        through their byte encoding as a ring would."""
        target = self.host if source is self.guest else self.guest
        moved: list[Packet] = []
        while limit is None or len(moved) < limit:
            packet = source.next_packet(max_payload)
            if packet is None:
                break
            target.feed_packet(packet.encode())
            moved.append(packet)
        return moved

    def settle(self) -> None:
        """Carry packets both ways until neither side has any."""
        while self.carry(self.guest) + self.carry(self.host):
            pass


def from_guest(
    op: int,
    payload: bytes = b"",
    *,
    src_port: int = 1024,
    dst_port: int = 5000,
    **fields: int,
) -> tuple[VsockHeader, bytes]:
    """A packet from the guest (3:src_port) to the host (2:dst_port), with ``fields`` changed."""
    values = {
        "src_cid": GUEST_CID,
        "dst_cid": HOST_CID,
        "src_port": src_port,
        "dst_port": dst_port,
        "len": len(payload),
        "type": Type.STREAM,
        "op": op,
        "flags": 0,
        "buf_alloc": 4096,
        "fwd_cnt": 0,
    }
    values.update(fields)
    return VsockHeader(**values), payload
