"""Run inside the test guest by test_vhost_scsi.py: /dev/vhost-scsi endpoint handling against a
LIO target made with tests/peers/lio.py. Prints one JSON object, one entry per step; a step that
raises records the error instead, so one failure does not hide the others.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.environ["PYGUEST_FILES"])

import lio  # type: ignore[import-not-found]  # from $PYGUEST_FILES in the guest

from pyvhost.kernel import KernelVhostError, VhostScsi

WRONG_WWPN = "naa.5001405deadbeef0"


def open_fds() -> list[str]:
    """This process's open file descriptors."""
    return sorted(os.listdir("/proc/self/fd"), key=int)


def ready() -> VhostScsi:
    """A device that may attach: owned, with an (empty) memory table."""
    dev = VhostScsi()
    dev.set_owner()
    dev.set_mem_table([])
    return dev


def outcome(call: Callable[[], object]) -> dict[str, Any]:
    """What ``call`` did: its value, or the KernelVhostError's text and errno."""
    try:
        return {"value": call()}
    except KernelVhostError as e:
        return {"error": str(e), "errno": e.errno}


def abi(target: lio.LioTarget) -> dict[str, Any]:
    """GET_ABI_VERSION and GET_FEATURES on a device that has no owner yet."""
    with VhostScsi() as dev:
        return {"abi": dev.get_abi_version(), "features": dev.get_features()}


def attach(target: lio.LioTarget) -> dict[str, Any]:
    """Attach, try a second device (the TPG is taken), detach, then the second one gets it."""
    with ready() as dev, ready() as other:
        dev.set_endpoint(target.wwpn, target.tpgt)
        taken = outcome(lambda: other.set_endpoint(target.wwpn, target.tpgt))
        dev.clear_endpoint(target.wwpn, target.tpgt)
        after_clear = outcome(lambda: other.set_endpoint(target.wwpn, target.tpgt))
        clear_twice = [
            outcome(lambda: dev.clear_endpoint(target.wwpn, target.tpgt)) for _ in range(2)
        ]
        return {"taken": taken, "after_clear": after_clear, "clear_detached": clear_twice}


def wrong_wwpn(target: lio.LioTarget) -> dict[str, Any]:
    """SET_ENDPOINT to a WWPN no target has."""
    with ready() as dev:
        return outcome(lambda: dev.set_endpoint(WRONG_WWPN, target.tpgt))


def twice(target: lio.LioTarget) -> dict[str, Any]:
    """A second SET_ENDPOINT while attached; CLEAR_ENDPOINT naming another WWPN."""
    with ready() as dev:
        dev.set_endpoint(target.wwpn, target.tpgt)
        return {
            "again": outcome(lambda: dev.set_endpoint(target.wwpn, target.tpgt)),
            "other_tpgt": outcome(lambda: dev.set_endpoint(target.wwpn, target.tpgt + 1)),
            "clear_other_wwpn": outcome(lambda: dev.clear_endpoint(WRONG_WWPN, target.tpgt)),
        }


def unready(target: lio.LioTarget) -> dict[str, Any]:
    """SET_ENDPOINT before SET_OWNER, and after it without a memory table."""
    with VhostScsi() as dev:
        no_owner = outcome(lambda: dev.set_endpoint(target.wwpn, target.tpgt))
        dev.set_owner()
        no_table = outcome(lambda: dev.set_endpoint(target.wwpn, target.tpgt))
    return {"no_owner": no_owner, "no_table": no_table}


def events_missed(target: lio.LioTarget) -> list[bool]:
    """GET, SET true, GET, SET false, GET of the events-missed flag."""
    with ready() as dev:
        seen = [dev.get_events_missed()]
        for value in (True, False):
            dev.set_events_missed(value)
            seen.append(dev.get_events_missed())
        return seen


def close_detaches(target: lio.LioTarget) -> dict[str, Any]:
    """Closing an attached device releases the TPG; fds counted before and after."""
    before = open_fds()
    for _ in range(3):
        dev = ready()
        dev.set_endpoint(target.wwpn, target.tpgt)
        dev.close()
    with ready() as dev:
        reattach = outcome(lambda: dev.set_endpoint(target.wwpn, target.tpgt))
    return {"before": before, "after": open_fds(), "reattach": reattach}


STEPS: tuple[Callable[[lio.LioTarget], object], ...] = (
    abi,
    attach,
    wrong_wwpn,
    twice,
    unready,
    events_missed,
    close_detaches,
)


def main() -> None:
    """Every step against one target; then the teardown and what it left."""
    record: dict[str, Any] = {"fds_at_start": open_fds()}
    target = lio.create_target(size_mib=int(os.environ.get("LIO_SIZE_MIB", "16")))
    record["target"] = {"wwpn": target.wwpn, "tpgt": target.tpgt, "nexus": target.nexus}
    record["configfs_lun"] = sorted(p.name for p in (target.tpg_path / "lun").iterdir())
    for step in STEPS:
        try:
            record[step.__name__] = step(target)
        except Exception:
            record[step.__name__] = {"crashed": traceback.format_exc()}
    target.delete()
    record["leftovers"] = lio.leftovers()
    record["backing_exists"] = target.backing.exists()
    record["fds_at_end"] = open_fds()
    print(json.dumps(record))


if __name__ == "__main__":
    main()
