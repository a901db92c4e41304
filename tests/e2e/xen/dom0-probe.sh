# Sourced by dom0.sh when E2E_MODE=probe: no vmmiod, no virtio disks. Proves that the platform
# works (dom0, xenstored, the rebuilt hypervisor, a domU booting Debian's kernel) independently of
# the daemon under test.
cat > /tmp/guest.cfg <<CFG
name = "$GUEST"
kernel = "/e2e/vmlinuz"
ramdisk = "/tmp/domU.cpio"
extra = "console=hvc0 rdinit=/init e2e.mode=probe"
memory = $DOMU_MEM
vcpus = 1
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
CFG
cp /tmp/guest.cfg /out/guest.cfg
say "xl create -p (probe guest, no virtio devices)"
timeout 60 xl create -p /tmp/guest.cfg > /out/xl-create.log 2>&1 || fail "xl create -p"
result "xl_create=ok"
xl unpause "$GUEST" || fail "xl unpause"
wait_for 90 "domU probe" guest_says "E2E-R done" || fail "domU did not finish"
result "domU_probe=ok"
wait_for 20 "domU gone" sh -c "! xl domid $GUEST" || { xl destroy "$GUEST"; result "domU_poweroff=timeout"; }
