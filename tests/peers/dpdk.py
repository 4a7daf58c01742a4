"""dpdk-testpmd (DPDK 22.11) as a vhost-user net peer nobody here wrote.

Two roles: a vhost-user back-end (the ``net_vhost`` PMD: :func:`vhost_backend`) for pyvhost's
driver side, and a vhost-user front-end (``net_virtio_user``: :func:`virtio_user_frontend`) for
pyvhost's devices. testpmd runs interactively: commands go to its stdin and its output (line
buffered through ``stdbuf``) is read from a log up to the next prompt. Port counters come from its
telemetry socket as JSON, which no output format change can break. docs/dpdk.md has the command
lines and the pitfalls behind them.

Standard library only at import time, like peers.qemu.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NoReturn, Self

from .qemu import PeerError, check_socket_path, find_binary

__all__ = [
    "DEBS",
    "INSTALL_HINT",
    "ForwardStats",
    "PortStats",
    "Telemetry",
    "Testpmd",
    "TestpmdError",
    "parse_forward_stats",
    "parse_telemetry_reply",
    "require_testpmd",
    "testpmd_missing",
    "vhost_backend",
    "vhost_vdev",
    "virtio_user_frontend",
    "virtio_user_vdev",
]

TESTPMD = "dpdk-testpmd"
DEBS = (
    "dpdk-dev",
    "librte-net-vhost23",
    "librte-net-virtio23",
    "librte-mempool-ring23",
    "librte-mempool23",
)
"""Debian 12 packages: dpdk-dev ships dpdk-testpmd; the PMDs are only its Recommends."""
INSTALL_HINT = "apt-get install --no-install-recommends " + " ".join(DEBS)
PMD_GLOB = "/usr/lib/*/dpdk/pmds-*/librte_{}.so*"
"""Where Debian's EAL loads drivers from (RTE_EAL_PMD_PATH)."""
NEEDED_PMDS = ("net_vhost", "net_virtio", "mempool_ring")

PROMPT = b"testpmd> "
TELEMETRY_SOCKET = "dpdk_telemetry.v2"
TELEMETRY_MAX = 65536
LOG_TAIL = 4000
DEFAULT_PEER_MAC = "02:00:00:00:00:00"
"""Destination MAC of testpmd's txonly frames on port 0 (``--eth-peer`` not given)."""


class TestpmdError(PeerError):
    """testpmd failed to start, died, or did not answer; the message carries its log tail."""

    __test__ = False


def testpmd_missing() -> str | None:
    """Why testpmd cannot run here (binary or a PMD library missing), or None."""
    if find_binary(TESTPMD) is None:
        return f"{TESTPMD} not installed: {INSTALL_HINT}"
    for pmd in NEEDED_PMDS:
        if not glob.glob(PMD_GLOB.format(pmd)):
            return f"DPDK driver {pmd} not installed: {INSTALL_HINT}"
    return None


def require_testpmd() -> str:
    """Path of dpdk-testpmd, or skip the calling test saying what to install."""
    reason = testpmd_missing()
    if reason is not None:
        import pytest

        pytest.skip(reason)
    path = find_binary(TESTPMD)
    assert path is not None
    return path


# --- what testpmd says ----------------------------------------------------------------------


def parse_telemetry_reply(data: bytes, command: str) -> Any:
    """The value of one telemetry reply: ``{"/ethdev/stats": {...}}`` for ``/ethdev/stats,0``.

    DPDK answers an unknown command or a bad parameter with null: that raises.
    """
    try:
        reply = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TestpmdError(f"telemetry {command}: reply is not JSON: {data[:200]!r}") from exc
    key = command.split(",", 1)[0]
    if not isinstance(reply, dict) or key not in reply:
        raise TestpmdError(f"telemetry {command}: reply has no {key!r}: {data[:200]!r}")
    value = reply[key]
    if value is None:
        raise TestpmdError(f"telemetry {command}: null (unknown command or parameter)")
    return value


