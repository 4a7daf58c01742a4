"""Start and stop real peers (qemu-storage-daemon, qemu-system-x86_64) under `timeout`.

Standard library only at import time, so scripts/fetch-guest can use this module without pytest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, NoReturn, Self

INSTALL_HINTS = {
    "qemu-storage-daemon": "apt-get install qemu-system-common",
    "qemu-system-x86_64": "apt-get install qemu-system-x86",
    "timeout": "apt-get install coreutils",
}

SOCKET_PATH_MAX = 107
"""Longest AF_UNIX path Linux accepts (108 bytes including the terminating NUL)."""

STDERR_TAIL = 4000

KILL_AFTER = 15
"""Seconds `timeout` waits after its SIGTERM (or ours, which it forwards) before SIGKILL: longer
than stop()'s grace, so that stop() can still say what a peer that does not end is doing."""


class PeerError(RuntimeError):
    """A peer failed to start, died early, or did not stop; the message carries its stderr."""


def find_binary(name: str) -> str | None:
    """Absolute path of an executable on PATH (or in /usr/sbin, /sbin), or None."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def require(name: str) -> str:
    """Path of `name`, or skip the calling test with an install hint when it is missing."""
    path = find_binary(name)
    if path is None:
        import pytest

        hint = INSTALL_HINTS.get(name, f"install {name}")
        pytest.skip(f"{name} not installed: {hint}")
    return path


def short_tmpdir(prefix: str = "pvh-") -> Path:
    """A fresh private directory under /tmp whose paths stay well inside the AF_UNIX limit."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@contextlib.contextmanager
def short_tmp(prefix: str = "pvh-") -> Iterator[Path]:
    """`short_tmpdir` as a context manager that removes the directory afterwards."""
    path = short_tmpdir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check_socket_path(path: Path) -> Path:
    """Return `path` unchanged, or raise ValueError when it is too long to bind or connect."""
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise ValueError(f"socket path {path} is longer than {SOCKET_PATH_MAX} bytes")
    return path


def make_raw_image(path: Path, size: int) -> Path:
    """Create (or truncate) a sparse raw disk image of `size` bytes, filled with zeros."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _tail(path: Path, limit: int = STDERR_TAIL) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    text = data[-limit:].decode(errors="replace")
    return ("...\n" if len(data) > limit else "") + text


def group_pids(pgid: int) -> list[int]:
    """The processes whose process group is ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(Path(f"/proc/{entry}/stat"))
            if stat and int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
                pids.append(int(entry))
    return sorted(pids)


def group_report(pgid: int) -> str:
    """What each process of group ``pgid`` is doing: state, wait channel and kernel stack of
    every thread, so that a peer that does not stop says why (blocked in the kernel, stopped,
    or running)."""
    lines = []
    for pid in group_pids(pgid):
        cmdline = " ".join(_read(Path(f"/proc/{pid}/cmdline")).replace("\0", " ").split())
        lines.append(f"pid {pid} ({cmdline[:120]})")
        with contextlib.suppress(OSError):
            for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
                task = Path(f"/proc/{pid}/task/{tid}")
                tstat = _read(task / "stat")
                if not tstat:
                    continue
                comm = tstat[tstat.index("(") + 1 : tstat.rindex(")")]
                state = tstat[tstat.rindex(")") + 2 :].split()[0]
                frames = [
                    line.split("] ", 1)[-1].split("+")[0]
                    for line in _read(task / "stack").split("\n")
                    if line
                ]
                lines.append(
                    f"  tid {tid} {comm!r} state {state} wchan {_read(task / 'wchan') or '-'} "
                    f"stack {' < '.join(frames[:6]) or '-'}"
                )
    return "\n".join(lines) or f"no process left in group {pgid}"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


