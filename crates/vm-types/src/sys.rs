//! Raw KVM constants and hand-declared ioctls this crate relies on, each with where it comes
//! from.
//!
//! The UAPI numbers are re-exported from `kvm-bindings` 0.14, which generates them from
//! `include/uapi/linux/kvm.h` and `arch/x86/include/uapi/asm/kvm.h`. What is not in any UAPI
//! header (a limit, MSR indices, VMSA feature bits) and the ioctls kvm-ioctls does not wrap are
//! declared here with the kernel source they mirror. No other module of this crate spells a raw
//! number.

use kvm_bindings::{kvm_device_attr, kvm_sregs2};

/// `KVM_CAP_VM_TYPES` (235, include/uapi/linux/kvm.h, Linux 6.8): a `/dev/kvm`
/// `KVM_CHECK_EXTENSION` that returns a bitmask; bit `n` set means `KVM_CREATE_VM` accepts type
/// `n` (Documentation/virt/kvm/api.rst, section on KVM_CAP_VM_TYPES).
pub use kvm_bindings::KVM_CAP_VM_TYPES;

/// x86 VM type values (arch/x86/include/uapi/asm/kvm.h): `KVM_X86_DEFAULT_VM` 0 and
/// `KVM_X86_SW_PROTECTED_VM` 1 (Linux 6.8), `KVM_X86_SEV_VM` 2 and `KVM_X86_SEV_ES_VM` 3
/// (Linux 6.10), `KVM_X86_SNP_VM` 4 (Linux 6.11), `KVM_X86_TDX_VM` 5 (Linux 6.16).
pub use kvm_bindings::{
    KVM_X86_DEFAULT_VM, KVM_X86_SEV_ES_VM, KVM_X86_SEV_VM, KVM_X86_SNP_VM, KVM_X86_SW_PROTECTED_VM,
    KVM_X86_TDX_VM,
};

/// `KVM_CAP_SYNC_REGS` (74) and `KVM_CAP_READONLY_MEM` (81), include/uapi/linux/kvm.h. Both are
/// answered per VM when asked on a VM fd, which is how a kernel reports that a VM type forbids
/// them (see [`crate::VmType::allows_sync_regs`], [`crate::VmType::allows_readonly_memslots`]).
pub use kvm_bindings::{KVM_CAP_READONLY_MEM, KVM_CAP_SYNC_REGS};

/// `KVM_CAP_SREGS2` (200, Linux 5.14): the vCPU accepts `KVM_GET_SREGS2`/`KVM_SET_SREGS2`.
pub use kvm_bindings::KVM_CAP_SREGS2;

/// `KVM_CAP_SYS_ATTRIBUTES` (209, Linux 5.17): `KVM_{HAS,GET}_DEVICE_ATTR` work on `/dev/kvm`.
pub use kvm_bindings::KVM_CAP_SYS_ATTRIBUTES;

/// `KVM_X86_GRP_SEV` (1) and its attribute `KVM_X86_SEV_VMSA_FEATURES` (0),
/// arch/x86/include/uapi/asm/kvm.h, Linux 6.10: `KVM_GET_DEVICE_ATTR` on `/dev/kvm` answers
/// with the VMSA SEV features KVM supports (`sev_dev_get_attr()` in arch/x86/kvm/svm/sev.c),
/// or `ENXIO` where the vendor module has no SEV attribute group.
pub use kvm_bindings::{KVM_X86_GRP_SEV, KVM_X86_SEV_VMSA_FEATURES};

/// `KVM_GUESTDBG_ENABLE` and `KVM_GUESTDBG_SINGLESTEP` (arch/x86/include/uapi/asm/kvm.h):
/// control bits of `KVM_SET_GUEST_DEBUG`.
pub use kvm_bindings::{KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP};

/// Number of VM types `KVM_CAP_VM_TYPES` can describe: the capability's value is a bitmask
/// that KVM builds in a `u32`, and `kvm_is_vm_type_supported()` in arch/x86/kvm/x86.c tests
/// `type < 32 && (kvm_caps.supported_vm_types & BIT(type))`. Any larger type value is refused by
/// `KVM_CREATE_VM` with `EINVAL` on every kernel.
pub const VM_TYPE_BITS: u32 = 32;

