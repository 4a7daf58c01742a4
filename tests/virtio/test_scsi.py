"""virtio-scsi encoding (pyvhost.virtio.scsi): numbers and layouts against the C headers of this
machine, CDBs and parsed data against hand-made known answers, and the errors for malformed data.
Round trips over generated values are in test_scsi_property.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyvhost.errors import ScsiFormatError, VhostError
from pyvhost.virtio import features as vf
from pyvhost.virtio import scsi
from pyvhost.virtio.scsi import client, commands, sense, transport

VIRTIO_HEADER = Path("/usr/include/linux/virtio_scsi.h")
SCSI_HEADER = Path("/usr/include/scsi/scsi.h")

STRUCTS: dict[str, tuple[int, dict[str, int]]] = {
    "virtio_scsi_cmd_req": (
        scsi.CmdReq.size(),
        {"lun": 0, "tag": 8, "task_attr": 16, "prio": 17, "crn": 18, "cdb": 19},
    ),
    "virtio_scsi_cmd_resp": (
        scsi.CmdResp.size(),
        {
            "sense_len": 0,
            "resid": 4,
            "status_qualifier": 8,
            "status": 10,
            "response": 11,
            "sense": 12,
        },
    ),
    "virtio_scsi_ctrl_tmf_req": (
        scsi.TmfReq.SIZE,
        {"type": 0, "subtype": 4, "lun": 8, "tag": 16},
    ),
    "virtio_scsi_ctrl_tmf_resp": (scsi.TmfResp.SIZE, {"response": 0}),
    "virtio_scsi_ctrl_an_req": (
        scsi.AnReq.SIZE,
        {"type": 0, "lun": 4, "event_requested": 12},
    ),
    "virtio_scsi_ctrl_an_resp": (scsi.AnResp.SIZE, {"event_actual": 0, "response": 4}),
    "virtio_scsi_event": (scsi.Event.SIZE, {"event": 0, "lun": 4, "reason": 12}),
    "virtio_scsi_config": (
        scsi.ScsiConfig.SIZE,
        {
            "num_queues": 0,
            "seg_max": 4,
            "max_sectors": 8,
            "cmd_per_lun": 12,
            "event_info_size": 16,
            "sense_size": 20,
            "cdb_size": 24,
            "max_channel": 28,
            "max_target": 30,
            "max_lun": 32,
        },
    ),
}


def virtio_constants() -> dict[str, int]:
    """Every VIRTIO_SCSI_* number of the header, as pyvhost spells it."""
    found = {
        "VIRTIO_SCSI_CDB_DEFAULT_SIZE": scsi.CDB_DEFAULT_SIZE,
        "VIRTIO_SCSI_SENSE_DEFAULT_SIZE": scsi.SENSE_DEFAULT_SIZE,
        "VIRTIO_SCSI_T_EVENTS_MISSED": scsi.EVENTS_MISSED,
        "VIRTIO_SCSI_F_INOUT": vf.SCSI_F_INOUT,
        "VIRTIO_SCSI_F_HOTPLUG": vf.SCSI_F_HOTPLUG,
        "VIRTIO_SCSI_F_CHANGE": vf.SCSI_F_CHANGE,
        "VIRTIO_SCSI_F_T10_PI": vf.SCSI_F_T10_PI,
    }
    for kind in (
        scsi.Response,
        scsi.TaskAttr,
        scsi.ControlType,
        scsi.TmfSubtype,
        scsi.EventType,
        scsi.ResetReason,
    ):
        found.update({member.spec_name: int(member) for member in kind})
    return found


SCSI_OPCODES = {
    "TEST_UNIT_READY": scsi.Opcode.TEST_UNIT_READY,
    "REQUEST_SENSE": scsi.Opcode.REQUEST_SENSE,
    "INQUIRY": scsi.Opcode.INQUIRY,
    "READ_CAPACITY": scsi.Opcode.READ_CAPACITY_10,
    "READ_10": scsi.Opcode.READ_10,
    "WRITE_10": scsi.Opcode.WRITE_10,
    "SYNCHRONIZE_CACHE": scsi.Opcode.SYNCHRONIZE_CACHE_10,
}
"""The opcodes glibc's <scsi/scsi.h> has (READ_16, WRITE_16, SERVICE_ACTION_IN_16 and
REPORT_LUNS are only in the kernel's scsi_proto.h: see test_opcodes_not_in_glibc)."""


