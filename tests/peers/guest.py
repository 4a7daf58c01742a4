"""A real Linux guest for peer tests: Debian's cloud kernel and a busybox initramfs under TCG.

The kernel and busybox are fetched with `apt-get download` and unpacked with `dpkg -x` into a
cache (nothing is installed on the host). The host's e2fsprogs (mkfs.ext4, fsck.ext4) go in too,
with the shared libraries ldd names for them. The initramfs /init reads a shell script from fw_cfg,
runs it, prints its output and exit status between markers on a second serial port, powers off.
Standard library only, so scripts/fetch-guest can run it without pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .qemu import PeerError, QemuVM, find_binary

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
INIT_TEMPLATE = Path(__file__).with_name("guest_init.sh")
INITRAMFS_FORMAT = 2
"""Bump when the initramfs layout changes in a way the content hash would not see."""

HOST_TOOLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mke2fs", ("mkfs.ext4",)),
    ("e2fsck", ("fsck.ext4",)),
)
"""Host programs copied to the guest's /sbin (with their libraries), and the names linked to
them there. A missing one is left out; tests that need it skip on the host's lack of it. In
/sbin they shadow busybox applets of the same name (``busybox --install`` keeps what exists)."""
HOST_FILES: tuple[str, ...] = ("/etc/mke2fs.conf",)
"""Configuration of the host tools, copied when present so the guest's mkfs matches the host's."""

DEFAULT_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "qemu_fw_cfg",
    "tun",
    "vhost_net",
    "vhost_vsock",
    "vmw_vsock_virtio_transport",
)
"""Loaded in this order after their dependencies (the order GUEST.md found to work)."""

RESULT_BEGIN = "PYVHOST-RESULT-BEGIN"
RESULT_END = "PYVHOST-RESULT-END"
EXIT_CODE_RE = re.compile(r"PYVHOST-EXIT-CODE=(\d+)")
FW_CFG_SCRIPT = "pyvhost-test"


class GuestUnavailableError(PeerError):
    """The guest cannot be prepared on this machine (no apt, no network, not root): tests skip."""


class GuestError(PeerError):
    """The guest booted but did not report a result, or its test script failed (see `check`)."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    """An unpacked kernel package: `root` holds lib/modules/<version> with modules.dep."""

    version: str
    vmlinuz: Path
    root: Path

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.version


@dataclasses.dataclass(frozen=True)
class GuestAssets:
    """What `-kernel` and `-initrd` need."""

    kernel: Path
    initrd: Path
    version: str


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """What the guest's test script printed and returned, plus the kernel console for diagnosis."""

    exit_code: int
    output: str
    console: str
    duration_s: float

    def check(self) -> GuestResult:
        """Return self, or raise GuestError with the output and console when the script failed."""
        if self.exit_code != 0:
            raise GuestError(
                f"guest test script exited with {self.exit_code}\noutput:\n{self.output}\n"
                f"console (tail):\n{self.console[-3000:]}"
            )
        return self