/// VMSA SEV feature bits (`SVM_SEV_FEAT_*`, arch/x86/include/asm/svm.h) that KVM can report in
/// `KVM_X86_SEV_VMSA_FEATURES`: DebugSwap (bit 5, reported since Linux 6.10 where the CPU has
/// DebugSwap and NoNestedDataBp) and Secure TSC (bit 9, SNP only, Linux 6.16).
pub const SVM_SEV_FEAT_DEBUG_SWAP: u64 = 1 << 5;
/// See [`SVM_SEV_FEAT_DEBUG_SWAP`].
pub const SVM_SEV_FEAT_SECURE_TSC: u64 = 1 << 9;

// MSR indices (arch/x86/include/asm/msr-index.h) that an SEV-ES/SNP vCPU passes through to
// hardware, so that KVM refuses host access to them once the VMSA is encrypted
// (`sev_es_prevent_msr_access()`, arch/x86/kvm/svm/svm.c).

/// `MSR_EFER`.
pub const MSR_EFER: u32 = 0xc000_0080;
/// `MSR_IA32_CR_PAT`.
pub const MSR_IA32_CR_PAT: u32 = 0x277;
/// `MSR_IA32_DEBUGCTLMSR`.
pub const MSR_IA32_DEBUGCTLMSR: u32 = 0x1d9;
/// `MSR_IA32_LASTBRANCHFROMIP`.
pub const MSR_IA32_LASTBRANCHFROMIP: u32 = 0x1db;
/// `MSR_IA32_LASTBRANCHTOIP`.
pub const MSR_IA32_LASTBRANCHTOIP: u32 = 0x1dc;
/// `MSR_IA32_LASTINTFROMIP`.
pub const MSR_IA32_LASTINTFROMIP: u32 = 0x1dd;
/// `MSR_IA32_LASTINTTOIP`.
pub const MSR_IA32_LASTINTTOIP: u32 = 0x1de;
/// `MSR_AMD64_SEV_ES_GHCB`.
pub const MSR_AMD64_SEV_ES_GHCB: u32 = 0xc001_0130;
/// `MSR_TSC_AUX`.
pub const MSR_TSC_AUX: u32 = 0xc000_0103;
/// `MSR_IA32_XSS`.
pub const MSR_IA32_XSS: u32 = 0xda0;

/// The KVM ioctl type (`KVMIO`), include/uapi/linux/kvm.h.
const KVMIO: u32 = kvm_bindings::KVMIO;

// `KVM_GET_DEVICE_ATTR` = _IOW(KVMIO, 0xe2, struct kvm_device_attr) (device control API; taken
// by /dev/kvm on x86 since Linux 5.17). `KVM_GET_SREGS2` = _IOR(KVMIO, 0xcc, struct kvm_sregs2)
// and `KVM_SET_SREGS2` = _IOW(KVMIO, 0xcd, struct kvm_sregs2) (Linux 5.14). kvm-ioctls 0.25
// wraps none of them for these fds.
mod ioctls {
    use super::{kvm_device_attr, kvm_sregs2, KVMIO};

    vmm_sys_util::ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS2, KVMIO, 0xcc, kvm_sregs2);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_SREGS2, KVMIO, 0xcd, kvm_sregs2);
}
pub(crate) use ioctls::{KVM_GET_DEVICE_ATTR, KVM_GET_SREGS2, KVM_SET_SREGS2};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_declared_ioctls_use_the_kernel_encoding() {
        // _IOC(dir, 0xae, nr, size) = dir << 30 | size << 16 | 0xae << 8 | nr, with dir 1 for
        // _IOW and 2 for _IOR; kvm_device_attr is 24 bytes, kvm_sregs2 is 320.
        assert_eq!(KVM_GET_DEVICE_ATTR(), 0x4018_aee2);
        assert_eq!(KVM_GET_SREGS2(), 0x8140_aecc);
        assert_eq!(KVM_SET_SREGS2(), 0x4140_aecd);
    }
}
