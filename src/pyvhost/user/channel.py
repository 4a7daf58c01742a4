"""The back-end request channel (``BACKEND_REQ``): back-end -> front-end requests, both ends.

:class:`Channel` is what a back-end uses to send ``VHOST_USER_BACKEND_*`` requests over the
socket it received with ``SET_BACKEND_REQ_FD``. :class:`BackendRequestHandler` is the front-end
end: it serves that socket in a thread, decodes each request and calls user callbacks.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable

from pyvhost.closing import Closing
from pyvhost.errors import ConnectionClosedError, ProtocolError, ReplyError, UnsupportedRequestError
from pyvhost.user.connection import Connection
from pyvhost.user.messages import (
    FLAG_REPLY,
    HEADER_SIZE,
    U64,
    VRING_INDEX_MASK,
    VRING_NOFD,
    BackendRequest,
    Empty,
    IotlbMsg,
    Message,
    MMapRequest,
    Negotiation,
    Payload,
    ProtocolFeature,
    SharedObject,
    VringArea,
    VringState,
    close_fds,
    decode_reply,
    encode_reply,
    encode_request,
    gate_refusal,
    spec_for,
)

__all__ = [
    "DEFAULT_REPLY_TIMEOUT",
    "FAILURE",
    "BackendRequestHandler",
    "Channel",
]

log = logging.getLogger(__name__)

DEFAULT_REPLY_TIMEOUT = 10.0
"""Seconds a back-end waits for the front-end's answer on the channel."""

FAILURE = 1
"""Status the handler replies when a callback is missing or raises (any non-zero is failure)."""


_NOTIFICATIONS = (BackendRequest.VRING_CALL, BackendRequest.VRING_ERR)
_HEADER = struct.Struct("<III")


def _check_index(name: str, index: int) -> None:
    if not 0 <= index <= VRING_INDEX_MASK:
        raise ValueError(f"{name}: vring index {index} is not in 0..{VRING_INDEX_MASK}")


