"""``pyvhost serve vsock`` and ``pyvhost exercise vsock --socket`` as real processes: arguments,
start-up errors, streams both ways through the Unix sockets, a clean stop."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.qemu import PeerProcess, short_tmp
from pyvhost.cli.main import build_parser
from pyvhost.user.connection import Listener


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tmp("pvh-vsockcli-") as d:
        yield d


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser(("pyvhost.cli.serve",)).parse_args(["serve", *argv])


def test_vsock_arguments() -> None:
    args = _parse("vsock", "--socket", "/tmp/s", "--guest-cid", "0x10", "--uds-path", "/tmp/u")
    got = (args.device, args.socket, args.guest_cid, args.uds_path, args.client, args.workers)
    assert got == ("vsock", "/tmp/s", 16, "/tmp/u", False, 1)


@pytest.mark.parametrize(
    "argv",
    [
        ["vsock", "--socket", "/tmp/s", "--uds-path", "/tmp/u"],  # no CID
        ["vsock", "--socket", "/tmp/s", "--guest-cid", "3"],  # no UDS path
        ["vsock", "--socket", "/tmp/s", "--guest-cid", "2", "--uds-path", "/tmp/u"],
        ["vsock", "--socket", "/tmp/s", "--guest-cid", "4294967295", "--uds-path", "/tmp/u"],
        ["vsock", "--socket", "/tmp/s", "--guest-cid", "three", "--uds-path", "/tmp/u"],
    ],
)
def test_bad_arguments_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse(*argv)
    assert exc.value.code == 2


def _pyvhost(*argv: str, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["timeout", str(timeout), sys.executable, "-m", "pyvhost", *argv],
        capture_output=True,
        text=True,
        check=False,
    )


def test_uds_path_taken_by_a_file_exits_1(workdir: Path) -> None:
    (workdir / "uds").write_text("not a socket")
    proc = _pyvhost(
        "serve", "vsock", "--socket", str(workdir / "s"), "--guest-cid", "3",
        "--uds-path", str(workdir / "uds"),
    )  # fmt: skip
    assert proc.returncode == 1
    assert "pyvhost serve vsock" in proc.stderr and "not a socket" in proc.stderr
    assert (workdir / "uds").read_text() == "not a socket"


def _serve(workdir: Path, *extra: str, name: str = "serve-vsock") -> PeerProcess:
    sock, uds = workdir / "v.sock", workdir / "uds"
    argv = [
        sys.executable, "-m", "pyvhost", "serve", "vsock", "--socket", str(sock),
        "--guest-cid", "7", "--uds-path", str(uds), *extra,
    ]  # fmt: skip
    return PeerProcess(argv, workdir, name=name, timeout_s=120, socket=uds)


def _stop(served: PeerProcess) -> None:
    """SIGTERM; the daemon stops cleanly. (Not asserted: the exit status. ``timeout`` sends the
    signal to the child and then to its whole group; a daemon that stopped within that gap has
    its default handler back and dies of the second one, as ``serve rng`` does too.)"""
    served.stop()
    assert "SIGTERM received" in served.stderr and "daemon stopped" in served.stderr
    assert "Traceback" not in served.stderr


def _exercise(workdir: Path, *extra: str) -> dict[str, object]:
    proc = _pyvhost(
        "exercise", "vsock", "--socket", str(workdir / "v.sock"),
        "--uds-path", str(workdir / "uds"), "--json", *extra, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_exercise_both_ways_through_serve_vsock(workdir: Path) -> None:
    with _serve(workdir) as served:
        big = _exercise(workdir, "--bytes", str(4 << 20))
        small = _exercise(workdir, "--bytes", "1", "--guest-cid", "7")
        _stop(served)
    for result, size in ((big, 4 << 20), (small, 1)):
        assert result["errors"] == 0 and result["ok"] is True
        assert result["host_to_guest_bytes"] == result["guest_to_host_bytes"] == size
        assert result["guest_cid"] == 7 and result["transport_resets"] == 0
    assert "the guest connected to" in served.stderr and "host CONNECT 5201" in served.stderr
    assert not (workdir / "v.sock").exists() and not (workdir / "uds").exists()
    assert not (workdir / "uds_5202").exists()


def test_exercise_text_report(workdir: Path) -> None:
    with _serve(workdir):
        proc = _pyvhost(
            "exercise", "vsock", "--socket", str(workdir / "v.sock"),
            "--uds-path", str(workdir / "uds"), "--bytes", "4096",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "as guest CID 7" in proc.stdout and "4096 bytes verified" in proc.stdout
    assert proc.stdout.rstrip().endswith("OK")


def test_serve_vsock_in_client_mode(workdir: Path) -> None:
    from pyvhost.user.frontend import Frontend

    with Listener(str(workdir / "v.sock")) as listener, _serve(workdir, "--client") as served:
        fe = Frontend.accept(listener, 20)
        try:
            fe.negotiate()
            assert fe.get_queue_num() == 3
            assert fe.get_config(0, 8) == (7).to_bytes(8, "little")
        finally:
            fe.close()
        _stop(served)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--socket", "S"], "--socket PATH needs --uds-path UDS"),
        (["--kernel", "/dev/vhost-vsock"], "--kernel DEV needs --guest-cid CID"),
        (["--socket", "S", "--uds-path", "U", "--pause"], "--pause is for --kernel"),
    ],
)
def test_exercise_usage_errors_are_one_line(argv: list[str], message: str) -> None:
    proc = _pyvhost("exercise", "vsock", *argv)
    assert proc.returncode == 1, proc
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_exercise_with_the_wrong_guest_cid(workdir: Path) -> None:
    with _serve(workdir):
        proc = _pyvhost(
            "exercise", "vsock", "--socket", str(workdir / "v.sock"),
            "--uds-path", str(workdir / "uds"), "--guest-cid", "9",
        )  # fmt: skip
    assert proc.returncode == 1
    assert "--guest-cid 9: the device says 7" in proc.stderr
