"""The host tools the test initramfs carries (e2fsprogs): what goes in, and that the cpio writer's
symlinks unpack as links (read back with the host's cpio, not our own reader)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .guest import _Cpio, host_tool_files, shared_libraries
from .qemu import require


def _interpreter(binary: Path) -> str:
    """PT_INTERP of a 64-bit ELF file: the dynamic loader the kernel starts it with."""
    data = binary.read_bytes()
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        ph = data[phoff + i * phentsize : phoff + (i + 1) * phentsize]
        if int.from_bytes(ph[0:4], "little") == 3:
            offset = int.from_bytes(ph[8:16], "little")
            size = int.from_bytes(ph[32:40], "little")
            return data[offset : offset + size].rstrip(b"\0").decode()
    raise AssertionError(f"{binary}: no PT_INTERP")


def test_e2fsprogs_go_in_with_their_libraries_and_loader() -> None:
    mke2fs = Path(require("mke2fs")).resolve()
    require("e2fsck")
    libraries = shared_libraries([mke2fs])
    assert _interpreter(mke2fs) in libraries
    assert any(Path(lib).name.startswith("libext2fs.so") for lib in libraries)
    assert any(Path(lib).name.startswith("libc.so") for lib in libraries)

    contents, links = host_tool_files()
    files = {name: (data, perm) for name, data, perm in contents}
    assert files["sbin/mke2fs"][0] == mke2fs.read_bytes()
    assert files["sbin/mke2fs"][1] & 0o111
    assert "sbin/e2fsck" in files
    for lib in libraries:
        assert files[lib.lstrip("/")][0] == Path(lib).read_bytes()
    assert files[_interpreter(mke2fs).lstrip("/")][1] & 0o111  # the kernel execs the loader
    assert ("sbin/mkfs.ext4", "mke2fs") in links
    assert ("sbin/fsck.ext4", "e2fsck") in links


def test_cpio_symlinks_unpack_as_links(tmp_path: Path) -> None:
    cpio = require("cpio")
    archive = _Cpio()
    archive.directory("sbin")
    archive.file("sbin/tool", b"#!/bin/sh\n", 0o755)
    archive.symlink("sbin/alias", "tool")
    subprocess.run(
        [cpio, "-idm", "--quiet"],
        input=archive.finish(),
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=30,
    )
    assert (tmp_path / "sbin" / "alias").is_symlink()
    assert (tmp_path / "sbin" / "alias").readlink() == Path("tool")
    assert (tmp_path / "sbin" / "alias").read_bytes() == b"#!/bin/sh\n"
    assert (tmp_path / "sbin" / "tool").stat().st_mode & 0o777 == 0o755
