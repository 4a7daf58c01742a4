"""A Linux guest's AF_VSOCK sockets through QEMU's vhost-user-vsock-pci and ``pyvhost serve vsock``.

The guest (busybox initramfs, modules vsock, vmw_vsock_virtio_transport_common and
vmw_vsock_virtio_transport) runs a static C helper (vsock_tool.c, see vsock_tool.py for why) that
connects to host ports 5000 and 5001, which the device bridges to Unix listeners at UDS_5000 and
UDS_5001, and listens on guest ports 6000 and 6001, which host programs reach with
``CONNECT 600x`` on UDS. All four connections move MiB both ways at once, every byte compared on
both sides, then each side's refusal is checked: the guest connecting to a host port nobody
listens on gets ECONNRESET, a host CONNECT to a guest port nobody listens on is closed without OK.

QEMU 7.2's vhost-user-vsock cannot reconnect to a restarted back-end (see
:func:`test_qemu_7_2_vhost_user_vsock_has_no_reconnect` and docs/vsock.md); the restart and its
TRANSPORT_RESET are proven with pyvhost's own front-end in tests/devices/vsock/test_restart.py.
What QEMU 7.2 offers instead, unplugging the device and plugging in one on a new back-end over
QMP, is :func:`test_guest_vsock_after_backend_restart_by_replug`.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from peers.guest import GuestAssets, GuestResult, GuestUnavailableError, boot_guest
from peers.qemu import PeerProcess, QemuVM
from peers.qmp import Qmp
from pyvhost.cli.vsock_streams import GUEST_TO_HOST, HOST_TO_GUEST, stream

from .conftest import Serve
from .vsock_tool import FETCH, FW_CFG_NAME, build_vsock_tool

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

MIB = 1 << 20
SIZE = 4 * MIB + 1021
"""Bytes each way on each of the four connections (not a multiple of any buffer size)."""
HOST_PORTS = (5000, 5001)
GUEST_PORTS = (6000, 6001)
GUEST_CID = 3

STREAMS = f"""t0=$(cut -d' ' -f1 /proc/uptime)
pids=
for port in {" ".join(map(str, GUEST_PORTS))}; do
    /tmp/vsock_tool listen $port {SIZE} >/tmp/out.listen.$port 2>&1 &
    pids="$pids $!"
done
for port in {" ".join(map(str, HOST_PORTS))}; do
    /tmp/vsock_tool connect 2 $port {SIZE} >/tmp/out.connect.$port 2>&1 &
    pids="$pids $!"
