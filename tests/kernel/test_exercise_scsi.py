"""`pyvhost exercise scsi --kernel /dev/vhost-scsi` in the test guest (or directly on a host with
vhost-scsi, LIO and rtslib) against a LIO fileio LUN (made with tests/peers/lio.py): the commands
go through rings this process owns and the kernel's vhost-scsi, and the written blocks are found
in the backing file afterwards.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from peers import lio
from peers.kernel_runner import CLI_IN_PROCESS, KernelRunner
from pyvhost.cli.exercise_scsi import pattern

pytestmark = [pytest.mark.kernel, pytest.mark.guest]

IOS = 40
WRONG_WWPN = "naa.5001405deadbeef0"

SCRIPT = CLI_IN_PROCESS + textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, os.environ["PYGUEST_FILES"])
    import lio

    ios = sys.argv[1]
    out = {"fds_before": len(os.listdir("/proc/self/fd"))}

    def run(name, *extra):
        out[name] = pyvhost("exercise", "scsi", "--kernel", "/dev/vhost-scsi", *extra)

    with lio.vhost_target(size_mib=8) as target:
        run("json", "--wwpn", target.wwpn, "--ios", ios, "--json")
        run("odd", "--wwpn", target.wwpn, "--ios", "3", "--block-size", "1536",
            "--start-lba", "3000", "--json")
        run("text", "--wwpn", target.wwpn, "--ios", "2")
        run("wrong-wwpn", "--wwpn", sys.argv[2])
        run("bad-block-size", "--wwpn", target.wwpn, "--block-size", "1000")
        # The backing file, read directly: every unit written holds its pattern.
        from pyvhost.cli.exercise_scsi import pattern
        with open(target.backing, "rb") as f:
            backing = f.read()
        for name, size in (("json", 4096), ("odd", 1536)):
            lbas = json.loads(out[name]["stdout"] or "{}").get("written_lbas", [])
            bad = [l for l in lbas if backing[l * 512 : l * 512 + size] != pattern(l, size)]
            out[name]["in_backing"] = {"checked": len(lbas), "differ": bad}
    out["leftovers"] = lio.leftovers()
    out["fds_after"] = len(os.listdir("/proc/self/fd"))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def runs(kernel_runner: KernelRunner) -> dict[str, Any]:
    result = kernel_runner.run(
        SCRIPT,
        timeout=300,
        argv=[str(IOS), WRONG_WWPN],
        files={lio.GUEST_NAME: Path(lio.__file__)},
        modules=lio.MODULES,
        imports=lio.IMPORTS,
    ).check()
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def _report(runs: dict[str, Any], name: str) -> dict[str, Any]:
    run = runs[name]
    assert run["rc"] == 0, f"{name}: exit {run['rc']}\n{run['stdout']}\n{run['stderr']}"
    report: dict[str, Any] = json.loads(run["stdout"])
    return report


def test_every_command_succeeds_and_reads_back(runs: dict[str, Any]) -> None:
    report = _report(runs, "json")
    assert report["ok"] is True and report["errors"] == 0, report["error_details"]
    # TUR (one or more), INQUIRY, READ CAPACITY(16), REPORT LUNS, WRITE/READ(10), the loop,
    # SYNCHRONIZE CACHE.
    assert report["commands"] >= 1 + 3 + 2 + 2 * IOS + 1
    assert report["iops"] > 0
    assert report["vendor"] == "LIO-ORG"
    assert report["logical_block_size"] == 512
    assert report["last_lba"] == (8 << 20) // 512 - 1
    assert report["luns"] == [0]


def test_written_blocks_are_in_the_backing_file(runs: dict[str, Any]) -> None:
    for name, units in (("json", IOS + 1), ("odd", 3 + 1)):
        _report(runs, name)
        found = runs[name]["in_backing"]
        assert found == {"checked": units, "differ": []}, name


def test_the_pattern_names_its_lba() -> None:
    assert pattern(7, 4096)[:16] == b"PVHXSCSI" + (7).to_bytes(8, "little")
    assert pattern(7, 4096) != pattern(8, 4096)
    assert len(pattern(3, 1536)) == 1536


def test_text_report(runs: dict[str, Any]) -> None:
    run = runs["text"]
    assert run["rc"] == 0, run
    assert "LIO-ORG" in run["stdout"] and run["stdout"].rstrip().endswith("OK")


def test_a_wrong_wwpn_is_one_clear_line(runs: dict[str, Any]) -> None:
    run = runs["wrong-wwpn"]
    assert run["rc"] == 1
    assert "VHOST_SCSI_SET_ENDPOINT on /dev/vhost-scsi: ENODEV" in run["stderr"]
    assert "Traceback" not in run["stderr"]


def test_a_block_size_the_lun_cannot_take(runs: dict[str, Any]) -> None:
    run = runs["bad-block-size"]
    assert run["rc"] == 1
    assert "--block-size 1000 is not a multiple of the LUN's 512-byte blocks" in run["stderr"]


def test_nothing_left_behind(runs: dict[str, Any]) -> None:
    assert runs["leftovers"] == []
    assert runs["fds_after"] == runs["fds_before"]
