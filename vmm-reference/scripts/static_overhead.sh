#!/bin/sh
# Measures the VMM's own memory (resident outside guest RAM, from `boot --profile`) of the
# default build and of a statically linked one, alternating, in one boot of the nested test
# host. Usage, from the workspace root: vmm-reference/scripts/static_overhead.sh [RUNS]
set -eu
runs=${1:-3}
cargo build --release -p vmm-reference
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release -p vmm-reference --target x86_64-unknown-linux-gnu
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
        --cmdline "\$C" </dev/null 2>&1 | grep -E "first KVM_RUN|memory at exit|vmm-reference: "
  done
done
EOF
cargo xtask nested --timeout 900 \
    --file target/release/vmm-reference:/bin/vmm-dynamic \
    --file target/x86_64-unknown-linux-gnu/release/vmm-reference:/bin/vmm-static \
    --file "$vmlinux:/data/vmlinux" --file "$initramfs:/data/initramfs.cpio" \
    --file "$script:/data/overhead.sh" -- /bin/sh /data/overhead.sh