def cache_dir() -> Path:
    """$PYVHOST_GUEST_CACHE, or ~/.cache/pyvhost/guest."""
    env = os.environ.get("PYVHOST_GUEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyvhost" / "guest"


def _run(argv: Sequence[str], cwd: Path | None = None, timeout: float = 600) -> str:
    """Run a host tool; raise GuestUnavailableError with its output when it fails or is missing."""
    try:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as e:
        raise GuestUnavailableError(f"{argv[0]} not found: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise GuestUnavailableError(f"{' '.join(argv)} took more than {timeout:g} s") from e
    if proc.returncode != 0:
        raise GuestUnavailableError(
            f"{' '.join(argv)} failed with status {proc.returncode}:\n{proc.stderr.strip()}"
        )
    return proc.stdout


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """Serialize cache builders (parallel pytest workers, scripts/fetch-guest)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _scratch(cache: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class _Apt:
    """apt-cache queries and `apt-get download`; one `apt-get update` when the lists are bare."""

    def __init__(self) -> None:
        if find_binary("apt-get") is None or find_binary("dpkg") is None:
            raise GuestUnavailableError(
                "apt-get and dpkg are needed to fetch the guest (Debian host)"
            )
        self.updated = False

    def _query(self, argv: list[str]) -> str:
        try:
            out = _run(argv)
        except GuestUnavailableError:
            out = ""
        if not out.strip() and not self.updated:
            self.update()
            out = _run(argv)
        return out

    def update(self) -> None:
        self.updated = True
        if os.geteuid() != 0:
            raise GuestUnavailableError("apt lists are empty and apt-get update needs root")
        _run(["apt-get", "update"])

    def depends(self, package: str) -> str:
        """The first hard dependency of a meta package (the versioned kernel image)."""
        out = self._query(["apt-cache", "depends", package])
        for line in out.splitlines():
            key, _, value = line.strip().partition(":")
            if key == "Depends" and value.strip():
                return value.strip()
        raise GuestUnavailableError(f"apt-cache depends {package}: no Depends line in\n{out}")

    def candidate(self, package: str) -> str:
        """The version `apt-get download` would fetch."""
        out = self._query(["apt-cache", "show", "--no-all-versions", package])
        for line in out.splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
        raise GuestUnavailableError(f"apt-cache show {package}: no Version in\n{out}")

    def unpack(self, package: str, version: str, dest: Path, scratch: Path) -> None:
        """Download one .deb into `scratch` and unpack it under `dest` with dpkg -x."""
        _run(["apt-get", "download", f"{package}={version}"], cwd=scratch)
        debs = list(scratch.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise GuestUnavailableError(
                f"apt-get download {package}: expected one .deb, got {debs}"
            )
        _run(["dpkg", "-x", str(debs[0]), str(dest)])
        debs[0].unlink()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", name)


def _cached_kernels(cache: Path) -> list[Kernel]:
    found = []
    for entry in sorted((cache / "kernel").glob("*/version")):
        version = entry.read_text().strip()
        vmlinuz = entry.parent / "boot" / f"vmlinuz-{version}"
        if vmlinuz.exists():
            found.append(Kernel(version, vmlinuz, entry.parent))
    return found


def fetch_kernel(cache: Path, *, refresh: bool = False) -> Kernel:
    """The Debian cloud kernel, unpacked and depmod'ed; cached by package name and version.

    A cached kernel is used as is (apt-cache alone takes seconds) unless `refresh` asks apt for
    the current candidate; when apt cannot answer (offline, no lists) the cached one still serves.
    """
    cached = _cached_kernels(cache)
    if cached and not refresh:
        return cached[-1]
    try:
        apt = _Apt()
        package = apt.depends(KERNEL_META_PACKAGE)
        deb_version = apt.candidate(package)
    except GuestUnavailableError:
        if cached:
            return cached[-1]
        raise
    version = package.removeprefix("linux-image-")
    final = cache / "kernel" / _safe(f"{version}_{deb_version}")
    if (final / "version").exists():
        return Kernel(version, final / "boot" / f"vmlinuz-{version}", final)
    depmod = find_binary("depmod")
    if depmod is None:
        raise GuestUnavailableError("depmod not installed: apt-get install kmod")
    with _scratch(cache) as scratch:
        root = scratch / "root"
        apt.unpack(package, deb_version, root, scratch)
        vmlinuz = root / "boot" / f"vmlinuz-{version}"
        if not vmlinuz.exists() or not (root / "lib" / "modules" / version).is_dir():
            raise PeerError(f"{package}: no boot/vmlinuz-{version} or lib/modules/{version}")
        _run([depmod, "-b", str(root), version])
        (root / "version").write_text(version + "\n")
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(root, final)
    return Kernel(version, final / "boot" / f"vmlinuz-{version}", final)


def _is_static_elf(path: Path) -> bool:
    """True for a 64-bit ELF executable without a PT_INTERP program header."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:5] != b"\x7fELF\x02":
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    pt_interp = 3
    return all(
        struct.unpack_from("<I", data, phoff + i * phentsize)[0] != pt_interp for i in range(phnum)
    )


def static_busybox(cache: Path) -> Path:
    """A static busybox: the host's if it is one, else busybox-static unpacked in the cache."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if _is_static_elf(Path(candidate)):
            return Path(candidate)
    cached = sorted((cache / "busybox").glob("*/bin/busybox"))
    if cached:
        return cached[-1]
    apt = _Apt()
    version = apt.candidate(BUSYBOX_PACKAGE)
    final = cache / "busybox" / _safe(version)
    with _scratch(cache) as scratch:
        root = scratch / "root"
        apt.unpack(BUSYBOX_PACKAGE, version, root, scratch)
        if not _is_static_elf(root / "bin" / "busybox"):
            raise PeerError(f"{BUSYBOX_PACKAGE} {version}: bin/busybox is not a static executable")
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(root, final)
    return final / "bin" / "busybox"


def _module_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """(name, .ko path) for `wanted` and all they depend on, dependencies first (modules.dep)."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[_module_name(target)] = (target, [_module_name(d) for d in rest.split()])
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name not in deps:
            raise PeerError(f"kernel module {name} not found in {modules_dir}/modules.dep")
        if name in chain:
            raise PeerError(f"kernel module dependency loop: {' -> '.join((*chain, name))}")
        path, needs = deps[name]
        for dep in needs:
            visit(dep, (*chain, name))
        seen.add(name)
        order.append((name, modules_dir / path))

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


class _Cpio:
    """Writer for the cpio "newc" format the kernel unpacks; owner root, mtime 0 (reproducible)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)$")


def shared_libraries(binaries: Iterable[Path]) -> list[str]:
    """Absolute paths of the shared libraries and dynamic loader `binaries` load, as ldd names
    them (the loader under its PT_INTERP name); empty for static executables."""
    found: dict[str, None] = {}
    for binary in binaries:
        if _is_static_elf(binary):
            continue
        ldd = find_binary("ldd")
        if ldd is None:
            raise PeerError("ldd not found (Debian package libc-bin)")
        for raw in _run([ldd, str(binary)]).splitlines():
            line = raw.strip()
            if "not found" in line:
                raise PeerError(f"ldd {binary}: {line}")
            match = _LDD_PATH.search(line)
            if match:
                found[match.group(1)] = None
            elif "=>" in line:
                raise PeerError(f"ldd {binary}: cannot read the line {line!r}")
    return list(found)


def _host_file(name: str, path: Path) -> tuple[str, bytes, int]:
    return name, path.read_bytes(), path.stat().st_mode & 0o777


def host_tool_files(
    tools: Sequence[tuple[str, Sequence[str]]] = HOST_TOOLS, files: Sequence[str] = HOST_FILES
) -> tuple[list[tuple[str, bytes, int]], list[tuple[str, str]]]:
    """(initramfs path, contents, permissions) of the host tools found, their libraries and
    `files`; and (link, target) for the tools' other names."""
    found = [(name, aliases, find_binary(name)) for name, aliases in tools]
    present = [(name, aliases, Path(path).resolve()) for name, aliases, path in found if path]
    contents = [_host_file(f"sbin/{name}", path) for name, _, path in present]
    libraries = shared_libraries(path for _, _, path in present)
    contents += [_host_file(lib.lstrip("/"), Path(lib)) for lib in libraries]
    contents += [_host_file(f.lstrip("/"), Path(f)) for f in files if Path(f).is_file()]
    links = [(f"sbin/{alias}", name) for name, aliases, _ in present for alias in aliases]
    return contents, links


def build_initramfs(
    kernel: Kernel, busybox: Path, cache: Path, modules: Sequence[str] = DEFAULT_MODULES
) -> Path:
    """The gzipped initramfs for `kernel` with `modules` and the host tools found; cached under
    a hash of its contents."""
    order = module_load_order(kernel.modules_dir, modules)
    init = INIT_TEMPLATE.read_bytes()
    bb = busybox.read_bytes()
    contents = [(name, path.read_bytes()) for name, path in order]
    extra, links = host_tool_files()
    digest = hashlib.sha256(f"format {INITRAMFS_FORMAT} {kernel.version}\n".encode())
    for part in (
        init,
        bb,
        *(name.encode() + b"\0" + data for name, data in contents),
        *(f"{name} {perm:o}".encode() + b"\0" + data for name, data, perm in extra),
        *(f"{link} -> {target}".encode() for link, target in links),
    ):
        digest.update(hashlib.sha256(part).digest())
    target = cache / "initramfs" / f"{_safe(kernel.version)}-{digest.hexdigest()[:16]}.cpio.gz"
    if target.exists():
        return target
    archive = _Cpio()
    for d in ("bin", "dev", "etc", "etc/pyvhost", "lib", "lib/modules", "lib/modules/pyvhost"):
        archive.directory(d)
    for d in ("proc", "root", "run", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin"):
        archive.directory(d)
    archive.char_device("dev/console", 5, 1)
    archive.file("init", init, 0o755)
    archive.file("bin/busybox", bb, 0o755)
    archive.file("etc/pyvhost/modules", "".join(f"{n}\n" for n, _ in contents).encode())
    for name, data in contents:
        archive.file(f"lib/modules/pyvhost/{name}.ko", data)
    made = {"bin", "dev", "etc", "lib", "sbin", "usr", "usr/bin", "usr/sbin"}
    for name, data, perm in extra:
        for parent in reversed([str(p) for p in Path(name).parents if str(p) != "."]):
            if parent not in made:
                archive.directory(parent)
                made.add(parent)
        archive.file(name, data, perm)
    for link, link_target in links:
        archive.symlink(link, link_target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(archive.finish())
    os.rename(tmp, target)
    return target


def ensure_guest(
    cache: Path | None = None, modules: Sequence[str] = DEFAULT_MODULES, *, refresh: bool = False
) -> GuestAssets:
    """Kernel and initramfs, fetched or built on first use and taken from the cache afterwards.

    `refresh` looks for a newer kernel package (see fetch_kernel).
    Raises GuestUnavailableError when they cannot be fetched here (the caller should skip).
    """
    cache = cache or cache_dir()
    with _locked(cache):
        kernel = fetch_kernel(cache, refresh=refresh)
        busybox = static_busybox(cache)
        initrd = build_initramfs(kernel, busybox, cache, modules)
    return GuestAssets(kernel.vmlinuz, initrd, kernel.version)


def parse_result(text: str) -> tuple[int, str] | None:
    """(exit code, output) from the result serial port, or None if the guest never finished."""
    text = text.replace("\r\n", "\n")
    begin = text.find(RESULT_BEGIN + "\n")
    end = text.rfind(RESULT_END)
    match = EXIT_CODE_RE.search(text, end) if end >= 0 else None
    if begin < 0 or end < begin or match is None:
        return None
    return int(match.group(1)), text[begin + len(RESULT_BEGIN) + 1 : end]


def boot_guest(
    vm: QemuVM,
    script: str,
    timeout: float = 60,
    *,
    assets: GuestAssets | None = None,
    append: str = "",
) -> GuestResult:
    """Boot `vm` into the test initramfs, run `script` (busybox sh) there and return its result.

    Configure the vm's devices first; this sets kernel/initrd if unset, adds the script as fw_cfg
    opt/pyvhost-test and a result serial port, starts QEMU and waits for the guest to power off.
    """
    if vm.process is not None:
        raise GuestError("boot_guest: the QemuVM was already started; use a fresh one per boot")
    if assets is None and (vm.kernel is None or vm.initrd is None):
        assets = ensure_guest()
    if assets is not None:
        vm.kernel = vm.kernel or assets.kernel
        vm.initrd = vm.initrd or assets.initrd
    vm.workdir.mkdir(parents=True, exist_ok=True)
    script_path = vm.workdir / f"{FW_CFG_SCRIPT}.sh"
    script_path.write_text(script)
    vm.add_fw_cfg(FW_CFG_SCRIPT, script_path)
    result_port = vm.add_serial_file(vm.workdir / "result.log")
    cmdline = f"console=ttyS0 panic=-1 pyvhost_result=/dev/ttyS{result_port}"
    vm.append = " ".join(p for p in (cmdline, vm.append, append) if p)
    vm.timeout_s = max(vm.timeout_s, timeout + 15)
    started = time.monotonic()
    vm.start()
    try:
        vm.wait(timeout)
    except PeerError as e:
        partial = vm.serial_text(result_port)
        raise GuestError(
            f"guest did not power off within {timeout:g} s\n{e}\nresult port so far:\n"
            f"{partial[-2000:]}\nconsole (tail):\n{vm.console[-3000:]}"
        ) from e
    finally:
        vm.stop()
    duration = time.monotonic() - started
    parsed = parse_result(vm.serial_text(result_port))
    if parsed is None:
        raise GuestError(
            f"guest exited (QEMU status {vm.returncode}) without a result\n"
            f"QEMU stderr:\n{vm.stderr[-2000:]}\nconsole (tail):\n{vm.console[-3000:]}"
        )
    return GuestResult(parsed[0], parsed[1], vm.console, duration)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main(argv: Sequence[str] | None = None) -> int:
    """scripts/fetch-guest: prepare the cache and print where things are."""
    parser = argparse.ArgumentParser(description="Fetch and build the pyvhost test guest.")
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache folder (default: %(default)s)"
    )
    parser.add_argument(
        "--refresh", action="store_true", help="ask apt for a newer kernel than the cached one"
    )
    args = parser.parse_args(argv)
    cache = args.cache or cache_dir()
    try:
        assets = ensure_guest(cache, refresh=args.refresh)
    except PeerError as e:
        print(f"fetch-guest: cannot prepare the guest in {cache}: {e}", file=sys.stderr)
        return 1
    print(f"cache:   {cache} ({_size(cache) / 2**20:.1f} MiB)")
    print(f"kernel:  {assets.kernel} ({assets.version})")
    print(f"initrd:  {assets.initrd} ({assets.initrd.stat().st_size / 2**20:.1f} MiB)")
    return 0
