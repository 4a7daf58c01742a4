"""Where a kernel-vhost test script runs: in the Python guest, or directly on this host.

`run_kernel_script` takes the same script contract as `pyguest.run_in_guest` (the script runs with
$PYGUEST_FILES, holding `files`, as its folder, writes what should come back under $PYGUEST_OUT,
imports pyvhost from the project's src, gets `argv` and `env`) and returns the same
`PyGuestResult`, so a test does not care where it ran. $PYVHOST_KERNEL_TESTS picks the place:

- `direct`: on this host, which must have every path the script needs (/dev/vhost-net, ...,
  after trying modprobe of its modules), `unshare` and `ip`, and let us (root) make network
  namespaces;
- `guest`: in the QEMU guest (scripts/fetch-pyguest builds its root image);
- `auto` (default): direct where possible, else the guest; `KernelTestsUnavailableError` names
  what each would need when neither is possible.

A forced mode that is not possible is an error (`forced` is set), not a reason to run elsewhere.
The direct mode runs the script in a private network namespace, so the TAPs it makes and its
AF_PACKET traffic never reach the host's network. vhost-vsock CIDs and LIO targets are not
namespaced: a direct script's guest CIDs and targets are the whole host's, as are the kernel
modules it loads. Standard library only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, NoReturn

from .pyguest import (
    CONSOLE_TAIL,
    FETCH_COMMAND,
    KEEP_ENV,
    SOURCE,
    PyGuestAssets,
    PyGuestError,
    PyGuestResult,
    PyGuestTimeoutError,
    PyGuestUnavailableError,
    locate,
    run_in_guest,
    stage_files,
    write_script,
)

MODE_ENV = "PYVHOST_KERNEL_TESTS"
MODES = ("auto", "guest", "direct")
MODULE_PATHS: dict[str, str] = {
    "tun": "/dev/net/tun",
    "vhost_net": "/dev/vhost-net",
    "vhost_vsock": "/dev/vhost-vsock",
    "vhost_scsi": "/dev/vhost-scsi",
    "target_core_mod": "/sys/kernel/config/target",
}
"""What each module provides: the paths a script needs by default, named when one is missing."""
CLI_IN_PROCESS = textwrap.dedent(
    """
    import contextlib as _contextlib, io as _io, logging as _logging, traceback as _traceback
    from pyvhost.cli.main import main as _pyvhost_main

    def pyvhost(*argv):
        \"\"\"`pyvhost ARGV` run in this process: {"rc", "stdout", "stderr"}.\"\"\"
        out, err = _io.StringIO(), _io.StringIO()
        _logging.root.handlers.clear()  # the command's logging goes to this err
        with _contextlib.redirect_stdout(out), _contextlib.redirect_stderr(err):
            try:
                rc = _pyvhost_main([str(a) for a in argv])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except Exception:
                _traceback.print_exc()
                rc = 1
        return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()[-3000:]}
    """
)
"""Put before a kernel script that runs pyvhost commands: its ``pyvhost(*argv)`` runs one in the
script's own process, as the console script would (exit status, stdout, stderr). Under TCG a new
interpreter costs seconds, and the script can then check that each command closed its fds."""
CONFIGFS = "/sys/kernel/config"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SETUP_FAILED = 125
"""Exit status of the namespace's shell when `lo` does not come up (the script did not run)."""
NAMESPACE_SCRIPT = (
    'ip link set lo up || { echo "pyvhost direct: ip link set lo up failed" >&2; exit 125; }\n'
    'exec "$@"\n'
)
"""Run by `sh -c` in the new network namespace before the script (which it becomes)."""

Mode = Literal["direct", "guest"]


class KernelTestsUnavailableError(PyGuestUnavailableError):
    """The script can run neither directly here nor in the guest (or not where it was forced);
    `forced` says whether $PYVHOST_KERNEL_TESTS asked for one place."""

    def __init__(self, message: str, *, forced: bool) -> None:
        super().__init__(message)
        self.forced = forced


