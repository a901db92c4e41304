# Sourced by dom0.sh when E2E_MODE=full: vmmiod's dom0 service serves the guests xl creates.
#
# The service is started exactly as README.md's systemd unit starts it (`vmmiod dom0 --log-format
# json`, here `python3 -m vmmiod dom0 ...` since this dom0 has no systemd and no installed
# script: the same entry point; under the unit's MemoryDenyWriteExecute=yes), before any guest exists, with the YAMLs in /etc/vmmiod. From
# then on only xl is used, each step a named result line ("step name=... rc=... seconds=..."):
#   create_e2e      xl create (no -p) of "e2e": four windows from xenstore (mmio: auto)
#   create_web2     xl create of "web2" while e2e runs: two explicit windows (two guests at once)
#   create_stranger xl create of a guest with no YAML: the service leaves it alone (xl fails
#                   after its 10 s wait for InitWait, which nobody writes)
#   create_bad      xl create of a guest whose YAML does not match its xl disks (irq): that
#                   instance fails with 78, xl fails after 10 s, the service goes on
#   guest_reboot    e2e reboots itself (reboot -f): xl builds a new domain, a new instance serves it
#   xl_reboot       `xl reboot e2e`: the same through the toolstack (boot 3)
#   xl_shutdown     `xl shutdown -w web2`: the guest powers off, its instance exits 0
#   xl_destroy      `xl destroy e2e`: under 3 s, reports nothing, every Closing answered
#   service_stop    SIGTERM to the service: exit 0
# The e2e guest's windows (dom0-guest.sh; xl 4.17 knows only virtio disks):
#   xvda -> 0x2000000 irq 33: block, read-write   xvdb -> 0x2000200 irq 34: block, read-only
#   xvdc -> 0x2000400 irq 35: net                  xvdd -> 0x2000600 irq 36: console
. "$E2E/dom0-guest.sh"
IMG_RO=/tmp/disk-ro.img
cp /out/disk-ro.img "$IMG_RO"
e2e_yaml "$IMG_RO" > /etc/vmmiod/$GUEST.yaml
cp /etc/vmmiod/$GUEST.yaml /out/guest.yaml
guest_cfg "$GUEST" "$DOMU_MEM" 2 restart "$(e2e_args full "e2e.netbytes=$NET_BYTES")" \
    "vdev=xvda, access=rw, target=$IMG_RW" "vdev=xvdb, access=ro, target=$IMG_RO" \
    "vdev=xvdc, access=rw, target=$WINDOWS_DIR/net0" \
    "vdev=xvdd, access=rw, target=$WINDOWS_DIR/con0" > /tmp/guest.cfg
cp /tmp/guest.cfg /out/guest.cfg

# -- the second guest (explicit windows), the one without a YAML, the mismatched one -------------
cp /out/disk-ro.img /tmp/web2-ro.img
truncate -s 8M /tmp/web2-rw.img
: > /tmp/stranger.img
cat > /etc/vmmiod/web2.yaml <<YAML
# Explicit windows: they must be the ones xl gives web2's two disks (xvda, xvdb).
guest:
  name: web2
hypervisor:
  kind: xen
log:
  format: json
  stats_interval: 0
devices:
  - id: ro
    type: block
    mmio: {base: 0x2000000, irq: 33}
    path: /tmp/web2-ro.img
    readonly: true
  - id: rw
    type: block
    mmio: {base: 0x2000200, irq: 34}
    path: /tmp/web2-rw.img
YAML
cat > /etc/vmmiod/bad.yaml <<YAML
# Does not match bad.cfg: xl gives its disk irq 33, not 40.
guest:
  name: bad
hypervisor:
  kind: xen
log:
  format: json
devices:
  - id: disk0
    type: block
    mmio: {base: 0x2000000, irq: 40}
    path: /tmp/stranger.img
YAML
cp /etc/vmmiod/web2.yaml /etc/vmmiod/bad.yaml /out/
guest_cfg web2 128 1 restart e2e.mode=light "vdev=xvda, access=ro, target=/tmp/web2-ro.img" \
    "vdev=xvdb, access=rw, target=/tmp/web2-rw.img" > /tmp/web2.cfg
guest_cfg stranger 64 1 restart e2e.mode=light "vdev=xvda, access=rw, target=/tmp/stranger.img" \
    > /tmp/stranger.cfg
guest_cfg bad 64 1 restart e2e.mode=light "vdev=xvda, access=rw, target=/tmp/stranger.img" \
    > /tmp/bad.cfg
cp /tmp/web2.cfg /tmp/stranger.cfg /tmp/bad.cfg /out/

T0=$(cut -d' ' -f1 /proc/uptime)
timeout 90 python3 -m vmmiod check /etc/vmmiod/$GUEST.yaml > /out/vmmiod-check.txt 2>&1 \
    || fail "vmmiod check refused the config: $(tail -n 5 /out/vmmiod-check.txt)"