done
rc=0
for pid in $pids; do wait $pid || rc=1; done
echo "seconds $t0 $(cut -d' ' -f1 /proc/uptime)"
cat /tmp/out.*
/tmp/vsock_tool connect 2 5999 1 || true
echo "streams $rc"
"""
"""Guest lines for the four streams and the refusal (after FETCH)."""
SCRIPT = FETCH + STREAMS


@pytest.fixture(scope="module")
def vsock_tool() -> Path:
    try:
        return build_vsock_tool()
    except GuestUnavailableError as exc:
        pytest.skip(f"cannot build the guest's vsock helper: {exc}")


class HostPrograms:
    """The host's side, one thread per connection: listeners for the guest's connections and
    CONNECTs to the guest's listeners (retried while the guest is not listening yet)."""

    def __init__(self, uds: Path) -> None:
        self.uds = uds
        self.results: dict[str, str] = {}
        self.listeners = []
        for port in HOST_PORTS:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(f"{uds}_{port}")
            listener.listen(1)
            listener.settimeout(90)
            self.listeners.append(listener)
        self.threads = [
            *(threading.Thread(target=self._accept, args=(s,)) for s in self.listeners),
            *(threading.Thread(target=self._connect, args=(p,)) for p in GUEST_PORTS),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.daemon = True
            thread.start()

    def finish(self, timeout: float) -> dict[str, str]:
        for thread in self.threads:
            thread.join(timeout)
        for listener in self.listeners:
            listener.close()
        return self.results

    def _accept(self, listener: socket.socket) -> None:
        name = f"host listener {listener.getsockname()}"
        try:
            conn, _ = listener.accept()
            with conn:
                self.results[name] = _exchange(conn)
        except OSError as exc:
            self.results[name] = f"error: {exc}"

    def _connect(self, port: int) -> None:
        name = f"host CONNECT {port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                sock, line = _connect(self.uds, port)
            except OSError as exc:
                self.results[name] = f"error: {exc}"
                return
            with sock:
                if line.startswith(b"OK "):
                    self.results[name] = _exchange(sock)
                    self.results[f"refused CONNECT after {port}"] = repr(_connect_line(self.uds))
                    return
            time.sleep(0.2)  # the guest does not listen yet: the device closed it
        self.results[name] = "error: never accepted"


def _connect(uds: Path, port: int) -> tuple[socket.socket, bytes]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(str(uds))
    sock.sendall(b"CONNECT %d\n" % port)
    line = b""
    while not line.endswith(b"\n") and (byte := sock.recv(1)):
        line += byte
    return sock, line


def _connect_line(uds: Path) -> bytes:
    """The device's answer to a CONNECT to a guest port nobody listens on."""
    sock, line = _connect(uds, 6999)
    sock.close()
    return line


def _exchange(sock: socket.socket) -> str:
    """SIZE bytes each way at once, then both sides close; "ok" or what went wrong."""
    writer = threading.Thread(target=_send_all, args=(sock,), daemon=True)
    writer.start()
    got = bytearray()
    while data := sock.recv(1 << 16):
        got += data
    writer.join(30)
    if bytes(got) != stream(GUEST_TO_HOST, 0, SIZE):
        return f"error: {len(got)} bytes from the guest, not its stream of {SIZE}"
    return "ok"


def _send_all(sock: socket.socket) -> None:
    sock.sendall(stream(HOST_TO_GUEST, 0, SIZE))
    sock.shutdown(socket.SHUT_WR)


def test_guest_streams_both_ways_through_serve_vsock(
    peer_dir: Path,
    guest_vm: QemuVM,
    guest_assets: GuestAssets,
    serve: Serve,
    vsock_tool: Path,
) -> None:
    sock, uds = peer_dir / "vsock.sock", peer_dir / "uds"
    daemon = serve("vsock", sock, "--guest-cid", str(GUEST_CID), "--uds-path", str(uds))
    guest_vm.add_vhost_user_device("vhost-user-vsock-pci", sock)
    guest_vm.add_fw_cfg(FW_CFG_NAME, vsock_tool)
    host = HostPrograms(uds)
    host.start()
    result = boot_guest(guest_vm, SCRIPT, timeout=50, assets=guest_assets).check()
    _check_streams(result.output, host.finish(30), uds)
    _check_daemon(daemon)


def _check_streams(output: str, outcome: dict[str, str], uds: Path) -> None:
    """Both sides of `STREAMS` moved every byte and saw both refusals."""
    lines = output.splitlines()
    for port in HOST_PORTS:
        assert f"connect {port} ok {SIZE}" in lines, output
    for port in GUEST_PORTS:
        assert f"listen {port} ok {SIZE}" in lines, output
    assert "streams 0" in lines
    assert "vsock_tool: connect: Connection reset by peer" in lines  # host port 5999: RST
    for port in HOST_PORTS:
        assert outcome[f"host listener {uds}_{port}"] == "ok"
    for port in GUEST_PORTS:
        assert outcome[f"host CONNECT {port}"] == "ok"
        assert outcome[f"refused CONNECT after {port}"] == "b''"
    start, end = next(line for line in lines if line.startswith("seconds")).split()[1:]
    print(f"4 connections x {SIZE} bytes each way: {float(end) - float(start):.2f} s")


def _check_daemon(daemon: PeerProcess) -> None:
    """The back-end still runs and logged no error (the refused guest connection is info)."""
    assert daemon.returncode is None
    log = daemon.stderr
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]
    assert "uds_5999: No such file or directory" in log


HOLD_PORT = 5002
"""The guest's connection that is open when the back-end dies."""
KEPT_PORT = 6002
"""A guest listener opened before the unplug and used after the re-plug."""
SLOT, CHARDEV, DEVICE = "vsock-slot", "vsock-chr", "vsock0"
DRIVER_DIR = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport"

