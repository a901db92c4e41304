# Sourced by dom0.sh when E2E_MODE=full: vmmiod serves the domU's block, net and console devices.
#
# xl 4.17 only knows virtio *disks*, so the guest config declares one per window and vmmiod's
# YAML says what each window is (the guest binds its driver by the DeviceID register):
#   xvda -> 0x2000000 irq 33: block, read-write   xvdb -> 0x2000200 irq 34: block, read-only
#   xvdc -> 0x2000400 irq 35: net                  xvdd -> 0x2000600 irq 36: console
# The daemon takes those windows from xenstore (`mmio: auto`, in declaration order). libxl stats
# each disk's target (a regular file or block device), so the net and console windows name empty
# placeholder files: only vmmiod's YAML says what a window serves.
#
# Lifecycle: like `systemd` would with vmmiod@e2e.service (Restart=always), a vmmiod instance is
# started before the guest exists (it waits for the domain by name), `xl create -p`, daemon READY,
# `xl unpause`. When the guest reboots (on_reboot = "restart"), xl destroys the domain and creates
# a new one: the first instance exits, a second one picks up the new domain. At the end
# `xl destroy` must leave the last instance exiting 0 and xl without a device error.
# The images live in dom0's RAM, as on a local disk: not on the 9p share, whose zero-copy reads
# and writes cannot pin foreign-mapped guest pages (EFAULT). They go back to /out at the end.
IMG_RW=/tmp/disk-rw.img
IMG_RO=/tmp/disk-ro.img
CON_SOCK=/run/vmmiod/e2e-console.sock
PORT_SOCK=/run/vmmiod/e2e-port.sock
WINDOWS_DIR=/run/vmmiod/e2e-windows
VMMIOD_STARTS=0
mkdir -p /run/vmmiod $WINDOWS_DIR
cp /out/disk-ro.img "$IMG_RO"
truncate -s "$((DISK_RW_MIB * 1048576))" "$IMG_RW"
: > $WINDOWS_DIR/net0
: > $WINDOWS_DIR/con0
# A crash in native code (ctypes) then leaves a Python traceback in the daemon's log.
export PYTHONFAULTHANDLER=1

cat > /tmp/guest.yaml <<YAML
# vmmiod configuration for the e2e guest, as a user would write it.
guest:
  name: $GUEST
hypervisor:
  kind: xen
  domain_wait: 120
log:
  level: info
  format: json
  stats_interval: 0
devices:
  - id: disk0
    type: block
    mmio: auto
    path: $IMG_RW
  - id: disk1
    type: block
    mmio: auto
    path: $IMG_RO
    readonly: true
  - id: net0
    type: net
    mmio: auto
    mac: "$NET_MAC"
    backend:
      kind: tap
      ifname: $TAP_IF
  - id: con0
    type: console
    mmio: auto
    ports:
      - name: console
        backend:
          kind: socket
          path: $CON_SOCK
      - name: $CONSOLE_PORT
        backend:
          kind: socket
          path: $PORT_SOCK
YAML
cp /tmp/guest.yaml /out/guest.yaml

VD="backendtype=standalone, specification=virtio, format=raw"
cat > /tmp/guest.cfg <<CFG
name = "$GUEST"
kernel = "/e2e/vmlinuz"
ramdisk = "/tmp/domU.cpio"
extra = "console=hvc0 rdinit=/init e2e.mode=full e2e.dom0ip=$DOM0_IP e2e.ip=$DOMU_IP e2e.token=$TOKEN e2e.port=$CONSOLE_PORT e2e.netbytes=$NET_BYTES"
memory = $DOMU_MEM
vcpus = 2
on_poweroff = "destroy"
on_reboot = "restart"
on_crash = "destroy"
disk = [ "$VD, vdev=xvda, access=rw, target=$IMG_RW",
         "$VD, vdev=xvdb, access=ro, target=$IMG_RO",
         "$VD, vdev=xvdc, access=rw, target=$WINDOWS_DIR/net0",
         "$VD, vdev=xvdd, access=rw, target=$WINDOWS_DIR/con0" ]
CFG
cp /tmp/guest.cfg /out/guest.cfg

T0=$(cut -d' ' -f1 /proc/uptime)
timeout 90 python3 -m vmmiod check /tmp/guest.yaml > /out/vmmiod-check.txt 2>&1 \
    || fail "vmmiod check refused the config: $(tail -n 5 /out/vmmiod-check.txt)"
