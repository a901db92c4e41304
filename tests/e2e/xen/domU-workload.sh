# The domU's workload, sourced by its /init (domU-init.sh) in full mode. Every finding is one
# "E2E-R <what> key=value..." line on hvc0 (the Xen console, logged by xenconsoled in dom0);
# test_xen_e2e.py asserts on them. The guest only reports; the host judges.
DOM0IP=$(arg e2e.dom0ip)
IP=$(arg e2e.ip)
TOKEN=$(arg e2e.token)
NETBYTES=$(arg e2e.netbytes)
MiB=1048576

load_modules $VIRTIO_MODULES
modprobe ext4
sleep 1  # let the drivers' probe finish (virtio_net registers eth0 asynchronously)


# -- which boot is this? The read-write disk keeps a counter in its filesystem. ----------------
BOOT=1
if mount -t ext2 -o ro /dev/vda /mnt 2>/dev/null; then
    [ -f /mnt/boot-count ] && BOOT=$(( $(cat /mnt/boot-count) + 1 ))
    umount /mnt
fi
R boot n=$BOOT
report_devices
if [ "$BOOT" -ge 3 ]; then
    # After `xl reboot`: the devices are there and the filesystem reads back; then wait for
    # dom0's `xl destroy`.
    mount -t ext2 -o ro /dev/vda /mnt
    hello=$(cat /mnt/hello.txt 2>/dev/null)
    umount /mnt
    R fs_boot3 hello_ok=$([ "$hello" = "hello from the e2e guest $TOKEN" ] && echo 1 || echo 0)
    R boot n=$BOOT done
    wait_for_toolstack
fi
R interrupts $(grep -i virtio /proc/interrupts | awk '{printf "%s:%s+%s ", $NF, $2, $3}' | tr ' ' ',')

