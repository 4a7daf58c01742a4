"""``pyvhost serve vsock``: the hybrid virtio-vsock back-end (:mod:`pyvhost.devices.vsock`).

Usage::

    pyvhost serve vsock --socket PATH --guest-cid CID --uds-path UDS [--client]

A guest connection to host port P reaches whatever listens on the Unix socket ``UDS_P``; a host
program reaches guest port P by connecting to ``UDS`` and writing ``CONNECT P\\n`` (it reads
``OK <host port>\\n`` first). QEMU: ``-device vhost-user-vsock-pci,chardev=...`` (the guest CID
comes from this back-end's config space).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pyvhost.daemon.device import Device

__all__ = ["add_parser", "factory"]

_MAX_CID = 0xFFFF_FFFE


def _guest_cid(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 3 <= value <= _MAX_CID:
        raise argparse.ArgumentTypeError(
            f"{value} is not a guest CID (3..{_MAX_CID}; 0-2 and 2**32-1 are reserved)"
        )
    return value


def add_parser(
    devices: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``serve vsock``; ``common`` adds the options every ``serve`` device has."""
    vsock = devices.add_parser(
        "vsock",
        help="virtio-vsock bridged to Unix sockets (hybrid, as Firecracker)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(vsock)
    vsock.add_argument("--guest-cid", required=True, type=_guest_cid, metavar="CID")
    vsock.add_argument(
        "--uds-path",
        required=True,
        metavar="UDS",
        help="Unix socket for host programs (CONNECT <port>); UDS_<port> for the guest's",
    )


def factory(args: argparse.Namespace) -> Device:
    """The device ``serve vsock`` serves."""
    from pyvhost.devices.vsock import VsockDevice

    return VsockDevice(args.guest_cid, args.uds_path)
