"""The real proof: ``pyvhost trace`` between qemu-system-x86_64 and qemu-storage-daemon."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peers.qemu import PeerProcess, QemuStorageDaemon, QemuVM, make_raw_image, require, short_tmpdir
from pyvhost.user.messages import FRONTEND_REQUESTS, ProtocolFeature, Request

pytestmark = pytest.mark.qemu

NUM_QUEUES = 2
START_TIMEOUT = 90.0
DIRS = {"front->back": "F->B", "back->front": "B->F"}

Record = dict[str, Any]


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tmpdir("pvh-tq-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _requests(records: list[Record]) -> list[Record]:
    return [r for r in records if r["dir"] == "front->back"]


def _reply_value(records: list[Record], request: str) -> int:
    for r in records:
        if r["dir"] == "back->front" and r["reply"] and r["request"] == request:
            return int(r["fields"]["value"])
    raise AssertionError(f"no reply to {request} in the trace")


def _has(features: int, bit: ProtocolFeature) -> bool:
    return bool(features >> bit & 1)


def expected_startup(protocol_features: int, num_queues: int) -> list[str]:
    """What QEMU 7.2's vhost-user-blk sends before the guest driver starts the device.

    Derived from the negotiated protocol features (GUEST.md, "Start-up sequence").
    """
    names = ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES"]
    if _has(protocol_features, ProtocolFeature.MQ):
        names.append("GET_QUEUE_NUM")
    if _has(protocol_features, ProtocolFeature.CONFIGURE_MEM_SLOTS):
        names.append("GET_MAX_MEM_SLOTS")
    if _has(protocol_features, ProtocolFeature.BACKEND_REQ):
        names.append("SET_BACKEND_REQ_FD")
    names += ["SET_OWNER", "GET_FEATURES"]
    names += ["SET_VRING_CALL", "SET_VRING_ERR"] * num_queues
    if _has(protocol_features, ProtocolFeature.CONFIG):
        names.append("GET_CONFIG")
    return names


def check_device_start(requests: list[Record], protocol_features: int, offered: int) -> None:
    """The driver's start of the device: features, memory, then every started ring in order."""
    names = [r["request"] for r in requests]
    assert names[0] == "SET_FEATURES", names
    acked = requests[0]["fields"]["value"]
    assert acked & ~offered == 0, f"acked {acked:#x} beyond offered {offered:#x}"
    assert acked >> 30 & 1, "VHOST_USER_F_PROTOCOL_FEATURES not acked"

    mem_slots = _has(protocol_features, ProtocolFeature.CONFIGURE_MEM_SLOTS)
    memory = "ADD_MEM_REG" if mem_slots else "SET_MEM_TABLE"
    assert memory in names, names
    assert ("SET_MEM_TABLE" if mem_slots else "ADD_MEM_REG") not in names
    first_memory = names.index(memory)

    inflight = [n for n in names if n in ("GET_INFLIGHT_FD", "SET_INFLIGHT_FD")]
    if _has(protocol_features, ProtocolFeature.INFLIGHT_SHMFD):
        assert inflight == ["GET_INFLIGHT_FD", "SET_INFLIGHT_FD"], names
        assert names.index("SET_INFLIGHT_FD") < names.index("SET_VRING_NUM")
    else:
        assert inflight == []

    ring_steps = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK"]
    started = {r["fields"]["index"] for r in requests if r["request"] == "SET_VRING_NUM"}
    assert started, "no ring was started"
    for index in started:
        positions = []
        for step in ring_steps:
            hits = [
                i
                for i, r in enumerate(requests)
                if r["request"] == step and _ring_index(r) == index
            ]
            assert hits, f"{step} missing for vring {index}"
            positions.append(hits[0])
        assert positions == sorted(positions), f"vring {index}: {ring_steps} out of order"
        assert positions[0] > first_memory, "a ring was set up before the memory table"

    enabled = {
        r["fields"]["index"]
        for r in requests
        if r["request"] == "SET_VRING_ENABLE" and r["fields"]["num"] == 1
    }
    assert enabled == set(range(NUM_QUEUES))


def _ring_index(record: Record) -> int:
    fields = record["fields"]
    if "index" in fields:
        return int(fields["index"])
    return int(fields["value"]) & 0xFF


