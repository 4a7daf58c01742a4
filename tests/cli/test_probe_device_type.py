"""``pyvhost probe --device-type``: device feature bits named against ``pyvhost serve blk``
(subprocesses), and the type a kernel device tells of itself (stand-in devices, no ioctl)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.qemu import PeerProcess, make_raw_image, short_tmp
from pyvhost.cli import probe
from pyvhost.cli.main import build_parser
from pyvhost.errors import VhostError
from pyvhost.kernel import VhostKernelDevice, VhostNet, VhostVdpa
from pyvhost.virtio import features as vf

SERVED_BLK_BITS = ["SIZE_MAX", "SEG_MAX", "BLK_SIZE", "FLUSH", "MQ", "DISCARD", "WRITE_ZEROES"]


@pytest.fixture
def serve_blk() -> Iterator[Path]:
    """``pyvhost serve blk`` with two queues on a writable image; yields its socket."""
    with short_tmp("pvh-probe-") as tmp:
        image = make_raw_image(tmp / "disk.img", 1 << 20)
        sock = tmp / "blk.sock"
        argv = [sys.executable, "-m", "pyvhost", "serve", "blk", "--socket", str(sock)]
        argv += ["--image", str(image), "--queues", "2"]
        with PeerProcess(argv, tmp, name="blk", timeout_s=60, socket=sock):
            yield sock


def _probe(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["timeout", "30", sys.executable, "-m", "pyvhost", "probe", *argv],
        capture_output=True,
        text=True,
        check=False,
    )


def test_blk_bits_named_with_device_type(serve_blk: Path) -> None:
    proc = _probe("--socket", str(serve_blk), "--device-type", "blk", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["device_type"], out["device_type_from"]) == ("blk", "given")
    names = out["feature_names"]
    assert [n for n in names if n in SERVED_BLK_BITS] == SERVED_BLK_BITS
    assert "VERSION_1" in names and not [n for n in names if n.startswith("bit")]
    assert out["blk"]["num_queues"] == 2

    text = _probe("--socket", str(serve_blk), "--device-type", "blk")
    assert text.returncode == 0, text.stderr
    assert "device type: blk (given)" in text.stdout
    assert "|SEG_MAX|" in text.stdout and "capacity: 2048 sectors" in text.stdout


def test_other_device_type_names_the_same_bits_its_way(serve_blk: Path) -> None:
    """The flag is believed: blk's bit 1 (SIZE_MAX) reads as net's GUEST_CSUM, no blk decode."""
    proc = _probe("--socket", str(serve_blk), "--device-type", "net", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["device_type"] == "net" and "blk" not in out
    assert "GUEST_CSUM" in out["feature_names"] and "SIZE_MAX" not in out["feature_names"]


def test_device_and_device_type_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser(("pyvhost.cli.probe",))
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["probe", "--socket", "s", "--device", "blk", "--device-type", "blk"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_unknown_device_type_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser(("pyvhost.cli.probe",))
    with pytest.raises(SystemExit):
        parser.parse_args(["probe", "--socket", "s", "--device-type", "balloon"])
    assert "invalid choice: 'balloon'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown device type 'balloon'"):
        probe.probe("/nonexistent", device="balloon")


# --- kernel devices: the type they tell --------------------------------------------------------


class FakeNet(VhostNet):
    """A vhost-net device on /dev/null that answers GET_FEATURES without the kernel."""

    def __init__(self, path: str) -> None:
        super().__init__(path, fd=os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))

    def get_features(self) -> int:
        return vf.bit_mask(vf.NET_F_MRG_RXBUF, vf.F_VERSION_1)

    def get_backend_features(self) -> int:
        return 0


class FakeVdpa(VhostVdpa):
    """A vhost-vdpa device on /dev/null of virtio device id ``device_id``."""

    device_id = 2

    def __init__(self, path: str) -> None:
        super().__init__(path, fd=os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))

    def get_features(self) -> int:
        return vf.bit_mask(vf.BLK_F_SEG_MAX, vf.F_VERSION_1)

    def get_backend_features(self) -> int:
        return 0

    def get_device_id(self) -> int:
        return self.device_id

    def get_config_size(self) -> int:
        return 8

    def get_config(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def get_vring_num(self) -> int:
        return 256


class FakeBalloon(FakeVdpa):
    """A vdpa device of an id with no feature table (5, the balloon)."""

    device_id = 5


def _with(monkeypatch: pytest.MonkeyPatch, cls: type[VhostKernelDevice]) -> None:
    monkeypatch.setattr(probe, "open_device", cls)


def test_vhost_net_tells_it_is_net(monkeypatch: pytest.MonkeyPatch) -> None:
    _with(monkeypatch, FakeNet)
    found = probe.probe_kernel("/dev/vhost-net")
    assert (found["device_type"], found["device_type_from"]) == ("net", "device node")
    assert found["feature_names"] == ["MRG_RXBUF", "VERSION_1"]
    with pytest.raises(VhostError, match="/dev/vhost-net is a net device, not blk"):
        probe.probe_kernel("/dev/vhost-net", "blk")


def test_vdpa_tells_its_type_by_device_id(monkeypatch: pytest.MonkeyPatch) -> None:
    _with(monkeypatch, FakeVdpa)
    found = probe.probe_kernel("/dev/vhost-vdpa-0")
    assert (found["device_type"], found["device_type_from"]) == ("blk", "vdpa device id")
    assert found["feature_names"] == ["SEG_MAX", "VERSION_1"]


def test_vdpa_of_an_unnamed_id_takes_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _with(monkeypatch, FakeBalloon)
    found = probe.probe_kernel("/dev/vhost-vdpa-0")
    assert (found["device_type"], found["device_type_from"]) == (None, None)
    assert found["feature_names"] == ["bit2", "VERSION_1"]
    args = build_parser(("pyvhost.cli.probe",)).parse_args(
        ["probe", "--kernel", "/dev/vhost-vdpa-0", "--device-type", "scsi"]
    )
    assert probe.run(args) == 0
    out = capsys.readouterr().out
    assert "device type:      scsi (given)" in out and "(CHANGE VERSION_1)" in out
