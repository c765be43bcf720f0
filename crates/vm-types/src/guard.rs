//! A userspace model of the checks with which KVM refuses vCPU ioctls on VMs whose guest
//! state is protected (SEV-ES, SEV-SNP, TDX).
//!
//! KVM keeps a few per-vCPU flags and refuses an ioctl with `EINVAL` when the flag that covers
//! it is set. Each [`KernelRule`] is one such check, named after the kernel function that makes
//! it; [`VcpuProtection`] is the set of flags; [`GuestStateGuard`] computes the flags from the
//! VM type, the per-VM choices of [`ProtectionConfig`] and the [`LaunchPhase`], and refuses an
//! operation before the kernel is asked, with an error that names the operation, the VM type
//! and the kernel function.
//!
//! Where the flags come from (arch/x86/kvm):
//!
//! | flag | SEV-ES | SEV-SNP | TDX |
//! |---|---|---|---|
//! | `guest_state_protected` | `__sev_launch_update_vmsa()` (`KVM_SEV_LAUNCH_UPDATE_VMSA`) | `snp_launch_update_vmsa()` (`KVM_SEV_SNP_LAUNCH_FINISH`) | `tdx_vcpu_create()`, unless the TD has the DEBUG attribute |
//! | confidential FPU state (`fpstate_is_confidential()`) | `__sev_launch_update_vmsa()` | never | `tdx_vcpu_create()` |
//! | `guest_apic_protected` | never | never | `tdx_vcpu_create()` |
//! | `guest_tsc_protected` | never | `snp_launch_update_vmsa()` with Secure TSC | `tdx_vcpu_create()` |
//!
//! So the protection point of SEV-ES and SNP is the launch step — register setup before it
//! works, access after it is refused — while TDX protects what it protects from vCPU creation.

use std::fmt;

use thiserror::Error;

use crate::sys;
use crate::vm_type::LinuxVersion;
use crate::VmType;

/// One of KVM's checks that refuse vCPU ioctls on protected VMs with `EINVAL`.
///
/// ```
/// use vm_types::{KernelRule, VcpuOp};
///
/// assert_eq!(VcpuOp::SetGuestDebug.rule(), Some(KernelRule::GuestDebugProtected));
/// assert_eq!(VcpuOp::GetVcpuEvents.rule(), None);
/// assert!(KernelRule::MsrPassthrough.kernel_function().starts_with("sev_es_prevent_msr_access()"));
/// assert_eq!(KernelRule::ApicProtected.modelled_release().to_string(), "6.16");
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelRule {
    /// `has_protected_state && guest_state_protected` refuses `KVM_{GET,SET}_{REGS,SREGS,
    /// SREGS2,XCRS,DEBUGREGS}`.
    GuestStateProtected,
    /// Confidential FPU state refuses `KVM_{GET,SET}_FPU`, `KVM_{GET,SET}_XSAVE` and
    /// `KVM_GET_XSAVE2` on VMs with `has_protected_state` (other VMs get a silent no-op).
    FpuConfidential,
    /// `guest_state_protected` alone refuses `KVM_SET_GUEST_DEBUG`.
    GuestDebugProtected,
    /// `guest_apic_protected` refuses `KVM_{GET,SET}_LAPIC`.
    ApicProtected,
    /// `guest_tsc_protected` refuses the vCPU `KVM_SET_TSC_KHZ`.
    TscProtected,
    /// Host `KVM_{GET,SET}_MSRS` of an MSR the SEV-ES/SNP vCPU passes through to hardware,
    /// once `guest_state_protected`.
    MsrPassthrough,
    /// Sync regs (non-zero `kvm_valid_regs`/`kvm_dirty_regs`) on a VM with protected state.
    SyncRegs,
}

impl KernelRule {
    /// Every rule.
    pub const ALL: [KernelRule; 7] = [
        KernelRule::GuestStateProtected,
        KernelRule::FpuConfidential,
        KernelRule::GuestDebugProtected,
        KernelRule::ApicProtected,
        KernelRule::TscProtected,
        KernelRule::MsrPassthrough,
        KernelRule::SyncRegs,
    ];

    /// The kernel function that makes the check.
    pub const fn kernel_function(self) -> &'static str {
        match self {
            KernelRule::GuestStateProtected => {
                "kvm_arch_vcpu_ioctl_get_regs() and its siblings (arch/x86/kvm/x86.c)"
            }
            KernelRule::FpuConfidential => {
                "kvm_arch_vcpu_ioctl_get_fpu(), kvm_vcpu_ioctl_x86_get_xsave2(), \
                 kvm_vcpu_ioctl_x86_set_xsave() (arch/x86/kvm/x86.c)"
            }
            KernelRule::GuestDebugProtected => {
                "kvm_arch_vcpu_ioctl_set_guest_debug() (arch/x86/kvm/x86.c)"
            }
            KernelRule::ApicProtected => {
                "kvm_vcpu_ioctl_get_lapic()/kvm_vcpu_ioctl_set_lapic() (arch/x86/kvm/x86.c)"
            }
            KernelRule::TscProtected => {
                "kvm_arch_vcpu_ioctl(), case KVM_SET_TSC_KHZ (arch/x86/kvm/x86.c)"
            }
            KernelRule::MsrPassthrough => "sev_es_prevent_msr_access() (arch/x86/kvm/svm/svm.c)",
            KernelRule::SyncRegs => "kvm_sync_valid_fields() (arch/x86/kvm/x86.c)",
        }
    }

    /// The Linux release whose code this crate's model of the rule reproduces.
    pub const fn modelled_release(self) -> LinuxVersion {
        match self {
            KernelRule::GuestStateProtected
            | KernelRule::FpuConfidential
            | KernelRule::GuestDebugProtected
            | KernelRule::MsrPassthrough => LinuxVersion::new(6, 12),
            KernelRule::SyncRegs => LinuxVersion::new(6, 15),
            KernelRule::ApicProtected => LinuxVersion::new(6, 16),
            KernelRule::TscProtected => LinuxVersion::new(6, 17),
        }
    }
}

impl fmt::Display for KernelRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, Linux {}",
            self.kernel_function(),
            self.modelled_release()
        )
    }
}

