"""virtio-scsi over a :class:`DriverSession`: the :class:`~pyvhost.virtio.scsi.client.Transport`
that :class:`~pyvhost.virtio.scsi.client.ScsiClient` runs on, for kernel vhost-scsi and a
vhost-user scsi device alike (it talks only to the session)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pyvhost.driver.session import DriverSession
from pyvhost.errors import VirtqueueError

__all__ = ["SessionTransport"]

Buffers = list[tuple[int, int]]


@dataclass
class _Chain:
    queue: int
    readable: Buffers
    writable: Buffers


class SessionTransport:
    """Chains of the session's own buffers: readable bytes copied in, writable sizes copied out.

    Completions of other chains that arrive while one is waited for are kept for their own wait;
    ``timeout`` bounds each wait (a device that never answers is an error, not a hang).
    """

    def __init__(self, session: DriverSession, *, timeout: float = 30.0) -> None:
        self.session = session
        self.timeout = timeout
        self._chains: dict[int, _Chain] = {}
        self._done: dict[int, int] = {}

    def submit(self, queue: int, readable: Sequence[bytes], writable: Sequence[int]) -> int:
        """Copy ``readable`` into fresh buffers, add writable ones, submit and kick."""
        session = self.session
        chain = _Chain(queue, [], [])
        try:
            for data in readable:
                gpa = session.alloc(len(data))
                chain.readable.append((gpa, len(data)))
                session.view(gpa, len(data))[:] = data
            for size in writable:
                chain.writable.append((session.alloc(size), size))
            token = session.submit(queue, chain.readable, chain.writable)
        except BaseException:
            self._free(chain)
            raise
        self._chains[token] = chain
        session.kick(queue)
        return token

    def wait(self, token: int) -> tuple[int, list[bytes]]:
        """The written length and the writable buffers' contents of chain ``token``."""
        chain = self._chains[token]
        while token not in self._done:
            got = self.session.wait(chain.queue, self.timeout)
            if not got:
                raise VirtqueueError(
                    f"no completion of chain {token} within {self.timeout:g} s", queue=chain.queue
                )
            self._done.update(got)
        written = self._done.pop(token)
        del self._chains[token]
        data = [bytes(self.session.view(gpa, size)) for gpa, size in chain.writable]
        self._free(chain)
        return written, data

    def _free(self, chain: _Chain) -> None:
        for gpa, _ in chain.readable + chain.writable:
            self.session.free(gpa)
