"""What one conformance check talks through: a fresh connection to the back-end under test.

A :class:`Session` owns one connection (the project's :class:`~pyvhost.user.connection.Connection`
under a :class:`~pyvhost.user.frontend.Frontend`) and everything the check created for it
(memfds, eventfds). Well-formed requests go through the Frontend; hostile ones are built with the
codec (``encode_header``, an unchecked :class:`~pyvhost.user.messages.Message`) and sent raw.
Every receive has the session's timeout: a back-end that hangs makes the check fail, never the
tool hang.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from pyvhost.closing import Closing
from pyvhost.errors import ConnectionClosedError, ProtocolError, ReplyError
from pyvhost.user.connection import connect
from pyvhost.user.frontend import Frontend, NegotiationResult
from pyvhost.user.messages import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    U64,
    VERSION,
    MemoryRegion,
    Message,
    Payload,
    ProtocolFeature,
    Request,
    VringAddr,
    encode_message,
    spec_for,
)
from pyvhost.virtio import features as vf

__all__ = [
    "NEGOTIATED",
    "RING_SIZE",
    "GuestRam",
    "Offer",
    "Outcome",
    "Result",
    "Ring",
    "Session",
    "Step",
    "failed",
    "not_applicable",
    "passed",
]

PF = ProtocolFeature

Result = Literal["pass", "fail", "n/a"]

RING_SIZE = 128
"""Descriptors per ring: QEMU's default queue size for vhost-user devices."""

NEGOTIATED = 1 << PF.MQ | 1 << PF.REPLY_ACK | 1 << PF.CONFIG | 1 << PF.CONFIGURE_MEM_SLOTS
"""Protocol features a check session accepts when offered: the ones the checks exercise."""

_RING_UNSAFE = 1 << vf.F_LOG_ALL | 1 << vf.F_ACCESS_PLATFORM | 1 << vf.F_NOTIFICATION_DATA
"""Offered bits a ring check does not acknowledge: they need a dirty log, an IOTLB or kick data."""

REGION_SIZE = 1 << 20
UVA_BASE = 0x7F5A_0000_0000
"""Front-end "user addresses" of the regions: any value works, the back-end only translates."""


@dataclass(frozen=True)
class Outcome:
    """What a check concluded, before the survival check: pass, fail or n/a, and why."""

    result: Result
    detail: str


def passed(detail: str) -> Outcome:
    return Outcome("pass", detail)


def failed(detail: str) -> Outcome:
    return Outcome("fail", detail)


def not_applicable(detail: str) -> Outcome:
    return Outcome("n/a", detail)


@dataclass(frozen=True)
class Offer:
    """What the back-end offered at discovery; ``protocol_features`` is None without bit 30."""

    features: int
    protocol_features: int | None

    def has_feature(self, bit: int) -> bool:
        return vf.has_bit(self.features, bit)

    def has_protocol_feature(self, feature: ProtocolFeature) -> bool:
        return self.protocol_features is not None and vf.has_bit(self.protocol_features, feature)


class GuestRam(Closing):
    """One region of pretend guest memory: a memfd, our own mapping of it, its region entry.

    ``fd_size`` smaller than ``size`` makes a region whose fd is too small for it (hostile).
    """

    def __init__(
        self,
        gpa: int,
        size: int = REGION_SIZE,
        *,
        fd_size: int | None = None,
        uva: int | None = None,
    ) -> None:
        self.fd = os.memfd_create("pyvhost-check", os.MFD_CLOEXEC)
        self.region = MemoryRegion(gpa, size, UVA_BASE + gpa if uva is None else uva, 0)
        mapped = size if fd_size is None else fd_size
        try:
            os.ftruncate(self.fd, mapped)
            self.mm = mmap.mmap(self.fd, mapped)
        except BaseException:
            os.close(self.fd)
            raise

    def uva(self, gpa: int) -> int:
        """The front-end user address of guest physical address ``gpa`` in this region."""
        return self.region.userspace_addr + gpa - self.region.guest_phys_addr

    def write_u16(self, gpa: int, value: int) -> None:
        struct.pack_into("<H", self.mm, gpa - self.region.guest_phys_addr, value)

    def close(self) -> None:
        if not self.mm.closed:
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass(frozen=True)
class Ring:
    """Where a ring lives (guest physical addresses) and the base index it starts from."""

    desc: int
    driver: int
    device: int
    base: int

    @classmethod
    def at(cls, gpa: int, base: int) -> Ring:
        """Descriptors at ``gpa``, driver area one page up, device area two pages up."""
        return cls(gpa, gpa + 0x1000, gpa + 0x2000, base)

    def addr(self, ram: GuestRam, index: int = 0, *, outside: int = 0) -> VringAddr:
        """SET_VRING_ADDR payload in ``ram``'s user addresses, shifted by ``outside`` bytes."""
        return VringAddr(
            index,
            0,
            ram.uva(self.desc) + outside,
            ram.uva(self.device) + outside,
            ram.uva(self.driver) + outside,
            0,
        )