@pytest.fixture(scope="module")
def from_c(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Sizes, offsets and constants as the C compiler sees the headers."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not VIRTIO_HEADER.exists() or not SCSI_HEADER.exists():
        pytest.skip("needs a C compiler, linux-libc-dev and libc6-dev")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/virtio_scsi.h>",
        "#include <scsi/scsi.h>",
        "int main(void) {",
    ]
    for struct_name, (_, fields) in STRUCTS.items():
        lines.append(f' printf("{struct_name} %zu\\n", sizeof(struct {struct_name}));')
        for field in fields:
            key = f"{struct_name}.{field}"
            lines.append(f' printf("{key} %zu\\n", offsetof(struct {struct_name}, {field}));')
    for name in [*virtio_constants(), *SCSI_OPCODES, *(k.name for k in scsi.SenseKey)]:
        lines.append(f'#ifdef {name}\n printf("{name} %lu\\n", (unsigned long)({name}));\n#endif')
    lines.append(" return 0;\n}")
    folder = tmp_path_factory.mktemp("virtio-scsi-h")
    source, binary = folder / "scsi.c", folder / "scsi"
    source.write_text("\n".join(lines))
    subprocess.run([cc, "-o", str(binary), str(source)], check=True, capture_output=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def test_struct_sizes_and_offsets_match_the_header(from_c: dict[str, int]) -> None:
    for struct_name, (size, fields) in STRUCTS.items():
        assert size == from_c[struct_name], struct_name
        for field, offset in fields.items():
            assert offset == from_c[f"{struct_name}.{field}"], f"{struct_name}.{field}"


def test_every_constant_matches_the_header(from_c: dict[str, int]) -> None:
    constants = virtio_constants()
    assert len(constants) == 42
    for name, value in constants.items():
        assert from_c[name] == value, name


def test_opcodes_and_sense_keys_match_glibc(from_c: dict[str, int]) -> None:
    for name, opcode in SCSI_OPCODES.items():
        assert from_c[name] == opcode, name
    in_header = [key for key in scsi.SenseKey if key.name in from_c]
    assert len(in_header) == 13
    for key in in_header:
        assert from_c[key.name] == key, key.name


def test_opcodes_not_in_glibc() -> None:
    """From Linux include/scsi/scsi_proto.h (SPC/SBC): not in this machine's headers."""
    assert (scsi.Opcode.READ_16, scsi.Opcode.WRITE_16) == (0x88, 0x8A)
    assert (scsi.Opcode.SERVICE_ACTION_IN_16, commands.SAI_READ_CAPACITY_16) == (0x9E, 0x10)
    assert int(scsi.Opcode.REPORT_LUNS) == 0xA0


def test_numbers_the_header_leaves_out() -> None:
    """SAM status (scsi_proto.h's enum sam_status; glibc's scsi.h has them shifted right by one)
    and the asynchronous notification classes of the virtio spec."""
    assert [int(s) for s in scsi.Status] == [0, 2, 4, 8, 0x18, 0x28, 0x30, 0x40]
    assert [int(e) for e in scsi.AsyncEvent] == [2, 4, 8, 16, 32, 64]
    assert (scsi.SenseKey.EQUAL, scsi.SenseKey.COMPLETED) == (0xC, 0xF)


def test_feature_names_know_scsi() -> None:
    assert vf.feature_names(0b1011 | 1 << vf.F_VERSION_1, "scsi") == [
        "INOUT",
        "HOTPLUG",
        "T10_PI",
        "VERSION_1",
    ]


# --- the transport ------------------------------------------------------------------------------


def test_lun_field_as_vhost_scsi_expects() -> None:
    """GUEST.md: ``[1, tpgt, 0x40 | lun >> 8, lun & 0xff, 0, 0, 0, 0]``."""
    assert scsi.Lun(1, 0).encode() == bytes.fromhex("0101400000000000")
    assert scsi.Lun(255, 16383).encode() == bytes.fromhex("01ff7fff00000000")
    assert scsi.Lun.decode(bytes.fromhex("0103400200000000")) == scsi.Lun(3, 2)
    assert scsi.Lun.decode(bytes.fromhex("0103000700000000")) == scsi.Lun(3, 7)


@pytest.mark.parametrize(
    ("target", "lun", "message"),
    [(256, 0, "target 256 is not in 0..255"), (0, 16384, "LUN 16384 is not in 0..16383")],
)
def test_lun_out_of_range(target: int, lun: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scsi.Lun(target, lun)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("0001400000000000", "lun byte 0 is 0, expected 1"),
        ("0101400000000001", "lun bytes 4..7 are 00000001, not 0"),
        ("0101c10100000000", "lun bytes 2..3 c101 are not a flat or peripheral LUN"),
        ("01014000", "length 4, expected 8"),
    ],
)
def test_lun_decode_refuses(raw: str, message: str) -> None:
    with pytest.raises(ScsiFormatError, match=message) as caught:
        scsi.Lun.decode(bytes.fromhex(raw), "virtio_scsi_cmd_req")
    assert str(caught.value).startswith("virtio_scsi_cmd_req: ")


