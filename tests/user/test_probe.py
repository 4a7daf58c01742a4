"""``pyvhost probe``: blk config decoding, config size discovery against a scripted back-end,
error exit codes, and human / JSON output against qemu-storage-daemon."""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.qemu import QemuStorageDaemon, find_binary, make_raw_image, require, short_tmp
from pyvhost.cli import probe
from pyvhost.errors import ConnectionClosedError, ProtocolError
from pyvhost.user.connection import Listener
from pyvhost.user.messages import (
    F_PROTOCOL_FEATURES,
    U64,
    Config,
    Empty,
    ProtocolFeature,
    Request,
    encode_reply,
)

PF = ProtocolFeature
IMAGE_SIZE = 6 << 20


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pyvhost")
    probe.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["probe", *argv])


def test_decode_blk_config() -> None:
    config = bytearray(60)
    struct.pack_into("<QII", config, 0, 123456, 65536, 126)
    struct.pack_into("<I", config, 20, 4096)
    struct.pack_into("<H", config, 34, 4)
    struct.pack_into("<B", config, 56, 1)
    fields = probe.decode_blk_config(bytes(config))
    assert fields["capacity"] == 123456
    assert (fields["size_max"], fields["seg_max"]) == (65536, 126)
    assert (fields["blk_size"], fields["num_queues"]) == (4096, 4)
    assert fields["write_zeroes_may_unmap"] == 1
    assert "max_secure_erase_sectors" not in fields  # needs 64 bytes
    assert probe.decode_blk_config(bytes(config[:10])) == {"capacity": 123456}


class ScriptedBackend:
    """A listening back-end with a config space of ``config_size`` bytes that refuses (empty
    reply) any GET_CONFIG past it, as libvhost-user does. No REPLY_ACK, no memory slots."""

    def __init__(self, path: Path, config_size: int, protocol: int) -> None:
        self.listener = Listener(path)
        self.config_size = config_size
        self.protocol = protocol
        self.requests: list[Request] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.listener.accept(10) as conn:
            while True:
                try:
                    msg = conn.recv_request(10)
                except (ConnectionClosedError, ProtocolError, TimeoutError):
                    return
                request = Request(msg.request)
                self.requests.append(request)
                if request is Request.GET_FEATURES:
                    conn.send(encode_reply(request, U64(1 << 32 | 1 << F_PROTOCOL_FEATURES)))
                elif request is Request.GET_PROTOCOL_FEATURES:
                    conn.send(encode_reply(request, U64(self.protocol)))
                elif request is Request.GET_QUEUE_NUM:
                    conn.send(encode_reply(request, U64(3)))
                elif request is Request.GET_CONFIG:
                    cfg = msg.payload_as(Config)
                    end = cfg.offset + len(cfg.data)
                    if end > self.config_size:
                        conn.send(encode_reply(request, Empty()))
                    else:
                        data = bytes(i & 0xFF for i in range(cfg.offset, end))
                        conn.send(encode_reply(request, Config(cfg.offset, 0, data)))

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def tmp_sock() -> Iterator[Path]:
    with short_tmp("pvh-probe-") as tmp:
        yield tmp / "be.sock"


