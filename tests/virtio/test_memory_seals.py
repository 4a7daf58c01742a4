"""Front-end fds checked at mapping time: big enough for the mapping, sealed against shrinking."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from pyvhost.errors import GuestMemoryError
from pyvhost.virtio import memory as memory_mod
from pyvhost.virtio.memory import PAGE_SIZE, DirtyLog, GuestMemory, RegionSpec

MiB = 1 << 20
LOGGER = "pyvhost.virtio.memory"


def memfd(size: int, *, sealed: bool = False) -> int:
    fd = os.memfd_create("front-end-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


@pytest.fixture
def fresh_warnings() -> Iterator[None]:
    """Forget which regions were warned about, so each test sees its own warnings."""
    memory_mod._warned_unsealed.clear()
    yield
    memory_mod._warned_unsealed.clear()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_file_smaller_than_offset_plus_size_is_refused(no_fd_leak: None) -> None:
    fd = memfd(2 * PAGE_SIZE, sealed=True)
    try:
        with GuestMemory() as mem:
            with pytest.raises(GuestMemoryError) as info:
                mem.add_region(fd, PAGE_SIZE, 2 * PAGE_SIZE, 0x10000, 0x7000_0000_0000)
            message = str(info.value)
            assert "memory region gpa 0x10000 size 0x2000" in message
            assert "the file is 0x2000 bytes" in message
            assert "mmap_offset 0x1000 + size 0x2000 = 0x3000" in message
            assert len(mem) == 0
            with pytest.raises(GuestMemoryError, match="smaller than mmap_offset"):
                mem.replace([RegionSpec(fd, 0, 4 * PAGE_SIZE, 0, 0x7000_0000_0000)])
            mem.add_region(fd, PAGE_SIZE, PAGE_SIZE, 0x10000, 0x7000_0000_0000)  # fits exactly
            assert len(mem) == 1
        with pytest.raises(GuestMemoryError, match=r"dirty log: .* the file is 0x2000 bytes"):
            DirtyLog(fd, 16, offset=2 * PAGE_SIZE - 8)
    finally:
        os.close(fd)


def test_sealed_memfd_is_accepted_without_a_warning(
    no_fd_leak: None, fresh_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    fd = memfd(MiB, sealed=True)
    try:
        with (
            caplog.at_level(logging.WARNING, logger=LOGGER),
            GuestMemory(require_sealed=True) as mem,
        ):
            mem.add_region(fd, 0, MiB, 0, 0x7000_0000_0000)
            mem.write(0x10, b"sealed")
            log = DirtyLog(fd, 64, offset=MiB - 64, require_sealed=True)
            log.close()
        assert _warnings(caplog) == []
    finally:
        os.close(fd)


def test_unsealed_memfd_is_warned_about_once_per_region(
    no_fd_leak: None, fresh_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    fd = memfd(2 * MiB)
    spec = RegionSpec(fd, 0, MiB, 0, 0x7000_0000_0000)
    other = RegionSpec(fd, MiB, MiB, 4 * MiB, 0x7000_1000_0000)
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER), GuestMemory([spec]) as mem:
            mem.replace([spec])  # SET_MEM_TABLE again with the same region: no second warning
            (first,) = _warnings(caplog)
            assert "memory region gpa 0x0 size 0x100000" in first
            assert "no F_SEAL_SHRINK" in first
            assert "SIGBUS" in first
            mem.replace([spec, other])  # a new region: its own warning
            assert len(_warnings(caplog)) == 2
            assert "gpa 0x400000" in _warnings(caplog)[1]
            assert mem.read(4 * MiB, 1) == b"\0"  # accepted all the same
    finally:
        os.close(fd)


@pytest.fixture
def unsealable_file() -> Iterator[int]:
    """A 1 MiB file on a file system without seals (F_GET_SEALS answers EINVAL)."""
    for directory in ("/var/tmp", tempfile.gettempdir()):
        with tempfile.TemporaryFile(dir=directory) as f:
            try:
                fcntl.fcntl(f.fileno(), fcntl.F_GET_SEALS)
            except OSError:
                f.truncate(MiB)
                yield f.fileno()
                return
    pytest.skip("every temporary directory here is on tmpfs, which has seals")


def test_a_file_that_cannot_be_sealed_is_warned_about(
    no_fd_leak: None,
    fresh_warnings: None,
    caplog: pytest.LogCaptureFixture,
    unsealable_file: int,
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER), GuestMemory() as mem:
        mem.add_region(unsealable_file, 0, MiB, 0, 0x7000_0000_0000)
    (warning,) = _warnings(caplog)
    assert "its file system has no seals" in warning


def test_require_sealed_refuses_unsealed_fds(no_fd_leak: None) -> None:
    fd = memfd(MiB)
    try:
        with GuestMemory(require_sealed=True) as mem:
            with pytest.raises(GuestMemoryError) as info:
                mem.add_region(fd, 0, MiB, 0, 0x7000_0000_0000)
            assert "memory region gpa 0x0 size 0x100000" in str(info.value)
            assert "refused, sealed memory is required" in str(info.value)
            with pytest.raises(GuestMemoryError, match="sealed memory is required"):
                mem.replace([RegionSpec(fd, 0, MiB, 0, 0x7000_0000_0000)])
            assert len(mem) == 0
        with pytest.raises(GuestMemoryError, match=r"dirty log: .* sealed memory is required"):
            DirtyLog(fd, 64, require_sealed=True)
    finally:
        os.close(fd)


def test_require_sealed_refuses_files_that_can_never_be_sealed(
    no_fd_leak: None, unsealable_file: int
) -> None:
    no_sealing = os.memfd_create("no-sealing", os.MFD_CLOEXEC)  # seals F_SEAL_SEAL, as tmpfs
    try:
        os.ftruncate(no_sealing, MiB)
        for fd, why in ((unsealable_file, "has no seals"), (no_sealing, "no F_SEAL_SHRINK")):
            with pytest.raises(GuestMemoryError, match=why):
                GuestMemory([RegionSpec(fd, 0, MiB, 0, 0x1000)], require_sealed=True)
    finally:
        os.close(no_sealing)


def test_process_default_applies_to_objects_without_an_explicit_choice(no_fd_leak: None) -> None:
    fd = memfd(MiB)
    try:
        memory_mod.set_require_sealed_default(True)
        try:
            assert GuestMemory().require_sealed
            with pytest.raises(GuestMemoryError, match="sealed memory is required"):
                GuestMemory([RegionSpec(fd, 0, MiB, 0, 0x1000)])
            with pytest.raises(GuestMemoryError, match="sealed memory is required"):
                DirtyLog(fd, 64)
            with GuestMemory([RegionSpec(fd, 0, MiB, 0, 0x1000)], require_sealed=False) as mem:
                assert len(mem) == 1
        finally:
            memory_mod.set_require_sealed_default(False)
        assert not GuestMemory().require_sealed
    finally:
        os.close(fd)


def test_memory_we_create_is_sealed(no_fd_leak: None) -> None:
    with GuestMemory.anonymous(MiB) as mem:
        fd = mem.regions[0].fd
        assert fd is not None
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(fd, PAGE_SIZE)
        with GuestMemory([mem.regions[0].spec()], require_sealed=True) as backend:
            assert len(backend) == 1
    log, log_fd = DirtyLog.anonymous(64)
    try:
        assert fcntl.fcntl(log_fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    finally:
        log.close()
        os.close(log_fd)


SHRUNK_CHILD = r"""
import os, sys
from pyvhost.virtio.memory import GuestMemory, RegionSpec
fd = int(sys.argv[1])
mem = GuestMemory([RegionSpec(fd, 0, 1 << 20, 0, 0x1000)])
os.ftruncate(fd, 4096)  # the front-end shrinks the file after we mapped it
print("shrunk", flush=True)
mem.read(1 << 19, 1)
print("survived", flush=True)
"""


def test_a_shrink_after_mapping_still_kills_with_sigbus() -> None:
    """What the checks cannot prevent (so docs/memory-safety.md says it): only a seal does."""
    fd = memfd(MiB)
    try:
        proc = subprocess.run(
            ["timeout", "30", sys.executable, "-c", SHRUNK_CHILD, str(fd)],
            pass_fds=(fd,),
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        os.close(fd)
    assert proc.stdout == "shrunk\n"
    assert proc.returncode == -signal.SIGBUS
