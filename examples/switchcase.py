"""A device with an fd of its own: requests come back in the case a control socket chose.

Run it:    python examples/switchcase.py /tmp/case.sock /tmp/case.ctl
Switch it: printf lower | socat - UNIX-SENDTO:/tmp/case.ctl
Drive it:  see tests/test_examples.py (pyvhost's driver side plays the guest; no VM needed).

The control socket is watched by the daemon's event loop (``Device.watch``): its callback runs on
the worker thread that serves queue 0, so a switch never lands in the middle of a batch. The
config space shows the current case, and the driver is told when it changes.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from pyvhost.daemon import Daemon, Device
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory

log = logging.getLogger("switchcase")

CASES = {b"upper": bytes.upper, b"lower": bytes.lower}


class SwitchCaseDevice(Device):
    """One queue; each request's readable bytes are answered in the current case."""

    device_id = 0  # not a registered virtio type: a vhost-user back-end for tests and examples
    num_queues = 1
    queue_size = 256

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.case = b"upper"
        self.watch(control.fileno(), self.on_control, queue=0)

    def config_bytes(self) -> bytes:
        return self.case.ljust(8, b"\0")

    def on_control(self, fd: int) -> None:
        command = self.control.recv(64).strip()
        if command not in CASES:
            log.warning("control: %r is neither 'upper' nor 'lower'", command)
            return
        self.case = command
        self.notify_config_change()

    def handle_chain(self, index: int, chain: DescriptorChain, mem: GuestMemory) -> int:
        return chain.write_at(0, CASES[self.case](chain.read_all()))


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    socket_path, control_path = argv[1], argv[2]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as control:
        control.bind(control_path)
        try:
            Daemon(SwitchCaseDevice(control), socket_path).run()
        finally:
            os.unlink(control_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
