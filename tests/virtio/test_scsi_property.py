"""Property tests of pyvhost.virtio.scsi: every structure survives encode -> decode, CDBs carry
the fields they were built from, parsers read what a device would write, and no input of any
length makes a decoder raise anything but ScsiFormatError."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from pyvhost.errors import ScsiFormatError
from pyvhost.virtio import scsi

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)
luns = st.builds(scsi.Lun, st.integers(0, 255), st.integers(0, 16383))
events = st.builds(scsi.AsyncEvent, st.integers(0, 0x7E))
cdb_sizes = st.integers(16, 260)
sense_sizes = st.integers(0, 252)


@given(luns)
def test_lun_round_trip(lun: scsi.Lun) -> None:
    wire = lun.encode()
    assert len(wire) == 8
    assert scsi.Lun.decode(wire) == lun


requests = st.builds(
    scsi.CmdReq,
    luns,
    st.binary(max_size=16),
    u64,
    st.sampled_from(scsi.TaskAttr),
    u8,
    u8,
)
responses = st.builds(
    scsi.CmdResp,
    st.sampled_from(scsi.Response),
    u8,
    st.binary(max_size=96),
    u32,
    u16,
)


@given(requests, cdb_sizes)
def test_command_request_round_trip(req: scsi.CmdReq, cdb_size: int) -> None:
    wire = req.encode(cdb_size)
    assert len(wire) == scsi.CmdReq.size(cdb_size) == 19 + cdb_size
    back = scsi.CmdReq.decode(wire, cdb_size)
    assert back == dataclasses.replace(req, cdb=req.cdb.ljust(cdb_size, b"\0"))


@given(responses, sense_sizes)
def test_command_response_round_trip(resp: scsi.CmdResp, sense_size: int) -> None:
    resp = dataclasses.replace(resp, sense=resp.sense[:sense_size])
    wire = resp.encode(sense_size)
    assert len(wire) == 12 + sense_size
    assert scsi.CmdResp.decode(wire, sense_size) == resp
    assert scsi.CmdResp.decode(wire) == resp


@given(st.sampled_from(scsi.TmfSubtype), luns, u64, st.sampled_from(scsi.Response))
def test_task_management_round_trip(
    subtype: scsi.TmfSubtype, lun: scsi.Lun, tag: int, response: scsi.Response
) -> None:
    req = scsi.TmfReq(subtype, lun, tag)
    assert scsi.TmfReq.decode(req.encode()) == req
    assert scsi.TmfResp.decode(scsi.TmfResp(response).encode()) == scsi.TmfResp(response)


@given(
    st.sampled_from([scsi.ControlType.AN_QUERY, scsi.ControlType.AN_SUBSCRIBE]),
    luns,
    events,
    events,
    st.sampled_from(scsi.Response),
)
def test_async_notification_round_trip(
    kind: scsi.ControlType,
    lun: scsi.Lun,
    requested: scsi.AsyncEvent,
    actual: scsi.AsyncEvent,
    response: scsi.Response,
) -> None:
    req = scsi.AnReq(kind, lun, requested)
    assert scsi.AnReq.decode(req.encode()) == req
    resp = scsi.AnResp(actual, response)
    assert scsi.AnResp.decode(resp.encode()) == resp


@given(st.sampled_from(scsi.EventType), st.none() | luns, u32, st.booleans())
def test_event_round_trip(
    kind: scsi.EventType, lun: scsi.Lun | None, reason: int, missed: bool
) -> None:
    event = scsi.Event(kind, lun, reason, missed)
    assert scsi.Event.decode(event.encode()) == event


configs = st.builds(
    scsi.ScsiConfig,
    num_queues=st.integers(1, 0xFFFF_FFFF),
    seg_max=u32,
    max_sectors=u32,
    cmd_per_lun=u32,
    event_info_size=u32,
    sense_size=u32,
    cdb_size=u32,
    max_channel=u16,
    max_target=u16,
    max_lun=u32,
)


@given(configs)
def test_config_round_trip(config: scsi.ScsiConfig) -> None:
    assert scsi.ScsiConfig.decode(config.encode()) == config


DECODERS: list[Callable[[bytes], object]] = [
    scsi.Lun.decode,
    scsi.CmdReq.decode,
    scsi.CmdResp.decode,
    lambda data: scsi.CmdResp.decode(data, 96, data_in_length=512),
    scsi.TmfReq.decode,
    scsi.TmfResp.decode,
    scsi.AnReq.decode,
    scsi.AnResp.decode,
    scsi.Event.decode,
    scsi.ScsiConfig.decode,
    scsi.parse_inquiry,
    scsi.parse_read_capacity_10,
    scsi.parse_read_capacity_16,
    lambda data: scsi.parse_report_luns(data).numbers(),
    scsi.parse_sense,
]


@given(st.sampled_from(DECODERS), st.binary(max_size=128))
def test_decoders_raise_only_scsi_format_errors(
    decode: Callable[[bytes], object], data: bytes
) -> None:
    try:
        decode(data)
    except ScsiFormatError as e:
        assert e.field and str(e).startswith(f"{e.structure}: ")


def _cdb_fields(cdb: bytes) -> tuple[int, int, int]:
    """(opcode, LBA, blocks) of a READ/WRITE/SYNCHRONIZE CACHE CDB of 10 or 16 bytes."""
    if len(cdb) == 10:
        opcode, _, lba, _, blocks, _ = struct.unpack(">BBIBHB", cdb)
    else:
        opcode, _, lba, blocks, _, _ = struct.unpack(">BBQIBB", cdb)
    return opcode, lba, blocks


@given(u32, u16, st.sampled_from([512, 4096]), st.booleans())
def test_ten_byte_cdbs_carry_their_fields(lba: int, blocks: int, size: int, fua: bool) -> None:
    read = scsi.read_10(lba, blocks, block_size=size, fua=fua)
    assert _cdb_fields(read.cdb) == (0x28, lba, blocks)
    assert read.cdb[1] == (0x08 if fua else 0)
    assert read.data_in_length == blocks * size
    write = scsi.write_10(lba, bytes(min(blocks, 4) * size), block_size=size)
    assert _cdb_fields(write.cdb) == (0x2A, lba, min(blocks, 4))
    assert _cdb_fields(scsi.synchronize_cache_10(lba, blocks).cdb) == (0x35, lba, blocks)


@given(u64, u32, st.booleans())
def test_sixteen_byte_cdbs_carry_their_fields(lba: int, blocks: int, fua: bool) -> None:
    read = scsi.read_16(lba, blocks, fua=fua)
    assert len(read.cdb) == 16
    assert _cdb_fields(read.cdb) == (0x88, lba, blocks)
    write = scsi.write_16(lba, bytes(512 * (blocks % 3)))
    assert _cdb_fields(write.cdb) == (0x8A, lba, blocks % 3)


@given(u64, st.integers(1, 0xFFFF_FFFF), u8, u8, u16)
def test_read_capacity_16_reads_what_a_device_writes(
    last: int, block: int, prot: int, exps: int, aligned: int
) -> None:
    data = struct.pack(">QIBBH", last, block, prot, exps, aligned) + bytes(16)
    found = scsi.parse_read_capacity_16(data)
    assert (found.last_lba, found.block_size, found.blocks) == (last, block, last + 1)
    assert found.protection == bool(prot & 1)
    assert found.lowest_aligned_lba == aligned & 0x3FFF


@given(st.lists(st.integers(0, 16383), max_size=20), st.integers(0, 20))
def test_report_luns_reads_what_a_device_writes(numbers: list[int], room: int) -> None:
    """LIO writes peripheral addressing below 256 and flat above; the list may be cut short."""
    entries = b"".join(
        (bytes((0, n)) if n < 256 else (0x4000 | n).to_bytes(2, "big")) + bytes(6) for n in numbers
    )
    data = (len(entries)).to_bytes(4, "big") + bytes(4) + entries
    found = scsi.parse_report_luns(data[: 8 + 8 * room])
    assert found.numbers() == numbers[:room]
    assert found.truncated == (room < len(numbers))


@dataclasses.dataclass(frozen=True)
class SenseCase:
    """Sense data as a device would write it: the format, the codes, INFORMATION, padding."""

    key: scsi.SenseKey
    asc: int
    ascq: int
    descriptor: bool
    deferred: bool
    info: int | None
    extra: int

    def encode(self) -> bytes:
        """The bytes that count (without the trailing padding)."""
        if self.descriptor:
            info = self.info
            body = b"" if info is None else bytes((0, 10, 0x80, 0)) + info.to_bytes(8, "big")
            code = 0x73 if self.deferred else 0x72
            return bytes((code, self.key, self.asc, self.ascq, 0, 0, 0, len(body))) + body
        valid = 0x80 if self.info is not None else 0
        head = bytes((valid | (0x71 if self.deferred else 0x70), 0, self.key))
        head += (self.info or 0).to_bytes(4, "big") + bytes((10,))
        return head + bytes(4) + bytes((self.asc, self.ascq)) + bytes(4)


sense_cases = st.builds(
    SenseCase,
    st.sampled_from(scsi.SenseKey),
    u8,
    u8,
    st.booleans(),
    st.booleans(),
    st.none() | u32,
    st.integers(0, 20),
)


@given(sense_cases)
def test_sense_reads_what_a_device_writes(case: SenseCase) -> None:
    """Fixed or descriptor format, with or without INFORMATION, with trailing bytes."""
    wire = case.encode()
    found = scsi.parse_sense(wire + bytes(case.extra))
    assert (found.key, found.asc, found.ascq) == (case.key, case.asc, case.ascq)
    assert (found.descriptor_format, found.deferred, found.information) == (
        case.descriptor,
        case.deferred,
        case.info,
    )
    assert found.raw == wire
