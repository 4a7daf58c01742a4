"""``pyvhost probe --kernel`` where no vhost device exists: a one-line reason, exit status 1.
(The same command against real devices runs in the guest tests.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pyvhost.cli.probe import _kernel_text


def _probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvhost", "probe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_missing_device_names_the_module(tmp_path: Path) -> None:
    path = tmp_path / "vhost-net"
    proc = _probe("--kernel", str(path), "--json")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == (
        f"pyvhost probe: open on {path}: ENOENT (no such device: is the vhost module "
        "loaded (modprobe vhost_net / vhost_vsock ...)?)"
    )


def test_not_a_vhost_device() -> None:
    proc = _probe("--kernel", "/dev/null")
    assert proc.returncode == 1
    assert "not a vhost device name" in proc.stderr


def test_socket_and_kernel_are_exclusive(tmp_path: Path) -> None:
    proc = _probe("--kernel", "/dev/vhost-net", "--socket", str(tmp_path / "s"))
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


def test_text_of_a_driver_without_backend_features() -> None:
    """vhost-scsi (6.1) has no GET_BACKEND_FEATURES: the probe shows none instead of failing."""
    found = {
        "device": "/dev/vhost-scsi",
        "device_type": "scsi",
        "device_type_from": "device node",
        "features": 0x13D00000A,
        "feature_names": ["HOTPLUG"],
        "backend_features": None,
        "abi_version": 1,
    }
    lines = _kernel_text(found).splitlines()
    assert lines[1] == "device type:      scsi (from the device node)"
    assert lines[3] == "backend features: none (no GET_BACKEND_FEATURES in this driver)"
    assert lines[4] == "abi version:      1"
    assert _kernel_text({**found, "backend_features": 2}).splitlines()[3].endswith(": 0x2")
