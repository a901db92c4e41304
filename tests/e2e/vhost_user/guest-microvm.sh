# The microvm pass's workload (busybox sh), run by the image's /init from the results share (/out),
# copied there as guest.sh. Every device is virtio-mmio, found through the ACPI tables: one
# vhost-user-blk disk (the only virtio block device, /dev/vda) and the vhost-user NIC (eth0).
# Findings go to the serial console as `E2E-R <phase> key=value...` lines and to files in /out;
# tests/e2e/vhost_user/test_vhost_user_e2e.py checks them on the host afterwards.
. /out/params.env
r() { echo "E2E-R $*"; }

r boot uptime="$(cut -d' ' -f1 /proc/uptime)" kernel="$(uname -r)"
# The transport of each virtio device: its driver's name (virtio_mmio, not virtio_pci).
for d in /sys/bus/virtio/devices/virtio*; do
    r device name="${d##*/}" id="$(cat "$d/device")" \
        transport="$(basename "$(readlink -f "$d/../driver")")"
done
VERIFY=/dev/vda
r disks verify="$VERIFY" verify_sectors="$(cat /sys/block/vda/size 2>/dev/null)"

if [ -b "$VERIFY" ]; then
    timeout "$STEP_TIMEOUT" fio --name=verify --filename="$VERIFY" --direct=1 --ioengine=libaio \
        --iodepth=16 --rw=randwrite --bs=4k --size="${VERIFY_MIB}M" --verify=crc32c \
        --do_verify=1 --verify_fatal=1 --output-format=json --output=/out/fio-verify.json
    rc=$?
    err=$(grep -m1 '"error"' /out/fio-verify.json | tr -dc '0-9')
    r verify rc=$rc error="${err:-missing}"
else
    r verify rc=missing-disk
fi

if [ "$NET" = 1 ]; then
    ip link set lo up
    ip addr add "$GUEST_IP/24" dev eth0
    ip link set eth0 up
    r net mac="$(cat /sys/class/net/eth0/address 2>/dev/null)"
    out=$(timeout 60 ping -c 5 -w 40 -s 56 "$HOST_IP" 2>&1 | grep 'packets transmitted')
    r ping size=56 received="$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')"
else
    r net skipped=1
fi

dmesg > /out/dmesg.txt
r done uptime="$(cut -d' ' -f1 /proc/uptime)"
