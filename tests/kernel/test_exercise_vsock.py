"""`pyvhost exercise vsock --kernel /dev/vhost-vsock` in the test guest or directly on a host with
it (where guest CIDs 7 to 12 must be free): this process plays a guest with its own CID through
the kernel's vhost-vsock; host AF_VSOCK sockets talk to it both ways, every byte compared, and the
device may be stopped and started in the middle.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest

from peers.kernel_runner import CLI_IN_PROCESS, KernelRunner

pytestmark = [pytest.mark.kernel, pytest.mark.guest]

MIB = 1 << 20

SCRIPT = CLI_IN_PROCESS + textwrap.dedent(
    """
    import json, os
    from pyvhost.kernel import VhostVsock

    out = {"fds_before": len(os.listdir("/proc/self/fd"))}

    def run(name, *extra):
        out[name] = pyvhost("exercise", "vsock", "--kernel", "/dev/vhost-vsock", *extra)

    run("streams", "--guest-cid", "7", "--bytes", str(3 << 20), "--json")
    run("again-at-once", "--guest-cid", "7", "--bytes", "200000", "--json")
    run("paused", "--guest-cid", "8", "--bytes", str(1 << 20), "--pause", "--json")
    run("one-byte", "--guest-cid", "9", "--bytes", "1", "--json")
    run("text", "--guest-cid", "10", "--bytes", "4096")
    run("host-cid", "--guest-cid", "2")
    with VhostVsock() as holder:
        holder.set_owner()
        holder.set_guest_cid(11)
        run("cid-in-use", "--guest-cid", "11")
    run("no-device", "--guest-cid", "12", "--kernel", "/dev/vhost-none")
    out["fds_after"] = len(os.listdir("/proc/self/fd"))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def runs(kernel_runner: KernelRunner) -> dict[str, Any]:
    result = kernel_runner.run(SCRIPT, timeout=300, modules=["vhost_vsock"]).check()
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def _report(runs: dict[str, Any], name: str) -> dict[str, Any]:
    run = runs[name]
    assert run["rc"] == 0, f"{name}: exit {run['rc']}\n{run['stdout']}\n{run['stderr']}"
    report: dict[str, Any] = json.loads(run["stdout"])
    assert report["ok"] is True and report["errors"] == 0, report["error_details"]
    return report


@pytest.mark.parametrize(
    ("name", "size"),
    [("streams", 3 * MIB), ("again-at-once", 200000), ("paused", MIB), ("one-byte", 1)],
)
def test_both_streams_arrive_whole(runs: dict[str, Any], name: str, size: int) -> None:
    report = _report(runs, name)
    assert report["host_to_guest_bytes"] == size
    assert report["guest_to_host_bytes"] == size
    assert report["rx_packets"] > 0 and report["tx_packets"] > 0


def test_flow_control_splits_the_streams(runs: dict[str, Any]) -> None:
    report = _report(runs, "streams")
    # 3 MiB each way in 4 KiB receive buffers: hundreds of packets, credit updates among them.
    assert report["rx_packets"] >= 3 * MIB // 4096
    assert report["tx_packets"] >= 3 * MIB // 65536


def test_set_running_0_then_1_loses_nothing(runs: dict[str, Any]) -> None:
    assert _report(runs, "paused")["paused"] is True


def test_text_report(runs: dict[str, Any]) -> None:
    run = runs["text"]
    assert run["rc"] == 0, run
    assert "4096 bytes verified" in run["stdout"] and run["stdout"].rstrip().endswith("OK")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("host-cid", "VHOST_VSOCK_SET_GUEST_CID on /dev/vhost-vsock: EINVAL"),
        ("cid-in-use", "VHOST_VSOCK_SET_GUEST_CID on /dev/vhost-vsock: EADDRINUSE"),
        ("no-device", "open on /dev/vhost-none: ENOENT"),
    ],
)
def test_bad_input_is_one_clear_line(runs: dict[str, Any], name: str, message: str) -> None:
    run = runs[name]
    assert run["rc"] == 1, run
    assert message in run["stderr"]
    assert "Traceback" not in run["stderr"]


def test_nothing_left_open(runs: dict[str, Any]) -> None:
    assert runs["fds_after"] == runs["fds_before"]
