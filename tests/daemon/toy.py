"""Toy devices for the framework tests; ``python toy.py SOCKET [--hang] [--client]`` serves one.

``Upper`` answers each chain with its readable bytes upper-cased. With ``--hang`` it completes
every chain it pops except those whose request is ``b"hang"``, then stops forever with those
still in flight (completions out of order): a back-end to SIGKILL.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from pyvhost.daemon import Daemon, Device
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.queue import DeviceQueue


class Upper(Device):
    """Writes the readable bytes, upper-cased, into the writable part."""

    num_queues = 2
    queue_size = 64
    uses_inflight = True

    def __init__(self, *, hang: bool = False, num_queues: int = 2) -> None:
        self.hang = hang
        self.num_queues = num_queues
        self.config = bytearray(b"toy-config-0123")
        self.statuses: list[int] = []
        self.resets = 0
        self.threads: dict[int, set[str]] = {}
        self.handled: list[tuple[int, bytes]] = []

    def config_bytes(self) -> bytes:
        return bytes(self.config)

    def config_written(self, offset: int, data: bytes) -> None:
        if offset < 4:
            super().config_written(offset, data)
        self.config[offset : offset + len(data)] = data

    def status_changed(self, status: int) -> None:
        self.statuses.append(status)

    def on_reset(self) -> None:
        self.resets += 1

    def handle_queue(self, index: int, queue: DeviceQueue, mem: GuestMemory) -> None:
        self.threads.setdefault(index, set()).add(threading.current_thread().name)
        if not self.hang:
            super().handle_queue(index, queue, mem)
            return
        held = []
        for chain in queue.pop_batch(64):
            if chain.read_all() == b"hang":
                held.append(chain)
            else:
                queue.push(chain.head, self.handle_chain(index, chain, mem))
        if held:
            queue.enable_notifications()
            self.notify(index)
            print("hanging", flush=True)
            threading.Event().wait()

    def handle_chain(self, index: int, chain: DescriptorChain, mem: GuestMemory) -> int:
        data = chain.read_all()
        if data == b"boom":
            raise RuntimeError("device bug on purpose")
        self.handled.append((index, data))
        return chain.write_at(0, data.upper())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--client", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    Daemon(Upper(hang=args.hang), args.socket, client=args.client).run()


if __name__ == "__main__":
    main()
