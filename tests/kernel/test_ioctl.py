"""The kernel vhost ioctl numbers and struct sizes against the C headers of this machine, and the
errors a device raises, on the host (no /dev/vhost-* here: those run in a guest)."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvhost.kernel import IotlbMessage, IotlbType, KernelVhostError, VhostNet, open_device
from pyvhost.kernel import ioctl as k
from pyvhost.kernel.tap import TUNGETIFF, TUNSETIFF, TUNSETOFFLOAD, TUNSETPERSIST, TUNSETVNETHDRSZ

HEADER = Path("/usr/include/linux/vhost.h")
STRUCTS = {
    "vhost_vring_state": k.VRING_STATE.size,
    "vhost_vring_file": k.VRING_FILE.size,
    "vhost_vring_addr": k.VRING_ADDR.size,
    "vhost_memory": k.MEMORY.size,
    "vhost_memory_region": k.MEMORY_REGION.size,
    "vhost_scsi_target": k.SCSI_TARGET.size,
    "vhost_vdpa_config": k.VDPA_CONFIG.size,
    "vhost_vdpa_iova_range": k.IOVA_RANGE.size,
    "vhost_msg": k.MSG.size,
    "vhost_msg_v2": k.MSG_V2.size,
}
TUN = {
    "TUNSETIFF": TUNSETIFF,
    "TUNSETPERSIST": TUNSETPERSIST,
    "TUNSETOFFLOAD": TUNSETOFFLOAD,
    "TUNGETIFF": TUNGETIFF,
    "TUNSETVNETHDRSZ": TUNSETVNETHDRSZ,
}


@pytest.fixture(scope="module")
def from_c(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Every VHOST_* request number and struct size as the C compiler sees the headers."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not HEADER.exists():
        pytest.skip("needs a C compiler and linux-libc-dev (apt-get install gcc linux-libc-dev)")
    lines = ["#include <stdio.h>", "#include <linux/vhost.h>", "#include <linux/if_tun.h>"]
    lines.append("int main(void) {")
    for request in k.Ioctl:
        name = request.spec_name
        lines.append(f'#ifdef {name}\n printf("{name} %lu\\n", (unsigned long){name});\n#endif')
    for name in TUN:
        lines.append(f' printf("{name} %lu\\n", (unsigned long){name});')
    for struct_name in STRUCTS:
        lines.append(f' printf("{struct_name} %zu\\n", sizeof(struct {struct_name}));')
    lines.append(" return 0;\n}")
    folder = tmp_path_factory.mktemp("vhost-h")
    source, binary = folder / "numbers.c", folder / "numbers"
    source.write_text("\n".join(lines))
    subprocess.run([cc, "-o", str(binary), str(source)], check=True, capture_output=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def test_every_request_number_matches_the_header(from_c: dict[str, int]) -> None:
    checked = [r for r in k.Ioctl if r.spec_name in from_c]
    for request in checked:
        assert int(request) == from_c[request.spec_name], request.spec_name
    # This machine's headers are Linux 6.1: the 6.5 worker requests and VDPA_RESUME are newer.
    newer = {"NEW_WORKER", "FREE_WORKER", "ATTACH_VRING_WORKER", "GET_VRING_WORKER", "VDPA_RESUME"}
    assert {r.name for r in k.Ioctl} - {r.name for r in checked} <= newer
    assert len(checked) >= len(k.Ioctl) - len(newer)


def test_newer_requests_follow_the_encoding() -> None:
    """Linux 6.5's worker requests and VDPA_RESUME, from their definitions in the 6.5 header."""
    assert k.ior(0x8, 4) == k.Ioctl.NEW_WORKER
    assert k.iow(0x9, 4) == k.Ioctl.FREE_WORKER
    assert k.iow(0x15, 8) == k.Ioctl.ATTACH_VRING_WORKER
    assert k.iowr(0x16, 8) == k.Ioctl.GET_VRING_WORKER
    assert k.io(0x7E) == k.Ioctl.VDPA_RESUME
    assert int(k.Ioctl.SET_OWNER) == 0xAF01 and int(k.Ioctl.GET_FEATURES) == 0x8008AF00


def test_struct_sizes_match_the_header(from_c: dict[str, int]) -> None:
    for name, size in STRUCTS.items():
        assert size == from_c[name], name


def test_tun_request_numbers_match_the_header(from_c: dict[str, int]) -> None:
    for name, value in TUN.items():
        assert value == from_c[name], name


def test_ioc_rejects_a_size_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match="14 bits"):
        k.iow(1, 1 << 14)


def test_iotlb_messages_round_trip() -> None:
    for v2 in (False, True):
        msg = IotlbMessage(IotlbType.UPDATE, 0x1000, 0x2000, 0x7F00_0000_0000, 3, 1 if v2 else 0)
        data = msg.encode(v2)
        assert len(data) == 72
        assert IotlbMessage.decode(data, v2) == msg


def test_iotlb_decode_refuses_garbage() -> None:
    with pytest.raises(Exception, match="IOTLB message of 3 bytes"):
        IotlbMessage.decode(b"abc", True)
    wrong = IotlbMessage(IotlbType.MISS, 0).encode(False)
    with pytest.raises(Exception, match="type 1, expected 2"):
        IotlbMessage.decode(wrong, True)
    bad_type = bytearray(IotlbMessage(IotlbType.MISS, 0).encode(True))
    bad_type[8 + 25] = 9
    with pytest.raises(Exception, match="entry type 9"):
        IotlbMessage.decode(bytes(bad_type), True)


