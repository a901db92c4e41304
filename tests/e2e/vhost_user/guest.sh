# The guest's workload (busybox sh), run by the image's /init from the results share (/out).
# Findings go to the serial console as `E2E-R <phase> key=value...` lines and to files in /out;
# `E2E-B` lines bracket each benchmark job (the host samples the backend's CPU time on them);
# `E2E-K kill` asks the host to SIGKILL the backend under test while fio runs.
# tests/e2e/vhost_user/test_vhost_user_e2e.py checks everything on the host afterwards.
. /out/params.env
r() { echo "E2E-R $*"; }
reversed() { out=""; for w in "$@"; do out="$w $out"; done; echo $out; }  # the back-ends' turns

# /dev/vdX of the virtio-blk device in PCI slot $1 (two hex digits): QEMU's addr= fixes the slots.
disk_at() {
    for d in /sys/block/vd*; do
        case "$(readlink -f "$d/device")" in
            */0000:00:$1.0/virtio*) echo "/dev/${d##*/}"; return 0 ;;
        esac
    done
    return 1
}

# fio's summary from its JSON output: error and the io count of both directions.
fio_line() {
    err=$(grep -m1 '"error"' "$1" | tr -dc '0-9')
    echo "error=${err:-missing}"
}

r boot uptime="$(cut -d' ' -f1 /proc/uptime)" kernel="$(uname -r)"
# The NICs are probed (QEMU has had testpmd's answers): the host stops testpmd's busy poll until
# the net side by side needs it.
[ "$NET_MIRROR" = 1 ] && echo "E2E-N idle"
EXT4=$(disk_at "$SLOT_EXT4")
VERIFY=$(disk_at "$SLOT_VERIFY")
r disks ext4="$EXT4" verify="$VERIFY" \
    ext4_sectors="$(cat /sys/block/${EXT4#/dev/}/size 2>/dev/null)" \
    verify_sectors="$(cat /sys/block/${VERIFY#/dev/}/size 2>/dev/null)"

# -- blk: fio crc32c write + verify ------------------------------------------------------------
if [ -b "$VERIFY" ]; then
    timeout "$STEP_TIMEOUT" fio --name=verify --filename="$VERIFY" --direct=1 --ioengine=libaio \
        --iodepth=16 --rw=randwrite --bs=4k --size="${VERIFY_MIB}M" --verify=crc32c \
        --do_verify=1 --verify_fatal=1 --output-format=json --output=/out/fio-verify.json
    r verify rc=$? "$(fio_line /out/fio-verify.json)"
else
    r verify rc=missing-disk
fi

# -- blk: ext4 made here, checked on the host (e2fsck, checksums) ------------------------------
if [ -b "$EXT4" ]; then
    rc=0
    timeout "$STEP_TIMEOUT" mkfs.ext4 -q -F -L vu-e2e "$EXT4" || rc=mkfs
    if [ "$rc" = 0 ]; then
        mount -t ext4 "$EXT4" /mnt || rc=mount
    fi
    if [ "$rc" = 0 ]; then
        mkdir -p /mnt/dir/sub
        dd if=/dev/urandom of=/mnt/big.bin bs=64k count=48 2>/dev/null
        dd if=/dev/urandom of=/mnt/dir/mid.bin bs=4k count=77 2>/dev/null
        echo "vmmiod vhost-user e2e $TOKEN" > /mnt/dir/sub/note.txt
        : > /mnt/empty
        (cd /mnt && sha256sum big.bin dir/mid.bin dir/sub/note.txt empty) > /out/ext4-sums.txt
        sync
        umount /mnt || rc=umount
    fi
    r ext4 rc=$rc
else
    r ext4 rc=missing-disk
fi

