"""The messages between a daemon and its worker processes (``worker_mode="process"``).

One ``SOCK_SEQPACKET`` socketpair per worker: a message is one record, a JSON object naming its
``op`` with that op's fields, and the file descriptors it carries go with it as SCM_RIGHTS.
Nothing live is pickled: guest memory, the dirty log, the inflight region, eventfds and the image
cross as fds and numbers, and each side builds its own objects from them. Every message is
checked against :data:`MESSAGES` (its op known, each field there with its type) on both ends.

Requests (daemon -> worker) carry a ``seq`` when the daemon waits for the answer: ``ok`` with
the same ``seq`` and a ``result`` object, or ``error`` with a ``message``. ``schedule``,
``notify`` and ``bye`` are one-way. Reports (worker -> daemon, unasked): ``broken``, a queue the
worker stopped because its driver broke the ring or the device failed on it.

The ring of a started queue crosses as :func:`queue_fields` (ring addresses, size, position,
negotiated ring features) and is rebuilt by :func:`build_queue` on the worker's own mapping.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from pyvhost.errors import VhostError
from pyvhost.virtio.packed import PackedQueue, decode_packed_base
from pyvhost.virtio.split import SplitQueue

if TYPE_CHECKING:
    from pyvhost.virtio.inflight import InflightRegion
    from pyvhost.virtio.memory import GuestMemory
    from pyvhost.virtio.queue import DeviceQueue

__all__ = [
    "MAX_FDS",
    "MAX_MESSAGE",
    "MESSAGES",
    "Channel",
    "Message",
    "WireError",
    "build_queue",
    "close_fds",
    "decode",
    "encode",
    "queue_fields",
    "socketpair",
]

MAX_MESSAGE = 1 << 16
"""Largest record (a memory table of 32 regions is about 2 KiB)."""

MAX_FDS = 64
"""Most fds one message carries (a memory table: one per region, at most 32)."""

MESSAGES: dict[str, dict[str, type]] = {
    # daemon -> worker
    "hello": {"factory": str, "kwargs": dict, "name": str, "worker": int, "log_level": int,
              "sys_path": list, "poll_us": int},
    "memory": {"regions": list},  # [[mmap_offset, size, gpa, userspace_addr], ...] + one fd each
    "log": {"size": int, "offset": int},  # + the log's fd; no fd: logging stopped
    "inflight": {"mmap_size": int, "mmap_offset": int, "num_queues": int, "queue_size": int,
                 "packed": bool},  # + the region's fd; no fd: no region
    "start": {"index": int, "features": int, "enabled": bool, "queue": dict, "fds": list,
              "polling": bool},  # fds: the names ("kick", "call", "err") of the fds sent
    "notifiers": {"index": int, "fds": list},  # new call / err fds of a started queue
    "stop": {"index": int},
    "enable": {"index": int, "enabled": bool},
    "status": {"status": int},
    "reset": {},
    "stats": {"index": int},
    "schedule": {"index": int},
    "notify": {"index": int},
    "bye": {},
    # worker -> daemon
    "ok": {"seq": int, "result": dict},
    "error": {"seq": int, "message": str},
    "broken": {"index": int},
}  # fmt: skip
"""Every op and the fields it must have, with their JSON types (``seq`` is optional on a
request: present when the daemon waits for the answer)."""

_QUEUE_FIELDS: dict[str, type] = {
    "packed": bool,
    "size": int,
    "desc": int,
    "driver": int,
    "device": int,
    "log_used": bool,
    "used_log_gpa": int,
    "event_idx": bool,
    "indirect": bool,
    "base": int,
    "used_idx": int,
    "index": int,
}


class WireError(VhostError):
    """A message between the daemon and a worker that does not follow :data:`MESSAGES`."""


class Message(NamedTuple):
    """One decoded message: its op, its fields, and the fds it carried (now the receiver's)."""

    op: str
    fields: dict[str, Any]
    fds: list[int]


def _check(what: str, fields: dict[str, Any], schema: dict[str, type]) -> None:
    for key, kind in schema.items():
        if key not in fields:
            raise WireError(f"{what}: field {key!r} missing")
        value = fields[key]
        ok = type(value) is kind if kind in (int, bool) else isinstance(value, kind)
        if not ok:
            raise WireError(f"{what}: field {key!r} is {type(value).__name__}, not {kind.__name__}")
    seq = fields.get("seq")
    if seq is not None and type(seq) is not int:
        raise WireError(f"{what}: field 'seq' is {type(seq).__name__}, not int")


def encode(op: str, fields: dict[str, Any] | None = None) -> bytes:
    """The record for ``op`` with ``fields`` (checked against :data:`MESSAGES`)."""
    body = dict(fields or {})
    schema = MESSAGES.get(op)
    if schema is None:
        raise WireError(f"unknown op {op!r}")
    _check(op, body, schema)
    body["op"] = op
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise WireError(f"{op}: {len(data)} bytes is more than a record holds ({MAX_MESSAGE})")
    return data


def decode(data: bytes, fds: list[int]) -> Message:
    """The message in one record; the caller owns ``fds`` whatever happens."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"record of {len(data)} bytes is not JSON: {exc}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("op"), str):
        raise WireError("record is not an object with an op")
    op = body.pop("op")
    schema = MESSAGES.get(op)
    if schema is None:
        raise WireError(f"unknown op {op!r}")
    _check(op, body, schema)
    return Message(op, body, fds)


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd in ``fds`` (those a message carried and nobody took)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected SOCK_SEQPACKET pair (both ends close-on-exec)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class Channel:
    """One end of a worker's socket: whole messages with their fds, sends from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, op: str, fields: dict[str, Any] | None = None, fds: Sequence[int] = ()) -> None:
        """Send one message; the fds are duplicated into the receiver (the sender keeps its)."""
        data = encode(op, fields)
        with self._send_lock:
            socket.send_fds(self.sock, [data], list(fds))

    def recv(self) -> Message:
        """The next message; EOFError when the other end is gone."""
        data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE + 1, MAX_FDS)
        if not data:
            close_fds(fds)
            raise EOFError("the other end closed its socket")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            close_fds(fds)
            raise WireError(f"record truncated (flags {flags:#x})")
        try:
            return decode(data, fds)
        except BaseException:
            close_fds(fds)
            raise

    def shutdown(self) -> None:
        """Wake a receive blocked on this end (it sees EOF), from any thread."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


# -- rings ---------------------------------------------------------------------------------------


def queue_fields(queue: DeviceQueue) -> dict[str, Any]:
    """What a worker needs to build its own copy of the handler's freshly started ``queue``."""
    areas = queue.areas
    if isinstance(queue, SplitQueue):
        packed, used_log_gpa, used_idx = False, queue.used_log_gpa, queue.used_idx
    elif isinstance(queue, PackedQueue):
        packed, used_log_gpa, used_idx = True, areas.device, 0
    else:
        raise WireError(f"cannot hand a {type(queue).__name__} to a worker process")
    return {
        "packed": packed,
        "size": queue.size,
        "desc": areas.desc,
        "driver": areas.driver,
        "device": areas.device,
        "log_used": bool(areas.log),
        "used_log_gpa": used_log_gpa,
        "event_idx": bool(queue.event_idx),
        "indirect": bool(queue.indirect),
        "base": queue.get_base(),
        "used_idx": used_idx,
        "index": queue.queue_index,
    }


