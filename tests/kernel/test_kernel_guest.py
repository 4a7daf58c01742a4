"""pyvhost.kernel's control path against the real vhost drivers of the test guest's Linux 6.1.

One run (guest_control.py, about 20 s with the guest's boot; directly only on a host running 6.1,
since the expectations are that kernel's) drives /dev/vhost-net, -vsock and -scsi through
pyvhost.kernel and records, for every step, its value or the exception it raised and the change
in the process's open fds; the tests below assert on that record. Each error must be a
KernelVhostError (a VhostError) naming the request, the device and the kernel's errno with what it
means, and no step, failed or not, may leave an fd behind.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peers.kernel_runner import KernelRunner

pytestmark = [pytest.mark.guest, pytest.mark.kernel]

SCRIPT = Path(__file__).with_name("guest_control.py")
MODULES = ("tun", "vhost_net", "vhost_vsock", "vhost_scsi")
NET, VSOCK, SCSI = "/dev/vhost-net", "/dev/vhost-vsock", "/dev/vhost-scsi"
NET_FEATURES = 0x000000033D008000
VSOCK_FEATURES = 0x000000033D000002
SCSI_FEATURES = 0x000000013D00000A
IOTLB_MSG_V2 = 0x2

NOT_OWNER = "this process is not the device's owner (VHOST_SET_OWNER first)"
NOT_READY = "no memory table, or a ring not set up or not mapped (in this process or the IOTLB)"
NO_WORKERS = "not supported by this kernel (per-ring workers need Linux 6.5 or later)"
NO_CROSS_ENDIAN = "not supported by this kernel (built without CONFIG_VHOST_CROSS_ENDIAN_LEGACY)"
BAD_NUM = "ring size is 0, too large or not a power of two"
BAD_ADDR = "misaligned ring or log address, or (on a running ring) one outside this process"
BAD_CID = "CID reserved (0, 1, 2, -1) or above 32 bits"
NO_IOTLB = "entry refused: no IOTLB until VIRTIO_F_ACCESS_PLATFORM is acked"

Step = dict[str, Any]


@pytest.fixture(scope="module")
def found(kernel_runner: KernelRunner) -> dict[str, Any]:
    """The record of every step (one run for the whole file; directly only on a 6.1 host)."""
    result = kernel_runner.run(SCRIPT, timeout=120, modules=MODULES, kernel_release="6.1.").check()
    record: dict[str, Any] = json.loads(result.stdout)
    assert record["kernel"].startswith("6.1."), "the expectations below are Linux 6.1's"
    return record


def value(step: Step) -> object:
    """A step that worked: its value (it must not have raised or left an fd behind)."""
    assert "raised" not in step, step
    assert step["fds"] == 0
    return step["value"]


def failed(step: Step, request: str, path: str, err: int, meaning: str) -> None:
    """A step that failed with a KernelVhostError saying exactly this, and leaked no fd."""
    name = "EOPNOTSUPP" if err == errno.EOPNOTSUPP else errno.errorcode[err]
    assert step == {
        "raised": "KernelVhostError",
        "vhost_error": True,
        "message": f"{request} on {path}: {name} ({meaning})",
        "errno": err,
        "fds": 0,
    }


def steps(record: object) -> Iterator[Step]:
    """Every step in a (nested) record."""
    if isinstance(record, dict):
        if "fds" in record:
            yield record
        else:
            for item in record.values():
                yield from steps(item)


@pytest.mark.parametrize(
    ("section", "path", "features"), [("net", NET, NET_FEATURES), ("vsock", VSOCK, VSOCK_FEATURES)]
)
def test_features_and_backend_features(
    found: dict[str, Any], section: str, path: str, features: int
) -> None:
    dev = found[section]
    assert value(dev["features"]) == features
    assert value(dev["backend_features"]) == IOTLB_MSG_V2
    assert value(dev["set_backend_features"]) is None
    assert value(dev["backend_features_after"]) == IOTLB_MSG_V2
    failed(
        dev["set_backend_features_unoffered"],
        "VHOST_SET_BACKEND_FEATURES",
        path,
        errno.EOPNOTSUPP,
        "backend features the device does not offer",
    )
    failed(
        dev["set_features_unoffered"],
        "VHOST_SET_FEATURES",
        path,
        errno.EOPNOTSUPP,
        "features the device does not offer",
    )
    assert value(dev["set_features"]) is None


@pytest.mark.parametrize(("section", "path"), [("net", NET), ("vsock", VSOCK)])
def test_one_owner_at_a_time(found: dict[str, Any], section: str, path: str) -> None:
    dev = found[section]
    failed(dev["ring_before_owner"], "VHOST_SET_VRING_NUM", path, errno.EPERM, NOT_OWNER)
    assert value(dev["set_owner"]) is None
    failed(
        dev["set_owner_again"], "VHOST_SET_OWNER", path, errno.EBUSY, "device already has an owner"
    )


def test_reset_owner_frees_vhost_net_for_a_new_owner(found: dict[str, Any]) -> None:
    assert value(found["net"]["reset_owner"]) is None
    assert value(found["net"]["set_owner_after_reset"]) is None


@pytest.mark.parametrize(("section", "path"), [("vsock", VSOCK), ("scsi", SCSI)])
def test_drivers_without_reset_owner_say_so(found: dict[str, Any], section: str, path: str) -> None:
    """6.1's vhost-vsock and vhost-scsi pass RESET_OWNER on to the ring requests, which read a
    ring index at the null argument: EFAULT, and the device keeps its owner."""
    failed(
        found[section]["reset_owner"],
        "VHOST_RESET_OWNER",
        path,
        errno.EFAULT,
        "not supported by this driver: close and reopen the device",
    )
    if section == "vsock":
        failed(
            found["vsock"]["set_owner_after_reset"],
            "VHOST_SET_OWNER",
            path,
            errno.EBUSY,
            "device already has an owner",
        )


@pytest.mark.parametrize(("section", "path"), [("net", NET), ("vsock", VSOCK)])
def test_ring_size_base_endianness_and_busyloop(
    found: dict[str, Any], section: str, path: str
) -> None:
    """Both drivers have two rings (vsock's event ring is the VMM's): index 2 is ENOBUFS."""
    rings = found[section]["rings"]
    for step in ("num_out_of_range", "get_base_out_of_range"):
        request = "VHOST_SET_VRING_NUM" if step.startswith("num") else "VHOST_GET_VRING_BASE"
        failed(rings[step], request, path, errno.ENOBUFS, "ring index out of range")
    for step in ("num_not_power_of_two", "num_zero", "num_too_large"):
        failed(rings[step], "VHOST_SET_VRING_NUM", path, errno.EINVAL, BAD_NUM)
    assert value(rings["set_base"]) is None
    assert value(rings["get_base"]) == 1234
    failed(
        rings["set_base_too_large"],
        "VHOST_SET_VRING_BASE",
        path,
        errno.EINVAL,
        "base above 65535 (split ring)",
    )
    failed(rings["set_endian"], "VHOST_SET_VRING_ENDIAN", path, errno.ENOTTY, NO_CROSS_ENDIAN)
    failed(rings["get_endian"], "VHOST_GET_VRING_ENDIAN", path, errno.ENOTTY, NO_CROSS_ENDIAN)
    assert value(rings["set_busyloop"]) is None
    assert value(rings["get_busyloop"]) == 50


@pytest.mark.parametrize(("section", "path"), [("net", NET), ("vsock", VSOCK)])
def test_worker_requests_are_not_supported_by_6_1(
    found: dict[str, Any], section: str, path: str
) -> None:
    """ENOTTY; FREE_WORKER of id 7 is ENOBUFS (6.1 reads the id as a ring index): both say so."""
    rings = found[section]["rings"]
    for step, request in (
        ("new_worker", "VHOST_NEW_WORKER"),
        ("free_worker", "VHOST_FREE_WORKER"),
        ("attach_vring_worker", "VHOST_ATTACH_VRING_WORKER"),
        ("get_vring_worker", "VHOST_GET_VRING_WORKER"),
    ):
        failed(rings[step], request, path, errno.ENOTTY, NO_WORKERS)
    failed(rings["free_worker_7"], "VHOST_FREE_WORKER", path, errno.ENOBUFS, NO_WORKERS)


def test_memory_table_and_ring_addresses(found: dict[str, Any]) -> None:
    """Alignment is checked at once (avail 2, used and log 4; the descriptor table not at all);
    whether addresses are in this process only while the ring runs."""
    steps_ = found["net"]["addresses"]
    assert value(steps_["mem_table"]) is None
    assert value(steps_["mem_table_kernel_address"]) is None, "no ring runs: not checked yet"
    failed(
        steps_["mem_table_65_regions"],
        "VHOST_SET_MEM_TABLE",
        NET,
        errno.E2BIG,
        "more regions than vhost's max_mem_regions (64 by default)",
    )
    for step in ("addr_used_misaligned", "addr_avail_misaligned", "addr_log_misaligned"):
        failed(steps_[step], "VHOST_SET_VRING_ADDR", NET, errno.EINVAL, BAD_ADDR)
    assert value(steps_["addr_desc_misaligned"]) is None
    assert value(steps_["addr_kernel_half"]) is None, "no backend: not checked yet"
    backends = found["net"]["backends"]
    failed(
        backends["addr_kernel_half_running"], "VHOST_SET_VRING_ADDR", NET, errno.EINVAL, BAD_ADDR
    )
    failed(
        backends["mem_table_kernel_address_running"],
        "VHOST_SET_MEM_TABLE",
        NET,
        errno.EFAULT,
        "a region is outside this process's address space",
    )


def test_unmapped_memory_is_refused_when_the_ring_starts(found: dict[str, Any]) -> None:
    """A memory table and rings where nothing is mapped are accepted; SET_BACKEND then fails."""
    unmapped = found["net"]["unmapped"]
    assert value(unmapped["really_unmapped"]) is True
    failed(
        unmapped["backend_without_mem_table"], "VHOST_NET_SET_BACKEND", NET, errno.EFAULT, NOT_READY
    )
    for step in ("mem_table", "num", "addr"):
        assert value(unmapped[step]) is None, step
    failed(unmapped["backend"], "VHOST_NET_SET_BACKEND", NET, errno.EFAULT, NOT_READY)


def test_net_backends(found: dict[str, Any]) -> None:
    """A TAP before its ring is set up, fds that are no TAP, a TAP and a TUN, detach (-1)."""
    backends = found["net"]["backends"]
    failed(backends["tap_before_rings"], "VHOST_NET_SET_BACKEND", NET, errno.EFAULT, NOT_READY)
    failed(
        backends["out_of_range"],
        "VHOST_NET_SET_BACKEND",
        NET,
        errno.ENOBUFS,
        "ring index out of range",
    )
    for step in ("pipe", "udp_socket", "closed_fd"):
        failed(
            backends[step],
            "VHOST_NET_SET_BACKEND",
            NET,
            errno.ENOTSOCK,
            "the backend fd is not a TAP, TUN or AF_PACKET socket",
        )
    assert value(backends["rings"]) is None
    assert value(backends["tap"]) is None
    running = "the ring is running (detach its backend first)"
    failed(backends["num_while_running"], "VHOST_SET_VRING_NUM", NET, errno.EBUSY, running)
    failed(backends["base_while_running"], "VHOST_SET_VRING_BASE", NET, errno.EBUSY, running)
    for step in ("detach", "tun", "tun_detach"):
        assert value(backends[step]) is None, step
    assert value(backends["get_base_after_detach"]) == 1234


def test_a_closed_device_says_so(found: dict[str, Any]) -> None:
    failed(found["net"]["after_close"], "VHOST_GET_FEATURES", NET, errno.EBADF, "device is closed")


def test_iotlb_without_access_platform(found: dict[str, Any]) -> None:
    """IOTLB_MSG_V2 acked, ACCESS_PLATFORM not: the kernel has no IOTLB to write or read."""
    steps_ = found["iotlb"]["without_platform"]
    failed(steps_["update"], "IOTLB UPDATE write", NET, errno.EFAULT, NO_IOTLB)
    failed(steps_["invalidate"], "IOTLB INVALIDATE write", NET, errno.EFAULT, NO_IOTLB)
    failed(
        steps_["read"],
        "IOTLB read",
        NET,
        errno.EBADFD,
        "no IOTLB until VIRTIO_F_ACCESS_PLATFORM is acked, so no miss can come",
    )


def test_iotlb_misses_and_updates(found: dict[str, Any]) -> None:
    """With ACCESS_PLATFORM ring addresses are IOVAs: each one not in the IOTLB is a MISS to
    read (even from a SET_BACKEND that failed), an UPDATE lets the ring start."""
    steps_ = found["iotlb"]["with_platform"]
    failed(steps_["backend_unmapped"], "VHOST_NET_SET_BACKEND", NET, errno.EFAULT, NOT_READY)
    miss = {"type": "MISS", "size": 0, "perm": 1, "asid": 0}
    assert value(steps_["miss_after_backend"]) == {**miss, "iova": 0x2000}, "the used ring"
    assert value(steps_["update_used"]) is None
    assert value(steps_["backend"]) is None
    assert value(steps_["kick"]) is None
    assert value(steps_["miss"]) == {**miss, "iova": 0}, "the descriptor table, on the kick"
    assert value(steps_["update_all"]) is None
    failed(
        steps_["update_empty"],
        "IOTLB UPDATE write",
        NET,
        errno.EINVAL,
        "unknown message type, or an UPDATE or INVALIDATE of size 0",
    )
    assert value(steps_["detach"]) is None


def test_vsock_guest_cids(found: dict[str, Any]) -> None:
    cids = found["vsock"]["cids"]
    assert value(cids["cid_3"]) is None
    assert value(cids["cid_3_again"]) is None
    for cid in (2, 0, 1, 0xFFFFFFFF, 1 << 32):
        failed(cids[f"cid_{cid:#x}"], "VHOST_VSOCK_SET_GUEST_CID", VSOCK, errno.EINVAL, BAD_CID)
    failed(
        cids["cid_3_other"],
        "VHOST_VSOCK_SET_GUEST_CID",
        VSOCK,
        errno.EADDRINUSE,
        "another device uses that CID",
    )
    assert value(cids["cid_4_other"]) is None


def test_vsock_running_needs_owner_memory_and_both_rings(found: dict[str, Any]) -> None:
    dev = found["vsock"]
    request = "VHOST_VSOCK_SET_RUNNING"
    failed(dev["cids"]["running_not_owner"], request, VSOCK, errno.EPERM, NOT_OWNER)
    failed(dev["running_before_rings"], request, VSOCK, errno.EFAULT, NOT_READY)
    assert value(dev["mem_table"]) is None
    assert value(dev["rings_set"]) is None
    failed(dev["running_one_ring"], request, VSOCK, errno.EFAULT, NOT_READY)
    assert value(dev["rings_set_1"]) is None
    assert value(dev["running"]) is None
    assert value(dev["stopped"]) is None


def test_vhost_scsi_has_no_backend_features(found: dict[str, Any]) -> None:
    """6.1's vhost-scsi passes GET_BACKEND_FEATURES on to the generic requests."""
    scsi = found["scsi"]
    assert value(scsi["abi_version"]) == 1
    failed(scsi["backend_features"], "VHOST_GET_BACKEND_FEATURES", SCSI, errno.EPERM, NOT_OWNER)
    assert value(scsi["set_owner"]) is None
    failed(
        scsi["backend_features_owner"],
        "VHOST_GET_BACKEND_FEATURES",
        SCSI,
        errno.ENOTTY,
        "not supported by this kernel",
    )


