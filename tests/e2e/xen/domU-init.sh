#!/bin/sh
# /init of the domU (appended to the cached base initramfs by dom0.sh). Prints "E2E-R ..." result
# lines on hvc0, the Xen console, which xenconsoled logs in dom0; tests/e2e/xen/test_xen_e2e.py
# reads them back. The mode comes from the kernel command line (e2e.mode=probe|full).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /mnt
R() { echo "E2E-R $* t=$(cut -d' ' -f1 /proc/uptime)"; }
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
MODE=$(arg e2e.mode)
R boot mode=$MODE kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)
if [ "$MODE" = full ]; then
    . /e2e-workload.sh
else
    for m in virtio_mmio virtio_blk failover net_failover virtio_net virtio_console; do
        modprobe "$m" && R module name=$m ok=1 || R module name=$m ok=0
    done
fi
R done uptime=$(cut -d' ' -f1 /proc/uptime)
sync
poweroff -f
