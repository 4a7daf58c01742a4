"""``pyvhost serve net``: the virtio-net back-end (:mod:`pyvhost.devices.net`) on a socket.

Usage::

    pyvhost serve net --socket PATH (--tap NAME | --backend loopback|sink) [--mac MAC]
                      [--queues N] [--mtu N] [--client] [--queue-size N] [--rx-backlog N]
                      [--stats-interval S] [--workers N]
    pyvhost serve net --socket PATH --tap NAME --kernel /dev/vhost-net [--client]

Counters (frames, bytes, drops by reason) are logged every ``--stats-interval`` seconds and
when the daemon stops. With ``--kernel`` the rings are handed to the kernel's vhost-net and no
frame passes through Python (one queue pair; the front-end emulates the config space).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pyvhost.daemon.device import Device
from pyvhost.errors import VhostError
from pyvhost.user.device import BackendDevice

__all__ = ["add_parser", "factory"]


def _count(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _mac(text: str) -> bytes:
    from pyvhost.devices.net.config import parse_mac

    try:
        return parse_mac(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(
    devices: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``serve net`` with the options every ``serve`` device has (``common``)."""
    net = devices.add_parser(
        "net",
        help="virtio-net over a TAP, or a loopback or sink for tests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(net)
    where = net.add_mutually_exclusive_group(required=True)
    where.add_argument("--tap", metavar="NAME", help="TAP interface to create or attach")
    where.add_argument(
        "--backend",
        choices=("loopback", "sink"),
        help="loopback: every frame sent comes back; sink: frames sent are counted and dropped",
    )
    net.add_argument(
        "--kernel",
        metavar="DEV",
        help="hand the rings to this vhost-net device (e.g. /dev/vhost-net); needs --tap",
    )
    net.add_argument(
        "--mac", type=_mac, help="the guest's MAC (default: random, locally administered)"
    )
    net.add_argument("--queues", type=_count, default=1, metavar="N", help="queue pairs (1)")
    net.add_argument(
        "--mtu",
        type=_count,
        default=1500,
        metavar="N",
        help="MTU offered to the guest, and given to a TAP this creates (1500)",
    )
    net.add_argument(
        "--queue-size", type=_count, default=256, metavar="N", help="largest ring (256)"
    )
    net.add_argument(
        "--rx-backlog",
        type=_count,
        default=256,
        metavar="N",
        help="frames per pair that wait for receive buffers before drops (256)",
    )
    net.add_argument(
        "--stats-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="log the counters every S seconds (0: only at exit; default 10)",
    )


def factory(args: argparse.Namespace) -> Device | BackendDevice:
    """The :class:`~pyvhost.devices.net.NetDevice` the command line describes, or with
    ``--kernel`` the :class:`~pyvhost.devices.net.kernel.KernelNetDevice`."""
    from pyvhost.devices.net.config import check_mtu

    check_mtu(args.mtu)
    if args.kernel:
        return _kernel_factory(args)
    from pyvhost.devices.net import BACKENDS, NetBackend, NetDevice, TapBackend

    try:
        backend: NetBackend = (
            TapBackend(args.tap, args.queues, mtu=args.mtu)
            if args.tap
            else BACKENDS[args.backend](args.queues)
        )
    except VhostError as exc:
        raise ValueError(str(exc)) from exc
    try:
        return NetDevice(
            backend,
            mac=args.mac,
            mtu=args.mtu,
            queue_size=args.queue_size,
            backlog=args.rx_backlog,
            stats_interval=args.stats_interval,
        )
    except BaseException:
        backend.close()
        raise


def _kernel_factory(args: argparse.Namespace) -> BackendDevice:
    from pyvhost.devices.net.backends import apply_mtu, interface_exists
    from pyvhost.devices.net.kernel import KernelNetDevice
    from pyvhost.kernel.tap import Tap

    if not args.tap:
        raise ValueError("--kernel needs --tap NAME: vhost-net moves frames to and from a TAP")
    if args.queues != 1:
        raise ValueError("--kernel serves one queue pair (--queues 1)")
    owned = not interface_exists(args.tap)
    try:
        tap = Tap.open(args.tap)
    except VhostError as exc:
        raise ValueError(str(exc)) from exc
    try:
        apply_mtu(tap, args.mtu, owned)
        tap.set_up()
        return KernelNetDevice(tap, args.kernel, owns_tap=owned)
    except VhostError as exc:
        tap.close()
        raise ValueError(str(exc)) from exc
    except BaseException:
        tap.close()
        raise