# -- block: capacity, 16 MiB pattern, filesystem, read-only device -----------------------------
block_pattern() {  # $1: label. 16 MiB at 32 MiB into vda, O_DIRECT both ways.
    dd if=/dev/urandom of=/tmp/pat bs=$MiB count=16 2>/dev/null
    w=$(sha256sum /tmp/pat | cut -d' ' -f1)
    dd if=/tmp/pat of=/dev/vda bs=$MiB seek=32 oflag=direct conv=fsync 2>/tmp/dd.err
    wrc=$?
    echo 3 > /proc/sys/vm/drop_caches
    r=$(dd if=/dev/vda bs=$MiB skip=32 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    R blk_pattern label=$1 write_rc=$wrc written=$w read=$r
    rm -f /tmp/pat
}
R blk_size vda_sectors=$(cat /sys/block/vda/size 2>/dev/null) vdb_sectors=$(cat /sys/block/vdb/size 2>/dev/null) \
    vda_ro=$(cat /sys/block/vda/ro 2>/dev/null) vdb_ro=$(cat /sys/block/vdb/ro 2>/dev/null)
block_pattern boot$BOOT

if [ "$BOOT" = 1 ]; then
    # ext2 in the first 32 MiB (busybox mke2fs takes the size in KiB)
    t0=$(cut -d' ' -f1 /proc/uptime)
    mke2fs -F -L e2e /dev/vda 32768 > /tmp/mkfs.log 2>&1
    mkrc=$?
    R mkfs rc=$mkrc t0=$t0
    mount -t ext2 /dev/vda /mnt
    mrc=$?
    echo "hello from the e2e guest $TOKEN" > /mnt/hello.txt
    mkdir -p /mnt/dir
    dd if=/dev/urandom of=/mnt/dir/data.bin bs=$MiB count=2 2>/dev/null
    seq 1 20000 > /mnt/dir/numbers.txt
    echo 1 > /mnt/boot-count
    sync
    data=$(sha256sum /mnt/dir/data.bin | cut -d' ' -f1)
    hello=$(sha256sum /mnt/hello.txt | cut -d' ' -f1)
    umount /mnt
    urc=$?
    R fs mkfs_rc=$mkrc mount_rc=$mrc umount_rc=$urc data_sha256=$data hello_sha256=$hello
else
    # The filesystem written before the reboot is read back, then updated.
    mount -t ext2 /dev/vda /mnt
    mrc=$?
    data=$(sha256sum /mnt/dir/data.bin | cut -d' ' -f1)
    hello=$(cat /mnt/hello.txt)
    echo $BOOT > /mnt/boot-count
    echo "second boot $TOKEN" > /mnt/boot2.txt
    sync
    umount /mnt
    R fs_again mount_rc=$mrc umount_rc=$? data_sha256=$data hello_ok=$([ "$hello" = "hello from the e2e guest $TOKEN" ] && echo 1 || echo 0)
fi

ro_sha=$(dd if=/dev/vdb bs=$MiB 2>/dev/null | sha256sum | cut -d' ' -f1)
dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct conv=fsync 2>/dev/null
ro_write_rc=$?
# Clearing the block device's own flag changes nothing: the disk stays read-only because the
# device offered VIRTIO_BLK_F_RO (Linux: set_disk_ro), so opening it for writing still fails.
blockdev --setrw /dev/vdb 2>/dev/null
dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct conv=fsync 2>/dev/null
ro_setrw_rc=$?
blockdev --setro /dev/vdb 2>/dev/null
R blk_ro read_sha256=$ro_sha write_rc=$ro_write_rc setrw_write_rc=$ro_setrw_rc

# -- net: MAC, ping over the TAP, 4 MiB each way -----------------------------------------------
net_stats() {  # frames and interrupts of eth0 so far, for the transfer figures
    echo "tx_packets=$(cat /sys/class/net/eth0/statistics/tx_packets) rx_packets=$(cat /sys/class/net/eth0/statistics/rx_packets) irqs=$(grep " $(basename "$(readlink -f /sys/class/net/eth0/device)")\$" /proc/interrupts | awk '{print $2 + $3}')"
}
net_workload() {  # $1: label, $2: bytes each way
    ip link set eth0 up
    ip addr add "$IP/24" dev eth0 2>/dev/null
    R net_if label=$1 mac=$(cat /sys/class/net/eth0/address 2>/dev/null) mtu=$(cat /sys/class/net/eth0/mtu 2>/dev/null)
    ping -c 3 -W 5 "$DOM0IP" > /tmp/ping.log 2>&1
    prc=$?
    R net_ping label=$1 rc=$prc received=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/ping.log)
    dd if=/dev/urandom of=/tmp/up.bin bs=1024 count=$(($2 / 1024)) 2>/dev/null
    up=$(sha256sum /tmp/up.bin | cut -d' ' -f1)
    R net_stats label=$1-before-up $(net_stats)
    t0=$(cut -d' ' -f1 /proc/uptime)
    timeout 200 nc "$DOM0IP" 5001 < /tmp/up.bin
    R net_up label=$1 rc=$? bytes=$(stat -c %s /tmp/up.bin) sha256=$up t0=$t0
    R net_stats label=$1-after-up $(net_stats)
    t0=$(cut -d' ' -f1 /proc/uptime)
    # The first line asks dom0 for that many bytes of its test file.
    echo "$2" | timeout 200 nc "$DOM0IP" 5002 > /tmp/down.bin
    R net_down label=$1 rc=$? t0=$t0 bytes=$(stat -c %s /tmp/down.bin) sha256=$(sha256sum /tmp/down.bin | cut -d' ' -f1)
    R net_stats label=$1-after-down $(net_stats)
    rm -f /tmp/up.bin /tmp/down.bin
}
# The full size is moved once (boot 1); boot 2 and the re-probe move an eighth.
net_workload boot$BOOT $([ "$BOOT" = 1 ] && echo "$NETBYTES" || echo $((NETBYTES / 8)))
# Where a ping's and a TCP segment's time goes (domU-netperf.sh, dom0_netperf.py): boot 1 only.
[ "$BOOT" = 1 ] && [ -f /e2e-netperf.sh ] && . /e2e-netperf.sh

# -- console: port 0 (an hvc console next to Xen's hvc0) and the named port ---------------------
find_consoles
R console_ports named=${port:-none} hvc=$(ls /dev/hvc* 2>/dev/null | tr '\n' ',')
console_ping "${hvc:-/dev/hvc1}" p0-boot$BOOT 30
console_ping "${port:-/dev/vport0p1}" named-boot$BOOT 30

# -- device reset and re-probe without a reboot: unbind and rebind every virtio-mmio window ------
if [ "$BOOT" = 1 ]; then
    drv=/sys/bus/platform/drivers/virtio-mmio
    wins=$(ls "$drv" | grep 'virtio$')
    for w in $wins; do echo "$w" > "$drv/unbind"; done
    gone=$(ls /sys/bus/virtio/devices | wc -l)
    for w in $wins; do echo "$w" > "$drv/bind"; done
    sleep 1
    R reprobe windows=$(echo $wins | wc -w) devices_after_unbind=$gone devices_after_bind=$(ls /sys/bus/virtio/devices | wc -l)
    report_devices
    r=$(dd if=/dev/vda bs=$MiB skip=32 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    R blk_after_reprobe sha256=$r
    ip addr flush dev eth0 2>/dev/null
    net_workload reprobe $((NETBYTES / 8))  # the full size is moved at each boot
fi

if [ "$BOOT" = 1 ]; then
    R reboot-requested
    sync
    reboot -f
    sleep 60
fi
R boot n=$BOOT done
# dom0 reboots this domain with `xl reboot` (boot 3): wait for it.
wait_for_toolstack
