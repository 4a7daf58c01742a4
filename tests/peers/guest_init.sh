#!/bin/busybox sh
# /init of the pyvhost test initramfs: set up, load modules, run the fw_cfg test script, power off.
# The result goes to $pyvhost_result (a serial port named on the kernel command line) between markers.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm

while read -r module; do
    insmod "/lib/modules/pyvhost/$module.ko" || echo "pyvhost-init: insmod $module failed"
done </etc/pyvhost/modules

out=${pyvhost_result:-/dev/console}
[ -c "$out" ] || out=/dev/console
[ "$out" = /dev/console ] || stty -F "$out" raw -echo 2>/dev/null

script=/sys/firmware/qemu_fw_cfg/by_name/opt/pyvhost-test/raw
echo "pyvhost-init: running the test script, result on $out"
echo PYVHOST-RESULT-BEGIN >"$out"
if [ -r "$script" ]; then
    cat "$script" >/tmp/pyvhost-test.sh
    (cd /tmp && sh /tmp/pyvhost-test.sh </dev/null >"$out" 2>&1)
    rc=$?
else
    echo "pyvhost-init: no test script at $script (is qemu_fw_cfg loaded?)" >"$out"
    rc=254
fi
echo PYVHOST-RESULT-END >"$out"
echo "PYVHOST-EXIT-CODE=$rc" >"$out"
echo "pyvhost-init: test script exited with $rc, powering off"
sync
poweroff -f
