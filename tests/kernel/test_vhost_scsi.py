"""/dev/vhost-scsi endpoint handling against a real LIO target, in the test guest (Linux 6.1).

One run (tests/kernel/vhost_scsi_guest.py, about 6 s; directly only on a 6.1 host with rtslib)
makes a fileio LUN behind a vhost target with tests/peers/lio.py, goes through the steps and
reports them as JSON; each test here checks one step. The host-side tests at the end need neither.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from peers import lio, pyguest
from peers.guest import Kernel
from peers.kernel_runner import KernelRunner
from peers.pyguest import image_key
from pyvhost.kernel import KernelVhostError, VhostScsi
from pyvhost.kernel.ioctl import Ioctl

GUEST_SCRIPT = Path(__file__).with_name("vhost_scsi_guest.py")
WRONG_WWPN = "naa.5001405deadbeef0"
DEVICE = "/dev/vhost-scsi"


@pytest.fixture(scope="module")
def steps(kernel_runner: KernelRunner) -> dict[str, Any]:
    """The record of every step (one run for the whole module; directly only on a 6.1 host)."""
    result = kernel_runner.run(
        GUEST_SCRIPT,
        timeout=180,
        files={lio.GUEST_NAME: Path(lio.__file__)},
        modules=lio.MODULES,
        imports=lio.IMPORTS,
        kernel_release="6.1.",
    ).check()
    record: dict[str, Any] = json.loads(result.stdout)
    record["duration_s"] = result.duration_s
    return record


def step(steps: dict[str, Any], name: str) -> Any:
    """One step's record; fails with the guest's traceback if the step crashed."""
    found = steps[name]
    if isinstance(found, dict) and "crashed" in found:
        pytest.fail(f"guest step {name} crashed:\n{found['crashed']}")
    return found


def error(errno_value: int, request: str, meaning: str) -> dict[str, Any]:
    """A step outcome that is a KernelVhostError."""
    name = errno.errorcode[errno_value]
    return {"error": f"{request} on {DEVICE}: {name} ({meaning})", "errno": errno_value}


OK = {"value": None}
ENODEV_MEANING = (
    "no free LIO vhost target with that WWPN: none exists, its portal groups have no nexus, "
    "or another vhost-scsi device holds them"
)


@pytest.mark.kernel
def test_lio_target_has_a_lun_and_a_nexus(steps: dict[str, Any]) -> None:
    assert steps["target"]["wwpn"] == lio.DEFAULT_WWPN
    assert steps["target"]["tpgt"] == 1
    assert steps["target"]["nexus"].startswith("naa.5001405")
    assert steps["configfs_lun"] == ["lun_0"]


@pytest.mark.kernel
def test_abi_version_is_1_and_features_as_recorded(steps: dict[str, Any]) -> None:
    """Linux 6.1: VHOST_SCSI_ABI_VERSION 1 (even before SET_OWNER); features as GUEST.md says."""
    assert step(steps, "abi") == {"abi": 1, "features": 0x13D00000A}


@pytest.mark.kernel
def test_set_endpoint_attaches_and_clear_endpoint_detaches(steps: dict[str, Any]) -> None:
    """While one device is attached, the TPG is not free for a second; after CLEAR it is.
    CLEAR on a detached device is a no-op."""
    found = step(steps, "attach")
    assert found["taken"] == error(errno.ENODEV, "VHOST_SCSI_SET_ENDPOINT", ENODEV_MEANING)
    assert found["after_clear"] == OK
    assert found["clear_detached"] == [OK, OK]


@pytest.mark.kernel
def test_set_endpoint_with_a_wrong_wwpn_says_why(steps: dict[str, Any]) -> None:
    assert step(steps, "wrong_wwpn") == error(
        errno.ENODEV, "VHOST_SCSI_SET_ENDPOINT", ENODEV_MEANING
    )


@pytest.mark.kernel
def test_a_second_set_endpoint_while_attached(steps: dict[str, Any]) -> None:
    """EEXIST, whatever the TPG tag (Linux matches the WWPN only); CLEAR naming another WWPN
    is EINVAL."""
    found = step(steps, "twice")
    exists = error(
        errno.EEXIST, "VHOST_SCSI_SET_ENDPOINT", "the device is already attached to that target"
    )
    assert found["again"] == exists
    assert found["other_tpgt"] == exists
    assert found["clear_other_wwpn"] == error(
        errno.EINVAL, "VHOST_SCSI_CLEAR_ENDPOINT", "the device is attached to another WWPN"
    )


@pytest.mark.kernel
def test_set_endpoint_needs_owner_and_memory_table(steps: dict[str, Any]) -> None:
    found = step(steps, "unready")
    efault = error(
        errno.EFAULT,
        "VHOST_SCSI_SET_ENDPOINT",
        "the rings are not set up: no memory table yet (VHOST_SET_OWNER, VHOST_SET_MEM_TABLE "
        "first) or a ring address is not accessible",
    )
    assert found == {"no_owner": efault, "no_table": efault}


@pytest.mark.kernel
def test_events_missed_round_trip(steps: dict[str, Any]) -> None:
    assert step(steps, "events_missed") == [False, True, False]


@pytest.mark.kernel
def test_closing_detaches_and_leaves_no_fd_open(steps: dict[str, Any]) -> None:
    """Three attach-and-close rounds: the TPG is free again and no fd stays open."""
    found = step(steps, "close_detaches")
    assert found["reattach"] == OK
    assert found["after"] == found["before"]
    assert steps["fds_at_end"] == steps["fds_at_start"]


@pytest.mark.kernel
def test_teardown_leaves_nothing(steps: dict[str, Any]) -> None:
    assert steps["leftovers"] == []
    assert steps["backing_exists"] is False


def test_scsi_errors_have_their_own_meanings() -> None:
    """vhost-scsi's errnos get vhost-scsi's meanings; others fall through to the generic ones."""
    with VhostScsi(DEVICE, fd=os.eventfd(0, os.EFD_CLOEXEC)) as dev:
        check_meanings(dev)
    with pytest.raises(KernelVhostError, match=r"VHOST_SCSI_SET_ENDPOINT on .*: EBADF"):
        dev.set_endpoint(lio.DEFAULT_WWPN, 1)


def check_meanings(dev: VhostScsi) -> None:
    """The errors ``dev`` builds for a few (request, errno) pairs."""
    enodev = dev._error(Ioctl.SCSI_SET_ENDPOINT, OSError(errno.ENODEV, "x"))
    assert isinstance(enodev, KernelVhostError)
    assert str(enodev).endswith(f"ENODEV ({ENODEV_MEANING})")
    generic = dev._error(Ioctl.SCSI_GET_ABI_VERSION, OSError(errno.ENOTTY, "x"))
    assert str(generic).endswith("ENOTTY (not supported by this kernel)")
    other = dev._error(Ioctl.SET_OWNER, OSError(errno.EBUSY, "x"))
    assert str(other).endswith("EBUSY (device already has an owner)")


def test_lio_helper_names_the_modules_the_guest_needs() -> None:
    assert lio.MODULES == ("target_core_mod", "target_core_file", "vhost_scsi")
    assert lio.DEFAULT_WWPN.startswith("naa.5") and len(lio.DEFAULT_WWPN) == 20


def test_the_image_has_rtslib_and_its_key_follows_the_packages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Adding rtslib-fb changed the image key, so cached images without it are not reused."""
    assert "python3-rtslib-fb" in pyguest.PACKAGES
    kernel = Kernel("6.1.0-1-cloud-amd64", Path("/k/vmlinuz"), Path("/cache/kernel/6.1.0-1_6.1.1"))
    with_rtslib = image_key(kernel)
    without = tuple(p for p in pyguest.PACKAGES if p != "python3-rtslib-fb")
    monkeypatch.setattr(pyguest, "PACKAGES", without)
    assert image_key(kernel) != with_rtslib