def check_replies(records: list[Record]) -> None:
    """Every request that expects an answer is followed by its reply, before the next request."""
    for i, r in enumerate(records):
        if r["dir"] != "front->back":
            continue
        spec = FRONTEND_REQUESTS[Request[r["request"]]]
        wants_reply = bool(r["flags"] & 0x8) or spec.always_replies
        if not wants_reply:
            continue
        following = [x for x in records[i + 1 :] if x["dir"] == "back->front"][:1]
        assert following, f"{r['request']} got no reply"
        assert following[0]["request"] == r["request"] and following[0]["reply"]
        nxt = [x for x in records[i + 1 :] if x["dir"] == "front->back"][:1]
        if nxt:
            assert following[0]["ts"] <= nxt[0]["ts"]


def test_trace_between_qemu_and_storage_daemon(workdir: Path) -> None:
    require("qemu-system-x86_64")
    require("qemu-storage-daemon")
    image = make_raw_image(workdir / "disk.img", 64 << 20)
    qsd_sock, trace_sock, json_path = (
        workdir / "qsd.sock",
        workdir / "trace.sock",
        workdir / "trace.jsonl",
    )
    trace_argv = [sys.executable, "-m", "pyvhost", "-v", "trace", "--listen", str(trace_sock)]
    trace_argv += ["--connect", str(qsd_sock), "--json", str(json_path), "--once"]

    with QemuStorageDaemon(image, qsd_sock, num_queues=NUM_QUEUES) as qsd:
        with PeerProcess(
            trace_argv, workdir, name="trace", timeout_s=120, socket=trace_sock
        ) as trace:
            vm = QemuVM(workdir / "vm", memory="256M", timeout_s=120)
            vm.add_vhost_user_blk(trace_sock, num_queues=NUM_QUEUES)
            with vm:
                deadline = time.monotonic() + START_TIMEOUT
                while trace.stdout.count("SET_VRING_ENABLE") < NUM_QUEUES:
                    assert vm.returncode is None, f"QEMU exited early:\n{vm.stderr}"
                    assert time.monotonic() < deadline, f"device not started:\n{trace.stdout}"
                    time.sleep(0.1)
                time.sleep(0.5)
            qemu_stderr = vm.stderr
            assert trace.wait(30) == 0, trace.stderr
        assert qsd.returncode is None, f"qemu-storage-daemon died:\n{qsd.stderr}"
    assert not trace_sock.exists()

    # QEMU ran against the relayed back-end without complaint.
    problems = [
        line
        for line in qemu_stderr.splitlines()
        if re.search(r"vhost|error|fail", line, re.I) and "terminating on signal" not in line
    ]
    assert problems == [], qemu_stderr
    assert "Traceback" not in trace.stderr and "ERROR" not in trace.stderr, trace.stderr

    records = [json.loads(line) for line in json_path.read_text().splitlines()]
    assert all(r["error"] is None for r in records), [r for r in records if r["error"]]

    # The text trace and the JSON file describe the same messages in the same order.
    lines = trace.stdout.splitlines()
    assert len(lines) == len(records)
    for line, r in zip(lines, records, strict=True):
        head = f"{DIRS[r['dir']]} {r['request']}{' reply' if r['reply'] else ''} "
        assert head in re.sub(r"\s+", " ", line), (line, r)
        assert f"flags={r['flags']:#x} size={r['size']} fds={r['fds']}" in line, (line, r)

    protocol_offered = _reply_value(records, "GET_PROTOCOL_FEATURES")
    requests = _requests(records)
    set_protocol = next(r for r in requests if r["request"] == "SET_PROTOCOL_FEATURES")
    protocol = set_protocol["fields"]["value"]
    assert protocol & ~protocol_offered == 0
    assert _has(protocol, ProtocolFeature.CONFIG), "QEMU needs CONFIG for vhost-user-blk"

    startup = expected_startup(protocol, NUM_QUEUES)
    names = [r["request"] for r in requests]
    assert names[: len(startup)] == startup, names
    check_device_start(requests[len(startup) :], protocol, _reply_value(records, "GET_FEATURES"))
    check_replies(records)

    if _has(protocol, ProtocolFeature.MQ):
        assert _reply_value(records, "GET_QUEUE_NUM") == NUM_QUEUES
    config = next(r for r in records if r["request"] == "GET_CONFIG" and r["reply"])
    assert config["fields"]["offset"] == 0
    capacity = int.from_bytes(bytes.fromhex(config["fields"]["data"])[:8], "little")
    assert capacity == (64 << 20) // 512
    backend_req = next(r for r in requests if r["request"] == "SET_BACKEND_REQ_FD")
    assert backend_req["fds"] == 1
    fd_requests = {"SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_KICK", "ADD_MEM_REG"}
    assert all(r["fds"] == 1 for r in requests if r["request"] in fd_requests)
