"""The conformance and robustness checks: a table of (name, clause, needs, run).

Each ``run`` gets a fresh :class:`~pyvhost.check.session.Session` and returns an Outcome; an
exception it lets out (a NACK, a timeout, a wrong reply, a closed connection) is a failure with
that exception as the detail. Clauses are section names of QEMU's ``docs/interop/vhost-user.rst``
("Section / subsection or request"). Hostile checks pass when the back-end refuses the input
clearly (a NACK when REPLY_ACK is negotiated, or closing the connection); whether it survived is
judged afterwards, on another connection, by the runner.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from pyvhost.check.session import (
    RING_SIZE,
    GuestRam,
    Offer,
    Outcome,
    Ring,
    Session,
    Step,
    failed,
    not_applicable,
    passed,
)
from pyvhost.errors import ConnectionClosedError, ProtocolError
from pyvhost.user.messages import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    HEADER_SIZE,
    U64,
    VERSION,
    Config,
    Empty,
    MemoryTable,
    MemRegMsg,
    Message,
    Payload,
    ProtocolFeature,
    Request,
    VringState,
    encode_header,
)
from pyvhost.virtio import features as vf

__all__ = ["CHECKS", "Check", "Need"]

PF = ProtocolFeature


def _msg_type(request: str) -> str:
    return f"Front-end message types / VHOST_USER_{request}"


@dataclass(frozen=True)
class Need:
    """A feature a check needs the back-end to offer: a virtio feature bit or a protocol feature."""

    name: str
    bit: int
    protocol: bool

    def met(self, offer: Offer) -> bool:
        if self.protocol:
            return offer.has_protocol_feature(ProtocolFeature(self.bit))
        return offer.has_feature(self.bit)


def _pf(feature: ProtocolFeature) -> Need:
    return Need(feature.name, int(feature), protocol=True)


MQ = _pf(PF.MQ)
REPLY_ACK = _pf(PF.REPLY_ACK)
CONFIG = _pf(PF.CONFIG)
MEM_SLOTS = _pf(PF.CONFIGURE_MEM_SLOTS)
RING_PACKED = Need("VIRTIO_F_RING_PACKED", vf.F_RING_PACKED, protocol=False)


@dataclass(frozen=True)
class Check:
    """One line of the report: what is checked, the spec clause, what it needs, how it runs."""

    name: str
    clause: str
    needs: tuple[Need, ...]
    run: Callable[[Session], Outcome]
    summary: str


# --- negotiation -------------------------------------------------------------------------------


def protocol_features_bit(s: Session) -> Outcome:
    """GET_PROTOCOL_FEATURES is answered before SET_FEATURES exactly when bit 30 is offered."""
    features = s.fe.get_features()
    if features >> F_PROTOCOL_FEATURES & 1:
        value = s.fe.get_protocol_features()
        return passed(
            f"bit 30 offered; GET_PROTOCOL_FEATURES answered {value:#x} before SET_FEATURES"
        )
    try:
        reply = s.call(Request.GET_PROTOCOL_FEATURES, Empty())
    except (ConnectionClosedError, TimeoutError, ProtocolError) as exc:
        return passed(f"bit 30 not offered, and GET_PROTOCOL_FEATURES is not answered ({exc})")
    return failed(
        f"GET_FEATURES {features:#x} lacks bit 30 (VHOST_USER_F_PROTOCOL_FEATURES) but "
        f"GET_PROTOCOL_FEATURES is answered ({reply.describe()})"
    )


def set_features(s: Session) -> Outcome:
    s.negotiate()
    offered = s.fe.offered_features or 0
    s.fe.set_features(offered)
    again = s.fe.get_features()
    if again != offered:
        return failed(f"GET_FEATURES changed from {offered:#x} to {again:#x} after SET_FEATURES")
    how = "acked 0 (REPLY_ACK)" if s.reply_ack else "accepted; GET_FEATURES still answered"
    return passed(f"SET_FEATURES {offered:#x} (every offered bit) {how}")


def queue_num(s: Session) -> Outcome:
    n = s.negotiate().queue_num
    if n is None or n < 1:
        return failed(f"GET_QUEUE_NUM answered {n}")
    return passed(f"GET_QUEUE_NUM answered {n}")


def max_mem_slots(s: Session) -> Outcome:
    n = s.negotiate().max_mem_slots
    if n is None or n < 1:
        return failed(f"GET_MAX_MEM_SLOTS answered {n}")
    return passed(f"GET_MAX_MEM_SLOTS answered {n}")


def _exchange(s: Session, what: str, request: Request) -> Payload:
    """Send ``request`` with NEED_REPLY set; decode its one reply (flags, code, size checked)."""
    s.conn.send(Message(request, VERSION | FLAG_NEED_REPLY, Empty()))
    try:
        return s.conn.recv_reply(request, s.timeout).payload
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc}") from exc


def reply_ack(s: Session) -> Outcome:
    """One u64 ack for a request without a reply; one reply, no extra ack, for one with a reply."""
    s.negotiate(set_owner=False)
    ack = _exchange(s, "SET_OWNER with NEED_REPLY", Request.SET_OWNER)
    if not isinstance(ack, U64) or ack.value != 0:
        return failed(f"SET_OWNER with NEED_REPLY: expected a u64 0, got {ack.describe()}")
    features = _exchange(s, "GET_FEATURES with NEED_REPLY", Request.GET_FEATURES)
    offered = s.fe.offered_features
    if not isinstance(features, U64) or features.value != offered:
        return failed(
            f"GET_FEATURES with NEED_REPLY answered {features.describe()}, not the features "
            f"{offered:#x} (an ack instead of the reply?)"
        )
    try:
        s.call(Request.GET_PROTOCOL_FEATURES, Empty())
    except ProtocolError as exc:
        return failed(f"a second reply came where GET_PROTOCOL_FEATURES's was due: {exc}")
    return passed(
        "SET_OWNER with NEED_REPLY: one u64 0 with the reply flag; GET_FEATURES with NEED_REPLY: "
        "its reply only, no extra ack"
    )


def get_config(s: Session) -> Outcome:
    """Each answer is exactly the size asked, or empty (the spec's error form)."""
    s.negotiate()
    seen = []
    for size in (8, 256):
        reply = s.call(Request.GET_CONFIG, Config(0, 0, bytes(size))).payload
        if isinstance(reply, Empty):
            seen.append(f"{size}: refused (empty reply)")
            continue
        if not isinstance(reply, Config) or reply.offset != 0 or len(reply.data) != size:
            return failed(f"GET_CONFIG of {size} bytes at offset 0 answered {reply.describe()}")
        seen.append(f"{size}: {size} bytes")
    return passed("GET_CONFIG sizes asked -> answered: " + ", ".join(seen))


# --- memory and rings --------------------------------------------------------------------------

SPLIT_BASE = 42
PACKED_BASE = 0x8005_8005
"""Avail index 5, avail wrap counter 1, used index 5, used wrap counter 1 (nothing in flight)."""


def _round_trip(s: Session, ram: GuestRam, ring: Ring, steps: list[Step]) -> Outcome:
    """Run ``steps`` (memory), start the ring, kick it, stop it: the base must come back."""
    ring_steps, kick = s.ring_steps(ram, ring)
    for step in [*steps, *ring_steps]:
        step.run()
    s.kick(kick)
    got = s.fe.get_vring_base(0)
    if s.err_signalled():
        return failed("the vring error eventfd was signalled for an empty ring")
    if got != ring.base:
        return failed(
            f"GET_VRING_BASE returned {got:#x}; SET_VRING_BASE set {ring.base:#x} and the ring had "
            "nothing to process"
        )
    names = ", ".join(step.what for step in steps)
    return passed(
        f"{names}; ring of {RING_SIZE} started at base {ring.base:#x}, kicked, stopped: "
        f"GET_VRING_BASE {got:#x}"
    )


def _split_ring(ram: GuestRam, gpa: int) -> Ring:
    """An empty split ring at ``gpa``: avail and used index both at SPLIT_BASE."""
    ring = Ring.at(gpa, SPLIT_BASE)
    ram.write_u16(ring.driver + 2, SPLIT_BASE)
    ram.write_u16(ring.device + 2, SPLIT_BASE)
    return ring


def mem_table(s: Session) -> Outcome:
    s.negotiate(without=1 << PF.CONFIGURE_MEM_SLOTS)
    s.ack_ring_features()
    low, high = s.ram(0), s.ram(1 << 20)
    steps = s.memory_steps([(low.region, low.fd), (high.region, high.fd)])
    return _round_trip(s, high, _split_ring(high, 1 << 20), steps)


def add_mem_reg(s: Session) -> Outcome:
    s.negotiate()
    s.ack_ring_features()
    low, high = s.ram(0), s.ram(1 << 20)
    steps = s.memory_steps([(low.region, low.fd), (high.region, high.fd)])
    outcome = _round_trip(s, high, _split_ring(high, 1 << 20), steps)
    if outcome.result != "pass":
        return outcome
    s.fe.rem_mem_reg(low.region)
    s.fe.get_features()
    return passed(outcome.detail + "; REM_MEM_REG of the other region accepted")


def split_ring(s: Session) -> Outcome:
    s.negotiate()
    s.ack_ring_features()
    ram = s.ram(0)
    return _round_trip(s, ram, _split_ring(ram, 0), s.memory_steps([(ram.region, ram.fd)]))


def packed_ring(s: Session) -> Outcome:
    s.negotiate()
    features = s.ack_ring_features(packed=True)
    if not features >> vf.F_RING_PACKED & 1:
        return not_applicable("RING_PACKED not acknowledged")
    ram = s.ram(0)
    ring = Ring.at(0, PACKED_BASE)
    return _round_trip(s, ram, ring, s.memory_steps([(ram.region, ram.fd)]))


# --- hostile input -----------------------------------------------------------------------------


def _judge(s: Session, steps: list[Step], accepted: str) -> Outcome:
    """Pass when a step is refused (NACK or close); fail with ``accepted`` when none is."""
    how = s.refused(steps)
    if how is not None:
        return passed(how)
    return failed(accepted)


GARBAGE = b"\xde\xad\xbe\xef" * 8
"""A header with version 2, reserved flag bits, an unknown request and a 4 GB size."""


def garbage_header(s: Session) -> Outcome:
    s.negotiate()
    return _judge(
        s,
        [Step("a garbage header", lambda: s.send_bytes(GARBAGE), acked=False)],
        "answered GET_FEATURES after a garbage header as if nothing had happened",
    )


def truncated_header(s: Session) -> Outcome:
    """Five bytes of a header, then EOF: the back-end must give up on the connection."""
    s.negotiate()
    s.send_bytes(encode_header(Request.GET_FEATURES, VERSION, 0)[:5])
    s.conn.socket.shutdown(socket.SHUT_WR)
    try:
        frame = s.conn.recv_frame(s.timeout)
    except ConnectionClosedError:
        return passed("closed the connection after EOF 5 bytes into a header")
    except TimeoutError:
        return failed(f"kept the connection open {s.timeout:g} s after EOF 5 bytes into a header")
    return failed(f"answered a 5-byte header: request {frame.header.request}")


OVERSIZE = 1 << 20


def oversize_payload(s: Session) -> Outcome:
    s.negotiate()
    data = encode_header(Request.SET_MEM_TABLE, VERSION, OVERSIZE) + bytes(64)
    return _judge(
        s,
        [Step(f"SET_MEM_TABLE with size {OVERSIZE:#x}", lambda: s.send_bytes(data), acked=False)],
        f"accepted a payload size of {OVERSIZE:#x} bytes",
    )


def kick_without_fd(s: Session) -> Outcome:
    s.negotiate()
    msg = s.message(Request.SET_VRING_KICK, U64(0))
    return _judge(
        s,
        [Step("SET_VRING_KICK without NOFD and without fd", lambda: s.send_raw(msg))],
        "accepted SET_VRING_KICK for vring 0 without the NOFD bit (bit 8) and without an fd",
    )


def _one_region(s: Session) -> GuestRam:
    s.negotiate(without=1 << PF.CONFIGURE_MEM_SLOTS)
    return s.ram(0)


def mem_table_missing_fd(s: Session) -> Outcome:
    ram = _one_region(s)
    msg = s.message(Request.SET_MEM_TABLE, MemoryTable((ram.region,)))
    return _judge(
        s,
        [Step("SET_MEM_TABLE with 1 region and 0 fds", lambda: s.send_raw(msg))],
        "accepted SET_MEM_TABLE with 1 region and no fd",
    )


def mem_table_extra_fds(s: Session) -> Outcome:
    ram = _one_region(s)
    msg = s.message(Request.SET_MEM_TABLE, MemoryTable((ram.region,)), [ram.fd] * 3)
    return _judge(
        s,
        [Step("SET_MEM_TABLE with 1 region and 3 fds", lambda: s.send_raw(msg))],
        "accepted SET_MEM_TABLE with 1 region and 3 fds",
    )


def add_mem_reg_without_fd(s: Session) -> Outcome:
    s.negotiate()
    ram = s.ram(0)
    msg = s.message(Request.ADD_MEM_REG, MemRegMsg(ram.region))
    return _judge(
        s,
        [Step("ADD_MEM_REG without fd", lambda: s.send_raw(msg))],
        "accepted ADD_MEM_REG without an fd",
    )


OUT_OF_RANGE = 200


def vring_index(s: Session) -> Outcome:
    queues = s.negotiate().queue_num
    index = max(OUT_OF_RANGE, queues or 0)
    msg = s.message(Request.SET_VRING_NUM, VringState(index, RING_SIZE))
    known = f"GET_QUEUE_NUM said {queues}" if queues is not None else "no MQ"
    return _judge(
        s,
        [Step(f"SET_VRING_NUM for vring {index}", lambda: s.send_raw(msg))],
        f"accepted SET_VRING_NUM for vring {index} ({known})",
    )


def mem_fd_unmappable(s: Session) -> Outcome:
    s.negotiate()
    r, w = os.pipe()
    try:
        region = s.ram(0).region
        steps = s.memory_steps([(region, r)])
        return _judge(s, steps, "accepted a pipe as the fd of a 1 MiB memory region")
    finally:
        os.close(r)
        os.close(w)


def _ring_judge(
    s: Session, ram: GuestRam, ring: Ring, steps: list[Step], accepted: str, *, outside: int = 0
) -> Outcome:
    """Memory ``steps``, then start, kick and stop a ring: a refusal anywhere, or the vring error
    eventfd, is a clear rejection."""
    ring_steps, kick = s.ring_steps(ram, ring, outside=outside)
    tail = [
        Step("the kick", lambda: s.kick(kick), acked=False),
        Step("GET_VRING_BASE", lambda: s.fe.get_vring_base(0), acked=False),
    ]
    how = s.refused([*steps, *ring_steps, *tail])
    if how is not None:
        return passed(how)
    if s.err_signalled():
        return passed("signalled the vring error eventfd")
    return failed(accepted)


OUTSIDE = 16 << 20
"""How far past the region the ring of vring-addr-outside-memory lies."""


def mem_fd_too_small(s: Session) -> Outcome:
    s.negotiate()
    s.ack_ring_features()
    ram = s.ram(0, fd_size=0x1000)
    steps = s.memory_steps([(ram.region, ram.fd)])
    return _ring_judge(
        s,
        ram,
        Ring.at(0x10000, 0),
        steps,
        "accepted a 1 MiB region whose fd holds 4 KiB and started a ring past the end of the fd",
    )


def mem_overlap(s: Session) -> Outcome:
    s.negotiate()
    a = s.ram(0)
    b = s.ram(0x80000, uva=a.region.userspace_addr + (256 << 20))
    steps = s.memory_steps([(a.region, a.fd), (b.region, b.fd)])
    return _judge(
        s,
        steps,
        "accepted two regions overlapping in guest physical addresses (0x80000..0x100000)",
    )


def vring_addr_outside(s: Session) -> Outcome:
    s.negotiate()
    s.ack_ring_features()
    ram = s.ram(0)
    steps = s.memory_steps([(ram.region, ram.fd)])
    return _ring_judge(
        s,
        ram,
        Ring.at(0, 0),
        steps,
        "accepted ring addresses 16 MiB past the only memory region, started and stopped the ring",
        outside=OUTSIDE,
    )


def vanish_mid_message(s: Session) -> Outcome:
    s.negotiate()
    partial = encode_header(Request.SET_VRING_ADDR, VERSION, 40) + bytes(10)
    s.send_bytes(partial)
    s.conn.close()
    return passed(f"sent {len(partial)} of the {HEADER_SIZE + 40} bytes of SET_VRING_ADDR, hung up")


CHECKS: tuple[Check, ...] = (
    Check(
        "protocol-features-bit",
        _msg_type("GET_PROTOCOL_FEATURES"),
        (),
        protocol_features_bit,
        "GET_PROTOCOL_FEATURES answered (before SET_FEATURES) exactly when bit 30 is offered",
    ),
    Check(
        "set-features",
        _msg_type("SET_FEATURES"),
        (),
        set_features,
        "SET_FEATURES of every offered bit is accepted",
    ),
    Check("queue-num", "Multiple queue support", (MQ,), queue_num, "GET_QUEUE_NUM >= 1"),
    Check(
        "max-mem-slots",
        _msg_type("GET_MAX_MEM_SLOTS"),
        (MEM_SLOTS,),
        max_mem_slots,
        "GET_MAX_MEM_SLOTS >= 1",
    ),
    Check(
        "reply-ack",
        "VHOST_USER_PROTOCOL_F_REPLY_ACK",
        (REPLY_ACK,),
        reply_ack,
        "NEED_REPLY gets exactly one u64 reply with the request code and the reply flag",
    ),
    Check(
        "get-config",
        _msg_type("GET_CONFIG"),
        (CONFIG,),
        get_config,
        "GET_CONFIG answers exactly the size asked, or empty (error)",
    ),
    Check(
        "mem-table",
        _msg_type("SET_MEM_TABLE"),
        (),
        mem_table,
        "SET_MEM_TABLE of two memfd regions; a ring in the second one works",
    ),
    Check(
        "add-mem-reg",
        _msg_type("ADD_MEM_REG"),
        (MEM_SLOTS,),
        add_mem_reg,
        "ADD_MEM_REG of two memfd regions; a ring in the second one works; REM_MEM_REG",
    ),
    Check(
        "split-ring-base",
        "Ring states",
        (),
        split_ring,
        f"ring of {RING_SIZE} set up, kicked, stopped: GET_VRING_BASE returns the base set",
    ),
    Check(
        "packed-ring-base",
        "Payload / Vring descriptor indices for packed virtqueues",
        (RING_PACKED,),
        packed_ring,
        "packed ring: SET_VRING_BASE / GET_VRING_BASE round trip of indices and wrap counters",
    ),
    Check(
        "garbage-header",
        "Message Specification / Header",
        (),
        garbage_header,
        "a header with a wrong version and reserved flags is refused",
    ),
    Check(
        "truncated-header",
        "Message Specification / Header",
        (),
        truncated_header,
        "EOF in the middle of a header closes the connection",
    ),
    Check(
        "oversize-payload",
        "Message Specification / Payload",
        (),
        oversize_payload,
        f"a payload size of {OVERSIZE:#x} is refused",
    ),
    Check(
        "kick-without-fd",
        _msg_type("SET_VRING_KICK"),
        (),
        kick_without_fd,
        "no fd without the NOFD bit is refused",
    ),
    Check(
        "mem-table-missing-fd",
        _msg_type("SET_MEM_TABLE"),
        (),
        mem_table_missing_fd,
        "fewer fds than regions is refused",
    ),
    Check(
        "mem-table-extra-fds",
        _msg_type("SET_MEM_TABLE"),
        (),
        mem_table_extra_fds,
        "more fds than regions is refused",
    ),
    Check(
        "add-mem-reg-without-fd",
        _msg_type("ADD_MEM_REG"),
        (MEM_SLOTS,),
        add_mem_reg_without_fd,
        "ADD_MEM_REG without its one fd is refused",
    ),
    Check(
        "vring-index-out-of-range",
        "Multiple queue support",
        (),
        vring_index,
        f"a vring index >= {OUT_OF_RANGE} (and the queue count) is refused",
    ),
    Check(
        "mem-fd-unmappable",
        "Memory access",
        (),
        mem_fd_unmappable,
        "a region whose fd cannot be mapped (a pipe) is refused",
    ),
    Check(
        "mem-fd-too-small",
        "Memory access",
        (),
        mem_fd_too_small,
        "a region larger than its fd is refused (at the latest when a ring there starts)",
    ),
    Check(
        "mem-overlap",
        "Memory access",
        (),
        mem_overlap,
        "regions overlapping in guest physical addresses are refused",
    ),
    Check(
        "vring-addr-outside-memory",
        "Memory access",
        (),
        vring_addr_outside,
        "ring addresses outside every region are refused (at the latest when the ring starts)",
    ),
    Check(
        "vanish-mid-message",
        "Communication",
        (),
        vanish_mid_message,
        "the front-end hangs up in the middle of a payload",
    ),
)
