"""Live migration of the test guest between two QEMUs on this host, driven over QMP.

A `MigrationPair` is a source QemuVM that boots the test initramfs (see guest.py) and a
destination QemuVM with the same command line plus ``-incoming unix:PATH -S``: it waits for the
migration and stays paused after it, so the two guests' RAM can be compared before the
destination runs on. The test reads each side's guest RAM (QEMU's shared memfd, as for any
vhost-user guest) through /proc/PID/map_files. Each QEMU has a QMP socket, driven with QEMU's own
library (``qemu.qmp``, see qmp.py).

The guest can tell where it runs: fw_cfg ``opt/pyvhost-side`` (`SIDE_PATH` in the guest) reads
``source`` on the source and ``target`` on the destination. The guest's fw_cfg directory is the
source's, read at boot, so both files have the same name and length and a read on the destination
returns the destination's bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .guest import FW_CFG_SCRIPT, GuestAssets, parse_result
from .qemu import PeerError, QemuVM, check_socket_path
from .qmp import Qmp

PAGE = 4096
GUEST_RAM_MEMFD = "/memfd:memory-backend-memfd"
"""How QemuVM's guest RAM shows in /proc/PID/maps."""
SIDE_FW_CFG = "pyvhost-side"
SIDE_PATH = f"/sys/firmware/qemu_fw_cfg/by_name/opt/{SIDE_FW_CFG}/raw"
SIDES = {"source": "source", "destination": "target"}
"""What `SIDE_PATH` reads on each side (the same length on both)."""
HOLD_BANDWIDTH = 256 << 10
"""Bytes/s while a migration is held (`MigrationPair.migrate`): a dirty page then takes 16 ms to
send, ample time for a busy guest to dirty another before the next sync."""