result "vmmiod_check=ok seconds=$(since $T0)"
T0=$(cut -d' ' -f1 /proc/uptime)
python3 -m compileall -q /tmp/src/vmmiod > /out/compileall.txt 2>&1
result "vmmiod_compile seconds=$(since $T0)"
T0=$(cut -d' ' -f1 /proc/uptime)
python3 -c "import vmmiod.daemon, vmmiod.hypervisors.xen.adaptor, vmmiod.devices.block, vmmiod.devices.net, vmmiod.devices.console, vmmiod.mmio, vmmiod.bus, uvloop"
result "vmmiod_import seconds=$(since $T0)"

# start_vmmiod LOGFILE: one daemon instance, exactly as a user would run it.
start_vmmiod() {
    VMMIOD_STARTS=$((VMMIOD_STARTS + 1))
    VMMIOD_LOG=$1
    ( python3 -m vmmiod run /tmp/guest.yaml > "$VMMIOD_LOG" 2>&1; echo $? > "$VMMIOD_LOG.exit" ) &
    VMMIOD_SUBSHELL=$!
    say "vmmiod instance $VMMIOD_STARTS started (log $VMMIOD_LOG)"
}
vmmiod_ready() { grep -q '"event": *"daemon_ready"' "$VMMIOD_LOG"; }
vmmiod_exited() { [ -f "$VMMIOD_LOG.exit" ]; }
address_tap() {
    wait_for 20 "tap" ip link show "$TAP_IF" || { result "tap_present=0"; return 1; }
    ip addr add "$DOM0_IP/24" dev "$TAP_IF" 2>/dev/null
    ip link set "$TAP_IF" up
    result "tap_present=1"
}

python3 "$E2E/dom0_peer.py" --token "$TOKEN" --send /out/net-down.bin --out /out/peer.txt \
    --console "console=$CON_SOCK" --console "$CONSOLE_PORT=$PORT_SOCK" --lifetime 900 &
PEER_PID=$!
# Snapshots of vmmiod's counters around the guest's network phases (domU-netperf.sh).
python3 "$E2E/dom0_netperf.py" --out /out/netperf.jsonl --tap "$TAP_IF" --lifetime 900 &
NETPERF_PID=$!

start_vmmiod /out/vmmiod.log
say "xl create -p (4 virtio-mmio windows)"
T0=$(cut -d' ' -f1 /proc/uptime)
timeout 90 xl create -p /tmp/guest.cfg > /out/xl-create.log 2>&1 || fail "xl create -p"
result "xl_create=ok seconds=$(since $T0)"
wait_for 60 "vmmiod ready" vmmiod_ready || fail "vmmiod not ready"
result "vmmiod_ready=1 domid=$(xl domid $GUEST)"
address_tap
xl unpause "$GUEST" || fail "xl unpause"
say "guest unpaused (boot 1)"

# Boot 1 ends with the guest rebooting; xl re-creates the domain (its daemon process stays).
if wait_for 300 "boot 1" guest_says "E2E-R reboot-requested"; then
    result "boot1_finished=1"
    ip -s link show "$TAP_IF" > /out/tap-stats-boot1.txt 2>&1
    wait_for 60 "vmmiod 1 exit" vmmiod_exited || { result "vmmiod1_exit=timeout"; kill $VMMIOD_SUBSHELL; }
    result "vmmiod1_exit=$(cat /out/vmmiod.log.exit 2>/dev/null)"
    start_vmmiod /out/vmmiod-2.log
    wait_for 90 "vmmiod 2 ready" vmmiod_ready || fail "vmmiod (second instance) not ready after the reboot"
    result "vmmiod2_ready=1 domid=$(xl domid $GUEST)"
    address_tap
    wait_for 300 "boot 2" guest_says "E2E-R boot n=2 done" || fail "guest did not finish boot 2"
    result "boot2_finished=1"
    ip -s link show "$TAP_IF" > /out/tap-stats-boot2.txt 2>&1
else
    fail "guest did not finish boot 1"
fi

# Teardown the way an operator does it.
T0=$(cut -d' ' -f1 /proc/uptime)
timeout 60 xl destroy "$GUEST" > /out/xl-destroy.log 2>&1
XL_RC=$?
result "xl_destroy_rc=$XL_RC seconds=$(since $T0)"
wait_for 60 "vmmiod exit" vmmiod_exited || { result "vmmiod_final_exit=timeout"; kill $VMMIOD_SUBSHELL; }
result "vmmiod_final_exit=$(cat "$VMMIOD_LOG.exit" 2>/dev/null)"
kill $PEER_PID $NETPERF_PID 2>/dev/null
# dom0.sh's collect copies the images back to the host for its own checks (e2fsck, debugfs,
# the read-only image untouched).
