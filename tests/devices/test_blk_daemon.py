"""BlkDevice served by the real Daemon, driven over a Unix socket by DriverSession / BlkDriver."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvhost.daemon import Daemon
from pyvhost.devices.blk import VIRTIO_BLK_S_IOERR, BlkDevice
from pyvhost.driver.blk import BlkCompletion, BlkDriver, BlkRequestError
from pyvhost.driver.session import DriverSession
from pyvhost.virtio import features as vf

from .test_blk import pattern

SECTOR = 512
DISK = 4 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(DISK, seed=4))
    return path


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "blk.sock"


@contextlib.contextmanager
def served(
    device: BlkDevice, sock: Path, workers: int = 1, mode: str = "thread"
) -> Iterator[Daemon]:
    daemon = Daemon(device, sock, workers=workers, worker_mode=mode)
    try:
        with daemon.run_in_thread():
            yield daemon
    finally:
        device.close()


@contextlib.contextmanager
def driver(sock: Path, queues: int, *, packed: bool = False) -> Iterator[BlkDriver]:
    with DriverSession.connect(
        sock, num_queues=queues, queue_size=64, packed=packed, indirect=True, reply_timeout=10
    ) as session:
        yield BlkDriver(session)


def disk(image: Path, sector: int, n: int) -> bytes:
    with image.open("rb") as f:
        f.seek(sector * SECTOR)
        return f.read(n)


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize("queues", [1, 2])
@pytest.mark.parametrize("workers", [1, 2])
def test_all_requests_through_the_protocol(
    image: Path, sock: Path, queues: int, workers: int, mode: str
) -> None:
    dev = BlkDevice.from_args(image, readonly=False, queues=queues, serial="proto", queue_size=64)
    with served(dev, sock, workers, mode), driver(sock, queues) as drv:
        cfg = drv.read_config()
        assert cfg.capacity == DISK // SECTOR
        assert cfg.num_queues == queues
        assert cfg.blk_size == SECTOR
        assert drv.session.has_feature(vf.BLK_F_FLUSH)
        assert drv.session.has_feature(vf.BLK_F_MQ) == (queues > 1)
        for q in range(queues):
            base = 1000 * (q + 1)
            data = pattern(16 * SECTOR, seed=q + 10)
            drv.write(base, data, queue=q)
            assert drv.read(base, len(data), queue=q) == data
            drv.flush(queue=q)
            assert drv.serial(queue=q) == "proto"
            drv.discard(base, 2, queue=q)
            drv.write_zeroes(base + 4, 2, unmap=True, queue=q)
            drv.write_zeroes(base + 8, 1, queue=q)
            expect = bytearray(data)
            for start, n in ((0, 2), (4, 2), (8, 1)):
                expect[start * SECTOR : (start + n) * SECTOR] = bytes(n * SECTOR)
            assert drv.read(base, len(data), queue=q) == bytes(expect)
            assert disk(image, base, len(data)) == bytes(expect)
        with pytest.raises(BlkRequestError) as info:
            drv.read(DISK // SECTOR, SECTOR)
        assert info.value.status == VIRTIO_BLK_S_IOERR


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("queues", [1, 2])
def test_pipelined_requests_on_all_queues(
    image: Path, sock: Path, queues: int, packed: bool, mode: str
) -> None:
    """Queue depth 16 per queue, every queue at once, verified in the image file."""
    dev = BlkDevice.from_args(image, readonly=False, queues=queues, serial=None, queue_size=64)
    expected: dict[int, bytes] = {}
    with served(dev, sock, queues, mode), driver(sock, queues, packed=packed) as drv:
        assert drv.session.packed == packed
        tokens = []
        for k in range(16):
            for q in range(queues):
                sector = 8 * (k * queues + q)
                data = pattern(4 * SECTOR, seed=k * 7 + q)
                expected[sector] = data
                tokens.append(drv.submit_write(sector, data, queue=q))
        done: list[BlkCompletion] = []
        deadline = time.monotonic() + 30
        while len(done) < len(tokens) and time.monotonic() < deadline:
            done += drv.reap(1.0)
        assert sorted(c.token for c in done) == sorted(tokens)
        assert all(c.ok for c in done)
        reads = {
            drv.submit_read(s, 4 * SECTOR, queue=i % queues): s for i, s in enumerate(expected)
        }
        got: list[BlkCompletion] = []
        while len(got) < len(reads) and time.monotonic() < deadline:
            got += drv.reap(1.0)
        assert {reads[c.token]: c.data for c in got} == expected
    for sector, data in expected.items():
        assert disk(image, sector, len(data)) == data


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_read_only_through_the_protocol(image: Path, sock: Path, mode: str) -> None:
    before = image.read_bytes()
    dev = BlkDevice.from_args(image, readonly=True, queues=1, serial=None, queue_size=64)
    with served(dev, sock, mode=mode), driver(sock, 1) as drv:
        assert drv.read_only
        assert not drv.session.has_feature(vf.BLK_F_DISCARD)
        assert drv.read(7, SECTOR) == before[7 * SECTOR : 8 * SECTOR]
        with pytest.raises(BlkRequestError) as info:
            drv.write(0, pattern(SECTOR))
        assert info.value.status == VIRTIO_BLK_S_IOERR
        drv.flush()
    assert image.read_bytes() == before


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_reconnect_after_the_front_end_leaves(image: Path, sock: Path, mode: str) -> None:
    """The same device serves a second front-end after the first one went away."""
    dev = BlkDevice.from_args(image, readonly=False, queues=2, serial=None, queue_size=64)
    with served(dev, sock, 2, mode):
        with driver(sock, 2) as drv:
            drv.write(0, pattern(SECTOR, seed=1))
            drv.write(8, pattern(SECTOR, seed=2), queue=1)
        with driver(sock, 2) as drv:
            assert drv.read(0, SECTOR, queue=1) == pattern(SECTOR, seed=1)
            assert drv.read(8, SECTOR) == pattern(SECTOR, seed=2)


_SERVER = textwrap.dedent(
    """
    import logging, sys
    from pyvhost.daemon import Daemon
    from pyvhost.devices.blk import BlkDevice

    class Swallow(BlkDevice):
        # pops every chain (so it is in flight) and never completes one: a back-end that hangs
        def handle_queue(self, index, queue, mem):
            while queue.pop_batch(64):
                pass
            print("popped", flush=True)

    logging.basicConfig(level=logging.INFO)
    sock, image, mode = sys.argv[1:4]
    cls = Swallow if mode == "swallow" else BlkDevice
    dev = cls.from_args(image, False, 1, None, 64)
    import os
    print("serving", os.getpid(), flush=True)
    Daemon(dev, sock).run()
    """
)


def _start_server(sock: Path, image: Path, mode: str) -> tuple[subprocess.Popen[str], int]:
    """Start a back-end under ``timeout``; return the process and the Python server's pid."""
    proc = subprocess.Popen(
        ["timeout", "60", sys.executable, "-c", _SERVER, str(sock), str(image), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if line[:1] != ["serving"]:
        proc.kill()
        raise AssertionError(f"server did not start: {line} {proc.communicate()}")
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not listen: {proc.communicate()}")
        time.sleep(0.02)
    return proc, int(line[1])


def _stop(proc: subprocess.Popen[str], pid: int) -> None:
    """SIGTERM through ``timeout`` (the daemon shuts down cleanly); SIGKILL both if that fails."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.communicate(timeout=10)


def test_restart_under_a_running_driver_loses_no_request(image: Path, sock: Path) -> None:
    """SIGKILL a back-end holding popped requests; its successor redoes them from inflight."""
    original = image.read_bytes()
    swallow, swallow_pid = _start_server(sock, image, "swallow")
    try:
        with DriverSession.connect(
            sock, num_queues=1, queue_size=64, reconnect=20, reply_timeout=10
        ) as session:
            drv = BlkDriver(session)
            assert session.inflight_mode
            writes = {16 * k: pattern(8 * SECTOR, seed=50 + k) for k in range(6)}
            tokens = {drv.submit_write(s, d): s for s, d in writes.items()}
            read_token = drv.submit_read(200, 8 * SECTOR)
            assert swallow.stdout is not None
            while swallow.stdout.readline().strip() != "popped":
                pass
            assert drv.reap(0.3) == []  # nothing completes while the back-end hangs
            os.kill(swallow_pid, signal.SIGKILL)
            _stop(swallow, swallow_pid)
            os.unlink(sock)
            server, server_pid = _start_server(sock, image, "serve")
            try:
                done: list[BlkCompletion] = []
                deadline = time.monotonic() + 30
                while len(done) < len(tokens) + 1 and time.monotonic() < deadline:
                    done += drv.reap(1.0)
                assert session.reconnects >= 1
                assert {c.token for c in done} == {*tokens, read_token}
                assert all(c.ok for c in done)
                (read,) = [c for c in done if c.token == read_token]
                assert read.data == original[200 * SECTOR : 208 * SECTOR]
                for s, d in writes.items():
                    assert drv.read(s, len(d)) == d
            finally:
                session.close()
                _stop(server, server_pid)
    finally:
        _stop(swallow, swallow_pid)
    for s, d in writes.items():
        assert disk(image, s, len(d)) == d
