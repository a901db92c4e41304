# The domU's side of the restart run (e2e.mode=restart, dom0-restart.sh), sourced by its /init.
# Every finding is an "E2E-R ..." line on hvc0; test_xen_restart.py judges. Pauses are measured
# on the guest's clock: the longest single 1 MiB write of a phase is the vCPU's wait for the
# next vmmiod instance.
DOM0IP=$(arg e2e.dom0ip)
IP=$(arg e2e.ip)
MiB=1048576
load_modules $VIRTIO_MODULES
sleep 1
ip link set eth0 up
ip addr add "$IP/24" dev eth0 2>/dev/null
R restart_ready devices=$(ls /sys/bus/virtio/devices | wc -l)

now() { cut -d' ' -f1 /proc/uptime; }
io_phase() {  # $1: phase. 48 MiB at 4 MiB into vda, one O_DIRECT write per MiB, then verified.
    dd if=/dev/urandom of=/tmp/pat bs=$MiB count=48 2>/dev/null
    w=$(sha256sum /tmp/pat | cut -d' ' -f1)
    R restart_io phase=$1 started
    i=0; wrc=0; max=0; t_start=$(now)
    while [ $i -lt 48 ]; do
        t0=$(now)
        dd if=/tmp/pat of=/dev/vda bs=$MiB skip=$i seek=$((4 + i)) count=1 oflag=direct \
            conv=notrunc,fsync 2>/dev/null || wrc=1
        max=$(awk "BEGIN{d=$(now)-$t0; print (d>$max)?d:$max}")
        i=$((i + 1))
    done
    r=$(dd if=/dev/vda bs=$MiB skip=4 count=48 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    R restart_io phase=$1 done write_rc=$wrc written=$w read=$r pause_seconds=$max seconds=$(awk "BEGIN{print $(now)-$t_start}")
    rm -f /tmp/pat
}
io_phase A

R restart_idle phase=B idle
sleep 5  # dom0 kills vmmiod now; the next accesses wait for the next instance
t0=$(now)
dd if=/dev/urandom of=/tmp/one bs=$MiB count=1 2>/dev/null
dd if=/tmp/one of=/dev/vda bs=$MiB seek=60 oflag=direct conv=notrunc,fsync 2>/dev/null
wrc=$?
ok=$([ "$(dd if=/dev/vda bs=$MiB skip=60 count=1 iflag=direct 2>/dev/null | sha256sum)" = "$(sha256sum < /tmp/one)" ] && echo 1 || echo 0)
R restart_idle phase=B disk write_rc=$wrc read_ok=$ok pause_seconds=$(awk "BEGIN{print $(now)-$t0}")
find_consoles
console_ping "${hvc:-/dev/hvc1}" p0-afterB 60
console_ping "${port:-/dev/vport0p1}" named-afterB 60
ping -c 3 -W 10 "$DOM0IP" > /tmp/ping.log 2>&1
R restart_idle phase=B net rc=$? received=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/ping.log)

io_phase C

R restart_kernel softlockup=$(dmesg | grep -c "soft lockup") hung=$(dmesg | grep -c "blocked for more than") \
    virtio=$(dmesg | grep -ci "virtio.*\(error\|fail\|not a head\|bad\)") io_error=$(dmesg | grep -ci "I/O error")
dmesg | grep -i "virtio\|lockup\|blocked for\|I/O error" | tail -n 20 | sed 's/^/E2E-K /'
R restart done