class Channel(Closing):
    """Back-end side of the ``BACKEND_REQ`` channel: one method per back-end request.

    ``negotiation`` is what the handler negotiated (or a callable returning it, as it may still
    change): each request is sent only if its gate in the request table allows it, else
    UnsupportedRequestError. With REPLY_ACK negotiated every request that has no reply of its own
    is sent with NEED_REPLY, and a non-zero ack raises ReplyError, except the in-band
    notifications (``vring_call``, ``vring_err``): those are fire-and-forget unless asked to be
    ``sync``, so a ring worker never waits for the front-end. Requests that carry an fd need
    BACKEND_SEND_FD.

    Thread-safe: frames never interleave (the connection serialises sends); requests that wait
    for a reply take turns, and notifications go out between them without waiting their turn.
    An ack the front-end sends to a notification nobody waits for is read and dropped, never
    taken for the reply to a later request. A wrong reply, a timeout or a closed peer closes
    the channel.
    """

    def __init__(
        self,
        conn: Connection,
        *,
        negotiation: Negotiation | Callable[[], Negotiation],
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
    ) -> None:
        self.conn = conn
        self._negotiation = negotiation
        self.reply_timeout = reply_timeout
        self._lock = threading.Lock()
        self._closed = False
        self._unasked_lock = threading.Lock()
        self._unasked: dict[int, int] = dict.fromkeys(_NOTIFICATIONS, 0)
        """Notifications sent without NEED_REPLY and not acked (by a front-end that acks them)."""

    @property
    def negotiation(self) -> Negotiation:
        """The negotiated features the gates are checked against."""
        if isinstance(self._negotiation, Negotiation):
            return self._negotiation
        return self._negotiation()

    @property
    def reply_ack(self) -> bool:
        """Whether REPLY_ACK was negotiated (requests without a reply get NEED_REPLY)."""
        return bool(self.negotiation.protocol_features >> ProtocolFeature.REPLY_ACK & 1)

    @property
    def send_fd(self) -> bool:
        """Whether BACKEND_SEND_FD was negotiated (requests may carry an fd)."""
        return bool(self.negotiation.protocol_features >> ProtocolFeature.BACKEND_SEND_FD & 1)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_gate(self, request: BackendRequest) -> None:
        refusal = gate_refusal(request, self.negotiation)
        if refusal is not None:
            raise UnsupportedRequestError(f"BACKEND_{request.name}: {refusal}")

    def close(self) -> None:
        """Close the channel socket; later requests raise ConnectionClosedError."""
        self._closed = True
        self.conn.close()

    # --- requests --------------------------------------------------------------------------

    def config_change(self) -> None:
        """BACKEND_CONFIG_CHANGE_MSG: the device config space changed."""
        self._request(BackendRequest.CONFIG_CHANGE_MSG, Empty())

    def vring_host_notifier(self, index: int, fd: int | None, size: int, offset: int) -> None:
        """BACKEND_VRING_HOST_NOTIFIER_MSG: map ``size`` bytes of ``fd`` at ``offset`` as vring
        ``index``'s notify area, or remove the notifier when ``fd`` is None."""
        name = "BACKEND_VRING_HOST_NOTIFIER_MSG"
        _check_index(name, index)
        u64 = index if fd is not None else index | VRING_NOFD
        fds = [] if fd is None else [fd]
        self._request(BackendRequest.VRING_HOST_NOTIFIER_MSG, VringArea(u64, size, offset), fds)

    def vring_call(self, index: int, *, sync: bool = False) -> None:
        """BACKEND_VRING_CALL: in-band used-buffer notification for vring ``index``.

        Fire-and-forget: no NEED_REPLY, nothing awaited but room in the socket. ``sync`` (with
        REPLY_ACK) sets NEED_REPLY and waits until the front-end has processed the call, for
        simulations that need lock-step (libvhost-user's ``vu_queue_notify_sync``); a non-zero
        ack then raises ReplyError.
        """
        self._notify(BackendRequest.VRING_CALL, index, sync)

    def vring_err(self, index: int, *, sync: bool = False) -> None:
        """BACKEND_VRING_ERR: in-band error notification for vring ``index`` (as vring_call)."""
        self._notify(BackendRequest.VRING_ERR, index, sync)

    def iotlb(self, msg: IotlbMsg) -> None:
        """BACKEND_IOTLB_MSG: an IOTLB miss or access failure."""
        self._request(BackendRequest.IOTLB_MSG, msg)

    def shared_object_add(self, uuid_: uuid.UUID) -> None:
        """BACKEND_SHARED_OBJECT_ADD: export the object ``uuid_`` through the front-end."""
        self._request(BackendRequest.SHARED_OBJECT_ADD, SharedObject(uuid_))

    def shared_object_remove(self, uuid_: uuid.UUID) -> None:
        """BACKEND_SHARED_OBJECT_REMOVE: stop exporting ``uuid_``."""
        self._request(BackendRequest.SHARED_OBJECT_REMOVE, SharedObject(uuid_))

    def shared_object_lookup(self, uuid_: uuid.UUID) -> int:
        """BACKEND_SHARED_OBJECT_LOOKUP: the fd of ``uuid_`` (the caller owns it); ReplyError if
        the front-end does not know it."""
        reply = self._request(BackendRequest.SHARED_OBJECT_LOOKUP, SharedObject(uuid_))
        assert reply is not None
        status = reply.payload_as(U64).value
        if status != 0:
            raise ReplyError(
                f"BACKEND_SHARED_OBJECT_LOOKUP: uuid {uuid_} not found (status {status})"
            )
        if len(reply.fds) != 1:
            close_fds(reply.fds)
            self.close()
            raise ProtocolError(
                "success reply carries no fd", request="BACKEND_SHARED_OBJECT_LOOKUP", field="fds"
            )
        return reply.fds[0]

    def shmem_map(self, req: MMapRequest, fd: int) -> None:
        """BACKEND_SHMEM_MAP: map ``req.len`` bytes of ``fd`` into shared memory region
        ``req.shmid``. The caller keeps ``fd``."""
        self._request(BackendRequest.SHMEM_MAP, req, [fd])

    def shmem_unmap(self, req: MMapRequest) -> None:
        """BACKEND_SHMEM_UNMAP: unmap a range mapped before with shmem_map."""
        self._request(BackendRequest.SHMEM_UNMAP, req)

    # --- machinery ---------------------------------------------------------------------------

    def _notify(self, request: BackendRequest, index: int, sync: bool) -> None:
        name = f"BACKEND_{request.name}"
        _check_index(name, index)
        self._check_gate(request)
        if sync and self.reply_ack:
            self._request(request, VringState(index, 0))
            return
        msg = encode_request(request, VringState(index, 0))
        if self._closed:
            raise ConnectionClosedError(f"{name}: the back-end request channel is closed")
        with self._unasked_lock:
            self._unasked[request] += 1
        try:
            self.conn.send(msg)
        except (ConnectionClosedError, OSError) as exc:
            self.close()
            raise ConnectionClosedError(f"{name}: {exc}") from exc
        self._drop_stray_acks()

    def _drop_stray_acks(self) -> None:
        """Read acks to notifications already waiting in the socket, if no request is waiting
        for its reply: a front-end that acks every notification must not fill the socket until
        it blocks writing and stops reading ours."""
        if not self._lock.acquire(blocking=False):
            return  # a request is waiting for its reply and skips them itself
        try:
            while self._stray_ack_waiting():
                frame = self.conn.recv_frame(self.reply_timeout, backend_channel=True)
                close_fds(frame.fds)
        except (TimeoutError, ProtocolError, ConnectionClosedError, OSError) as exc:
            log.debug("back-end channel: %s while dropping notification acks", exc)
        finally:
            self._lock.release()

    def _stray_ack_waiting(self) -> bool:
        try:
            head = self.conn.socket.recv(HEADER_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:  # BlockingIOError: nothing to read
            return False
        if len(head) < HEADER_SIZE:
            return False
        number, flags, _ = _HEADER.unpack(head)
        return self._take_stray_ack(number, flags, None)

    def _take_stray_ack(self, number: int, flags: int, awaited: BackendRequest | None) -> bool:
        """Whether a frame with this header acks a notification sent without NEED_REPLY (and
        is not the reply awaited, which wins when they are alike); if so it is counted."""
        if number == awaited or not flags & FLAG_REPLY or number not in self._unasked:
            return False
        with self._unasked_lock:
            if self._unasked[number] == 0:
                return False
            self._unasked[number] -= 1
        return True

    def _recv_reply(self, request: BackendRequest) -> Message:
        """The reply to ``request``, skipping acks to notifications that nobody waits for."""
        deadline = time.monotonic() + self.reply_timeout
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            frame = self.conn.recv_frame(remaining, backend_channel=True)
            header = frame.header
            if self._take_stray_ack(header.request, header.flags, request):
                close_fds(frame.fds)
                continue
            return decode_reply(request, header, frame.payload, frame.fds, backend_channel=True)

    def _request(
        self, request: BackendRequest, payload: Payload, fds: list[int] | None = None
    ) -> Message | None:
        name = f"BACKEND_{request.name}"
        self._check_gate(request)
        fds = fds or []
        if fds and not self.send_fd:
            raise UnsupportedRequestError(
                f"{name}: cannot pass an fd: BACKEND_SEND_FD was not negotiated"
            )
        spec = spec_for(request)
        need_reply = self.reply_ack and not spec.always_replies
        msg = encode_request(request, payload, need_reply=need_reply, fds=fds)
        with self._lock:
            if self._closed:
                raise ConnectionClosedError(f"{name}: the back-end request channel is closed")
            try:
                self.conn.send(msg)
                if not (need_reply or spec.always_replies):
                    return None
                reply = self._recv_reply(request)
            except TimeoutError as exc:
                self.close()
                raise TimeoutError(
                    f"{name}: no reply from the front-end within {self.reply_timeout:g} s"
                ) from exc
            except (ProtocolError, ConnectionClosedError):
                self.close()
                raise
        if need_reply:
            ack = reply.payload
            close_fds(reply.fds)
            if not isinstance(ack, U64):
                self.close()
                raise ProtocolError(
                    f"expected a u64 ack, got {type(ack).__name__}", request=name, field="payload"
                )
            if ack.value != 0:
                raise ReplyError(f"{name}: front-end replied with error status {ack.value}")
        return reply


# --- front-end side ------------------------------------------------------------------------

Status = int | None
"""What a callback returns: 0 or None for success, any other int for failure."""

ConfigChangeCallback = Callable[[], Status]
HostNotifierCallback = Callable[[int, int | None, int, int], Status]
VringCallback = Callable[[int], Status]
IotlbCallback = Callable[[IotlbMsg], Status]
SharedObjectCallback = Callable[[uuid.UUID], Status]
LookupCallback = Callable[[uuid.UUID], int | None]
ShmemMapCallback = Callable[[MMapRequest, int], Status]
ShmemUnmapCallback = Callable[[MMapRequest], Status]


class BackendRequestHandler(Closing):
    """Front-end side of the ``BACKEND_REQ`` channel: serves back-end requests in a thread.

    Each request is decoded and handed to its callback (``on_*`` keyword arguments); the
    callback returns a status (0 / None success, other int failure) or raises (failure). The
    handler replies with that status when the back-end set NEED_REPLY, and always answers
    SHARED_OBJECT_LOOKUP (u64 0 and the fd the callback returns, or a non-zero u64 and no fd;
    the callback keeps ownership of the fd it returns). Fds passed to callbacks are borrowed:
    they are closed when the callback returns (``os.dup`` one to keep it). A request without a
    callback is answered with failure. A malformed message is logged, recorded in ``error``,
    and ends the channel (the connection is dropped); the handler itself never raises.
    """

    def __init__(
        self,
        *,
        on_config_change: ConfigChangeCallback | None = None,
        on_vring_host_notifier: HostNotifierCallback | None = None,
        on_vring_call: VringCallback | None = None,
        on_vring_err: VringCallback | None = None,
        on_iotlb: IotlbCallback | None = None,
        on_shared_object_add: SharedObjectCallback | None = None,
        on_shared_object_remove: SharedObjectCallback | None = None,
        on_shared_object_lookup: LookupCallback | None = None,
        on_shmem_map: ShmemMapCallback | None = None,
        on_shmem_unmap: ShmemUnmapCallback | None = None,
        name: str = "backend-req",
    ) -> None:
        self.on_config_change = on_config_change
        self.on_vring_host_notifier = on_vring_host_notifier
        self.on_vring_call = on_vring_call
        self.on_vring_err = on_vring_err
        self.on_iotlb = on_iotlb
        self.on_shared_object_add = on_shared_object_add
        self.on_shared_object_remove = on_shared_object_remove
        self.on_shared_object_lookup = on_shared_object_lookup
        self.on_shmem_map = on_shmem_map
        self.on_shmem_unmap = on_shmem_unmap
        self.name = name
        self.negotiation: Callable[[], Negotiation] | None = None
        """What the front-end negotiated (set by Frontend.set_backend_req_fd): requests whose
        gate it does not open are refused (failure status) without calling back."""
        self.conn: Connection | None = None
        self.error: BaseException | None = None
        """The protocol error that ended the channel, if one did."""
        self.handled = 0
        """Number of requests dispatched (well-formed ones only)."""
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dispatch: dict[BackendRequest, Callable[[Message], Status]] = {
            BackendRequest.CONFIG_CHANGE_MSG: self._config_change,
            BackendRequest.VRING_HOST_NOTIFIER_MSG: self._host_notifier,
            BackendRequest.VRING_CALL: self._vring_call,
            BackendRequest.VRING_ERR: self._vring_err,
            BackendRequest.IOTLB_MSG: self._iotlb,
            BackendRequest.SHARED_OBJECT_ADD: self._shared_object_add,
            BackendRequest.SHARED_OBJECT_REMOVE: self._shared_object_remove,
            BackendRequest.SHMEM_MAP: self._shmem_map,
            BackendRequest.SHMEM_UNMAP: self._shmem_unmap,
        }

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, conn: Connection) -> None:
        """Serve ``conn`` (the front-end's end of the channel, now owned) in a daemon thread."""
        if self._thread is not None:
            conn.close()
            raise RuntimeError(f"{self.name}: handler already started")
        self.conn = conn
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the serving thread to end (the back-end hung up); True if it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving: shut the socket down (which wakes the thread), join it, close."""
        self._stopping = True
        conn = self.conn
        if conn is not None and not conn.closed:
            with contextlib.suppress(OSError):
                conn.socket.shutdown(socket.SHUT_RDWR)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if conn is not None:
            conn.close()

    # --- serving -----------------------------------------------------------------------------

    def _serve(self) -> None:
        conn = self.conn
        assert conn is not None
        try:
            while True:
                try:
                    msg = conn.recv_request(backend_channel=True)
                except ConnectionClosedError:
                    log.debug("%s: back-end closed the channel", self.name)
                    return
                except ProtocolError as exc:
                    self.error = exc
                    log.warning(
                        "%s: bad back-end request, dropping the channel: %s", self.name, exc
                    )
                    return
                except OSError as exc:
                    if not self._stopping:
                        self.error = exc
                        log.warning("%s: channel failed: %s", self.name, exc)
                    return
                self.handled += 1
                try:
                    self._handle(conn, msg)
                except (ProtocolError, ConnectionClosedError, OSError) as exc:
                    if not self._stopping:
                        self.error = exc
                        log.warning("%s: cannot answer %s: %s", self.name, msg.name, exc)
                    return
                finally:
                    close_fds(msg.fds)
        finally:
            conn.close()

    def _handle(self, conn: Connection, msg: Message) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s", self.name, msg.describe())
        assert isinstance(msg.request, BackendRequest)
        refusal = (
            None if self.negotiation is None else gate_refusal(msg.request, self.negotiation())
        )
        if refusal is not None:
            log.warning("%s: %s refused: %s", self.name, msg.name, refusal)
            self._refuse(conn, msg)
            return
        if msg.request is BackendRequest.SHARED_OBJECT_LOOKUP:
            self._lookup(conn, msg)
            return
        status = self._call(msg, self._dispatch[msg.request])
        close_fds(msg.fds)
        if msg.need_reply:
            conn.send(encode_reply(msg.request, U64(status)))

    def _call(self, msg: Message, handler: Callable[[Message], Status]) -> int:
        try:
            status = handler(msg)
        except UnsupportedRequestError as exc:
            log.info("%s: %s not handled: %s", self.name, msg.name, exc)
            return FAILURE
        except Exception:
            log.exception("%s: callback for %s failed", self.name, msg.name)
            return FAILURE
        if status is None:
            return 0
        if not isinstance(status, int) or not 0 <= status < 1 << 64:
            log.warning(
                "%s: callback for %s returned %r; answering failure", self.name, msg.name, status
            )
            return FAILURE
        return status

    def _lookup(self, conn: Connection, msg: Message) -> None:
        uuid_ = msg.payload_as(SharedObject).uuid
        fd: int | None = None
        if self.on_shared_object_lookup is None:
            log.info("%s: %s not handled (no callback)", self.name, msg.name)
        else:
            try:
                fd = self.on_shared_object_lookup(uuid_)
            except Exception:
                log.exception("%s: callback for %s failed", self.name, msg.name)
        if fd is None:
            conn.send(encode_reply(msg.request, U64(FAILURE)))
        else:
            conn.send(encode_reply(msg.request, U64(0), fds=[fd]))

    @staticmethod
    def _refuse(conn: Connection, msg: Message) -> None:
        """Answer a request the negotiation does not allow: failure, if an answer is due."""
        close_fds(msg.fds)
        if msg.need_reply or spec_for(msg.request).always_replies:
            conn.send(encode_reply(msg.request, U64(FAILURE)))

    @staticmethod
    def _missing(msg: Message) -> UnsupportedRequestError:
        return UnsupportedRequestError(f"{msg.name}: no callback registered")

    def _config_change(self, msg: Message) -> Status:
        if self.on_config_change is None:
            raise self._missing(msg)
        return self.on_config_change()

    def _host_notifier(self, msg: Message) -> Status:
        if self.on_vring_host_notifier is None:
            raise self._missing(msg)
        area = msg.payload_as(VringArea)
        fd = None if area.nofd else msg.fds[0]
        return self.on_vring_host_notifier(area.index, fd, area.size, area.offset)

    def _vring_call(self, msg: Message) -> Status:
        if self.on_vring_call is None:
            raise self._missing(msg)
        return self.on_vring_call(msg.payload_as(VringState).index)

    def _vring_err(self, msg: Message) -> Status:
        if self.on_vring_err is None:
            raise self._missing(msg)
        return self.on_vring_err(msg.payload_as(VringState).index)

    def _iotlb(self, msg: Message) -> Status:
        if self.on_iotlb is None:
            raise self._missing(msg)
        return self.on_iotlb(msg.payload_as(IotlbMsg))

    def _shared_object_add(self, msg: Message) -> Status:
        if self.on_shared_object_add is None:
            raise self._missing(msg)
        return self.on_shared_object_add(msg.payload_as(SharedObject).uuid)

    def _shared_object_remove(self, msg: Message) -> Status:
        if self.on_shared_object_remove is None:
            raise self._missing(msg)
        return self.on_shared_object_remove(msg.payload_as(SharedObject).uuid)

    def _shmem_map(self, msg: Message) -> Status:
        if self.on_shmem_map is None:
            raise self._missing(msg)
        return self.on_shmem_map(msg.payload_as(MMapRequest), msg.fds[0])

    def _shmem_unmap(self, msg: Message) -> Status:
        if self.on_shmem_unmap is None:
            raise self._missing(msg)
        return self.on_shmem_unmap(msg.payload_as(MMapRequest))
