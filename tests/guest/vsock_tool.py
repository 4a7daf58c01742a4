"""The guest's AF_VSOCK program (vsock_tool.c), built once with ``gcc -static`` and handed to the
busybox guest through fw_cfg.

Why a C helper: busybox has no vsock client and the initramfs has no Python; a static executable
needs nothing from the initramfs, does not change it (its content hash, its cache) and is read in
the guest with one ``cat`` from ``/sys/firmware/qemu_fw_cfg``. socat is not on the host as a
static binary, and a dynamic one would need its libraries copied in.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from peers.guest import GuestUnavailableError, cache_dir

SOURCE = Path(__file__).with_name("vsock_tool.c")
FW_CFG_NAME = "pyvhost-vsock-tool"
FETCH = (
    f"cat /sys/firmware/qemu_fw_cfg/by_name/opt/{FW_CFG_NAME}/raw >/tmp/vsock_tool\n"
    "chmod +x /tmp/vsock_tool\n"
)
"""Shell lines that put the tool at /tmp/vsock_tool in the guest."""


def build_vsock_tool(cache: Path | None = None) -> Path:
    """The static executable, compiled into the guest cache under the source's hash."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = (cache or cache_dir()) / "vsock_tool" / digest / "vsock_tool"
    if target.exists():
        return target
    gcc = shutil.which("gcc")
    if gcc is None:
        raise GuestUnavailableError("gcc not installed: apt-get install gcc")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}")
    argv = [gcc, "-static", "-O2", "-Wall", "-Werror", "-s", "-o", str(tmp), str(SOURCE)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestUnavailableError(
            f"{' '.join(argv)} failed (static libc: libc6-dev):\n{proc.stderr}"
        )
    os.rename(tmp, target)
    return target
