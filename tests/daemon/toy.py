"""Toy devices for the framework tests; ``python toy.py SOCKET [--hang] [--client]
[--workers N] [--worker-mode thread|process] [--hang-once FLAG]`` serves one.

``Upper`` answers each chain with its readable bytes upper-cased. With ``--hang`` it completes
every chain it pops except those whose request is ``b"hang"``, then stops forever with those
still in flight (completions out of order): a back-end to SIGKILL. ``--hang-once FLAG`` hangs
like that only while the file FLAG does not exist, and creates it (a worker process started
after the first one was killed then completes the request). ``Upper`` can be served by worker
processes (``process_spec``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

from pyvhost.daemon import Daemon, Device
from pyvhost.daemon.device import DeviceSpec
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.queue import DeviceQueue


class Upper(Device):
    """Writes the readable bytes, upper-cased, into the writable part."""

    num_queues = 2
    queue_size = 64
    uses_inflight = True

    def __init__(
        self, *, hang: bool = False, num_queues: int = 2, hang_once: str | None = None
    ) -> None:
        self.hang = hang or hang_once is not None
        self.hang_once = hang_once
        self.num_queues = num_queues
        self.config = bytearray(b"toy-config-0123")
        self.statuses: list[int] = []
        self.resets = 0
        self.threads: dict[int, set[str]] = {}
        self.handled: list[tuple[int, bytes]] = []

    def process_spec(self) -> DeviceSpec | None:
        module = type(self).__module__
        if module == "__main__":  # python toy.py: its directory is on the daemon's sys.path
            module = "toy"
        return DeviceSpec(
            f"{module}:{type(self).__qualname__}",
            {"hang": self.hang, "num_queues": self.num_queues, "hang_once": self.hang_once},
        )

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
        if held and self.hang_once is not None:
            if os.path.exists(self.hang_once):
                for chain in held:
                    queue.push(chain.head, self.handle_chain(index, chain, mem))
                return
            with open(self.hang_once, "w"):
                pass
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


class LateUpper(Upper):
    """Pops the chains and completes them ``delay`` seconds later from a thread of its own."""

    def __init__(self, *, delay: float = 0.4, num_queues: int = 1) -> None:
        super().__init__(num_queues=num_queues)
        self.delay = delay

    def process_spec(self) -> DeviceSpec | None:
        spec = super().process_spec()
        assert spec is not None
        return DeviceSpec(spec.factory, {"delay": self.delay, "num_queues": self.num_queues})

    def handle_queue(self, index: int, queue: DeviceQueue, mem: GuestMemory) -> None:
        chains = queue.pop_batch(64)
        if not chains:
            return

        def complete() -> None:
            time.sleep(self.delay)
            queue.push_batch([(c.head, self.handle_chain(index, c, mem)) for c in chains])
            self.notify(index)

        threading.Thread(target=complete, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--client", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker-mode", default="thread")
    parser.add_argument("--hang-once")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    Daemon(
        Upper(hang=args.hang, hang_once=args.hang_once),
        args.socket,
        client=args.client,
        workers=args.workers,
        worker_mode=args.worker_mode,
    ).run()


if __name__ == "__main__":
    main()