REPLUG_SCRIPT = f"""{FETCH}
bound() {{ ls {DRIVER_DIR} | grep -q '^virtio'; }}
gone() {{ ! bound; }}
device() {{
    i=0
    until $1; do
        i=$((i + 1))
        if [ $i -gt 300 ]; then echo "vsock device never $1"; exit 1; fi
        sleep 0.1
    done
    echo "vsock device $1"
}}
/tmp/vsock_tool listen {KEPT_PORT} {SIZE} >/tmp/kept.log 2>&1 &
kept=$!
/tmp/vsock_tool hold 2 {HOLD_PORT}
device gone
device bound
{STREAMS}
wait $kept
cat /tmp/kept.log
"""
"""Hold a connection until the device goes, wait for it to come back, then `STREAMS`; a listener
from before the unplug takes one more stream."""


class _GuestThread:
    """`boot_guest` on a thread, so that the test can act while the guest's script runs."""

    def __init__(self, vm: QemuVM, script: str, assets: GuestAssets, timeout: float) -> None:
        self.vm = vm
        self._outcome: list[GuestResult | BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(script, assets, timeout), name="guest", daemon=True
        )
        self._thread.start()

    def _run(self, script: str, assets: GuestAssets, timeout: float) -> None:
        try:
            self._outcome.append(boot_guest(self.vm, script, timeout=timeout, assets=assets))
        except BaseException as exc:  # raised by `result`, in the test's thread
            self._outcome.append(exc)

    def wait_for(self, line: str, timeout: float = 30) -> None:
        """Wait until the script printed `line`; AssertionError if it ends first or is late."""
        path = self.vm.workdir / "result.log"  # boot_guest's result port
        deadline = time.monotonic() + timeout
        while True:
            text = path.read_text(errors="replace").replace("\r\n", "\n") if path.exists() else ""
            if f"\n{line}\n" in text:
                return
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError(
                    f"the guest did not print {line!r}; its output:\n{text[-1500:]}\n"
                    f"console:\n{self.vm.console[-2000:]}\nQEMU stderr:\n{self.vm.stderr[-1000:]}"
                )
            time.sleep(0.02)

    def result(self, timeout: float) -> GuestResult:
        """The script's result once the guest powered off (what boot_guest raised, raised)."""
        self._thread.join(timeout)
        if not self._outcome:
            raise AssertionError(f"the guest still runs after {timeout:g} s")
        outcome = self._outcome[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _listen(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(60)
    return listener


def _kill(daemon: PeerProcess, sock: Path) -> None:
    """SIGKILL the daemon, as a crash would end it, and remove the socket it leaves behind."""
    assert daemon.pid is not None
    os.killpg(daemon.pid, signal.SIGKILL)  # its process group: `timeout` and the daemon
    daemon.stop()
    sock.unlink()


def _connect_and_exchange(uds: Path, port: int) -> str:
    """CONNECT to a guest port that listens, then `_exchange`."""
    sock, line = _connect(uds, port)
    with sock:
        return _exchange(sock) if line.startswith(b"OK ") else f"error: CONNECT answered {line!r}"


def _wait_logged(daemon: PeerProcess, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.stderr:
        if daemon.returncode is not None or time.monotonic() > deadline:
            raise AssertionError(f"{daemon.name} did not log {text!r}:\n{daemon.stderr[-3000:]}")
        time.sleep(0.02)


def test_guest_vsock_after_backend_restart_by_replug(
    peer_dir: Path,
    guest_vm: QemuVM,
    guest_assets: GuestAssets,
    serve: Serve,
    vsock_tool: Path,
) -> None:
    """QEMU 7.2's only way to a restarted back-end (docs/vsock.md, "Transport reset"): the device
    sits behind a hot-plug slot; once its back-end died it is unplugged (``device_del``, the
    guest ejects it), its chardev removed, a new ``serve vsock`` started on the same socket and
    both added again. Removing the device resets the guest's open connection (ECONNRESET); the
    guest's listener from before keeps listening; new connections go both ways.

    Host CONNECTs start only once the new daemon started the tx ring: one made while no driver
    runs is dropped when the driver starts (as its predecessor's), and its REQUEST may already
    have reached a guest listener by the rx ring, which then accepts a connection that is
    reset at once."""
    sock, uds = peer_dir / "vsock.sock", peer_dir / "uds"
    args = ("--guest-cid", str(GUEST_CID), "--uds-path", str(uds))
    first = serve("vsock", sock, *args)
    qmp_socket = guest_vm.add_qmp(peer_dir / "qmp.sock")
    guest_vm.extra_args += [
        "-device",
        f"pcie-root-port,id={SLOT},chassis=1",
        "-chardev",
        f"socket,id={CHARDEV},path={sock}",
        "-device",
        f"vhost-user-vsock-pci,id={DEVICE},chardev={CHARDEV},bus={SLOT}",
    ]
    guest_vm.add_fw_cfg(FW_CFG_NAME, vsock_tool)
    hold_listener = _listen(f"{uds}_{HOLD_PORT}")
    guest = _GuestThread(guest_vm, REPLUG_SCRIPT, guest_assets, timeout=60)
    qmp: Qmp | None = None
    try:
        qmp = Qmp.when_listening(qmp_socket, guest_vm, "qmp")
        held, _ = hold_listener.accept()
        guest.wait_for(f"holding {HOLD_PORT}")
        _kill(first, sock)
        with held:
            held.settimeout(10)
            assert held.recv(1) == b""  # the host's end ends with the back-end
        started = time.monotonic()
        qmp.unplug(DEVICE, CHARDEV)
        ejected = time.monotonic() - started
        guest.wait_for("vsock device gone")
        second = serve("vsock", sock, *args)
        _wait_logged(second, "listening on")
        host = HostPrograms(uds)
        started = time.monotonic()
        qmp.plug_vhost_user("vhost-user-vsock-pci", DEVICE, CHARDEV, sock, bus=SLOT)
        guest.wait_for("vsock device bound")
        plugged = time.monotonic() - started
        _wait_logged(second, "vring 1 started")
        host.start()
        kept = _connect_and_exchange(uds, KEPT_PORT)
        result = guest.result(60).check()
    except BaseException:
        guest_vm.stop()
        raise
    finally:
        if qmp is not None:
            qmp.close()
        hold_listener.close()
    print(f"unplugged in {ejected:.2f} s, plugged until the driver bound in {plugged:.2f} s")
    lines = result.output.splitlines()
    assert f"hold {HOLD_PORT} ended: Connection reset by peer" in lines, result.output
    assert lines.index("vsock device gone") < lines.index("vsock device bound")
    assert f"listen {KEPT_PORT} ok {SIZE}" in lines, result.output
    assert kept == "ok"
    _check_streams(result.output, host.finish(30), uds)
    _check_daemon(second)


def test_qemu_7_2_vhost_user_vsock_has_no_reconnect(
    peer_dir: Path, guest_vm: QemuVM, serve: Serve
) -> None:
    """Why no guest test restarts the back-end: with ``reconnect=1`` on its chardev, QEMU 7.2's
    vhost-user-vsock-pci does not even start (it talks to the chardev before it is connected;
    vhost-user-blk waits for it). Without ``reconnect``, a restarted back-end (QEMU listening,
    ``serve vsock --client``) gets GET_STATUS and SET_FEATURES with no handshake first, and
    QEMU gives up on the device. A QEMU that starts here needs the real restart test instead."""
    sock = peer_dir / "vsock.sock"
    serve("vsock", sock, "--guest-cid", str(GUEST_CID), "--uds-path", str(peer_dir / "uds"))
    guest_vm.extra_args += [
        "-chardev",
        f"socket,id=rc0,path={sock},reconnect=1",
        "-device",
        "vhost-user-vsock-pci,chardev=rc0",
    ]
    guest_vm.timeout_s = 30
    guest_vm.start()
    try:
        status = guest_vm.wait(20)
    finally:
        guest_vm.stop()
    if status == 0:
        pytest.skip("this QEMU starts vhost-user-vsock with reconnect=1: test a restart")
    assert "Failed to set msg fds" in guest_vm.stderr
    assert "vhost_backend_init failed" in guest_vm.stderr
