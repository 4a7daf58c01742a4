"""The examples in examples/ work as documented."""

from __future__ import annotations

import importlib.util
import sys
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