def test_command_request_layout() -> None:
    req = scsi.CmdReq(
        scsi.Lun(1, 0), scsi.inquiry(36).cdb, tag=0x1122, task_attr=scsi.TaskAttr.HEAD
    )
    wire = req.encode()
    assert len(wire) == 51
    assert wire[:8] == bytes.fromhex("0101400000000000")
    assert wire[8:16] == (0x1122).to_bytes(8, "little")
    assert wire[16:19] == bytes((2, 0, 0))
    assert wire[19:] == bytes.fromhex("120000002400") + bytes(26)
    assert len(req.encode(cdb_size=16)) == 35
    with pytest.raises(ValueError, match="CDB of 16 bytes does not fit cdb_size 10"):
        scsi.CmdReq(scsi.Lun(1, 0), scsi.read_16(0, 1).cdb).encode(cdb_size=10)


def test_command_response_decode() -> None:
    fixed = bytes.fromhex("700005000000000a00000000240000000000")
    wire = (
        len(fixed).to_bytes(4, "little")
        + (512).to_bytes(4, "little")
        + bytes((0, 0, 2, 0))
        + fixed.ljust(96, b"\0")
    )
    resp = scsi.CmdResp.decode(wire, 96, data_in_length=4096)
    assert resp == scsi.CmdResp(scsi.Response.OK, 2, fixed, 512)
    assert not resp.ok
    assert (
        scsi.parse_sense(resp.sense).describe() == "ILLEGAL REQUEST: Invalid field in CDB (24h/00h)"
    )
    assert scsi.CmdResp(scsi.Response.OK).ok
    assert not scsi.CmdResp(scsi.Response.BAD_TARGET).ok


