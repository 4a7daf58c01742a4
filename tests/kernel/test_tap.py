"""TAP interfaces, for real, inside a network namespace of our own (no traffic leaves it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from pyvhost.kernel.tap import TUN_F_CSUM, TUN_F_TSO4, TapError, _ifreq, offload_flags

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("unshare") is None,
    reason="needs root, /dev/net/tun and unshare(1) for a private network namespace",
)

SCRIPT = textwrap.dedent(
    """
    import json, os, socket, subprocess, sys
    from pyvhost.kernel.tap import Tap, TapError, TUN_F_CSUM, TUN_F_TSO4
    out = {"fds_before": len(os.listdir("/proc/self/fd"))}
    tap = Tap.open("pvh0", queues=2)
    out["name"] = tap.name
    out["fds"] = len(tap.fds)
    tap.set_offload(TUN_F_CSUM | TUN_F_TSO4)
    out["up_before"] = tap.is_up()
    tap.set_up()
    out["up_after"] = tap.is_up()
    out["mtu_default"] = tap.mtu
    tap.set_mtu(9000)
    out["mtu_set"] = tap.mtu
    out["mtu_ip"] = json.loads(subprocess.run(["ip", "-j", "link", "show", "pvh0"],
                                              capture_output=True, text=True,
                                              check=True).stdout)[0]["mtu"]
    out["mtu_refused"] = {}
    for bad in (20, 70000, 1 << 40):
        try:
            tap.set_mtu(bad)
        except TapError as exc:
            out["mtu_refused"][str(bad)] = str(exc)
    out["mtu_kept"] = tap.mtu
    link = json.loads(subprocess.run(["ip", "-j", "-d", "link", "show", "pvh0"],
                                     capture_output=True, text=True, check=True).stdout)[0]
    out["linkinfo"] = link.get("linkinfo", {}).get("info_data", {})
    single = Tap.open("pvh1")
    try:
        Tap.open("pvh1")
    except TapError as exc:
        out["busy"] = str(exc)
    single.close()
    again = Tap.open("pvh1")
    out["reopened"] = again.name
    again.close()
    tap.close()
    subprocess.run(["ip", "tuntap", "add", "dev", "pvtun0", "mode", "tun"], check=True)
    wrong = {}
    for name in ("pvtun0", "lo"):
        try:
            Tap.open(name)
        except TapError as exc:
            wrong[name] = str(exc)
    out["wrong_kind"] = wrong
    out["fds_after_wrong"] = len(os.listdir("/proc/self/fd"))
    subprocess.run(["ip", "tuntap", "del", "dev", "pvtun0", "mode", "tun"], check=True)
    names = [l["ifname"] for l in json.loads(subprocess.run(["ip", "-j", "link"],
             capture_output=True, text=True, check=True).stdout)]
    out["left"] = sorted(names)
    print(json.dumps(out))
    """
)


def test_tap_create_offload_multiqueue_up_and_busy() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["name"] == "pvh0" and out["fds"] == 2
    assert out["up_before"] is False and out["up_after"] is True
    info = out["linkinfo"]
    assert info.get("type") == "tap" and info.get("multi_queue") is True
    assert info.get("vnet_hdr") is True and info.get("pi") is False
    assert out["mtu_default"] == 1500
    assert out["mtu_set"] == out["mtu_ip"] == out["mtu_kept"] == 9000
    refused = out["mtu_refused"]
    einval = "TAP pvh0: SIOCSIFMTU: EINVAL (outside the MTUs the interface takes (68 to 65535 "
    assert refused["20"] == refused["70000"] == einval + "for a TAP))"
    assert refused[str(1 << 40)] == f"TAP pvh0: MTU {1 << 40} is not a positive 32-bit number"
    assert out["busy"].startswith("TAP pvh1: TUNSETIFF: EBUSY")
    assert out["reopened"] == "pvh1"
    assert out["left"] == ["lo"], "non-persistent TAPs go away with their fds"
    kind = "is not a TAP with these flags"
    assert out["wrong_kind"]["pvtun0"].startswith("TAP pvtun0: TUNSETIFF: EINVAL")
    assert kind in out["wrong_kind"]["pvtun0"]
    assert out["wrong_kind"]["lo"].startswith("TAP lo: TUNSETIFF: EINVAL")
    assert out["fds_after_wrong"] == out["fds_before"], "a refused open leaves no fd"


def test_names_and_offloads_are_checked() -> None:
    with pytest.raises(TapError, match="interface name"):
        _ifreq("a" * 16)
    with pytest.raises(TapError, match="interface name"):
        _ifreq("a/b")
    assert offload_flags(csum=True, tso4=True) == TUN_F_CSUM | TUN_F_TSO4
    with pytest.raises(TapError, match="need checksum offload"):
        offload_flags(tso4=True)
