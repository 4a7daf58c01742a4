"""A Linux guest's eth0 on QEMU's virtio-net-pci over ``-netdev vhost-user`` and ``pyvhost serve
net`` (``vectors=0``: QEMU 7.2 crashes with MSI-X here, see GUEST.md).

- TAP: the back-end and a peer run in a network namespace of their own (``unshare -n``); the
  guest pings the TAP's IPv6 link-local address (small, full 1500-byte and fragmented 20000-byte
  echoes) and the peer pings the guest's, so neighbour discovery and echoes cross the device both
  ways; one and two queue pairs (with two, the guest's ping runs on CPU 1 and pair 1 carries its
  echoes both ways), split and packed.
- loopback: the guest pings the all-nodes group on eth0; each echo request comes back through
  the device, so the guest's stack takes every one twice (its own multicast loop, and the wire):
  ICMPv6 InEchos is twice OutEchos, and eth0 received exactly the frames it sent.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from peers.guest import GuestAssets, boot_guest
from peers.qemu import PeerProcess, QemuVM, find_binary

from .conftest import Serve

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

GUEST_MAC = "52:54:00:12:34:56"
GUEST_LL = "fe80::5054:ff:fe12:3456"
HOST_MAC = "02:00:00:00:00:fe"
HOST_LL = "fe80::ff:fe00:fe"
TAP = "pvhg0"

UP = """set -e
ip link set eth0 up
i=0
until ip -6 addr show dev eth0 | grep -q "scope link" && \\
      ! ip -6 addr show dev eth0 | grep -q tentative; do
    i=$((i + 1)); [ $i -lt 100 ] || { ip -6 addr show dev eth0; exit 3; }
    sleep 0.1
done
echo "queues $(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)"
"""

COUNTERS = """for c in tx_packets rx_packets; do
    echo "$c $(cat /sys/class/net/eth0/statistics/$c)"
done
grep -E "Icmp6(In|Out)(Echos|EchoReplies|NeighborSolicits|NeighborAdvertisements) " /proc/net/snmp6
"""


def _values(output: str) -> dict[str, str]:
    return dict(line.strip().partition(" ")[::2] for line in output.splitlines() if " " in line)


def _host_side(peer_dir: Path, sock: Path, queues: int) -> PeerProcess:
    """``unshare -n``: a TAP with a known MAC, ``serve net --tap`` on it, and a peer that pings
    the guest's link-local address until it answers."""
    busybox = find_binary("busybox")
    if busybox is None:
        pytest.skip("busybox not installed on the host (the peer's ping)")
    mq = " multi_queue" if queues > 1 else ""
    serve = (
        f"{sys.executable} -m pyvhost serve net --socket {sock} --tap {TAP} --mac {GUEST_MAC} "
        f"--queues {queues} --stats-interval 0"
    )
    script = f"""set -e
ip link set lo up
ip tuntap add dev {TAP} mode tap vnet_hdr{mq}
ip link set {TAP} address {HOST_MAC}
ip link set {TAP} up
(
    for i in $(seq 120); do
        [ -e {sock} ] || [ $i -lt 10 ] || exit 0
        if {busybox} ping -6 -c 1 -W 1 {GUEST_LL}%{TAP} >/dev/null 2>&1; then
            {busybox} ping -6 -c 3 -W 2 {GUEST_LL}%{TAP} && echo PEER-PINGS-OK
            exit 0
        fi
        sleep 0.3
    done
) &
exec {serve}
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return PeerProcess(
        ["unshare", "-n", "sh", "-c", script],
        peer_dir,
        name="serve-net-tap",
        timeout_s=120,
        socket=sock,
        env=env,
    ).start()


@pytest.mark.parametrize(
    ("queues", "packed"),
    [(1, False), (2, False), (1, True)],
    ids=["1-pair", "2-pairs", "packed"],
)
def test_guest_and_host_ping_through_a_tap(
    peer_dir: Path, guest_vm: QemuVM, guest_assets: GuestAssets, queues: int, packed: bool
) -> None:
    sock = peer_dir / "net.sock"
    host = _host_side(peer_dir, sock, queues)
    try:
        guest_vm.cpus = queues  # Linux uses as many pairs as it has CPUs
        guest_vm.add_vhost_user_net(sock, queues=queues, packed=packed, mac=GUEST_MAC)
        # Two pairs: pinned to CPU 1, the ping leaves by tx-1 (the driver's XPS maps CPU i to
        # queue i), and the multiqueue TAP steers the replies of that flow back to the TAP queue
        # it came in on, so pair 1 carries traffic both ways.
        pin = "taskset 2 " if queues > 1 else ""
        script = (
            UP
            + f"""{pin}ping -6 -c 3 -w 20 {HOST_LL}%eth0
{pin}ping -6 -c 2 -s 1452 -w 20 {HOST_LL}%eth0
{pin}ping -6 -c 2 -s 20000 -w 20 {HOST_LL}%eth0
i=0
until awk '$1 == "Icmp6InEchos" && $2 >= 3 {{ok = 1}} END {{exit !ok}}' /proc/net/snmp6; do
    i=$((i + 1)); [ $i -lt 150 ] || exit 4
    sleep 0.1