# -- net: ping and iperf3 both ways with the host's TAP ----------------------------------------
if [ "$NET" = 1 ]; then
    ip link set lo up
    ip addr add "$GUEST_IP/24" dev eth0
    ip link set eth0 up
    r net mac="$(cat /sys/class/net/eth0/address 2>/dev/null)"
    for size in 56 1400; do
        out=$(timeout 60 ping -c 5 -w 40 -s $size "$HOST_IP" 2>&1 | grep 'packets transmitted')
        r ping size=$size received="$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')"
    done
    timeout 90 iperf3 -c "$HOST_IP" -t "$IPERF_SECONDS" --connect-timeout 10000 -J \
        > /out/iperf-up.json 2>/out/iperf-up.err
    r iperf dir=up rc=$?
    timeout 90 iperf3 -c "$HOST_IP" -t "$IPERF_SECONDS" --connect-timeout 10000 -J -R \
        > /out/iperf-down.json 2>/out/iperf-down.err
    r iperf dir=down rc=$?
else
    r net skipped=1
fi

# -- side by side: the same fio jobs against every backend's export of the same image ----------
# name rw bs iodepth
JOBS="randread-qd1:randread:4k:1 randread-qd32:randread:4k:32 randwrite-qd1:randwrite:4k:1
randwrite-qd32:randwrite:4k:32 seqread-1m:read:1M:8 seqwrite-1m:write:1M:8"
# Each job runs BENCH_ROUNDS rounds of BENCH_SECONDS/BENCH_ROUNDS per backend, the backends taking
# turns and their order reversed after every round (A B, B A, A B, ...), so that a change in the
# host's load during a job falls on both backends alike (docs/e2e.md).
round_ms=$((BENCH_SECONDS * 1000 / BENCH_ROUNDS))
order="$BENCH_BACKENDS"
echo "E2E-B begin"  # the host keeps the vCPU on a CPU of its own until `over` (placement.py)
for job in $JOBS; do
    IFS=: read -r name rw bs qd <<EOF
$job
EOF
    rnd=1
    while [ "$rnd" -le "$BENCH_ROUNDS" ]; do
        for be in $order; do
            BE=$(echo "$be" | tr a-z A-Z)
            eval slot=\$SLOT_BENCH_$BE
            dev=$(disk_at "$slot") || { r bench job=$name be=$be rc=missing-disk; continue; }
            echo "E2E-B start job=$name be=$be round=$rnd"
            timeout "$STEP_TIMEOUT" fio --name="$name" --filename="$dev" --direct=1 \
                --ioengine=libaio --rw="$rw" --bs="$bs" --iodepth="$qd" --size="${BENCH_MIB}M" \
                --time_based --runtime="${round_ms}ms" --randrepeat=0 --output-format=json \
                --output="/out/bench-$be-$name-r$rnd.json"
            rc=$?
            echo "E2E-B end job=$name be=$be round=$rnd"
            r bench job=$name be=$be round=$rnd rc=$rc
        done
        order=$(reversed $order)
        rnd=$((rnd + 1))
    done
done
echo "E2E-B over"