/// A vCPU operation (x86), named after its ioctl.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VcpuOp {
    /// `KVM_GET_REGS`.
    GetRegs,
    /// `KVM_SET_REGS`.
    SetRegs,
    /// `KVM_GET_SREGS`.
    GetSregs,
    /// `KVM_SET_SREGS`.
    SetSregs,
    /// `KVM_GET_SREGS2`.
    GetSregs2,
    /// `KVM_SET_SREGS2`.
    SetSregs2,
    /// `KVM_GET_FPU`.
    GetFpu,
    /// `KVM_SET_FPU`.
    SetFpu,
    /// `KVM_GET_XSAVE`.
    GetXsave,
    /// `KVM_GET_XSAVE2`.
    GetXsave2,
    /// `KVM_SET_XSAVE` (also with a `KVM_CAP_XSAVE2`-sized buffer).
    SetXsave,
    /// `KVM_GET_XCRS`.
    GetXcrs,
    /// `KVM_SET_XCRS`.
    SetXcrs,
    /// `KVM_GET_DEBUGREGS`.
    GetDebugRegs,
    /// `KVM_SET_DEBUGREGS`.
    SetDebugRegs,
    /// Sync regs: non-zero `kvm_run.kvm_valid_regs`/`kvm_dirty_regs` on `KVM_RUN`.
    SyncRegs,
    /// `KVM_GET_VCPU_EVENTS`.
    GetVcpuEvents,
    /// `KVM_SET_VCPU_EVENTS`.
    SetVcpuEvents,
    /// `KVM_GET_MSRS`.
    GetMsrs,
    /// `KVM_SET_MSRS`.
    SetMsrs,
    /// `KVM_GET_LAPIC`.
    GetLapic,
    /// `KVM_SET_LAPIC`.
    SetLapic,
    /// `KVM_GET_MP_STATE`.
    GetMpState,
    /// `KVM_SET_MP_STATE`.
    SetMpState,
    /// `KVM_GET_CPUID2`.
    GetCpuid,
    /// `KVM_SET_CPUID2`.
    SetCpuid,
    /// `KVM_RUN` (without sync regs).
    Run,
    /// `KVM_INTERRUPT`.
    Interrupt,
    /// `KVM_NMI`.
    Nmi,
    /// `KVM_SMI`.
    Smi,
    /// `KVM_KVMCLOCK_CTRL`.
    KvmclockCtrl,
    /// `KVM_TRANSLATE`.
    TranslateGva,
    /// `KVM_SET_GUEST_DEBUG`.
    SetGuestDebug,
    /// `KVM_GET_NESTED_STATE`.
    GetNestedState,
    /// `KVM_SET_NESTED_STATE`.
    SetNestedState,
    /// `KVM_GET_TSC_KHZ`.
    GetTscKhz,
    /// `KVM_SET_TSC_KHZ`.
    SetTscKhz,
}

impl VcpuOp {
    /// Every operation, in declaration order.
    pub const ALL: [VcpuOp; 37] = [
        VcpuOp::GetRegs,
        VcpuOp::SetRegs,
        VcpuOp::GetSregs,
        VcpuOp::SetSregs,
        VcpuOp::GetSregs2,
        VcpuOp::SetSregs2,
        VcpuOp::GetFpu,
        VcpuOp::SetFpu,
        VcpuOp::GetXsave,
        VcpuOp::GetXsave2,
        VcpuOp::SetXsave,
        VcpuOp::GetXcrs,
        VcpuOp::SetXcrs,
        VcpuOp::GetDebugRegs,
        VcpuOp::SetDebugRegs,
        VcpuOp::SyncRegs,
        VcpuOp::GetVcpuEvents,
        VcpuOp::SetVcpuEvents,
        VcpuOp::GetMsrs,
        VcpuOp::SetMsrs,
        VcpuOp::GetLapic,
        VcpuOp::SetLapic,
        VcpuOp::GetMpState,
        VcpuOp::SetMpState,
        VcpuOp::GetCpuid,
        VcpuOp::SetCpuid,
        VcpuOp::Run,
        VcpuOp::Interrupt,
        VcpuOp::Nmi,
        VcpuOp::Smi,
        VcpuOp::KvmclockCtrl,
        VcpuOp::TranslateGva,
        VcpuOp::SetGuestDebug,
        VcpuOp::GetNestedState,
        VcpuOp::SetNestedState,
        VcpuOp::GetTscKhz,
        VcpuOp::SetTscKhz,
    ];

    /// The ioctl's name, e.g. `KVM_GET_SREGS`.
    pub const fn ioctl_name(self) -> &'static str {
        match self {
            VcpuOp::GetRegs => "KVM_GET_REGS",
            VcpuOp::SetRegs => "KVM_SET_REGS",
            VcpuOp::GetSregs => "KVM_GET_SREGS",
            VcpuOp::SetSregs => "KVM_SET_SREGS",
            VcpuOp::GetSregs2 => "KVM_GET_SREGS2",
            VcpuOp::SetSregs2 => "KVM_SET_SREGS2",
            VcpuOp::GetFpu => "KVM_GET_FPU",
            VcpuOp::SetFpu => "KVM_SET_FPU",
            VcpuOp::GetXsave => "KVM_GET_XSAVE",
            VcpuOp::GetXsave2 => "KVM_GET_XSAVE2",
            VcpuOp::SetXsave => "KVM_SET_XSAVE",
            VcpuOp::GetXcrs => "KVM_GET_XCRS",
            VcpuOp::SetXcrs => "KVM_SET_XCRS",
            VcpuOp::GetDebugRegs => "KVM_GET_DEBUGREGS",
            VcpuOp::SetDebugRegs => "KVM_SET_DEBUGREGS",
            VcpuOp::SyncRegs => "KVM_RUN with sync regs",
            VcpuOp::GetVcpuEvents => "KVM_GET_VCPU_EVENTS",
            VcpuOp::SetVcpuEvents => "KVM_SET_VCPU_EVENTS",
            VcpuOp::GetMsrs => "KVM_GET_MSRS",
            VcpuOp::SetMsrs => "KVM_SET_MSRS",
            VcpuOp::GetLapic => "KVM_GET_LAPIC",
            VcpuOp::SetLapic => "KVM_SET_LAPIC",
            VcpuOp::GetMpState => "KVM_GET_MP_STATE",
            VcpuOp::SetMpState => "KVM_SET_MP_STATE",
            VcpuOp::GetCpuid => "KVM_GET_CPUID2",
            VcpuOp::SetCpuid => "KVM_SET_CPUID2",
            VcpuOp::Run => "KVM_RUN",
            VcpuOp::Interrupt => "KVM_INTERRUPT",
            VcpuOp::Nmi => "KVM_NMI",
            VcpuOp::Smi => "KVM_SMI",
            VcpuOp::KvmclockCtrl => "KVM_KVMCLOCK_CTRL",
            VcpuOp::TranslateGva => "KVM_TRANSLATE",
            VcpuOp::SetGuestDebug => "KVM_SET_GUEST_DEBUG",
            VcpuOp::GetNestedState => "KVM_GET_NESTED_STATE",
            VcpuOp::SetNestedState => "KVM_SET_NESTED_STATE",
            VcpuOp::GetTscKhz => "KVM_GET_TSC_KHZ",
            VcpuOp::SetTscKhz => "KVM_SET_TSC_KHZ",
        }
    }

    /// The kernel check that can refuse the operation on a protected VM, if any.
    ///
    /// For [`KernelRule::MsrPassthrough`] the answer depends on the MSR index:
    /// [`GuestStateGuard::check_msr`] decides per index. Operations without a rule may still
    /// fail on protected VMs for reasons this crate does not model (for example TDX accepts
    /// host MSR access only to the MSRs KVM emulates for a TD).
    pub const fn rule(self) -> Option<KernelRule> {
        match self {
            VcpuOp::GetRegs
            | VcpuOp::SetRegs
            | VcpuOp::GetSregs
            | VcpuOp::SetSregs
            | VcpuOp::GetSregs2
            | VcpuOp::SetSregs2
            | VcpuOp::GetXcrs
            | VcpuOp::SetXcrs
            | VcpuOp::GetDebugRegs
            | VcpuOp::SetDebugRegs => Some(KernelRule::GuestStateProtected),
            VcpuOp::GetFpu
            | VcpuOp::SetFpu
            | VcpuOp::GetXsave
            | VcpuOp::GetXsave2
            | VcpuOp::SetXsave => Some(KernelRule::FpuConfidential),
            VcpuOp::SetGuestDebug => Some(KernelRule::GuestDebugProtected),
            VcpuOp::GetLapic | VcpuOp::SetLapic => Some(KernelRule::ApicProtected),
            VcpuOp::SetTscKhz => Some(KernelRule::TscProtected),
            VcpuOp::GetMsrs | VcpuOp::SetMsrs => Some(KernelRule::MsrPassthrough),
            VcpuOp::SyncRegs => Some(KernelRule::SyncRegs),
            VcpuOp::GetVcpuEvents
            | VcpuOp::SetVcpuEvents
            | VcpuOp::GetMpState
            | VcpuOp::SetMpState
            | VcpuOp::GetCpuid
            | VcpuOp::SetCpuid
            | VcpuOp::Run
            | VcpuOp::Interrupt
            | VcpuOp::Nmi
            | VcpuOp::Smi
            | VcpuOp::KvmclockCtrl
            | VcpuOp::TranslateGva
            | VcpuOp::GetNestedState
            | VcpuOp::SetNestedState
            | VcpuOp::GetTscKhz => None,
        }
    }

    /// Whether a modelled kernel check can refuse the operation on a protected VM.
    pub const fn accesses_guest_state(self) -> bool {
        self.rule().is_some()
    }
}

