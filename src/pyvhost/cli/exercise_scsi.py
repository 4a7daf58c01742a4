"""``pyvhost exercise scsi --kernel /dev/vhost-scsi --wwpn WWPN``: this process is the VMM and the
guest's virtio-scsi driver against a LIO target through the kernel's vhost-scsi.

TEST UNIT READY (a first UNIT ATTENTION is expected and retried), INQUIRY, READ CAPACITY(16),
REPORT LUNS, WRITE(10) and READ(10) back, then ``--ios`` WRITE(16) + READ(16) pairs of one
``--block-size`` each at successive LBAs, every byte compared, and SYNCHRONIZE CACHE. Each
block written holds :func:`pattern` of its LBA, so what reached the backing store can be checked
from outside. Exits 1 on any failed command or mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pyvhost.driver.scsi import SessionTransport
from pyvhost.driver.session import DriverSession
from pyvhost.errors import VhostError
from pyvhost.kernel.devices import VhostScsi
from pyvhost.virtio import features as vf
from pyvhost.virtio.scsi import commands as cmd
from pyvhost.virtio.scsi.client import ScsiClient, ScsiCommandError
from pyvhost.virtio.scsi.sense import SenseKey
from pyvhost.virtio.scsi.transport import FIRST_REQUEST_QUEUE

__all__ = ["ScsiExerciseOptions", "ScsiExerciseResult", "add_parser", "pattern", "run", "run_scsi"]

MAGIC = b"PVHXSCSI"
_HEAD = struct.Struct("<8sQ")
_MAX_DETAILS = 20
_READY_TRIES = 5


def pattern(lba: int, size: int) -> bytes:
    """What the exercise writes at ``lba``: magic, the LBA, then bytes derived from it."""
    head = _HEAD.pack(MAGIC, lba)
    fill = bytes((lba * 13 + i) & 0xFF for i in range(251))
    return (head + fill * (size // 251 + 1))[:size]


@dataclass
class ScsiExerciseOptions:
    """Which device and target, how much I/O."""

    kernel: str
    wwpn: str
    tpgt: int = 1
    lun: int = 0
    ios: int = 64
    block_size: int = 4096
    start_lba: int = 0
    timeout: float = 30.0


@dataclass
class ScsiExerciseResult:
    """What happened; ``ok`` when every command ended GOOD and every byte compared equal."""

    device: str
    wwpn: str
    commands: int = 0
    errors: int = 0
    iops: float = 0.0
    vendor: str = ""
    product: str = ""
    last_lba: int = 0
    logical_block_size: int = 0
    luns: list[int] = field(default_factory=list)
    written_lbas: list[int] = field(default_factory=list)
    """The LBA of every ``--block-size`` unit written (in logical blocks)."""
    error_details: list[str] = field(default_factory=list)
    ok: bool = False

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_details) < _MAX_DETAILS:
            self.error_details.append(message)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Run:
    def __init__(self, client: ScsiClient, opts: ScsiExerciseOptions, result: ScsiExerciseResult):
        self.client = client
        self.opts = opts
        self.result = result

    def command(self, command: cmd.Command) -> bytes:
        self.result.commands += 1
        return self.client.run(command)

    def ready(self) -> None:
        """TEST UNIT READY until GOOD: a new I_T nexus first reports UNIT ATTENTION."""
        for attempt in range(_READY_TRIES):
            try:
                self.command(cmd.test_unit_ready())
                return
            except ScsiCommandError as exc:
                attention = exc.sense is not None and exc.sense.key == SenseKey.UNIT_ATTENTION
                if not attention or attempt == _READY_TRIES - 1:
                    raise

    def identify(self) -> None:
        result = self.result
        inquiry = cmd.parse_inquiry(self.command(cmd.inquiry()))
        result.vendor, result.product = inquiry.vendor, inquiry.product
        capacity = cmd.parse_read_capacity_16(self.command(cmd.read_capacity_16()))
        result.last_lba, result.logical_block_size = capacity.last_lba, capacity.block_size
        result.luns = cmd.parse_report_luns(self.command(cmd.report_luns())).numbers()
        if self.opts.lun not in result.luns:
            result.error(f"REPORT LUNS: LUN {self.opts.lun} not listed ({result.luns})")

    def write_read(self, lba: int, sixteen: bool) -> None:
        """One unit written and read back with (10) or (16) CDBs, compared."""
        bs, size = self.result.logical_block_size, self.opts.block_size
        data = pattern(lba, size)
        write, read = (cmd.write_16, cmd.read_16) if sixteen else (cmd.write_10, cmd.read_10)
        self.command(write(lba, data, block_size=bs))
        self.result.written_lbas.append(lba)
        back = self.command(read(lba, size // bs, block_size=bs))
        if back != data:
            first = next((i for i, (a, b) in enumerate(zip(back, data, strict=False)) if a != b), 0)
            self.result.error(
                f"READ at LBA {lba}: {len(back)} bytes differ from what was written "
                f"(first difference at byte {first})"
            )

    def io(self) -> None:
        opts, result = self.opts, self.result
        per = opts.block_size // result.logical_block_size
        units = (result.last_lba + 1 - opts.start_lba) // per
        if units < 2:
            raise ValueError(f"the LUN has room for {units} unit(s) of {opts.block_size} bytes")
        self.write_read(opts.start_lba, sixteen=False)
        start, before = time.monotonic(), result.commands
        for i in range(opts.ios):
            self.write_read(opts.start_lba + (1 + i % (units - 1)) * per, sixteen=True)
        elapsed = time.monotonic() - start
        result.iops = round((result.commands - before) / elapsed, 1) if elapsed > 0 else 0.0
        self.command(cmd.synchronize_cache_10())


def run_scsi(opts: ScsiExerciseOptions) -> ScsiExerciseResult:
    """Attach to the target, run the commands, detach; device errors raise VhostError."""
    if opts.block_size <= 0 or opts.ios < 0:
        raise ValueError("--block-size must be positive and --ios not negative")
    result = ScsiExerciseResult(opts.kernel, opts.wwpn)
    device = VhostScsi(opts.kernel)
    with contextlib.ExitStack() as stack:
        stack.callback(device.close)
        # T10-PI would change the request header; events are not read here.
        mask = ~vf.bit_mask(vf.SCSI_F_T10_PI, vf.SCSI_F_HOTPLUG, vf.SCSI_F_CHANGE)
        session = DriverSession.kernel(
            device, num_queues=FIRST_REQUEST_QUEUE + 1, queue_size=128, features_mask=mask
        )
        stack.callback(session.close)
        device.set_endpoint(opts.wwpn, opts.tpgt)
        stack.callback(_detach, device, opts)
        transport = SessionTransport(session, timeout=opts.timeout)
        client = ScsiClient(transport, target=opts.tpgt, lun=opts.lun)
        run = _Run(client, opts, result)
        try:
            run.ready()
            run.identify()
            if opts.block_size % result.logical_block_size:
                raise ValueError(
                    f"--block-size {opts.block_size} is not a multiple of the LUN's "
                    f"{result.logical_block_size}-byte blocks"
                )
            run.io()
        except ScsiCommandError as exc:
            result.error(str(exc))
    result.ok = result.errors == 0
    return result


def _detach(device: VhostScsi, opts: ScsiExerciseOptions) -> None:
    with contextlib.suppress(VhostError):
        device.clear_endpoint(opts.wwpn, opts.tpgt)


def add_parser(devices: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``exercise scsi`` to the ``exercise`` sub-commands."""
    scsi = devices.add_parser(
        "scsi",
        help="SCSI commands through kernel vhost-scsi to a LIO target, data verified",
        description=__doc__,
    )
    scsi.add_argument("--kernel", required=True, metavar="DEV", help="e.g. /dev/vhost-scsi")
    scsi.add_argument("--wwpn", required=True, help="the LIO vhost target, e.g. naa.5001405...")
    scsi.add_argument("--tpgt", type=int, default=1, help="portal group tag = target id")
    scsi.add_argument("--lun", type=int, default=0, help="logical unit (default 0)")
    scsi.add_argument("--ios", type=int, default=64, help="WRITE+READ pairs (default 64)")
    scsi.add_argument("--block-size", type=int, default=4096, help="bytes per I/O (default 4096)")
    scsi.add_argument("--start-lba", type=int, default=0, help="first LBA used (default 0)")
    scsi.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> ScsiExerciseResult:
    """Options from the command line, then :func:`run_scsi`."""
    return run_scsi(
        ScsiExerciseOptions(
            kernel=args.kernel,
            wwpn=args.wwpn,
            tpgt=args.tpgt,
            lun=args.lun,
            ios=args.ios,
            block_size=args.block_size,
            start_lba=args.start_lba,
        )
    )


def format_report(result: ScsiExerciseResult) -> str:
    """The human-readable summary."""
    who = f"{result.vendor} {result.product}".strip()
    lines = [
        f"exercise scsi: {result.device} -> {result.wwpn}: {who}",
        f"  capacity: {result.last_lba + 1} blocks of {result.logical_block_size} bytes, "
        f"LUNs {result.luns}",
        f"  {result.commands} commands, {result.iops:.0f} IOPS in the write/read loop",
    ]
    lines.extend(f"  error: {e}" for e in result.error_details)
    lines.append("  OK" if result.ok else f"  FAILED: {result.errors} error(s)")
    return "\n".join(lines)
