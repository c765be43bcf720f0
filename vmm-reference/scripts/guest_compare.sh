#!/bin/sh
# Compares the Linux guest's own work under vmm-reference and under QEMU microvm, one boot of
# the PVH vmlinux each, in one boot of the nested test host:
#  1. the guest's exits as the test host's KVM counts them (tracepoints kvm_exit by SVM exit
#     code, kvm_msr by MSR and direction, kvm_pio by port and direction);
#  2. the guest's slowest init calls (`initcall_debug`), read back with dmesg from a shell.
# Usage, from the workspace root: vmm-reference/scripts/guest_compare.sh
set -eu
cargo xtask build-vmm
vmlinux=$(cargo xtask nested-kernel --vmlinux)
initramfs=target/guest-initramfs.cpio
cargo xtask guest-initramfs --out "$initramfs"
script=target/guest_compare_l1.sh
cat >"$script" <<'EOF'
mount -t sysfs sysfs /sys 2>/dev/null
mount -t tracefs none /sys/kernel/tracing 2>/dev/null
T=/sys/kernel/tracing/events/kvm
C="console=ttyS0 reboot=k panic=-1 quiet"
ours() { /bin/vmm-reference boot --kernel /data/vmlinux --initramfs /data/initramfs.cpio --cmdline "$1"; }
qemu() {
  /bin/qemu-system-x86_64 -M microvm,rtc=on -enable-kvm -cpu host -m 256 -smp 1 -nodefaults \
    -no-user-config -display none -serial stdio -no-reboot -L /data/qemu \
    -kernel /data/vmlinux -initrd /data/initramfs.cpio -append "$1"
}
HISTS="kvm_exit:exit_reason kvm_msr:ecx,write kvm_pio:port,rw"
for vmm in ours qemu; do
  echo "=== $vmm: exits of one boot"
  for h in $HISTS; do
    echo "hist:keys=${h#*:}:sort=hitcount.descending" > "$T/${h%%:*}/trigger"
  done
  $vmm "$C vmmref.end=poweroff" </dev/null 2>&1 | grep -E "BOOT-OK|vmm-reference: " || true
  for h in $HISTS; do
    echo "--- ${h%%:*}"
    grep -E "hitcount|Hits" "$T/${h%%:*}/hist" | head -30
    echo "!hist:keys=${h#*:}:sort=hitcount.descending" > "$T/${h%%:*}/trigger"
  done
done
# Slow init calls: the guest's shell prints them (over 3 ms each), then powers off.
G='dmesg | awk "/initcall.*returned/ && \$(NF-1) > 3000 {print \$(NF-1), \$0}" | sort -rn | head -25'
for vmm in ours qemu; do
  echo "=== $vmm: slowest init calls (usecs)"
  ( sleep 60; echo "$G"; sleep 20; echo 'poweroff -f' ) |
    $vmm "$C vmmref.end=shell initcall_debug log_buf_len=4M" 2>&1 | grep "initcall" || true
done
EOF
cargo xtask nested --timeout 900 \
    --file target/release/vmm-reference:/bin/vmm-reference \
    --file /usr/bin/qemu-system-x86_64:/bin/qemu-system-x86_64 \
    --file /usr/share/qemu/qboot.rom:/data/qemu/bios-microvm.bin \
    --file /usr/share/qemu/linuxboot_dma.bin:/data/qemu/linuxboot_dma.bin \
    --file "$vmlinux:/data/vmlinux" --file "$initramfs:/data/initramfs.cpio" \
    --file "$script:/data/guest_compare.sh" -- /bin/sh /data/guest_compare.sh