# -- net side by side: the same pings and UDP burst through testpmd's mirror and vmmiod's -----
# The interface of the virtio-net device in PCI slot $1; frames counted by interface $1 ($2: rx|tx).
nic_at() {
    for n in /sys/class/net/*; do
        case "$(readlink -f "$n/device")" in
            */0000:00:$1.0/virtio*) echo "${n##*/}"; return 0 ;;
        esac
    done
    return 1
}
frames() { cat "/sys/class/net/$1/statistics/$2_packets"; }
if [ "$NET_MIRROR" = 1 ]; then
    ip link set lo up
    for be in $MIRROR_BACKENDS; do
        BE=$(echo "$be" | tr a-z A-Z)
        eval slot=\$SLOT_MIRROR_$BE net=\$MIRROR_NET_$BE
        ifc=$(nic_at "$slot") || { r mirror-setup be=$be rc=missing-nic; continue; }
        # No IPv6 (its router and neighbour solicitations would be mirrored frames too); the far
        # end is a static ARP entry: a mirror answers no ARP.
        echo 1 > "/proc/sys/net/ipv6/conf/$ifc/disable_ipv6"
        ip addr add "$net.2/24" dev "$ifc" && ip link set "$ifc" up \
            && arp -i "$ifc" -s "$net.1" "$MIRROR_PEER_MAC"
        rc=$?
        r mirror-setup be=$be ifc=$ifc mac="$(cat "/sys/class/net/$ifc/address")" rc=$rc
        eval IFC_$BE=$ifc
    done
    # Rounds as in the block side by side: the back-ends take turns, the order reversed each round.
    order="$MIRROR_BACKENDS"
    rnd=1
    while [ "$rnd" -le "$BENCH_ROUNDS" ]; do
        for be in $order; do
            BE=$(echo "$be" | tr a-z A-Z)
            eval ifc=\$IFC_$BE net=\$MIRROR_NET_$BE
            [ -n "$ifc" ] || continue
            echo "E2E-N start be=$be round=$rnd"
            rx0=$(frames "$ifc" rx); tx0=$(frames "$ifc" tx)
            i=0  # the host resumes testpmd on the line above: wait for the mirror (bounded)
            until ping -c 1 -W 1 "$net.1" >/dev/null 2>&1 || [ $i -ge 5 ]; do i=$((i + 1)); done
            for size in 56 1400; do
                out=$(timeout 30 ping -c "$MIRROR_PINGS" -i 0.2 -W 2 -s $size "$net.1" 2>&1)
                r mirror be=$be round=$rnd size=$size \
                    sent="$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')" \
                    received="$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')" \
                    rtt="$(echo "$out" | sed -n 's/^round-trip .* = \([0-9.\/]*\) ms$/\1/p')"
            done
            brx=$(frames "$ifc" rx); btx=$(frames "$ifc" tx)
            timeout 60 fio --name=burst --ioengine=net --protocol=udp --hostname="$net.1" --port=9 \
                --rw=write --bs="$MIRROR_BURST_BS" --size="${MIRROR_BURST_KIB}k" \
                --runtime="$MIRROR_BURST_SECONDS" --output-format=json \
                --output="/out/netburst-$be-r$rnd.json" >/dev/null 2>&1
            rc=$?
            usleep 200000  # the last frames on their way back
            rx1=$(frames "$ifc" rx); tx1=$(frames "$ifc" tx)
            echo "E2E-N end be=$be round=$rnd"
            r burst be=$be round=$rnd rc=$rc rx=$((rx1 - brx)) tx=$((tx1 - btx))
            r mirror-round be=$be round=$rnd rx=$((rx1 - rx0)) tx=$((tx1 - tx0)) warmup=$i
        done
        order=$(reversed $order)
        rnd=$((rnd + 1))
    done
    echo "E2E-N done"
fi

# -- reconnect: the backend under test is SIGKILLed during fio and started again ---------------
# Queue depth 32: the host kills vmmiod when its inflight record shows requests popped and not
# completed (backends.watch_inflight), so the restarted instance has requests to redo.
if [ "$KILL" = 1 ] && [ -b "$VERIFY" ]; then
    fio --name=kill --filename="$VERIFY" --direct=1 --ioengine=libaio --iodepth=32 \
        --rw=randwrite --bs=4k --size="${KILL_MIB}M" --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --output-format=json --output=/out/fio-kill.json &
    pid=$!
    # Kill once fio's writes are flowing (KILL_AFTER of them completed: field 5 of the disk's
    # stat), whatever the host's speed; bounded.
    stat=/sys/block/${VERIFY#/dev/}/stat
    i=0
    while kill -0 $pid 2>/dev/null && [ "$(awk '{print $5}' "$stat")" -lt "$KILL_AFTER" ] \
            && [ $i -lt 600 ]; do
        sleep 0.1; i=$((i + 1))
    done
    if kill -0 $pid 2>/dev/null; then
        echo "E2E-K kill"
    else
        r kill status=fio-ended-early
    fi
    # Bounded: fio gives up by itself only when the backend never comes back.
    i=0
    while kill -0 $pid 2>/dev/null && [ $i -lt "$STEP_TIMEOUT" ]; do sleep 1; i=$((i + 1)); done
    kill -0 $pid 2>/dev/null && { kill -9 $pid; r kill status=fio-timeout; }
    wait $pid
    r kill fio_rc=$? "$(fio_line /out/fio-kill.json)"
fi

dmesg > /out/dmesg.txt
r done uptime="$(cut -d' ' -f1 /proc/uptime)"