impl fmt::Display for VcpuOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.ioctl_name())
    }
}

/// When a protected VM's vCPU state stops being accessible to KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtectionPoint {
    /// From vCPU creation: TDX (`tdx_vcpu_create()` in arch/x86/kvm/vmx/tdx.c sets
    /// `guest_state_protected` unless the TD has the DEBUG attribute, Linux 6.16).
    VcpuCreation,
    /// From `KVM_SEV_LAUNCH_UPDATE_VMSA`, whose `__sev_launch_update_vmsa()` encrypts each
    /// vCPU's VMSA and sets `guest_state_protected`: SEV-ES.
    LaunchUpdateVmsa,
    /// From `KVM_SEV_SNP_LAUNCH_FINISH`, whose `snp_launch_update_vmsa()` encrypts each vCPU's
    /// VMSA and sets `guest_state_protected`: SEV-SNP.
    SnpLaunchFinish,
}

impl ProtectionPoint {
    /// The point for `ty`, or `None` if its state is never protected.
    pub const fn of(ty: VmType) -> Option<ProtectionPoint> {
        match ty {
            VmType::SevEs => Some(ProtectionPoint::LaunchUpdateVmsa),
            VmType::Snp => Some(ProtectionPoint::SnpLaunchFinish),
            VmType::Tdx => Some(ProtectionPoint::VcpuCreation),
            VmType::Default | VmType::SwProtected | VmType::Sev => None,
        }
    }
}

/// Whether the VM has passed its launch step, as far as the guard knows.
///
/// The launch step is the command that makes the guest state protected:
/// `KVM_SEV_LAUNCH_UPDATE_VMSA` (SEV-ES) or `KVM_SEV_SNP_LAUNCH_FINISH` (SNP). TDX protects
/// from vCPU creation, so its phase changes nothing; `KVM_TDX_FINALIZE_VM` is its launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LaunchPhase {
    /// Before the launch step: SEV-ES/SNP register setup reaches KVM.
    BeforeLaunch,
    /// After it: protected-state types refuse register access.
    Launched,
}

/// Per-VM choices, made before the first vCPU exists, that change what KVM protects, and the
/// guest CPUID facts that decide which MSRs an SEV-ES/SNP vCPU passes through.
///
/// ```
/// use vm_types::{GuestStateGuard, ProtectionConfig, VcpuOp, VmType};
///
/// let secure_tsc = ProtectionConfig { snp_secure_tsc: true, ..ProtectionConfig::DEFAULT };
/// let guard = GuestStateGuard::launched(VmType::Snp);
/// assert!(guard.check(VcpuOp::SetTscKhz).is_ok());
/// assert!(guard.with_config(secure_tsc).check(VcpuOp::SetTscKhz).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProtectionConfig {
    /// TDX: the TD has the DEBUG attribute (`TDX_TD_ATTR_DEBUG` in `KVM_TDX_INIT_VM`'s
    /// attributes), so `tdx_vcpu_create()` leaves `guest_state_protected` clear. FPU state,
    /// LAPIC and TSC stay protected even then.
    pub tdx_debug: bool,
    /// SNP: Secure TSC (`SVM_SEV_FEAT_SECURE_TSC` in `KVM_SEV_INIT2`'s `vmsa_features`), so
    /// `snp_launch_update_vmsa()` sets `guest_tsc_protected`.
    pub snp_secure_tsc: bool,
    /// SEV-ES/SNP: the guest's CPUID has RDTSCP or RDPID, so `sev_es_vcpu_after_set_cpuid()`
    /// passes `MSR_TSC_AUX` through to hardware.
    pub guest_tsc_aux: bool,
    /// SEV-ES/SNP: the guest's CPUID has XSAVES, so `MSR_IA32_XSS` is passed through.
    pub guest_xsaves: bool,
}

impl ProtectionConfig {
    /// No TDX debug TD, no Secure TSC, and a guest CPUID with RDTSCP/RDPID and XSAVES (the
    /// larger set of passed-through MSRs, so the guard refuses at least what KVM refuses).
    pub const DEFAULT: ProtectionConfig = ProtectionConfig {
        tdx_debug: false,
        snp_secure_tsc: false,
        guest_tsc_aux: true,
        guest_xsaves: true,
    };
}

impl Default for ProtectionConfig {
    fn default() -> Self {
        ProtectionConfig::DEFAULT
    }
}

/// KVM's per-vCPU protection flags, as the guard derives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VcpuProtection {
    /// `vcpu->arch.guest_state_protected`.
    pub guest_state_protected: bool,
    /// `fpstate_is_confidential(&vcpu->arch.guest_fpu)`.
    pub fpu_confidential: bool,
    /// `vcpu->arch.apic->guest_apic_protected`.
    pub apic_protected: bool,
    /// `vcpu->arch.guest_tsc_protected`.
    pub tsc_protected: bool,
}

