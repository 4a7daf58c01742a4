"""The vhost-user front-end: one typed method per front-end request, plus QEMU-style helpers.

:class:`Frontend` remembers what was negotiated and gates each request on it the way the spec
says ("only legal if ..."), raising UnsupportedRequestError before anything is sent. Replies are
checked (flags, request number, size) under a timeout; a wrong reply, a timeout or a lost peer
closes the Frontend, as the spec requires of a front-end that "receives a wrong reply".
Fds passed to any method stay owned by the caller; fds returned are owned by the caller.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

from pyvhost.closing import Closing
from pyvhost.control import RingAddresses, region_for
from pyvhost.errors import (
    ConnectionClosedError,
    ProtocolError,
    ReplyError,
    UnsupportedRequestError,
)
from pyvhost.user.channel import BackendRequestHandler
from pyvhost.user.connection import Connection, Listener, connect
from pyvhost.user.messages import (
    DEVICE_STATE_NOFD,
    F_PROTOCOL_FEATURES,
    MAX_MEMORY_REGIONS,
    U64,
    VRING_INDEX_MASK,
    VRING_NOFD,
    Config,
    DeviceStateTransfer,
    Empty,
    Header,
    Inflight,
    IotlbMsg,
    Log,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    Message,
    Negotiation,
    Payload,
    ProtocolFeature,
    RawPayload,
    Request,
    SharedObject,
    ShmemConfig,
    VringAddr,
    VringState,
    close_fds,
    decode_reply,
    encode_request,
    gate_refusal,
    replies_expected,
    spec_for,
)
from pyvhost.user.protocol import FRONTEND_PROTOCOL_FEATURES, VRING_F_LOG
from pyvhost.virtio.features import has_bit as _bit
from pyvhost.virtio.memory import DirtyLog, GuestMemory

__all__ = [
    "DEFAULT_REPLY_TIMEOUT",
    "Frontend",
    "NegotiationResult",
    "decode_log_base_reply",
]

log = logging.getLogger(__name__)

PF = ProtocolFeature

DEFAULT_REPLY_TIMEOUT = 10.0
"""Seconds to wait for a reply; some back-ends take over a second to map guest memory."""

_ALL_FEATURES = (1 << 64) - 1


_LOG_BASE_REPLIES = (
    "8 (u64 status, as the spec says), 0 (empty, as DPDK replies) "
    "or 16 (the log area echoed, as rust-vmm replies)"
)


def decode_log_base_reply(header: Header, payload: bytes, fds: list[int]) -> Message:
    """Decode a SET_LOG_BASE reply in any of the forms real back-ends send.

    The spec wants a u64 status; DPDK's vhost library replies with an empty payload and rust-vmm
    echoes the request's log area (16 bytes). QEMU takes all three as success, and so do we: the
    Message carries ``U64``, ``Empty`` or ``Log``. Flags, request number and fds are checked by
    the codec as for a u64 ack; any other size raises ProtocolError. Fds as in decode_reply.
    """
    size = len(payload)
    if size == 8 or size != header.size:
        return decode_reply(Request.SET_LOG_BASE, header, payload, fds)
    if size not in (0, 16):
        close_fds(fds)
        raise ProtocolError(
            f"reply size {size} is wrong (expected {_LOG_BASE_REPLIES})",
            request=Request.SET_LOG_BASE.name,
            field="size",
        )
    # The codec's header and fd checks, on a u64 in place of the payload it would refuse.
    stand_in = Header(header.request, header.flags, 8)
    checked = decode_reply(Request.SET_LOG_BASE, stand_in, bytes(8), fds)
    body: Payload = Empty() if size == 0 else Log.decode(payload, request="SET_LOG_BASE")
    return Message(checked.request, checked.flags, body, checked.fds)


def _check_index(request: Request, index: int) -> None:
    if not 0 <= index <= VRING_INDEX_MASK:
        raise ValueError(f"{request.name}: vring index {index} is not in 0..{VRING_INDEX_MASK}")


@dataclass(frozen=True)
class NegotiationResult:
    """What :meth:`Frontend.negotiate` learned and agreed.

    ``features`` is the virtio feature set to acknowledge later with set_features (offered &
    mask, plus PROTOCOL_FEATURES when offered); it is not sent by negotiate().
    """

    offered_features: int
    features: int
    offered_protocol_features: int
    protocol_features: int
    queue_num: int | None
    max_mem_slots: int | None
    backend_handler: BackendRequestHandler | None


class Frontend(Closing):
    """A vhost-user front-end on one connection; owns the connection.

    ``check_features=False`` turns the feature gates off (to test how a back-end copes with
    requests it should never get); reply checks stay on. Thread-safe: one request and its
    reply at a time.
    """

    def __init__(
        self,
        conn: Connection,
        *,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
        check_features: bool = True,
    ) -> None:
        self.conn = conn
        self.reply_timeout = reply_timeout
        self.check_features = check_features
        self.offered_features: int | None = None
        """Virtio features from the last GET_FEATURES (None before the first)."""
        self.features = 0
        """Virtio features last acknowledged with SET_FEATURES."""
        self.offered_protocol_features: int | None = None
        """Protocol features from the last GET_PROTOCOL_FEATURES."""
        self.protocol_features = 0
        """Protocol features last set with SET_PROTOCOL_FEATURES (the negotiated set)."""
        self.max_mem_slots: int | None = None
        self.backend_handler: BackendRequestHandler | None = None
        self.postcopy_listening = False
        self.memory: GuestMemory | None = None
        """The guest memory given to :meth:`set_memory` (ring addresses are translated in it)."""
        self._lock = threading.RLock()
        self._closed = False
        self._close_reason: str | None = None

    # --- construction and lifetime ---------------------------------------------------------

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        deadline: float = 10.0,
        *,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
        check_features: bool = True,
    ) -> Self:
        """Connect to a back-end listening at ``path`` (retrying up to ``deadline`` s)."""
        conn = connect(path, deadline=deadline)
        return cls(conn, reply_timeout=reply_timeout, check_features=check_features)

    @classmethod
    def accept(
        cls,
        listener: Listener,
        timeout: float | None = None,
        *,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
        check_features: bool = True,
    ) -> Self:
        """Wait for a back-end to connect to ``listener`` (back-end in client mode)."""
        conn = listener.accept(timeout)
        return cls(conn, reply_timeout=reply_timeout, check_features=check_features)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Hang up: close the connection and stop the back-end request handler, if any."""
        self._closed = True
        if self._close_reason is None:
            self._close_reason = "closed by the caller"
        self.conn.close()
        handler, self.backend_handler = self.backend_handler, None
        if handler is not None:
            handler.close()

    # --- gates -----------------------------------------------------------------------------

    @property
    def reply_ack(self) -> bool:
        """Whether REPLY_ACK was negotiated (requests without a reply get NEED_REPLY)."""
        return _bit(self.protocol_features, PF.REPLY_ACK)

    def has_protocol_feature(self, feature: ProtocolFeature) -> bool:
        """Whether ``feature`` was negotiated with SET_PROTOCOL_FEATURES."""
        return _bit(self.protocol_features, feature)

    @property
    def negotiation(self) -> Negotiation:
        """What was offered and acked so far: the input of the request gates."""
        return Negotiation(self.offered_features, self.features, self.protocol_features)

    def _check_gate(self, request: Request) -> None:
        """Refuse ``request`` before sending it unless its gate in the request table allows it."""
        if not self.check_features:
            return
        refusal = gate_refusal(request, self.negotiation)
        if refusal is not None:
            raise UnsupportedRequestError(f"{request.name}: {refusal}")

    # --- request machinery -----------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        self._close_reason = reason
        self.close()

    def _call(
        self,
        request: Request,
        payload: Payload | None = None,
        *,
        fds: Sequence[int] = (),
        ack: bool = True,
    ) -> Message | None:
        """Send ``request``; return its reply when one comes (ack replies are checked here).

        ``ack=False`` never sets NEED_REPLY (postcopy memory table updates).
        """
        self._check_gate(request)
        spec = spec_for(request)
        need_reply = ack and self.reply_ack and not spec.replies(self.protocol_features)
        msg = encode_request(request, payload, need_reply=need_reply, fds=fds)
        with self._lock:
            if self._closed:
                raise ConnectionClosedError(
                    f"{request.name}: the front-end is closed ({self._close_reason})"
                )
            try:
                self.conn.send(msg)
                if not replies_expected(msg, self.protocol_features):
                    return None
                reply = self._recv_reply(request)
            except TimeoutError as exc:
                self._fail(f"{request.name} timed out")
                raise TimeoutError(
                    f"{request.name}: no reply from the back-end within {self.reply_timeout:g} s"
                ) from exc
            except ProtocolError as exc:
                self._fail(f"wrong reply to {request.name}: {exc}")
                raise
            except (ConnectionClosedError, OSError) as exc:
                self._fail(f"{request.name}: {exc}")
                raise ConnectionClosedError(f"{request.name}: {exc}") from exc
        if need_reply or request is Request.SET_LOG_BASE:
            self._check_ack(request, reply)
        return reply

    def _recv_reply(self, request: Request) -> Message:
        if request is Request.SET_LOG_BASE:
            frame = self.conn.recv_frame(self.reply_timeout)
            return decode_log_base_reply(frame.header, frame.payload, frame.fds)
        return self.conn.recv_reply(request, self.reply_timeout)

    def _check_ack(self, request: Request, reply: Message) -> None:
        close_fds(reply.fds)
        if request is Request.SET_LOG_BASE and isinstance(reply.payload, Empty | Log):
            return  # DPDK's and rust-vmm's success replies (see decode_log_base_reply)
        if not isinstance(reply.payload, U64):
            self._fail(f"wrong reply to {request.name}")
            raise ProtocolError(
                f"expected a u64 ack, got a {type(reply.payload).__name__} payload",
                request=request.name,
                field="payload",
            )
        if reply.payload.value != 0:
            raise ReplyError(
                f"{request.name}: back-end replied with error status {reply.payload.value}"
            )

    def _reply(
        self, request: Request, payload: Payload | None = None, *, fds: Sequence[int] = ()
    ) -> Message:
        reply = self._call(request, payload, fds=fds)
        assert reply is not None, f"{request.name} always replies"
        return reply

    def _wrong(self, request: Request, field: str, message: str, fds: list[int]) -> ProtocolError:
        close_fds(fds)
        self._fail(f"wrong reply to {request.name}: {message}")
        return ProtocolError(message, request=request.name, field=field)

    def _get_u64(self, request: Request) -> int:
        reply = self._reply(request)
        close_fds(reply.fds)
        return reply.payload_as(U64).value

    # --- features --------------------------------------------------------------------------

    def get_features(self) -> int:
        """GET_FEATURES: the virtio features the back-end offers (bit 30: protocol features)."""
        self.offered_features = self._get_u64(Request.GET_FEATURES)
        return self.offered_features

    def set_features(self, features: int) -> None:
        """SET_FEATURES: acknowledge ``features`` (must be offered, when checks are on)."""
        self._check_offered(Request.SET_FEATURES, "features", features, self.offered_features)
        self._call(Request.SET_FEATURES, U64(features))
        self.features = features

    def _check_offered(
        self, request: Request, what: str, features: int, offered: int | None
    ) -> None:
        """Refuse to acknowledge bits the back-end did not offer (when checks are on)."""
        if not self.check_features or offered is None:
            return
        extra = features & ~offered
        if extra:
            raise UnsupportedRequestError(
                f"{request.name}: {what} {extra:#x} were not offered by the back-end ({offered:#x})"
            )

    def get_protocol_features(self) -> int:
        """GET_PROTOCOL_FEATURES (only legal if GET_FEATURES offered bit 30)."""
        self.offered_protocol_features = self._get_u64(Request.GET_PROTOCOL_FEATURES)
        return self.offered_protocol_features

    def set_protocol_features(self, features: int) -> None:
        """SET_PROTOCOL_FEATURES: enable ``features`` (must be offered, when checks are on)."""
        self._check_offered(
            Request.SET_PROTOCOL_FEATURES,
            "protocol features",
            features,
            self.offered_protocol_features,
        )
        self._call(Request.SET_PROTOCOL_FEATURES, U64(features))
        self.protocol_features = features

    # --- session ---------------------------------------------------------------------------

    def set_owner(self) -> None:
        """SET_OWNER: mark this connection as the session's owner."""
        self._call(Request.SET_OWNER)

    def reset_owner(self) -> None:
        """RESET_OWNER (deprecated; back-ends ignore it or disable all rings)."""
        self._call(Request.RESET_OWNER)

    def reset_device(self) -> None:
        """RESET_DEVICE: back to the initial state, ownership kept (needs RESET_DEVICE)."""
        self._call(Request.RESET_DEVICE)

    def get_queue_num(self) -> int:
        """GET_QUEUE_NUM: how many queues the back-end supports (needs MQ)."""
        return self._get_u64(Request.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        """GET_MAX_MEM_SLOTS (needs CONFIGURE_MEM_SLOTS)."""
        self.max_mem_slots = self._get_u64(Request.GET_MAX_MEM_SLOTS)
        return self.max_mem_slots

    def set_status(self, status: int) -> None:
        """SET_STATUS: the virtio device status byte (needs STATUS)."""
        self._call(Request.SET_STATUS, U64(status))

    def get_status(self) -> int:
        """GET_STATUS (needs STATUS)."""
        return self._get_u64(Request.GET_STATUS)

    # --- memory ----------------------------------------------------------------------------

    def set_mem_table(
        self, regions: Sequence[tuple[MemoryRegion, int]]
    ) -> tuple[MemoryRegion, ...] | None:
        """SET_MEM_TABLE: replace the whole memory table (one fd per region).

        After postcopy_listen() the back-end answers with its mapping bases, which are returned
        once this front-end has sent the acknowledgement the spec describes.
        """
        table = MemoryTable(tuple(r for r, _ in regions))
        fds = [fd for _, fd in regions]
        if not self.postcopy_listening:
            self._call(Request.SET_MEM_TABLE, table, fds=fds)
            return None
        with self._lock:
            reply = self._postcopy_exchange(Request.SET_MEM_TABLE, table, fds)
            close_fds(reply.fds)
            if not isinstance(reply.payload, MemoryTable):
                raise self._wrong(
                    Request.SET_MEM_TABLE, "size", "postcopy reply is not a memory table", []
                )
            bases = reply.payload.regions
            if len(bases) != len(table.regions):
                raise self._wrong(
                    Request.SET_MEM_TABLE,
                    "nregions",
                    f"postcopy reply has {len(bases)} regions, sent {len(table.regions)}",
                    [],
                )
            self._call(Request.SET_MEM_TABLE, MemoryTable(()), ack=False)
        return bases

    def _postcopy_exchange(self, request: Request, payload: Payload, fds: list[int]) -> Message:
        msg = encode_request(request, payload, fds=fds)
        try:
            self.conn.send(msg)
            return self.conn.recv_reply(request, self.reply_timeout)
        except (ProtocolError, ConnectionClosedError, TimeoutError, OSError) as exc:
            self._fail(f"postcopy {request.name}: {exc}")
            raise

    def add_mem_reg(self, region: MemoryRegion, fd: int) -> MemoryRegion | None:
        """ADD_MEM_REG: add one region (needs CONFIGURE_MEM_SLOTS); in postcopy mode returns
        the back-end's mapping base for it."""
        if not self.postcopy_listening:
            self._call(Request.ADD_MEM_REG, MemRegMsg(region), fds=[fd])
            return None
        with self._lock:
            reply = self._postcopy_exchange(Request.ADD_MEM_REG, MemRegMsg(region), [fd])
        close_fds(reply.fds)
        if not isinstance(reply.payload, MemRegMsg):
            raise self._wrong(Request.ADD_MEM_REG, "size", "postcopy reply is not a region", [])
        return reply.payload.region

    def rem_mem_reg(self, region: MemoryRegion) -> None:
        """REM_MEM_REG: remove the region with this guest address, user address and size."""
        self._call(Request.REM_MEM_REG, MemRegMsg(region))

    def set_log_base(self, size: int, offset: int, fd: int | None) -> None:
        """SET_LOG_BASE: the dirty log is ``size`` bytes at ``offset`` in ``fd`` (LOG_SHMFD).

        The reply may be a u64 status, empty or the log area echoed (decode_log_base_reply).
        """
        self._call(Request.SET_LOG_BASE, Log(size, offset), fds=[] if fd is None else [fd])

    def set_log_fd(self, fd: int) -> None:
        """SET_LOG_FD: an eventfd the back-end may signal after updating the log."""
        self._call(Request.SET_LOG_FD, fds=[fd])

    # --- vrings ----------------------------------------------------------------------------

    def set_vring_num(self, index: int, num: int) -> None:
        """SET_VRING_NUM: the size of vring ``index``."""
        _check_index(Request.SET_VRING_NUM, index)
        self._call(Request.SET_VRING_NUM, VringState(index, num))

    def set_vring_addr(self, addr: VringAddr) -> None:
        """SET_VRING_ADDR: ring addresses (user addresses, or IOVAs with ACCESS_PLATFORM)."""
        _check_index(Request.SET_VRING_ADDR, addr.index)
        self._call(Request.SET_VRING_ADDR, addr)

    def set_vring_base(self, index: int, base: int) -> None:
        """SET_VRING_BASE: the next avail index (split) or the packed indices and wrap bits."""
        _check_index(Request.SET_VRING_BASE, index)
        self._call(Request.SET_VRING_BASE, VringState(index, base))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stop vring ``index``; returns its next avail index (or indices)."""
        _check_index(Request.GET_VRING_BASE, index)
        reply = self._reply(Request.GET_VRING_BASE, VringState(index, 0))
        state = reply.payload_as(VringState)
        if state.index != index:
            raise self._wrong(
                Request.GET_VRING_BASE,
                "index",
                f"reply is for vring {state.index}, asked {index}",
                [],
            )
        return state.num

    def _vring_fd(self, request: Request, index: int, fd: int | None) -> None:
        _check_index(request, index)
        value = index if fd is not None else index | VRING_NOFD
        self._call(request, U64(value), fds=[] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """SET_VRING_KICK: the eventfd the driver kicks; None means poll (NOFD bit)."""
        self._vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """SET_VRING_CALL: the eventfd the back-end signals; None means no notification."""
        self._vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """SET_VRING_ERR: the eventfd the back-end signals on a vring error."""
        self._vring_fd(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """SET_VRING_ENABLE (only legal if bit 30 was offered)."""
        _check_index(Request.SET_VRING_ENABLE, index)
        self._call(Request.SET_VRING_ENABLE, VringState(index, int(enable)))

    def set_vring_endian(self, index: int, big: bool) -> None:
        """SET_VRING_ENDIAN for legacy devices (needs CROSS_ENDIAN)."""
        _check_index(Request.SET_VRING_ENDIAN, index)
        self._call(Request.SET_VRING_ENDIAN, VringState(index, int(big)))

    def vring_kick(self, index: int) -> None:
        """VRING_KICK: in-band kick (needs INBAND_NOTIFICATIONS)."""
        _check_index(Request.VRING_KICK, index)
        self._call(Request.VRING_KICK, VringState(index, 0))

    # --- device specific -------------------------------------------------------------------

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: announce ``mac`` (6 bytes) after migration (needs RARP)."""
        if len(mac) != 6:
            raise ValueError(f"SEND_RARP: a MAC address is 6 bytes, got {len(mac)}")
        self._call(Request.SEND_RARP, U64(int.from_bytes(bytes(mac) + b"\0\0", "little")))

    def net_set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (needs MTU)."""
        self._call(Request.NET_SET_MTU, U64(mtu))

    def iotlb_msg(self, msg: IotlbMsg) -> int:
        """IOTLB_MSG: update or invalidate a device IOTLB entry (needs ACCESS_PLATFORM acked);
        returns the back-end's status (0 success)."""
        reply = self._reply(Request.IOTLB_MSG, msg)
        return reply.payload_as(U64).value

    def get_config(self, offset: int, size: int, flags: int = 0, *, exact: bool = True) -> bytes:
        """GET_CONFIG: ``size`` bytes of config space at ``offset`` (needs CONFIG).

        An empty reply (the back-end's error signal) raises ReplyError. The spec wants the reply
        as large as the request; ``exact=False`` also accepts a shorter one (probing).
        """
        reply = self._reply(Request.GET_CONFIG, Config(offset, flags, bytes(size)))
        if isinstance(reply.payload, Empty):
            raise ReplyError(
                f"GET_CONFIG: back-end refused to read {size} bytes at offset {offset} "
                "(empty reply)"
            )
        config = reply.payload_as(Config)
        got = len(config.data)
        if config.offset != offset or got > size or (exact and got != size):
            raise self._wrong(
                Request.GET_CONFIG,
                "size",
                f"reply has offset {config.offset} size {got}, asked offset {offset} size {size}",
                [],
            )
        return config.data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        """SET_CONFIG: write ``data`` at ``offset`` (flags 1: live migration) (needs CONFIG)."""
        self._call(Request.SET_CONFIG, Config(offset, flags, bytes(data)))

    def create_crypto_session(self, raw: bytes) -> bytes:
        """CREATE_CRYPTO_SESSION: the session description in, the back-end's answer out."""
        reply = self._reply(Request.CREATE_CRYPTO_SESSION, RawPayload(bytes(raw)))
        return reply.payload_as(RawPayload).data

    def close_crypto_session(self, session_id: int) -> None:
        """CLOSE_CRYPTO_SESSION (needs CRYPTO_SESSION)."""
        self._call(Request.CLOSE_CRYPTO_SESSION, U64(session_id))

    def gpu_set_socket(self, fd: int) -> None:
        """GPU_SET_SOCKET: the vhost-user-gpu protocol socket."""
        self._call(Request.GPU_SET_SOCKET, fds=[fd])

    # --- back-end channel ------------------------------------------------------------------

    def set_backend_req_fd(
        self, handler: BackendRequestHandler | None = None
    ) -> BackendRequestHandler:
        """SET_BACKEND_REQ_FD: create a socketpair, serve one end with ``handler`` (a default
        one that answers failure to everything if None), send the other (needs BACKEND_REQ)."""
        self._check_gate(Request.SET_BACKEND_REQ_FD)
        if handler is None:
            handler = BackendRequestHandler()
        if handler.negotiation is None:
            handler.negotiation = lambda: self.negotiation
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            handler.start(Connection(ours))
        except BaseException:
            ours.close()
            theirs.close()
            raise
        try:
            self._call(Request.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
        except BaseException:
            handler.close()
            raise
        finally:
            theirs.close()
        old, self.backend_handler = self.backend_handler, handler
        if old is not None:
            old.close()
        return handler

    # --- inflight, postcopy, shared objects, device state ----------------------------------

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[Inflight, int | None]:
        """GET_INFLIGHT_FD: the back-end's inflight area and its fd (needs INFLIGHT_SHMFD).

        A back-end without inflight tracking answers mmap_size 0 and no fd: the fd is None.
        """
        reply = self._reply(Request.GET_INFLIGHT_FD, Inflight(0, 0, num_queues, queue_size))
        inflight = reply.payload_as(Inflight)
        if inflight.mmap_size == 0:
            close_fds(reply.fds)
            return inflight, None
        if len(reply.fds) != 1:
            raise self._wrong(
                Request.GET_INFLIGHT_FD,
                "fds",
                f"mmap_size {inflight.mmap_size:#x} but no fd in the reply",
                reply.fds,
            )
        return inflight, reply.fds[0]

    def set_inflight_fd(self, inflight: Inflight, fd: int) -> None:
        """SET_INFLIGHT_FD: hand a (reconnecting) back-end its inflight area back."""
        self._call(Request.SET_INFLIGHT_FD, inflight, fds=[fd])

    def postcopy_advise(self) -> int:
        """POSTCOPY_ADVISE: returns the back-end's userfaultfd (needs PAGEFAULT)."""
        reply = self._reply(Request.POSTCOPY_ADVISE)
        if len(reply.fds) != 1:
            raise ReplyError("POSTCOPY_ADVISE: back-end replied without a userfaultfd")
        return reply.fds[0]

    def postcopy_listen(self) -> None:
        """POSTCOPY_LISTEN: switch to postcopy; memory table updates now exchange bases."""
        self._call(Request.POSTCOPY_LISTEN)
        self.postcopy_listening = True

    def postcopy_end(self) -> int:
        """POSTCOPY_END: returns the back-end's status (0 success)."""
        self.postcopy_listening = False
        return self._get_u64(Request.POSTCOPY_END)

    def get_shared_object(self, uuid_: uuid.UUID) -> int | None:
        """GET_SHARED_OBJECT: the dma-buf fd exported as ``uuid_``, or None (SHARED_OBJECT)."""
        reply = self._reply(Request.GET_SHARED_OBJECT, SharedObject(uuid_))
        if not reply.fds:
            return None
        if len(reply.fds) > 1:
            raise self._wrong(
                Request.GET_SHARED_OBJECT, "fds", f"{len(reply.fds)} fds in the reply", reply.fds
            )
        return reply.fds[0]

    def set_device_state_fd(self, direction: int, phase: int, fd: int) -> int | None:
        """SET_DEVICE_STATE_FD: offer ``fd`` as the state transfer channel (DEVICE_STATE).

        Returns the back-end's own channel fd if it chose one (use it instead), else None;
        a non-zero error code raises ReplyError.
        """
        reply = self._reply(
            Request.SET_DEVICE_STATE_FD, DeviceStateTransfer(direction, phase), fds=[fd]
        )
        value = reply.payload_as(U64).value
        if value & 0xFF:
            close_fds(reply.fds)
            raise ReplyError(f"SET_DEVICE_STATE_FD: back-end replied with error {value & 0xFF}")
        if value & DEVICE_STATE_NOFD:
            close_fds(reply.fds)
            return None
        return reply.fds[0]

    def check_device_state(self) -> int:
        """CHECK_DEVICE_STATE: the back-end's verdict on the transfer (0 success)."""
        return self._get_u64(Request.CHECK_DEVICE_STATE)

    def get_shmem_config(self) -> tuple[int, ...]:
        """GET_SHMEM_CONFIG: sizes of the VIRTIO shared memory regions by shmid (SHMEM)."""
        return self._reply(Request.GET_SHMEM_CONFIG).payload_as(ShmemConfig).memory_sizes

    # --- helpers ---------------------------------------------------------------------------

    def negotiate(
        self,
        features_mask: int = _ALL_FEATURES,
        protocol_mask: int = FRONTEND_PROTOCOL_FEATURES,
        *,
        backend_handler: BackendRequestHandler | None = None,
        set_owner: bool = True,
    ) -> NegotiationResult:
        """QEMU's start-up sequence: GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (MQ),
        GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), SET_BACKEND_REQ_FD (BACKEND_REQ), SET_OWNER.

        Protocol features are offered & ``protocol_mask`` & what this front-end implements;
        INBAND_NOTIFICATIONS is dropped unless BACKEND_REQ and REPLY_ACK stay in.
        """
        offered = self.get_features()
        features = offered & features_mask
        offered_pf = 0
        pf = 0
        queue_num = None
        slots = None
        handler = None
        if _bit(offered, F_PROTOCOL_FEATURES):
            features |= 1 << F_PROTOCOL_FEATURES
            offered_pf = self.get_protocol_features()
            pf = offered_pf & protocol_mask & FRONTEND_PROTOCOL_FEATURES
            inband_needs = 1 << PF.BACKEND_REQ | 1 << PF.REPLY_ACK
            if pf & inband_needs != inband_needs:
                pf &= ~(1 << PF.INBAND_NOTIFICATIONS)
            self.set_protocol_features(pf)
            if _bit(pf, PF.MQ):
                queue_num = self.get_queue_num()
            if _bit(pf, PF.CONFIGURE_MEM_SLOTS):
                slots = self.get_max_mem_slots()
            if _bit(pf, PF.BACKEND_REQ):
                handler = self.set_backend_req_fd(backend_handler)
        if set_owner:
            self.set_owner()
        return NegotiationResult(offered, features, offered_pf, pf, queue_num, slots, handler)

    def setup_memory(self, regions: Sequence[tuple[MemoryRegion, int]]) -> None:
        """Share guest memory: ADD_MEM_REG per region with CONFIGURE_MEM_SLOTS, else one
        SET_MEM_TABLE (at most 8 regions)."""
        if self.has_protocol_feature(PF.CONFIGURE_MEM_SLOTS):
            limit = self.max_mem_slots
            if limit is not None and len(regions) > limit:
                raise ValueError(
                    f"ADD_MEM_REG: {len(regions)} regions exceed the back-end's {limit} slots"
                )
            for region, fd in regions:
                self.add_mem_reg(region, fd)
            return
        if len(regions) > MAX_MEMORY_REGIONS:
            raise ValueError(
                f"SET_MEM_TABLE: {len(regions)} regions exceed {MAX_MEMORY_REGIONS} "
                "(CONFIGURE_MEM_SLOTS was not negotiated)"
            )
        self.set_mem_table(regions)

    def start_vring(  # noqa: PLR0917 (the documented positional signature)
        self,
        index: int,
        size: int,
        addr: VringAddr,
        base: int,
        kick_fd: int | None,
        call_fd: int | None,
        *,
        enable: bool = True,
    ) -> None:
        """Start vring ``index``: SET_VRING_NUM, BASE, ADDR, KICK, CALL, then SET_VRING_ENABLE
        (skipped when the back-end has no protocol features: it enables rings itself)."""
        if addr.index != index:
            raise ValueError(f"start_vring: addr is for vring {addr.index}, not {index}")
        self.set_vring_num(index, size)
        self.set_vring_base(index, base)
        self.set_vring_addr(addr)
        self.set_vring_kick(index, kick_fd)
        self.set_vring_call(index, call_fd)
        if self.offered_features is not None and _bit(self.offered_features, F_PROTOCOL_FEATURES):
            self.set_vring_enable(index, enable)

    # --- the control interface shared with kernel vhost (pyvhost.control) -------------------

    def set_memory(self, memory: GuestMemory) -> None:
        """Share every region of ``memory`` by its fd (see :meth:`setup_memory`); its
        ``userspace_addr`` labels are the addresses ring addresses are given in."""
        regions = []
        for region in memory.regions:
            if region.fd is None:
                raise ValueError(
                    f"set_memory: region gpa {region.guest_phys_addr:#x} has no fd to send "
                    "(make guest memory with GuestMemory.anonymous / add_anonymous)"
                )
            spec = MemoryRegion(
                region.guest_phys_addr, region.size, region.userspace_addr, region.mmap_offset
            )
            regions.append((spec, region.fd))
        self.setup_memory(regions)
        self.memory = memory

    def set_dirty_log(self, log: DirtyLog, fd: int) -> None:
        """SET_LOG_BASE with the log's memfd (LOG_SHMFD)."""
        self.set_log_base(log.size, 0, fd)

    def set_ring_addresses(self, index: int, ring: RingAddresses) -> None:
        """SET_VRING_ADDR from guest-physical addresses, given as the memory's labels."""
        desc, driver, device = (
            self._label(gpa, f"vring {index} {what}")
            for gpa, what in (
                (ring.desc, "descriptor area"),
                (ring.driver, "driver area"),
                (ring.device, "device area"),
            )
        )
        flags = VRING_F_LOG if ring.log else 0
        self.set_vring_addr(VringAddr(index, flags, desc, device, driver, ring.device))

    def _label(self, gpa: int, what: str) -> int:
        region, offset = region_for(self.memory, gpa, what)
        return region.userspace_addr + offset

    def enable_ring(self, index: int) -> None:
        """SET_VRING_ENABLE where the back-end offers protocol features (it then waits for it)."""
        if self.offered_features is not None and _bit(self.offered_features, F_PROTOCOL_FEATURES):
            self.set_vring_enable(index, True)

    def stop_vring(self, index: int) -> int:
        """Stop vring ``index`` (GET_VRING_BASE); returns the index to resume from."""
        return self.get_vring_base(index)
