#!/bin/sh
# Measures the VMM's own memory (resident outside guest RAM, from `boot --profile`) of a plain
# `cargo build --release` (dynamically linked) and of the binary as it ships (`cargo xtask
# build-vmm`: glibc linked statically), alternating, in one boot of the nested test host.
# Usage, from the workspace root: vmm-reference/scripts/static_overhead.sh [RUNS]
set -eu
runs=${1:-3}
cargo build --release -p vmm-reference --bin vmm-reference
cp target/release/vmm-reference target/vmm-reference-dynamic
# The binary as it ships: the same release build with glibc linked statically.
cargo xtask build-vmm
vmlinux=$(cargo xtask nested-kernel --vmlinux)
initramfs=target/guest-initramfs.cpio
cargo xtask guest-initramfs --out "$initramfs"
script=target/static_overhead_l1.sh
cat >"$script" <<EOF
C="console=ttyS0 reboot=k panic=-1 quiet vmmref.end=poweroff"
for i in \$(seq $runs); do
  for b in dynamic static; do
    echo "=== \$b \$i"
    /bin/vmm-\$b boot --kernel /data/vmlinux --initramfs /data/initramfs.cpio --profile \\
        --cmdline "\$C" </dev/null 2>&1 | grep -E "first KVM_RUN|memory at exit|KiB  |vmm-reference: "
  done
done
EOF
cargo xtask nested --timeout 900 \
    --file target/vmm-reference-dynamic:/bin/vmm-dynamic \
    --file target/release/vmm-reference:/bin/vmm-static \
    --file "$vmlinux:/data/vmlinux" --file "$initramfs:/data/initramfs.cpio" \
    --file "$script:/data/overhead.sh" -- /bin/sh /data/overhead.sh