def build_queue(
    fields: dict[str, Any], mem: GuestMemory, inflight: InflightRegion | None
) -> DeviceQueue:
    """The worker's queue for :func:`queue_fields` on its own mapping of guest memory."""
    _check("start.queue", fields, _QUEUE_FIELDS)
    index = fields["index"]
    region = inflight if inflight is not None and index < inflight.num_queues else None
    common: dict[str, Any] = {
        "event_idx": fields["event_idx"],
        "indirect": fields["indirect"],
        "queue_index": index,
        "log_used": fields["log_used"],
    }
    if fields["packed"]:
        avail, avail_wrap, used, used_wrap = decode_packed_base(fields["base"])
        return PackedQueue(
            mem,
            fields["size"],
            fields["desc"],
            fields["driver"],
            fields["device"],
            last_avail_idx=avail,
            avail_wrap=avail_wrap,
            used_idx=used,
            used_wrap=used_wrap,
            inflight=region.packed_queue(index) if region is not None else None,
            **common,
        )
    return SplitQueue(
        mem,
        fields["size"],
        fields["desc"],
        fields["driver"],
        fields["device"],
        last_avail_idx=fields["base"],
        used_idx=fields["used_idx"],
        used_log_gpa=fields["used_log_gpa"],
        inflight=region.split_queue(index) if region is not None else None,
        **common,
    )