timeout 90 python3 -m vmmiod check /etc/vmmiod/web2.yaml \
    > /out/vmmiod-check-web2.txt 2>&1
result "vmmiod_check=ok seconds=$(since $T0)"
T0=$(cut -d' ' -f1 /proc/uptime)
python3 -m compileall -q /tmp/src/vmmiod > /out/compileall.txt 2>&1
result "vmmiod_compile seconds=$(since $T0)"

# step NAME COMMAND...: run an xl command, bounded, and record its status and duration.
step() {
    _n=$1; shift
    _t=$(cut -d' ' -f1 /proc/uptime)
    timeout 90 "$@" > "/out/xl-$_n.log" 2>&1
    _rc=$?
    result "step name=$_n rc=$_rc seconds=$(since $_t)"
    say "step $_n: rc $_rc"
    return $_rc
}
service_says() { grep -q "$1" /out/dom0-service.log; }
domid_of() { xl domid "$1" 2>/dev/null; }
log_of() { cat "$CONSOLE_LOG_DIR/guest-$1.log" 2>/dev/null; }

start_peer
# Snapshots of vmmiod's counters around the guest's network phases (domU-netperf.sh).
python3 "$E2E/dom0_netperf.py" --out /out/netperf.jsonl --tap "$TAP_IF" --lifetime 900 &
NETPERF_PID=$!

# -- the service, as systemd's vmmiod-dom0.service runs it ----------------------------------------
say "starting the dom0 service"
T0=$(cut -d' ' -f1 /proc/uptime)
$AS_UNIT python3 -m vmmiod dom0 --log-format json > /out/dom0-service.log 2>&1 &
SERVICE_PID=$!
wait_for 120 "service" service_says '"dom0_started"' || fail "the dom0 service did not start"
result "service_started=1 seconds=$(since $T0) pid=$SERVICE_PID seccomp=$(seccomp_of $SERVICE_PID)"

step create_e2e xl create /tmp/guest.cfg || fail "xl create e2e (no -p)"
result "domid name=e2e boot=1 domid=$(domid_of e2e)"
address_tap
step create_web2 xl create /tmp/web2.cfg
result "domid name=web2 domid=$(domid_of web2)"
# The two that must fail, one after the other, in the background while e2e works.
( step create_stranger xl create /tmp/stranger.cfg
  step create_bad xl create /tmp/bad.cfg
  echo done > /tmp/failing-done ) &

# Boot 1 ends with the guest rebooting itself; xl builds a new domain, the service a new instance.
wait_for 900 "boot 1" guest_says "E2E-R reboot-requested" || fail "guest did not finish boot 1"
result "boot1_finished=1"
T0=$(cut -d' ' -f1 /proc/uptime)
wait_for 300 "boot 2 domain" sh -c "[ -n \"\$(xl domid e2e 2>/dev/null)\" ] && grep -q 'E2E-R boot n=2' $CONSOLE_LOG_DIR/guest-e2e.log"
result "step name=guest_reboot rc=$? seconds=$(since $T0)"
result "domid name=e2e boot=2 domid=$(domid_of e2e)"
address_tap
wait_for 600 "boot 2" guest_says "E2E-R boot n=2 done" || fail "guest did not finish boot 2"
result "boot2_finished=1"

step xl_reboot xl reboot e2e
wait_for 400 "boot 3" guest_says "E2E-R boot n=3 done" || fail "guest did not come back after xl reboot"
result "boot3_finished=1"
result "domid name=e2e boot=3 domid=$(domid_of e2e)"

wait_for 400 "web2" sh -c "cat $CONSOLE_LOG_DIR/guest-web2.log | grep -q 'E2E-R light done'" \
    || result "web2_light=timeout"
step xl_shutdown xl shutdown -w web2
step xl_destroy xl destroy e2e
wait_for 120 "failing guests" test -f /tmp/failing-done || result "failing_guests=timeout"
wait_for 30 "instances ended" sh -c "[ \$(grep -c '\"dom0_guest_\\(exited\\|failed\\)\"' /out/dom0-service.log) -ge 5 ]"

# The service survived all of it; then it stops like `systemctl stop` stops it.
kill -0 "$SERVICE_PID" 2>/dev/null && result "service_alive=1" || result "service_alive=0"
kill -TERM "$SERVICE_PID"
if wait_for 60 "service stop" service_says '"dom0_stopped"'; then
    wait $SERVICE_PID
    result "service_exit=$?"
else
    result "service_exit=timeout"
fi
cp /var/log/xen/xl-*.log /out/ 2>/dev/null
kill $PEER_PID $NETPERF_PID 2>/dev/null
# dom0.sh's collect copies the images back to the host for its own checks (e2fsck, debugfs,
# the read-only image untouched).
