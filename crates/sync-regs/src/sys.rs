//! Raw kernel constants this crate relies on, each with the header it comes from.
//!
//! The values are re-stated from `kvm-bindings` (generated from the kernel UAPI headers) so
//! that the rest of the crate names them in one place and in the integer width it uses.

/// `KVM_CAP_SYNC_REGS` — include/uapi/linux/kvm.h (x86 support since Linux 4.16).
/// `KVM_CHECK_EXTENSION` returns the mask of `KVM_SYNC_X86_*` sets the kernel copies through
/// `kvm_run`; asked on a VM fd, it returns 0 for a VM with protected guest state in
/// kernels that have `kvm_sync_valid_fields()` (arch/x86/kvm/x86.c, 2025).
pub const KVM_CAP_SYNC_REGS: u32 = kvm_bindings::KVM_CAP_SYNC_REGS;

/// `KVM_SYNC_X86_REGS` — arch/x86/include/uapi/asm/kvm.h: general-purpose registers
/// (`struct kvm_regs`).
pub const KVM_SYNC_X86_REGS: u64 = kvm_bindings::KVM_SYNC_X86_REGS as u64;

/// `KVM_SYNC_X86_SREGS` — arch/x86/include/uapi/asm/kvm.h: special registers
/// (`struct kvm_sregs`).
pub const KVM_SYNC_X86_SREGS: u64 = kvm_bindings::KVM_SYNC_X86_SREGS as u64;

/// `KVM_SYNC_X86_EVENTS` — arch/x86/include/uapi/asm/kvm.h: pending and injected events
/// (`struct kvm_vcpu_events`).
pub const KVM_SYNC_X86_EVENTS: u64 = kvm_bindings::KVM_SYNC_X86_EVENTS as u64;

/// `KVM_SYNC_X86_VALID_FIELDS` — arch/x86/include/uapi/asm/kvm.h. `KVM_RUN` fails with
/// `EINVAL` when `kvm_valid_regs` or `kvm_dirty_regs` has a bit outside this mask
/// (arch/x86/kvm/x86.c, `kvm_arch_vcpu_ioctl_run` and, in older kernels, `sync_regs`).
pub const KVM_SYNC_X86_VALID_FIELDS: u64 = kvm_bindings::KVM_SYNC_X86_VALID_FIELDS as u64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sets_make_up_the_valid_fields() {
        assert_eq!(
            KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS,
            KVM_SYNC_X86_VALID_FIELDS
        );
        assert_eq!(KVM_CAP_SYNC_REGS, 74);
    }
}
