"""BackendHandler: the per-connection vhost-user back-end state machine, driving a Device.

One handler serves one front-end connection. :meth:`BackendHandler.handle` processes one
message (testable without threads); :meth:`BackendHandler.serve` loops until the front-end
leaves. Each request maps to one bound method through a dispatch table.

Error policy, for every request: a failure is answered with a NACK (u64 1) when the
front-end asked for a reply (NEED_REPLY with REPLY_ACK negotiated); requests that always
reply answer with their error form (GET_CONFIG: empty payload, IOTLB_MSG: u64 1, ...);
otherwise the failure is logged and :meth:`handle` raises, and the connection must close.
Never a silent ignore.

Choices: GET_MAX_MEM_SLOTS answers 32 (as libvhost-user and qemu-storage-daemon do): enough
for QEMU's DIMM hot-plug in practice, and a bound on the mappings and fds one front-end can
make us hold. Every request is refused unless its gate in the request table
(``messages.FRONTEND_REQUESTS``) is open: the front-end reads the same table before sending.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from pyvhost.errors import (
    ConnectionClosedError,
    GuestMemoryError,
    ProtocolError,
    UnsupportedRequestError,
    VhostError,
)
from pyvhost.user.connection import Connection, Frame
from pyvhost.user.device import Device, VringNotifier
from pyvhost.user.messages import (
    DEVICE_STATE_NOFD,
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    U64,
    VRING_F_LOG,
    VRING_INDEX_MASK,
    VRING_NOFD,
    Config,
    DeviceStateTransfer,
    Empty,
    Inflight,
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
    decode_request,
    encode_reply,
    gate_refusal,
    spec_for,
)
from pyvhost.user.postcopy import Userfaultfd, view_address
from pyvhost.virtio import features as vf
from pyvhost.virtio.inflight import InflightRegion
from pyvhost.virtio.memory import DirtyLog, GuestMemory, RegionSpec
from pyvhost.virtio.packed import PackedQueue, decode_packed_base
from pyvhost.virtio.split import SplitQueue

if TYPE_CHECKING:
    from pyvhost.user.channel import Channel
    from pyvhost.virtio.queue import DeviceQueue

__all__ = [
    "HANDLER_PROTOCOL_FEATURES",
    "MAX_MEM_SLOTS",
    "BackendHandler",
    "FatalProtocolError",
]

log = logging.getLogger("pyvhost.backend")

MAX_MEM_SLOTS = 32
"""GET_MAX_MEM_SLOTS answer (see the module docstring)."""

DEVICE_STATE_TIMEOUT = 60.0
"""How long CHECK_DEVICE_STATE waits for a state transfer to finish."""

POSTCOPY_ACK_TIMEOUT = 30.0
"""How long SET_MEM_TABLE in postcopy mode waits for the front-end's acknowledgement."""


def _bits(*bits: int) -> int:
    value = 0
    for bit in bits:
        value |= 1 << bit
    return value


PF = ProtocolFeature

HANDLER_PROTOCOL_FEATURES = _bits(
    PF.MQ,
    PF.LOG_SHMFD,
    PF.RARP,
    PF.REPLY_ACK,
    PF.MTU,
    PF.BACKEND_REQ,
    PF.CRYPTO_SESSION,
    PF.PAGEFAULT,
    PF.CONFIG,
    PF.BACKEND_SEND_FD,
    PF.HOST_NOTIFIER,
    PF.INFLIGHT_SHMFD,
    PF.RESET_DEVICE,
    PF.INBAND_NOTIFICATIONS,
    PF.CONFIGURE_MEM_SLOTS,
    PF.STATUS,
    PF.SHARED_OBJECT,
    PF.DEVICE_STATE,
    PF.SHMEM,
)
"""Protocol features this handler implements (not CROSS_ENDIAN: big-endian rings are not
supported; not XEN_MMAP; not the bits above DEVICE_STATE whose meaning is unsettled but SHMEM)."""

_DEVICE_STATE_SAVE = 0


class FatalProtocolError(ProtocolError):
    """An error the spec answers by closing the connection, even with REPLY_ACK."""


class _Reply(NamedTuple):
    """A reply body, the fds to pass with it, and whether to close those fds once sent."""

    payload: Payload
    fds: tuple[int, ...] = ()
    close_fds: bool = False


@dataclass(eq=False)
class _Vring:
    """What the handler knows about one ring (the device sees only queue and notifier)."""

    index: int
    notifier: VringNotifier
    num: int = 0
    addr: VringAddr | None = None
    base: int | None = None
    enabled: bool = False
    kick_set: bool = False
    queue: DeviceQueue | None = None

    @property
    def started(self) -> bool:
        return self.queue is not None


@dataclass(eq=False)
class _StateTransfer:
    """A SET_DEVICE_STATE_FD transfer running in a thread; CHECK_DEVICE_STATE collects it."""

    direction: int
    thread: threading.Thread | None = None
    data: bytes = b""
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel_fd: int = field(default_factory=lambda: os.eventfd(0, os.EFD_CLOEXEC))
    """Written by :meth:`cancel`: wakes the thread out of a pipe the front-end never serves."""

    def cancel(self, timeout: float) -> None:
        """Stop the transfer (the connection is closing), wait for the thread, free the eventfd."""
        with contextlib.suppress(OSError):
            os.eventfd_write(self.cancel_fd, 1)
        if self.thread is not None:
            self.thread.join(timeout)
        if self.thread is None or not self.thread.is_alive():
            with contextlib.suppress(OSError):
                os.close(self.cancel_fd)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _has(bits: int, bit: int) -> bool:
    return bool(bits >> bit & 1)