/// An operation refused because the VM's guest state is protected. KVM would fail each with
/// `EINVAL`; the guard refuses it before the kernel is asked.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum GuestStateError {
    /// Register access after the vCPU's state was protected.
    #[error(
        "{op} refused on a {vm_type} VM: the vCPU's register state is protected ({})",
        KernelRule::GuestStateProtected
    )]
    StateProtected {
        /// The refused operation.
        op: VcpuOp,
        /// The VM's type.
        vm_type: VmType,
    },
    /// FPU/XSAVE access while the vCPU's FPU state is confidential.
    #[error(
        "{op} refused on a {vm_type} VM: the vCPU's FPU state is confidential ({})",
        KernelRule::FpuConfidential
    )]
    FpuStateConfidential {
        /// The refused operation.
        op: VcpuOp,
        /// The VM's type.
        vm_type: VmType,
    },
    /// `KVM_SET_GUEST_DEBUG` after the vCPU's state was protected.
    #[error(
        "{op} refused on a {vm_type} VM: guest debugging needs unprotected vCPU state ({})",
        KernelRule::GuestDebugProtected
    )]
    GuestDebugProtected {
        /// The refused operation.
        op: VcpuOp,
        /// The VM's type.
        vm_type: VmType,
    },
    /// LAPIC access on a vCPU whose APIC is protected.
    #[error(
        "{op} refused on a {vm_type} VM: the vCPU's local APIC is protected ({})",
        KernelRule::ApicProtected
    )]
    ApicProtected {
        /// The refused operation.
        op: VcpuOp,
        /// The VM's type.
        vm_type: VmType,
    },
    /// A TSC frequency change on a vCPU whose TSC is protected.
    #[error(
        "{op} refused on a {vm_type} VM: the vCPU's TSC is protected ({})",
        KernelRule::TscProtected
    )]
    TscProtected {
        /// The refused operation.
        op: VcpuOp,
        /// The VM's type.
        vm_type: VmType,
    },
    /// Host access to an MSR the vCPU passes through to hardware. KVM's MSR handler fails it
    /// with `EINVAL`, and `KVM_GET_MSRS`/`KVM_SET_MSRS` stop at that entry and return how many
    /// entries before it they processed.
    #[error("{op} of MSR {index:#x} refused on a {vm_type} VM: the MSR is passed through to the encrypted VMSA ({})", KernelRule::MsrPassthrough)]
    MsrProtected {
        /// The refused operation.
        op: VcpuOp,
        /// The VM's type.
        vm_type: VmType,
        /// The MSR.
        index: u32,
    },
    /// Sync regs on a VM type with protected state; `KVM_RUN` would fail.
    #[error(
        "{op} refused on a {vm_type} VM: sync regs are not allowed with protected guest state ({})",
        KernelRule::SyncRegs
    )]
    SyncRegsNotAllowed {
        /// The refused operation ([`VcpuOp::SyncRegs`]).
        op: VcpuOp,
        /// The VM's type.
        vm_type: VmType,
    },
}

impl GuestStateError {
    const fn new(rule: KernelRule, op: VcpuOp, vm_type: VmType, index: u32) -> Self {
        match rule {
            KernelRule::GuestStateProtected => GuestStateError::StateProtected { op, vm_type },
            KernelRule::FpuConfidential => GuestStateError::FpuStateConfidential { op, vm_type },
            KernelRule::GuestDebugProtected => GuestStateError::GuestDebugProtected { op, vm_type },
            KernelRule::ApicProtected => GuestStateError::ApicProtected { op, vm_type },
            KernelRule::TscProtected => GuestStateError::TscProtected { op, vm_type },
            KernelRule::MsrPassthrough => GuestStateError::MsrProtected { op, vm_type, index },
            KernelRule::SyncRegs => GuestStateError::SyncRegsNotAllowed { op, vm_type },
        }
    }

    /// The refused operation.
    pub const fn op(&self) -> VcpuOp {
        match self {
            GuestStateError::StateProtected { op, .. }
            | GuestStateError::FpuStateConfidential { op, .. }
            | GuestStateError::GuestDebugProtected { op, .. }
            | GuestStateError::ApicProtected { op, .. }
            | GuestStateError::TscProtected { op, .. }
            | GuestStateError::MsrProtected { op, .. }
            | GuestStateError::SyncRegsNotAllowed { op, .. } => *op,
        }
    }

    /// The VM type that refused it.
    pub const fn vm_type(&self) -> VmType {
        match self {
            GuestStateError::StateProtected { vm_type, .. }
            | GuestStateError::FpuStateConfidential { vm_type, .. }
            | GuestStateError::GuestDebugProtected { vm_type, .. }
            | GuestStateError::ApicProtected { vm_type, .. }
            | GuestStateError::TscProtected { vm_type, .. }
            | GuestStateError::MsrProtected { vm_type, .. }
            | GuestStateError::SyncRegsNotAllowed { vm_type, .. } => *vm_type,
        }
    }

    /// The kernel check the refusal models.
    pub const fn rule(&self) -> KernelRule {
        match self {
            GuestStateError::StateProtected { .. } => KernelRule::GuestStateProtected,
            GuestStateError::FpuStateConfidential { .. } => KernelRule::FpuConfidential,
            GuestStateError::GuestDebugProtected { .. } => KernelRule::GuestDebugProtected,
            GuestStateError::ApicProtected { .. } => KernelRule::ApicProtected,
            GuestStateError::TscProtected { .. } => KernelRule::TscProtected,
            GuestStateError::MsrProtected { .. } => KernelRule::MsrPassthrough,
            GuestStateError::SyncRegsNotAllowed { .. } => KernelRule::SyncRegs,
        }
    }

    /// The errno of the kernel's check (`EINVAL` for every rule), for callers that must
    /// report in the kernel's terms.
    pub const fn kernel_errno(&self) -> i32 {
        libc::EINVAL
    }
}

/// The MSRs an SEV-ES/SNP vCPU passes through to hardware (not write-intercepted), which
/// `sev_es_prevent_msr_access()` then protects: `MSR_EFER` and `MSR_IA32_CR_PAT`
/// (`sev_es_init_vmcb()`), `MSR_AMD64_SEV_ES_GHCB` (never intercepted for SEV-ES), the
/// DEBUGCTL and LBR MSRs (`svm_enable_lbrv()`, always on for SEV-ES), plus `MSR_TSC_AUX` and
/// `MSR_IA32_XSS` where the guest CPUID allows them (`sev_es_vcpu_after_set_cpuid()`), as in
/// Linux 6.12.
pub const fn sev_es_passthrough_msr(index: u32, config: ProtectionConfig) -> bool {
    match index {
        sys::MSR_EFER
        | sys::MSR_IA32_CR_PAT
        | sys::MSR_AMD64_SEV_ES_GHCB
        | sys::MSR_IA32_DEBUGCTLMSR
        | sys::MSR_IA32_LASTBRANCHFROMIP
        | sys::MSR_IA32_LASTBRANCHTOIP
        | sys::MSR_IA32_LASTINTFROMIP
        | sys::MSR_IA32_LASTINTTOIP => true,
        sys::MSR_TSC_AUX => config.guest_tsc_aux,
        sys::MSR_IA32_XSS => config.guest_xsaves,
        _ => false,
    }
}

