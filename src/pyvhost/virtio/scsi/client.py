"""SCSI commands over any virtio-scsi request path: :class:`ScsiClient` on a :class:`Transport`.

The transport is whatever puts chains in the rings and gets them back (a driver session on
kernel vhost-scsi or on a vhost-user device, or a test double): it takes device-readable bytes
and device-writable sizes and returns what the device wrote. The client lays each command out
as virtio-scsi wants it (request header and data-out readable, response header and data-in
writable), checks the response and turns failures into :class:`ScsiCommandError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pyvhost.errors import ScsiFormatError, VhostError
from pyvhost.virtio.scsi import commands as cmd
from pyvhost.virtio.scsi.sense import Sense, SenseKey, Status, parse_sense
from pyvhost.virtio.scsi.transport import (
    CONTROL_QUEUE,
    FIRST_REQUEST_QUEUE,
    CmdReq,
    CmdResp,
    Lun,
    Response,
    ScsiConfig,
    TmfReq,
    TmfResp,
    TmfSubtype,
)

__all__ = ["Completion", "ScsiClient", "ScsiCommandError", "Transport"]


class Transport(Protocol):
    """One chain at a time, by token: what :class:`ScsiClient` needs from a driver."""

    def submit(self, queue: int, readable: Sequence[bytes], writable: Sequence[int]) -> int:
        """Put a chain on ``queue``: readable buffers holding these bytes, then writable buffers
        of these sizes; notify the device; return a token for :meth:`wait`."""
        ...

    def wait(self, token: int) -> tuple[int, list[bytes]]:
        """Wait for chain ``token``: the byte count the device reported as written and the
        contents of its writable buffers, in order."""
        ...


class ScsiCommandError(VhostError):
    """A command did not end GOOD: the transport's response, the target's status and sense."""

    def __init__(self, what: str, resp: CmdResp, sense: Sense | None) -> None:
        if resp.response != Response.OK:
            why = resp.response.spec_name
        else:
            why = _status_text(resp.status) + (f", {sense.describe()}" if sense else "")
        super().__init__(f"{what}: {why}")
        self.response = resp.response
        self.status = resp.status
        self.sense = sense


def _status_text(status: int) -> str:
    """``CHECK CONDITION``, or the number of a status SAM does not name."""
    try:
        return Status(status).name.replace("_", " ")
    except ValueError:
        return f"status {status:#04x}"


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished command: the response and the data-in bytes that were transferred."""

    command: cmd.Command
    response: CmdResp
    data: bytes
    sense: Sense | None = None

    @property
    def ok(self) -> bool:
        return self.response.ok


@dataclass
class ScsiClient:
    """Commands to logical unit ``lun`` of ``target`` through ``transport`` (request queue
    ``queue``), with the CDB and sense sizes of ``config``."""

    transport: Transport
    target: int = 1
    lun: int = 0
    queue: int = FIRST_REQUEST_QUEUE
    config: ScsiConfig = field(default_factory=ScsiConfig)
    _tag: int = 0

    @property
    def address(self) -> Lun:
        return Lun(self.target, self.lun)

    def _next_tag(self) -> int:
        self._tag += 1
        return self._tag

    def execute(self, command: cmd.Command) -> Completion:
        """Send ``command`` and wait for it; failures are in the completion, not raised."""
        req = CmdReq(self.address, command.cdb, tag=self._next_tag())
        readable = [req.encode(self.config.cdb_size)]
        if command.data_out:
            readable.append(command.data_out)
        writable = [CmdResp.size(self.config.sense_size)]
        if command.data_in_length:
            writable.append(command.data_in_length)
        _, buffers = self.transport.wait(self.transport.submit(self.queue, readable, writable))
        resp = CmdResp.decode(
            buffers[0], self.config.sense_size, data_in_length=command.data_in_length
        )
        data_in = buffers[1] if len(buffers) > 1 else b""
        data = data_in[: command.data_in_length - resp.resid] if command.data_in_length else b""
        sense = parse_sense(resp.sense) if resp.sense else None
        return Completion(command, resp, data, sense)

    def run(self, command: cmd.Command) -> bytes:
        """Send ``command``; its data-in bytes, or ScsiCommandError when it did not end GOOD."""
        done = self.execute(command)
        if not done.ok:
            where = f"{command.name} to target {self.target} LUN {self.lun}"
            raise ScsiCommandError(where, done.response, done.sense)
        return done.data

    def test_unit_ready(self) -> None:
        """TEST UNIT READY; ScsiCommandError (UNIT ATTENTION after a reset, ...) if not ready."""
        self.run(cmd.test_unit_ready())

    def inquiry(self) -> cmd.Inquiry:
        return cmd.parse_inquiry(self.run(cmd.inquiry()))

    def read_capacity(self) -> cmd.Capacity:
        """READ CAPACITY(16), or (10) for a unit that refuses (16) as ILLEGAL REQUEST."""
        done = self.execute(cmd.read_capacity_16())
        if done.ok:
            return cmd.parse_read_capacity_16(done.data)
        if done.sense is None or done.sense.key != SenseKey.ILLEGAL_REQUEST:
            where = f"READ CAPACITY(16) to target {self.target} LUN {self.lun}"
            raise ScsiCommandError(where, done.response, done.sense)
        return cmd.parse_read_capacity_10(self.run(cmd.read_capacity_10()))

    def report_luns(self) -> list[int]:
        """The LUN numbers of the target, asking again when the first answer was cut short."""
        found = cmd.parse_report_luns(self.run(cmd.report_luns()))
        if found.truncated:
            again = cmd.report_luns(cmd.REPORT_LUNS_HEADER + found.list_length)
            found = cmd.parse_report_luns(self.run(again))
        return found.numbers()

    def read(self, lba: int, blocks: int, block_size: int = cmd.DEFAULT_BLOCK_SIZE) -> bytes:
        """READ(16) of ``blocks`` blocks; all of them, or ScsiFormatError on a short transfer."""
        data = self.run(cmd.read_16(lba, blocks, block_size=block_size))
        if len(data) != blocks * block_size:
            raise ScsiFormatError(
                "virtio_scsi_cmd_resp",
                "resid",
                f"resid leaves {len(data)} of {blocks * block_size} bytes read",
            )
        return data

    def write(self, lba: int, data: bytes, block_size: int = cmd.DEFAULT_BLOCK_SIZE) -> None:
        """WRITE(16) of ``data`` (whole blocks) at ``lba``."""
        self.run(cmd.write_16(lba, data, block_size=block_size))

    def synchronize_cache(self) -> None:
        self.run(cmd.synchronize_cache_10())

    def request_sense(self) -> Sense:
        return parse_sense(self.run(cmd.request_sense()))

    def task_management(self, subtype: TmfSubtype, tag: int = 0) -> Response:
        """A task management function on the control queue; the device's response code."""
        req = TmfReq(subtype, self.address, tag)
        token = self.transport.submit(CONTROL_QUEUE, [req.encode()], [TmfResp.SIZE])
        _, buffers = self.transport.wait(token)
        return TmfResp.decode(buffers[0]).response
