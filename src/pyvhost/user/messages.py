"""Sans-I/O vhost-user codec: headers, typed messages, the per-request table and validation.

Nothing here touches a socket: bytes and fds in, typed :class:`Message` out, and back.
Every rejection raises :class:`~pyvhost.errors.ProtocolError` naming the request and the field,
and closes the fds that came with the rejected message (decoding takes ownership of them).
"""

from __future__ import annotations

import contextlib
import os
import struct
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from pyvhost.errors import ProtocolError
from pyvhost.user.payloads import (
    PAYLOAD_TYPES,
    U64,
    Bytes,
    Config,
    DeviceStateTransfer,
    Empty,
    Inflight,
    IotlbMsg,
    Log,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    MMapRequest,
    Payload,
    RawPayload,
    SharedObject,
    ShmemConfig,
    VringAddr,
    VringArea,
    VringState,
)
from pyvhost.user.protocol import (
    DEVICE_STATE_NOFD,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION_MASK,
    FLAGS_KNOWN_MASK,
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_MEMORY_REGIONS,
    MAX_PAYLOAD_SIZE,
    MAX_SHMEM_REGIONS,
    VERSION,
    VRING_F_LOG,
    VRING_INDEX_MASK,
    VRING_NOFD,
    BackendRequest,
    ProtocolFeature,
    Request,
    protocol_error,
    protocol_feature_names,
)
from pyvhost.virtio.features import F_ACCESS_PLATFORM, F_LOG_ALL, F_PROTOCOL_FEATURES, feature_names

__all__ = [
    "BACKEND_REQUESTS",
    "DEVICE_STATE_NOFD",
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "FLAG_VERSION_MASK",
    "FRONTEND_REQUESTS",
    "F_LOG_ALL",
    "F_PROTOCOL_FEATURES",
    "HEADER_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_FDS",
    "MAX_MEMORY_REGIONS",
    "MAX_PAYLOAD_SIZE",
    "MAX_SHMEM_REGIONS",
    "PAYLOAD_TYPES",
    "U64",
    "VERSION",
    "VRING_F_LOG",
    "VRING_INDEX_MASK",
    "VRING_NOFD",
    "AnyRequest",
    "BackendRequest",
    "Config",
    "DeviceStateTransfer",
    "Empty",
    "Header",
    "Inflight",
    "IotlbMsg",
    "Log",
    "MMapRequest",
    "MemRegMsg",
    "MemoryRegion",
    "MemoryTable",
    "Message",
    "Negotiation",
    "Payload",
    "ProtocolError",
    "ProtocolFeature",
    "RawPayload",
    "Request",
    "RequestSpec",
    "SharedObject",
    "ShmemConfig",
    "VringAddr",
    "VringArea",
    "VringState",
    "close_fds",
    "decode_header",
    "decode_reply",
    "decode_request",
    "decode_request_bytes",
    "encode_header",
    "encode_message",
    "encode_reply",
    "encode_request",
    "gate_refusal",
    "protocol_feature_names",
    "replies_expected",
    "request_name",
    "spec_for",
]

AnyRequest = Request | BackendRequest
P = TypeVar("P")

_HEADER = struct.Struct("<III")
_REPLY_FLAGS = FLAG_REPLY | VERSION


