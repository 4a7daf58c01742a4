"""BackendHandler: the per-connection vhost-user back-end state machine, driving a BackendDevice.

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

import logging
import os
import socket
import stat
from collections.abc import Callable

from pyvhost.errors import (
    ConnectionClosedError,
    ProtocolError,
    UnsupportedRequestError,
    VhostError,
)
from pyvhost.user.backend.base import MAX_MEM_SLOTS, PF, FatalProtocolError, Reply, log
from pyvhost.user.backend.memory import MemoryRequests
from pyvhost.user.backend.state import StateTransferRequests
from pyvhost.user.channel import Channel
from pyvhost.user.connection import Connection, Frame
from pyvhost.user.device import BackendDevice
from pyvhost.user.messages import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    U64,
    Config,
    Message,
    RawPayload,
    Request,
    SharedObject,
    ShmemConfig,
    close_fds,
    decode_request,
    encode_reply,
    gate_refusal,
    spec_for,
)
from pyvhost.virtio.features import has_bit


class BackendHandler(MemoryRequests, StateTransferRequests):
    """The back-end side of one vhost-user connection: protocol state, rings and memory."""

    def __init__(
        self,
        device: BackendDevice,
        conn: Connection,
        *,
        name: str = "vhost-user",
        max_mem_slots: int = MAX_MEM_SLOTS,
        trace: Callable[[Message], None] | None = None,
    ) -> None:
        super().__init__(device, conn, name=name, max_mem_slots=max_mem_slots, trace=trace)
        self._dispatch: dict[Request, Callable[[Message], Reply | None]] = {
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

    def _send_reply(self, msg: Message, reply: Reply) -> None:
        try:
            self._send(encode_reply(msg.request, reply.payload, fds=reply.fds))
        finally:
            if reply.close_fds:
                close_fds(list(reply.fds))

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

    def _get_features(self, msg: Message) -> Reply:
        return Reply(U64(self.offered_features))

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
        if not has_bit(value, F_PROTOCOL_FEATURES):
            for vring in self.vrings:
                self._enable(vring, True)

    def _get_protocol_features(self, msg: Message) -> Reply:
        return Reply(U64(self.offered_protocol_features))

    def _set_protocol_features(self, msg: Message) -> None:
        value = msg.payload_as(U64).value
        offered = self.offered_protocol_features
        if value & ~offered:
            raise ProtocolError(
                f"protocol features {value & ~offered:#x} were not offered (offered {offered:#x})",
                request=msg.name,
                field="u64",
            )
        if has_bit(value, PF.INBAND_NOTIFICATIONS) and not (
            has_bit(value, PF.BACKEND_REQ) and has_bit(value, PF.REPLY_ACK)
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

    def _get_queue_num(self, msg: Message) -> Reply:
        return Reply(U64(len(self.vrings)))

    def _get_max_mem_slots(self, msg: Message) -> Reply:
        return Reply(U64(self.max_mem_slots))

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

    def _get_status(self, msg: Message) -> Reply:
        return Reply(U64(self.status))

    def _get_config(self, msg: Message) -> Reply:
        cfg = msg.payload_as(Config)
        data = self.device.get_config(cfg.offset, len(cfg.data))
        if len(data) != len(cfg.data):
            raise ProtocolError(
                f"device returned {len(data)} bytes for a {len(cfg.data)}-byte read",
                request=msg.name,
            )
        return Reply(Config(cfg.offset, cfg.flags, bytes(data)))

    def _set_config(self, msg: Message) -> None:
        cfg = msg.payload_as(Config)
        self.device.set_config(cfg.offset, cfg.data, cfg.flags)

    def _send_rarp(self, msg: Message) -> None:
        self.device.send_rarp(msg.payload_as(U64).value.to_bytes(8, "little")[:6])

    def _net_set_mtu(self, msg: Message) -> None:
        self.device.net_set_mtu(msg.payload_as(U64).value)

    def _create_crypto_session(self, msg: Message) -> Reply:
        return Reply(RawPayload(self.device.create_crypto_session(msg.payload_as(RawPayload).data)))

    def _close_crypto_session(self, msg: Message) -> None:
        self.device.close_crypto_session(msg.payload_as(U64).value)

    def _gpu_set_socket(self, msg: Message) -> None:
        fd = self._take_fd(msg)
        try:
            self.device.gpu_set_socket(fd)
        except BaseException:
            os.close(fd)
            raise

    def _get_shared_object(self, msg: Message) -> Reply:
        obj = msg.payload_as(SharedObject)
        fd = self.device.get_shared_object(obj.uuid)
        if fd is None:
            raise ProtocolError(f"no shared object {obj.uuid}", request=msg.name)
        return Reply(obj, (fd,), close_fds=True)

    def _get_shmem_config(self, msg: Message) -> Reply:
        return Reply(ShmemConfig(tuple(self.device.shmem_config())))

    def _set_backend_req_fd(self, msg: Message) -> None:
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
