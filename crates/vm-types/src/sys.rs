//! Raw KVM constants this crate relies on, each with where it comes from.
//!
//! The UAPI numbers are re-exported from `kvm-bindings` 0.14, which generates them from
//! `include/uapi/linux/kvm.h` and `arch/x86/include/uapi/asm/kvm.h`. The one limit that is not
//! in any UAPI header is declared here with the kernel source it mirrors. No other module of this
//! crate spells a raw number.

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

/// Number of VM types `KVM_CAP_VM_TYPES` can describe: the capability's value is a bitmask
/// that KVM builds in a `u32`, and `kvm_is_vm_type_supported()` in arch/x86/kvm/x86.c tests
/// `type < 32 && (kvm_caps.supported_vm_types & BIT(type))`. Any larger type value is refused by
/// `KVM_CREATE_VM` with `EINVAL` on every kernel.
pub const VM_TYPE_BITS: u32 = 32;
