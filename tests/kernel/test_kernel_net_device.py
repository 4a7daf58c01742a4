"""KernelNetDevice where kernel vhost is (the test guest, or a host that has it): a vhost-user
net back-end whose data path is the kernel's vhost-net. pyvhost's own front-end and guest driver
(DriverSession + NetDriver) connect over vhost-user; frames go both ways between their rings and
a TAP without passing through the daemon's Python; dirty logging set up over vhost-user marks
what the kernel wrote; a second front-end after the first left gets a fresh kernel session.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest

from peers.kernel_runner import CLI_IN_PROCESS, KernelRunner

pytestmark = [pytest.mark.kernel, pytest.mark.guest]

FRAMES = 100

SCRIPT = textwrap.dedent(
    """
    import json, os, select, socket, sys, time
    from pyvhost.cli.exercise_net import frame, parse_frame as _parse
    from pyvhost.daemon import Daemon
    from pyvhost.devices.net.kernel import KernelNetDevice
    from pyvhost.driver.net import NetDriver
    from pyvhost.driver.session import DriverSession
    from pyvhost.kernel.tap import Tap
    from pyvhost.virtio.memory import PAGE_SIZE, DirtyLog

    frames = int(sys.argv[1])
    out = {}
    tap = Tap.open("pvk0")
    with open("/proc/sys/net/ipv6/conf/pvk0/disable_ipv6", "w") as f:
        f.write("1")
    tap.set_up()
    wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    wire.bind(("pvk0", 0))
    device = KernelNetDevice(tap)
    out["offered"] = device.features
    sock = "/tmp/net.sock"

    def tx(net, n):
        seen = set()
        for i in range(n):
            net.send(frame(1, i, 300))
        net.flush()
        deadline = time.monotonic() + 20
        while len(seen) < n and time.monotonic() < deadline:
            if select.select([wire], [], [], 0.5)[0]:
                data, addr = wire.recvfrom(65536)
                p = _parse(data)
                if addr[2] != 4 and p and p[0] == 1 and data == frame(1, p[1], 300):
                    seen.add(p[1])
            net.reap_tx()
        while net.tx_in_flight and net.reap_tx(1.0):
            pass
        return len(seen)

    def rx(net, n, gpas):
        seen = set()
        net.post_rx()
        for i in range(n):
            wire.send(frame(2, i, 700))
        deadline = time.monotonic() + 20
        while len(seen) < n and time.monotonic() < deadline:
            for got in net.receive(timeout=0.5):
                gpas.extend(got.addresses)
                p = _parse(got.frame)
                if p and p[0] == 2 and got.frame == frame(2, p[1], 700):
                    seen.add(p[1])
        return len(seen)

    with Daemon(device, sock).run_in_thread():
        for round_ in ("first", "second"):
            session = DriverSession.connect(sock, num_queues=2, queue_size=128)
            try:
                net = NetDriver(session)
                entry = {"features": session.features}
                entry["tx"] = tx(net, frames)
                gpas = []
                if round_ == "second":
                    end = session.gpa_base + session.mem_size
                    log, fd = DirtyLog.anonymous(-(-end // PAGE_SIZE // 8))
                    session.enable_dirty_log(log, fd)
                entry["rx"] = rx(net, frames, gpas)
                entry["calls"] = [session.notifications(0), session.notifications(1)]
                if round_ == "second":
                    pages = {g // PAGE_SIZE for g in gpas}
                    pages |= {q.ring.device // PAGE_SIZE for q in session.queues}
                    entry["pages_written"] = len(pages)
                    entry["unmarked"] = sorted(p for p in pages if not log.is_dirty(p))
                out[round_] = entry
            finally:
                session.close()
                if round_ == "second":
                    log.close()
                    os.close(fd)
    device.close()
    wire.close()
    links = os.popen("ip -o link").read()
    out["tap_left"] = "pvk0" in links
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def run(kernel_runner: KernelRunner) -> dict[str, Any]:
    result = kernel_runner.run(
        SCRIPT, timeout=240, argv=[str(FRAMES)], modules=["tun", "vhost_net"]
    ).check()
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def test_frames_both_ways_through_the_kernel(run: dict[str, Any]) -> None:
    for round_ in ("first", "second"):
        assert run[round_]["tx"] == FRAMES, round_
        assert run[round_]["rx"] == FRAMES, round_
        assert min(run[round_]["calls"]) > 0, "the kernel signals the front-end's call eventfds"


def test_the_front_end_sees_the_kernels_features(run: dict[str, Any]) -> None:
    offered = run["offered"]
    assert offered >> 15 & 1, "MRG_RXBUF"
    assert offered >> 32 & 1, "VERSION_1"
    assert not offered >> 27 & 1, "VHOST_NET_F_VIRTIO_NET_HDR stays between us and the kernel"
    assert not offered >> 33 & 1, "ACCESS_PLATFORM is never offered"
    assert run["first"]["features"] >> 15 & 1


def test_dirty_log_over_vhost_user_marks_what_the_kernel_wrote(run: dict[str, Any]) -> None:
    second = run["second"]
    assert second["pages_written"] > 2
    assert second["unmarked"] == []


def test_the_tap_goes_with_the_device(run: dict[str, Any]) -> None:
    assert run["tap_left"] is False


CLI_SCRIPT = CLI_IN_PROCESS + textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    serve = subprocess.Popen(
        [sys.executable, "-m", "pyvhost", "serve", "net", "--socket", "/tmp/k.sock",
         "--tap", "pvs0", "--kernel", "/dev/vhost-net", "--mtu", "4000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not os.path.exists("/tmp/k.sock") and time.monotonic() < deadline:
        time.sleep(0.05)
    link = subprocess.run(["ip", "-j", "link", "show", "pvs0"], capture_output=True, text=True)
    out = {"mtu": json.loads(link.stdout)[0]["mtu"] if link.returncode == 0 else link.stderr}
    for name, extra in {"split": [], "no-mrg": ["--no-mrg-rxbuf"]}.items():
        out[name] = pyvhost("exercise", "net", "--socket", "/tmp/k.sock", "--tap", "pvs0",
                            "--frames", "100", "--size", "900", "--json", *extra)
    serve.terminate()
    _, err = serve.communicate(timeout=30)
    out["serve"] = {"rc": serve.returncode, "stderr": err[-4000:]}
    out["no-tap"] = pyvhost("serve", "net", "--socket", "/tmp/b.sock", "--backend", "loopback",
                            "--kernel", "/dev/vhost-net")
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def cli(kernel_runner: KernelRunner) -> dict[str, Any]:
    result = kernel_runner.run(CLI_SCRIPT, timeout=240, modules=["tun", "vhost_net"]).check()
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


@pytest.mark.parametrize("name", ["split", "no-mrg"])
def test_serve_net_kernel_with_exercise_through_the_tap(cli: dict[str, Any], name: str) -> None:
    run = cli[name]
    assert run["rc"] == 0, f"{run['stdout']}\n{run['stderr']}\n{cli['serve']['stderr']}"
    report = json.loads(run["stdout"])
    assert report["errors"] == 0 and report["tx_frames"] == 100 and report["rx_frames"] == 100
    assert "handed to /dev/vhost-net" in cli["serve"]["stderr"]
    assert cli["serve"]["rc"] == 0


def test_serve_net_kernel_gives_the_tap_it_creates_the_mtu(cli: dict[str, Any]) -> None:
    assert cli["mtu"] == 4000
    assert "TAP pvs0: MTU 4000" in cli["serve"]["stderr"]


def test_serve_net_kernel_needs_a_tap(cli: dict[str, Any]) -> None:
    assert cli["no-tap"]["rc"] == 1, cli["no-tap"]
    assert "--kernel needs --tap NAME" in cli["no-tap"]["stderr"]
