"""ScsiClient over a Transport: a small in-process SCSI target (a disk in a bytearray) stands in
for the rings, so every command's layout, its data and its failures are checked end to end."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from pyvhost.errors import ScsiFormatError
from pyvhost.virtio import scsi
from pyvhost.virtio.scsi.client import ScsiClient, ScsiCommandError

BLOCK = 512


def check_condition(key: scsi.SenseKey, asc: int, ascq: int = 0) -> scsi.CmdResp:
    """CHECK CONDITION with 18 bytes of fixed sense data."""
    sense = (
        bytes((0x70, 0, key)) + bytes(4) + bytes((10,)) + bytes(4) + bytes((asc, ascq, 0, 0, 0, 0))
    )
    return scsi.CmdResp(scsi.Response.OK, scsi.Status.CHECK_CONDITION, sense)


@dataclass
class FakeTarget:
    """Target 1, LUN 0: a disk of ``blocks`` blocks; every chain completes at submit time."""

    blocks: int = 64
    config: scsi.ScsiConfig = field(default_factory=scsi.ScsiConfig)
    refuse_16: bool = False
    short_read: int = 0
    luns: Sequence[int] = (0,)
    disk: bytearray = field(init=False)
    chains: list[tuple[int, list[bytes], list[int]]] = field(default_factory=list)
    done: dict[int, list[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.disk = bytearray(self.blocks * BLOCK)

    def submit(self, queue: int, readable: Sequence[bytes], writable: Sequence[int]) -> int:
        token = len(self.chains)
        self.chains.append((queue, list(readable), list(writable)))
        out = self._control(readable) if queue == scsi.CONTROL_QUEUE else self._request(readable)
        out = (out + [b""] * len(writable))[: len(writable)]
        self.done[token] = [
            piece.ljust(size, b"\0")[:size] for piece, size in zip(out, writable, strict=True)
        ]
        return token

    def wait(self, token: int) -> tuple[int, list[bytes]]:
        buffers = self.done.pop(token)
        return sum(map(len, buffers)), buffers

    def _control(self, readable: Sequence[bytes]) -> list[bytes]:
        req = scsi.TmfReq.decode(readable[0])
        ok = req.lun == scsi.Lun(1, 0)
        code = scsi.Response.FUNCTION_SUCCEEDED if ok else scsi.Response.INCORRECT_LUN
        return [scsi.TmfResp(code).encode()]

    def _request(self, readable: Sequence[bytes]) -> list[bytes]:
        req = scsi.CmdReq.decode(readable[0], self.config.cdb_size)
        data_out = b"".join(readable[1:])
        if req.lun.target != 1:
            return [scsi.CmdResp(scsi.Response.BAD_TARGET).encode(self.config.sense_size)]
        resp, data = self._execute(req.cdb, data_out)
        return [resp.encode(self.config.sense_size), data]

    def _execute(self, cdb: bytes, data_out: bytes) -> tuple[scsi.CmdResp, bytes]:
        handler = HANDLERS.get(cdb[0])
        if handler is None or (self.refuse_16 and cdb[0] == scsi.Opcode.SERVICE_ACTION_IN_16):
            return check_condition(scsi.SenseKey.ILLEGAL_REQUEST, 0x20), b""
        return handler(self, cdb, data_out)

    def _inquiry(self, cdb: bytes, _: bytes) -> tuple[scsi.CmdResp, bytes]:
        data = bytes((0, 0, 6, 2, 31, 0, 0, 2)) + b"PYVHOST " + b"FAKE DISK".ljust(16) + b"0.1 "
        return self._data_in(data, int.from_bytes(cdb[3:5], "big"))

    def _capacity_16(self, cdb: bytes, _: bytes) -> tuple[scsi.CmdResp, bytes]:
        data = struct.pack(">QI", self.blocks - 1, BLOCK) + bytes(20)
        return self._data_in(data, int.from_bytes(cdb[10:14], "big"))

    def _capacity_10(self, cdb: bytes, _: bytes) -> tuple[scsi.CmdResp, bytes]:
        return self._data_in(struct.pack(">II", self.blocks - 1, BLOCK), 8)

    def _report_luns(self, cdb: bytes, _: bytes) -> tuple[scsi.CmdResp, bytes]:
        entries = b"".join(
            (bytes((0, n)) if n < 256 else (0x4000 | n).to_bytes(2, "big")) + bytes(6)
            for n in self.luns
        )
        data = len(entries).to_bytes(4, "big") + bytes(4) + entries
        return self._data_in(data, int.from_bytes(cdb[6:10], "big"))

    def _rw(self, cdb: bytes, data_out: bytes) -> tuple[scsi.CmdResp, bytes]:
        if cdb[0] in (scsi.Opcode.READ_16, scsi.Opcode.WRITE_16):
            lba, blocks = struct.unpack_from(">QI", cdb, 2)
        else:
            lba, blocks = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
        if lba + blocks > self.blocks:
            return check_condition(scsi.SenseKey.ILLEGAL_REQUEST, 0x21), b""
        span = slice(lba * BLOCK, (lba + blocks) * BLOCK)
        if cdb[0] in (scsi.Opcode.WRITE_10, scsi.Opcode.WRITE_16):
            self.disk[span] = data_out
            return scsi.CmdResp(scsi.Response.OK), b""
        data = bytes(self.disk[span])
        if self.short_read:
            return scsi.CmdResp(scsi.Response.OK, resid=self.short_read), data[: -self.short_read]
        return scsi.CmdResp(scsi.Response.OK), data

    def _good(self, cdb: bytes, _: bytes) -> tuple[scsi.CmdResp, bytes]:
        return scsi.CmdResp(scsi.Response.OK), b""

    def _sense(self, cdb: bytes, _: bytes) -> tuple[scsi.CmdResp, bytes]:
        no_sense = bytes((0x70, 0, 0)) + bytes(4) + bytes((10,)) + bytes(10)
        return self._data_in(no_sense, cdb[4])

    @staticmethod
    def _data_in(data: bytes, allocation: int) -> tuple[scsi.CmdResp, bytes]:
        sent = data[:allocation]
        return scsi.CmdResp(scsi.Response.OK, resid=allocation - len(sent)), sent


Handler = Callable[[FakeTarget, bytes, bytes], tuple[scsi.CmdResp, bytes]]
HANDLERS: dict[int, Handler] = {
    scsi.Opcode.TEST_UNIT_READY: FakeTarget._good,
    scsi.Opcode.SYNCHRONIZE_CACHE_10: FakeTarget._good,
    scsi.Opcode.INQUIRY: FakeTarget._inquiry,
    scsi.Opcode.SERVICE_ACTION_IN_16: FakeTarget._capacity_16,
    scsi.Opcode.READ_CAPACITY_10: FakeTarget._capacity_10,
    scsi.Opcode.REPORT_LUNS: FakeTarget._report_luns,
    scsi.Opcode.READ_10: FakeTarget._rw,
    scsi.Opcode.READ_16: FakeTarget._rw,
    scsi.Opcode.WRITE_10: FakeTarget._rw,
    scsi.Opcode.WRITE_16: FakeTarget._rw,
    scsi.Opcode.REQUEST_SENSE: FakeTarget._sense,
}


def test_a_disk_session() -> None:
    target = FakeTarget()
    client = ScsiClient(target)
    client.test_unit_ready()
    found = client.inquiry()
    assert (found.vendor, found.product, found.revision) == ("PYVHOST", "FAKE DISK", "0.1")
    capacity = client.read_capacity()
    assert (capacity.blocks, capacity.block_size) == (64, 512)
    assert client.report_luns() == [0]
    data = bytes(range(256)) * 8
    client.write(10, data)
    assert client.read(10, 4) == data
    assert client.read(9, 1) == bytes(BLOCK)
    client.synchronize_cache()
    assert client.request_sense().key is scsi.SenseKey.NO_SENSE


def test_chains_are_laid_out_as_virtio_scsi_wants() -> None:
    """Request header then data-out readable; response header then data-in writable; tags
    count up; the request queue is the first one after control and event."""
    target = FakeTarget()
    client = ScsiClient(target)
    client.write(0, bytes(BLOCK))
    client.read(0, 1)
    client.test_unit_ready()
    (q1, r1, w1), (q2, r2, w2), (q3, r3, w3) = target.chains
    assert (q1, q2, q3) == (2, 2, 2)
    assert [len(b) for b in r1] == [51, 512] and w1 == [108]
    assert [len(b) for b in r2] == [51] and w2 == [108, 512]
    assert [len(b) for b in r3] == [51] and w3 == [108]
    tags = [scsi.CmdReq.decode(r[0]).tag for r in (r1, r2, r3)]
    assert tags == [1, 2, 3]


def test_config_sizes_are_used() -> None:
    config = scsi.ScsiConfig(cdb_size=16, sense_size=32)
    target = FakeTarget(config=config)
    ScsiClient(target, config=config).test_unit_ready()
    _, readable, writable = target.chains[0]
    assert (len(readable[0]), writable) == (35, [44])


def test_failures_say_what_and_why() -> None:
    client = ScsiClient(FakeTarget())
    with pytest.raises(ScsiCommandError) as caught:
        client.read(60, 8)
    assert str(caught.value) == (
        "READ(16) to target 1 LUN 0: CHECK CONDITION, ILLEGAL REQUEST: "
        "Logical block address out of range (21h/00h)"
    )
    assert caught.value.sense is not None and caught.value.sense.asc == 0x21
    done = client.execute(scsi.Command("VENDOR", bytes((0xC0,)) + bytes(5)))
    assert not done.ok and done.sense is not None and done.sense.asc == 0x20
    with pytest.raises(
        ScsiCommandError, match="INQUIRY to target 2 LUN 0: VIRTIO_SCSI_S_BAD_TARGET"
    ):
        ScsiClient(FakeTarget(), target=2).inquiry()


def test_read_capacity_falls_back_to_10() -> None:
    target = FakeTarget(refuse_16=True, blocks=128)
    assert ScsiClient(target).read_capacity().blocks == 128
    assert [r[0][19] for _, r, _ in target.chains] == [0x9E, 0x25]


def test_report_luns_asks_again_when_cut_short() -> None:
    target = FakeTarget(luns=range(600))
    assert ScsiClient(target).report_luns() == list(range(600))
    lengths = [int.from_bytes(r[0][19 + 6 : 19 + 10], "big") for _, r, _ in target.chains]
    assert lengths == [4096, 8 + 600 * 8]


def test_a_short_read_is_an_error() -> None:
    client = ScsiClient(FakeTarget(short_read=100))
    with pytest.raises(ScsiFormatError, match="resid leaves 412 of 512 bytes read"):
        client.read(0, 1)
    assert len(client.execute(scsi.read_10(0, 1)).data) == 412


def test_task_management_on_the_control_queue() -> None:
    target = FakeTarget()
    client = ScsiClient(target)
    assert (
        client.task_management(scsi.TmfSubtype.LOGICAL_UNIT_RESET)
        is scsi.Response.FUNCTION_SUCCEEDED
    )
    assert target.chains[-1][0] == scsi.CONTROL_QUEUE
    other = ScsiClient(target, lun=3)
    assert other.task_management(scsi.TmfSubtype.ABORT_TASK, tag=9) is scsi.Response.INCORRECT_LUN
