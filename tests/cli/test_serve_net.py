"""``pyvhost serve net`` and ``pyvhost exercise net --socket`` as subprocesses: loopback verified
both ways, a sink with ``--tx-only``, counters logged at exit, bad input in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peers.qemu import PeerProcess


def serve(workdir: Path, sock: Path, *args: str, name: str = "serve-net") -> PeerProcess:
    argv = [sys.executable, "-m", "pyvhost", "serve", "net", "--socket", str(sock), *args]
    return PeerProcess(argv, workdir, name=name, timeout_s=120, socket=sock)


def exercise(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pyvhost", "exercise", "net", "--socket", str(sock), *args]
    return subprocess.run(
        ["timeout", "-k", "5", "120", *argv], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("extra", [[], ["--packed", "--no-mrg-rxbuf"]], ids=["split", "packed"])
def test_loopback_every_frame_comes_back(peer_dir: Path, extra: list[str]) -> None:
    sock = peer_dir / "net.sock"
    with serve(peer_dir, sock, "--backend", "loopback", "--mac", "02:00:00:00:00:01") as daemon:
        done = exercise(sock, "--frames", "500", "--size", "1400", "--json", *extra)
        assert done.returncode == 0, done.stdout + done.stderr
        result = json.loads(done.stdout)
        assert result["mode"] == "loopback"
        assert result["tx_frames"] == result["rx_frames"] == 500
        assert result["errors"] == 0 and result["tx_pps"] > 0 and result["rx_pps"] > 0
        again = exercise(sock, "--seconds", "0.5")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "OK" in again.stdout
    assert daemon.proc is not None and daemon.proc.returncode == 0
    assert "loopback at exit: tx " in daemon.stderr
    assert "drops 0" in daemon.stderr.split("at exit:")[-1]


def test_sink_with_tx_only(peer_dir: Path) -> None:
    sock = peer_dir / "net.sock"
    with serve(peer_dir, sock, "--backend", "sink", "--stats-interval", "0.2") as daemon:
        done = exercise(sock, "--tx-only", "--frames", "3000", "--json")
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert (result["tx_frames"], result["rx_frames"], result["errors"]) == (3000, 0, 0)
    assert "sink at exit: tx 3000 frames" in daemon.stderr
    assert daemon.stderr.count("pyvhost.devices.net: sink: tx") >= 1  # the periodic line


def test_exercise_finds_a_loopback_that_loses_frames(peer_dir: Path) -> None:
    sock = peer_dir / "net.sock"
    with serve(peer_dir, sock, "--backend", "sink"):
        done = exercise(sock, "--frames", "20", "--timeout", "1")
    assert done.returncode == 1
    assert "loopback: 20 of 20 frames never came back within 1 s" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "loopback", "--mac", "01:02:03:04:05:06"], "is a multicast address"),
        (["--backend", "loopback", "--mac", "zz"], "six two-digit hex bytes"),
        (["--backend", "loopback", "--tap", "x"], "not allowed with argument"),
        ([], "one of the arguments --tap --backend is required"),
        (["--tap", "a/b"], "interface name 'a/b'"),
        (["--backend", "loopback", "--mtu", "20"], "MTU 20: must be 68..65535"),
    ],
)
def test_bad_serve_input_is_one_line(peer_dir: Path, args: list[str], message: str) -> None:
    argv = [sys.executable, "-m", "pyvhost", "serve", "net", "--socket", str(peer_dir / "s")]
    done = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode in (1, 2)
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--socket", "/nonexistent/net.sock", "--frames", "1", "--connect-timeout", "0.3"],
            "cannot connect to /nonexistent/net.sock within 0.3s",
        ),
        (["--socket", "/tmp/x.sock", "--tap", "pvh-not-here"], "--tap pvh-not-here: no such"),
        (["--kernel", "/dev/null"], "--kernel needs --tap NAME"),
        (["--kernel", "/dev/null", "--tap", "t", "--tx-only"], "are for --socket"),
    ],
)
def test_bad_exercise_input_is_one_line(args: list[str], message: str) -> None:
    cmd = [sys.executable, "-m", "pyvhost", "exercise", "net", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr
