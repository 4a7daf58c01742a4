"""Real peers for tests: qemu-storage-daemon, qemu-system-x86_64 and a Linux guest under TCG.

Plugging a back-end into a guest test (fixtures from peers.fixtures)::

    def test_my_blk(peer_dir, guest_vm):
        sock = peer_dir / "blk.sock"
        argv = [sys.executable, "-m", "pyvhost", "serve", "blk", "--socket", str(sock)]
        with PeerProcess(argv, peer_dir, name="pyvhost-blk", socket=sock):
            guest_vm.add_vhost_user_blk(sock)
            result = boot_guest(guest_vm, "set -e\\ncat /sys/block/vda/size\\n").check()
        assert result.output == "131072\\n"
"""
