"""``pyvhost serve``: run a vhost-user back-end on a Unix socket until SIGTERM / SIGINT.

Usage::

    pyvhost serve blk --socket PATH --image FILE [--readonly] [--queues N] [--client]
                      [--serial ID] [--workers N] [--worker-mode thread|process] [--queue-size N]
                      [--poll-us US]
                      [--require-sealed-memory]
    pyvhost serve rng --socket PATH [--client] [--require-sealed-memory]
    pyvhost serve net --socket PATH (--tap NAME [--kernel DEV] | --backend loopback|sink) ...
    pyvhost serve vsock --socket PATH --guest-cid CID --uds-path UDS [--client]

Connection events and errors are logged to stderr (one line each) unless ``--quiet``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from pyvhost.cli import serve_net, serve_vsock
from pyvhost.daemon.device import Device
from pyvhost.daemon.server import Daemon
from pyvhost.user.device import BackendDevice

__all__ = ["register", "run"]

log = logging.getLogger("pyvhost.serve")


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket", required=True, metavar="PATH", help="vhost-user Unix socket path"
    )
    parser.add_argument(
        "--client",
        action="store_true",
        help="connect to a front-end listening at PATH (QEMU server=on) instead of listening",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="queue workers (default 1: one loop thread serves every queue)",
    )
    parser.add_argument(
        "--worker-mode",
        choices=("thread", "process"),
        default="thread",
        help=(
            "workers are threads of this process (default) or worker processes, each with its "
            "own interpreter, so that ring work runs on several cores (devices that support it: "
            "blk)"
        ),
    )
    parser.add_argument(
        "--poll-us",
        type=_non_negative_int,
        default=0,
        metavar="US",
        help=(
            "after serving a ring, poll it this many microseconds (kicks suppressed) before "
            "sleeping again: lower latency at queue depth 1 for CPU time (default 0: off)"
        ),
    )
    parser.add_argument(
        "--require-sealed-memory",
        action="store_true",
        help=(
            "refuse guest memory and dirty-log fds the front-end could still shrink (not sealed "
            "with F_SEAL_SHRINK, as QEMU's memory-backend-memfd seals them) instead of warning"
        ),
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` sub-command with its ``blk``, ``rng``, ``net`` and ``vsock`` devices."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a vhost-user device (blk, rng, net, vsock) on a Unix socket",
        description=(
            "Run a vhost-user back-end. It serves one front-end at a time and waits for the "
            "next when one leaves; SIGTERM or SIGINT stop it and remove the socket."
        ),
    )
    devices = parser.add_subparsers(dest="device", metavar="DEVICE", required=True)

    blk = devices.add_parser(
        "blk",
        help="virtio-blk over a raw image file or block device",
        description="virtio-blk over a raw image file or block device.",
    )
    _common(blk)
    blk.add_argument("--image", required=True, metavar="FILE", help="raw image or block device")
    blk.add_argument(
        "--readonly", action="store_true", help="read-only disk (writes fail with IOERR)"
    )
    blk.add_argument("--queues", type=_positive_int, default=1, metavar="N", help="queues (1)")
    blk.add_argument("--serial", metavar="ID", help="serial number returned by GET_ID")
    blk.add_argument(
        "--queue-size", type=_positive_int, default=256, metavar="N", help="largest ring (256)"
    )

    rng = devices.add_parser(
        "rng",
        help="virtio-rng fed from os.getrandom",
        description="virtio-rng (entropy) fed from os.getrandom.",
    )
    _common(rng)
    serve_net.add_parser(devices, _common)
    serve_vsock.add_parser(devices, _common)


def _blk_factory(args: argparse.Namespace) -> Device:
    from pyvhost.devices.blk import BlkDevice

    return BlkDevice.from_args(args.image, args.readonly, args.queues, args.serial, args.queue_size)


def _rng_factory(args: argparse.Namespace) -> Device:
    from pyvhost.devices.rng import RngDevice

    return RngDevice()


_FACTORIES: dict[str, Callable[[argparse.Namespace], Device | BackendDevice]] = {
    "blk": _blk_factory,
    "rng": _rng_factory,
    "net": serve_net.factory,
    "vsock": serve_vsock.factory,
}


def _memory_safety(require_sealed: bool) -> None:
    """Apply ``--require-sealed-memory``; say how dirty-log bits will be set (a warning comes
    with it if not atomically) and what happens to fds the front-end could shrink."""
    from pyvhost.virtio.atomic import LOCKED, default_impl
    from pyvhost.virtio.memory import set_require_sealed_default

    set_require_sealed_default(require_sealed)
    impl = default_impl()
    how = "NOT atomic across processes" if impl == LOCKED else "atomic OR"
    log.info("dirty log: bits set with %s (%s)", impl, how)
    log.info(
        "guest memory: fds not sealed against shrinking are %s",
        "refused (--require-sealed-memory)" if require_sealed else "accepted with a warning",
    )


def run(args: argparse.Namespace) -> int:
    """Build the device, serve it until a signal, release it; 0 on a clean stop."""
    if not args.quiet:
        pkg = logging.getLogger("pyvhost")
        if pkg.getEffectiveLevel() > logging.INFO:
            pkg.setLevel(logging.INFO)
        if not logging.getLogger().handlers:
            logging.basicConfig(
                stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
    _memory_safety(args.require_sealed_memory)
    try:
        return _serve(args)
    finally:
        _memory_safety_reset()


def _serve(args: argparse.Namespace) -> int:
    """Build the device, serve it, release it (the body of :func:`run`)."""
    try:
        device = _FACTORIES[args.device](args)
    except (OSError, ValueError) as exc:
        print(f"pyvhost serve {args.device}: {exc}", file=sys.stderr)
        return 1
    try:
        daemon = Daemon(
            device,
            args.socket,
            client=args.client,
            workers=args.workers,
            worker_mode=args.worker_mode,
            poll_us=args.poll_us,
        )
    except ValueError as exc:
        print(f"pyvhost serve {args.device}: {exc}", file=sys.stderr)
        _close(device)
        return 1
    try:
        daemon.run()
    except OSError as exc:
        print(f"pyvhost serve {args.device}: {args.socket}: {exc}", file=sys.stderr)
        return 1
    finally:
        _close(device)
    return 0


def _close(device: object) -> None:
    close = getattr(device, "close", None)
    if callable(close):
        close()


def _memory_safety_reset() -> None:
    """Back to the library default, for callers that run ``serve`` inside a larger process."""
    from pyvhost.virtio.memory import set_require_sealed_default

    set_require_sealed_default(False)