@pytest.mark.parametrize(
    ("wire", "kwargs", "field", "message"),
    [
        (bytes(11), {}, "length", "virtio_scsi_cmd_resp: length 11, expected at least 12"),
        (
            bytes((97, 0, 0, 0)) + bytes(8) + bytes(96),
            {"sense_size": 96},
            "sense_len",
            "virtio_scsi_cmd_resp: sense_len 97 exceeds the 96-byte sense area",
        ),
        (
            bytes((9, 0, 0, 0)) + bytes(8) + bytes(8),
            {},
            "sense_len",
            "sense_len 9 exceeds the 8-byte sense area",
        ),
        (
            bytes(4) + (600).to_bytes(4, "little") + bytes(4) + bytes(96),
            {"data_in_length": 512},
            "resid",
            "virtio_scsi_cmd_resp: resid 600 exceeds the 512-byte data-in buffer",
        ),
        (
            bytes(11) + b"\x0d" + bytes(96),
            {},
            "response",
            "virtio_scsi_cmd_resp: response 13 is not a Response value",
        ),
    ],
)
def test_command_response_malformed(
    wire: bytes, kwargs: dict[str, int], field: str, message: str
) -> None:
    with pytest.raises(ScsiFormatError) as caught:
        scsi.CmdResp.decode(wire, **kwargs)
    assert caught.value.field == field
    assert caught.value.structure == "virtio_scsi_cmd_resp"
    assert message in str(caught.value)
    assert isinstance(caught.value, VhostError)


def test_command_response_encode_limits() -> None:
    assert len(scsi.CmdResp(scsi.Response.OK, sense=bytes(18)).encode()) == 108
    with pytest.raises(ValueError, match="sense of 97 bytes does not fit sense_size 96"):
        scsi.CmdResp(scsi.Response.OK, sense=bytes(97)).encode()
    with pytest.raises(ValueError, match=r"status 256 is not in 0\.\.255"):
        scsi.CmdResp(scsi.Response.OK, status=256).encode()


def test_control_requests_layout() -> None:
    tmf = scsi.TmfReq(scsi.TmfSubtype.ABORT_TASK, scsi.Lun(1, 0), tag=7)
    assert tmf.encode() == bytes(8) + bytes.fromhex("0101400000000000") + bytes((7,)) + bytes(7)
    assert scsi.TmfResp.decode(b"\x0a").response is scsi.Response.FUNCTION_SUCCEEDED
    an = scsi.AnReq(scsi.ControlType.AN_SUBSCRIBE, scsi.Lun(1, 0), scsi.AsyncEvent.MEDIA_CHANGE)
    assert an.encode() == bytes((2, 0, 0, 0)) + scsi.Lun(1, 0).encode() + bytes((16, 0, 0, 0))
    resp = scsi.AnResp.decode(bytes((16 | 2, 0, 0, 0, 0)))
    assert resp.event_actual == scsi.AsyncEvent.MEDIA_CHANGE | scsi.AsyncEvent.OPERATIONAL_CHANGE
    with pytest.raises(ValueError, match="AN_QUERY or AN_SUBSCRIBE"):
        scsi.AnReq(scsi.ControlType.TMF, scsi.Lun(1, 0), scsi.AsyncEvent(0))


@pytest.mark.parametrize(
    ("decode", "wire", "message"),
    [
        (
            scsi.TmfReq.decode,
            bytes((1,)) + bytes(23),
            r"virtio_scsi_ctrl_tmf_req: type 1, expected VIRTIO_SCSI_T_TMF \(0\)",
        ),
        (
            scsi.TmfReq.decode,
            bytes(4) + bytes((8,)) + bytes(3) + scsi.Lun(1, 0).encode() + bytes(8),
            "virtio_scsi_ctrl_tmf_req: subtype 8 is not a TmfSubtype value",
        ),
        (scsi.TmfResp.decode, b"", "virtio_scsi_ctrl_tmf_resp: length 0, expected 1"),
        (scsi.AnReq.decode, bytes(16), r"type 0 is not AN_QUERY \(1\) or AN_SUBSCRIBE \(2\)"),
        (scsi.AnResp.decode, bytes(4) + b"\x63", "response 99 is not a Response value"),
        (
            scsi.Event.decode,
            bytes((4,)) + bytes(15),
            "virtio_scsi_event: event 4 is not a EventType value",
        ),
        (scsi.ScsiConfig.decode, bytes(35), "virtio_scsi_config: length 35, expected 36"),
        (scsi.ScsiConfig.decode, bytes(36), "num_queues is 0: no request queue"),
    ],
)
def test_control_and_event_malformed(decode: object, wire: bytes, message: str) -> None:
    assert callable(decode)
    with pytest.raises(ScsiFormatError, match=message):
        decode(wire)


