"""A hand-driven front-end and guest driver (Frontend + SplitDriver) for the framework tests.

It does what QEMU does, step by step, so tests can look at each notification and keep the
inflight fd across a back-end's death and hand it back with SET_INFLIGHT_FD.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from dataclasses import dataclass

from pyvhost.user.channel import BackendRequestHandler
from pyvhost.user.frontend import Frontend
from pyvhost.user.messages import Inflight, MemoryRegion, ProtocolFeature, VringAddr
from pyvhost.virtio import features as vf
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.split import SplitDriver, split_layout

GPA = 0x1000_0000
RING_AREA = 0x10000
MEM_SIZE = 4 << 20


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def drain(fd: int) -> int:
    if not readable(fd):
        return 0
    return int.from_bytes(os.read(fd, 8), "little")


@dataclass
class Ring:
    driver: SplitDriver
    addr: VringAddr
    kick: int
    call: int
    err: int


class Rig:
    """Front-end + driver over one anonymous memfd; queues of ``qsize`` split descriptors."""

    def __init__(
        self,
        path: str,
        *,
        num_queues: int = 1,
        qsize: int = 16,
        event_idx: bool = False,
        inflight: bool = False,
        connect_deadline: float = 10.0,
        backend_handler: BackendRequestHandler | None = None,
    ) -> None:
        self.backend_handler = backend_handler
        self.path = path
        self.num_queues = num_queues
        self.qsize = qsize
        self.event_idx = event_idx
        self.use_inflight = inflight
        self.mem = GuestMemory.anonymous(MEM_SIZE, guest_phys_addr=GPA)
        self.region = self.mem.regions[0]
        self._next = GPA + RING_AREA * num_queues
        self.rings: list[Ring] = []
        self.inflight: tuple[Inflight, int] | None = None
        self.fe: Frontend | None = None
        self.connect(connect_deadline)

    # -- set-up ----------------------------------------------------------------------------------

    def features(self, offered: int) -> int:
        wanted = 1 << vf.F_VERSION_1 | 1 << vf.F_RING_INDIRECT_DESC | 1 << 30
        if self.event_idx:
            wanted |= 1 << vf.F_RING_EVENT_IDX
        return offered & wanted

    def connect(self, deadline: float = 10.0, *, resume: bool = False) -> None:
        """Negotiate, share memory, start every ring (resume: keep rings and inflight fd)."""
        fe = Frontend.connect(self.path, deadline)
        self.fe = fe
        fe.negotiate(backend_handler=self.backend_handler)
        assert fe.offered_features is not None
        fe.set_features(self.features(fe.offered_features))
        if self.use_inflight:
            if self.inflight is None:
                info, fd = fe.get_inflight_fd(self.num_queues, self.qsize)
                assert fd is not None
                self.inflight = (info, fd)
            info, fd = self.inflight
            fe.set_inflight_fd(info, fd)
        r = self.region
        assert r.fd is not None
        fe.setup_memory(
            [(MemoryRegion(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset), r.fd)]
        )
        for q in range(self.num_queues):
            if resume:
                ring = self.rings[q]
                base = ring.driver._used[1]  # QEMU: last_avail_idx restored from used.idx
            else:
                ring = self._new_ring(q)
                self.rings.append(ring)
                base = 0
            fe.start_vring(q, self.qsize, ring.addr, base, ring.kick, ring.call)
            fe.set_vring_err(q, ring.err)
            drain(ring.call)  # the back-end signals a new call fd once (libvhost-user does)

    def _new_ring(self, q: int) -> Ring:
        desc, avail, used, _ = split_layout(self.qsize, GPA + RING_AREA * q)
        driver = SplitDriver(
            self.mem, self.qsize, desc, avail, used, event_idx=self.event_idx, queue_index=q
        )
        uva = self.region.userspace_addr - GPA
        addr = VringAddr(q, 0, uva + desc, uva + used, uva + avail, 0)
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        return Ring(driver, addr, os.eventfd(0, flags), os.eventfd(0, flags), os.eventfd(0, flags))

    def reconnect(self, deadline: float = 15.0) -> None:
        """The back-end went away: connect again and resume the rings like QEMU does."""
        if self.fe is not None:
            self.fe.close()
        self.connect(deadline, resume=True)

    # -- driver ----------------------------------------------------------------------------------

    def alloc(self, size: int) -> int:
        gpa = self._next
        self._next += (size + 63) // 64 * 64
        assert self._next <= GPA + MEM_SIZE, "rig memory exhausted"
        return gpa

    def put(self, data: bytes) -> tuple[int, int]:
        gpa = self.alloc(len(data))
        self.mem.write(gpa, data)
        return gpa, len(data)

    def submit(
        self, q: int, data: list[bytes], writable: list[int], *, kick: bool = True
    ) -> tuple[int, list[tuple[int, int]]]:
        """Add a chain (readable ``data`` pieces, writable buffers of these sizes); publish.

        Returns the head and the writable buffers ``(gpa, len)``.
        """
        ring = self.rings[q]
        out = [(self.alloc(n), n) for n in writable]
        head = ring.driver.add([self.put(d) for d in data], out)
        ring.driver.publish()
        if kick:
            self.kick(q)
        return head, out

    def output(self, out: list[tuple[int, int]], written: int) -> bytes:
        """The first ``written`` bytes the device put into writable buffers ``out``."""
        data = b"".join(self.mem.read(gpa, n) for gpa, n in out)
        return data[:written]

    def kick(self, q: int, *, force: bool = False) -> bool:
        ring = self.rings[q]
        if force or ring.driver.should_kick():
            os.write(ring.kick, (1).to_bytes(8, "little"))
            return True
        return False

    def wait_used(self, q: int, n: int, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Collect at least ``n`` used elements of queue ``q`` (polling the ring)."""
        ring = self.rings[q]
        got: list[tuple[int, int]] = []
        end = time.monotonic() + timeout
        while len(got) < n:
            got += ring.driver.get_used()
            if len(got) >= n:
                break
            if time.monotonic() > end:
                raise TimeoutError(f"queue {q}: {len(got)} of {n} used elements after {timeout}s")
            select.select([ring.call], [], [], 0.01)
        return got

    def writable_bytes(self, gpa: int, n: int) -> bytes:
        return self.mem.read(gpa, n)

    def close(self) -> None:
        if self.fe is not None:
            with contextlib.suppress(Exception):
                self.fe.close()
        for ring in self.rings:
            ring.driver.close()
            for fd in (ring.kick, ring.call, ring.err):
                os.close(fd)
        self.rings.clear()
        if self.inflight is not None:
            os.close(self.inflight[1])
            self.inflight = None
        self.mem.close()

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["GPA", "ProtocolFeature", "Rig", "drain", "readable"]