class Step(NamedTuple):
    """A named action of a check (refused() says which one the back-end turned down).

    ``acked``: a request that gets a u64 ack under REPLY_ACK, so that going through means
    "acknowledged as a success".
    """

    what: str
    run: Callable[[], object]
    acked: bool = True


def _bind(func: Callable[..., object], *args: object) -> Callable[[], object]:
    return lambda: func(*args)


class Session(Closing):
    """One fresh connection to the back-end under test, and what the check created on it."""

    def __init__(self, path: str, offer: Offer, timeout: float) -> None:
        self.path = path
        self.offer = offer
        self.timeout = timeout
        self.conn = connect(path, deadline=timeout)
        self.fe = Frontend(self.conn, reply_timeout=timeout)
        self.negotiated: NegotiationResult | None = None
        self.err_fd: int | None = None
        self._owned: list[Closing] = []
        self._fds: list[int] = []

    def close(self) -> None:
        self.fe.close()
        for item in self._owned:
            item.close()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owned.clear()
        self._fds.clear()

    # --- set-up the way QEMU does it ---------------------------------------------------------

    def negotiate(self, *, without: int = 0, set_owner: bool = True) -> NegotiationResult:
        """GET_FEATURES, GET/SET_PROTOCOL_FEATURES (offered & NEGOTIATED & ~without), GET_QUEUE_NUM,
        GET_MAX_MEM_SLOTS, SET_OWNER: QEMU's start-up, without a back-end channel."""
        self.negotiated = self.fe.negotiate(
            protocol_mask=NEGOTIATED & ~without, set_owner=set_owner
        )
        return self.negotiated

    @property
    def reply_ack(self) -> bool:
        return self.fe.reply_ack

    @property
    def mem_slots(self) -> bool:
        """Whether memory goes in with ADD_MEM_REG (CONFIGURE_MEM_SLOTS negotiated), as in QEMU."""
        return self.fe.has_protocol_feature(PF.CONFIGURE_MEM_SLOTS)

    def ack_ring_features(self, *, packed: bool = False) -> int:
        """SET_FEATURES with what a plain ring needs: offered bits minus log, IOTLB, kick data,
        and minus RING_PACKED unless ``packed``."""
        offered = self.fe.offered_features or 0
        mask = ~_RING_UNSAFE if packed else ~(_RING_UNSAFE | 1 << vf.F_RING_PACKED)
        features = offered & mask
        self.fe.set_features(features)
        return features

    def ram(
        self,
        gpa: int = 0,
        size: int = REGION_SIZE,
        *,
        fd_size: int | None = None,
        uva: int | None = None,
    ) -> GuestRam:
        ram = GuestRam(gpa, size, fd_size=fd_size, uva=uva)
        self._owned.append(ram)
        return ram

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        return fd

    def memory_steps(self, regions: Sequence[tuple[MemoryRegion, int]]) -> list[Step]:
        """The requests that share ``regions``: one ADD_MEM_REG each with CONFIGURE_MEM_SLOTS,
        else one SET_MEM_TABLE (what QEMU sends)."""
        if self.mem_slots:
            return [
                Step(f"ADD_MEM_REG #{i}", _bind(self.fe.add_mem_reg, region, fd))
                for i, (region, fd) in enumerate(regions)
            ]
        return [Step("SET_MEM_TABLE", lambda: self.fe.set_mem_table(regions))]

    def ring_steps(self, ram: GuestRam, ring: Ring, *, outside: int = 0) -> tuple[list[Step], int]:
        """SET_VRING_ERR, NUM, BASE, ADDR, KICK, CALL, ENABLE for ring 0 (QEMU's order), and the
        kick eventfd that starts it."""
        kick, call, err = self.eventfd(), self.eventfd(), self.eventfd()
        self.err_fd = err
        fe = self.fe
        steps: list[Step] = [
            Step("SET_VRING_ERR", _bind(fe.set_vring_err, 0, err)),
            Step("SET_VRING_NUM", _bind(fe.set_vring_num, 0, RING_SIZE)),
            Step("SET_VRING_BASE", _bind(fe.set_vring_base, 0, ring.base)),
            Step("SET_VRING_ADDR", _bind(fe.set_vring_addr, ring.addr(ram, outside=outside))),
            Step("SET_VRING_KICK", _bind(fe.set_vring_kick, 0, kick)),
            Step("SET_VRING_CALL", _bind(fe.set_vring_call, 0, call)),
        ]
        if self.offer.has_feature(F_PROTOCOL_FEATURES):
            steps.append(Step("SET_VRING_ENABLE", _bind(fe.set_vring_enable, 0, True)))
        return steps, kick

    @staticmethod
    def kick(fd: int) -> None:
        """Kick the ring and give the back-end a moment to look at it."""
        os.eventfd_write(fd, 1)
        time.sleep(0.05)

    def err_signalled(self) -> bool:
        """Whether the back-end wrote the vring error eventfd of the last ring_steps()."""
        if self.err_fd is None:
            return False
        try:
            return os.eventfd_read(self.err_fd) > 0
        except BlockingIOError:
            return False

    # --- raw traffic ---------------------------------------------------------------------------

    def message(self, request: Request, payload: Payload, fds: Sequence[int] = ()) -> Message:
        """An unchecked request: NEED_REPLY set the way the Frontend would (REPLY_ACK, no body)."""
        need_reply = self.reply_ack and not spec_for(request).always_replies
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        return Message(request, flags, payload, list(fds))

    def send_raw(self, msg: Message) -> None:
        """Send ``msg`` unchecked; with NEED_REPLY wait for the ack (ReplyError if not 0)."""
        data, fds = encode_message(msg)
        self.conn.send_bytes(data, fds)
        if msg.need_reply:
            reply = self.conn.recv_reply(msg.request, self.timeout)
            value = reply.payload_as(U64).value
            if value:
                raise ReplyError(f"{msg.name}: back-end replied with error status {value}")

    def send_bytes(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self.conn.send_bytes(data, fds)

    def call(self, request: Request, payload: Payload) -> Message:
        """Send a request that always replies; return the decoded reply (fds closed)."""
        msg = self.message(request, payload)
        self.conn.send(msg)
        reply = self.conn.recv_reply(request, self.timeout)
        for fd in reply.fds:
            os.close(fd)
        return reply

    # --- judging hostile input -------------------------------------------------------------------

    def refused(self, steps: Sequence[Step], *, sync: bool = True) -> str | None:
        """Run ``steps``; say how the back-end refused one of them, or None if it took them all.

        A refusal is a NACK (REPLY_ACK) or a closed connection. ``sync`` ends with GET_FEATURES,
        so that a close is seen even when nothing replies; a close seen only there, after the
        last step was acked with 0 under REPLY_ACK, is reported as such (a success ack for a
        request the back-end then dropped the connection over). Raises TimeoutError (with what was
        waited for) when the back-end neither refuses nor answers.
        """
        final = Step("GET_FEATURES", self.fe.get_features, acked=False)
        if sync:
            steps = [*steps, final]
        previous: Step | None = None
        for step in steps:
            what = step.what
            try:
                step.run()
            except ReplyError as exc:
                return f"refused {what} ({exc})"
            except ConnectionClosedError:
                if step is final and previous is not None and previous.acked and self.reply_ack:
                    return f"acked {previous.what} with 0 (success), then closed the connection"
                return f"closed the connection (seen at {what})"
            except TimeoutError as exc:
                raise TimeoutError(
                    f"{what}: neither refused nor answered within {self.timeout:g} s"
                ) from exc
            except ProtocolError as exc:
                raise ProtocolError(f"{what}: wrong reply: {exc}") from exc
            previous = step
        return None
