"""Where kernel-vhost scripts run (tests/peers/kernel_runner.py): the choice between this host and
the guest, with fake hosts; the direct mode itself with scripts that need no vhost, which run on
any Linux host where we are root; what a session says when a forced place is unavailable; and, in
the guest, which has vhost, kernel test modules run there directly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

from peers import kernel_runner
from peers.kernel_runner import (
    MODE_ENV,
    Host,
    KernelRunner,
    KernelTestsUnavailableError,
    choose,
    default_needs,
    direct_problems,
    requested_mode,
    run_direct,
    run_kernel_script,
)
from peers.lio import MODULES as LIO_MODULES
from peers.pyguest import (
    REPO,
    SOURCE,
    PyGuestAssets,
    PyGuestError,
    PyGuestTimeoutError,
    run_in_guest,
)

ASSETS = PyGuestAssets(Path("/k"), Path("/i"), Path("/img"), "6.1.0-test")
NET_MODULES = ("tun", "vhost_net")


def _never() -> NoReturn:
    raise AssertionError("not to be asked")


# --- choosing ------------------------------------------------------------------------------------


def test_auto_runs_directly_without_looking_for_the_guest() -> None:
    assert choose("auto", list, _never).mode == "direct"


def test_auto_falls_back_to_the_guest() -> None:
    choice = choose("auto", lambda: ["/dev/vhost-net missing"], lambda: ASSETS)
    assert (choice.mode, choice.assets) == ("guest", ASSETS)


def test_auto_with_neither_names_both() -> None:
    with pytest.raises(KernelTestsUnavailableError) as caught:
        choose("auto", lambda: ["/dev/vhost-net missing"], lambda: "no pyguest image")
    message = str(caught.value)
    assert not caught.value.forced
    assert "neither in the Python guest (no pyguest image; scripts/fetch-pyguest builds it)" in (
        message
    )
    assert "nor directly on this host (/dev/vhost-net missing; a host kernel with vhost_net" in (
        message
    )


def test_forced_direct_never_falls_back() -> None:
    with pytest.raises(KernelTestsUnavailableError) as caught:
        choose("direct", lambda: ["/dev/vhost-vsock missing"], _never)
    assert caught.value.forced
    assert str(caught.value) == (
        "$PYVHOST_KERNEL_TESTS=direct, but this host cannot run the script: "
        "/dev/vhost-vsock missing"
    )
    assert choose("direct", list, _never).mode == "direct"


def test_forced_guest_does_not_probe_the_host() -> None:
    assert choose("guest", _never, lambda: ASSETS).assets == ASSETS
    with pytest.raises(KernelTestsUnavailableError, match="=guest, but the Python guest") as caught:
        choose("guest", _never, lambda: "qemu-system-x86_64 not found")
    assert caught.value.forced


def test_mode_comes_from_the_environment() -> None:
    assert requested_mode({}) == requested_mode({MODE_ENV: ""}) == "auto"
    assert requested_mode({MODE_ENV: "direct"}) == "direct"
    with pytest.raises(ValueError, match="must be one of auto, guest, direct, not 'host'"):
        requested_mode({MODE_ENV: "host"})
    with pytest.raises(ValueError, match="unknown kernel test mode"):
        choose("host", list, lambda: ASSETS)


def test_runner_hands_an_unavailable_place_to_its_callback() -> None:
    seen: list[KernelTestsUnavailableError] = []

    def unavailable(error: KernelTestsUnavailableError) -> NoReturn:
        seen.append(error)
        raise pytest.skip.Exception("handled")

    runner = KernelRunner(mode="guest", guest=lambda: "no image", unavailable=unavailable)
    with pytest.raises(pytest.skip.Exception, match="handled"):
        runner.run("print()", timeout=5, modules=NET_MODULES)
    assert [e.forced for e in seen] == [True]
    assert "no image" in str(seen[0])


# --- can this host run it directly? (fake hosts) -----------------------------------------------


def fake_host(
    root: Path,
    *,
    devices: tuple[str, ...] = (),
    euid: int = 0,
    release: str = "6.1.0-13-amd64",
    modprobe: Callable[[str], str | None] = lambda _: None,
    which: Callable[[str], str | None] = lambda tool: f"/usr/bin/{tool}",
    netns: str | None = None,
    mounted: list[str] | None = None,
) -> Host:
    """A host rooted at `root` with `devices` (made as empty files) and the given answers."""
    for device in devices:
        path = root / device.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return Host(
        root=root,
        euid=euid,
        release=release,
        modprobe=modprobe,
        mount_configfs=lambda: (mounted if mounted is not None else []).append("configfs"),
        netns=lambda: netns,
        which=which,
    )


def test_every_device_present_as_root(tmp_path: Path) -> None:
    loaded: list[str] = []

    def modprobe(module: str) -> None:
        loaded.append(module)

    host = fake_host(tmp_path, devices=default_needs(NET_MODULES), modprobe=modprobe)
    assert direct_problems(default_needs(NET_MODULES), modules=NET_MODULES, host=host) == []
    assert loaded == list(NET_MODULES), "modules are loaded before the devices are looked for"


def test_a_missing_device_says_what_modprobe_said(tmp_path: Path) -> None:
    def modprobe(module: str) -> str | None:
        return "FATAL: Module vhost_net not found" if module == "vhost_net" else None

    host = fake_host(tmp_path, devices=("/dev/net/tun",), modprobe=modprobe)
    assert direct_problems(default_needs(NET_MODULES), modules=NET_MODULES, host=host) == [
        "/dev/vhost-net missing (modprobe vhost_net: FATAL: Module vhost_net not found)"
    ]


def test_a_failed_modprobe_is_no_problem_when_the_device_is_there(tmp_path: Path) -> None:
    """Built-in drivers: modprobe fails, the device exists."""
    host = fake_host(tmp_path, devices=("/dev/vhost-vsock",), modprobe=lambda _: "not found")
    assert direct_problems(("/dev/vhost-vsock",), modules=("vhost_vsock",), host=host) == []


def test_not_root_and_missing_tools(tmp_path: Path) -> None:
    needs = ("/dev/vhost-net",)
    host = fake_host(tmp_path, devices=needs, euid=1000)
    assert direct_problems(needs, host=host) == [
        "not root (vhost devices and network namespaces need root)"
    ]
    host = fake_host(tmp_path, devices=needs, which=lambda _: None)
    assert direct_problems(needs, host=host) == [
        "unshare and ip not found (apt-get install util-linux iproute2)"
    ]
    host = fake_host(tmp_path, devices=needs, netns="no private network namespace: EPERM")
    assert direct_problems(needs, host=host) == ["no private network namespace: EPERM"]


def test_kernel_release_and_imports(tmp_path: Path) -> None:
    host = fake_host(tmp_path, release="6.12.0-1-amd64")
    assert direct_problems((), kernel_release="6.12.", imports=("json",), host=host) == []
    assert direct_problems((), kernel_release="6.1.", imports=("no_such_module_x",), host=host) == [
        f"Python module no_such_module_x not found by {sys.executable}",
        "the test expects Linux 6.1.* (as in the guest), this host runs 6.12.0-1-amd64",
    ]


def test_configfs_is_mounted_only_for_lio(tmp_path: Path) -> None:
    mounted: list[str] = []
    host = fake_host(tmp_path, mounted=mounted)
    direct_problems(default_needs(NET_MODULES), modules=NET_MODULES, host=host)
    assert mounted == []
    lio = ("target_core_mod", "target_core_file", "vhost_scsi")
    assert default_needs(lio) == ("/sys/kernel/config/target", "/dev/vhost-scsi")
    problems = direct_problems(default_needs(lio), modules=lio, host=host)
    assert mounted == ["configfs"]
    assert problems == ["/sys/kernel/config/target missing", "/dev/vhost-scsi missing"]


# --- running directly ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def direct() -> None:
    """Skip unless this host can run a script that needs no vhost directly (root, unshare, ip,
    network namespaces)."""
    problems = direct_problems(())
    if problems:
        pytest.skip(f"cannot run scripts directly here: {'; '.join(problems)}")


@pytest.mark.usefixtures("direct")
def test_files_argv_env_and_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVHOST_NOT_FOR_THE_SCRIPT", "1")
    host_file = tmp_path / "blob.bin"
    host_file.write_bytes(bytes(range(256)))
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "note.txt").write_text("in a folder\n")
    script = tmp_path / "probe.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, os, pathlib, sys
            import pyvhost
            out = pathlib.Path(os.environ["PYGUEST_OUT"])
            (out / "nested").mkdir()
            (out / "nested" / "echo.bin").write_bytes(pathlib.Path("blob.bin").read_bytes()[::-1])
            print(json.dumps({
                "pyvhost": pyvhost.__file__,
                "cwd": os.getcwd(),
                "files": os.environ["PYGUEST_FILES"],
                "script": __file__,
                "inline": pathlib.Path("deep/inline.txt").read_text(),
                "folder": pathlib.Path("tree/sub/note.txt").read_text(),
                "argv": sys.argv[1:],
                "env": {k: v for k, v in os.environ.items() if k.startswith("PYVHOST_")},
                "path": os.environ["PATH"],
                "python": sys.executable,
            }))
            print("to stderr", file=sys.stderr)
            """
        )
    )
    result = run_kernel_script(
        script,
        timeout=30,
        files={"blob.bin": host_file, "deep/inline.txt": b"inline\n", "tree": folder},
        env={"PYVHOST_TEST_VALUE": "42"},
        argv=("one", "two words"),
        needs=(),
        mode="direct",
    ).check()
    found = json.loads(result.stdout)
    assert found["pyvhost"] == str(SOURCE / "__init__.py")
    assert found["cwd"] == found["files"]
    assert Path(found["script"]).name == "probe.py"
    assert (found["inline"], found["folder"]) == ("inline\n", "in a folder\n")
    assert found["argv"] == ["one", "two words"]
    assert found["env"] == {"PYVHOST_TEST_VALUE": "42"}, "only `env` and the contract's variables"
    assert "/usr/sbin" in found["path"].split(":")
    assert found["python"] == sys.executable
    assert result.stderr == "to stderr\n"
    assert result.files_out == {"nested/echo.bin": host_file.read_bytes()[::-1]}
    assert (result.console, result.status["mode"], result.status["returncode"]) == ("", "direct", 0)
    assert not Path(found["files"]).exists(), "the work folder is removed"


