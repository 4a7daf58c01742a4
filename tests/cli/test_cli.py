"""The ``pyvhost`` command line: help, version, argument errors, the trace sub-command."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import pyvhost
from peers.qemu import PeerProcess
from pyvhost.cli import main as cli_main
from pyvhost.user.messages import U64, Request, encode_message, encode_reply, encode_request

TIMEOUT = 10.0
LINE = re.compile(
    r"^\d\d:\d\d:\d\d\.\d{6} (?P<dir>\S+)\s+(?P<request>request \d+|\S+)(?P<reply> reply)? "
    r"flags=(?P<flags>0x[0-9a-f]+) size=(?P<size>\d+) fds=(?P<fds>\d+)(?P<rest>.*)$"
)


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pvh-cli-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pyvhost_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyvhost", *args]


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli_main.main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_tools(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for tool in ("serve", "probe", "trace", "exercise", "demo"):
        assert tool in out
    assert "--verbose" in out


@pytest.mark.parametrize("module", cli_main.TOOL_MODULES)
def test_every_tool_module_exists(module: str) -> None:
    """main.py skips missing tool modules; every one it lists must be there."""
    assert importlib.util.find_spec(module) is not None, f"{module} is missing"


def test_probe_is_registered(capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("pyvhost.cli.probe") is None:
        pytest.fail("pyvhost.cli.probe does not exist: the probe tool is missing")
    code, out, _ = run_main(capsys, "probe", "--help")
    assert code == 0
    assert "usage: pyvhost probe" in out


def test_trace_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "trace", "--help")
    assert code == 0
    for option in ("--listen", "--connect", "--json", "--count", "--once"):
        assert option in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["no-such-tool"],
        ["trace"],
        ["trace", "--listen", "/tmp/x.sock"],
        ["trace", "--listen", "a", "--connect", "b", "--count", "0"],
        ["trace", "--listen", "a", "--connect", "b", "--count", "x"],
        ["trace", "--listen", "a", "--connect", "b", "--once", "--count", "2"],
        ["--no-such-option"],
    ],
)
def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run_main(capsys, *argv)
    assert code == 2
    assert "usage: pyvhost" in err
    assert out == ""


def test_module_version() -> None:
    proc = _run(pyvhost_cmd("--version"))
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"pyvhost {pyvhost.__version__}"


def test_console_script_matches_module() -> None:
    script = Path(sys.executable).with_name("pyvhost")
    if not script.exists():
        pytest.skip("the pyvhost console script is not installed in this environment")
    proc = _run([str(script), "--version"])
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"pyvhost {pyvhost.__version__}"


def test_module_bad_arguments_exit_2() -> None:
    proc = _run(pyvhost_cmd("trace", "--listen", "x"))
    assert proc.returncode == 2
    assert "--connect" in proc.stderr


def test_unknown_tool_module_is_skipped_but_broken_ones_raise() -> None:
    parser = cli_main.build_parser(("pyvhost.cli.no_such_tool", "pyvhost.cli.trace"))
    assert parser.parse_args(["trace", "--listen", "a", "--connect", "b"]).listen == "a"
    with pytest.raises(ModuleNotFoundError):
        cli_main.build_parser(("no_such_package.tool",))


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["timeout", "-k", "5", "60", *argv], capture_output=True, text=True, check=False
    )


def _send(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def _recv(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(TIMEOUT)
    data = b""
    while len(data) < size:
        chunk, fds, _, _ = socket.recv_fds(sock, size - len(data), 4)
        for fd in fds:
            socket.close(fd)
        assert chunk, "EOF"
        data += chunk
    return data


def test_trace_prints_and_writes_json(tmp: Path) -> None:
    listen, backend_path, json_path = tmp / "t.sock", tmp / "b.sock", tmp / "trace.jsonl"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as backend:
        backend.bind(str(backend_path))
        backend.listen(1)
        backend.settimeout(TIMEOUT)
        trace = PeerProcess(
            pyvhost_cmd(
                "trace", "--listen", str(listen), "--connect", str(backend_path),
                "--json", str(json_path), "--once",
            ),
            tmp,
            name="trace",
            timeout_s=60,
            socket=listen,
        )  # fmt: skip
        with trace:
            front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            front.connect(str(listen))
            back, _ = backend.accept()
            with front, back, open(__file__, "rb") as f:
                get, _ = encode_message(encode_request(Request.GET_FEATURES, need_reply=True))
                _send(front, get)
                _recv(back, len(get))
                ans, _ = encode_message(encode_reply(Request.GET_FEATURES, U64(1 << 32)))
                _send(back, ans)
                _recv(front, len(ans))
                call, _ = encode_message(
                    encode_request(Request.SET_VRING_CALL, U64(0), fds=[f.fileno()])
                )
                _send(front, call, [f.fileno()])
                _recv(back, len(call))
                _send(front, b"\x99" * 12)
                _recv(back, 12)
            assert trace.wait(TIMEOUT) == 0, trace.stderr
        assert not listen.exists()

    lines = trace.stdout.splitlines()
    records = [json.loads(line) for line in json_path.read_text().splitlines()]
    assert len(lines) == len(records) == 4, trace.stdout
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    parsed = [m.groupdict() for m in matches if m]
    assert [(p["dir"], p["request"], bool(p["reply"])) for p in parsed] == [
        ("F->B", "GET_FEATURES", False),
        ("B->F", "GET_FEATURES", True),
        ("F->B", "SET_VRING_CALL", False),
        ("F->B", "request 2576980377", False),
    ]
    assert "ERROR:" in parsed[3]["rest"] and "exceeds" in parsed[3]["rest"]
    assert [
        (r["dir"], r["request"], r["reply"], r["flags"], r["size"], r["fds"]) for r in records
    ] == [
        ("front->back", "GET_FEATURES", False, 0x9, 0, 0),
        ("back->front", "GET_FEATURES", True, 0x5, 8, 0),
        ("front->back", "SET_VRING_CALL", False, 0x1, 8, 1),
        ("front->back", "request 2576980377", False, 0x99999999, 0x99999999, 0),
    ]
    for p, r in zip(parsed, records, strict=True):
        assert (int(p["flags"], 16), int(p["size"]), int(p["fds"])) == (
            r["flags"],
            r["size"],
            r["fds"],
        )
    assert records[1]["fields"] == {"value": 1 << 32}
    assert records[2]["fields"] == {"value": 0}
    assert [r["error"] is None for r in records] == [True, True, True, False]
    assert records[3]["raw"] == "99" * 12


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_trace_stops_cleanly_on_signal(tmp: Path, sig: signal.Signals) -> None:
    listen = tmp / "t.sock"
    trace = PeerProcess(
        pyvhost_cmd("trace", "--listen", str(listen), "--connect", str(tmp / "b.sock")),
        tmp,
        name="trace",
        timeout_s=60,
        socket=listen,
    )
    with trace:
        assert trace.proc is not None
        trace.proc.send_signal(sig)
        assert trace.wait(TIMEOUT) == 0, trace.stderr
    assert not listen.exists()
    assert "Traceback" not in trace.stderr


def test_trace_reports_a_bad_listen_path(tmp: Path) -> None:
    proc = _run(pyvhost_cmd("trace", "--listen", str(tmp / "no" / "dir.sock"), "--connect", "b"))
    assert proc.returncode == 1
    assert "cannot listen" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [["blk"], ["net"], ["vsock", "--uds-path", "/nonexistent/u"]],
    ids=["blk", "net", "vsock"],
)
def test_exercise_connect_timeout_bounds_the_wait_for_the_socket(
    tmp: Path, args: list[str]
) -> None:
    """``--connect-timeout S``: a back-end's socket that is not there is an error after S
    seconds, not after the default 10."""
    sock = tmp / "absent.sock"
    tool, *rest = args
    argv = ["exercise", tool, "--socket", str(sock), "--connect-timeout", "0.5", *rest]
    proc = _run(pyvhost_cmd(*argv))
    assert proc.returncode == 1
    assert f"cannot connect to {sock} within 0.5s: last error ENOENT" in proc.stdout + proc.stderr
