#!/bin/busybox sh
# dom0 side of the real-Xen end-to-end run. Started by the dom0 initramfs' /init (see images.py)
# with the checkout mounted read-only at /src and the run's results directory at /out.
# Reads /out/params.env (written by tests/e2e/xen/run); every step is bounded by a timeout and
# leaves its evidence in /out; /out/dom0-status is written last ("ok" or the failed step).
set -u
. /out/params.env
E2E=/src/tests/e2e/xen
XENBIN=$(ls -d /usr/lib/xen-*/bin | head -n 1)
export PATH="$XENBIN:/usr/sbin:/usr/bin:/sbin:/bin"
# vmmiod runs from a copy of the checkout's package in dom0's RAM, taken at every boot (so a
# change needs no image rebuild): Python can then cache its bytecode there once for all
# instances; compiling from the read-only share at every start costs seconds under TCG.
mkdir -p /tmp/src && cp -r /src/vmmiod /tmp/src/ && find /tmp/src -name __pycache__ -prune -exec rm -rf {} +
export PYTHONPATH=/tmp/src
CONSOLE_LOG_DIR=/var/log/xen/console
GUEST=e2e

say() { echo "E2E dom0 [$(cut -d' ' -f1 /proc/uptime)s]: $*"; }
result() { echo "$*" >> /out/dom0-results.txt; }
fail() {
    say "FAIL: $*"
    echo "fail: $*" > /out/dom0-status
    collect
    sync
    exit 1
}
collect() {
    xl dmesg > /out/xen-dmesg.log 2>&1
    cp "$CONSOLE_LOG_DIR"/guest-*.log /out/ 2>/dev/null
    dmesg > /out/dom0-dmesg.log 2>&1
    xenstore-ls -f > /out/xenstore.txt 2>&1
    cp /var/log/xen/*.log /out/ 2>/dev/null
    # The disk images (full mode) go back too, for a look at what the guest left there.
    for img in /tmp/disk-rw.img /tmp/disk-ro.img; do
        [ -f "$img" ] && timeout 60 cp "$img" /out/
    done
    sync
}
# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds, at most SECONDS
# (by the clock: under TCG one poll can itself take a noticeable time).
wait_for() {
    _end=$(( $(cut -d. -f1 /proc/uptime) + $1 )); shift 2
    while ! "$@" >/dev/null 2>&1; do
        [ "$(cut -d. -f1 /proc/uptime)" -ge "$_end" ] && return 1
        sleep 0.2
    done
    return 0
}
since() { awk "BEGIN{printf \"%.1f\", $(cut -d' ' -f1 /proc/uptime) - $1}"; }
guest_log() { cat "$CONSOLE_LOG_DIR/guest-$GUEST.log" 2>/dev/null; }
guest_says() { guest_log | grep -q "$1"; }

# The guest's console log is the domU's result channel: copy it out every few seconds so a run
# stopped from outside still leaves it behind; and stop this machine ourselves, logs collected,
# before the host's timeout would kill QEMU.
( while sleep 5; do cp "$CONSOLE_LOG_DIR"/guest-*.log /out/ 2>/dev/null; done ) &
( sleep "$E2E_DEADLINE"; say "deadline of ${E2E_DEADLINE}s reached"
  echo "fail: dom0 deadline (${E2E_DEADLINE}s) reached" > /out/dom0-status; collect; sync
  poweroff -f ) &

# -- Xen userspace: modules, xenfs, xenstored, dom0 in xenstore, xenconsoled ----------------------
say "starting Xen userspace ($XENBIN)"
modprobe -a xen-evtchn xen-privcmd xen-gntdev xen-gntalloc xenfs tun bridge || fail modprobe
mount -t xenfs xenfs /proc/xen || fail "mount xenfs"
mkdir -p /run/xenstored /run/xen /var/lib/xenstored /var/log/xen "$CONSOLE_LOG_DIR" /var/lib/xen
xenstored --pid-file /var/run/xenstored.pid || fail xenstored
wait_for 10 xenstored xenstore-list / || fail "xenstored not answering"
timeout 30 xen-init-dom0 > /out/xen-init-dom0.log 2>&1 || fail xen-init-dom0
# --log=guest keeps every guest console in a file; that file is the domU log and its results.
xenconsoled --pid-file=/var/run/xenconsoled.pid --log=guest --log-dir="$CONSOLE_LOG_DIR" \
    || fail xenconsoled
say "xenstored, xen-init-dom0 and xenconsoled running"
result "xenstored=ok"
timeout 20 xenhypfs cat /buildinfo/config > /out/hypfs-config.txt 2>&1 || fail "xenhypfs"
grep -q '^CONFIG_IOREQ_SERVER=y' /out/hypfs-config.txt && result "hyp_ioreq_server=y"
xl info > /out/xl-info.txt 2>&1
result "xen_version=$(sed -n 's/^xen_version *: *//p' /out/xl-info.txt)"

# The domU initramfs: the cached base (busybox, modules) plus /init from the checkout, appended
# as a second cpio archive (the kernel unpacks concatenated archives in order).
mkdir -p /tmp/domU-init
cp "$E2E/domU-init.sh" /tmp/domU-init/init && chmod 755 /tmp/domU-init/init
cp "$E2E/domU-workload.sh" /tmp/domU-init/e2e-workload.sh
cp "$E2E/domU-netperf.sh" /tmp/domU-init/e2e-netperf.sh
cp "$E2E/domU-restart.sh" /tmp/domU-init/e2e-restart.sh
(cd /tmp/domU-init && printf 'init\ne2e-workload.sh\ne2e-netperf.sh\ne2e-restart.sh\n' | cpio -o -H newc > /tmp/domU-init.cpio 2>/dev/null)
cat /e2e/domU-base.cpio /tmp/domU-init.cpio > /tmp/domU.cpio

if [ "$E2E_MODE" = probe ]; then
    . "$E2E/dom0-probe.sh"
elif [ "$E2E_MODE" = restart ]; then
    . "$E2E/dom0-restart.sh"
else
    . "$E2E/dom0-full.sh"
fi
collect
T_END=$(cut -d' ' -f1 /proc/uptime)
result "dom0_seconds=$T_END"
say "done"
echo ok > /out/dom0-status
sync
