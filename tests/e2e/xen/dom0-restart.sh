# Sourced by dom0.sh when E2E_MODE=restart (issue 17, docs/restart.md): vmmiod is killed and
# restarted three times under a running domU, which must only see a pause.
#   phase A: kill -9 while the guest writes a pattern (O_DIRECT, 1 MiB at a time)
#   phase B: kill -9 while the guest is idle; then it uses disk, console and net
#   phase C: SIGTERM (what `systemctl restart` sends) while the guest writes
# After each, the next instance is started the way systemd would, and must take the IOREQ server
# and the devices over (xen_ioreq_server_reattached, state_resumed). The guest reports on hvc0;
# test_xen_restart.py judges. Windows (dom0-guest.sh; xl 4.17 knows only virtio disks):
#   xvda -> 0x2000000 block   xvdb -> 0x2000200 net   xvdc -> 0x2000400 console
. "$E2E/dom0-guest.sh"
e2e_yaml > /tmp/guest.yaml
cp /tmp/guest.yaml /out/guest.yaml
# watchdog_thresh=60: under TCG the next instance needs ~30 s to start (Python imports), a vCPU
# waiting that long in its IOREQ trips Linux's soft-lockup detector (20 s by default) although
# nothing is wrong; on hardware the pause is a fraction of a second (docs/restart.md).
guest_cfg "$GUEST" "$DOMU_MEM" 2 destroy "watchdog_thresh=60 $(e2e_args restart)" \
    "vdev=xvda, access=rw, target=$IMG_RW" "vdev=xvdb, access=rw, target=$WINDOWS_DIR/net0" \
    "vdev=xvdc, access=rw, target=$WINDOWS_DIR/con0" > /tmp/guest.cfg
cp /tmp/guest.cfg /out/guest.cfg

python3 -m compileall -q /tmp/src/vmmiod > /out/compileall.txt 2>&1
# Warm the page cache: under TCG a cold start of python3 takes long enough to miss libxl's 10 s.
python3 -c "import vmmiod.daemon, vmmiod.hypervisors.xen.adaptor, vmmiod.devices.block, vmmiod.devices.net, vmmiod.devices.console, vmmiod.mmio, vmmiod.state.keeper, uvloop"
VMMIOD_STARTS=0
# start_vmmiod: one instance, as systemd starts it (the runtime directory is kept: /run/vmmiod/e2e).
start_vmmiod() {
    VMMIOD_STARTS=$((VMMIOD_STARTS + 1))
    VMMIOD_LOG=/out/vmmiod-restart-$VMMIOD_STARTS.log
    $AS_UNIT python3 -m vmmiod run /tmp/guest.yaml > "$VMMIOD_LOG" 2>&1 &
    VMMIOD_PID=$!
    VMMIOD_T0=$(cut -d' ' -f1 /proc/uptime)
    say "vmmiod instance $VMMIOD_STARTS started, pid $VMMIOD_PID"
}
vmmiod_ready() { grep -q '"event": *"daemon_ready"' "$VMMIOD_LOG"; }
# Once the instance logs (past mdwe.py's exec): how it runs.
instance_result() { result "instance n=$VMMIOD_STARTS seccomp=$(seccomp_of $VMMIOD_PID)"; }
# wait_exit SECONDS: reap the running instance (kill -9 after SECONDS); its status in WAIT_RC.
# (kill -0 cannot tell: an exited child stays a zombie until it is waited for.)
wait_exit() {
    ( sleep "$1"; kill -9 "$VMMIOD_PID" 2>/dev/null ) &
    _guard=$!
    wait "$VMMIOD_PID" 2>/dev/null
    WAIT_RC=$?
    kill "$_guard" 2>/dev/null
}
# restart SIGNAL PHASE: stop the running instance with SIGNAL, start the next, wait for it.
restart() {
    T_STOP=$(cut -d' ' -f1 /proc/uptime)
    kill -"$1" "$VMMIOD_PID"
    wait_exit 60
    STOP_RC=$WAIT_RC
    start_vmmiod
    wait_for 120 "vmmiod $VMMIOD_STARTS ready" vmmiod_ready || fail "vmmiod $VMMIOD_STARTS not ready"
    instance_result
    result "restart phase=$2 signal=$1 exit=$STOP_RC ready_seconds=$(since $VMMIOD_T0) stop_to_ready_seconds=$(since $T_STOP)"
    address_tap
}

start_peer

start_vmmiod
# The daemon up and waiting for the domain before xl starts its 10 s wait for InitWait.
wait_for 120 "vmmiod up" grep -q xen_domain_waiting "$VMMIOD_LOG" || fail "vmmiod did not start"
instance_result
timeout 90 xl create -p /tmp/guest.cfg > /out/xl-create.log 2>&1 || fail "xl create -p"
wait_for 90 "vmmiod ready" vmmiod_ready || fail "vmmiod not ready"
result "vmmiod_ready=1 domid=$(xl domid $GUEST)"
address_tap
xl unpause "$GUEST" || fail "xl unpause"

wait_for 300 "phase A" guest_says "E2E-R restart_io phase=A started" || fail "guest never started phase A"
sleep 1
restart 9 A
wait_for 300 "phase B" guest_says "E2E-R restart_idle phase=B idle" || fail "guest never reached phase B"
restart 9 B
wait_for 300 "phase C" guest_says "E2E-R restart_io phase=C started" || fail "guest never started phase C"
sleep 1
restart TERM C
wait_for 300 "guest done" guest_says "E2E-R restart done" || fail "guest did not finish after the restarts"
result "guest_done=1"
wait_for 60 "domain gone" sh -c "! xl domid $GUEST" || timeout 60 xl destroy "$GUEST" > /out/xl-destroy.log 2>&1
wait_exit 60
result "vmmiod_final_exit=$WAIT_RC"
kill $PEER_PID 2>/dev/null
