"""A complete vhost-user device in a page of Python: it upper-cases what the driver sends.

Run it:   python examples/upper.py /tmp/upper.sock
Drive it: see tests/test_examples.py (pyvhost's driver side plays the guest; no VM needed).
"""

from __future__ import annotations

import logging
import sys

from pyvhost.daemon import Daemon, Device
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory


class UpperDevice(Device):
    """One queue; each request is a readable buffer, answered in the writable one, upper-cased."""

    device_id = 0  # not a registered virtio type: a vhost-user back-end for tests and examples
    num_queues = 1
    queue_size = 256

    def config_bytes(self) -> bytes:
        return b"UPPER\0\0\0"

    def handle_chain(self, index: int, chain: DescriptorChain, mem: GuestMemory) -> int:
        return chain.write_at(0, chain.read_all().upper())


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Daemon(UpperDevice, argv[1]).run()  # SIGTERM / SIGINT stop it and remove the socket
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
