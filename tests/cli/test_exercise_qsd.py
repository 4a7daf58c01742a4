"""``pyvhost exercise blk`` against qemu-storage-daemon, and against a back-end that corrupts
what it reads: exit status, the JSON object, and the image content afterwards."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.qemu import QemuStorageDaemon
from pyvhost.cli.exercise import ExerciseOptions, check_block, pattern, run_exercise
from pyvhost.cli.main import main
from pyvhost.daemon import Daemon, Device
from pyvhost.virtio import features as vf
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory

REQUIRED_KEYS = {
    "iops",
    "mb_per_s",
    "errors",
    "features",
    "capacity",
    "id",
    "queues",
    "reconnects",
    "verified_bytes",
}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def check_image(image: Path, region: int, block_size: int, passes: int, next_block: int) -> None:
    """Every block of the region holds the pattern of the last pass that wrote it; the rest of
    the image is untouched (zeros)."""
    data = image.read_bytes()
    blocks = region // block_size
    for b in range(blocks):
        got = data[b * block_size : (b + 1) * block_size]
        want_pass = passes if b < next_block else passes - 1
        assert check_block(got, block_size, b) == want_pass, f"block {b}"
    assert data[region:] == bytes(len(data) - region)


@pytest.mark.qemu
def test_exercise_against_qsd_json_and_image(
    qsd: QemuStorageDaemon, qsd_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    region = 1 << 20
    argv = ["exercise", "blk", "--socket", str(qsd.socket), "--seconds", "1", "--json"]
    argv += ["--queue-depth", "8", "--region", "1M", "--block-size", "4K", "--quiet"]
    rc, out, _ = run_cli(argv, capsys)
    result = json.loads(out)
    assert rc == 0, result
    assert result.keys() >= REQUIRED_KEYS
    assert result["errors"] == 0 and result["ok"] is True
    assert result["iops"] > 0 and result["mb_per_s"] > 0
    assert result["capacity"] == qsd_image.stat().st_size
    assert result["verified_bytes"] >= region  # at least one whole pass
    assert result["reconnects"] == 0
    assert "VERSION_1" in result["feature_names"]
    check_image(qsd_image, region, 4096, result["passes"], result["next_block"])


@pytest.mark.qemu
def test_exercise_two_queues_64k_human_report(
    peer_dir: Path, qsd_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with QemuStorageDaemon(qsd_image, peer_dir / "q.sock", num_queues=2) as qsd:
        argv = ["exercise", "blk", "--socket", str(qsd.socket), "--seconds", "0.5"]
        argv += ["--queues", "2", "--queue-depth", "4", "--block-size", "64K", "--region", "4M"]
        rc, out, err = run_cli(argv, capsys)
    assert rc == 0, out + err
    assert "result        OK" in out
    assert "IOPS" in out and "verified" in out
    assert "2 queue(s) x depth 4" in out


@pytest.mark.qemu
def test_exercise_passes_option_is_exact(qsd: QemuStorageDaemon, qsd_image: Path) -> None:
    assert qsd.socket is not None
    opts = ExerciseOptions(
        str(qsd.socket), seconds=0, passes=2, region=256 << 10, queue_depth=4, progress=False
    )
    result = run_exercise(opts)
    assert result.ok, result
    assert result.passes == 2 and result.next_block == 0
    assert result.writes == 2 * 64
    check_image(qsd_image, 256 << 10, 4096, 2, 0)


# --- a back-end that lies --------------------------------------------------------------------

HEADER = struct.Struct("<IIQ")


class FlippingRamDisk(Device):
    """A RAM disk that flips one byte of every read of sector ``bad_sector``."""

    device_id = 2
    num_queues = 1
    queue_size = 256
    device_features = 1 << vf.BLK_F_FLUSH

    def __init__(self, size: int, bad_sector: int) -> None:
        self.disk = bytearray(size)
        self.bad_sector = bad_sector

    def config_bytes(self) -> bytes:
        return struct.pack("<QII", len(self.disk) // 512, 0, 0).ljust(60, b"\0")

    def handle_chain(self, index: int, chain: DescriptorChain, mem: GuestMemory) -> int:
        rtype, _, sector = HEADER.unpack(chain.read_at(0, 16))
        off = sector * 512
        if rtype == 1:  # OUT
            data = chain.read_at(16, chain.read_len - 16)
            self.disk[off : off + len(data)] = data
            return chain.write_at(0, b"\0")
        if rtype == 0:  # IN
            n = chain.write_len - 1
            buf = bytearray(self.disk[off : off + n])
            if off <= self.bad_sector * 512 < off + n:
                buf[self.bad_sector * 512 - off + 100] ^= 0x01
            return chain.write_at(0, bytes(buf) + b"\0")
        if rtype == 8:  # GET_ID
            return chain.write_at(0, b"flipper".ljust(20, b"\0") + b"\0")
        if rtype == 4:  # FLUSH
            return chain.write_at(0, b"\0")
        return chain.write_at(chain.write_len - 1, b"\2")  # UNSUPP


@pytest.fixture
def flipper(peer_dir: Path) -> Iterator[Path]:
    sock = peer_dir / "flip.sock"
    with Daemon(FlippingRamDisk(4 << 20, bad_sector=24), sock).run_in_thread():
        yield sock


def test_corrupted_read_fails_the_exercise(
    flipper: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["exercise", "blk", "--socket", str(flipper), "--seconds", "0.2", "--json"]
    argv += ["--region", "64K", "--quiet", "--passes", "2"]
    rc, out, _ = run_cli(argv, capsys)
    result = json.loads(out)
    assert rc == 1
    assert result["errors"] > 0 and result["ok"] is False
    assert result["id"] == "flipper"
    detail = result["error_details"][0]
    assert "block 3" in detail and "corrupted" in detail  # sector 24 = block 3 of 4 KiB


def test_stale_data_is_detected() -> None:
    """A block holding the previous pass's data is reported as stale, not as garbage."""
    from pyvhost.cli.exercise import describe_mismatch

    old = pattern(4096, 1, 7)
    assert check_block(old, 4096, 7) == 1
    assert "stale" in describe_mismatch(old, 4096, 2, 7)
    assert "misplaced" in describe_mismatch(pattern(4096, 2, 8), 4096, 2, 7)
    with pytest.raises(ValueError, match="no pattern header"):
        check_block(bytes(4096), 4096, 7)
    assert pattern(4096, 1, 7) != pattern(4096, 2, 7) != pattern(4096, 2, 8)