def test_events_as_vhost_scsi_sends_them() -> None:
    """A hot-plug rescan of LUN 0 behind TPG 1 (vhost_scsi_send_evt: peripheral LUN below 256),
    and the NO_EVENT with EVENTS_MISSED it sends when a kick finds events were dropped."""
    rescan = bytes((1, 0, 0, 0)) + bytes.fromhex("0101000000000000") + bytes((1, 0, 0, 0))
    assert scsi.Event.decode(rescan) == scsi.Event(
        scsi.EventType.TRANSPORT_RESET, scsi.Lun(1, 0), scsi.ResetReason.RESCAN
    )
    missed = scsi.Event.decode((0x8000_0000).to_bytes(4, "little") + bytes(12))
    assert missed == scsi.Event(scsi.EventType.NO_EVENT, None, 0, missed=True)
    assert missed.encode() == (0x8000_0000).to_bytes(4, "little") + bytes(12)


def test_config_defaults_and_queue_count() -> None:
    config = scsi.ScsiConfig()
    assert (config.sense_size, config.cdb_size, config.event_info_size) == (96, 32, 16)
    assert config.queue_count == 3
    assert scsi.ScsiConfig.decode(config.encode()) == config
    assert scsi.ScsiConfig(num_queues=4).queue_count == 6
    assert (scsi.CONTROL_QUEUE, scsi.EVENT_QUEUE, scsi.FIRST_REQUEST_QUEUE) == (0, 1, 2)


# --- the commands --------------------------------------------------------------------------------

CDBS = [
    (scsi.test_unit_ready(), "000000000000", 0),
    (scsi.inquiry(), "120000006000", 96),
    (scsi.inquiry(255, page=0x83), "12018300ff00", 255),
    (scsi.request_sense(), "030000006000", 96),
    (scsi.request_sense(252, descriptor=True), "03010000fc00", 252),
    (scsi.read_capacity_10(), "25000000000000000000", 8),
    (scsi.read_capacity_16(), "9e100000000000000000000000200000", 32),
    (scsi.report_luns(), "a00000000000000010000000", 4096),
    (scsi.read_10(0x12345678, 8), "28001234567800000800", 4096),
    (scsi.read_10(1, 1, fua=True, block_size=4096), "28080000000100000100", 4096),
    (scsi.read_16(1 << 40, 0x10000), "88000000010000000000000100000000", 1 << 25),
    (scsi.synchronize_cache_10(), "35000000000000000000", 0),
    (scsi.synchronize_cache_10(100, 8, immed=True), "35020000006400000800", 0),
]


@pytest.mark.parametrize(("command", "cdb", "data_in"), CDBS, ids=lambda v: getattr(v, "name", ""))
def test_cdbs_byte_for_byte(command: scsi.Command, cdb: str, data_in: int) -> None:
    assert command.cdb == bytes.fromhex(cdb)
    assert command.data_in_length == data_in
    assert command.data_out == b""


def test_writes_carry_their_data() -> None:
    data = bytes(range(256)) * 4
    w10 = scsi.write_10(7, data)
    assert w10.cdb == bytes.fromhex("2a000000000700000200")
    assert (w10.data_out, w10.data_in_length) == (data, 0)
    w16 = scsi.write_16(7, data, block_size=1024, fua=True)
    assert w16.cdb == bytes.fromhex("8a080000000000000007000000010000")
    with pytest.raises(ValueError, match="data of 100 bytes is not whole blocks of 512"):
        scsi.write_10(0, bytes(100))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: scsi.read_10(1 << 32, 1), "lba 4294967296 is not in 0..4294967295"),
        (lambda: scsi.read_10(0, 1 << 16), "blocks 65536 is not in 0..65535"),
        (lambda: scsi.read_16(0, 1 << 32), "blocks 4294967296 is not in 0..4294967295"),
        (lambda: scsi.inquiry(1 << 16), "allocation_length 65536 is not in 0..65535"),
        (lambda: scsi.inquiry(page=256), "page 256 is not in 0..255"),
        (lambda: scsi.request_sense(256), "allocation_length 256 is not in 0..255"),
        (lambda: scsi.report_luns(8), "allocation_length 8 is not in 16..4294967295"),
    ],
)
def test_builders_refuse_fields_that_do_not_fit(build: object, message: str) -> None:
    assert callable(build)
    with pytest.raises(ValueError, match=message):
        build()