done
sleep 1
{COUNTERS}"""
        )
        result = boot_guest(guest_vm, script, timeout=60, assets=guest_assets).check()
    finally:
        host.stop()
    out = result.output
    assert "3 packets transmitted, 3 packets received" in out, out
    # Full 1500-byte frames, then 20000-byte echoes in 14 fragments each way, reassembled.
    assert "1460 bytes from" in out and "20008 bytes from" in out, out
    assert out.count("2 packets transmitted, 2 packets received") == 2, out
    values = _values(out)
    assert int(values["queues"]) == queues
    assert int(values["Icmp6InEchos"]) >= 3 and int(values["Icmp6OutEchoReplies"]) >= 3
    assert int(values["Icmp6InEchoReplies"]) >= 3
    assert int(values["Icmp6InNeighborSolicits"]) + int(values["Icmp6InNeighborAdvertisements"])
    assert "PEER-PINGS-OK" in host.stdout, host.stdout + host.stderr
    log = host.stderr
    assert f"TAP {TAP} attached, {queues} queue(s)" in log
    stats = re.search(r"tap \S+ at exit: tx (\d+) frames .* rx (\d+) frames", log)
    assert stats is not None, log[-3000:]
    assert int(stats.group(1)) >= 6 and int(stats.group(2)) >= 6
    if queues > 1:
        assert "vring 3 started" in log
        pair1 = re.search(r"tap \S+ at exit: .*\[1\] tx (\d+) rx (\d+)", log)
        assert pair1 is not None, log[-3000:]
        assert int(pair1.group(1)) >= 3 and int(pair1.group(2)) >= 3, pair1.group(0)
    features = re.search(r"net: features (0x[0-9a-f]+):", log)
    assert features is not None
    assert int(features.group(1), 16) >> 34 & 1 == packed  # VIRTIO_F_RING_PACKED


def test_guest_frames_come_back_through_loopback(
    peer_dir: Path, guest_vm: QemuVM, guest_assets: GuestAssets, serve: Serve
) -> None:
    sock = peer_dir / "net.sock"
    daemon = serve("net", sock, "--backend", "loopback", "--mac", GUEST_MAC)
    guest_vm.add_vhost_user_net(sock, mac=GUEST_MAC)
    script = (
        UP
        + f"""ping -6 -c 5 -i 0.3 -W 1 -w 3 -I eth0 ff02::1%eth0 >/dev/null || true
sleep 0.5
{COUNTERS}"""
    )
    result = boot_guest(guest_vm, script, timeout=60, assets=guest_assets).check()
    daemon.stop()
    values = _values(result.output)
    assert int(values["Icmp6OutEchos"]) == 5, result.output
    assert int(values["Icmp6InEchos"]) == 10, "each echo request must come back once"
    tx, rx = int(values["tx_packets"]), int(values["rx_packets"])
    assert rx == tx >= 5
    stats = re.search(
        r"loopback at exit: tx (\d+) frames (\d+) bytes, rx (\d+) frames (\d+)", daemon.stderr
    )
    assert stats is not None, daemon.stderr[-3000:]
    assert stats.group(1) == stats.group(3) and stats.group(2) == stats.group(4)
    assert int(stats.group(1)) >= tx