/// Applies KVM's protected-state checks for the vCPUs of one VM before the kernel is asked.
///
/// A guard is a value: VM type, [`ProtectionConfig`] and [`LaunchPhase`]. The VM handle
/// [`crate::TypedVm`] keeps the phase for all its vCPUs and hands each guarded vCPU a guard for
/// the current phase on every call.
///
/// ```
/// use vm_types::{GuestStateError, GuestStateGuard, VcpuOp, VmType};
///
/// let mut guard = GuestStateGuard::before_launch(VmType::SevEs);
/// assert!(guard.check_msr(VcpuOp::SetMsrs, 0xc000_0080).is_ok()); // EFER, before launch
/// guard.mark_launched();
/// assert!(matches!(
///     guard.check_msr(VcpuOp::SetMsrs, 0xc000_0080),
///     Err(GuestStateError::MsrProtected { index: 0xc000_0080, .. })
/// ));
/// assert!(guard.check_msr(VcpuOp::SetMsrs, 0x10).is_ok()); // IA32_TSC stays intercepted
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestStateGuard {
    vm_type: VmType,
    phase: LaunchPhase,
    config: ProtectionConfig,
}

impl GuestStateGuard {
    /// A guard for a vCPU of a VM past its launch step (the same as
    /// [`GuestStateGuard::launched`]): SEV-ES, SNP and TDX refuse register access.
    pub const fn new(vm_type: VmType) -> Self {
        GuestStateGuard::launched(vm_type)
    }

    /// A guard for a vCPU of a VM past its launch step.
    pub const fn launched(vm_type: VmType) -> Self {
        GuestStateGuard::at(vm_type, LaunchPhase::Launched, ProtectionConfig::DEFAULT)
    }

    /// A guard for a vCPU of a VM before its launch step: SEV-ES and SNP register setup
    /// reaches KVM; TDX is protected from vCPU creation all the same.
    pub const fn before_launch(vm_type: VmType) -> Self {
        GuestStateGuard::at(
            vm_type,
            LaunchPhase::BeforeLaunch,
            ProtectionConfig::DEFAULT,
        )
    }

    /// A guard for the given type, phase and configuration.
    pub const fn at(vm_type: VmType, phase: LaunchPhase, config: ProtectionConfig) -> Self {
        GuestStateGuard {
            vm_type,
            phase,
            config,
        }
    }

    /// The same guard with another configuration.
    pub const fn with_config(self, config: ProtectionConfig) -> Self {
        GuestStateGuard { config, ..self }
    }

    /// Records that the VM has passed its launch step.
    pub fn mark_launched(&mut self) {
        self.phase = LaunchPhase::Launched;
    }

    /// The VM type the guard is for.
    pub const fn vm_type(&self) -> VmType {
        self.vm_type
    }

    /// The launch phase the guard assumes.
    pub const fn phase(&self) -> LaunchPhase {
        self.phase
    }

    /// The per-VM configuration the guard assumes.
    pub const fn config(&self) -> ProtectionConfig {
        self.config
    }

    /// KVM's per-vCPU protection flags for this type, configuration and phase (see the table
    /// in the [module documentation](self)).
    pub const fn protection(&self) -> VcpuProtection {
        let launched = matches!(self.phase, LaunchPhase::Launched);
        match self.vm_type {
            VmType::SevEs => VcpuProtection {
                guest_state_protected: launched,
                fpu_confidential: launched,
                apic_protected: false,
                tsc_protected: false,
            },
            VmType::Snp => VcpuProtection {
                guest_state_protected: launched,
                fpu_confidential: false,
                apic_protected: false,
                tsc_protected: launched && self.config.snp_secure_tsc,
            },
            VmType::Tdx => VcpuProtection {
                guest_state_protected: !self.config.tdx_debug,
                fpu_confidential: true,
                apic_protected: true,
                tsc_protected: true,
            },
            VmType::Default | VmType::SwProtected | VmType::Sev => VcpuProtection {
                guest_state_protected: false,
                fpu_confidential: false,
                apic_protected: false,
                tsc_protected: false,
            },
        }
    }

    /// Whether KVM refuses register access now (`has_protected_state &&
    /// guest_state_protected`).
    pub const fn is_state_protected(&self) -> bool {
        self.vm_type.has_protected_state() && self.protection().guest_state_protected
    }

    const fn refuses(&self, rule: KernelRule) -> bool {
        let p = self.protection();
        let has_protected_state = self.vm_type.has_protected_state();
        match rule {
            KernelRule::GuestStateProtected => has_protected_state && p.guest_state_protected,
            KernelRule::FpuConfidential => has_protected_state && p.fpu_confidential,
            KernelRule::GuestDebugProtected => p.guest_state_protected,
            KernelRule::ApicProtected => p.apic_protected,
            KernelRule::TscProtected => p.tsc_protected,
            // Decided per MSR index by check_msr.
            KernelRule::MsrPassthrough => false,
            KernelRule::SyncRegs => !self.vm_type.allows_sync_regs(),
        }
    }

    /// `Ok` if KVM would accept `op` on this vCPU as far as the modelled checks go, otherwise
    /// the refusal. MSR accesses are checked per index by [`GuestStateGuard::check_msr`].
    ///
    /// # Errors
    ///
    /// The [`GuestStateError`] variant of the [`KernelRule`] that refuses `op`.
    pub const fn check(&self, op: VcpuOp) -> Result<(), GuestStateError> {
        match op.rule() {
            Some(rule) if self.refuses(rule) => {
                Err(GuestStateError::new(rule, op, self.vm_type, 0))
            }
            _ => Ok(()),
        }
    }

    /// The check of `sev_es_prevent_msr_access()` for host access to MSR `index`: refused on
    /// an SEV-ES/SNP vCPU whose state is protected if the vCPU passes the MSR through
    /// ([`sev_es_passthrough_msr`]).
    ///
    /// # Errors
    ///
    /// [`GuestStateError::MsrProtected`] naming the MSR.
    pub const fn check_msr(&self, op: VcpuOp, index: u32) -> Result<(), GuestStateError> {
        let sev_es_guest = matches!(self.vm_type, VmType::SevEs | VmType::Snp);
        if sev_es_guest
            && self.protection().guest_state_protected
            && sev_es_passthrough_msr(index, self.config)
        {
            Err(GuestStateError::new(
                KernelRule::MsrPassthrough,
                op,
                self.vm_type,
                index,
            ))
        } else {
            Ok(())
        }
    }

    /// [`GuestStateGuard::check_msr`] for each index, stopping at the first refusal.
    ///
    /// # Errors
    ///
    /// [`GuestStateError::MsrProtected`] for the first refused MSR.
    pub fn check_msrs(
        &self,
        op: VcpuOp,
        indices: impl IntoIterator<Item = u32>,
    ) -> Result<(), GuestStateError> {
        indices
            .into_iter()
            .try_for_each(|index| self.check_msr(op, index))
    }