def requested_mode(environ: Mapping[str, str] = os.environ) -> str:
    """$PYVHOST_KERNEL_TESTS (auto when unset or empty); ValueError for anything else."""
    value = environ.get(MODE_ENV, "") or "auto"
    if value not in MODES:
        raise ValueError(f"${MODE_ENV} must be one of {', '.join(MODES)}, not {value!r}")
    return value


# --- can it run directly? ----------------------------------------------------------------------


def _modprobe(module: str) -> str | None:
    """Load `module`; None when it loaded (or already was), else modprobe's complaint."""
    try:
        proc = subprocess.run(
            ["modprobe", module], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"status {proc.returncode}")


def _mount_configfs() -> None:
    """Mount configfs where LIO expects it, if the kernel has it and nobody mounted it yet."""
    if os.path.isdir(CONFIGFS) and not os.path.ismount(CONFIGFS):
        subprocess.run(["mount", "-t", "configfs", "configfs", CONFIGFS], check=False)


@functools.cache
def _netns_problem() -> str | None:
    """None if a private network namespace with `lo` up can be made here, else why not."""
    try:
        proc = subprocess.run(
            ["unshare", "--net", "--fork", "--", "ip", "link", "set", "lo", "up"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no private network namespace: {e}"
    if proc.returncode != 0:
        return f"no private network namespace (unshare --net failed): {proc.stderr.strip()}"
    return None


@dataclasses.dataclass(frozen=True)
class Host:
    """What the direct mode depends on, as functions and values; tests pass fakes."""

    root: Path = Path("/")
    euid: int = dataclasses.field(default_factory=os.geteuid)
    release: str = dataclasses.field(default_factory=platform.release)
    modprobe: Callable[[str], str | None] = _modprobe
    mount_configfs: Callable[[], None] = _mount_configfs
    netns: Callable[[], str | None] = _netns_problem
    which: Callable[[str], str | None] = shutil.which


def default_needs(modules: Sequence[str]) -> tuple[str, ...]:
    """The paths `modules` provide (MODULE_PATHS), in order: a script's needs unless it says."""
    return tuple(MODULE_PATHS[m] for m in modules if m in MODULE_PATHS)


def _missing(
    needs: Sequence[str], modules: Sequence[str], host: Host, failed: Mapping[str, str]
) -> list[str]:
    """The needed paths that are not there, each with the modprobe failure that explains it."""
    providers = {MODULE_PATHS[m]: m for m in modules if m in MODULE_PATHS}
    problems = []
    for need in needs:
        if not (host.root / need.lstrip("/")).exists():
            module = providers.get(need, "")
            why = f" (modprobe {module}: {failed[module]})" if module in failed else ""
            problems.append(f"{need} missing{why}")
    return problems


def _tools_and_rights(host: Host) -> list[str]:
    """Root, `unshare` and `ip`, and a network namespace to run in."""
    if host.euid != 0:
        return ["not root (vhost devices and network namespaces need root)"]
    absent = [tool for tool in ("unshare", "ip") if host.which(tool) is None]
    if absent:
        return [f"{' and '.join(absent)} not found (apt-get install util-linux iproute2)"]
    problem = host.netns()
    return [problem] if problem else []


def direct_problems(
    needs: Sequence[str],
    *,
    modules: Sequence[str] = (),
    imports: Sequence[str] = (),
    kernel_release: str | None = None,
    host: Host | None = None,
) -> list[str]:
    """Why the script cannot run directly on this host; empty when it can.

    Tries modprobe of `modules` first (a failure matters only through a path it leaves missing:
    a kernel may have the driver built in). `imports`: modules beyond the standard library the
    script imports (rtslib_fb), found by this interpreter, which runs it. `kernel_release`: a
    release prefix the test's expectations were recorded for (the guest's "6.1.").
    """
    host = host or Host()
    problems = _tools_and_rights(host)
    failed = {m: why for m in modules if (why := host.modprobe(m)) is not None}
    if any(need.startswith(CONFIGFS + "/") for need in needs):
        host.mount_configfs()
    problems += _missing(needs, modules, host, failed)
    problems += [
        f"Python module {name} not found by {sys.executable}"
        for name in imports
        if importlib.util.find_spec(name) is None
    ]
    if kernel_release is not None and not host.release.startswith(kernel_release):
        problems.append(
            f"the test expects Linux {kernel_release}* (as in the guest), this host runs "
            f"{host.release}"
        )
    return problems


# --- choosing ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Choice:
    """Where to run: directly, or in the guest with these assets."""

    mode: Mode
    assets: PyGuestAssets | None = None


def choose(
    requested: str,
    direct: Callable[[], Sequence[str]],
    guest: Callable[[], PyGuestAssets | str],
) -> Choice:
    """The place for `requested` (auto, guest or direct), asking only what it must: `direct`
    gives the direct mode's problems, `guest` the assets or why there are none."""
    if requested not in MODES:
        raise ValueError(f"unknown kernel test mode {requested!r} (one of {', '.join(MODES)})")
    problems: Sequence[str] = ()
    if requested != "guest":
        problems = direct()
        if not problems:
            return Choice("direct")
        if requested == "direct":
            raise KernelTestsUnavailableError(
                f"${MODE_ENV}=direct, but this host cannot run the script: {'; '.join(problems)}",
                forced=True,
            )
    found = guest()
    if isinstance(found, PyGuestAssets):
        return Choice("guest", found)
    if requested == "guest":
        raise KernelTestsUnavailableError(
            f"${MODE_ENV}=guest, but the Python guest is unavailable: {found}", forced=True
        )
    hint = "" if FETCH_COMMAND in found else f"; {FETCH_COMMAND} builds it"
    raise KernelTestsUnavailableError(
        f"kernel vhost is available neither in the Python guest ({found}{hint}) nor directly on "
        f"this host ({'; '.join(problems)}; a host kernel with vhost_net, vhost_vsock and "
        "vhost_scsi, as root)",
        forced=False,
    )


def locate_guest() -> PyGuestAssets | str:
    """The guest's assets, or why they are unavailable."""
    try:
        return locate()
    except PyGuestUnavailableError as e:
        return str(e)


# --- running directly --------------------------------------------------------------------------


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-CONSOLE_TAIL:] if path.is_file() else ""


def _files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _wait(proc: subprocess.Popen[bytes], timeout: float, work: Path) -> int:
    """The process's status; past `timeout` its whole process group is killed and
    PyGuestTimeoutError carries what the script printed."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise PyGuestTimeoutError(
            f"script did not finish within {timeout:g} s (directly on this host); its process "
            f"group was killed\nstdout (tail):\n{_tail(work / 'stdout')}\n"
            f"stderr (tail):\n{_tail(work / 'stderr')}"
        ) from None


def run_direct(
    script: str | Path,
    *,
    timeout: float,
    files: Mapping[str, bytes | Path] | None = None,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] = (),
    source: Path = SOURCE,
    workdir: Path | None = None,
) -> PyGuestResult:
    """Run `script` with this interpreter, here, in a private network namespace with `lo` up.

    The guest's contract: $PYGUEST_FILES (the cwd) holds `files`, what the script writes under
    $PYGUEST_OUT comes back in `files_out`, `source`'s folder is PYTHONPATH, the environment is
    PATH, HOME and `env` only. Past `timeout` the process group is killed (PyGuestTimeoutError).
    Loads no modules (`run_kernel_script` did). `workdir` (kept) or a temporary folder (removed
    unless $PYVHOST_KEEP_PEER_DIRS is set) holds the script, files, out, stdout and stderr.
    """
    keep = workdir is not None or bool(os.environ.get(KEEP_ENV))
    work = workdir or Path(tempfile.mkdtemp(prefix="pyvhost-direct-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        stage_files(work / "files", files or {})
        (work / "out").mkdir()
        name = write_script(work, script)
        environ = {**(env or {}), "HOME": os.environ.get("HOME", "/root"), "PATH": PATH}
        environ.update(
            PYTHONPATH=str(source.parent),
            PYGUEST_FILES=str(work / "files"),
            PYGUEST_OUT=str(work / "out"),
        )
        command = ["unshare", "--net", "--fork", "--kill-child", "--", "sh", "-c"]
        command += [NAMESPACE_SCRIPT, "sh", sys.executable, "-u", str(work / name), *argv]
        started = time.monotonic()
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = subprocess.Popen(
                command,
                cwd=work / "files",
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            returncode = _wait(proc, timeout, work)
        duration = time.monotonic() - started
        stderr = _tail(work / "stderr") if returncode == SETUP_FAILED else ""
        if stderr.startswith("pyvhost direct:"):
            raise PyGuestError(f"direct runner failed before the script ran:\n{stderr}")
        return PyGuestResult(
            returncode=returncode,
            stdout=(work / "stdout").read_text(errors="replace"),
            stderr=(work / "stderr").read_text(errors="replace"),
            console="",
            files_out=_files_under(work / "out"),
            duration_s=duration,
            status={
                "mode": "direct",
                "python": platform.python_version(),
                "kernel": platform.release(),
                "returncode": returncode,
                "script_s": round(duration, 3),
            },
        )
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


# --- either ----------------------------------------------------------------------------------


def run_kernel_script(
    script: str | Path,
    *,
    timeout: float,
    files: Mapping[str, bytes | Path] | None = None,
    modules: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] = (),
    needs: Sequence[str] | None = None,
    imports: Sequence[str] = (),
    kernel_release: str | None = None,
    mode: str | None = None,
    guest: Callable[[], PyGuestAssets | str] = locate_guest,
    host: Host | None = None,
) -> PyGuestResult:
    """Run `script` directly or in the guest (`mode`, default $PYVHOST_KERNEL_TESTS; see the
    module's docstring) and return its result; KernelTestsUnavailableError when it can run
    nowhere. `needs` defaults to the paths `modules` provide; `imports` and `kernel_release` as
    for `direct_problems`. In the guest a module that does not load is an error; here it is one
    only through a missing path. `timeout`: the guest's includes its boot.
    """
    wanted = default_needs(modules) if needs is None else tuple(needs)
    choice = choose(
        mode or requested_mode(),
        lambda: direct_problems(
            wanted, modules=modules, imports=imports, kernel_release=kernel_release, host=host
        ),
        guest,
    )
    if choice.mode == "direct":
        return run_direct(script, timeout=timeout, files=files, env=env, argv=argv)
    return run_in_guest(
        script,
        timeout=timeout,
        files=files,
        modules=modules,
        env=env,
        argv=argv,
        assets=choice.assets,
    )


def _reraise(error: KernelTestsUnavailableError) -> NoReturn:
    raise error


@dataclasses.dataclass(frozen=True)
class KernelRunner:
    """`run_kernel_script` with the mode, the guest lookup and what to do when the script can
    run nowhere fixed once: what the `kernel_runner` fixture gives (it skips or fails there)."""

    mode: str = "auto"
    guest: Callable[[], PyGuestAssets | str] = locate_guest
    unavailable: Callable[[KernelTestsUnavailableError], NoReturn] = _reraise

    def run(
        self,
        script: str | Path,
        *,
        timeout: float,
        files: Mapping[str, bytes | Path] | None = None,
        modules: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] = (),
        needs: Sequence[str] | None = None,
        imports: Sequence[str] = (),
        kernel_release: str | None = None,
    ) -> PyGuestResult:
        """`run_kernel_script` in this runner's mode."""
        try:
            return run_kernel_script(
                script,
                timeout=timeout,
                files=files,
                modules=modules,
                env=env,
                argv=argv,
                needs=needs,
                imports=imports,
                kernel_release=kernel_release,
                mode=self.mode,
                guest=self.guest,
            )
        except KernelTestsUnavailableError as e:
            self.unavailable(e)
