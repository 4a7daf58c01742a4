"""A synchronous QMP session with a QEMU of the tests, on QEMU's own library (``qemu.qmp``).

QEMU serves QMP on the Unix socket `QemuVM.add_qmp` names; `Qmp.when_listening` connects once it
listens. Events are kept from the moment of connecting, so `Qmp.wait_event` also finds one that
came before it was called (e.g. DEVICE_DELETED after ``device_del``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ConnectError, QMPClient, QMPError

from .qemu import PeerError, QemuVM

_T = TypeVar("_T")


class Qmp:
    """A synchronous QMP session on a Unix socket: `qemu.qmp.QMPClient` on a private event loop."""

    def __init__(self, socket: Path, name: str, timeout: float = 30) -> None:
        self.name = name
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
        try:
            self._run(self._client.connect(str(socket)))
        except BaseException:
            self._loop.close()
            raise

    @classmethod
    def when_listening(cls, socket: Path, vm: QemuVM, name: str, timeout: float = 30) -> Qmp:
        """Connect to `vm`'s QMP socket as soon as QEMU listens on it (the socket exists a moment
        before; `vm` may not even be started yet); PeerError if QEMU exits first or takes longer
        than `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return cls(socket, name)
            except ConnectError as e:
                if vm.returncode is not None or time.monotonic() > deadline:
                    raise PeerError(
                        f"{name}: no QMP on {socket}: {e}\n"
                        f"QEMU (status {vm.returncode}) stderr:\n{vm.stderr[-2000:]}"
                    ) from e
                time.sleep(0.05)

    def _run(self, step: Awaitable[_T], timeout: float | None = None) -> _T:
        return self._loop.run_until_complete(asyncio.wait_for(step, timeout or self.timeout))

    def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command; its ``return`` value (ExecuteError when QEMU answers an error)."""
        return self._run(self._client.execute(command, arguments))

    def wait_event(self, name: str, timeout: float | None = None, **data: object) -> dict[str, Any]:
        """The first event `name` not waited for yet whose ``data`` has the items `data` (events
        before it are dropped); TimeoutError after `timeout` seconds (default: the session's)."""

        async def first() -> dict[str, Any]:
            while True:
                event = await self._client.events.get()
                found = event.get("data")
                got = found if isinstance(found, dict) else {}
                if event["event"] == name and all(got.get(k) == v for k, v in data.items()):
                    return dict(event)

        return self._run(first(), timeout)

    def unplug(self, device: str, chardev: str, timeout: float | None = None) -> None:
        """``device_del`` `device`, wait for its DEVICE_DELETED (the guest ejected it), then
        ``chardev-remove`` the `chardev` it used."""
        self.execute("device_del", {"id": device})
        self.wait_event("DEVICE_DELETED", timeout, device=device)
        self.execute("chardev-remove", {"id": chardev})

    def plug_vhost_user(
        self, driver: str, device: str, chardev: str, socket: Path, **props: object
    ) -> None:
        """``chardev-add`` `chardev`, a client of the back-end listening on `socket`, then
        ``device_add`` `driver` on it as `device` with `props` (e.g. ``bus``)."""
        address = {"type": "unix", "data": {"path": str(socket)}}
        backend = {"type": "socket", "data": {"addr": address, "server": False}}
        self.execute("chardev-add", {"id": chardev, "backend": backend})
        self.execute("device_add", {"driver": driver, "id": device, "chardev": chardev, **props})

    def close(self) -> None:
        """Disconnect; an error the session already ended with (QEMU exited) is not raised."""
        if self._loop.is_closed():
            return
        try:
            with contextlib.suppress(QMPError, OSError, EOFError):
                self._run(self._client.disconnect())
        finally:
            self._loop.close()
