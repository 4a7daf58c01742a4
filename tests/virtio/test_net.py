"""The virtio-net header: layout and constants against <linux/virtio_net.h>, round trips,
refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peers.cheader import c_values
from pyvhost.errors import ProtocolError
from pyvhost.virtio import features as vf
from pyvhost.virtio import net


def test_layout_and_constants_match_the_kernel_header() -> None:
    values = c_values(
        ["linux/virtio_net.h"],
        {
            "hdr": "sizeof(struct virtio_net_hdr)",
            "mrg": "sizeof(struct virtio_net_hdr_mrg_rxbuf)",
            "num_buffers_at": "__builtin_offsetof(struct virtio_net_hdr_mrg_rxbuf, num_buffers)",
            "csum_offset_at": "__builtin_offsetof(struct virtio_net_hdr, csum_offset)",
            "NEEDS_CSUM": "VIRTIO_NET_HDR_F_NEEDS_CSUM",
            "DATA_VALID": "VIRTIO_NET_HDR_F_DATA_VALID",
            "RSC_INFO": "VIRTIO_NET_HDR_F_RSC_INFO",
            "GSO_NONE": "VIRTIO_NET_HDR_GSO_NONE",
            "GSO_TCPV4": "VIRTIO_NET_HDR_GSO_TCPV4",
            "GSO_UDP": "VIRTIO_NET_HDR_GSO_UDP",
            "GSO_TCPV6": "VIRTIO_NET_HDR_GSO_TCPV6",
            "GSO_UDP_L4": "VIRTIO_NET_HDR_GSO_UDP_L4",
            "GSO_ECN": "VIRTIO_NET_HDR_GSO_ECN",
            "MRG_RXBUF": "VIRTIO_NET_F_MRG_RXBUF",
        },
    )
    assert values["hdr"] == 10 and values["mrg"] == 12
    assert values["num_buffers_at"] == 10 and values["csum_offset_at"] == 8
    assert len(net.NetHeader().encode()) == values["mrg"]
    assert len(net.NetHeader().encode(10)) == values["hdr"]
    flags = ("NEEDS_CSUM", "DATA_VALID", "RSC_INFO")
    gso = ("GSO_NONE", "GSO_TCPV4", "GSO_UDP", "GSO_TCPV6", "GSO_UDP_L4", "GSO_ECN")
    # Linux 6.1's headers predate GSO_UDP_L4 (6.2); the rest must be there.
    assert {*flags, *gso} - values.keys() <= {"GSO_UDP_L4"}
    for name in flags:
        assert getattr(net, f"HDR_F_{name}") == values[name], name
    for name in gso:
        if name in values:
            assert getattr(net, name) == values[name], name
    assert values["MRG_RXBUF"] == vf.NET_F_MRG_RXBUF


headers = st.builds(
    net.NetHeader,
    flags=st.sampled_from([0, 1, 2, 3, 4, 7]),
    gso_type=st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84]),
    hdr_len=st.integers(0, 0xFFFF),
    gso_size=st.integers(0, 0xFFFF),
    csum_start=st.integers(0, 0xFFFF),
    csum_offset=st.integers(0, 0xFFFF),
    num_buffers=st.integers(0, 0xFFFF),
)


@given(headers)
def test_round_trip(header: net.NetHeader) -> None:
    assert net.NetHeader.decode(header.encode()) == header
    legacy = net.NetHeader.decode(header.encode(10), 10)
    assert legacy.num_buffers == 0
    assert legacy == net.NetHeader(**{**header.__dict__, "num_buffers": 0})


def test_header_size_follows_the_features() -> None:
    assert net.header_size(1 << vf.F_VERSION_1) == 12
    assert net.header_size(1 << vf.NET_F_MRG_RXBUF) == 12
    assert net.header_size(0) == 10


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (bytes(11), "11 bytes, need 12"),
        (b"\x08" + bytes(11), "flags 0x8 has unknown bits"),
        (b"\x00\x02" + bytes(10), "gso_type 0x2 is not defined"),
        (b"\x00\x86" + bytes(10), "gso_type 0x86 is not defined"),
    ],
)
def test_malformed_headers_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        net.NetHeader.decode(raw)


def test_only_the_two_sizes_exist() -> None:
    with pytest.raises(ValueError, match="must be 12 or 10"):
        net.NetHeader().encode(11)
    with pytest.raises(ValueError, match="must be 12 or 10"):
        net.NetHeader.decode(bytes(12), 8)