class BackendHandler:
    """The back-end side of one vhost-user connection: protocol state, rings and memory."""

    def __init__(
        self,
        device: Device,
        conn: Connection,
        *,
        name: str = "vhost-user",
        max_mem_slots: int = MAX_MEM_SLOTS,
        trace: Callable[[Message], None] | None = None,
    ) -> None:
        self.device = device
        self.conn = conn
        self.name = name
        self.max_mem_slots = max_mem_slots
        self.trace = trace
        self.mem = GuestMemory()
        self.owned = False
        self.features = 0
        """Virtio features acked by SET_FEATURES (bit 30 included if the front-end sent it)."""
        self.protocol_features = 0
        """Protocol features acked by SET_PROTOCOL_FEATURES."""
        self.status = 0
        self.vrings = [_Vring(i, VringNotifier(i)) for i in range(device.num_queues)]
        self.channel: Channel | None = None
        self.inflight: InflightRegion | None = None
        self.uffd: Userfaultfd | None = None
        self.postcopy_listening = False
        self._dirty_log: DirtyLog | None = None
        self._log_fd: int | None = None
        self._transfer: _StateTransfer | None = None
        self.closed = False
        self._logged: BaseException | None = None
        self._dispatch: dict[Request, Callable[[Message], _Reply | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_LOG_BASE: self._set_log_base,
            Request.SET_LOG_FD: self._set_log_fd,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.SEND_RARP: self._send_rarp,
            Request.NET_SET_MTU: self._net_set_mtu,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.IOTLB_MSG: self._never_offered,
            Request.SET_VRING_ENDIAN: self._never_offered,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.CREATE_CRYPTO_SESSION: self._create_crypto_session,
            Request.CLOSE_CRYPTO_SESSION: self._close_crypto_session,
            Request.POSTCOPY_ADVISE: self._postcopy_advise,
            Request.POSTCOPY_LISTEN: self._postcopy_listen,
            Request.POSTCOPY_END: self._postcopy_end,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            Request.GPU_SET_SOCKET: self._gpu_set_socket,
            Request.RESET_DEVICE: self._reset_device,
            Request.VRING_KICK: self._vring_kick,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
            Request.GET_SHARED_OBJECT: self._get_shared_object,
            Request.SET_DEVICE_STATE_FD: self._set_device_state_fd,
            Request.CHECK_DEVICE_STATE: self._check_device_state,
            Request.GET_SHMEM_CONFIG: self._get_shmem_config,
        }

    # -- what we offer ----------------------------------------------------------------------------

    @property
    def offered_features(self) -> int:
        """GET_FEATURES: the device's features plus PROTOCOL_FEATURES and LOG_ALL.

        LOG_ALL is offered when the device offers LOG_SHMFD (the handler does the dirty logging).
        VIRTIO_F_ACCESS_PLATFORM is never offered: the rings would have to translate every
        descriptor address through the IOTLB (with IOTLB miss requests on the back-end channel),
        and they do not; offering it would have them read guest-physical memory at IOVAs.
        """
        offered = self.device.features & ~(1 << vf.F_ACCESS_PLATFORM) | 1 << F_PROTOCOL_FEATURES
        if _has(self.device.protocol_features, PF.LOG_SHMFD):
            offered |= 1 << F_LOG_ALL
        return offered

    @property
    def offered_protocol_features(self) -> int:
        """GET_PROTOCOL_FEATURES: what both this handler and the device support."""
        return self.device.protocol_features & HANDLER_PROTOCOL_FEATURES

    @property
    def negotiation(self) -> Negotiation:
        """What was offered and acked so far: the input of the request gates."""
        return Negotiation(self.offered_features, self.features, self.protocol_features)

    def negotiated(self, feature: ProtocolFeature) -> bool:
        """Whether protocol feature ``feature`` was acked by SET_PROTOCOL_FEATURES."""
        return _has(self.protocol_features, feature)

    @property
    def packed(self) -> bool:
        """Whether VIRTIO_F_RING_PACKED was negotiated (rings use the packed layout)."""
        return _has(self.features, vf.F_RING_PACKED)

    # -- message handling -------------------------------------------------------------------------

    def handle(self, item: Frame | Message) -> None:
        """Process one request: decode a frame, run it, reply as the spec and the flags say.

        Raises (after logging) when the connection must close: a malformed message, or a
        failure the front-end cannot be told about. The caller then calls :meth:`close`.
        """
        if isinstance(item, Frame):
            try:
                msg = decode_request(item.header, item.payload, item.fds)
            except ProtocolError as exc:
                log.error("%s: %s: closing the connection", self.name, exc)
                self._logged = exc
                raise
        else:
            msg = item
        try:
            self._handle(msg)
        finally:
            close_fds(msg.fds)

    def _handle(self, msg: Message) -> None:
        if not isinstance(msg.request, Request) or msg.is_reply:
            raise ProtocolError(f"{msg.name}: not a front-end request")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: <- %s", self.name, msg.describe())
        if self.trace is not None:
            self.trace(msg)
        request = msg.request
        try:
            refusal = gate_refusal(request, self.negotiation)
            if refusal is not None:
                raise ProtocolError(refusal, request=request.name)
            reply = self._dispatch[request](msg)
        except FatalProtocolError as exc:
            log.error("%s: %s: closing the connection", self.name, exc)
            self._logged = exc
            raise
        except (VhostError, OSError, ValueError) as exc:
            self._fail(msg, exc)
            return
        if reply is not None:
            self._send_reply(msg, reply)
        elif msg.need_reply:
            self._send(encode_reply(request, U64(0)))

    def _fail(self, msg: Message, exc: BaseException) -> None:
        """Answer a failed request with its error form or a NACK; else log and re-raise."""
        request = msg.request
        assert isinstance(request, Request)
        what = str(exc) if request.name in str(exc) else f"{request.name}: {exc}"
        spec = spec_for(request)
        has_body = spec.replies(self.protocol_features)
        if has_body and spec.error_reply is not None:
            log.warning("%s: %s (error reply sent)", self.name, what)
            self._send(encode_reply(request, spec.error_reply(msg)))
            return
        if msg.need_reply and self.negotiated(PF.REPLY_ACK) and not has_body:
            log.warning("%s: %s (NACK sent)", self.name, what)
            self._send(encode_reply(request, U64(1)))
            return
        log.error("%s: %s: closing the connection", self.name, what)
        if not isinstance(exc, VhostError):
            # handle() raises only VhostError; OSError / ValueError from a syscall or a
            # constructor become a ProtocolError naming the request, the cause chained.
            wrapped = ProtocolError(what, request=None)
            wrapped.__cause__ = exc
            exc = wrapped
        self._logged = exc
        raise exc

    def _send_reply(self, msg: Message, reply: _Reply) -> None:
        try:
            self._send(encode_reply(msg.request, reply.payload, fds=reply.fds))
        finally:
            if reply.close_fds:
                close_fds(list(reply.fds))

    def _send(self, reply: Message) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: -> %s", self.name, reply.describe())
        self.conn.send(reply)

    def serve(self) -> None:
        """Receive and handle requests until the front-end leaves; then release everything."""
        log.info("%s: front-end connected", self.name)
        try:
            while True:
                try:
                    frame = self.conn.recv_frame()
                except ConnectionClosedError as exc:
                    log.info("%s: front-end left (%s)", self.name, exc)
                    return
                self.handle(frame)
        except (VhostError, OSError) as exc:
            if exc is not self._logged:
                log.error("%s: closing the connection: %s", self.name, exc)
        except Exception:
            log.exception("%s: internal error; closing the connection", self.name)
        finally:
            self.close()

    def close(self) -> None:
        """Stop every ring, reset the device, release memory, fds and the connection."""
        if self.closed:
            return
        self.closed = True
        for vring in self.vrings:
            self._safe(self._stop, vring)
        self._safe(self.device.set_channel, None)
        self._safe(self.device.reset)
        for vring in self.vrings:
            vring.notifier.close()
        if self.channel is not None:
            self._safe(self.channel.close)
            self.channel = None
        transfer, self._transfer = self._transfer, None
        if transfer is not None:
            transfer.cancel(5.0)
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self.mem.close()
        if self._dirty_log is not None:
            self._dirty_log.close()
            self._dirty_log = None
        self._replace_log_fd(None)
        self.conn.close()
        log.info("%s: connection closed, device reset, memory released", self.name)

    def _safe(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s: %s failed during close", self.name, getattr(fn, "__name__", fn))

    # -- helpers ----------------------------------------------------------------------------------

    def _vring(self, request: str, index: int) -> _Vring:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(
                f"vring {index} out of range (device has {len(self.vrings)} queues)",
                request=request,
                field="index",
            )
        return self.vrings[index]

    @staticmethod
    def _take_fd(msg: Message) -> int:
        """Move the message's one fd out of it (the caller now owns it)."""
        if len(msg.fds) != 1:
            raise ProtocolError(f"expected 1 fd, got {len(msg.fds)}", request=msg.name)
        return msg.fds.pop()

    def _ring_gpa(self, what: str, vring: _Vring, address: int, length: int) -> int:
        """Translate a ring address (a front-end user address) to a gpa."""
        try:
            return self.mem.uva_to_gpa(address, length)
        except VhostError as exc:
            raise ProtocolError(f"vring {vring.index}: {what}: {exc}") from exc

    def _build_queue(self, vring: _Vring) -> DeviceQueue:
        addr = vring.addr
        assert addr is not None
        num, i = vring.num, vring.index
        event_idx = _has(self.features, vf.F_RING_EVENT_IDX)
        indirect = _has(self.features, vf.F_RING_INDIRECT_DESC)
        log_used = bool(addr.flags & VRING_F_LOG)
        region = self.inflight if self.inflight and i < self.inflight.num_queues else None
        if self.packed:
            base = 0x8000_8000 if vring.base is None else vring.base
            avail, avail_wrap, used, used_wrap = decode_packed_base(base)
            if base >> 16 == 0:
                # DPDK's and SPDK's virtio-user send only the avail side (idx | wrap << 15) and
                # expect the used side to follow it, as DPDK's own back-end does.
                used, used_wrap = avail, avail_wrap
            if avail >= num or used >= num:
                raise ProtocolError(
                    f"vring {i}: packed base {base:#x} has an index beyond the ring size {num}"
                )
            tracker = region.packed_queue(i) if region is not None else None
            desc, driver, device = self._ring_areas(
                vring,
                ("descriptor ring", addr.desc_user_addr, 16 * num),
                ("driver area", addr.avail_user_addr, 4),
                ("device area", addr.used_user_addr, 4),
            )
            return PackedQueue(
                self.mem,
                num,
                desc,
                driver,
                device,
                event_idx=event_idx,
                indirect=indirect,
                last_avail_idx=avail,
                avail_wrap=avail_wrap,
                used_idx=used,
                used_wrap=used_wrap,
                queue_index=i,
                log_used=log_used,
                inflight=tracker,
            )
        split_tracker = region.split_queue(i) if region is not None else None
        desc, avail, used = self._ring_areas(
            vring,
            ("descriptor table", addr.desc_user_addr, 16 * num),
            ("available ring", addr.avail_user_addr, 6 + 2 * num),
            ("used ring", addr.used_user_addr, 6 + 8 * num),
        )
        return SplitQueue(
            self.mem,
            num,
            desc,
            avail,
            used,
            event_idx=event_idx,
            indirect=indirect,
            last_avail_idx=(vring.base or 0) & 0xFFFF,
            queue_index=i,
            log_used=log_used,
            used_log_gpa=addr.log_guest_addr,
            inflight=split_tracker,
        )

    def _ring_areas(self, vring: _Vring, *parts: tuple[str, int, int]) -> tuple[int, ...]:
        """Translate the ring parts ``(what, uva, length)`` to gpas."""
        return tuple(self._ring_gpa(what, vring, uva, n) for what, uva, n in parts)

    def _maybe_start(self, vring: _Vring) -> None:
        """Start the ring once it has a kick, a size, addresses and memory to translate them."""
        if vring.started or not vring.kick_set:
            return
        if vring.num == 0 or vring.addr is None or len(self.mem) == 0:
            log.info(
                "%s: vring %d: kick set before size, addresses and memory; starts when complete",
                self.name,
                vring.index,
            )
            return
        queue = self._build_queue(vring)
        vring.queue = queue
        log.info("%s: vring %d started (size %d)", self.name, vring.index, vring.num)
        self.device.queue_started(vring.index, queue, vring.notifier)

    def _stop(self, vring: _Vring) -> None:
        """Stop a started ring: the device lets go, we keep its index for a restart."""
        queue = vring.queue
        if queue is None:
            return
        vring.queue = None
        try:
            self.device.queue_stopped(vring.index)
        finally:
            vring.base = queue.get_base()
            log.info("%s: vring %d stopped at base %#x", self.name, vring.index, vring.base)

    @contextlib.contextmanager
    def _rings_paused(self, *, removing: bool = False) -> Iterator[None]:
        """Stop the running rings around a memory change, then rebuild them on the new table.

        The change is committed once the body returns; a ring that no longer fits the new table
        stays stopped and does not stop the others. After SET_MEM_TABLE or ADD_MEM_REG that is
        an error (logged, its error notifier signalled). After REM_MEM_REG (``removing``) it is
        what QEMU does while running (virtio-mem, region merges): the ring waits, keeping its
        position, and restarts when a later ADD_MEM_REG brings its memory back, as
        libvhost-user remaps rings on demand.
        """
        running = [v for v in self.vrings if v.started]
        waiting = [v for v in self.vrings if v.kick_set and not v.started]
        for vring in running:
            self._stop(vring)
        try:
            yield
        finally:
            for vring in running:
                self._restart(vring, removing=removing)
            for vring in waiting:
                try:
                    self._maybe_start(vring)
                except (VhostError, ValueError) as exc:
                    if removing:
                        continue
                    log.error("%s: vring %d cannot start: %s", self.name, vring.index, exc)
                    with contextlib.suppress(VhostError, OSError):
                        vring.notifier.error()

    def _restart(self, vring: _Vring, *, removing: bool = False) -> None:
        try:
            self._maybe_start(vring)
            if vring.started:
                return
            reason = "no memory is mapped"
        except (VhostError, ValueError) as exc:
            reason = str(exc)
        if removing:
            log.info(
                "%s: vring %d paused at base %#x until its memory is added back: %s",
                self.name,
                vring.index,
                vring.base or 0,
                reason,
            )
            return
        log.error(
            "%s: vring %d stopped: it cannot restart on the new memory table: %s",
            self.name,
            vring.index,
            reason,
        )
        with contextlib.suppress(VhostError, OSError):
            vring.notifier.error()

    def _apply_log(self) -> None:
        """Attach the dirty log to guest memory while LOG_ALL is acked; detach and drop it after."""
        if _has(self.features, F_LOG_ALL):
            if self._dirty_log is not None and self.mem.log is not self._dirty_log:
                self.mem.set_log(self._dirty_log)
        elif self.mem.log is not None:
            self.mem.set_log(None)
            self._dirty_log = None

    def _replace_log_fd(self, fd: int | None) -> None:
        old, self._log_fd = self._log_fd, fd
        if old is not None:
            os.close(old)

    # -- features and ownership -------------------------------------------------------------------

    def _get_features(self, msg: Message) -> _Reply:
        return _Reply(U64(self.offered_features))

    def _set_features(self, msg: Message) -> None:
        value = msg.payload_as(U64).value
        extra = value & ~self.offered_features
        if extra:
            raise ProtocolError(
                f"features {extra:#x} were not offered (offered {self.offered_features:#x})",
                request=msg.name,
                field="u64",
            )
        self.features = value
        self._apply_log()
        self.device.set_features(value & ~(1 << F_PROTOCOL_FEATURES | 1 << F_LOG_ALL))
        if not _has(value, F_PROTOCOL_FEATURES):
            for vring in self.vrings:
                self._enable(vring, True)

    def _enable(self, vring: _Vring, enabled: bool) -> None:
        if vring.enabled != enabled:
            vring.enabled = enabled
            self.device.queue_enabled(vring.index, enabled)

    def _get_protocol_features(self, msg: Message) -> _Reply:
        return _Reply(U64(self.offered_protocol_features))

    def _set_protocol_features(self, msg: Message) -> None:
        value = msg.payload_as(U64).value
        offered = self.offered_protocol_features
        if value & ~offered:
            raise ProtocolError(
                f"protocol features {value & ~offered:#x} were not offered (offered {offered:#x})",
                request=msg.name,
                field="u64",
            )
        if _has(value, PF.INBAND_NOTIFICATIONS) and not (
            _has(value, PF.BACKEND_REQ) and _has(value, PF.REPLY_ACK)
        ):
            raise FatalProtocolError(
                "INBAND_NOTIFICATIONS without BACKEND_REQ and REPLY_ACK",
                request=msg.name,
                field="u64",
            )
        self.protocol_features = value
        self._wire_inband()

    def _wire_inband(self) -> None:
        """Route calls and errors of rings without eventfds over the channel (in-band)."""
        inband = self.channel if self.negotiated(PF.INBAND_NOTIFICATIONS) else None
        for vring in self.vrings:
            vring.notifier.set_inband(inband)

    def _get_queue_num(self, msg: Message) -> _Reply:
        return _Reply(U64(len(self.vrings)))

    def _get_max_mem_slots(self, msg: Message) -> _Reply:
        return _Reply(U64(self.max_mem_slots))

    def _set_owner(self, msg: Message) -> None:
        if self.owned:
            raise ProtocolError("the session already has an owner", request=msg.name)
        self.owned = True

    def _reset_owner(self, msg: Message) -> None:
        """Deprecated: disable every ring, as the spec recommends, and drop ownership."""
        for vring in self.vrings:
            self._enable(vring, False)
        self.owned = False

    def _reset_device(self, msg: Message) -> None:
        for vring in self.vrings:
            self._stop(vring)
            self._enable(vring, False)
            vring.notifier.set_kick_fd(None)
            vring.num, vring.addr, vring.base, vring.kick_set = 0, None, None, False
        self.features = 0
        self.status = 0
        self._apply_log()
        self.device.reset()

    def _set_status(self, msg: Message) -> None:
        self.status = msg.payload_as(U64).value & 0xFF
        self.device.set_status(self.status)

    def _get_status(self, msg: Message) -> _Reply:
        return _Reply(U64(self.status))

    # -- memory -----------------------------------------------------------------------------------

    def _set_mem_table(self, msg: Message) -> _Reply | None:
        table = msg.payload_as(MemoryTable)
        specs = [
            RegionSpec(fd, r.mmap_offset, r.memory_size, r.guest_phys_addr, r.userspace_addr)
            for r, fd in zip(table.regions, msg.fds, strict=True)
        ]
        with self._rings_paused():
            self.mem.replace(specs)
            close_fds(msg.fds)
            self.device.memory_changed(self.mem)
        log.info("%s: memory table set: %d regions", self.name, len(self.mem))
        if self.postcopy_listening:
            self._postcopy_mem_table(msg)
        return None

    def _postcopy_mem_table(self, msg: Message) -> None:
        """Register the new regions, tell the front-end our bases, wait for its go-ahead."""
        uffd = self._uffd(msg)
        regions = []
        for region in self.mem.regions:
            base = view_address(region.view)
            uffd.register(base, region.size)
            regions.append(
                MemoryRegion(region.guest_phys_addr, region.size, base, region.mmap_offset)
            )
        self._send(encode_reply(Request.SET_MEM_TABLE, MemoryTable(tuple(regions))))
        ack = self.conn.recv_frame(POSTCOPY_ACK_TIMEOUT)
        close_fds(ack.fds)
        if ack.header.request != Request.SET_MEM_TABLE or ack.payload != bytes(8):
            raise FatalProtocolError(
                "postcopy: expected the front-end's SET_MEM_TABLE acknowledgement (u64 0)",
                request=msg.name,
            )

    def _add_mem_reg(self, msg: Message) -> _Reply | None:
        region = msg.payload_as(MemRegMsg).region
        if len(self.mem) >= self.max_mem_slots:
            raise ProtocolError(
                f"all {self.max_mem_slots} memory slots are in use", request=msg.name
            )
        fd = self._take_fd(msg)
        try:
            with self._rings_paused():
                added = self.mem.add_region(
                    fd,
                    region.mmap_offset,
                    region.memory_size,
                    region.guest_phys_addr,
                    region.userspace_addr,
                )
                self.device.memory_changed(self.mem)
        finally:
            os.close(fd)
        log.info("%s: memory region added: %s", self.name, region.describe())
        if self.postcopy_listening:
            base = view_address(added.view)
            self._uffd(msg).register(base, added.size)
            reply = MemoryRegion(added.guest_phys_addr, added.size, base, added.mmap_offset)
            return _Reply(MemRegMsg(reply))
        return None

    def _rem_mem_reg(self, msg: Message) -> None:
        region = msg.payload_as(MemRegMsg).region
        close_fds(msg.fds)  # the spec allows one fd here, to be closed unused
        self._find_region(region)
        with self._rings_paused(removing=True):
            self.mem.remove_region(
                region.guest_phys_addr, region.memory_size, region.userspace_addr
            )
            self.device.memory_changed(self.mem)
        log.info("%s: memory region removed: %s", self.name, region.describe())

    def _find_region(self, region: MemoryRegion) -> None:
        """Refuse (nothing changes) a REM_MEM_REG that names no mapped region, before any ring
        is paused: the two memory tables must never silently diverge."""
        key = (region.guest_phys_addr, region.memory_size, region.userspace_addr)
        if not any((r.guest_phys_addr, r.size, r.userspace_addr) == key for r in self.mem.regions):
            raise GuestMemoryError(
                f"no memory region with gpa {region.guest_phys_addr:#x} size "
                f"{region.memory_size:#x} userspace_addr {region.userspace_addr:#x} to remove "
                f"({len(self.mem)} regions mapped)",
                address=region.guest_phys_addr,
                length=region.memory_size,
            )

    def _set_log_base(self, msg: Message) -> _Reply:
        area = msg.payload_as(Log)
        fd = self._take_fd(msg)
        try:
            new_log = DirtyLog(fd, area.size, area.offset)
        finally:
            os.close(fd)
        old, self._dirty_log = self._dirty_log, new_log
        if old is not None and self.mem.log is not old:
            old.close()
        self._apply_log()
        log.info("%s: dirty log set: %d bytes", self.name, area.size)
        return _Reply(U64(0))

    def _set_log_fd(self, msg: Message) -> None:
        """Keep the eventfd the front-end may be told through that the log changed."""
        self._replace_log_fd(self._take_fd(msg))

    # -- rings ------------------------------------------------------------------------------------

    def _set_vring_num(self, msg: Message) -> None:
        state = msg.payload_as(VringState)
        vring = self._vring(msg.name, state.index)
        limit = self.device.max_queue_size
        if self.packed and not 1 <= state.num <= limit:
            raise ProtocolError(
                f"vring {state.index}: size {state.num} is not in 1..{limit}",
                request=msg.name,
                field="num",
            )
        if not self.packed and (not _power_of_two(state.num) or state.num > limit):
            raise ProtocolError(
                f"vring {state.index}: size {state.num} is not a power of 2 in 1..{limit} "
                "(only packed rings may have other sizes)",
                request=msg.name,
                field="num",
            )
        if vring.started:
            raise ProtocolError(f"vring {state.index} is started", request=msg.name)
        vring.num = state.num
        self._maybe_start(vring)

    def _set_vring_addr(self, msg: Message) -> None:
        addr = msg.payload_as(VringAddr)
        vring = self._vring(msg.name, addr.index)
        self._stop(vring)
        vring.addr = addr
        self._maybe_start(vring)

    def _set_vring_base(self, msg: Message) -> None:
        state = msg.payload_as(VringState)
        vring = self._vring(msg.name, state.index)
        if vring.started:
            raise ProtocolError(f"vring {state.index} is started", request=msg.name)
        if not self.packed and state.num > 0xFFFF:
            raise ProtocolError(
                f"vring {state.index}: base {state.num:#x} has reserved bits 16..31 set",
                request=msg.name,
                field="num",
            )
        vring.base = state.num

    def _get_vring_base(self, msg: Message) -> _Reply:
        state = msg.payload_as(VringState)
        vring = self._vring(msg.name, state.index)
        self._stop(vring)
        vring.notifier.set_kick_fd(None)
        vring.kick_set = False
        if vring.base is None:
            vring.base = 0x8000_8000 if self.packed else 0
        return _Reply(VringState(state.index, vring.base))

    def _vring_fd(self, msg: Message) -> tuple[_Vring, int | None]:
        value = msg.payload_as(U64).value
        vring = self._vring(msg.name, value & VRING_INDEX_MASK)
        fd = None if value & VRING_NOFD else self._take_fd(msg)
        return vring, fd

    def _set_vring_kick(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        self._stop(vring)
        vring.notifier.set_kick_fd(fd, polling=fd is None)
        vring.kick_set = True
        self._maybe_start(vring)

    def _set_vring_call(self, msg: Message) -> None:
        """Install the call fd and signal it once, as libvhost-user does: completions a crashed
        predecessor published without a notification are otherwise never noticed (a spurious
        call costs the driver one look at its used ring)."""
        vring, fd = self._vring_fd(msg)
        vring.notifier.set_call_fd(fd)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)

    def _set_vring_err(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        vring.notifier.set_err_fd(fd)

    def _set_vring_enable(self, msg: Message) -> None:
        state = msg.payload_as(VringState)
        self._enable(self._vring(msg.name, state.index), bool(state.num))

    def _vring_kick(self, msg: Message) -> None:
        """In-band kick: start the ring if needed (with an eventfd of our own), then signal it."""
        state = msg.payload_as(VringState)
        vring = self._vring(msg.name, state.index)
        if not vring.kick_set:
            vring.notifier.set_kick_fd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            vring.kick_set = True
            self._maybe_start(vring)
        if not vring.started:
            raise ProtocolError(
                f"vring {state.index} cannot start: size, addresses or memory missing",
                request=msg.name,
            )
        vring.notifier.kick()

    # -- config, status and device-specific requests ----------------------------------------------

    def _get_config(self, msg: Message) -> _Reply:
        cfg = msg.payload_as(Config)
        data = self.device.get_config(cfg.offset, len(cfg.data))
        if len(data) != len(cfg.data):
            raise ProtocolError(
                f"device returned {len(data)} bytes for a {len(cfg.data)}-byte read",
                request=msg.name,
            )
        return _Reply(Config(cfg.offset, cfg.flags, bytes(data)))

    def _set_config(self, msg: Message) -> None:
        cfg = msg.payload_as(Config)
        self.device.set_config(cfg.offset, cfg.data, cfg.flags)

    def _send_rarp(self, msg: Message) -> None:
        self.device.send_rarp(msg.payload_as(U64).value.to_bytes(8, "little")[:6])

    def _net_set_mtu(self, msg: Message) -> None:
        self.device.net_set_mtu(msg.payload_as(U64).value)

    def _create_crypto_session(self, msg: Message) -> _Reply:
        return _Reply(
            RawPayload(self.device.create_crypto_session(msg.payload_as(RawPayload).data))
        )

    def _close_crypto_session(self, msg: Message) -> None:
        self.device.close_crypto_session(msg.payload_as(U64).value)

    def _gpu_set_socket(self, msg: Message) -> None:
        fd = self._take_fd(msg)
        try:
            self.device.gpu_set_socket(fd)
        except BaseException:
            os.close(fd)
            raise

    def _get_shared_object(self, msg: Message) -> _Reply:
        obj = msg.payload_as(SharedObject)
        fd = self.device.get_shared_object(obj.uuid)
        if fd is None:
            raise ProtocolError(f"no shared object {obj.uuid}", request=msg.name)
        return _Reply(obj, (fd,), close_fds=True)

    def _get_shmem_config(self, msg: Message) -> _Reply:
        return _Reply(ShmemConfig(tuple(self.device.shmem_config())))

    def _set_backend_req_fd(self, msg: Message) -> None:
        try:
            from pyvhost.user.channel import Channel
        except ImportError as exc:
            raise UnsupportedRequestError(
                f"SET_BACKEND_REQ_FD: back-end channel not available ({exc})"
            ) from exc
        fd = self._take_fd(msg)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise ProtocolError(
                    "the fd is not a socket (the channel is a Unix socket)",
                    request=msg.name,
                    field="fds",
                )
            sock = socket.socket(fileno=fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            channel = Channel(Connection(sock), negotiation=lambda: self.negotiation)
        except BaseException:
            sock.close()
            raise
        old, self.channel = self.channel, channel
        if old is not None:
            old.close()
        self._wire_inband()
        self.device.set_channel(channel)
        log.info("%s: back-end request channel set", self.name)

    def _never_offered(self, msg: Message) -> None:
        """IOTLB_MSG and SET_VRING_ENDIAN: their gates (ACCESS_PLATFORM, CROSS_ENDIAN) are never
        offered, so :meth:`_handle` refuses them first; this is the dispatch entry they reach
        should a gate ever open without the rings learning IOVAs or big-endian layouts."""
        raise UnsupportedRequestError(f"{msg.name}: not supported by this back-end")

    # -- inflight ---------------------------------------------------------------------------------

    def _get_inflight_fd(self, msg: Message) -> _Reply:
        want = msg.payload_as(Inflight)
        region, fd, size = InflightRegion.create(want.num_queues, want.queue_size, self.packed)
        self._replace_inflight(region)
        return _Reply(Inflight(size, 0, want.num_queues, want.queue_size), (fd,))

    def _set_inflight_fd(self, msg: Message) -> None:
        info = msg.payload_as(Inflight)
        region = InflightRegion.adopt(
            self._take_fd(msg),
            info.mmap_size,
            info.mmap_offset,
            info.num_queues,
            info.queue_size,
            self.packed,
        )
        self._replace_inflight(region)

    def _replace_inflight(self, region: InflightRegion) -> None:
        if any(v.started for v in self.vrings):
            region.close()
            raise ProtocolError("inflight region changed while rings are started")
        old, self.inflight = self.inflight, region
        if old is not None:
            old.close()
        log.info(
            "%s: inflight region: %d queues of %d", self.name, region.num_queues, region.queue_size
        )

    # -- device state transfer --------------------------------------------------------------------

    def _set_device_state_fd(self, msg: Message) -> _Reply:
        params = msg.payload_as(DeviceStateTransfer)
        fd = self._take_fd(msg)
        try:
            kind = stat.S_IFMT(os.fstat(fd).st_mode)
            if kind not in (stat.S_IFIFO, stat.S_IFSOCK):
                raise ProtocolError(
                    f"the fd is not a pipe (file type {kind:#o}): the state is streamed "
                    "through a pipe",
                    request=msg.name,
                    field="fds",
                )
            started = [v.index for v in self.vrings if v.started]
            if started:
                raise ProtocolError(
                    f"vrings {started} are started: the device is not suspended",
                    request=msg.name,
                )
            if self._transfer is not None and not self._transfer.done.is_set():
                raise ProtocolError("a state transfer is already running", request=msg.name)
            if self._transfer is not None:
                self._transfer.cancel(1.0)
                self._transfer = None
            data = self.device.save_state() if params.direction == _DEVICE_STATE_SAVE else b""
        except BaseException:
            os.close(fd)
            raise
        transfer = _StateTransfer(params.direction)
        transfer.thread = threading.Thread(
            target=_run_transfer,
            args=(transfer, fd, data),
            name=f"{self.name}-device-state",
            daemon=True,
        )
        self._transfer = transfer
        transfer.thread.start()
        return _Reply(U64(DEVICE_STATE_NOFD))

    def _check_device_state(self, msg: Message) -> _Reply:
        transfer, self._transfer = self._transfer, None
        if transfer is None:
            raise ProtocolError("no state transfer to check", request=msg.name)
        if not transfer.done.wait(DEVICE_STATE_TIMEOUT):
            transfer.cancel(1.0)
            raise ProtocolError(
                f"state transfer still running after {DEVICE_STATE_TIMEOUT:g} s",
                request=msg.name,
            )
        transfer.cancel(1.0)
        if transfer.error is not None:
            raise ProtocolError(f"state transfer failed: {transfer.error}", request=msg.name)
        if transfer.direction != _DEVICE_STATE_SAVE:
            self.device.load_state(transfer.data)
        return _Reply(U64(0))

    # -- postcopy ---------------------------------------------------------------------------------

    def _uffd(self, msg: Message) -> Userfaultfd:
        if self.uffd is None:
            raise ProtocolError("POSTCOPY_ADVISE first: no userfaultfd", request=msg.name)
        return self.uffd

    def _postcopy_advise(self, msg: Message) -> _Reply:
        if self.uffd is None:
            self.uffd = Userfaultfd.open()
        assert self.uffd.fd is not None
        log.info("%s: postcopy advised: userfaultfd opened", self.name)
        return _Reply(Empty(), (self.uffd.fd,))

    def _postcopy_listen(self, msg: Message) -> None:
        uffd = self._uffd(msg)
        for region in self.mem.regions:
            uffd.register(view_address(region.view), region.size)
        self.postcopy_listening = True
        log.info("%s: postcopy listening: %d regions registered", self.name, len(self.mem))

    def _postcopy_end(self, msg: Message) -> _Reply:
        uffd = self._uffd(msg)
        self.uffd = None
        self.postcopy_listening = False
        try:
            uffd.unregister_all()
        finally:
            uffd.close()
        log.info("%s: postcopy ended", self.name)
        return _Reply(U64(0))


class _CancelledError(Exception):
    """The connection closed while the state transfer was waiting on its pipe."""


def _wait_ready(transfer: _StateTransfer, fd: int, event: int) -> None:
    poller = select.poll()
    poller.register(fd, event)
    poller.register(transfer.cancel_fd, select.POLLIN)
    while True:
        ready = dict(poller.poll())
        if transfer.cancel_fd in ready:
            raise _CancelledError("state transfer cancelled: the connection closed")
        if fd in ready:
            return


def _run_transfer(transfer: _StateTransfer, fd: int, data: bytes) -> None:
    """Thread body: write ``data`` to ``fd`` (save) or read ``fd`` to EOF (load); close it.

    Waits in poll() with the cancel eventfd, so a front-end that never reads or never closes
    the pipe cannot keep the thread (and the fd) alive past the connection.
    """
    try:
        os.set_blocking(fd, False)
        if transfer.direction == _DEVICE_STATE_SAVE:
            view = memoryview(data)
            while view:
                _wait_ready(transfer, fd, select.POLLOUT)
                with contextlib.suppress(BlockingIOError):
                    view = view[os.write(fd, view) :]
        else:
            chunks = []
            while True:
                _wait_ready(transfer, fd, select.POLLIN)
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                chunks.append(chunk)
            transfer.data = b"".join(chunks)
    except BaseException as exc:
        transfer.error = exc
    finally:
        os.close(fd)
        transfer.done.set()