def lio_inquiry() -> bytes:
    """Standard INQUIRY data as LIO's fileio backstore answers (SPC-4, vendor LIO-ORG)."""
    head = bytes((0x00, 0x00, 0x06, 0x02, 0x3B, 0x00, 0x00, 0x02))
    return head + b"LIO-ORG " + b"FILEIO".ljust(16) + b"4.0 " + bytes(24)


def test_parse_inquiry() -> None:
    found = scsi.parse_inquiry(lio_inquiry())
    assert found == scsi.Inquiry(0, 0, False, 6, 2, 0x3B, "LIO-ORG", "FILEIO", "4.0")
    removable_cdrom = bytes((0x05, 0x80)) + lio_inquiry()[2:]
    assert (
        scsi.parse_inquiry(removable_cdrom).device_type,
        scsi.parse_inquiry(removable_cdrom).removable,
    ) == (5, True)


def test_parse_inquiry_malformed() -> None:
    with pytest.raises(
        ScsiFormatError, match="INQUIRY data: length 35, shorter than the 36 bytes it needs"
    ):
        scsi.parse_inquiry(lio_inquiry()[:35])
    broken = bytearray(lio_inquiry())
    broken[17] = 0x07
    with pytest.raises(
        ScsiFormatError, match=r"INQUIRY data: product b'F\\x07LEIO .*' is not printable ASCII"
    ) as caught:
        scsi.parse_inquiry(bytes(broken))
    assert caught.value.field == "product"


def test_parse_read_capacity() -> None:
    """A 16 MiB fileio LUN (GUEST.md: 32768 x 512)."""
    ten = scsi.parse_read_capacity_10((32767).to_bytes(4, "big") + (512).to_bytes(4, "big"))
    assert (ten.blocks, ten.block_size, ten.size) == (32768, 512, 16 << 20)
    data16 = (
        (32767).to_bytes(8, "big")
        + (512).to_bytes(4, "big")
        + bytes((0x05, 0x03))
        + (0xC000 | 7).to_bytes(2, "big")
        + bytes(16)
    )
    found = scsi.parse_read_capacity_16(data16)
    assert found == scsi.Capacity(32767, 512, True, 2, 3, 7, True, True)
    assert found.size == 16 << 20
    with pytest.raises(
        ScsiFormatError, match=r"READ CAPACITY\(16\) data: length 12, shorter than the 32 bytes"
    ):
        scsi.parse_read_capacity_16(data16[:12])
    with pytest.raises(
        ScsiFormatError, match=r"READ CAPACITY\(10\) data: block_length is 0"
    ) as caught:
        scsi.parse_read_capacity_10(bytes(8))
    assert caught.value.field == "block_length"


def test_parse_report_luns() -> None:
    entries = bytes.fromhex("000000000000000000010000000000004123000000000000")
    found = scsi.parse_report_luns((24).to_bytes(4, "big") + bytes(4) + entries)
    assert found.numbers() == [0, 1, 0x123]
    assert not found.truncated
    short = scsi.parse_report_luns((24).to_bytes(4, "big") + bytes(4) + entries[:8])
    assert (short.numbers(), short.truncated, short.list_length) == ([0], True, 24)
    with pytest.raises(ScsiFormatError, match="list_length 12 is not a multiple of 8"):
        scsi.parse_report_luns((12).to_bytes(4, "big") + bytes(4))
    wlun = scsi.parse_report_luns(
        (8).to_bytes(4, "big") + bytes(4) + bytes.fromhex("c101000000000000")
    )
    with pytest.raises(ScsiFormatError, match="lun c101000000000000 is not a single-level LUN"):
        wlun.numbers()


