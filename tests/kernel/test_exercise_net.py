"""`pyvhost exercise net --kernel /dev/vhost-net` in the test guest or directly on a host with it
(tests/peers/kernel_runner.py): the kernel's vhost-net moves frames both ways between rings this
process owns and a TAP, every byte compared.

One run (one guest boot) does every variant, each a `pyvhost exercise net` command run in that
script's process, and reports JSON per variant.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest

from peers.kernel_runner import CLI_IN_PROCESS, KernelRunner
from pyvhost.kernel.devices import VHOST_NET_F_VIRTIO_NET_HDR
from pyvhost.virtio import features as vf

pytestmark = [pytest.mark.kernel, pytest.mark.guest]

FRAMES = 150

VARIANTS: dict[str, list[str]] = {
    "default": ["--size", "700"],
    "full-frames-merged": ["--size", "1514"],
    "small-frames": ["--size", "60"],
    "no-mrg-no-event-idx": ["--size", "1514", "--no-mrg-rxbuf", "--no-event-idx"],
    "kernel-header": ["--size", "999", "--kernel-header"],
    "kernel-header-no-mrg": ["--size", "1514", "--kernel-header", "--no-mrg-rxbuf"],
    "dirty-log": ["--size", "1514", "--dirty-log"],
    "small-ring": ["--size", "300", "--queue-size", "16"],
}

SCRIPT = CLI_IN_PROCESS + textwrap.dedent(
    """
    import json, os, subprocess, sys

    variants = json.loads(sys.argv[1])
    frames = sys.argv[2]
    out = {"fds_before": sorted(os.listdir("/proc/self/fd"))}
    for name, extra in variants.items():
        out[name] = pyvhost("exercise", "net", "--kernel", "/dev/vhost-net", "--tap", "pvt0",
                            "--frames", frames, "--json", *extra)
    bad = ["exercise", "net", "--tap", "pvt1"]
    for name, extra in {
        "missing-device": ["--kernel", "/dev/vhost-none"],
        "not-vhost": ["--kernel", "/dev/null"],
        "bad-tap-name": ["--kernel", "/dev/vhost-net", "--tap", "x" * 20],
        "oversized": ["--kernel", "/dev/vhost-net", "--size", "1515"],
    }.items():
        out[name] = pyvhost(*bad, *extra)
    out["fds_left"] = sorted(os.listdir("/proc/self/fd"))
    out["links"] = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def runs(kernel_runner: KernelRunner) -> dict[str, Any]:
    result = kernel_runner.run(
        SCRIPT,
        timeout=300,
        argv=[json.dumps(VARIANTS), str(FRAMES)],
        modules=["tun", "vhost_net"],
    ).check()
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def _report(runs: dict[str, Any], name: str) -> dict[str, Any]:
    run = runs[name]
    assert run["rc"] == 0, f"{name}: exit {run['rc']}\n{run['stdout']}\n{run['stderr']}"
    report: dict[str, Any] = json.loads(run["stdout"])
    return report


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_frames_both_ways_verified(runs: dict[str, Any], name: str) -> None:
    report = _report(runs, name)
    assert report["ok"] is True
    assert report["errors"] == 0, report["error_details"]
    assert report["tx_frames"] == FRAMES
    assert report["rx_frames"] == FRAMES
    assert report["tx_pps"] > 0 and report["rx_pps"] > 0
    assert report["rx_notifications"] > 0, "the kernel signals the receive ring's call eventfd"
    assert report["tx_notifications"] > 0, "the kernel signals the transmit ring's call eventfd"


def test_features_follow_the_options(runs: dict[str, Any]) -> None:
    default = _report(runs, "default")["features"]
    assert default >> vf.NET_F_MRG_RXBUF & 1
    assert default >> vf.F_RING_EVENT_IDX & 1
    assert not default >> VHOST_NET_F_VIRTIO_NET_HDR & 1
    assert default >> vf.F_VERSION_1 & 1
    plain = _report(runs, "no-mrg-no-event-idx")["features"]
    assert not plain >> vf.NET_F_MRG_RXBUF & 1
    assert not plain >> vf.F_RING_EVENT_IDX & 1
    assert _report(runs, "kernel-header")["features"] >> VHOST_NET_F_VIRTIO_NET_HDR & 1


def test_dirty_log_marks_every_written_page(runs: dict[str, Any]) -> None:
    report = _report(runs, "dirty-log")
    assert report["log_signalled"] is True
    # The exercise itself fails on any written page left unmarked (receive buffers, used rings);
    # here: the log holds more than the two used rings.
    assert report["dirty_pages"] > 2


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing-device", "open on /dev/vhost-none: ENOENT"),
        ("not-vhost", "VHOST_SET_OWNER on /dev/null: ENOTTY"),
        ("bad-tap-name", "interface name 'xxxxxxxxxxxxxxxxxxxx' must be 1 to 15"),
        ("oversized", "--size 1515"),
    ],
)
def test_bad_input_exits_1_with_the_reason(runs: dict[str, Any], name: str, message: str) -> None:
    run = runs[name]
    assert run["rc"] == 1, run
    assert message in run["stderr"], run["stderr"]
    assert "Traceback" not in run["stderr"]


def test_nothing_left_behind(runs: dict[str, Any]) -> None:
    assert runs["fds_left"] == runs["fds_before"], "every exercise closed the fds it opened"
    assert "pvt0" not in runs["links"], "the TAP the exercise created is gone with it"
    assert "pvt1" not in runs["links"]
