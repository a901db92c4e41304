# Sourced by dom0-full.sh and dom0-restart.sh: the "e2e" guest both modes run, and its dom0 side.
# xl 4.17 only knows virtio *disks*, so the guest's config declares one per window and the YAML
# says what each window is (the guest binds its driver by the DeviceID register). libxl stats
# each disk's target (a regular file or block device), so the net and console windows name empty
# placeholder files: only vmmiod's YAML says what a window serves. The images live in dom0's RAM,
# as on a local disk: not on the 9p share, whose zero-copy reads and writes cannot pin
# foreign-mapped guest pages (EFAULT). dom0.sh's collect copies them back to /out at the end.
IMG_RW=/tmp/disk-rw.img
CON_SOCK=/run/vmmiod/e2e-console.sock
PORT_SOCK=/run/vmmiod/e2e-port.sock
WINDOWS_DIR=/run/vmmiod/e2e-windows
VD="backendtype=standalone, specification=virtio, format=raw"
mkdir -p /run/vmmiod $WINDOWS_DIR /etc/vmmiod
truncate -s "$((DISK_RW_MIB * 1048576))" "$IMG_RW"
: > $WINDOWS_DIR/net0
: > $WINDOWS_DIR/con0
# A crash in native code (ctypes) then leaves a Python traceback in the daemon's log.
export PYTHONFAULTHANDLER=1

# e2e_yaml [RO_IMAGE]: the guest's YAML, as a user would write it: block (read-write), with
# RO_IMAGE a read-only block next, then net and console (two ports), every window mmio: auto.
e2e_yaml() {
    cat <<YAML
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
YAML
    [ -n "${1:-}" ] && cat <<YAML
  - id: disk1
    type: block
    mmio: auto
    path: $1
    readonly: true
YAML
    cat <<YAML
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
}

# guest_cfg NAME MEMORY VCPUS ON_REBOOT "KERNEL ARGS" DISK...: an xl config; each DISK is a
# virtio disk's "vdev=..., access=..., target=..." (target= last: it takes the rest).
guest_cfg() {
    _name=$1 _mem=$2 _vcpus=$3 _reboot=$4 _extra=$5; shift 5
    _disks=""
    for _d in "$@"; do _disks="$_disks${_disks:+, }\"$VD, $_d\""; done
    cat <<CFG
name = "$_name"
kernel = "/e2e/vmlinuz"
ramdisk = "/tmp/domU.cpio"
extra = "console=hvc0 rdinit=/init $_extra"
memory = $_mem
vcpus = $_vcpus
on_poweroff = "destroy"
on_reboot = "$_reboot"
on_crash = "destroy"
disk = [ $_disks ]
CFG
}
# The e2e guest's kernel arguments for domU-init.sh (MODE, then any more).
e2e_args() { echo "e2e.mode=$1 e2e.dom0ip=$DOM0_IP e2e.ip=$DOMU_IP e2e.token=$TOKEN e2e.port=$CONSOLE_PORT${2:+ $2}"; }

address_tap() {  # the TAP vmmiod made for the guest's net window, addressed and up
    wait_for 30 "tap" ip link show "$TAP_IF" || { result "tap_present=0"; return 1; }
    ip addr add "$DOM0_IP/24" dev "$TAP_IF" 2>/dev/null
    ip link set "$TAP_IF" up
    result "tap_present=1"
}
# $AS_UNIT COMMAND... &: run vmmiod under MemoryDenyWriteExecute=yes, as both systemd units run
# it (Debian 12's systemd 252 applies it as a seccomp filter: tests/hardening/mdwe.py, which
# execs the command; inherited by what it forks). A prefix, not a function: a backgrounded
# function would be a subshell, and $! its pid, not the daemon's (signals must reach vmmiod).
# /proc/<pid>/status then says "Seccomp: 2".
AS_UNIT="python3 /src/tests/hardening/mdwe.py seccomp"
seccomp_of() { sed -n 's/^Seccomp:[[:space:]]*//p' "/proc/$1/status"; }
start_peer() {  # the guest's peer in dom0 (TCP up and down, console pings), for 900 s
    python3 "$E2E/dom0_peer.py" --token "$TOKEN" --send /out/net-down.bin --out /out/peer.txt \
        --console "console=$CON_SOCK" --console "$CONSOLE_PORT=$PORT_SOCK" --lifetime 900 &
    PEER_PID=$!
}