@pytest.mark.usefixtures("direct")
def test_exit_status_and_traceback() -> None:
    script = "import sys\nprint('before')\nraise SystemExit(3)\n"
    result = run_direct(script, timeout=30)
    assert (result.returncode, result.stdout) == (3, "before\n")
    with pytest.raises(PyGuestError, match="exited with 3"):
        result.check()
    result = run_direct("raise ValueError('broken here')\n", timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert 'main.py", line 1' in result.stderr
    assert result.stderr.endswith("ValueError: broken here\n")
    killed = run_direct("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n", timeout=30)
    assert killed.returncode == -signal.SIGTERM, "a signal is a negative status, as in the guest"


def _gone(pid: int) -> bool:
    """No such process, or only its zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.usefixtures("direct")
def test_a_hanging_script_and_its_children_are_killed_at_the_timeout() -> None:
    script = textwrap.dedent(
        """
        import subprocess, time
        child = subprocess.Popen(["sleep", "3600"])
        print("child", child.pid, flush=True)
        time.sleep(3600)
        """
    )
    started = time.monotonic()
    with pytest.raises(PyGuestTimeoutError) as caught:
        run_direct(script, timeout=3)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "did not finish within 3 s (directly on this host)" in message
    assert 3 <= elapsed < 10
    pid = int(message.split("child ", 1)[1].split(maxsplit=1)[0])
    deadline = time.monotonic() + 5
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid), "the script's child was in its process group"


@pytest.mark.usefixtures("direct")
def test_lo_does_not_come_up(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = 'echo "pyvhost direct: ip link set lo up failed" >&2; exit 125\n'
    monkeypatch.setattr(kernel_runner, "NAMESPACE_SCRIPT", broken)
    with pytest.raises(PyGuestError, match="direct runner failed before the script ran"):
        run_direct("print('never')", timeout=30)


NAMESPACE_SCRIPT = textwrap.dedent(
    """
    import fcntl, json, os, socket, struct, sys
    TUNSETIFF, TUNSETPERSIST, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x400454CB, 0x0002, 0x1000
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", sys.argv[1].encode(), IFF_TAP | IFF_NO_PI))
    fcntl.ioctl(fd, TUNSETPERSIST, 1)
    os.close(fd)
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname(), timeout=5)
    peer, _ = server.accept()
    client.sendall(b"ping")
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    raw.bind((sys.argv[1], 0))
    print(json.dumps({
        "netns": os.readlink("/proc/self/ns/net"),
        "links": sorted(name for _, name in socket.if_nameindex()),
        "lo": peer.recv(4).decode(),
    }))
    """
)


def _host_links() -> str:
    return subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.usefixtures("direct")
def test_the_script_has_its_own_network() -> None:
    """It sees only `lo` (up) and what it makes; a persistent TAP it leaves is not the host's."""
    tap = f"pvdir{os.getpid() % 100000}"
    assert f" {tap}:" not in _host_links()
    result = run_direct(NAMESPACE_SCRIPT, timeout=30, argv=[tap]).check()
    found = json.loads(result.stdout)
    assert found["netns"] != os.readlink("/proc/self/ns/net")
    assert found["links"] == sorted(["lo", tap])
    assert found["lo"] == "ping"
    assert f" {tap}:" not in _host_links()
    shown = subprocess.run(["ip", "link", "show", tap], capture_output=True, text=True, check=False)
    assert shown.returncode != 0, shown.stdout