def test_config_size_found_by_bisection(tmp_sock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    be = ScriptedBackend(tmp_sock, 44, 1 << PF.MQ | 1 << PF.CONFIG | 1 << PF.REPLY_ACK)
    assert probe.run(_args("--socket", str(tmp_sock), "--json")) == 0
    be.close()
    out = json.loads(capsys.readouterr().out)
    assert out["config"] == bytes(range(44)).hex()
    assert out["config_size"] == 44
    assert out["device"] is None and "capacity" not in out
    assert out["queue_num"] == 3
    assert out["max_mem_slots"] is None  # CONFIGURE_MEM_SLOTS not offered: not asked
    assert out["protocol_features"] == 1 << PF.MQ | 1 << PF.CONFIG | 1 << PF.REPLY_ACK
    assert Request.GET_MAX_MEM_SLOTS not in be.requests
    assert Request.SET_OWNER not in be.requests
    assert be.requests[:3] == [
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.SET_PROTOCOL_FEATURES,
    ]


def test_blk_recognised_by_config_size(tmp_sock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    be = ScriptedBackend(tmp_sock, 60, 1 << PF.CONFIG)
    assert probe.run(_args("--socket", str(tmp_sock))) == 0
    be.close()
    out = capsys.readouterr().out
    assert "config (60 bytes)" in out
    capacity = int.from_bytes(bytes(range(8)), "little")
    assert f"capacity: {capacity} sectors" in out
    assert "\nqueues:" not in out  # MQ not offered


def test_device_type_given_wins_over_the_config_size(
    tmp_sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    be = ScriptedBackend(tmp_sock, 60, 1 << PF.CONFIG)
    assert probe.run(_args("--socket", str(tmp_sock), "--device-type", "vsock", "--json")) == 0
    be.close()
    out = json.loads(capsys.readouterr().out)
    assert (out["device_type"], out["device_type_from"]) == ("vsock", "given")
    assert "blk" not in out and out["config_size"] == 60
    assert out["feature_names"] == ["PROTOCOL_FEATURES", "VERSION_1"]


def test_device_type_unknown_says_how_to_name_it(
    tmp_sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    be = ScriptedBackend(tmp_sock, 44, 1 << PF.CONFIG)
    assert probe.run(_args("--socket", str(tmp_sock))) == 0
    be.close()
    out = capsys.readouterr().out
    assert (
        "device type: not known (device bits show as bit<N>; name them with --device-type)" in out
    )


def test_blk_by_config_size_says_so(tmp_sock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    be = ScriptedBackend(tmp_sock, 60, 1 << PF.CONFIG)
    assert probe.run(_args("--socket", str(tmp_sock), "--json")) == 0
    be.close()
    out = json.loads(capsys.readouterr().out)
    assert (out["device_type"], out["device_type_from"]) == ("blk", "config size")


def test_config_not_offered(tmp_sock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    be = ScriptedBackend(tmp_sock, 60, 0)
    assert probe.run(_args("--socket", str(tmp_sock), "--json")) == 0
    be.close()
    out = json.loads(capsys.readouterr().out)
    assert out["config"] is None
    assert Request.GET_CONFIG not in be.requests


def test_missing_socket_exits_1_with_one_line(
    tmp_sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert probe.run(_args("--socket", str(tmp_sock), "--timeout", "0.2")) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"pyvhost probe: {tmp_sock}: cannot connect")


def test_peer_hanging_up_exits_1(tmp_sock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listener = Listener(tmp_sock)

    def hang_up() -> None:
        listener.accept(10).close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    assert probe.run(_args("--socket", str(tmp_sock))) == 1
    thread.join(10)
    listener.close()
    err = capsys.readouterr().err
    assert "GET_FEATURES" in err and "closed" in err
    assert len(err.splitlines()) == 1


# --- against qemu-storage-daemon -------------------------------------------------------------


@pytest.fixture
def qsd() -> Iterator[QemuStorageDaemon]:
    require("qemu-storage-daemon")
    require("timeout")
    with short_tmp("pvh-probe-") as tmp:
        image = make_raw_image(tmp / "disk.raw", IMAGE_SIZE)
        with QemuStorageDaemon(image, tmp / "vhost.sock", num_queues=2, timeout_s=60) as daemon:
            yield daemon


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    timeout = find_binary("timeout")
    assert timeout is not None
    return subprocess.run(
        [timeout, "30", sys.executable, "-m", "pyvhost", "probe", *argv],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.qemu
def test_probe_qsd_human_and_json(qsd: QemuStorageDaemon) -> None:
    sock = str(qsd.socket)
    human = _cli("--socket", sock)
    assert human.returncode == 0, human.stderr
    assert "features: 0x" in human.stdout and "VERSION_1" in human.stdout
    assert "PROTOCOL_FEATURES" in human.stdout
    assert "CONFIGURE_MEM_SLOTS" in human.stdout
    assert "queues: 2" in human.stdout
    assert f"capacity: {IMAGE_SIZE // 512} sectors" in human.stdout

    # the daemon accepts the next front-end after the probe hung up
    as_json = _cli("--socket", sock, "--json", "--device", "blk")
    assert as_json.returncode == 0, as_json.stderr
    out = json.loads(as_json.stdout)
    assert out["capacity"] == IMAGE_SIZE // 512
    assert out["features"] >> 32 & 1 and out["features"] >> F_PROTOCOL_FEATURES & 1
    assert out["protocol_features"] >> PF.CONFIG & 1
    assert out["queue_num"] == 2
    assert out["max_mem_slots"] >= 8
    config = bytes.fromhex(out["config"])
    assert len(config) == probe.BLK_CONFIG_SIZE
    assert int.from_bytes(config[:8], "little") == IMAGE_SIZE // 512
    assert out["blk"]["num_queues"] == 2
    assert qsd.returncode is None


@pytest.mark.qemu
def test_probe_qsd_names_blk_bits(qsd: QemuStorageDaemon) -> None:
    proc = _cli("--socket", str(qsd.socket), "--device-type", "blk", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["device_type"], out["device_type_from"]) == ("blk", "given")
    names = out["feature_names"]
    assert {"SEG_MAX", "BLK_SIZE", "FLUSH", "MQ", "VERSION_1"} <= set(names), names
    assert not [n for n in names if n.startswith("bit")], names
    assert out["blk"]["num_queues"] == 2