# --- sense ---------------------------------------------------------------------------------------


def test_fixed_sense() -> None:
    """A medium error at LBA 0x1000 (VALID set), deferred; then an 18-byte UNIT ATTENTION."""
    raw = bytes((0xF1, 0, 0x03)) + (0x1000).to_bytes(4, "big") + bytes((10,)) + bytes(4)
    raw += bytes((0x11, 0x00, 0, 0, 0, 0))
    found = scsi.parse_sense(raw)
    assert (found.key, found.asc, found.ascq, found.information) == (
        scsi.SenseKey.MEDIUM_ERROR,
        0x11,
        0,
        0x1000,
    )
    assert found.deferred and not found.descriptor_format
    assert found.describe() == "deferred MEDIUM ERROR: Unrecovered read error (11h/00h)"
    ua = scsi.parse_sense(bytes.fromhex("700006000000000a00000000290000000000"))
    assert (
        ua.describe() == "UNIT ATTENTION: Power on, reset, or bus device reset occurred (29h/00h)"
    )
    assert ua.information is None
    assert scsi.parse_request_sense is scsi.parse_sense


def test_descriptor_sense() -> None:
    """ILLEGAL REQUEST 21h/00h with an information descriptor carrying a 64-bit LBA."""
    info = bytes((0x00, 0x0A, 0x80, 0)) + (1 << 40).to_bytes(8, "big")
    raw = bytes((0x72, 0x05, 0x21, 0x00, 0, 0, 0, len(info))) + info
    found = scsi.parse_sense(raw)
    assert (found.key, found.asc, found.ascq, found.information) == (
        scsi.SenseKey.ILLEGAL_REQUEST,
        0x21,
        0,
        1 << 40,
    )
    assert found.descriptor_format and not found.deferred
    assert found.describe() == "ILLEGAL REQUEST: Logical block address out of range (21h/00h)"
    unknown = scsi.parse_sense(bytes((0x72, 0x0B, 0x99, 0x42, 0, 0, 0, 0)))
    assert unknown.describe() == "ABORTED COMMAND: ASC/ASCQ 99h/42h"
    assert scsi.asc_name(0x3F, 0x0E) == "Reported LUNs data has changed"


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        (bytes(7), "length", "sense data: length 7, shorter than the 8-byte header"),
        (bytes(18), "response_code", "response_code 0x00 is not 70h, 71h, 72h or 73h"),
        (
            bytes((0x70, 0, 5, 0, 0, 0, 0, 4)) + bytes(10),
            "additional_length",
            "fixed sense data: additional_length 4 with 18 bytes ends before ASC/ASCQ",
        ),
        (bytes((0x70, 0, 5, 0, 0, 0, 0, 10)) + bytes(3), "additional_length", "with 11 bytes"),
        (
            bytes((0x72, 5, 0x24, 0, 0, 0, 0, 4, 0x00, 0x0A, 0, 0)),
            "descriptor",
            "descriptor 0x00 at byte 8 runs past the sense data (12 bytes)",
        ),
    ],
)
def test_sense_malformed(raw: bytes, field: str, message: str) -> None:
    with pytest.raises(ScsiFormatError) as caught:
        sense.parse_sense(raw)
    assert caught.value.field == field
    assert message in str(caught.value)


def test_the_package_exports_what_its_modules_define() -> None:
    modules = (transport, commands, sense, client)
    for module in modules:
        for name in module.__all__:
            assert getattr(module, name) is getattr(scsi, name, getattr(module, name))
    assert set(scsi.__all__) <= {n for m in modules for n in m.__all__}
