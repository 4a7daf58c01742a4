"""``pyvhost serve net --tap`` for real, in a network namespace of our own (``unshare -n``: no
frame reaches the host's network): ``exercise net --socket --tap`` sends frames both ways through
the TAP, then a driver session checks the multiqueue TAP's queues follow the pairs in use, the
offloads follow the acked features and the control queue, SEND_RARP puts a RARP on the wire,
pair 1 transmits, and the TAP's MTU follows ``--mtu`` and NET_SET_MTU (only on a TAP the daemon
created: one the host made is compared and left alone)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("unshare") is None,
    reason="needs root, /dev/net/tun and unshare(1) for a private network namespace",
)

SCRIPT = textwrap.dedent(
    """
    import ctypes, fcntl, json, os, socket, struct, subprocess, sys, time
    from pyvhost.driver.net import NetDriver
    from pyvhost.driver.session import DriverSession

    sock, log = sys.argv[1], sys.argv[2]
    TAP, MAC = "pvhn0", bytes.fromhex("02000000000a")
    out = {}

    def link(name=TAP):
        raw = subprocess.run(["ip", "-j", "-d", "link", "show", name], capture_output=True,
                             text=True, check=True).stdout
        return json.loads(raw)[0]

    def linkinfo():
        return link()["linkinfo"]["info_data"]

    def ethtool(cmd):
        buf = ctypes.create_string_buffer(struct.pack("II", cmd, 0))
        ifr = struct.pack("16sP", TAP.encode(), ctypes.addressof(buf)).ljust(40, b"\\0")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, 0x8946, ifr)  # SIOCETHTOOL
        return struct.unpack("II", buf.raw[:8])[1]

    def offloads():
        return {"csum": ethtool(0x16), "tso": ethtool(0x1E)}  # ETHTOOL_GTXCSUM, _GTSO

    def until(check, timeout=5.0):
        end = time.monotonic() + timeout
        while not check() and time.monotonic() < end:
            time.sleep(0.02)
        return check()

    def ctrl(session, command):
        cmd, ack = session.alloc(len(command)), session.alloc(1)
        session.view(cmd, len(command))[:] = command
        session.submit(4, [(cmd, len(command))], [(ack, 1)])
        session.kick(4)
        session.wait(4, 5.0)
        return session.view(ack, 1)[0]

    def main(serve):
        until(lambda: os.path.exists(sock), 20)
        out["created"] = linkinfo()
        out["mtu_created"] = link()["mtu"]
        ex = subprocess.run(
            [sys.executable, "-m", "pyvhost", "exercise", "net", "--socket", sock, "--tap", TAP,
             "--frames", "300", "--size", "700", "--timeout", "10", "--json"],
            capture_output=True, text=True, timeout=60)
        out["exercise_rc"], out["exercise_err"] = ex.returncode, ex.stderr[-2000:]
        out["exercise"] = json.loads(ex.stdout) if ex.stdout else None

        session = DriverSession.connect(sock, num_queues=5, queue_size=64)
        out["one_pair_disabled"] = until(lambda: linkinfo()["numdisabled"] == 1)
        out["offloads_acked"] = offloads()
        out["mq_ack"] = ctrl(session, bytes([4, 0, 2, 0]))
        out["two_pairs_disabled"] = until(lambda: linkinfo()["numdisabled"] == 0)
        out["offloads_ack"] = ctrl(session, bytes([5, 0]) + bytes(8))
        out["offloads_after_ctrl"] = offloads()

        wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        wire.bind((TAP, 0))
        wire.settimeout(0.5)
        session.frontend.send_rarp(MAC)
        net1 = NetDriver(session, pair=1)
        frame = b"\\xff" * 6 + MAC + (0x88B5).to_bytes(2, "big") + b"pair one" + bytes(50)
        net1.send(frame)
        net1.flush()
        seen = {"rarp": None, "pair1": False}
        end = time.monotonic() + 5
        while (seen["rarp"] is None or not seen["pair1"]) and time.monotonic() < end:
            try:
                data = wire.recv(65536)
            except socket.timeout:
                continue
            if data[12:14] == b"\\x80\\x35":
                seen["rarp"] = data.hex()
            elif data == frame:
                seen["pair1"] = True
        out.update(seen)
        session.frontend.net_set_mtu(4000)
        out["mtu_set"] = until(lambda: link()["mtu"] == 4000) and 4000 or link()["mtu"]
        session.close()
        serve.terminate()
        out["serve_rc"] = serve.wait(10)

    def attached():
        # A TAP the host made (MTU 1500): the daemon compares, warns, and leaves it alone.
        subprocess.run(["ip", "tuntap", "add", "dev", "pvhn1", "mode", "tap", "vnet_hdr"],
                       check=True)
        with open(log + ".attached", "w") as err:
            other = subprocess.Popen(
                [sys.executable, "-m", "pyvhost", "serve", "net", "--socket", sock + "2",
                 "--tap", "pvhn1", "--mtu", "9000", "--stats-interval", "0"],
                stdout=subprocess.DEVNULL, stderr=err)
            try:
                until(lambda: os.path.exists(sock + "2"), 20)
                out["mtu_attached"] = link("pvhn1")["mtu"]
                other.terminate()
                out["attached_rc"] = other.wait(10)
            finally:
                if other.poll() is None:
                    other.kill()
        out["mtu_after_attached"] = link("pvhn1")["mtu"]

    serve = subprocess.Popen(
        [sys.executable, "-m", "pyvhost", "serve", "net", "--socket", sock, "--tap", TAP,
         "--queues", "2", "--mac", "02:00:00:00:00:0a", "--stats-interval", "0",
         "--mtu", "9000"],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        main(serve)
    finally:
        if serve.poll() is None:
            serve.kill()
    attached()
    print(json.dumps(out))
    """
)


def test_tap_both_ways_queues_offloads_rarp(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    sock, log = tmp_path / "net.sock", tmp_path / "serve.log"
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", SCRIPT, str(sock), str(log)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    served = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stderr + served
    out = json.loads(proc.stdout)
    info = out["created"]
    assert info["type"] == "tap" and info["multi_queue"] and info["vnet_hdr"]
    assert info["numqueues"] == 2
    assert out["exercise_rc"] == 0, out["exercise_err"] + json.dumps(out["exercise"])
    result = out["exercise"]
    assert result["mode"] == "tap" and result["tx_frames"] == result["rx_frames"] == 300
    assert result["errors"] == 0
    assert out["one_pair_disabled"] is True, "pair 1 unused: its TAP queue must be detached"
    assert out["mq_ack"] == 0 and out["two_pairs_disabled"] is True
    assert out["offloads_acked"] == {"csum": 1, "tso": 1}
    assert out["offloads_ack"] == 0 and out["offloads_after_ctrl"] == {"csum": 0, "tso": 0}
    rarp = bytes.fromhex(out["rarp"])
    assert rarp[:6] == b"\xff" * 6 and rarp[6:12] == bytes.fromhex("02000000000a")
    assert rarp[20:22] == b"\x00\x03"  # reverse request
    assert out["pair1"] is True
    assert out["serve_rc"] == 0
    assert "TAP pvhn0 created, 2 queue(s)" in served
    assert "RARP for 02:00:00:00:00:0a sent through tap pvhn0" in served
    assert "tap pvhn0 at exit: tx " in served
    assert out["mtu_created"] == 9000, "a TAP the daemon creates takes --mtu"
    assert out["mtu_set"] == 4000, "NET_SET_MTU reaches a TAP the daemon created"
    assert "TAP pvhn0: MTU 4000" in served
    assert out["mtu_attached"] == out["mtu_after_attached"] == 1500
    assert out["attached_rc"] == 0
    warned = Path(f"{log}.attached").read_text()
    assert "TAP pvhn1 has MTU 1500, below the guest's 9000" in warned, warned