@dataclass(frozen=True)
class PortStats:
    """``rte_eth_stats`` of one port, as ``/ethdev/stats`` reports it (bytes exclude the
    virtio-net header)."""

    ipackets: int
    opackets: int
    ibytes: int
    obytes: int
    imissed: int
    ierrors: int
    oerrors: int
    rx_nombuf: int
    q_ipackets: tuple[int, ...]
    q_opackets: tuple[int, ...]

    @classmethod
    def from_telemetry(cls, value: Mapping[str, Any]) -> Self:
        """From the value of a ``/ethdev/stats,N`` reply."""
        try:
            return cls(
                ipackets=int(value["ipackets"]),
                opackets=int(value["opackets"]),
                ibytes=int(value["ibytes"]),
                obytes=int(value["obytes"]),
                imissed=int(value["imissed"]),
                ierrors=int(value["ierrors"]),
                oerrors=int(value["oerrors"]),
                rx_nombuf=int(value["rx_nombuf"]),
                q_ipackets=tuple(int(n) for n in value["q_ipackets"]),
                q_opackets=tuple(int(n) for n in value["q_opackets"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TestpmdError(f"/ethdev/stats: unexpected reply {value!r}") from exc


@dataclass(frozen=True)
class ForwardStats:
    """One port's block of the forward statistics that ``stop`` (and ``quit``) prints."""

    port: int
    rx_packets: int
    rx_dropped: int
    rx_total: int
    tx_packets: int
    tx_dropped: int
    tx_total: int


_FWD_HEADER = re.compile(r"-+ Forward statistics for port (\d+) +-+\n")
_FWD_RX = re.compile(r"RX-packets: *(\d+) +RX-dropped: *(\d+) +RX-total: *(\d+)")
_FWD_TX = re.compile(r"TX-packets: *(\d+) +TX-dropped: *(\d+) +TX-total: *(\d+)")
_FWD_END = re.compile(r"^ *-{20,} *$", re.MULTILINE)


def parse_forward_stats(text: str) -> dict[int, ForwardStats]:
    """Every ``Forward statistics for port N`` block in ``text``, by port.

    Lines between RX and TX (checksum counters in csum mode) are skipped; the per-stream and
    accumulated blocks are not port blocks and are ignored.
    """
    found: dict[int, ForwardStats] = {}
    for header in _FWD_HEADER.finditer(text):
        end = _FWD_END.search(text, header.end())
        block = text[header.end() : end.start() if end else len(text)]
        rx, tx = _FWD_RX.search(block), _FWD_TX.search(block)
        if rx is None or tx is None:
            raise TestpmdError(f"forward statistics of port {header[1]} unreadable: {block!r}")
        port = int(header[1])
        rx_n = [int(n) for n in rx.groups()]
        tx_n = [int(n) for n in tx.groups()]
        found[port] = ForwardStats(port, *rx_n, *tx_n)
    return found


# --- the telemetry socket -------------------------------------------------------------------


class Telemetry:
    """A client of one DPDK process's telemetry socket (SOCK_SEQPACKET, one JSON per message)."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(os.fspath(path))
            hello = json.loads(self.sock.recv(TELEMETRY_MAX))
            self.version = str(hello["version"])
            self.pid = int(hello["pid"])
        except BaseException:
            self.sock.close()
            raise

    def query(self, command: str) -> Any:
        """Send ``command`` (``/ethdev/stats,0``) and return the value of its reply."""
        self.sock.send(command.encode())
        return parse_telemetry_reply(self.sock.recv(TELEMETRY_MAX), command)

    def close(self) -> None:
        self.sock.close()


# --- the process ----------------------------------------------------------------------------


def vhost_vdev(socket_path: Path, *, queues: int = 1, client: bool = False, index: int = 0) -> str:
    """``--vdev`` of a net_vhost port: a vhost-user back-end listening on (or, with ``client``,
    connecting to) ``socket_path``."""
    spec = f"net_vhost{index},iface={check_socket_path(socket_path)},queues={queues}"
    return spec + (",client=1" if client else "")


def virtio_user_vdev(
    socket_path: Path,
    *,
    queues: int = 1,
    queue_size: int = 256,
    packed: bool = False,
    mrg_rxbuf: bool = True,
    mac: str | None = None,
    index: int = 0,
) -> str:
    """``--vdev`` of a net_virtio_user port: a vhost-user front-end connecting to
    ``socket_path``. ``mrg_rxbuf=False`` keeps it from acking MRG_RXBUF."""
    spec = (
        f"net_virtio_user{index},path={check_socket_path(socket_path)},"
        f"queues={queues},queue_size={queue_size}"
    )
    if packed:
        spec += ",packed_vq=1"
    if not mrg_rxbuf:
        spec += ",mrg_rxbuf=0"
    if mac is not None:
        spec += f",mac={mac}"
    return spec


class Testpmd:
    """One interactive ``dpdk-testpmd`` under ``timeout``, in its own process group.

    EAL: no hugepages (``--no-huge``: memory is a memfd a vhost-user peer can map), no PCI scan,
    lcores ``cores`` (the first runs the prompt, the others forward; ``eal_args`` such as
    ``--main-lcore 1`` change that), its runtime files (telemetry
    and multi-process sockets) in ``workdir/run-NAME``. The log (stdout and stderr) is
    ``workdir/NAME.log``. :meth:`start` returns at the first prompt with telemetry connected;
    ``ready`` then waits for whatever the role needs.
    """

    __test__ = False

    def __init__(
        self,
        workdir: Path,
        vdevs: Sequence[str],
        *,
        name: str = "testpmd",
        forward_mode: str = "io",
        cores: str = "0-1",
        memory_mb: int = 256,
        mbufs: int = 4096,
        rxq: int = 1,
        txq: int = 1,
        app_args: Sequence[str] = (),
        eal_args: Sequence[str] = (),
        timeout_s: float = 120,
        start_timeout: float = 20,
        ready: Callable[[Testpmd, float], None] | None = None,
        binary: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.vdevs = list(vdevs)
        self.name = name
        self.forward_mode = forward_mode
        self.cores = cores
        self.memory_mb = memory_mb
        self.mbufs = mbufs
        self.rxq = rxq
        self.txq = txq
        self.app_args = list(app_args)
        self.eal_args = list(eal_args)
        self.timeout_s = timeout_s
        self.start_timeout = start_timeout
        self.ready = ready
        self.binary = binary
        self.log_path = workdir / f"{name}.log"
        self.runtime_dir = workdir / f"run-{name}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.telemetry: Telemetry | None = None
        self._log: IO[bytes] | None = None
        self._offset = 0
        """Log offset just past the last prompt seen."""

    # -- command line ------------------------------------------------------------------------

    @property
    def telemetry_path(self) -> Path:
        return self.runtime_dir / "dpdk" / self.name / TELEMETRY_SOCKET

    def argv(self) -> list[str]:
        """testpmd's own arguments: EAL, then ``--``, then the application's."""
        binary = self.binary or find_binary(TESTPMD)
        if binary is None:
            raise TestpmdError(f"{TESTPMD} not installed: {INSTALL_HINT}")
        eal = [
            binary,
            "--no-huge",
            "--no-pci",
            "-m",
            str(self.memory_mb),
            "-l",
            self.cores,
            "--file-prefix",
            self.name,
        ]
        eal += self.eal_args
        for vdev in self.vdevs:
            eal += ["--vdev", vdev]
        app = [
            "-i",
            f"--forward-mode={self.forward_mode}",
            f"--total-num-mbufs={self.mbufs}",
            f"--rxq={self.rxq}",
            f"--txq={self.txq}",
        ]
        return [*eal, "--", *app, *self.app_args]

    def command(self) -> list[str]:
        """The full command line: ``timeout`` and ``stdbuf`` around :meth:`argv`."""
        wrappers = []
        for tool in ("timeout", "stdbuf"):
            path = find_binary(tool)
            if path is None:
                raise TestpmdError(f"{tool} not installed: apt-get install coreutils")
            wrappers.append(path)
        timeout, stdbuf = wrappers
        return [timeout, "-k", "5", f"{self.timeout_s:g}", stdbuf, "-oL", "-eL", *self.argv()]

    # -- lifetime ----------------------------------------------------------------------------

    def start(self) -> Self:
        """Launch testpmd, wait for its first prompt and its telemetry socket, then ``ready``."""
        if self.proc is not None:
            raise TestpmdError(f"{self.name}: already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        self.runtime_dir.mkdir()
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env={**os.environ, "RUNTIME_DIRECTORY": os.fspath(self.runtime_dir)},
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + self.start_timeout
            self._offset = self._until_prompt(0, self.start_timeout)[1]
            self.telemetry = self._connect_telemetry(deadline)
            if self.ready is not None:
                self.ready(self, max(deadline - time.monotonic(), 0.1))
        except BaseException:
            self.stop()
            raise
        return self

    def _connect_telemetry(self, deadline: float) -> Telemetry:
        while True:
            try:
                return Telemetry(self.telemetry_path)
            except (OSError, ValueError, KeyError) as exc:
                if time.monotonic() > deadline:
                    self._fail(f"telemetry socket {self.telemetry_path} not usable: {exc}")
                time.sleep(0.05)

    @property
    def returncode(self) -> int | None:
        """Exit status (negative: the signal that killed it), None while it runs."""
        return self.proc.poll() if self.proc else None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def quit(self, timeout: float = 15) -> int | None:
        """``quit`` at the prompt (ports stopped and closed, vhost-user connections hung up);
        SIGINT if that does not end it within ``timeout``; returns the exit status."""
        proc = self.proc
        if proc is not None and proc.poll() is None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.write(b"quit\n")
                proc.stdin.flush()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        return self.stop()

    def stop(self, grace: float = 10) -> int | None:
        """SIGINT (``timeout`` forwards it; testpmd stops its ports), then SIGKILL to the process
        group; closes everything and removes the runtime directory. Returns the exit status."""
        if self.telemetry is not None:
            self.telemetry.close()
            self.telemetry = None
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(grace)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return proc.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        died = self.returncode
        self.quit()
        if exc_type is None and died is not None:
            self._fail(f"exited with status {died} while in use")

    # -- the prompt --------------------------------------------------------------------------

    def _until_prompt(self, offset: int, timeout: float) -> tuple[str, int]:
        """Log text from ``offset`` up to the next prompt, and the offset just after it."""
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                data = f.read()
            at = data.find(PROMPT)
            if at >= 0:
                return data[:at].decode(errors="replace"), offset + at + len(PROMPT)
            rc = self.returncode
            if rc is not None:
                self._fail(f"exited with status {rc} before its prompt")
            if time.monotonic() > deadline:
                self._fail(f"no prompt within {timeout:g} s")
            time.sleep(0.01)

    def run(self, line: str, timeout: float = 10) -> str:
        """Type ``line`` at the prompt; return what testpmd printed until the next prompt."""
        proc = self.proc
        if proc is None or proc.stdin is None:
            raise TestpmdError(f"{self.name}: not started")
        if proc.poll() is not None:
            self._fail(f"exited with status {proc.returncode}; cannot run {line!r}")
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()
        text, self._offset = self._until_prompt(self._offset, timeout)
        return text

    def start_forwarding(self, tx_first: int = 0) -> str:
        """``start`` (or ``start tx_first N``: N txonly bursts first, then the forward mode);
        returns the forwarding configuration it prints."""
        return self.run(f"start tx_first {tx_first}" if tx_first else "start")

    def stop_forwarding(self) -> dict[int, ForwardStats]:
        """``stop``; the forward statistics it prints, by port."""
        return parse_forward_stats(self.run("stop"))

    def set_forward_mode(self, mode: str) -> None:
        self.run(f"set fwd {mode}")
        self.forward_mode = mode

    # -- telemetry ---------------------------------------------------------------------------

    def query(self, command: str) -> Any:
        """One telemetry command (``/ethdev/info,0``): the value of its reply."""
        if self.telemetry is None:
            raise TestpmdError(f"{self.name}: not started")
        return self.telemetry.query(command)

    def stats(self, port: int = 0) -> PortStats:
        return PortStats.from_telemetry(self.query(f"/ethdev/stats,{port}"))

    def mac(self, port: int = 0) -> bytes:
        """The port's MAC address: the source of its txonly frames."""
        return bytes.fromhex(str(self.query(f"/ethdev/info,{port}")["mac_addr"]).replace(":", ""))

    def link_up(self, port: int = 0) -> bool:
        return bool(self.query(f"/ethdev/link_status,{port}").get("status") == "UP")

    def wait_stats(
        self, done: Callable[[PortStats], bool], timeout: float = 10, port: int = 0
    ) -> PortStats:
        """Poll the port's counters until ``done`` says so; fail with the last ones seen."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats(port)
            if done(stats):
                return stats
            if time.monotonic() > deadline:
                self._fail(f"port {port} counters not as awaited within {timeout:g} s: {stats}")
            time.sleep(0.02)

    def wait_link(self, timeout: float = 10, port: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while not self.link_up(port):
            if time.monotonic() > deadline:
                self._fail(f"port {port} link not up within {timeout:g} s")
            time.sleep(0.02)

    def _fail(self, what: str) -> NoReturn:
        text = self.log
        tail = ("...\n" if len(text) > LOG_TAIL else "") + text[-LOG_TAIL:]
        raise TestpmdError(f"{self.name} {what}\ncommand: {' '.join(self.command())}\nlog:\n{tail}")


def _socket_appears(path: Path) -> Callable[[Testpmd, float], None]:
    def ready(pmd: Testpmd, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                pmd._fail(f"did not create {path} within {timeout:g} s")
            time.sleep(0.01)

    return ready


def _link_up(pmd: Testpmd, timeout: float) -> None:
    pmd.wait_link(timeout)


def vhost_backend(
    workdir: Path,
    socket_path: Path,
    *,
    queues: int = 1,
    client: bool = False,
    forward_mode: str = "io",
    **options: Any,
) -> Testpmd:
    """testpmd with one net_vhost port of ``queues`` pairs, forwarding with ``forward_mode`` once
    :meth:`Testpmd.start_forwarding` is called. Listening on ``socket_path`` (a stale socket file
    there is removed first: net_vhost will not bind over one), ready when it exists; with
    ``client`` it connects there instead, retrying until something listens."""
    if not client and socket_path.is_socket():
        socket_path.unlink()
    return Testpmd(
        workdir,
        [vhost_vdev(socket_path, queues=queues, client=client)],
        name=options.pop("name", "testpmd-vhost"),
        forward_mode=forward_mode,
        rxq=queues,
        txq=queues,
        ready=None if client else _socket_appears(socket_path),
        **options,
    )


def virtio_user_frontend(
    workdir: Path,
    socket_path: Path,
    *,
    queues: int = 1,
    queue_size: int = 256,
    packed: bool = False,
    mrg_rxbuf: bool = True,
    mac: str | None = None,
    forward_mode: str = "txonly",
    **options: Any,
) -> Testpmd:
    """testpmd with one net_virtio_user port: a front-end that connects to the back-end at
    ``socket_path`` while it starts (the back-end must already listen) and sets up every ring;
    ready when the port's link is up."""
    vdev = virtio_user_vdev(
        socket_path,
        queues=queues,
        queue_size=queue_size,
        packed=packed,
        mrg_rxbuf=mrg_rxbuf,
        mac=mac,
    )
    return Testpmd(
        workdir,
        [vdev],
        name=options.pop("name", "testpmd-virtio"),
        forward_mode=forward_mode,
        rxq=queues,
        txq=queues,
        ready=_link_up,
        **options,
    )