    /// The check KVM makes on `KVM_RUN` for the sync-regs fields of `kvm_run`: zero masks are
    /// always fine, non-zero ones need a type that allows sync regs.
    ///
    /// # Errors
    ///
    /// [`GuestStateError::SyncRegsNotAllowed`] for non-zero masks on a protected-state type.
    pub const fn check_sync_regs(
        &self,
        valid_regs: u64,
        dirty_regs: u64,
    ) -> Result<(), GuestStateError> {
        if valid_regs == 0 && dirty_regs == 0 {
            Ok(())
        } else {
            self.check(VcpuOp::SyncRegs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A small fake of the kernel side: the per-vCPU flags KVM keeps, the commands that set
    /// them, and the checks at the top of each ioctl, written the way arch/x86/kvm writes
    /// them. The guard must agree with it everywhere.
    #[derive(Debug, Clone, Copy)]
    struct FakeKvm {
        vm_type: VmType,
        has_protected_state: bool,
        sev_es_guest: bool,
        guest_state_protected: bool,
        fpu_confidential: bool,
        guest_apic_protected: bool,
        guest_tsc_protected: bool,
        secure_tsc: bool,
        config: ProtectionConfig,
    }

    impl FakeKvm {
        /// `svm_vm_init()` / `tdx_vm_init()` then `kvm_arch_vcpu_create()` with the vendor's
        /// vCPU creation (`tdx_vcpu_create()` for TDX).
        fn create_vcpu(vm_type: VmType, config: ProtectionConfig) -> Self {
            let tdx = vm_type == VmType::Tdx;
            FakeKvm {
                vm_type,
                has_protected_state: matches!(vm_type, VmType::SevEs | VmType::Snp | VmType::Tdx),
                sev_es_guest: matches!(vm_type, VmType::SevEs | VmType::Snp),
                guest_state_protected: tdx && !config.tdx_debug,
                fpu_confidential: tdx,
                guest_apic_protected: tdx,
                guest_tsc_protected: tdx,
                secure_tsc: vm_type == VmType::Snp && config.snp_secure_tsc,
                config,
            }
        }

        /// `KVM_SEV_LAUNCH_UPDATE_VMSA` (`__sev_launch_update_vmsa()`) or
        /// `KVM_SEV_SNP_LAUNCH_FINISH` (`snp_launch_update_vmsa()`); TDX's
        /// `KVM_TDX_FINALIZE_VM` changes no vCPU flag.
        fn launch(&mut self) {
            match self.vm_type {
                VmType::SevEs => {
                    self.fpu_confidential = true;
                    self.guest_state_protected = true;
                }
                VmType::Snp => {
                    self.guest_state_protected = true;
                    self.guest_tsc_protected = self.secure_tsc;
                }
                _ => {}
            }
        }

        fn msr_write_intercepted(&self, index: u32) -> bool {
            let passthrough = [
                sys::MSR_EFER,
                sys::MSR_IA32_CR_PAT,
                sys::MSR_AMD64_SEV_ES_GHCB,
                sys::MSR_IA32_DEBUGCTLMSR,
                sys::MSR_IA32_LASTBRANCHFROMIP,
                sys::MSR_IA32_LASTBRANCHTOIP,
                sys::MSR_IA32_LASTINTFROMIP,
                sys::MSR_IA32_LASTINTTOIP,
            ];
            let by_cpuid = (index == sys::MSR_TSC_AUX && self.config.guest_tsc_aux)
                || (index == sys::MSR_IA32_XSS && self.config.guest_xsaves);
            !(passthrough.contains(&index) || by_cpuid)
        }

        /// The refusal at the top of each ioctl, `Err(EINVAL)` where KVM refuses.
        fn ioctl(&self, op: VcpuOp, msr: u32) -> Result<(), i32> {
            let einval = Err(libc::EINVAL);
            let state = self.has_protected_state && self.guest_state_protected;
            let fpu = self.fpu_confidential && self.has_protected_state;
            match op {
                VcpuOp::GetRegs
                | VcpuOp::SetRegs
                | VcpuOp::GetSregs
                | VcpuOp::SetSregs
                | VcpuOp::GetSregs2
                | VcpuOp::SetSregs2
                | VcpuOp::GetXcrs
                | VcpuOp::SetXcrs
                | VcpuOp::GetDebugRegs
                | VcpuOp::SetDebugRegs
                    if state =>
                {
                    einval
                }
                VcpuOp::GetFpu
                | VcpuOp::SetFpu
                | VcpuOp::GetXsave
                | VcpuOp::GetXsave2
                | VcpuOp::SetXsave
                    if fpu =>
                {
                    einval
                }
                VcpuOp::SetGuestDebug if self.guest_state_protected => einval,
                VcpuOp::GetLapic | VcpuOp::SetLapic if self.guest_apic_protected => einval,
                VcpuOp::SetTscKhz if self.guest_tsc_protected => einval,
                VcpuOp::GetMsrs | VcpuOp::SetMsrs
                    if self.sev_es_guest
                        && self.guest_state_protected
                        && !self.msr_write_intercepted(msr) =>
                {
                    einval
                }
                VcpuOp::SyncRegs if self.has_protected_state => einval,
                _ => Ok(()),
            }
        }
    }

    fn guard_result(guard: &GuestStateGuard, op: VcpuOp, msr: u32) -> Result<(), i32> {
        let result = match op {
            VcpuOp::GetMsrs | VcpuOp::SetMsrs => guard.check(op).and(guard.check_msr(op, msr)),
            _ => guard.check(op),
        };
        result.map_err(|e| e.kernel_errno())
    }

    fn config(tdx_debug: bool, secure_tsc: bool, tsc_aux: bool, xsaves: bool) -> ProtectionConfig {
        ProtectionConfig {
            tdx_debug,
            snp_secure_tsc: secure_tsc,
            guest_tsc_aux: tsc_aux,
            guest_xsaves: xsaves,
        }
    }

    const MSRS: [u32; 13] = [
        sys::MSR_EFER,
        sys::MSR_IA32_CR_PAT,
        sys::MSR_AMD64_SEV_ES_GHCB,
        sys::MSR_IA32_DEBUGCTLMSR,
        sys::MSR_IA32_LASTBRANCHFROMIP,
        sys::MSR_IA32_LASTBRANCHTOIP,
        sys::MSR_IA32_LASTINTFROMIP,
        sys::MSR_IA32_LASTINTTOIP,
        sys::MSR_TSC_AUX,
        sys::MSR_IA32_XSS,
        0x10,        // IA32_TSC: intercepted
        0x1b,        // IA32_APIC_BASE: intercepted
        0xc000_0081, // STAR: intercepted
    ];

    proptest! {
        /// Models the checks of kvm_arch_vcpu_ioctl() and its helpers (Linux 6.12 for the
        /// SEV paths, 6.16/6.17 for TDX and Secure TSC) for every type, configuration, phase,
        /// operation and MSR: the guard refuses exactly what the fake kernel refuses.
        #[test]
        fn guard_agrees_with_the_fake_kernel(
            ty_index in 0usize..VmType::ALL.len(),
            op_index in 0usize..VcpuOp::ALL.len(),
            msr_index in 0usize..MSRS.len(),
            launched in any::<bool>(),
            flags in any::<[bool; 4]>(),
        ) {
            let ty = VmType::ALL[ty_index];
            let op = VcpuOp::ALL[op_index];
            let msr = MSRS[msr_index];
            let config = config(flags[0], flags[1], flags[2], flags[3]);
            let mut kernel = FakeKvm::create_vcpu(ty, config);
            let mut guard = GuestStateGuard::before_launch(ty).with_config(config);
            if launched {
                kernel.launch();
                guard.mark_launched();
            }
            prop_assert_eq!(guard_result(&guard, op, msr), kernel.ioctl(op, msr), "{} {} {:#x}", ty, op, msr);
            // The guard of a launched VM refuses at least as much as one before launch.
            let after = GuestStateGuard::launched(ty).with_config(config);
            prop_assert!(guard_result(&guard, op, msr).is_ok() || guard_result(&after, op, msr).is_err());
        }
    }

    /// Models __sev_launch_update_vmsa() and the guest_state_protected checks of
    /// kvm_arch_vcpu_ioctl_{get,set}_{regs,sregs}() and KVM_{GET,SET}_SREGS2, Linux 6.12:
    /// SEV-ES register setup works until KVM_SEV_LAUNCH_UPDATE_VMSA, then is refused.
    #[test]
    fn sev_es_register_setup_works_until_launch() {
        let mut guard = GuestStateGuard::before_launch(VmType::SevEs);
        for op in [
            VcpuOp::SetRegs,
            VcpuOp::SetSregs,
            VcpuOp::SetSregs2,
            VcpuOp::SetXcrs,
        ] {
            assert_eq!(guard.check(op), Ok(()), "{op} before launch");
        }
        guard.mark_launched();
        for op in [
            VcpuOp::GetRegs,
            VcpuOp::SetRegs,
            VcpuOp::GetSregs2,
            VcpuOp::SetDebugRegs,
        ] {
            let err = guard.check(op).expect_err("refused after launch");
            assert_eq!(
                err,
                GuestStateError::StateProtected {
                    op,
                    vm_type: VmType::SevEs
                }
            );
        }
        assert_eq!(
            ProtectionPoint::of(VmType::SevEs),
            Some(ProtectionPoint::LaunchUpdateVmsa)
        );
    }

    /// Models kvm_arch_vcpu_ioctl_get_fpu(), kvm_vcpu_ioctl_x86_get_xsave2() and
    /// kvm_vcpu_ioctl_x86_set_xsave() (fpstate_is_confidential, has_protected_state → EINVAL)
    /// with __sev_launch_update_vmsa() and snp_launch_update_vmsa(), Linux 6.12: SEV-ES
    /// marks the FPU state confidential at launch, SNP does not, so KVM refuses XSAVE on a
    /// launched SEV-ES vCPU but not on a launched SNP vCPU.
    #[test]
    fn fpu_refusal_follows_confidential_fpu_state() {
        let es = GuestStateGuard::launched(VmType::SevEs);
        let snp = GuestStateGuard::launched(VmType::Snp);
        for op in [
            VcpuOp::GetFpu,
            VcpuOp::SetFpu,
            VcpuOp::GetXsave,
            VcpuOp::GetXsave2,
            VcpuOp::SetXsave,
        ] {
            assert_eq!(
                es.check(op),
                Err(GuestStateError::FpuStateConfidential {
                    op,
                    vm_type: VmType::SevEs
                })
            );
            assert_eq!(snp.check(op), Ok(()), "SNP {op}");
            assert_eq!(
                GuestStateGuard::before_launch(VmType::SevEs).check(op),
                Ok(())
            );
        }
    }

    /// Models kvm_arch_vcpu_ioctl_set_guest_debug() (guest_state_protected → EINVAL),
    /// Linux 6.12, with tdx_vcpu_create() (Linux 6.16): guest debugging works on an SEV-ES
    /// vCPU before launch and on a TDX debug TD, and is refused after launch and on an
    /// ordinary TD.
    #[test]
    fn set_guest_debug_needs_unprotected_state() {
        let op = VcpuOp::SetGuestDebug;
        assert_eq!(GuestStateGuard::launched(VmType::Default).check(op), Ok(()));
        assert_eq!(GuestStateGuard::launched(VmType::Sev).check(op), Ok(()));
        assert_eq!(
            GuestStateGuard::before_launch(VmType::SevEs).check(op),
            Ok(())
        );
        for ty in [VmType::SevEs, VmType::Snp, VmType::Tdx] {
            assert_eq!(
                GuestStateGuard::launched(ty).check(op),
                Err(GuestStateError::GuestDebugProtected { op, vm_type: ty })
            );
        }
        let debug_td = ProtectionConfig {
            tdx_debug: true,
            ..ProtectionConfig::DEFAULT
        };
        assert_eq!(
            GuestStateGuard::launched(VmType::Tdx)
                .with_config(debug_td)
                .check(op),
            Ok(())
        );
    }

    /// Models sev_es_prevent_msr_access() (svm.c, Linux 6.12) with the MSRs sev_es_init_vmcb(),
    /// svm_enable_lbrv() and sev_es_vcpu_after_set_cpuid() pass through: refused after launch
    /// for passed-through MSRs only, per guest CPUID for TSC_AUX and XSS, never before launch
    /// and never for other types.
    #[test]
    fn sev_es_msr_access_after_launch() {
        let before = GuestStateGuard::before_launch(VmType::SevEs);
        let after = GuestStateGuard::launched(VmType::SevEs);
        assert_eq!(before.check_msr(VcpuOp::SetMsrs, sys::MSR_EFER), Ok(()));
        assert_eq!(
            after.check_msr(VcpuOp::SetMsrs, sys::MSR_EFER),
            Err(GuestStateError::MsrProtected {
                op: VcpuOp::SetMsrs,
                vm_type: VmType::SevEs,
                index: sys::MSR_EFER
            })
        );
        assert_eq!(after.check_msr(VcpuOp::GetMsrs, 0x10), Ok(()));
        let err = after
            .check_msrs(
                VcpuOp::GetMsrs,
                [0x10, sys::MSR_IA32_LASTBRANCHTOIP, sys::MSR_EFER],
            )
            .expect_err("LBR MSR refused");
        assert_eq!(err.rule(), KernelRule::MsrPassthrough);
        assert!(matches!(
            err,
            GuestStateError::MsrProtected {
                index: sys::MSR_IA32_LASTBRANCHTOIP,
                ..
            }
        ));
        let no_rdtscp = ProtectionConfig {
            guest_tsc_aux: false,
            ..ProtectionConfig::DEFAULT
        };
        assert!(after.check_msr(VcpuOp::GetMsrs, sys::MSR_TSC_AUX).is_err());
        assert_eq!(
            after
                .with_config(no_rdtscp)
                .check_msr(VcpuOp::GetMsrs, sys::MSR_TSC_AUX),
            Ok(())
        );
        assert!(GuestStateGuard::launched(VmType::Snp)
            .check_msr(VcpuOp::GetMsrs, sys::MSR_IA32_CR_PAT)
            .is_err());
        for ty in [VmType::Default, VmType::Sev, VmType::Tdx] {
            assert_eq!(
                GuestStateGuard::launched(ty).check_msr(VcpuOp::SetMsrs, sys::MSR_EFER),
                Ok(()),
                "{ty}"
            );
        }
    }

    /// Models tdx_vcpu_create() (vmx/tdx.c, Linux 6.16) with kvm_vcpu_ioctl_{get,set}_lapic()
    /// (guest_apic_protected) and the KVM_SET_TSC_KHZ case of kvm_arch_vcpu_ioctl()
    /// (guest_tsc_protected, Linux 6.17): a TD refuses LAPIC and TSC-frequency access from
    /// vCPU creation, whatever the launch phase, and a debug TD does too while its registers
    /// are open.
    #[test]
    fn tdx_refuses_lapic_tsc_and_fpu_from_vcpu_creation() {
        let debug_td = ProtectionConfig {
            tdx_debug: true,
            ..ProtectionConfig::DEFAULT
        };
        for config in [ProtectionConfig::DEFAULT, debug_td] {
            let guard = GuestStateGuard::before_launch(VmType::Tdx).with_config(config);
            for (op, rule) in [
                (VcpuOp::GetLapic, KernelRule::ApicProtected),
                (VcpuOp::SetLapic, KernelRule::ApicProtected),
                (VcpuOp::SetTscKhz, KernelRule::TscProtected),
                (VcpuOp::GetXsave2, KernelRule::FpuConfidential),
                (VcpuOp::SetFpu, KernelRule::FpuConfidential),
            ] {
                let err = guard.check(op).expect_err("refused");
                assert_eq!(
                    (err.op(), err.rule(), err.vm_type()),
                    (op, rule, VmType::Tdx)
                );
            }
            assert_eq!(guard.check(VcpuOp::GetTscKhz), Ok(()));
            assert_eq!(guard.check(VcpuOp::GetRegs).is_ok(), config.tdx_debug);
        }
        assert_eq!(
            ProtectionPoint::of(VmType::Tdx),
            Some(ProtectionPoint::VcpuCreation)
        );
    }

    /// Models snp_launch_update_vmsa() setting guest_tsc_protected for Secure TSC guests and
    /// the KVM_SET_TSC_KHZ check of kvm_arch_vcpu_ioctl(), Linux 6.17.
    #[test]
    fn snp_secure_tsc_protects_the_tsc_after_launch() {
        let secure = ProtectionConfig {
            snp_secure_tsc: true,
            ..ProtectionConfig::DEFAULT
        };
        let op = VcpuOp::SetTscKhz;
        assert_eq!(
            GuestStateGuard::before_launch(VmType::Snp)
                .with_config(secure)
                .check(op),
            Ok(())
        );
        assert_eq!(GuestStateGuard::launched(VmType::Snp).check(op), Ok(()));
        assert_eq!(
            GuestStateGuard::launched(VmType::Snp)
                .with_config(secure)
                .check(op),
            Err(GuestStateError::TscProtected {
                op,
                vm_type: VmType::Snp
            })
        );
    }

    /// Models kvm_sync_valid_fields() (x86.c, Linux 6.15): sync regs are refused on every
    /// protected-state type in every phase, and zero masks are always accepted.
    #[test]
    fn sync_regs_refused_by_type_not_by_phase() {
        for ty in VmType::ALL {
            for guard in [
                GuestStateGuard::before_launch(ty),
                GuestStateGuard::launched(ty),
            ] {
                assert_eq!(guard.check_sync_regs(0, 0), Ok(()));
                assert_eq!(
                    guard.check_sync_regs(1, 0).is_err(),
                    ty.has_protected_state(),
                    "{ty}"
                );
                assert_eq!(
                    guard.check_sync_regs(0, 4).is_err(),
                    ty.has_protected_state(),
                    "{ty}"
                );
            }
        }
    }

    /// Every refusal names the operation, the VM type and the kernel function it models.
    #[test]
    fn refusals_name_operation_type_and_kernel_function() {
        let mut seen = std::collections::HashSet::new();
        let secure = ProtectionConfig {
            snp_secure_tsc: true,
            ..ProtectionConfig::DEFAULT
        };
        for ty in VmType::ALL {
            let guard = GuestStateGuard::launched(ty).with_config(secure);
            for op in VcpuOp::ALL {
                let errors = [
                    guard.check(op).err(),
                    guard.check_msr(op, sys::MSR_EFER).err(),
                ];
                for err in errors.into_iter().flatten() {
                    let msg = err.to_string();
                    assert!(msg.contains(op.ioctl_name()), "{msg}");
                    assert!(msg.contains(ty.name()), "{msg}");
                    assert!(msg.contains(err.rule().kernel_function()), "{msg}");
                    assert_eq!(err.kernel_errno(), libc::EINVAL);
                    seen.insert(err.rule());
                }
            }
        }
        assert_eq!(
            seen.len(),
            KernelRule::ALL.len(),
            "every rule refuses something: {seen:?}"
        );
    }

    /// The ioctls each kernel check guards, as listed at the top of the kernel functions.
    #[test]
    fn operations_map_to_the_kernel_checks() {
        let table: [(KernelRule, &[&str]); 7] = [
            (
                KernelRule::GuestStateProtected,
                &[
                    "KVM_GET_REGS",
                    "KVM_SET_REGS",
                    "KVM_GET_SREGS",
                    "KVM_SET_SREGS",
                    "KVM_GET_SREGS2",
                    "KVM_SET_SREGS2",
                    "KVM_GET_XCRS",
                    "KVM_SET_XCRS",
                    "KVM_GET_DEBUGREGS",
                    "KVM_SET_DEBUGREGS",
                ],
            ),
            (
                KernelRule::FpuConfidential,
                &[
                    "KVM_GET_FPU",
                    "KVM_SET_FPU",
                    "KVM_GET_XSAVE",
                    "KVM_GET_XSAVE2",
                    "KVM_SET_XSAVE",
                ],
            ),
            (KernelRule::GuestDebugProtected, &["KVM_SET_GUEST_DEBUG"]),
            (
                KernelRule::ApicProtected,
                &["KVM_GET_LAPIC", "KVM_SET_LAPIC"],
            ),
            (KernelRule::TscProtected, &["KVM_SET_TSC_KHZ"]),
            (
                KernelRule::MsrPassthrough,
                &["KVM_GET_MSRS", "KVM_SET_MSRS"],
            ),
            (KernelRule::SyncRegs, &["KVM_RUN with sync regs"]),
        ];
        for op in VcpuOp::ALL {
            let expected = table
                .iter()
                .find(|(_, names)| names.contains(&op.ioctl_name()))
                .map(|(rule, _)| *rule);
            assert_eq!(op.rule(), expected, "{op}");
            assert_eq!(op.accesses_guest_state(), expected.is_some(), "{op}");
        }
        let names: std::collections::HashSet<_> =
            VcpuOp::ALL.iter().map(|op| op.ioctl_name()).collect();
        assert_eq!(names.len(), VcpuOp::ALL.len(), "ioctl names are unique");
    }
}