def test_no_step_leaks_an_fd(found: dict[str, Any]) -> None:
    """Each device holds one fd while open; after every step and after close() nothing stays."""
    for section in ("net", "iotlb", "vsock", "scsi"):
        every = list(steps(found[section]))
        assert len(every) >= 5 and all(step["fds"] == 0 for step in every), section
        assert found[section]["leaked_fds"] == 0, section
        assert all(
            step.get("raised") in (None, "KernelVhostError") and step.get("vhost_error", True)
            for step in every
        ), section
    assert found["net"]["open_fds"] == found["vsock"]["open_fds"] == 1


@pytest.mark.parametrize(
    ("path", "features", "backend"),
    [
        (NET, NET_FEATURES, IOTLB_MSG_V2),
        (VSOCK, VSOCK_FEATURES, IOTLB_MSG_V2),
        (SCSI, SCSI_FEATURES, None),
    ],
)
def test_probe_kernel_json(
    found: dict[str, Any], path: str, features: int, backend: int | None
) -> None:
    run = found["probe"][path]
    assert (run["returncode"], run["stderr"]) == (0, "")
    result = json.loads(run["stdout"])
    assert result["device"] == path
    assert result["features"] == features
    assert {"VERSION_1", "RING_EVENT_IDX", "LOG_ALL"} <= set(result["feature_names"])
    assert ("ACCESS_PLATFORM" in result["feature_names"]) == (path != SCSI)
    assert result["backend_features"] == backend
    if path == NET:
        assert {"MRG_RXBUF", "VHOST_NET_F_VIRTIO_NET_HDR"} <= set(result["feature_names"])
        assert "ANY_LAYOUT" not in result["feature_names"]
    assert ("abi_version" in result) == (path == SCSI)
    if path == SCSI:
        assert result["abi_version"] == 1


def test_no_vhost_vdpa_in_the_guest_kernel(found: dict[str, Any]) -> None:
    """Debian's 6.1 kernels build no vhost_vdpa: modprobe fails, the probe names the module."""
    assert found["probe"]["modprobe vhost_vdpa"]["returncode"] != 0
    assert "vhost_vdpa not found" in found["probe"]["modprobe vhost_vdpa"]["stderr"]
    run = found["probe"]["/dev/vhost-vdpa-0"]
    assert (run["returncode"], run["stdout"]) == (1, "")
    assert run["stderr"] == (
        "pyvhost probe: open on /dev/vhost-vdpa-0: ENOENT (no such device: is the vhost module "
        "loaded (modprobe vhost_net / vhost_vsock ...)?)\n"
    )
