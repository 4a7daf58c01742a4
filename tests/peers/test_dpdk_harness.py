"""The testpmd harness (peers.dpdk): its readers of testpmd's output and telemetry on captured
text, its command lines, and (marked dpdk) starting, commanding and quitting the real thing."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import dpdk
from .dpdk import (
    INSTALL_HINT,
    ForwardStats,
    PortStats,
    Telemetry,
    Testpmd,
    TestpmdError,
    parse_forward_stats,
    parse_telemetry_reply,
    require_testpmd,
    testpmd_missing,
    vhost_backend,
    vhost_vdev,
    virtio_user_vdev,
)

# What `stop` printed with two queues on port 0 (per-stream blocks first), with a csum-mode
# block for port 1, and the accumulated block that belongs to no port.
STOP_OUTPUT = """\
stop\r
Telling cores to stop...
Waiting for lcores to finish...

  ------- Forward Stats for RX Port= 0/Queue= 0 -> TX Port= 0/Queue= 0 -------
  RX-packets: 200            TX-packets: 200            TX-dropped: 0

  ------- Forward Stats for RX Port= 0/Queue= 1 -> TX Port= 0/Queue= 1 -------
  RX-packets: 200            TX-packets: 200            TX-dropped: 0

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 400            RX-dropped: 0             RX-total: 400
  TX-packets: 17440          TX-dropped: 1954080       TX-total: 1971520
  ----------------------------------------------------------------------------

  ---------------------- Forward statistics for port 1  ----------------------
  RX-packets: 5              RX-dropped: 1             RX-total: 6
  Bad-ipcsum: 0              Bad-l4csum: 0             Bad-outer-l4csum: 0
  Bad-outer-ipcsum: 0
  TX-packets: 4              TX-dropped: 0             TX-total: 4
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 405            RX-dropped: 1             RX-total: 406
  TX-packets: 17444          TX-dropped: 1954080       TX-total: 1971524
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

