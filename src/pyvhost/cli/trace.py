"""``pyvhost trace``: sit between a front-end and a back-end and print every message decoded."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from types import FrameType
from typing import IO, Any

from pyvhost.user.proxy import Direction, TraceEvent, TraceProxy

log = logging.getLogger(__name__)

DIRECTION_LABELS = {
    Direction.FRONT_TO_BACK: "F->B",
    Direction.BACK_TO_FRONT: "B->F",
    Direction.CHANNEL_BACK_TO_FRONT: "C:B->F",
    Direction.CHANNEL_FRONT_TO_BACK: "C:F->B",
}
"""Short labels for the text trace; ``C:`` marks the back-end channel (BACKEND_REQ)."""


def format_line(event: TraceEvent) -> str:
    """One human line: time, direction, request, header fields, decoded payload or error."""
    clock = time.strftime("%H:%M:%S", time.localtime(event.timestamp))
    micros = int(event.timestamp % 1 * 1_000_000)
    parts = [
        f"{clock}.{micros:06d}",
        f"{DIRECTION_LABELS[event.direction]:<6}",
        event.request + (" reply" if event.is_reply else ""),
        f"flags={event.flags:#x} size={event.size} fds={event.fds}",
    ]
    if event.details:
        parts.append(event.details)
    if event.error is not None:
        parts.append(f"ERROR: {event.error} raw={event.data[:64].hex()}")
    return " ".join(parts)


def event_record(event: TraceEvent) -> dict[str, Any]:
    """The JSON object written for one event with ``--json``."""
    record: dict[str, Any] = {
        "ts": event.timestamp,
        "dir": event.direction.value,
        "request": event.request,
        "reply": event.is_reply,
        "flags": event.flags,
        "size": event.size,
        "fds": event.fds,
        "fields": dict(event.fields),
        "error": event.error,
        "session": event.session,
    }
    if event.error is not None:
        record["raw"] = event.data.hex()
    return record


class TraceWriter:
    """Writes each event as a text line and, optionally, as a JSON line; flushes every time."""

    def __init__(self, out: IO[str], json_out: IO[str] | None = None) -> None:
        self.out = out
        self.json_out = json_out
        self.count = 0

    def __call__(self, event: TraceEvent) -> None:
        self.count += 1
        self.out.write(format_line(event) + "\n")
        self.out.flush()
        if self.json_out is not None:
            self.json_out.write(json.dumps(event_record(event), sort_keys=True) + "\n")
            self.json_out.flush()


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``trace`` sub-command."""
    parser = subparsers.add_parser(
        "trace",
        help="relay a front-end to a back-end and print every vhost-user message",
        description=(
            "Listen on --listen for a vhost-user front-end (e.g. QEMU), connect each one to the "
            "back-end at --connect, forward every message unchanged both ways (back-end channel "
            "included) and print it decoded, one line per message."
        ),
    )
    parser.add_argument(
        "--listen", required=True, metavar="PATH", help="Unix socket the front-end connects to"
    )
    parser.add_argument(
        "--connect", required=True, metavar="PATH", help="Unix socket of the back-end"
    )
    parser.add_argument(
        "--json", metavar="FILE", help="also write one JSON object per message to FILE"
    )
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument(
        "--count",
        type=_positive_int,
        metavar="N",
        help="exit after N front-ends have connected and left",
    )
    stop.add_argument(
        "--once", action="store_const", const=1, dest="count", help="the same as --count 1"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to retry connecting to the back-end (default 10)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def run(args: argparse.Namespace) -> int:
    """Run the proxy until SIGINT/SIGTERM or until --count front-ends have left."""
    json_out: IO[str] | None = None
    if args.json:
        try:
            json_out = open(args.json, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            print(f"pyvhost trace: cannot write {args.json}: {exc.strerror}", file=sys.stderr)
            return 1
    try:
        return _run(args, TraceWriter(sys.stdout, json_out))
    finally:
        if json_out is not None:
            json_out.close()


def _run(args: argparse.Namespace, writer: TraceWriter) -> int:
    proxy = TraceProxy(args.listen, args.connect, writer, connect_timeout=args.connect_timeout)
    try:
        proxy.start()
    except OSError as exc:
        print(f"pyvhost trace: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    done = threading.Event()
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            proxy.serve(args.count)
        except BaseException as exc:
            failure.append(exc)
        finally:
            done.set()

    signalled: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Only a list append: the main thread may be inside done.wait(), holding its lock.
        signalled.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=serve, name="trace-serve", daemon=True)
    log.info("trace: listening on %s, back-end %s", args.listen, args.connect)
    thread.start()
    try:
        while not signalled and not done.wait(0.2):
            pass
        if signalled:
            log.info("trace: %s, stopping", signal.Signals(signalled[0]).name)
    finally:
        proxy.stop()
        thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        print(f"pyvhost trace: {failure[0]}", file=sys.stderr)
        return 1
    log.info("trace: %d messages from %d front-ends", writer.count, proxy.sessions)
    return 0
