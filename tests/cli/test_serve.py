"""``pyvhost serve``: argument parsing, start-up errors, and serving for real (subprocess)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.rig import Rig
from peers.qemu import PeerProcess, make_raw_image, short_tmp
from pyvhost.cli.main import build_parser
from pyvhost.user.connection import Listener


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tmp("pvh-serve-") as d:
        yield d


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser(("pyvhost.cli.serve",)).parse_args(["serve", *argv])


def test_blk_arguments() -> None:
    args = _parse(
        "blk", "--socket", "/tmp/s", "--image", "/tmp/i", "--readonly", "--queues", "2",
        "--client", "--serial", "ID", "--workers", "3", "--poll-us", "50",
    )  # fmt: skip
    expected = {
        "device": "blk", "socket": "/tmp/s", "image": "/tmp/i", "readonly": True, "queues": 2,
        "client": True, "serial": "ID", "workers": 3, "queue_size": 256, "poll_us": 50,
    }  # fmt: skip
    assert {k: getattr(args, k) for k in expected} == expected


def test_rng_arguments_and_defaults() -> None:
    args = _parse("rng", "--socket", "/tmp/s")
    assert (args.device, args.socket, args.client, args.workers) == ("rng", "/tmp/s", False, 1)
    assert args.poll_us == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["blk", "--socket", "/tmp/s"],  # no image
        ["blk", "--socket", "/tmp/s", "--image", "i", "--queues", "0"],
        ["blk", "--socket", "/tmp/s", "--image", "i", "--poll-us", "-1"],
        ["rng", "--socket", "/tmp/s", "--poll-us", "soon"],
        ["rng"],  # no socket
        ["net", "--socket", "/tmp/s"],  # no such device
    ],
)
def test_bad_arguments_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse(*argv)
    assert exc.value.code == 2


def _serve(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["timeout", "30", sys.executable, "-m", "pyvhost", "serve", *argv],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_missing_image_exits_1_with_a_message(workdir: Path) -> None:
    proc = _serve("blk", "--socket", str(workdir / "s"), "--image", str(workdir / "nope.img"))
    assert proc.returncode == 1
    assert "pyvhost serve blk" in proc.stderr and "nope.img" in proc.stderr
    assert not (workdir / "s").exists()


def test_socket_path_taken_by_a_file_exits_1(workdir: Path) -> None:
    (workdir / "s").write_text("not a socket")
    proc = _serve("rng", "--socket", str(workdir / "s"))
    assert proc.returncode == 1
    assert "not a socket" in proc.stderr
    assert (workdir / "s").read_text() == "not a socket"


def test_serve_rng_serves_a_front_end(workdir: Path) -> None:
    sock = workdir / "rng.sock"
    argv = [sys.executable, "-m", "pyvhost", "serve", "rng", "--socket", str(sock)]
    with PeerProcess(argv, workdir, name="rng", timeout_s=60, socket=sock) as proc:
        with Rig(str(sock)) as rig:
            head, _ = rig.submit(0, [], [128])
            assert rig.wait_used(0, 1) == [(head, 128)]
        assert proc.stop() == 0
    assert not sock.exists()


def test_serve_blk_in_client_mode(workdir: Path) -> None:
    from pyvhost.user.frontend import Frontend

    image = make_raw_image(workdir / "disk.img", 1 << 20)
    sock = workdir / "fe.sock"
    with Listener(str(sock)) as listener:
        argv = [
            sys.executable, "-m", "pyvhost", "serve", "blk", "--socket", str(sock),
            "--image", str(image), "--client", "--queues", "2",
        ]  # fmt: skip
        with PeerProcess(argv, workdir, name="blk", timeout_s=60) as proc:
            fe = Frontend.accept(listener, 20)
            try:
                fe.negotiate()
                assert fe.get_queue_num() == 2
                capacity = int.from_bytes(fe.get_config(0, 8), "little")
                assert capacity == (1 << 20) // 512
            finally:
                fe.close()
            assert proc.stop() == 0
        assert "front-end connected" in proc.stderr
