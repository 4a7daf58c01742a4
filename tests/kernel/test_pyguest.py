"""The Python guest harness: kernel vhost from Python in the guest, failures and hangs reported.

The feature values are those GUEST.md records for the Debian 6.1 cloud kernel.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from peers.guest import Kernel
from peers.pyguest import (
    PyGuestAssets,
    PyGuestError,
    PyGuestTimeoutError,
    image_key,
    parse_apt_sources,
    run_in_guest,
    stage_work_tree,
)
from pyvhost.kernel import Ioctl

VHOST_NET_FEATURES = 0x000000033D008000
VHOST_VSOCK_FEATURES = 0x000000033D000002

guest = pytest.mark.guest
kernel = pytest.mark.kernel


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


VHOST_GET_FEATURES = _ioc(2, 0xAF, 0x00, 8)  # _IOR(VHOST_VIRTIO, 0x00, __u64)
VHOST_SET_OWNER = _ioc(0, 0xAF, 0x01, 0)  # _IO(VHOST_VIRTIO, 0x01)

VHOST_SCRIPT = textwrap.dedent(
    f"""
    import errno, fcntl, json, os, struct

    out = {{}}
    for path in ("/dev/vhost-net", "/dev/vhost-vsock"):
        fd = os.open(path, os.O_RDWR)
        try:
            buf = bytearray(8)
            fcntl.ioctl(fd, {VHOST_GET_FEATURES:#x}, buf, True)
            entry = {{"features": struct.unpack("<Q", buf)[0]}}
            fcntl.ioctl(fd, {VHOST_SET_OWNER:#x})
            try:
                fcntl.ioctl(fd, {VHOST_SET_OWNER:#x})
                entry["second_owner"] = "accepted"
            except OSError as e:
                entry["second_owner"] = errno.errorcode[e.errno]
        finally:
            os.close(fd)
        out[path] = entry
    print(json.dumps(out))
    """
)


def test_ioctl_numbers_match_pyvhost() -> None:
    assert VHOST_GET_FEATURES == int(Ioctl.GET_FEATURES) == 0x8008AF00
    assert VHOST_SET_OWNER == int(Ioctl.SET_OWNER) == 0xAF01


def test_parse_apt_sources_picks_the_suite_main_mirror() -> None:
    deb822 = textwrap.dedent(
        """\
        Types: deb
        URIs: http://deb.debian.org/debian-security
        Suites: bookworm-security
        Components: main

        Types: deb-src deb
        # a comment
        URIs: http://mirror.example/debian http://other.example/debian
        Suites: bookworm bookworm-updates
        Components: main contrib
        """
    )
    one_line = "deb [arch=amd64 signed-by=/k.gpg] https://ftp.example/debian bookworm main\n"
    assert parse_apt_sources([("debian.sources", deb822)]) == "http://mirror.example/debian"
    assert parse_apt_sources([("a.list", "# none\n"), ("b.list", one_line)]) == (
        "https://ftp.example/debian"
    )
    other = "deb http://x.example/debian bullseye main\ndeb http://y.example bookworm contrib\n"
    assert parse_apt_sources([("c.list", other)]) is None
    disabled = deb822.replace("Components: main contrib", "Components: main\nEnabled: no")
    assert parse_apt_sources([("d.sources", disabled)]) is None


def test_image_key_follows_the_kernel() -> None:
    def kernel(name: str) -> Kernel:
        return Kernel("6.1.0-1-cloud-amd64", Path("/k/vmlinuz"), Path("/cache/kernel") / name)

    assert image_key(kernel("6.1.0-1_6.1.1-1")) == image_key(kernel("6.1.0-1_6.1.1-1"))
    assert image_key(kernel("6.1.0-1_6.1.1-1")) != image_key(kernel("6.1.0-1_6.1.1-2"))


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/../../b", ""])
def test_files_must_stay_inside_the_work_tree(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="must be relative"):
        stage_work_tree(tmp_path / "stage", "pass", {name: b"x"}, {})


@guest
@kernel
def test_vhost_net_and_vsock_in_the_guest(pyguest: PyGuestAssets) -> None:
    """GET_FEATURES as GUEST.md recorded, SET_OWNER once, then EBUSY: standard library only."""
    result = run_in_guest(VHOST_SCRIPT, timeout=120, assets=pyguest).check()
    found = json.loads(result.stdout)
    assert found == {
        "/dev/vhost-net": {"features": VHOST_NET_FEATURES, "second_owner": "EBUSY"},
        "/dev/vhost-vsock": {"features": VHOST_VSOCK_FEATURES, "second_owner": "EBUSY"},
    }
    assert result.status["kernel"] == pyguest.kernel_version


@guest
@kernel
def test_pyvhost_source_files_and_modules_in_the_guest(
    pyguest: PyGuestAssets, tmp_path: Path
) -> None:
    """The delivered src/pyvhost imports; files go in and out; modprobe finds vhost_scsi."""
    host_file = tmp_path / "blob.bin"
    host_file.write_bytes(bytes(range(256)) * 3)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "note.txt").write_text("in a folder\n")
    script = textwrap.dedent(
        """
        import hashlib, json, os, pathlib, sys
        import pytest, pyvhost, pyvhost.kernel
        out = pathlib.Path(os.environ["PYGUEST_OUT"])
        (out / "nested").mkdir()
        (out / "nested" / "echo.bin").write_bytes(pathlib.Path("blob.bin").read_bytes()[::-1])
        print(json.dumps({
            "pyvhost": pyvhost.__file__,
            "pytest": pytest.__version__,
            "cwd": os.getcwd(),
            "inline": pathlib.Path("deep/inline.txt").read_text(),
            "folder": pathlib.Path("tree/sub/note.txt").read_text(),
            "argv": sys.argv[1:],
            "env": os.environ.get("PYGUEST_TEST_VALUE"),
            "vhost_scsi": os.path.exists("/dev/vhost-scsi"),
            "target": os.path.isdir("/sys/kernel/config/target/core"),
            "modules": sorted(l.split()[0] for l in open("/proc/modules")),
        }))
        print("to stderr", file=sys.stderr)
        """
    )
    result = run_in_guest(
        script,
        timeout=120,
        assets=pyguest,
        files={"blob.bin": host_file, "deep/inline.txt": b"inline\n", "tree": folder},
        modules=("vhost_scsi", "target_core_file"),
        env={"PYGUEST_TEST_VALUE": "42"},
        argv=("one", "two"),
    ).check()
    found = json.loads(result.stdout)
    assert found["pyvhost"] == "/pyguest/src/pyvhost/__init__.py"
    assert found["pytest"].split(".")[0].isdigit()
    assert found["cwd"] == "/pyguest/files"
    assert (found["inline"], found["folder"]) == ("inline\n", "in a folder\n")
    assert (found["argv"], found["env"]) == (["one", "two"], "42")
    assert found["vhost_scsi"] and found["target"]
    assert {"vhost_scsi", "target_core_mod", "target_core_file", "configfs"} <= set(
        found["modules"]
    )
    assert result.stderr == "to stderr\n"
    assert result.files_out == {"nested/echo.bin": host_file.read_bytes()[::-1]}


@guest
@kernel
def test_a_failing_script_reports_status_and_traceback(pyguest: PyGuestAssets) -> None:
    script = "print('before the failure')\nraise ValueError('broken in the guest')\n"
    result = run_in_guest(script, timeout=120, assets=pyguest)
    assert result.returncode == 1
    assert result.stdout == "before the failure\n"
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert 'File "/pyguest/main.py", line 2' in result.stderr
    assert result.stderr.endswith("ValueError: broken in the guest\n")
    with pytest.raises(PyGuestError, match="exited with 1") as caught:
        result.check()
    assert "ValueError: broken in the guest" in str(caught.value)


@guest
@kernel
def test_a_hanging_script_is_killed_at_the_timeout(pyguest: PyGuestAssets) -> None:
    script = "import time\nprint('about to hang', flush=True)\ntime.sleep(3600)\n"
    started = time.monotonic()
    with pytest.raises(PyGuestTimeoutError) as caught:
        run_in_guest(script, timeout=12, assets=pyguest)  # the guest boots in about 4 s
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "did not finish within 12 s" in message
    assert "console (tail):" in message
    assert "| about to hang" in message
    assert 12 <= elapsed < 37


@guest
@kernel
def test_a_module_that_does_not_load_is_a_clear_error(pyguest: PyGuestAssets) -> None:
    with pytest.raises(PyGuestError, match="failed before the script ran") as caught:
        run_in_guest("print('never')", timeout=120, assets=pyguest, modules=("no_such_mod",))
    assert "modprobe no_such_mod failed" in str(caught.value)
    assert "never" not in str(caught.value)
