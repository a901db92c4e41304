#!/bin/sh
# /init of the domU (appended to the cached base initramfs by dom0.sh). Prints "E2E-R ..." result
# lines on hvc0, the Xen console, which xenconsoled logs in dom0; tests/e2e/xen/test_xen_e2e.py
# reads them back. The mode comes from the kernel command line (e2e.mode=probe|full|light).
#
# `xl shutdown` and `xl reboot` reach the guest kernel through xenstore (control/shutdown); it
# runs /sbin/poweroff or /sbin/reboot, which (busybox) signal PID 1: SIGUSR2 or SIGTERM. This
# shell is PID 1, so it traps them and ends the domain the way that was asked.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /mnt
R() { echo "E2E-R $* t=$(cut -d' ' -f1 /proc/uptime)"; }
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
trap 'R signal name=USR2 action=poweroff; sync; poweroff -f' USR2
trap 'R signal name=TERM action=reboot; sync; reboot -f' TERM
# Wait for dom0 (xl shutdown, xl reboot or xl destroy); `wait` lets a trap run at once.
wait_for_toolstack() { while :; do sleep 5 & wait $!; done; }
report_devices() {
    for d in /sys/bus/virtio/devices/virtio*; do
        [ -e "$d" ] || continue
        drv=$(basename "$(readlink "$d/driver" 2>/dev/null)" 2>/dev/null)
        # The platform device above the virtio device is the window: its name is "<base>.virtio".
        win=$(basename "$(readlink -f "$d/..")")
        R virtio dev=$(basename "$d") window=$win device=$(cat "$d/device") \
            vendor=$(cat "$d/vendor") status=$(cat "$d/status" 2>/dev/null) driver=${drv:-none} \
            features=$(cat "$d/features")
    done
}
# What the full and restart workloads share: their drivers, and the consoles' ping.
VIRTIO_MODULES="virtio_mmio virtio_blk failover net_failover virtio_net virtio_console"
load_modules() { for m in "$@"; do modprobe "$m" || R module name=$m ok=0; done; }
# find_consoles: $hvc, the virtio console's port 0 (the hvc that is not Xen's own hvc0), and
# $port, the named port (e2e.port), each empty when absent.
find_consoles() {
    port=""
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = "$(arg e2e.port)" ] && port=/dev/$(basename "$p")
    done
    hvc=""
    for t in /sys/class/tty/hvc*; do
        n=$(basename "$t")
        [ "$n" != hvc0 ] && [ -c "/dev/$n" ] && grep -q . "/sys/class/tty/$n/dev" && hvc=/dev/$n && break
    done
}
console_ping() {  # DEVICE TAG SECONDS: dom0_peer.py answers "E2E-PING <token> TAG" with a PONG
    dev=$1
    if [ ! -c "$dev" ]; then R console tag=$2 dev=$dev present=0; return; fi
    exec 3<>"$dev"
    case "$dev" in /dev/hvc*) stty -F "$dev" raw -echo 2>/dev/null ;; esac
    echo "E2E-PING $(arg e2e.token) $2" >&3
    reply=""
    read -t "$3" reply <&3
    exec 3>&-
    reply=$(echo "$reply" | tr -d '\r')
    R console tag=$2 dev=$dev present=1 reply_ok=$([ "$reply" = "E2E-PONG $(arg e2e.token) $2" ] && echo 1 || echo 0)
}
MODE=$(arg e2e.mode)
R boot mode=$MODE kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)
if [ "$MODE" = full ]; then
    . /e2e-workload.sh
elif [ "$MODE" = light ]; then
    # A second guest at the same time: two explicit windows, both block devices.
    load_modules virtio_mmio virtio_blk
    sleep 1
    report_devices
    ro=$(dd if=/dev/vda bs=1048576 2>/dev/null | sha256sum | cut -d' ' -f1)
    dd if=/dev/urandom of=/tmp/pat bs=65536 count=16 2>/dev/null
    w=$(sha256sum /tmp/pat | cut -d' ' -f1)
    dd if=/tmp/pat of=/dev/vdb bs=65536 oflag=direct conv=fsync 2>/dev/null
    r=$(dd if=/dev/vdb bs=65536 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    R light_blk ro_sha256=$ro written=$w read=$r
    R light done
    wait_for_toolstack
elif [ "$MODE" = restart ]; then
    . /e2e-restart.sh
else
    for m in virtio_mmio virtio_blk failover net_failover virtio_net virtio_console; do
        modprobe "$m" && R module name=$m ok=1 || R module name=$m ok=0
    done
fi
R done uptime=$(cut -d' ' -f1 /proc/uptime)
sync
poweroff -f