class PeerProcess:
    """One peer program run as `timeout -k KILL_AFTER T argv...` in its own process group.

    stdout and stderr go to files in `workdir` (no pipe can fill up and stall the peer).
    Usable for any back-end, e.g. `PeerProcess([sys.executable, "-m", "pyvhost", ...], ...)`.
    """

    def __init__(
        self,
        argv: Sequence[str],
        workdir: Path,
        *,
        name: str | None = None,
        timeout_s: float = 120,
        socket: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.name = name or Path(self.argv[0]).name
        self.workdir = workdir
        self.timeout_s = timeout_s
        self.socket = socket
        self.env = env
        self.stdout_path = workdir / f"{self.name}.stdout"
        self.stderr_path = workdir / f"{self.name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    @property
    def command(self) -> list[str]:
        """The full command line, `timeout` wrapper included."""
        timeout = find_binary("timeout")
        if timeout is None:
            raise PeerError("timeout not installed: apt-get install coreutils")
        return [timeout, "-k", str(KILL_AFTER), f"{self.timeout_s:g}", *self.argv]

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def start(self) -> Self:
        """Launch the process; with `socket` set, also wait until that socket path exists."""
        if self.proc is not None:
            raise PeerError(f"{self.name}: already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        out = open(self.stdout_path, "wb")  # noqa: SIM115
        err = open(self.stderr_path, "wb")  # noqa: SIM115
        self._files = [out, err]
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=self.workdir,
            env=self.env,
            start_new_session=True,
        )
        if self.socket is not None:
            self.wait_for_socket(self.socket)
        return self

    def wait_for_socket(self, path: Path, timeout: float = 30) -> None:
        """Poll until `path` exists; fail with the peer's stderr if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            rc = self.returncode
            if rc is not None:
                self._fail(f"exited with status {rc} before creating {path}")
            if time.monotonic() > deadline:
                self.stop()
                self._fail(f"did not create {path} within {timeout:g} s")
            time.sleep(0.02)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit by itself; on timeout stop it and raise PeerError."""
        assert self.proc is not None, "not started"
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            self._fail(f"still running after {timeout:g} s; stopped it")
        self._close_files()
        return rc

    def stop(self, grace: float = 10) -> int | None:
        """SIGTERM (which `timeout` forwards), then SIGKILL to its process group; returns status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._report_stuck(f"not gone {grace:g} s after SIGTERM")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(grace)
        self._close_files()
        return self.proc.returncode

    def _report_stuck(self, what: str) -> None:
        """Say what the group's processes are doing; then SIGABRT its Python processes, which
        with PYTHONFAULTHANDLER=1 (tests/conftest.py) write every thread's stack to stderr."""
        assert self.proc is not None
        report = group_report(self.proc.pid)
        with contextlib.suppress(OSError), open(self.stderr_path, "a") as err:
            err.write(f"\n[test harness] {what}:\n{report}\n")
        for pid in group_pids(self.proc.pid):
            with contextlib.suppress(OSError):
                if os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("python"):
                    os.kill(pid, signal.SIGABRT)
        time.sleep(1)
        print(f"{self.name}: {what}\nstderr:\n{_tail(self.stderr_path)}", file=sys.stderr)

    def _close_files(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def _fail(self, what: str) -> NoReturn:
        raise PeerError(
            f"{self.name} {what}\ncommand: {' '.join(self.command)}\n"
            f"stderr:\n{_tail(self.stderr_path)}"
        )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class QemuStorageDaemon(PeerProcess):
    """qemu-storage-daemon exporting one raw image as a vhost-user-blk back-end on `socket`.

    It serves one front-end at a time and accepts the next one after the previous leaves.
    """

    def __init__(
        self,
        image: Path,
        socket: Path,
        *,
        num_queues: int = 1,
        writable: bool = True,
        timeout_s: float = 120,
        workdir: Path | None = None,
        binary: str | None = None,
    ) -> None:
        binary = binary or find_binary("qemu-storage-daemon")
        if binary is None:
            raise PeerError("qemu-storage-daemon not installed: apt-get install qemu-system-common")
        self.image = image
        export = (
            f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            f"addr.path={check_socket_path(socket)},writable={'on' if writable else 'off'},"
            f"num-queues={num_queues}"
        )
        argv = [
            binary,
            "--blockdev",
            f"driver=file,node-name=file0,filename={image}",
            "--blockdev",
            "driver=raw,node-name=disk0,file=file0",
            "--export",
            export,
        ]
        super().__init__(
            argv,
            workdir or socket.parent,
            name="qemu-storage-daemon",
            timeout_s=timeout_s,
            socket=socket,
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        died = self.returncode
        self.stop()
        if exc_type is None and died is not None and died != 0:
            self._fail(f"exited with status {died} while in use")


class QemuVM:
    """Builder and runner for `qemu-system-x86_64 -accel tcg` with shared guest RAM.

    Guest RAM is a shared memfd, so vhost-user back-ends can map it. Serial port 0 (ttyS0) is
    written to `console_path`; more serial ports come from `add_serial_file`.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        memory: str = "512M",
        cpus: int = 1,
        kernel: Path | None = None,
        initrd: Path | None = None,
        append: str | None = None,
        timeout_s: float = 120,
        machine: str = "q35",
        binary: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.memory = memory
        self.cpus = cpus
        self.kernel = kernel
        self.initrd = initrd
        self.append = append
        self.timeout_s = timeout_s
        self.machine = machine
        self.binary = binary
        self.console_path = workdir / "console.log"
        self.serial_paths: list[Path] = [self.console_path]
        self.extra_args: list[str] = []
        self.process: PeerProcess | None = None
        self._next_id = 0

    def _id(self, prefix: str) -> str:
        self._next_id += 1
        return f"{prefix}{self._next_id}"

    def _chardev(self, socket: Path, server: bool) -> str:
        cid = self._id("chr")
        spec = f"socket,id={cid},path={check_socket_path(socket)}"
        if server:
            spec += ",server=on,wait=on"
        self.extra_args += ["-chardev", spec]
        return cid

    @staticmethod
    def _props(props: dict[str, object]) -> str:
        parts = []
        for key, value in props.items():
            text = ("on" if value else "off") if isinstance(value, bool) else str(value)
            parts.append(f",{key}={text}")
        return "".join(parts)

    def add_vhost_user_device(
        self, driver: str, socket: Path, *, server: bool = False, **props: object
    ) -> str:
        """Any `-device <driver>,chardev=...` (vhost-user-vsock-pci, -fs-pci, ...); returns its id.

        With server=True QEMU listens on `socket` and waits at start-up for the back-end to connect.
        Property names use underscores for dashes (num_queues -> num-queues).
        """
        cid = self._chardev(socket, server)
        did = self._id("dev")
        named = {k.replace("_", "-"): v for k, v in props.items()}
        self.extra_args += ["-device", f"{driver},id={did},chardev={cid}{self._props(named)}"]
        return did

    def add_vhost_user_blk(
        self,
        socket: Path,
        num_queues: int = 1,
        server: bool = False,
        packed: bool = False,
        **props: object,
    ) -> str:
        """A vhost-user-blk-pci disk (the guest sees /dev/vda for the first one)."""
        if packed:
            props["packed"] = True
        return self.add_vhost_user_device(
            "vhost-user-blk-pci", socket, server=server, num_queues=num_queues, **props
        )

    def add_vhost_user_rng(self, socket: Path, server: bool = False, **props: object) -> str:
        """A vhost-user-rng-pci device (e.g. event_idx=False, indirect_desc=False, see GUEST.md)."""
        return self.add_vhost_user_device("vhost-user-rng-pci", socket, server=server, **props)

    def add_vhost_user_net(
        self,
        socket: Path,
        server: bool = False,
        packed: bool = False,
        queues: int = 1,
        **props: object,
    ) -> str:
        """virtio-net-pci on a vhost-user netdev, with vectors=0 (QEMU 7.2 crashes with MSI-X)."""
        cid = self._chardev(socket, server)
        nid = self._id("net")
        did = self._id("dev")
        netdev = f"vhost-user,id={nid},chardev={cid}"
        if queues != 1:
            netdev += f",queues={queues}"
            props.setdefault("mq", True)
        props.setdefault("vectors", 0)
        if packed:
            props["packed"] = True
        named = {k.replace("_", "-"): v for k, v in props.items()}
        self.extra_args += ["-netdev", netdev]
        self.extra_args += ["-device", f"virtio-net-pci,id={did},netdev={nid}{self._props(named)}"]
        return did

    def add_drive(self, image: Path, *, snapshot: bool = True, fmt: str = "raw") -> None:
        """A plain virtio-blk disk served by QEMU itself; snapshot=True never writes the image."""
        spec = f"file={image},format={fmt},if=virtio"
        if snapshot:
            spec += ",snapshot=on"
        self.extra_args += ["-drive", spec]

    def add_serial_file(self, path: Path) -> int:
        """Another serial port written to `path`; returns its index N (the guest's ttySN)."""
        self.serial_paths.append(path)
        return len(self.serial_paths) - 1

    def add_fw_cfg(self, name: str, path: Path) -> None:
        """Pass a file to the guest at /sys/firmware/qemu_fw_cfg/by_name/opt/NAME/raw."""
        self.extra_args += ["-fw_cfg", f"name=opt/{name},file={path}"]

    def add_qmp(self, socket: Path) -> Path:
        """Serve QMP on the Unix socket `socket` (connect with peers.qmp.Qmp); returns it."""
        self.extra_args += ["-qmp", f"unix:{check_socket_path(socket)},server=on,wait=off"]
        return socket

    def add_trace(self, path: Path, *events: str) -> None:
        """Log QEMU's own trace `events` (e.g. vhost_user_write) to `path`, one line each."""
        for event in events:
            self.extra_args += ["-trace", f"enable={event},file={path}"]

    def command(self) -> list[str]:
        """The qemu-system-x86_64 arguments (without the `timeout` wrapper)."""
        binary = self.binary or find_binary("qemu-system-x86_64")
        if binary is None:
            raise PeerError("qemu-system-x86_64 not installed: apt-get install qemu-system-x86")
        args = [
            binary,
            "-accel",
            "tcg",
            "-machine",
            self.machine,
            "-cpu",
            "max",
            "-smp",
            str(self.cpus),
            "-m",
            self.memory,
            "-object",
            f"memory-backend-memfd,id=mem,size={self.memory},share=on",
            "-numa",
            "node,memdev=mem",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]
        for path in self.serial_paths:
            args += ["-serial", f"file:{path}"]
        if self.kernel is not None:
            args += ["-kernel", str(self.kernel)]
        if self.initrd is not None:
            args += ["-initrd", str(self.initrd)]
        if self.append is not None:
            args += ["-append", self.append]
        return args + self.extra_args

    def start(self) -> Self:
        """Launch QEMU under `timeout`; a server=True chardev makes it wait for its peer."""
        if self.process is not None:
            raise PeerError("QemuVM: already started; use a fresh QemuVM for each run")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = PeerProcess(
            self.command(), self.workdir, name="qemu", timeout_s=self.timeout_s
        ).start()
        return self

    def wait(self, timeout: float | None = None) -> int:
        """Wait for QEMU to exit (the guest powered off); returns its exit status."""
        assert self.process is not None, "not started"
        return self.process.wait(timeout)

    def stop(self) -> int | None:
        """Stop QEMU if it is running; returns its exit status."""
        return self.process.stop() if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    @property
    def stdout(self) -> str:
        return self.process.stdout if self.process else ""

    @property
    def stderr(self) -> str:
        return self.process.stderr if self.process else ""

    def serial_text(self, index: int = 0) -> str:
        """What the guest wrote to serial port `index` so far (0 is the console)."""
        path = self.serial_paths[index]
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def console(self) -> str:
        return self.serial_text(0)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
