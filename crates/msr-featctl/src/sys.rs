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

/// `KVM_MSR_EXIT_REASON_VALID_MASK` (include/uapi/linux/kvm.h, Linux 6.0): every reason bit
/// `KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)` accepts; any other bit is `EINVAL`.
pub const KVM_MSR_EXIT_REASON_VALID_MASK: u32 =
    KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_FILTER;

pub use kvm_bindings::{
    KVMIO, KVM_MSR_EXIT_REASON_INVAL, KVM_MSR_EXIT_REASON_UNKNOWN, KVM_MSR_FILTER_DEFAULT_DENY,
    KVM_MSR_FILTER_MAX_BITMAP_SIZE, KVM_MSR_FILTER_MAX_RANGES, KVM_MSR_FILTER_RANGE_VALID_MASK,
};

/// The x2APIC MSR range, `0x800..=0x8ff` (`APIC_BASE_MSR` and the x2APIC registers,
/// arch/x86/include/asm/apicdef.h). `kvm_msr_allowed` (arch/x86/kvm/x86.c, Linux 5.10+) never
/// filters it, whatever a filter says.
pub const X2APIC_MSRS: std::ops::RangeInclusive<u32> = 0x800..=0x8ff;

/// The VMX capability MSRs KVM emulates for nested VMX, `MSR_IA32_VMX_BASIC` (0x480) to
/// `MSR_IA32_VMX_VMFUNC` (0x491) (`KVM_FIRST_EMULATED_VMX_MSR..=KVM_LAST_EMULATED_VMX_MSR`,
/// arch/x86/kvm/x86.h).
pub const VMX_CAPABILITY_MSRS: std::ops::RangeInclusive<u32> = 0x480..=0x491;
/// `MSR_IA32_VMX_BASIC` (msr-index.h).
pub const MSR_IA32_VMX_BASIC: u32 = 0x480;
/// `MSR_IA32_VMX_PINBASED_CTLS` (msr-index.h); KVM derives it from the TRUE variant.
pub const MSR_IA32_VMX_PINBASED_CTLS: u32 = 0x481;
/// `MSR_IA32_VMX_PROCBASED_CTLS` (msr-index.h); KVM derives it from the TRUE variant.
pub const MSR_IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
/// `MSR_IA32_VMX_EXIT_CTLS` (msr-index.h); KVM derives it from the TRUE variant.
pub const MSR_IA32_VMX_EXIT_CTLS: u32 = 0x483;
/// `MSR_IA32_VMX_ENTRY_CTLS` (msr-index.h); KVM derives it from the TRUE variant.
pub const MSR_IA32_VMX_ENTRY_CTLS: u32 = 0x484;
/// `MSR_IA32_VMX_CR0_FIXED1` (msr-index.h); KVM computes it from guest CPUID.
pub const MSR_IA32_VMX_CR0_FIXED1: u32 = 0x487;
/// `MSR_IA32_VMX_CR4_FIXED1` (msr-index.h); KVM computes it from guest CPUID.
pub const MSR_IA32_VMX_CR4_FIXED1: u32 = 0x489;
/// `MSR_IA32_VMX_PROCBASED_CTLS2` (msr-index.h).
pub const MSR_IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
/// `MSR_IA32_VMX_EPT_VPID_CAP` (msr-index.h).
pub const MSR_IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
/// `MSR_IA32_VMX_TRUE_PINBASED_CTLS` (msr-index.h).
pub const MSR_IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
/// `MSR_IA32_VMX_TRUE_PROCBASED_CTLS` (msr-index.h).
pub const MSR_IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
/// `MSR_IA32_VMX_TRUE_EXIT_CTLS` (msr-index.h).
pub const MSR_IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
/// `MSR_IA32_VMX_TRUE_ENTRY_CTLS` (msr-index.h).
pub const MSR_IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
/// `MSR_IA32_VMX_VMFUNC` (msr-index.h).
pub const MSR_IA32_VMX_VMFUNC: u32 = 0x491;

/// Hand-declared ioctls (include/uapi/linux/kvm.h). kvm-ioctls wraps KVM_GET_MSRS/KVM_SET_MSRS
/// with heap-allocated arrays and sizes the feature list with a fixed maximum; the probe child
/// process must not allocate, and the feature list is sized with KVM's E2BIG answer.
pub(crate) mod ioctls {
    use kvm_bindings::KVMIO;

    vmm_sys_util::ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
    vmm_sys_util::ioctl_iowr_nr!(
        KVM_GET_MSR_FEATURE_INDEX_LIST,
        KVMIO,
        0x0a,
        kvm_bindings::kvm_msr_list
    );
    vmm_sys_util::ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_bindings::kvm_msrs);
    vmm_sys_util::ioctl_iow_nr!(KVM_X86_SETUP_MCE, KVMIO, 0x9c, u64);
    vmm_sys_util::ioctl_ior_nr!(KVM_X86_GET_MCE_CAP_SUPPORTED, KVMIO, 0x9d, u64);
}
