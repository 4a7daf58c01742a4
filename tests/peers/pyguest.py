"""Run Python in a Linux guest that has kernel vhost: a Debian root image under QEMU TCG.

The host kernel has no /dev/vhost-net, -vsock or -scsi; the guest kernel (Debian's cloud kernel,
from tests/peers/guest.py) has them as modules. `build_image` makes, once, an ext4 image of Debian
bookworm minbase with python3 and that kernel's modules (scripts/fetch-pyguest). `run_in_guest`
boots the busybox initramfs of guest.py, whose fw_cfg script mounts the image (snapshot=on, so
never changed) and a per-run work disk holding src/pyvhost, the test's files and the script,
chroots into it and runs tests/peers/pyguest_runner.py there. The runner's results come back on
the work disk (read with debugfs); the script's output is also echoed live to the console, so a
guest killed at the timeout still shows what it printed. Standard library only.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from .guest import (
    FW_CFG_SCRIPT,
    GuestError,
    GuestUnavailableError,
    Kernel,
    ensure_guest,
    fetch_kernel,
    parse_result,
)
from .guest import cache_dir as guest_cache_dir
from .qemu import PeerError, QemuVM, find_binary, short_tmpdir

IMAGE_FORMAT = 1
"""Bump when the image layout changes in a way the other key inputs would not show."""
SUITE = "bookworm"
VARIANT = "minbase"
PACKAGES: tuple[str, ...] = (
    "python3",
    "python3-pytest",
    "python3-rtslib-fb",
    "iproute2",
    "kmod",
    "procps",
)
"""python3-rtslib-fb: LIO targets for the vhost-scsi tests (tests/peers/lio.py)."""
DEFAULT_MODULES: tuple[str, ...] = ("tun", "vhost_net", "vhost_vsock")
"""Loaded with modprobe in the guest before the script runs (for vhost-scsi with a LIO target
add tests/peers/lio.py's MODULES; GUEST.md has the order that works)."""

CACHE_ENV = "PYVHOST_PYGUEST_CACHE"
MIRROR_ENV = "PYVHOST_DEBIAN_MIRROR"
KEEP_ENV = "PYVHOST_KEEP_PEER_DIRS"
"""Set (to anything) to keep each run's directory (work disk, console log) afterwards."""
FETCH_COMMAND = "scripts/fetch-pyguest"

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "src" / "pyvhost"
RUNNER = Path(__file__).with_name("pyguest_runner.py")
WORK_SPACE = 64 << 20
"""Free space on the work disk for what the script writes to $PYGUEST_OUT."""
CONSOLE_TAIL = 3000
RUNNER_FAILED = 125

GUEST_SCRIPT = """\
# pyguest: mount the Debian root (vda, snapshot) and the work disk, chroot, run the runner.
root=/mnt/pyguest
rootdev=
workdev=
for b in /sys/block/vd*; do
    case "$(cat "$b/serial" 2>/dev/null)" in
        pyguest-root) rootdev=/dev/${b##*/} ;;
        pyguest-work) workdev=/dev/${b##*/} ;;
    esac
done
if [ -z "$rootdev" ] || [ -z "$workdev" ]; then
    echo "pyguest: disks not found (root '$rootdev', work '$workdev'): $(ls /sys/block)"
    exit 124
fi
mkdir -p $root
mount -t ext4 "$rootdev" $root || exit 124
mount -t ext4 "$workdev" $root/pyguest || exit 124
for d in proc sys dev dev/pts dev/shm; do mount -o bind /$d $root/$d || exit 124; done
mount -t tmpfs tmpfs $root/tmp && mount -t tmpfs tmpfs $root/run || exit 124
chroot $root /usr/bin/python3 /pyguest/pyguest_runner.py
rc=$?
sync
umount $root/pyguest || echo "pyguest: umount of the work disk failed"
exit $rc
"""
"""Run by the initramfs /init (busybox sh) from fw_cfg; its output goes to the result port."""


class PyGuestUnavailableError(GuestUnavailableError):
    """The pyguest image, kernel or a host tool is missing here; the message says how to get it."""


class PyGuestError(GuestError):
    """The guest ran but the script failed (see `PyGuestResult.check`) or no result came back."""


class PyGuestTimeoutError(PyGuestError):
    """The guest did not power off in time; QEMU was killed. The message has the console tail."""


@dataclasses.dataclass(frozen=True)
class PyGuestAssets:
    """Kernel, initramfs and root image for `run_in_guest`."""

    kernel: Path
    initrd: Path
    image: Path
    kernel_version: str


@dataclasses.dataclass(frozen=True)
class PyGuestResult:
    """What the script returned and printed, what it left in $PYGUEST_OUT, and the console."""

    returncode: int
    stdout: str
    stderr: str
    console: str
    """Empty when the script ran directly on the host (tests/peers/kernel_runner.py)."""
    files_out: dict[str, bytes]
    duration_s: float
    status: dict[str, object]
    """The runner's own record: `mode` (guest or direct), python and kernel version, seconds."""

    def check(self) -> PyGuestResult:
        """Return self, or raise PyGuestError with stdout, stderr and the console tail."""
        if self.returncode != 0:
            raise PyGuestError(
                f"guest script exited with {self.returncode}\nstdout:\n{self.stdout[-3000:]}\n"
                f"stderr:\n{self.stderr[-3000:]}\nconsole (tail):\n{self.console[-CONSOLE_TAIL:]}"
            )
        return self


def cache_dir() -> Path:
    """$PYVHOST_PYGUEST_CACHE, or ~/.cache/pyvhost/pyguest."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "pyvhost" / "pyguest"


def _tool(name: str, package: str) -> str:
    path = find_binary(name)
    if path is None:
        raise PyGuestUnavailableError(f"{name} not found: apt-get install {package}")
    return path


def _run(argv: Sequence[str], *, timeout: float = 600, what: str | None = None) -> str:
    """Run a host tool; PyGuestUnavailableError with its stderr tail when it fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise PyGuestUnavailableError(f"{argv[0]} not found: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise PyGuestUnavailableError(f"{what or argv[0]} took more than {timeout:g} s") from e
    if proc.returncode != 0:
        out = (proc.stderr.strip() or proc.stdout.strip())[-3000:]
        raise PyGuestUnavailableError(
            f"{what or ' '.join(argv)} failed with status {proc.returncode}:\n{out}"
        )
    return proc.stdout


# --- the root image -------------------------------------------------------------------------


def _kernel_id(kernel: Kernel) -> str:
    """The guest cache's name for the kernel: version and Debian package version."""
    return kernel.root.name


def image_key(kernel: Kernel) -> str:
    """Hash of everything the image is built from (format, suite, variant, packages, kernel)."""
    inputs = {
        "format": IMAGE_FORMAT,
        "suite": SUITE,
        "variant": VARIANT,
        "packages": sorted(PACKAGES),
        "kernel": _kernel_id(kernel),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def image_path(kernel: Kernel, cache: Path | None = None) -> Path:
    """Where the image for `kernel` is (or would be) cached."""
    return (cache or cache_dir()) / f"{SUITE}-{kernel.version}-{image_key(kernel)}.ext4"


def parse_apt_sources(texts: Sequence[tuple[str, str]], suite: str = SUITE) -> str | None:
    """The first URI of a `deb` source for `suite` with `main`, from (file name, text) pairs in
    one-line (.list) or deb822 (.sources) format; None if there is none."""
    for name, text in texts:
        if name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if (
                    "deb" in fields.get("types", "").split()
                    and suite in fields.get("suites", "").split()
                    and "main" in fields.get("components", "").split()
                    and fields.get("uris")
                ):
                    return fields["uris"].split()[0]
        else:
            for raw in text.splitlines():
                line = re.sub(r"\[[^]]*\]", " ", raw.split("#", 1)[0]).split()
                if len(line) >= 4 and line[0] == "deb" and line[2] == suite and "main" in line[3:]:
                    return line[1]
    return None


def debian_mirror() -> str:
    """$PYVHOST_DEBIAN_MIRROR, else the bookworm mirror of the machine's apt sources."""
    env = os.environ.get(MIRROR_ENV)
    if env:
        return env
    files = [Path("/etc/apt/sources.list")]
    files += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    files += sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    texts = [(f.name, f.read_text(errors="replace")) for f in files if f.is_file()]
    mirror = parse_apt_sources(texts)
    if mirror is None:
        raise PyGuestUnavailableError(
            f"no `deb` source for {SUITE} main in /etc/apt/sources.list[.d]; "
            f"set ${MIRROR_ENV} (e.g. http://deb.debian.org/debian)"
        )
    return mirror


def _inside(root: Path, relative: str) -> Path:
    """`relative` under `root`, following symlinks as the guest would (an absolute link target
    such as /usr/lib stays inside `root`)."""
    path = root
    for part in Path(relative).parts:
        candidate = path / part
        hops = 0
        while candidate.is_symlink():
            hops += 1
            if hops > 20:
                raise PeerError(f"symlink loop at {candidate}")
            target = os.readlink(candidate)
            candidate = (
                (root / target.lstrip("/"))
                if target.startswith("/")
                else (candidate.parent / target)
            )
        path = candidate
    return path


def _ensure_debootstrap(log: Callable[[str], None]) -> str:
    """debootstrap's path; installs the Debian package when missing and running as root."""
    path = find_binary("debootstrap")
    if path is not None:
        return path
    if os.geteuid() != 0 or find_binary("apt-get") is None:
        raise PyGuestUnavailableError("debootstrap not found: apt-get install debootstrap")
    log("installing debootstrap (apt-get install debootstrap)")
    _run(["apt-get", "update", "-qq"], what="apt-get update")
    env_argv = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq"]
    _run([*env_argv, "debootstrap"], what="apt-get install debootstrap")
    return _tool("debootstrap", "debootstrap")


def _tree_stats(root: Path) -> tuple[int, int]:
    """(bytes, entries) of a directory tree, symlinks not followed."""
    size = count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            count += 1
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(dirpath, name)).st_size
    return size, count


def make_ext4(source: Path, image: Path, *, label: str, free: int) -> None:
    """An ext4 image holding the tree `source` (owners and modes kept), with `free` bytes spare."""
    mkfs = _tool("mkfs.ext4", "e2fsprogs")
    size, count = _tree_stats(source)
    total = ((size * 5 // 4 + free + (16 << 20)) >> 20) << 20
    inodes = count * 3 // 2 + 4096
    with open(image, "wb") as f:
        f.truncate(total)
    _run(
        [mkfs, "-q", "-F", "-L", label, "-N", str(inodes), "-d", str(source), str(image)],
        what=f"mkfs.ext4 -d {source}",
    )


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """Serialize image builders (two fetch-pyguest runs, parallel test sessions)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_image(
    kernel: Kernel,
    cache: Path | None = None,
    *,
    mirror: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Path:
    """The root image for `kernel`: from the cache, else debootstrap + modules + mkfs.ext4.

    Needs root (debootstrap). Raises PyGuestUnavailableError saying what is missing.
    """
    cache = cache or cache_dir()
    target = image_path(kernel, cache)
    if target.exists():
        return target
    with _locked(cache):
        if target.exists():
            return target
        if os.geteuid() != 0:
            raise PyGuestUnavailableError(
                f"building {target.name} needs root (debootstrap); run {FETCH_COMMAND} as root"
            )
        depmod = _tool("depmod", "kmod")
        _tool("mkfs.ext4", "e2fsprogs")
        debootstrap = _ensure_debootstrap(log)
        mirror = mirror or debian_mirror()
        scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            started = time.monotonic()
            root = scratch / "root"
            log(f"debootstrap --variant={VARIANT} {SUITE} from {mirror} (about a minute)")
            _run(
                [
                    debootstrap,
                    f"--variant={VARIANT}",
                    f"--include={','.join(PACKAGES)}",
                    SUITE,
                    str(root),
                    mirror,
                ],
                timeout=1800,
                what="debootstrap",
            )
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in _inside(root, leftover).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            log(f"kernel modules {kernel.version}")
            modules = _inside(root, "lib/modules") / kernel.version
            modules.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(kernel.modules_dir, modules, symlinks=True)
            _run([depmod, "-b", str(root), kernel.version], what="depmod")
            (root / "pyguest").mkdir()
            (root / "etc" / "hostname").write_text("pyguest\n")
            pythons = sorted(p.name for p in _inside(root, "usr/bin").glob("python3.*"))
            manifest: dict[str, object] = {
                "key": image_key(kernel),
                "suite": SUITE,
                "variant": VARIANT,
                "packages": list(PACKAGES),
                "mirror": mirror,
                "kernel": _kernel_id(kernel),
                "python": pythons,
            }
            (root / "etc" / "pyvhost-pyguest.json").write_text(json.dumps(manifest, indent=1))
            log("mkfs.ext4")
            image = scratch / "root.ext4"
            make_ext4(root, image, label="pyguest-root", free=128 << 20)
            fsck = find_binary("e2fsck")
            if fsck is not None:
                _run([fsck, "-fn", str(image)], what="e2fsck -fn of the new image")
            manifest["build_s"] = round(time.monotonic() - started, 1)
            manifest["size"] = image.stat().st_size
            target.with_suffix(".json").write_text(json.dumps(manifest, indent=1) + "\n")
            os.rename(image, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def cached_kernel() -> Kernel | None:
    """The kernel run_in_guest boots (the newest in guest.py's cache), or None if none is."""
    if not any((guest_cache_dir() / "kernel").glob("*/version")):
        return None
    return fetch_kernel(guest_cache_dir())


def locate(cache: Path | None = None) -> PyGuestAssets:
    """Kernel, initramfs and image from the caches, building nothing slow: the initramfs is made
    from the cached kernel if needed. PyGuestUnavailableError names the command to run."""
    if find_binary("qemu-system-x86_64") is None:
        raise PyGuestUnavailableError(
            "qemu-system-x86_64 not found: apt-get install qemu-system-x86"
        )
    for tool, package in (("mkfs.ext4", "e2fsprogs"), ("debugfs", "e2fsprogs")):
        _tool(tool, package)
    kernel = cached_kernel()
    if kernel is None:
        raise PyGuestUnavailableError(
            f"no guest kernel in {guest_cache_dir()}: run {FETCH_COMMAND} (or scripts/fetch-guest)"
        )
    image = image_path(kernel, cache)
    if not image.exists():
        raise PyGuestUnavailableError(
            f"no pyguest image for kernel {kernel.version} ({image}): run {FETCH_COMMAND} as root"
        )
    assets = ensure_guest()
    if assets.kernel != kernel.vmlinuz:
        raise PyGuestUnavailableError(f"guest kernel changed while locating it: {assets.kernel}")
    return PyGuestAssets(assets.kernel, assets.initrd, image, kernel.version)


# --- running a script ---------------------------------------------------------------------------


def _relative(name: str) -> Path:
    path = Path(name)
    if not name or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"guest file name {name!r} must be relative and stay inside files/")
    return path


def write_script(folder: Path, script: str | Path) -> str:
    """Write `script` (Python source, or a Path to a .py file) into `folder`; return its name."""
    if isinstance(script, Path):
        name = script.name
        text = script.read_text()
    else:
        name, text = "main.py", script
    (folder / name).write_text(text)
    return name


def stage_files(folder: Path, files: Mapping[str, bytes | Path]) -> None:
    """Put `files` (name -> bytes, or a host file or folder) under `folder`, names checked first."""
    destinations = {name: _relative(name) for name in files}
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        dest = folder / destinations[name]
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            if content.is_dir():
                shutil.copytree(content, dest)
            else:
                shutil.copy(content, dest)
        else:
            dest.write_bytes(content)


def stage_work_tree(
    stage: Path,
    script: str | Path,
    files: Mapping[str, bytes | Path],
    job: Mapping[str, object],
    source: Path = SOURCE,
) -> None:
    """Lay out the work disk's tree: runner, job.json, the script, src/<package>, files/."""
    for name in files:
        _relative(name)
    stage.mkdir(parents=True, exist_ok=True)
    shutil.copy(RUNNER, stage / RUNNER.name)
    name = write_script(stage, script)
    (stage / "job.json").write_text(json.dumps({**job, "script": name}))
    package = stage / "src" / source.name
    shutil.copytree(source, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    compileall.compile_dir(
        package,
        quiet=1,
        invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
    )
    for sub in ("out", "result"):
        (stage / sub).mkdir()
    stage_files(stage / "files", files)


def read_back(image: Path, dest: Path) -> tuple[Path, Path]:
    """Copy /result and /out out of the work disk with debugfs (no mount, no root needed)."""
    debugfs = _tool("debugfs", "e2fsprogs")
    dest.mkdir(parents=True, exist_ok=True)
    _run([debugfs, "-R", f"rdump /result /out {dest}", str(image)], what="debugfs rdump")
    return dest / "result", dest / "out"


def _files_under(root: Path) -> dict[str, bytes]:
    if not root.is_dir():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def run_in_guest(
    script: str | Path,
    *,
    timeout: float,
    files: Mapping[str, bytes | Path] | None = None,
    mem: str = "512M",
    modules: Sequence[str] = DEFAULT_MODULES,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] = (),
    extra_qemu_args: Sequence[str] = (),
    assets: PyGuestAssets | None = None,
    source: Path = SOURCE,
    workdir: Path | None = None,
) -> PyGuestResult:
    """Boot the guest, run `script` (Python source, or a Path to a .py file) with python3 there
    and return its result; the script's failure is in `returncode` (use `.check()`).

    In the guest the script runs in $PYGUEST_FILES (/pyguest/files, holding `files`: name ->
    bytes or a host file or folder) with `source` (src/pyvhost) on PYTHONPATH, after modprobe of
    `modules`; whatever it writes under $PYGUEST_OUT comes back in `files_out`. `timeout` covers
    the whole run, boot included; past it QEMU is killed and PyGuestTimeoutError carries the
    console tail (which echoes the script's output). `workdir` (kept) or a temporary folder
    (removed unless $PYVHOST_KEEP_PEER_DIRS is set) holds the work disk and logs.
    """
    assets = assets or locate()
    keep = workdir is not None or bool(os.environ.get(KEEP_ENV))
    work = workdir or short_tmpdir("pyg-")
    vm: QemuVM | None = None
    try:
        job = {"modules": list(modules), "env": dict(env or {}), "argv": list(argv)}
        stage = work / "stage"
        stage_work_tree(stage, script, files or {}, job, source)
        disk = work / "work.ext4"
        make_ext4(stage, disk, label="pyguest-work", free=WORK_SPACE)
        shutil.rmtree(stage)
        vm = QemuVM(work / "vm", memory=mem, kernel=assets.kernel, initrd=assets.initrd)
        vm.extra_args += [
            "-drive",
            f"file={assets.image},format=raw,if=none,id=root,snapshot=on,readonly=off",
            "-device",
            "virtio-blk-pci,drive=root,serial=pyguest-root",
            "-drive",
            f"file={disk},format=raw,if=none,id=work",
            "-device",
            "virtio-blk-pci,drive=work,serial=pyguest-work",
            *extra_qemu_args,
        ]
        vm.workdir.mkdir(parents=True, exist_ok=True)
        guest_script = vm.workdir / "pyguest.sh"
        guest_script.write_text(GUEST_SCRIPT)
        vm.add_fw_cfg(FW_CFG_SCRIPT, guest_script)
        port = vm.add_serial_file(vm.workdir / "result.log")
        vm.append = f"console=ttyS0 panic=-1 pyvhost_result=/dev/ttyS{port}"
        vm.timeout_s = timeout + 15
        started = time.monotonic()
        vm.start()
        try:
            vm.wait(timeout)
        except PeerError as e:
            init_output = vm.serial_text(port).replace("PYVHOST-RESULT-BEGIN", "").strip()
            raise PyGuestTimeoutError(
                f"guest did not finish within {timeout:g} s (boot included); QEMU killed\n"
                f"{str(e).splitlines()[0]}\n"
                + (f"init/runner output:\n{init_output[-2000:]}\n" if init_output else "")
                + f"console (tail):\n{vm.console[-CONSOLE_TAIL:]}"
            ) from e
        finally:
            vm.stop()
        duration = time.monotonic() - started
        return _collect(vm, port, disk, work / "back", duration)
    finally:
        if vm is not None:
            vm.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _collect(vm: QemuVM, port: int, disk: Path, back: Path, duration: float) -> PyGuestResult:
    """The result of a guest that powered off: the runner's files, or an error saying why not."""
    parsed = parse_result(vm.serial_text(port))
    result_dir, out_dir = read_back(disk, back)
    status_path = result_dir / "status.json"
    status = json.loads(status_path.read_text()) if status_path.is_file() else None
    if status is not None and status.get("error"):
        raise PyGuestError(
            f"guest runner failed before the script ran:\n{status['error']}\n"
            f"console (tail):\n{vm.console[-CONSOLE_TAIL:]}"
        )
    if parsed is None or status is None or status.get("returncode") is None:
        what = (
            f"without a result (QEMU status {vm.returncode})"
            if parsed is None
            else f"with init status {parsed[0]}"
        )
        raise PyGuestError(
            f"guest runner did not run the script: guest finished {what}\n"
            f"runner/init output:\n{(parsed[1] if parsed else vm.serial_text(port))[-3000:]}\n"
            f"QEMU stderr:\n{vm.stderr[-2000:]}\nconsole (tail):\n{vm.console[-CONSOLE_TAIL:]}"
        )
    return PyGuestResult(
        returncode=int(status["returncode"]),
        stdout=_text(result_dir / "stdout"),
        stderr=_text(result_dir / "stderr"),
        console=vm.console,
        files_out=_files_under(out_dir),
        duration_s=duration,
        status={**status, "mode": "guest"},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """scripts/fetch-pyguest: fetch the guest kernel, build the root image; print where."""
    parser = argparse.ArgumentParser(
        description="Build (once) the Debian root image for running Python in the test guest."
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"default: ${CACHE_ENV} or ~/.cache/pyvhost/pyguest",
    )
    parser.add_argument(
        "--mirror",
        default=None,
        help=f"Debian mirror (default: ${MIRROR_ENV} or the machine's apt sources)",
    )
    args = parser.parse_args(argv)
    cache = args.cache or cache_dir()

    def log(message: str) -> None:
        print(f"fetch-pyguest: {message}", file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        assets = ensure_guest()
        kernel = fetch_kernel(guest_cache_dir())
        image = build_image(kernel, cache, mirror=args.mirror, log=log)
    except PeerError as e:
        print(f"fetch-pyguest: cannot prepare the pyguest image in {cache}: {e}", file=sys.stderr)
        return 1
    print(f"kernel:  {assets.kernel} ({kernel.version})")
    print(f"initrd:  {assets.initrd}")
    print(
        f"image:   {image} ({image.stat().st_blocks * 512 / 2**20:.0f} MiB used, "
        f"{image.stat().st_size / 2**20:.0f} MiB size)"
    )
    print(f"time:    {time.monotonic() - started:.1f} s")
    return 0
