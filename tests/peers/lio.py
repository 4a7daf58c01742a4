"""A LIO vhost-scsi target for kernel-vhost test scripts (tests/peers/kernel_runner.py).

Run by a test script, in the guest or directly on a host (where LIO's configuration is the whole
host's): it needs configfs, the modules ``target_core_mod``, ``target_core_file`` and
``vhost_scsi`` (:data:`MODULES`, loaded by the runner before the script) and Debian's
``python3-rtslib-fb`` (the library targetcli is built on; :data:`IMPORTS`).
:func:`create_target` makes a fileio backstore on a sparse file of N MiB, a vhost target with an
``naa.`` WWPN, a portal group (TPG tag) with its I_T nexus and one LUN; :meth:`LioTarget.delete`
(or the :func:`vhost_target` context) takes all of it down again. A script imports this
file from ``$PYGUEST_FILES`` after passing it in ``files=`` (see :data:`GUEST_NAME`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODULES: tuple[str, ...] = ("target_core_mod", "target_core_file", "vhost_scsi")
"""For the runner's ``modules=``. A chroot without module autoloading needs the backstore's
module loaded by hand (GUEST.md). rtslib would load the fabric itself as ``tcm_vhost`` (the
driver's old name, still an alias of vhost_scsi in 6.1), but loading it up front is simpler."""
IMPORTS: tuple[str, ...] = ("rtslib_fb",)
"""For ``run_kernel_script(imports=...)``: a script using this file runs directly only where the
interpreter finds rtslib."""
GUEST_NAME = "lio.py"
"""The name to give this file in the runner's ``files=``."""
CONFIGFS = Path("/sys/kernel/config/target")
DEFAULT_WWPN = "naa.5001405c0ffee000"
"""rtslib accepts ``naa.`` + 16 hex digits starting with 1, 2 or 5 (it rewrites ``naa.6``)."""
MIB = 1 << 20
DBROOT = Path("/etc/rtslib-fb-target")
"""rtslib points LIO's ``dbroot`` here and fails when the folder is missing, as it is in an
image without targetcli (the kernel refuses a ``dbroot`` that is not a folder)."""


@dataclass
class LioTarget:
    """A LIO vhost target made by :func:`create_target`: what a vhost-scsi driver attaches to."""

    wwpn: str
    tpgt: int
    lun: int
    backing: Path
    size: int
    nexus: str
    _objects: list[Any] = field(default_factory=list, repr=False)

    @property
    def tpg_path(self) -> Path:
        """The portal group's configfs folder."""
        return CONFIGFS / "vhost" / self.wwpn / f"tpgt_{self.tpgt}"

    def delete(self) -> None:
        """Remove LUN, TPG, target and backstore (innermost first) and the backing file.

        A TPG that a vhost device is attached to cannot be removed: rtslib then fails with
        EBUSY after it has already removed the LUN. Clear the endpoint (or close the device)
        first; a failed call can be repeated, it resumes where it stopped.
        """
        while self._objects:
            self._objects[-1].delete()
            self._objects.pop()
        self.backing.unlink(missing_ok=True)


def create_target(
    *,
    wwpn: str = DEFAULT_WWPN,
    tpgt: int = 1,
    lun: int = 0,
    size_mib: int = 16,
    backing: Path | None = None,
    name: str = "pyvhost0",
) -> LioTarget:
    """A fileio backstore ``name`` on a sparse file of ``size_mib`` MiB, exported as LUN ``lun``
    of portal group ``tpgt`` of the vhost target ``wwpn``; on failure, nothing is left.

    rtslib gives a new vhost TPG its I_T nexus (a random ``naa.`` initiator name), without
    which the fabric answers no command; :attr:`LioTarget.nexus` says which.
    """
    from rtslib_fb import (  # type: ignore[import-not-found]  # guest-only, untyped (Debian)
        LUN,
        TPG,
        FabricModule,
        FileIOStorageObject,
        RTSRoot,
        Target,
    )

    DBROOT.mkdir(parents=True, exist_ok=True)
    RTSRoot()
    path = backing or Path("/tmp/lio") / f"{name}.img"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
    target = LioTarget(wwpn, tpgt, lun, path, size_mib * MIB, "")
    try:
        storage = FileIOStorageObject(name, str(path), size_mib * MIB)
        target._objects.append(storage)
        fabric_target = Target(FabricModule("vhost"), wwpn, mode="create")
        target._objects.append(fabric_target)
        tpg = TPG(fabric_target, tpgt, mode="create")
        target._objects.append(tpg)
        target.nexus = tpg.nexus
        target._objects.append(LUN(tpg, lun, storage))
    except BaseException:
        target.delete()
        raise
    return target


@contextlib.contextmanager
def vhost_target(**kwargs: Any) -> Iterator[LioTarget]:
    """:func:`create_target` for the duration of a ``with`` block."""
    target = create_target(**kwargs)
    try:
        yield target
    finally:
        target.delete()


def leftovers() -> list[str]:
    """What is left in LIO's configfs: vhost targets and backstores (empty after a clean
    teardown). Fabric folders and the always-present ``alua``/``dbroot`` entries do not count."""
    found = []
    vhost = CONFIGFS / "vhost"
    if vhost.is_dir():
        found += [f"vhost/{p.name}" for p in vhost.iterdir() if p.name.startswith("naa.")]
    core = CONFIGFS / "core"
    if core.is_dir():
        for hba in sorted(core.iterdir()):
            if hba.is_dir() and hba.name != "alua":
                found += [f"core/{hba.name}/{p.name}" for p in hba.iterdir() if p.is_dir()]
    return sorted(found)