def test_a_missing_device_says_which_module_to_load(tmp_path: Path) -> None:
    path = str(tmp_path / "vhost-net")
    with pytest.raises(KernelVhostError) as info:
        VhostNet(path)
    assert str(info.value) == (
        f"open on {path}: ENOENT (no such device: is the vhost module loaded "
        "(modprobe vhost_net / vhost_vsock ...)?)"
    )
    assert info.value.errno == errno.ENOENT


def test_a_non_vhost_fd_fails_with_the_request_named() -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    dev = VhostNet("/dev/eventfd-standin", fd=fd)
    try:
        with pytest.raises(KernelVhostError) as info:
            dev.get_features()
        assert str(info.value).startswith("VHOST_GET_FEATURES on /dev/eventfd-standin: ")
        assert info.value.request == "VHOST_GET_FEATURES"
        with pytest.raises(KernelVhostError, match=r"VHOST_SET_OWNER on .*: ENOTTY"):
            dev.set_owner()
    finally:
        dev.close()
    with pytest.raises(
        KernelVhostError, match=r"VHOST_SET_OWNER on .*: EBADF \(device is closed\)"
    ):
        dev.set_owner()


def test_open_device_picks_the_class_by_name(tmp_path: Path) -> None:
    with pytest.raises(KernelVhostError, match="not a vhost device name"):
        open_device(str(tmp_path / "tty0"))
    with pytest.raises(KernelVhostError, match="ENOENT"):
        open_device(str(tmp_path / "vhost-vsock"))


def test_scsi_target_refuses_a_bad_wwpn() -> None:
    from pyvhost.kernel.devices import _target

    assert len(_target("naa.5001405abcdef012", 1)) == 232
    assert _target("naa.1", 1)[:4] == (1).to_bytes(4, "little"), "ABI version first"
    with pytest.raises(ValueError, match="WWPN"):
        _target("x" * 224, 1)
    with pytest.raises(ValueError, match="TPG tag"):
        _target("naa.1", 70000)


FAILURES = [
    (lambda d: d.set_features(1), errno.EOPNOTSUPP, "VHOST_SET_FEATURES", "EOPNOTSUPP (features"),
    (lambda d: d.set_vring_num(2, 256), errno.ENOBUFS, "VHOST_SET_VRING_NUM", "ring index out of"),
    (lambda d: d.reset_owner(), errno.EFAULT, "VHOST_RESET_OWNER", "not supported by this driver"),
    (lambda d: d.set_vring_base(0, 1 << 16), errno.EINVAL, "VHOST_SET_VRING_BASE", "above 65535"),
    (lambda d: d.get_vring_endian(0), errno.ENOTTY, "VHOST_GET_VRING_ENDIAN", "CROSS_ENDIAN"),
    (lambda d: d.set_mem_table([]), errno.E2BIG, "VHOST_SET_MEM_TABLE", "max_mem_regions"),
    (lambda d: d.new_worker(), errno.ENOTTY, "VHOST_NEW_WORKER", "not supported by this kernel"),
    (lambda d: d.free_worker(7), errno.ENOBUFS, "VHOST_FREE_WORKER", "not supported by this"),
    (lambda d: d.get_vring_worker(0), errno.ENOTTY, "VHOST_GET_VRING_WORKER", "Linux 6.5"),
    (lambda d: d.set_backend(0, 5), errno.ENOTSOCK, "VHOST_NET_SET_BACKEND", "TAP, TUN or AF_"),
    (lambda d: d.set_backend(0, 5), errno.EFAULT, "VHOST_NET_SET_BACKEND", "no memory table"),
]


@pytest.mark.parametrize(("call", "err", "request_name", "meaning"), FAILURES)
def test_errnos_the_guest_kernel_returns_have_meanings(
    monkeypatch: pytest.MonkeyPatch,
    call: Callable[[VhostNet], object],
    err: int,
    request_name: str,
    meaning: str,
) -> None:
    """The errno of a failed ioctl as the 6.1 guest kernel returns it (tests in
    test_kernel_guest.py) becomes its meaning for that request, with the kernel's errno name."""

    def fail(*args: object) -> None:
        raise OSError(err, os.strerror(err))

    fd = os.eventfd(0, os.EFD_CLOEXEC)
    with VhostNet("/dev/vhost-net", fd=fd) as dev, monkeypatch.context() as patch:
        patch.setattr(fcntl, "ioctl", fail)
        with pytest.raises(KernelVhostError) as info:
            call(dev)
    assert str(info.value).startswith(f"{request_name} on /dev/vhost-net: ")
    assert meaning in str(info.value)
    assert info.value.errno == err


def test_iotlb_errnos_have_meanings(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise OSError(errno.EFAULT, "Bad address")

    fd = os.eventfd(0, os.EFD_CLOEXEC)
    with VhostNet("/dev/vhost-net", fd=fd) as dev, monkeypatch.context() as patch:
        patch.setattr(os, "write", fail)
        with pytest.raises(KernelVhostError) as info:
            dev.write_iotlb(IotlbMessage(IotlbType.UPDATE, 0, 0x1000, 0x7F00_0000_0000, 3))
    assert str(info.value) == (
        "IOTLB UPDATE write on /dev/vhost-net: EFAULT (entry refused: no IOTLB until "
        "VIRTIO_F_ACCESS_PLATFORM is acked)"
    )