Done.
"""

STATS_REPLY = (
    b'{"/ethdev/stats":{"ipackets":50,"opackets":49,"ibytes":4925,"obytes":4900,"imissed":1,'
    b'"ierrors":2,"oerrors":3,"rx_nombuf":4,"q_ipackets":[30,20,0,0,0,0,0,0,0,0,0,0,0,0,0,0],'
    b'"q_opackets":[29,20,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"q_ibytes":[0,0,0,0,0,0,0,0,0,0,0,0,0,'
    b'0,0,0],"q_obytes":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"q_errors":[0,0,0,0,0,0,0,0,0,0,0,0,'
    b"0,0,0,0]}}"
)


def test_forward_stats_are_read_per_port() -> None:
    assert parse_forward_stats(STOP_OUTPUT) == {
        0: ForwardStats(0, 400, 0, 400, 17440, 1954080, 1971520),
        1: ForwardStats(1, 5, 1, 6, 4, 0, 4),
    }
    assert parse_forward_stats("testpmd> show port info 0\n") == {}


def test_a_forward_stats_block_without_its_counters_is_an_error() -> None:
    text = (
        "  ----- Forward statistics for port 3  -----\n  RX-packets: 1\n  ---------------------\n"
    )
    with pytest.raises(TestpmdError, match="port 3 unreadable"):
        parse_forward_stats(text)


def test_telemetry_reply_values_and_refusals() -> None:
    assert parse_telemetry_reply(b'{"/ethdev/list":[0,1]}', "/ethdev/list") == [0, 1]
    assert parse_telemetry_reply(STATS_REPLY, "/ethdev/stats,0")["ipackets"] == 50
    with pytest.raises(TestpmdError, match="null"):
        parse_telemetry_reply(b'{"/ethdev/stats":null}', "/ethdev/stats,7")
    with pytest.raises(TestpmdError, match="not JSON"):
        parse_telemetry_reply(b'{"/ethdev/stats":', "/ethdev/stats,0")
    with pytest.raises(TestpmdError, match="has no '/ethdev/info'"):
        parse_telemetry_reply(STATS_REPLY, "/ethdev/info,0")


def test_port_stats_from_telemetry() -> None:
    value = parse_telemetry_reply(STATS_REPLY, "/ethdev/stats,0")
    stats = PortStats.from_telemetry(value)
    assert (stats.ipackets, stats.opackets, stats.ibytes, stats.obytes) == (50, 49, 4925, 4900)
    assert (stats.imissed, stats.ierrors, stats.oerrors, stats.rx_nombuf) == (1, 2, 3, 4)
    assert stats.q_ipackets[:3] == (30, 20, 0) and len(stats.q_opackets) == 16
    del value["rx_nombuf"]
    with pytest.raises(TestpmdError, match="unexpected reply"):
        PortStats.from_telemetry(value)


@pytest.fixture
def fake_telemetry(tmp_path: Path) -> Iterator[Path]:
    """A SOCK_SEQPACKET server that greets as DPDK does and answers one /ethdev/stats,0."""
    path = tmp_path / "dpdk_telemetry.v2"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            hello = {"version": "DPDK 22.11.11", "pid": 42, "max_output_len": 16384}
            conn.send(json.dumps(hello).encode())
            if conn.recv(1024) == b"/ethdev/stats,0":
                conn.send(STATS_REPLY)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    thread.join(5)
    server.close()


def test_telemetry_client_greeting_and_query(no_fd_leak: None, fake_telemetry: Path) -> None:
    telemetry = Telemetry(fake_telemetry)
    try:
        assert (telemetry.version, telemetry.pid) == ("DPDK 22.11.11", 42)
        assert PortStats.from_telemetry(telemetry.query("/ethdev/stats,0")).obytes == 4900
    finally:
        telemetry.close()


def test_vdevs_and_command_line(tmp_path: Path) -> None:
    sock = Path("/tmp/x/v.sock")
    assert (
        vhost_vdev(sock, queues=2, client=True)
        == "net_vhost0,iface=/tmp/x/v.sock,queues=2,client=1"
    )
    assert (
        virtio_user_vdev(sock, packed=True, mrg_rxbuf=False, mac="02:00:00:00:00:01", index=1)
        == "net_virtio_user1,path=/tmp/x/v.sock,queues=1,queue_size=256,packed_vq=1,mrg_rxbuf=0,"
        "mac=02:00:00:00:00:01"
    )
    with pytest.raises(ValueError, match="longer than 107"):
        vhost_vdev(Path("/tmp/" + "x" * 120))
    pmd = Testpmd(
        tmp_path, [vhost_vdev(sock)], name="t", forward_mode="macswap", binary="/bin/testpmd"
    )
    assert pmd.argv() == [
        "/bin/testpmd",
        *("--no-huge", "--no-pci", "-m", "256", "-l", "0-1", "--file-prefix", "t"),
        *("--vdev", "net_vhost0,iface=/tmp/x/v.sock,queues=1", "--", "-i"),
        *("--forward-mode=macswap", "--total-num-mbufs=4096", "--rxq=1", "--txq=1"),
    ]
    command = pmd.command()
    assert command[1:4] == ["-k", "5", "120"] and command[5:7] == ["-oL", "-eL"]
    assert command[7:] == pmd.argv()
    assert pmd.telemetry_path == tmp_path / "run-t" / "dpdk" / "t" / "dpdk_telemetry.v2"
    moved = Testpmd(tmp_path, [vhost_vdev(sock)], name="u", eal_args=["--main-lcore", "1"])
    assert moved.argv()[9:13] == ["--main-lcore", "1", "--vdev", vhost_vdev(sock)]


def test_missing_pieces_are_named_with_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dpdk, "find_binary", lambda name: None)
    assert testpmd_missing() == f"dpdk-testpmd not installed: {INSTALL_HINT}"
    monkeypatch.setattr(dpdk, "find_binary", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(dpdk, "PMD_GLOB", "/nonexistent/librte_{}.so*")
    reason = testpmd_missing()
    assert reason is not None and reason.startswith("DPDK driver net_vhost not installed")
    assert "librte-net-vhost23" in INSTALL_HINT and "--no-install-recommends" in INSTALL_HINT


@pytest.mark.dpdk
def test_a_failed_start_reports_the_log(peer_dir: Path) -> None:
    require_testpmd()
    pmd = Testpmd(peer_dir, ["net_nosuchdriver0"], name="bad")
    with pytest.raises(TestpmdError, match=r"(?s)exited with status 1 before its prompt.*EAL"):
        pmd.start()
    assert not pmd.runtime_dir.exists()


@pytest.mark.dpdk
def test_commands_counters_and_a_clean_quit(peer_dir: Path, no_fd_leak: None) -> None:
    require_testpmd()
    sock = peer_dir / "vhost.sock"
    sock.parent.mkdir(exist_ok=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()
    pmd = vhost_backend(peer_dir, sock, forward_mode="macswap").start()
    try:
        assert sock.is_socket()
        assert "net_vhost0" in pmd.run("show port info 0")
        assert not pmd.link_up()
        assert pmd.mac() == bytes.fromhex("56484f535400")
        pmd.set_forward_mode("io")
        assert "io packet forwarding - ports=1" in pmd.start_forwarding()
        assert pmd.stop_forwarding() == {0: ForwardStats(0, 0, 0, 0, 0, 0, 0)}
        assert pmd.stats().ipackets == 0
        with pytest.raises(TestpmdError, match="null"):
            pmd.query("/ethdev/stats,9")
    finally:
        status = pmd.quit()
    assert status == 0
    assert not sock.exists()
    assert not pmd.runtime_dir.exists()
    assert "Bye..." in pmd.log
