//! Raw architectural and KVM constants this crate relies on, each with where it comes from.
//!
//! The KVM UAPI numbers (capabilities, exit reasons, filter flags) are re-exported from
//! `kvm-bindings`, which generates them from `include/uapi/linux/kvm.h`; the architectural
//! bit positions are not in any UAPI header and are declared here.

/// `MSR_IA32_FEAT_CTL`, IA32_FEATURE_CONTROL (arch/x86/include/asm/msr-index.h; Intel SDM
/// vol. 4, table 2-2).
pub const MSR_IA32_FEAT_CTL: u32 = 0x3a;

/// `FEAT_CTL_LOCKED`: once set, the MSR is read-only for the guest until reset
/// (arch/x86/include/asm/msr-index.h).
pub const FEAT_CTL_LOCKED: u64 = 1 << 0;
/// `FEAT_CTL_VMX_ENABLED_INSIDE_SMX`: VMXON allowed inside SMX operation (msr-index.h).
pub const FEAT_CTL_VMX_ENABLED_INSIDE_SMX: u64 = 1 << 1;
/// `FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX`: VMXON allowed outside SMX operation (msr-index.h).
pub const FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX: u64 = 1 << 2;
/// `FEAT_CTL_SGX_LC_ENABLED`: SGX launch control, the LE hash MSRs are writable (msr-index.h).
pub const FEAT_CTL_SGX_LC_ENABLED: u64 = 1 << 17;
/// `FEAT_CTL_SGX_ENABLED`: SGX enabled (msr-index.h).
pub const FEAT_CTL_SGX_ENABLED: u64 = 1 << 18;
/// `FEAT_CTL_LMCE_ENABLED`: local machine-check exceptions enabled (msr-index.h).
pub const FEAT_CTL_LMCE_ENABLED: u64 = 1 << 20;

/// `KVM_SUPPORTED_FEATURE_CONTROL` (arch/x86/kvm/vmx/vmx.c): every bit KVM lets userspace set,
/// since Linux 6.0 ("KVM: VMX: Allow userspace to set all supported FEATURE_CONTROL bits").
pub const KVM_SUPPORTED_FEATURE_CONTROL: u64 = FEAT_CTL_LOCKED
    | FEAT_CTL_VMX_ENABLED_INSIDE_SMX
    | FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX
    | FEAT_CTL_SGX_LC_ENABLED
    | FEAT_CTL_SGX_ENABLED
    | FEAT_CTL_LMCE_ENABLED;

/// CPUID.1:ECX bit 5, `X86_FEATURE_VMX` (arch/x86/include/asm/cpufeatures.h).
pub const CPUID_1_ECX_VMX: u32 = 1 << 5;
/// CPUID.1:ECX bit 6, `X86_FEATURE_SMX` (cpufeatures.h).
pub const CPUID_1_ECX_SMX: u32 = 1 << 6;
/// CPUID.(EAX=7,ECX=0):EBX bit 2, `X86_FEATURE_SGX` (cpufeatures.h).
pub const CPUID_7_0_EBX_SGX: u32 = 1 << 2;
/// CPUID.(EAX=7,ECX=0):ECX bit 30, `X86_FEATURE_SGX_LC` (cpufeatures.h).
pub const CPUID_7_0_ECX_SGX_LC: u32 = 1 << 30;

/// `MCG_LMCE_P`, IA32_MCG_CAP bit 27: local machine check supported
/// (arch/x86/include/asm/mce.h). KVM takes MCG_CAP from `KVM_X86_SETUP_MCE`.
pub const MCG_LMCE_P: u64 = 1 << 27;

pub use kvm_bindings::{
    KVM_CAP_X86_MSR_FILTER, KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER,
};