# --- a session where the forced place is unavailable --------------------------------------------


def _session(tmp_path: Path, mode: str, *tests: str) -> subprocess.CompletedProcess[str]:
    """pytest on `tests` in a child process with $PYVHOST_KERNEL_TESTS=mode and no guest image."""
    env = {
        **os.environ,
        MODE_ENV: mode,
        "PYVHOST_PYGUEST_CACHE": str(tmp_path / "empty-cache"),
        "PYTHONPATH": str(REPO / "src"),
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsfE", "-p", "no:cacheprovider", *tests],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


VSOCK_TESTS = "tests/kernel/test_exercise_vsock.py"


@pytest.fixture
def no_vhost_vsock() -> None:
    """Skip on hosts where the vsock tests could really run directly."""
    if not direct_problems(("/dev/vhost-vsock",), modules=("vhost_vsock",)):
        pytest.skip("this host has /dev/vhost-vsock: the forced direct session would run")


@pytest.mark.usefixtures("no_vhost_vsock")
def test_forced_direct_without_the_device_fails_saying_why(tmp_path: Path) -> None:
    proc = _session(tmp_path, "direct", VSOCK_TESTS)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "PYVHOST_KERNEL_TESTS=direct, but this host cannot run the script:" in proc.stdout
    assert "/dev/vhost-vsock missing" in proc.stdout or "not root" in proc.stdout
    summary = proc.stdout.splitlines()[-1]
    assert " errors in " in summary and "passed" not in summary and "skipped" not in summary


@pytest.mark.usefixtures("no_vhost_vsock")
def test_auto_without_guest_or_device_skips_naming_both(tmp_path: Path) -> None:
    proc = _session(tmp_path, "auto", VSOCK_TESTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kernel vhost is available neither in the Python guest" in proc.stdout
    assert "scripts/fetch-pyguest" in proc.stdout and "nor directly on this host" in proc.stdout
    assert " skipped" in proc.stdout.splitlines()[-1]


def test_forced_guest_without_the_image_fails_and_a_bad_mode_is_refused(tmp_path: Path) -> None:
    proc = _session(
        tmp_path, "guest", f"{VSOCK_TESTS}::test_text_report", "tests/kernel/test_pyguest.py"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "PYVHOST_KERNEL_TESTS=guest, but the Python guest is unavailable" in proc.stdout
    assert "Python guest unavailable" in proc.stdout, "the harness's own tests fail too"
    proc = _session(tmp_path, "host", VSOCK_TESTS)
    assert proc.returncode == 4
    assert "PYVHOST_KERNEL_TESTS must be one of auto, guest, direct, not 'host'" in proc.stderr


IN_GUEST_SESSION = textwrap.dedent(
    """
    import os, subprocess, sys
    env = {**os.environ, "PYVHOST_KERNEL_TESTS": "direct", "PYTHONPATH": os.path.abspath("src")}
    argv = [sys.executable, "-m", "pytest", "-q", "-rsfE", "-p", "no:cacheprovider", *sys.argv[1:]]
    sys.exit(subprocess.run(argv, env=env).returncode)
    """
)
DIRECT_IN_GUEST = (
    "tests/kernel/test_exercise_net.py",
    "tests/kernel/test_kernel_guest.py",
    "tests/kernel/test_vhost_scsi.py",
)
"""A TAP and vhost-net in the namespace; three devices on a 6.1 kernel; LIO, configfs, rtslib."""


@pytest.mark.guest
@pytest.mark.kernel
def test_kernel_tests_run_directly_on_a_host_with_vhost(
    pyguest: PyGuestAssets, tmp_path: Path
) -> None:
    """The guest is such a host (root, /dev/vhost-*, Linux 6.1, rtslib): there, forced direct,
    these modules pass without a skip, so the direct mode works with real devices."""
    tests = tmp_path / "tests"
    shutil.copytree(REPO / "tests", tests, ignore=shutil.ignore_patterns("__pycache__"))
    result = run_in_guest(
        IN_GUEST_SESSION,
        timeout=240,
        mem="1G",
        assets=pyguest,
        files={"tests": tests, "pyproject.toml": REPO / "pyproject.toml", "src/pyvhost": SOURCE},
        modules=(*NET_MODULES, "vhost_vsock", *LIO_MODULES),
        argv=DIRECT_IN_GUEST,
    )
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary and "error" not in summary, summary
