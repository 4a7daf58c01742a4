"""The examples in examples/ work as documented."""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
from pathlib import Path
from types import ModuleType

from peers.qemu import short_tmp
from pyvhost.daemon import Daemon
from pyvhost.driver.session import DriverSession

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_upper_device_answers_through_a_real_socket_and_ring() -> None:
    upper = _load("upper")
    with short_tmp("pvh-ex-") as d:
        sock = d / "upper.sock"
        with Daemon(upper.UpperDevice, sock).run_in_thread():
            session = DriverSession.connect(sock, num_queues=1)
            try:
                assert session.config(0, 5) == b"UPPER"
                words = [b"hello", b"vhost-user", b"from python"]
                tokens = {}
                for word in words:
                    src, dst = session.alloc(len(word)), session.alloc(64)
                    session.view(src, len(word))[:] = word
                    tokens[session.submit(0, [(src, len(word))], [(dst, 64)])] = (word, dst)
                session.kick(0)
                done: dict[int, int] = {}
                while len(done) < len(words):
                    done.update(session.wait(0, timeout=10))
                for token, written in done.items():
                    word, dst = tokens[token]
                    assert written == len(word)
                    assert bytes(session.view(dst, written)) == word.upper()
            finally:
                session.close()


def _ask(session: DriverSession, word: bytes) -> bytes:
    src, dst = session.alloc(len(word)), session.alloc(64)
    session.view(src, len(word))[:] = word
    token = session.submit(0, [(src, len(word))], [(dst, 64)])
    session.kick(0)
    done: dict[int, int] = {}
    while token not in done:
        done.update(session.wait(0, timeout=10))
    return bytes(session.view(dst, done[token]))


def test_switchcase_device_follows_its_control_socket() -> None:
    switchcase = _load("switchcase")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with short_tmp("pvh-ex-") as d:
            sock = d / "case.sock"
            device = switchcase.SwitchCaseDevice(ours)
            with Daemon(device, sock).run_in_thread():
                session = DriverSession.connect(sock, num_queues=1)
                try:
                    assert session.config(0, 5) == b"upper"
                    assert _ask(session, b"Hello") == b"HELLO"
                    theirs.send(b"sideways")  # refused: the case stays
                    theirs.send(b"lower")
                    deadline = time.monotonic() + 10
                    while session.config(0, 5) != b"lower":
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                    assert _ask(session, b"Hello") == b"hello"
                finally:
                    session.close()
    finally:
        ours.close()
        theirs.close()
