# The guest's side of the network measurement, sourced by domU-workload.sh once eth0 is up
# (boot 1). Every phase is framed by two "snap" lines to dom0_netperf.py (TCP 5003 on dom0),
# which snapshots vmmiod's counters, CPU times and the TAP's counters; each line carries the
# guest's own counters (interrupts of the net and block windows, eth0's frames and bytes,
# uptime). Phases: two back-to-back snaps (what a snap itself costs), 100 block reads of 4 KiB
# at queue depth 1, 20 pings, NP_BYTES up (guest->dom0) and down (dom0->guest) over TCP; then
# NP_ROUNDS interleaved rounds of all four, timed by the guest (the goals' ratios).
# Results: /out/netperf.jsonl in dom0; netperf_report.py computes the figures.
NP_PORT=5003
NP_BYTES=1048576
NP_PINGS=20

np_irq() {  # $1: a /sys/bus/virtio device dir; its interrupt count (all CPUs)
    grep " $(basename "$1")\$" /proc/interrupts | awk '{n=0; for (i=2; i<=NF; i++) if ($i ~ /^[0-9]+$/) n+=$i; else break; print n}'
}
np_counters() {
    net=$(readlink -f /sys/class/net/eth0/device)
    blk=$(readlink -f /sys/block/vda/device)
    s=/sys/class/net/eth0/statistics
    echo "uptime=$(cut -d' ' -f1 /proc/uptime) net_irqs=$(np_irq "$net") blk_irqs=$(np_irq "$blk") tx_packets=$(cat $s/tx_packets) rx_packets=$(cat $s/rx_packets) tx_bytes=$(cat $s/tx_bytes) rx_bytes=$(cat $s/rx_bytes)"
}
np_snap() {  # $1: label, then key=value words of the guest's own findings
    label=$1; shift
    reply=$(echo "snap $label $(np_counters) $*" | timeout 90 nc "$DOM0IP" $NP_PORT)
    [ "$reply" = ok ] || R netperf_snap label=$label reply=${reply:-none}
}

np_snap cal-a
np_snap cal-b

# Block at queue depth 1: 4 KiB O_DIRECT reads, one request in flight at a time.
np_snap blk-a
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/vda of=/dev/null bs=4096 count=100 skip=8192 iflag=direct 2>/dev/null
np_snap blk-b requests=100 seconds=$(awk "BEGIN{print $(cut -d' ' -f1 /proc/uptime) - $t0}")

np_snap ping-a
ping -c $NP_PINGS -i 0.5 -W 5 "$DOM0IP" > /tmp/np-ping.log 2>&1
rtts=$(sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' /tmp/np-ping.log | tr '\n' ',' | sed 's/,$//')
np_snap ping-b pings=$NP_PINGS received=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/np-ping.log) rtts_ms=$rtts

dd if=/dev/urandom of=/tmp/np-up.bin bs=1024 count=$((NP_BYTES / 1024)) 2>/dev/null
np_snap up-a
t0=$(cut -d' ' -f1 /proc/uptime)
timeout 300 nc "$DOM0IP" 5001 < /tmp/np-up.bin
rc=$?
np_snap up-b rc=$rc bytes=$(stat -c %s /tmp/np-up.bin) seconds=$(awk "BEGIN{print $(cut -d' ' -f1 /proc/uptime) - $t0}")
rm -f /tmp/np-up.bin

np_snap down-a
t0=$(cut -d' ' -f1 /proc/uptime)
echo "$NP_BYTES" | timeout 300 nc "$DOM0IP" 5002 > /tmp/np-down.bin
rc=$?
np_snap down-b rc=$rc bytes=$(stat -c %s /tmp/np-down.bin) seconds=$(awk "BEGIN{print $(cut -d' ' -f1 /proc/uptime) - $t0}")
rm -f /tmp/np-down.bin

# The goals' ratios, from interleaved rounds: the host's load changes within seconds, so each
# round measures both sides of both goals back to back (100 block reads at queue depth 1, 5
# pings, NP_BYTES up, NP_BYTES down); netperf_report.py takes the goals from all rounds.
NP_ROUNDS=4
np_now() { cut -d' ' -f1 /proc/uptime; }
dd if=/dev/urandom of=/tmp/np-up.bin bs=1024 count=$((NP_BYTES / 1024)) 2>/dev/null
blk_s=""; rtts=""; up_s=""; down_s=""
np_snap rounds-a
i=0
while [ $i -lt $NP_ROUNDS ]; do
    t0=$(np_now)
    # (inside the disk: busybox dd skips past its end by reading the whole disk)
    dd if=/dev/vda of=/dev/null bs=4096 count=100 skip=$((8192 + 100 + i * 100)) iflag=direct 2>/dev/null
    blk_s="$blk_s${blk_s:+,}$(awk "BEGIN{print $(np_now) - $t0}")"
    ping -c 5 -i 0.5 -W 5 "$DOM0IP" > /tmp/np-ping.log 2>&1
    r=$(sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' /tmp/np-ping.log | tr '\n' ',' | sed 's/,$//')
    rtts="$rtts${rtts:+${r:+,}}$r"
    t0=$(np_now)
    timeout 300 nc "$DOM0IP" 5001 < /tmp/np-up.bin
    up_s="$up_s${up_s:+,}$(awk "BEGIN{print $(np_now) - $t0}")"
    t0=$(np_now)
    echo "$NP_BYTES" | timeout 300 nc "$DOM0IP" 5002 > /tmp/np-down.bin
    down_s="$down_s${down_s:+,}$(awk "BEGIN{print $(np_now) - $t0}")"
    [ "$(stat -c %s /tmp/np-down.bin)" = "$NP_BYTES" ] || down_s="$down_s:short"
    i=$((i + 1))
done
rm -f /tmp/np-up.bin /tmp/np-down.bin
np_snap rounds-b rounds=$NP_ROUNDS requests=100 bytes=$NP_BYTES blk_s=$blk_s rtts_ms=$rtts up_s=$up_s down_s=$down_s
R netperf done=1
