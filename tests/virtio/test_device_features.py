"""The device feature bit tables and virtio device ids against the C headers of this machine
(``/usr/include/linux/virtio_*.h``), and the bits those headers do not have yet."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvhost.virtio import features as vf

INCLUDE = Path("/usr/include/linux")

# Device type: (header, macro prefix of its feature bits, its VIRTIO_ID_* macro).
HEADERS: dict[str, tuple[str, str, str]] = {
    "net": ("virtio_net.h", "VIRTIO_NET_F_", "VIRTIO_ID_NET"),
    "blk": ("virtio_blk.h", "VIRTIO_BLK_F_", "VIRTIO_ID_BLOCK"),
    "scsi": ("virtio_scsi.h", "VIRTIO_SCSI_F_", "VIRTIO_ID_SCSI"),
    "vsock": ("virtio_vsock.h", "VIRTIO_VSOCK_F_", "VIRTIO_ID_VSOCK"),
    "rng": ("virtio_rng.h", "VIRTIO_RNG_F_", "VIRTIO_ID_RNG"),
    "console": ("virtio_console.h", "VIRTIO_CONSOLE_F_", "VIRTIO_ID_CONSOLE"),
    "fs": ("virtio_fs.h", "VIRTIO_FS_F_", "VIRTIO_ID_FS"),
    "gpio": ("virtio_gpio.h", "VIRTIO_GPIO_F_", "VIRTIO_ID_GPIO"),
    "i2c": ("virtio_i2c.h", "VIRTIO_I2C_F_", "VIRTIO_ID_I2C_ADAPTER"),
    "input": ("virtio_input.h", "VIRTIO_INPUT_F_", "VIRTIO_ID_INPUT"),
    "sound": ("virtio_snd.h", "VIRTIO_SND_F_", "VIRTIO_ID_SOUND"),
    "gpu": ("virtio_gpu.h", "VIRTIO_GPU_F_", "VIRTIO_ID_GPU"),
    "crypto": ("virtio_crypto.h", "VIRTIO_CRYPTO_F_", "VIRTIO_ID_CRYPTO"),
}

# In the virtio 1.3 spec but not in this machine's headers (Linux 6.1): crypto's bits are in no
# Linux uapi header, the others came in later Linux releases (or only in the spec).
NOT_IN_LINUX_6_1 = {
    "VIRTIO_BLK_F_LIFETIME",
    "VIRTIO_BLK_F_ZONED",
    "VIRTIO_NET_F_DEVICE_STATS",
    "VIRTIO_NET_F_HASH_TUNNEL",
    "VIRTIO_NET_F_VQ_NOTF_COAL",
    "VIRTIO_NET_F_GUEST_USO4",
    "VIRTIO_NET_F_GUEST_USO6",
    "VIRTIO_NET_F_HOST_USO",
    "VIRTIO_NET_F_GUEST_HDRLEN",
    "VIRTIO_VSOCK_F_STREAM",
    "VIRTIO_VSOCK_F_NO_IMPLIED_STREAM",
    "VIRTIO_FS_F_NOTIFICATION",
    "VIRTIO_SND_F_CTLS",
    "VIRTIO_CRYPTO_F_REVISION_1",
    "VIRTIO_CRYPTO_F_CIPHER_STATELESS_MODE",
    "VIRTIO_CRYPTO_F_HASH_STATELESS_MODE",
    "VIRTIO_CRYPTO_F_MAC_STATELESS_MODE",
    "VIRTIO_CRYPTO_F_AEAD_STATELESS_MODE",
    "VIRTIO_CRYPTO_F_AKCIPHER_STATELESS_MODE",
}

# Header names that are no feature bit of their own, or none of the spec's.
ALIASES = {"VIRTIO_BLK_F_WCE": "VIRTIO_BLK_F_FLUSH"}  # the legacy name of FLUSH
NOT_SPEC_BITS = {
    # Linux 6.18: AccECN offloads in the transport range, not in the spec.
    "VIRTIO_NET_F_HOST_ACCECN",
    "VIRTIO_NET_F_GUEST_ACCECN",
    # Linux 6.18: the driver's offload bits for UDP_TUNNEL_GSO (65..68), not feature bits.
    "VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_MAPPED",
    "VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM_MAPPED",
}


def _macro(device: str, name: str) -> str:
    return HEADERS[device][1] + name


def _header_names(device: str) -> set[str]:
    """The feature bit names a header defines, as macros or enum constants."""
    header, prefix, _ = HEADERS[device]
    text = (INCLUDE / header).read_text()
    defines = re.findall(rf"^\s*#\s*define\s+({prefix}\w+)\s", text, re.MULTILINE)
    enums = re.findall(rf"^\s+({prefix}\w+)\s*(?:=[^,\n]*)?,?\s*(?:/\*.*)?$", text, re.MULTILINE)
    return set(defines) | set(enums)


@pytest.fixture(scope="module")
def from_c(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Every device feature bit name the headers define and every VIRTIO_ID_* we use, as the C
    compiler sees them."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not (INCLUDE / "virtio_net.h").exists():
        pytest.skip("needs a C compiler and linux-libc-dev (apt-get install gcc linux-libc-dev)")
    names = {id_macro for _, _, id_macro in HEADERS.values()}
    for device in HEADERS:
        names |= _header_names(device)
    lines = ["#include <stdio.h>", "#include <linux/virtio_ids.h>"]
    lines += [f"#include <linux/{header}>" for header, _, _ in HEADERS.values()]
    lines.append("int main(void) {")
    lines += [f' printf("{name} %llu\\n", (unsigned long long){name});' for name in sorted(names)]
    lines.append(" return 0;\n}")
    folder = tmp_path_factory.mktemp("virtio-h")
    source, binary = folder / "bits.c", folder / "bits"
    source.write_text("\n".join(lines))
    subprocess.run([cc, "-o", str(binary), str(source)], check=True, capture_output=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("device", list(HEADERS))
def test_every_bit_the_header_defines_is_named_alike(device: str, from_c: dict[str, int]) -> None:
    table = vf.DEVICE_FEATURES[device]
    for macro in _header_names(device) - NOT_SPEC_BITS:
        value = from_c[macro]
        if value >= 64:
            continue  # past a vhost feature word
        expected = ALIASES.get(macro, macro).removeprefix(HEADERS[device][1])
        assert table.get(value) == expected, f"{macro} = {value}"


@pytest.mark.parametrize("device", list(HEADERS))
def test_every_named_bit_is_in_the_header_or_newer(device: str, from_c: dict[str, int]) -> None:
    missing = set()
    for bit, name in vf.DEVICE_FEATURES[device].items():
        macro = _macro(device, name)
        if macro in from_c:
            assert from_c[macro] == bit, macro
        else:
            missing.add(macro)
    assert missing <= NOT_IN_LINUX_6_1


def test_the_bits_newer_than_the_headers_are_in_the_tables() -> None:
    named = {_macro(d, name) for d in HEADERS for name in vf.DEVICE_FEATURES[d].values()}
    assert named >= NOT_IN_LINUX_6_1


def test_device_ids_match_the_header(from_c: dict[str, int]) -> None:
    assert {from_c[id_macro]: device for device, (_, _, id_macro) in HEADERS.items()} == dict(
        vf.DEVICE_IDS
    )


def test_every_device_type_has_a_table_and_an_id() -> None:
    assert list(vf.DEVICE_FEATURES) == list(HEADERS)
    assert sorted(vf.DEVICE_IDS.values()) == sorted(HEADERS)
    assert vf.DEVICE_FEATURES["rng"] == {} and vf.DEVICE_FEATURES["input"] == {}


def test_device_bits_stay_below_the_transport_range_or_above_it() -> None:
    for device, table in vf.DEVICE_FEATURES.items():
        assert all(bit < 24 or 41 < bit < 64 for bit in table), device


def test_feature_names_of_each_device() -> None:
    word = vf.bit_mask(0, 2, 32)
    assert vf.feature_names(word, "scsi") == ["INOUT", "CHANGE", "VERSION_1"]
    assert vf.feature_names(word, "vsock") == ["STREAM", "NO_IMPLIED_STREAM", "VERSION_1"]
    assert vf.feature_names(word, "crypto") == [
        "REVISION_1",
        "HASH_STATELESS_MODE",
        "VERSION_1",
    ]
    assert vf.feature_names(word, "rng") == ["bit0", "bit2", "VERSION_1"]
    assert vf.feature_names(vf.bit_mask(51, 63), "net") == ["HASH_TUNNEL", "SPEED_DUPLEX"]
    assert vf.feature_names(vf.bit_mask(17), "blk") == ["ZONED"]