def close_fds(fds: list[int]) -> None:
    """Close every fd in ``fds`` (ignoring already-closed ones) and empty the list."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def request_name(number: int, *, backend_channel: bool = False) -> str:
    """Spec name of a request number (``"request 99"`` when unknown)."""
    enum_type = BackendRequest if backend_channel else Request
    try:
        return f"BACKEND_{enum_type(number).name}" if backend_channel else enum_type(number).name
    except ValueError:
        return f"request {number}"


def _name(request: AnyRequest) -> str:
    return f"BACKEND_{request.name}" if isinstance(request, BackendRequest) else request.name


@dataclass(slots=True)
class Header:
    """The 12-byte message header: request number, flags, payload size."""

    request: int
    flags: int
    size: int

    def encode(self) -> bytes:
        return _HEADER.pack(self.request, self.flags, self.size)


def encode_header(request: int, flags: int, size: int) -> bytes:
    """Pack a header without validation (the fuzzers want to send bad ones too)."""
    return _HEADER.pack(request, flags, size)


def decode_header(data: Bytes, *, backend_channel: bool = False) -> Header:
    """Parse and check a header: length 12, version 1, only flag bits 0..3, size <= 4096."""
    if len(data) != HEADER_SIZE:
        raise protocol_error(None, "header", f"header is {len(data)} bytes, expected {HEADER_SIZE}")
    header = Header(*_HEADER.unpack(data))
    _check_header_flags(header, request_name(header.request, backend_channel=backend_channel))
    if header.size > MAX_PAYLOAD_SIZE:
        raise protocol_error(
            request_name(header.request, backend_channel=backend_channel),
            "size",
            f"size {header.size} exceeds the maximum payload of {MAX_PAYLOAD_SIZE} bytes",
        )
    return header


def _check_header_flags(header: Header, name: str) -> None:
    version = header.flags & FLAG_VERSION_MASK
    if version != VERSION:
        raise protocol_error(name, "flags", f"flags {header.flags:#x}: version {version} is not 1")
    if header.flags & ~FLAGS_KNOWN_MASK:
        raise protocol_error(
            name, "flags", f"flags {header.flags:#x} has reserved bits set (only bits 0..3 allowed)"
        )


@dataclass(slots=True)
class Message:
    """One decoded vhost-user message (a request or a reply) and the fds that came with it."""

    request: AnyRequest
    flags: int
    payload: Payload
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def name(self) -> str:
        """Spec name of the request (``BACKEND_`` prefix on the back-end channel)."""
        return _name(self.request)

    def payload_as(self, cls: type[P]) -> P:
        """The payload, checked to be a ``cls``; ProtocolError otherwise."""
        if not isinstance(self.payload, cls):
            raise protocol_error(
                self.name,
                "payload",
                f"expected a {cls.__name__} payload, got {type(self.payload).__name__}",
            )
        return self.payload

    def describe(self) -> str:
        """One line for humans: request, reply / need_reply markers, decoded fields, fd count."""
        parts = [self.name]
        if self.is_reply:
            parts.append("reply")
        if self.need_reply:
            parts.append("need_reply")
        text = self.payload.describe()
        if text:
            parts.append(text)
        if isinstance(self.payload, U64):
            parts.extend(self._feature_text(self.payload.value))
        if self.fds:
            parts.append(f"fds={len(self.fds)}")
        return " ".join(parts)

    def _feature_text(self, value: int) -> list[str]:
        if not isinstance(self.request, Request):
            return []
        if self.request in (Request.GET_FEATURES, Request.SET_FEATURES) and (
            self.is_reply or self.request is Request.SET_FEATURES
        ):
            return ["(" + "|".join(feature_names(value)) + ")"]
        if self.request in (Request.GET_PROTOCOL_FEATURES, Request.SET_PROTOCOL_FEATURES) and (
            self.is_reply or self.request is Request.SET_PROTOCOL_FEATURES
        ):
            return ["(" + "|".join(protocol_feature_names(value)) + ")"]
        return []


Validator = Callable[[Payload, int, str], None]


@dataclass(frozen=True)
class RequestSpec:
    """What one request carries and when it may be sent: the rulebook both ends read.

    ``always_replies``: the back-end (or front-end, on the back-end channel) replies even
    without NEED_REPLY; with ``replies_with`` set, only once that protocol feature is negotiated
    (SET_LOG_BASE: LOG_SHMFD). ``reply_fds`` bounds the fds of the reply; ``check`` /
    ``reply_check`` are the request-specific validators. The gates say what must be negotiated
    before the request is legal: ``protocol_feature`` (SET_PROTOCOL_FEATURES), ``acked_feature``
    (a feature bit acked with SET_FEATURES), ``offered_feature`` (a bit the back-end offers in
    GET_FEATURES). ``error_reply`` is how a request that always replies says "failed".
    """

    payload: type[Payload]
    reply: type[Payload] | None
    fds: tuple[int, int] = (0, 0)
    always_replies: bool = False
    reply_fds: tuple[int, int] = (0, 0)
    check: Validator | None = None
    reply_check: Validator | None = None
    protocol_feature: ProtocolFeature | None = None
    acked_feature: int | None = None
    offered_feature: int | None = None
    error_reply: Callable[[Message], Payload] | None = None
    replies_with: ProtocolFeature | None = None

    def replies(self, protocol_features: int) -> bool:
        """Whether the request is answered without NEED_REPLY, given the negotiated features."""
        if not self.always_replies:
            return False
        return self.replies_with is None or bool(protocol_features >> self.replies_with & 1)


@dataclass(frozen=True)
class Negotiation:
    """What one end knows of the negotiation: the inputs of every gate of the tables.

    ``offered_features`` is the back-end's GET_FEATURES answer (None before it was asked),
    ``features`` what SET_FEATURES acked, ``protocol_features`` what SET_PROTOCOL_FEATURES acked.
    """

    offered_features: int | None = None
    features: int = 0
    protocol_features: int = 0


def gate_refusal(request: AnyRequest, state: Negotiation) -> str | None:
    """Why ``request`` is not legal in ``state`` (the spec's "only if ..."), or None if it is."""
    spec = spec_for(request)
    if spec.offered_feature is not None:
        bit = spec.offered_feature
        what = f"{_feature_name(bit)} (bit {bit})"
        if state.offered_features is None:
            return f"call get_features() first: only legal if the back-end offers {what}"
        if not state.offered_features >> bit & 1:
            return f"the back-end does not offer {what} in features {state.offered_features:#x}"
    if spec.acked_feature is not None and not state.features >> spec.acked_feature & 1:
        bit = spec.acked_feature
        return (
            f"{_feature_name(bit)} (bit {bit}) was not acknowledged with SET_FEATURES "
            f"(features {state.features:#x})"
        )
    feature = spec.protocol_feature
    if feature is not None and not state.protocol_features >> feature & 1:
        return (
            f"protocol feature {feature.name} (bit {int(feature)}) was not negotiated "
            f"(protocol features {state.protocol_features:#x})"
        )
    return None


def _feature_name(bit: int) -> str:
    if bit == F_PROTOCOL_FEATURES:
        return "VHOST_USER_F_PROTOCOL_FEATURES"
    return f"VIRTIO_F_{feature_names(1 << bit)[0]}"


def _as(payload: Payload, cls: type[P], name: str) -> P:
    if not isinstance(payload, cls):
        raise protocol_error(name, "payload", f"expected a {cls.__name__} payload")
    return payload


def _expect_fds(name: str, nfds: int, expected: int, why: str) -> None:
    if nfds != expected:
        raise protocol_error(name, "fds", f"got {nfds} fds, expected {expected} ({why})")


def _check_vring_fd(payload: Payload, nfds: int, name: str) -> None:
    value = _as(payload, U64, name).value
    if value & ~(VRING_INDEX_MASK | VRING_NOFD):
        raise protocol_error(
            name, "u64", f"u64 {value:#x}: bits 9..63 must be zero (index is bits 0..7, NOFD bit 8)"
        )
    if value & VRING_NOFD:
        _expect_fds(name, nfds, 0, f"vring {value & VRING_INDEX_MASK} has the NOFD bit")
    else:
        _expect_fds(name, nfds, 1, f"vring {value & VRING_INDEX_MASK} without the NOFD bit")


def _check_mem_table(payload: Payload, nfds: int, name: str) -> None:
    nregions = len(_as(payload, MemoryTable, name).regions)
    _expect_fds(name, nfds, nregions, f"one per region, nregions {nregions}")


def _num_in(allowed: tuple[int, ...], why: str) -> Validator:
    def check(payload: Payload, nfds: int, name: str) -> None:
        state = _as(payload, VringState, name)
        if state.num not in allowed:
            raise protocol_error(name, "num", f"vring {state.index}: num {state.num} {why}")

    return check


def _check_host_notifier(payload: Payload, nfds: int, name: str) -> None:
    area = _as(payload, VringArea, name)
    why = f"vring {area.index} {'with' if area.nofd else 'without'} the NOFD bit"
    _expect_fds(name, nfds, 0 if area.nofd else 1, why)


def _check_device_state_reply(payload: Payload, nfds: int, name: str) -> None:
    value = _as(payload, U64, name).value
    if value & ~(0xFF | DEVICE_STATE_NOFD):
        raise protocol_error(name, "u64", f"u64 {value:#x}: bits 9..63 must be zero")
    if value & DEVICE_STATE_NOFD or value & 0xFF:
        _expect_fds(name, nfds, 0, "NOFD bit or error set")
    else:
        _expect_fds(name, nfds, 1, "success without the NOFD bit")


def _check_lookup_reply(payload: Payload, nfds: int, name: str) -> None:
    if _as(payload, U64, name).value != 0:
        _expect_fds(name, nfds, 0, "lookup failed")


_NUM_ZERO = _num_in((0,), "must be 0 (reserved)")
PF = ProtocolFeature


def _u64_failure(msg: Message) -> Payload:
    return U64(1)


FRONTEND_REQUESTS: Mapping[Request, RequestSpec] = types.MappingProxyType(
    {
        Request.GET_FEATURES: RequestSpec(Empty, U64, always_replies=True),
        Request.SET_FEATURES: RequestSpec(U64, None),
        Request.SET_OWNER: RequestSpec(Empty, None),
        Request.RESET_OWNER: RequestSpec(Empty, None),
        Request.SET_MEM_TABLE: RequestSpec(
            MemoryTable, MemoryTable, (0, MAX_MEMORY_REGIONS), check=_check_mem_table
        ),
        Request.SET_LOG_BASE: RequestSpec(
            Log,
            U64,
            (0, 1),
            always_replies=True,
            protocol_feature=PF.LOG_SHMFD,
            error_reply=_u64_failure,
            replies_with=PF.LOG_SHMFD,
        ),
        Request.SET_LOG_FD: RequestSpec(Empty, None, (1, 1)),
        Request.SET_VRING_NUM: RequestSpec(VringState, None),
        Request.SET_VRING_ADDR: RequestSpec(VringAddr, None),
        Request.SET_VRING_BASE: RequestSpec(VringState, None),
        Request.GET_VRING_BASE: RequestSpec(
            VringState, VringState, always_replies=True, check=_NUM_ZERO
        ),
        Request.SET_VRING_KICK: RequestSpec(U64, None, (0, 1), check=_check_vring_fd),
        Request.SET_VRING_CALL: RequestSpec(U64, None, (0, 1), check=_check_vring_fd),
        Request.SET_VRING_ERR: RequestSpec(U64, None, (0, 1), check=_check_vring_fd),
        Request.GET_PROTOCOL_FEATURES: RequestSpec(
            Empty, U64, always_replies=True, offered_feature=F_PROTOCOL_FEATURES
        ),
        Request.SET_PROTOCOL_FEATURES: RequestSpec(U64, None, offered_feature=F_PROTOCOL_FEATURES),
        Request.GET_QUEUE_NUM: RequestSpec(Empty, U64, always_replies=True, protocol_feature=PF.MQ),
        Request.SET_VRING_ENABLE: RequestSpec(
            VringState,
            None,
            check=_num_in((0, 1), "is not 0 (disable) or 1 (enable)"),
            offered_feature=F_PROTOCOL_FEATURES,
        ),
        Request.SEND_RARP: RequestSpec(U64, None, protocol_feature=PF.RARP),
        Request.NET_SET_MTU: RequestSpec(U64, None, protocol_feature=PF.MTU),
        Request.SET_BACKEND_REQ_FD: RequestSpec(
            Empty, None, (1, 1), protocol_feature=PF.BACKEND_REQ
        ),
        Request.IOTLB_MSG: RequestSpec(
            IotlbMsg,
            U64,
            always_replies=True,
            acked_feature=F_ACCESS_PLATFORM,
            error_reply=_u64_failure,
        ),
        Request.SET_VRING_ENDIAN: RequestSpec(
            VringState,
            None,
            check=_num_in((0, 1), "is not 0 (little) or 1 (big endian)"),
            protocol_feature=PF.CROSS_ENDIAN,
        ),
        Request.GET_CONFIG: RequestSpec(
            Config,
            Config,
            always_replies=True,
            protocol_feature=PF.CONFIG,
            error_reply=lambda msg: Empty(),
        ),
        Request.SET_CONFIG: RequestSpec(Config, None, protocol_feature=PF.CONFIG),
        Request.CREATE_CRYPTO_SESSION: RequestSpec(
            RawPayload, RawPayload, always_replies=True, protocol_feature=PF.CRYPTO_SESSION
        ),
        Request.CLOSE_CRYPTO_SESSION: RequestSpec(U64, None, protocol_feature=PF.CRYPTO_SESSION),
        Request.POSTCOPY_ADVISE: RequestSpec(
            Empty,
            Empty,
            always_replies=True,
            reply_fds=(0, 1),
            protocol_feature=PF.PAGEFAULT,
            error_reply=lambda msg: Empty(),
        ),
        Request.POSTCOPY_LISTEN: RequestSpec(Empty, None, protocol_feature=PF.PAGEFAULT),
        Request.POSTCOPY_END: RequestSpec(
            Empty,
            U64,
            always_replies=True,
            protocol_feature=PF.PAGEFAULT,
            error_reply=_u64_failure,
        ),
        Request.GET_INFLIGHT_FD: RequestSpec(
            Inflight,
            Inflight,
            always_replies=True,
            reply_fds=(0, 1),
            protocol_feature=PF.INFLIGHT_SHMFD,
            error_reply=lambda msg: Inflight(0, 0, 0, 0),
        ),
        Request.SET_INFLIGHT_FD: RequestSpec(
            Inflight, None, (1, 1), protocol_feature=PF.INFLIGHT_SHMFD
        ),
        Request.GPU_SET_SOCKET: RequestSpec(Empty, None, (1, 1)),
        Request.RESET_DEVICE: RequestSpec(Empty, None, protocol_feature=PF.RESET_DEVICE),
        Request.VRING_KICK: RequestSpec(
            VringState, None, check=_NUM_ZERO, protocol_feature=PF.INBAND_NOTIFICATIONS
        ),
        Request.GET_MAX_MEM_SLOTS: RequestSpec(
            Empty, U64, always_replies=True, protocol_feature=PF.CONFIGURE_MEM_SLOTS
        ),
        Request.ADD_MEM_REG: RequestSpec(
            MemRegMsg, MemRegMsg, (1, 1), protocol_feature=PF.CONFIGURE_MEM_SLOTS
        ),
        Request.REM_MEM_REG: RequestSpec(
            MemRegMsg, MemRegMsg, (0, 1), protocol_feature=PF.CONFIGURE_MEM_SLOTS
        ),
        Request.SET_STATUS: RequestSpec(U64, None, protocol_feature=PF.STATUS),
        Request.GET_STATUS: RequestSpec(
            Empty, U64, always_replies=True, protocol_feature=PF.STATUS
        ),
        Request.GET_SHARED_OBJECT: RequestSpec(
            SharedObject,
            SharedObject,
            always_replies=True,
            reply_fds=(0, 1),
            protocol_feature=PF.SHARED_OBJECT,
            error_reply=lambda msg: msg.payload_as(SharedObject),
        ),
        Request.SET_DEVICE_STATE_FD: RequestSpec(
            DeviceStateTransfer,
            U64,
            (1, 1),
            always_replies=True,
            reply_fds=(0, 1),
            reply_check=_check_device_state_reply,
            protocol_feature=PF.DEVICE_STATE,
            error_reply=lambda msg: U64(DEVICE_STATE_NOFD | 1),
        ),
        Request.CHECK_DEVICE_STATE: RequestSpec(
            Empty,
            U64,
            always_replies=True,
            protocol_feature=PF.DEVICE_STATE,
            error_reply=_u64_failure,
        ),
        Request.GET_SHMEM_CONFIG: RequestSpec(
            Empty, ShmemConfig, always_replies=True, protocol_feature=PF.SHMEM
        ),
    }
)

BACKEND_REQUESTS: Mapping[BackendRequest, RequestSpec] = types.MappingProxyType(
    {
        BackendRequest.IOTLB_MSG: RequestSpec(IotlbMsg, None, acked_feature=F_ACCESS_PLATFORM),
        BackendRequest.CONFIG_CHANGE_MSG: RequestSpec(Empty, None, protocol_feature=PF.CONFIG),
        BackendRequest.VRING_HOST_NOTIFIER_MSG: RequestSpec(
            VringArea,
            None,
            (0, 1),
            check=_check_host_notifier,
            protocol_feature=PF.HOST_NOTIFIER,
        ),
        BackendRequest.VRING_CALL: RequestSpec(
            VringState, None, check=_NUM_ZERO, protocol_feature=PF.INBAND_NOTIFICATIONS
        ),
        BackendRequest.VRING_ERR: RequestSpec(
            VringState, None, check=_NUM_ZERO, protocol_feature=PF.INBAND_NOTIFICATIONS
        ),
        BackendRequest.SHARED_OBJECT_ADD: RequestSpec(
            SharedObject, None, protocol_feature=PF.SHARED_OBJECT
        ),
        BackendRequest.SHARED_OBJECT_REMOVE: RequestSpec(
            SharedObject, None, protocol_feature=PF.SHARED_OBJECT
        ),
        BackendRequest.SHARED_OBJECT_LOOKUP: RequestSpec(
            SharedObject,
            U64,
            always_replies=True,
            reply_fds=(0, 1),
            reply_check=_check_lookup_reply,
            protocol_feature=PF.SHARED_OBJECT,
        ),
        BackendRequest.SHMEM_MAP: RequestSpec(MMapRequest, None, (1, 1), protocol_feature=PF.SHMEM),
        BackendRequest.SHMEM_UNMAP: RequestSpec(MMapRequest, None, protocol_feature=PF.SHMEM),
    }
)

# Replies a peer may legitimately send besides the declared reply type.
_REPLY_ALTERNATIVES: Mapping[Request, tuple[type[Payload], ...]] = types.MappingProxyType(
    {
        Request.GET_CONFIG: (Empty,),  # size 0 signals an error
        Request.GET_SHARED_OBJECT: (Empty, U64),
    }
)


def spec_for(request: AnyRequest) -> RequestSpec:
    """The table entry of ``request`` (front-end or back-end channel by its enum type)."""
    if isinstance(request, BackendRequest):
        return BACKEND_REQUESTS[request]
    return FRONTEND_REQUESTS[request]


def _lookup(number: int, backend_channel: bool) -> AnyRequest:
    try:
        return BackendRequest(number) if backend_channel else Request(number)
    except ValueError:
        side = "back-end" if backend_channel else "front-end"
        raise protocol_error(
            f"request {number}", "request", f"unknown {side} request number {number}"
        ) from None


def _check_fd_range(name: str, nfds: int, bounds: tuple[int, int]) -> None:
    low, high = bounds
    if not low <= nfds <= high:
        expected = str(low) if low == high else f"{low}..{high}"
        raise protocol_error(name, "fds", f"got {nfds} fds, expected {expected}")


def _decode_payload(cls: type[Payload], data: Bytes, name: str) -> Payload:
    return cls.decode(data, request=name)


def encode_message(msg: Message) -> tuple[bytes, list[int]]:
    """Header + payload bytes and the fds to send with the first byte; no semantic checks."""
    body = msg.payload.encode()
    if len(body) > MAX_PAYLOAD_SIZE:
        raise protocol_error(
            msg.name, "size", f"payload size {len(body)} exceeds {MAX_PAYLOAD_SIZE}"
        )
    if len(msg.fds) > MAX_FDS:
        raise protocol_error(msg.name, "fds", f"{len(msg.fds)} fds exceed {MAX_FDS}")
    return _HEADER.pack(msg.request, msg.flags, len(body)) + body, list(msg.fds)


def encode_request(
    request: AnyRequest,
    payload: Payload | None = None,
    *,
    need_reply: bool = False,
    fds: Iterable[int] = (),
) -> Message:
    """Build a checked request message (payload type, fd count, request-specific rules)."""
    spec = spec_for(request)
    name = _name(request)
    if payload is None:
        payload = Empty()
    if not isinstance(payload, spec.payload):
        raise TypeError(
            f"{name}: payload must be {spec.payload.__name__}, not {type(payload).__name__}"
        )
    fd_list = list(fds)
    _check_fd_range(name, len(fd_list), spec.fds)
    if spec.check is not None:
        spec.check(payload, len(fd_list), name)
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return Message(request, flags, payload, fd_list)


def _reply_types(request: AnyRequest, spec: RequestSpec) -> tuple[type[Payload], ...]:
    declared: tuple[type[Payload], ...] = (spec.reply,) if spec.reply is not None else ()
    extra = _REPLY_ALTERNATIVES.get(request, ()) if isinstance(request, Request) else ()
    if spec.always_replies:
        return declared + extra
    return (U64, *declared, *extra)


def encode_reply(request: AnyRequest, payload: Payload, *, fds: Iterable[int] = ()) -> Message:
    """Build a reply to ``request`` (flags REPLY|VERSION); checks payload type and fd count."""
    spec = spec_for(request)
    name = _name(request)
    allowed = _reply_types(request, spec)
    if not isinstance(payload, allowed):
        names = ", ".join(t.__name__ for t in allowed) or "none"
        raise TypeError(f"{name}: reply payload must be one of {names}")
    fd_list = list(fds)
    bounds = spec.reply_fds if type(payload) is spec.reply else (0, 0)
    _check_fd_range(name, len(fd_list), bounds)
    if spec.reply_check is not None and type(payload) is spec.reply:
        spec.reply_check(payload, len(fd_list), name)
    return Message(request, _REPLY_FLAGS, payload, fd_list)


def decode_request(
    header: Header, payload: Bytes, fds: list[int], *, backend_channel: bool = False
) -> Message:
    """Decode and validate a request (from the front-end, or the back-end on its channel).

    Takes ownership of ``fds``: on success they move into the Message; on rejection they
    are closed and the list is emptied.
    """
    try:
        request = _lookup(header.request, backend_channel)
        name = _name(request)
        spec = spec_for(request)
        _check_header_flags(header, name)
        if header.flags & FLAG_REPLY:
            raise protocol_error(
                name, "flags", f"flags {header.flags:#x}: REPLY flag set on a request"
            )
        _check_sizes(header, payload, name)
        _check_fd_range(name, len(fds), spec.fds)
        body = _decode_payload(spec.payload, payload, name)
        if spec.check is not None:
            spec.check(body, len(fds), name)
    except BaseException:
        close_fds(fds)
        raise
    return Message(request, header.flags, body, list(fds))


def decode_request_bytes(data: Bytes, fds: list[int], *, backend_channel: bool = False) -> Message:
    """Decode a whole request (header + payload) from one buffer; fds as in decode_request."""
    try:
        header = decode_header(data[:HEADER_SIZE], backend_channel=backend_channel)
    except BaseException:
        close_fds(fds)
        raise
    return decode_request(header, data[HEADER_SIZE:], fds, backend_channel=backend_channel)


def _check_sizes(header: Header, payload: Bytes, name: str) -> None:
    if header.size > MAX_PAYLOAD_SIZE:
        raise protocol_error(
            name, "size", f"size {header.size} exceeds the maximum payload of {MAX_PAYLOAD_SIZE}"
        )
    if len(payload) != header.size:
        raise protocol_error(
            name, "size", f"header size {header.size} but {len(payload)} payload bytes"
        )


def _pick_reply_type(candidates: tuple[type[Payload], ...], size: int, name: str) -> type[Payload]:
    for cls in candidates:
        if size == cls.SIZE:
            return cls
    for cls in candidates:
        if cls.SIZE is None:
            return cls
    expected = " or ".join(f"{c.SIZE} ({c.__name__})" for c in candidates)
    raise protocol_error(name, "size", f"reply size {size} is wrong (expected {expected})")


def decode_reply(
    request: AnyRequest,
    header: Header,
    payload: Bytes,
    fds: list[int],
    *,
    backend_channel: bool = False,
) -> Message:
    """Decode and validate a reply to ``request``; same fd ownership rules as decode_request.

    A u64 ack is accepted for requests that reply only when NEED_REPLY was set; requests
    that always reply must use their declared reply type (GET_CONFIG may reply with an
    empty payload to signal failure: the Message then carries ``Empty``).
    """
    try:
        if backend_channel and not isinstance(request, BackendRequest):
            request = _lookup(int(request), True)
        name = _name(request)
        spec = spec_for(request)
        if header.flags != _REPLY_FLAGS:
            raise protocol_error(
                name,
                "flags",
                f"reply flags {header.flags:#x} are not exactly REPLY|VERSION ({_REPLY_FLAGS:#x})",
            )
        if header.request != request:
            raise protocol_error(
                name,
                "request",
                f"reply is for {request_name(header.request, backend_channel=backend_channel)}"
                f" ({header.request}), expected request {int(request)}",
            )
        _check_sizes(header, payload, name)
        candidates = _reply_types(request, spec)
        if not candidates:
            raise protocol_error(name, "request", "this request has no reply")
        cls = _pick_reply_type(candidates, len(payload), name)
        bounds = spec.reply_fds if cls is spec.reply else (0, 0)
        _check_fd_range(name, len(fds), bounds)
        body = _decode_payload(cls, payload, name)
        if spec.reply_check is not None and cls is spec.reply:
            spec.reply_check(body, len(fds), name)
    except BaseException:
        close_fds(fds)
        raise
    return Message(request, header.flags, body, list(fds))


def replies_expected(msg: Message, protocol_features: int = 0) -> bool:
    """Whether the peer will answer ``msg``: NEED_REPLY, or a request that always replies
    (given the negotiated ``protocol_features``: SET_LOG_BASE replies only with LOG_SHMFD)."""
    return msg.need_reply or spec_for(msg.request).replies(protocol_features)