class Side:
    """One QEMU of the pair: its QemuVM (add devices before `MigrationPair.start`) and QMP."""

    def __init__(self, role: str, vm: QemuVM, qmp_socket: Path, result_port: int) -> None:
        self.role = role
        self.vm = vm
        self.qmp_socket = qmp_socket
        self.result_port = result_port
        self._qmp: Qmp | None = None

    @property
    def qmp(self) -> Qmp:
        if self._qmp is None:
            raise PeerError(f"{self.role}: QEMU not started")
        return self._qmp

    @property
    def ram(self) -> Path:
        """The guest RAM memfd, opened through QEMU's mapping of it (while QEMU runs)."""
        process = self.vm.process
        if process is None or process.pid is None or process.returncode is not None:
            raise PeerError(f"{self.role}: QEMU is not running")
        return guest_ram(child_pid(process.pid))

    @property
    def result_text(self) -> str:
        """What the guest wrote to the result serial port of this QEMU (\\r\\n made \\n)."""
        return self.vm.serial_text(self.result_port).replace("\r\n", "\n")

    def start(self, timeout: float = 30) -> None:
        """Start QEMU and connect to its QMP socket (which exists a moment before it listens)."""
        self.vm.start()
        self._qmp = Qmp.when_listening(self.qmp_socket, self.vm, f"qmp-{self.role}", timeout)

    def status(self) -> str:
        """The run state (``running``, ``inmigrate``, ``paused``, ``postmigrate``, ...)."""
        return str(self.qmp.execute("query-status")["status"])

    def migration(self) -> dict[str, Any]:
        """``query-migrate`` (on the destination: the incoming migration)."""
        info: dict[str, Any] = self.qmp.execute("query-migrate")
        return info

    def describe(self) -> str:
        """State and stderr of this QEMU, for failure messages."""
        return f"{self.role} QEMU (status {self.vm.returncode}) stderr:\n{self.vm.stderr[-2000:]}"

    def stop(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
        self.vm.stop()


class MigrationPair:
    """Source and destination QEMU for the test guest; see the module docstring.

    Both get the same command line: kernel, initrd, `script` as fw_cfg opt/pyvhost-test, the
    result serial port, `memory` of guest RAM. Add the same devices to both `vm`s, in the same
    order, then `start`, `migrate`, compare RAM (`ram_differences`), `cont`.
    """

    def __init__(
        self,
        workdir: Path,
        assets: GuestAssets,
        script: str,
        *,
        memory: str,
        timeout_s: float = 120,
    ) -> None:
        self.workdir = workdir
        self.incoming = check_socket_path(workdir / "migrate.sock")
        workdir.mkdir(parents=True, exist_ok=True)
        script_path = workdir / f"{FW_CFG_SCRIPT}.sh"
        script_path.write_text(script)
        sides = []
        for role, word in SIDES.items():
            vm = QemuVM(
                workdir / role,
                memory=memory,
                kernel=assets.kernel,
                initrd=assets.initrd,
                timeout_s=timeout_s,
            )
            vm.workdir.mkdir(parents=True, exist_ok=True)
            side_path = vm.workdir / f"{SIDE_FW_CFG}.txt"
            side_path.write_text(word + "\n")
            vm.add_fw_cfg(FW_CFG_SCRIPT, script_path)
            vm.add_fw_cfg(SIDE_FW_CFG, side_path)
            port = vm.add_serial_file(vm.workdir / "result.log")
            vm.append = f"console=ttyS0 panic=-1 pyvhost_result=/dev/ttyS{port}"
            qmp_socket = vm.add_qmp(workdir / f"qmp-{role}.sock")
            sides.append(Side(role, vm, qmp_socket, port))
        self.source, self.destination = sides
        self.destination.vm.extra_args += ["-incoming", f"unix:{self.incoming}", "-S"]

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.source, self.destination

    def start(self) -> None:
        """Start the destination (waiting for the migration), then the source (booting)."""
        self.destination.start()
        assert self.destination.vm.process is not None
        self.destination.vm.process.wait_for_socket(self.incoming)
        self.source.start()

    def migrate(
        self,
        *,
        max_bandwidth: int,
        hold: Callable[[], bool] | None = None,
        timeout: float = 60,
    ) -> dict[str, Any]:
        """Migrate the running source to the destination at most `max_bandwidth` bytes/s.

        With `hold`, the migration cannot converge while `hold()` returns True, asked at each
        poll once the first pass over RAM is done (two dirty-bitmap syncs): e.g. until the guest
        has made progress the test can see, whatever the host's load; then QEMU's downtime
        limit and `max_bandwidth` are restored and the migration completes. While held, the
        bandwidth is `HOLD_BANDWIDTH` and the downtime limit 1 ms: QEMU then switches over only
        when a dirty-bitmap sync finds no page dirtied since the last one (at full bandwidth a
        guest waiting for its disk dirties fewer than the 16 pages 1 ms allows, and the
        migration would end under the hold).

        Returns once both sides report the migration completed, the source is in
        ``postmigrate`` and the destination ``paused`` (it has all of RAM and does not run);
        returns the source's final ``query-migrate``. PeerError when it fails or takes too long.
        """
        src, dst = self.source, self.destination
        limit = src.qmp.execute("query-migrate-parameters")["downtime-limit"]
        params: dict[str, object] = {"max-bandwidth": max_bandwidth}
        if hold is not None:
            params["downtime-limit"] = 1
        src.qmp.execute("migrate-set-parameters", params)
        src.qmp.execute("migrate", {"uri": f"unix:{self.incoming}"})
        deadline = time.monotonic() + timeout
        held = False
        while True:
            info = self._progress(src, deadline)
            if info.get("status") == "completed":
                break
            syncs = info.get("ram", {}).get("dirty-sync-count", 0)
            if hold is None or syncs < 2:
                continue
            if hold():
                if not held:
                    src.qmp.execute("migrate-set-parameters", {"max-bandwidth": HOLD_BANDWIDTH})
                    held = True
            else:
                restore = {"downtime-limit": limit, "max-bandwidth": max_bandwidth}
                src.qmp.execute("migrate-set-parameters", restore)
                hold = None
        while self._progress(dst, deadline).get("status") != "completed":
            pass
        while (state := dst.status()) == "inmigrate":
            self._check_deadline(deadline, f"destination still inmigrate; source {info}")
            time.sleep(0.02)
        if state != "paused" or src.status() != "postmigrate":
            raise PeerError(
                f"after the migration: destination {state!r}, source {src.status()!r} "
                "(expected 'paused' and 'postmigrate')"
            )
        return info

    def _progress(self, side: Side, deadline: float) -> dict[str, Any]:
        """`side`'s query-migrate; after a pause unless it completed; PeerError if it failed."""
        info = side.migration()
        status = info.get("status")
        if status in ("failed", "cancelled"):
            raise PeerError(
                f"migration {status} on the {side.role}: {info.get('error-desc', info)}\n"
                f"{self.source.describe()}\n{self.destination.describe()}"
            )
        if status != "completed":
            self._check_deadline(deadline, f"{side.role} migration status {info}")
            time.sleep(0.05)
        return info

    def _check_deadline(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise PeerError(
                f"migration did not finish in time: {what}\n"
                f"{self.source.describe()}\n{self.destination.describe()}"
            )

    def ram_differences(self) -> list[tuple[int, int]]:
        """(offset, differing bytes) of every 4 KiB page that differs between the two sides'
        guest RAM (both QEMUs still running; offsets as in `guest_ram`)."""
        return differing_pages(self.source.ram, self.destination.ram)

    def cont(self) -> None:
        """Let the destination guest run (after a completed `migrate`)."""
        self.destination.qmp.execute("cont")

    def result(self) -> tuple[int, str] | None:
        """(exit code, output) of the guest's script, its output joined from both sides' result
        ports (source first), or None while it has not finished."""
        return parse_result(self.source.result_text + self.destination.result_text)

    def stop(self) -> None:
        for side in self.sides:
            side.stop()


def child_pid(pid: int, timeout: float = 10) -> int:
    """The program `PeerProcess` runs under `timeout` (pid `pid`): its only child."""
    deadline = time.monotonic() + timeout
    while True:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        if time.monotonic() > deadline:
            raise PeerError(f"pid {pid}: no child within {timeout:g} s")
        time.sleep(0.01)


def guest_ram(pid: int) -> Path:
    """/proc/PID/map_files path of QEMU process `pid`'s guest RAM memfd (its largest mapping of
    it); opening it opens the memfd, whose offset is the guest-physical address below 2 GiB."""
    found: list[tuple[int, str]] = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(GUEST_RAM_MEMFD):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append((end - start, fields[0]))
    if not found:
        raise PeerError(f"pid {pid}: no {GUEST_RAM_MEMFD} mapping in /proc/{pid}/maps")
    return Path(f"/proc/{pid}/map_files/{max(found)[1]}")


def _pages(a: bytes, b: bytes, base: int) -> Iterator[tuple[int, int]]:
    for at in range(0, max(len(a), len(b)), PAGE):
        x, y = a[at : at + PAGE], b[at : at + PAGE]
        if x != y:
            same = sum(p == q for p, q in zip(x, y, strict=False))
            yield base + at, max(len(x), len(y)) - same


def differing_pages(a: Path, b: Path, chunk: int = 1 << 20) -> list[tuple[int, int]]:
    """(offset, number of differing bytes) of each 4 KiB page of files `a` and `b` that differs
    (a page only one file has counts as differing in full)."""
    found: list[tuple[int, int]] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if not x and not y:
                return found
            if x != y:
                found.extend(_pages(x, y, offset))
            offset += chunk


def page_detail(a: Path, b: Path, offset: int, limit: int = 12) -> str:
    """The differing byte runs of the page at ``offset`` in files `a` and `b`: where in the page
    and both sides' bytes (hex), the first `limit` runs."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(offset)
        fb.seek(offset)
        x, y = fa.read(PAGE), fb.read(PAGE)
    runs: list[tuple[int, int]] = []
    for i, (p, q) in enumerate(zip(x, y, strict=False)):
        if p != q:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
    shown = [f"+{s:#05x}: {x[s:e].hex()} vs {y[s:e].hex()}" for s, e in runs[:limit]]
    more = [f"... {len(runs) - limit} more runs"] if len(runs) > limit else []
    return f"page {offset:#x}: " + "; ".join(shown + more)


def describe_pages(pages: list[tuple[int, int]], total: int, first: int = 8) -> str:
    """``N of M pages differ`` and the first few (address and differing bytes)."""
    shown = ", ".join(f"{at:#x} ({n} bytes)" for at, n in pages[:first])
    more = f", ... ({len(pages) - first} more)" if len(pages) > first else ""
    return f"{len(pages)} of {total // PAGE} pages differ: {shown}{more}"
