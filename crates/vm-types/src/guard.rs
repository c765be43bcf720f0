//! A userspace copy of KVM's rule against guest-state access on protected-state VMs.
//!
//! Since Linux 6.10 ("KVM: x86: add fields to struct kvm_arch for CoCo features"), KVM fails
//! the vCPU ioctls that read or write register state with `EINVAL` when
//! `kvm->arch.has_protected_state && vcpu->arch.guest_state_protected`:
//! `KVM_{GET,SET}_REGS`, `KVM_{GET,SET}_SREGS`, `KVM_{GET,SET}_SREGS2`, `KVM_{GET,SET}_FPU`,
//! `KVM_{GET,SET}_XSAVE`, `KVM_GET_XSAVE2`, `KVM_{GET,SET}_XCRS` and
//! `KVM_{GET,SET}_DEBUGREGS`. A later change ("KVM: x86: block KVM_CAP_SYNC_REGS if guest state
//! is protected", 2025) refuses sync regs on such VMs at the type level: `KVM_RUN` fails with
//! `EINVAL` if `kvm_valid_regs` or `kvm_dirty_regs` is non-zero.
//!
//! [`VcpuOp`] classifies vCPU operations by that rule and [`GuestStateGuard`] applies it
//! before the kernel is asked, with an error that names the operation and the VM type instead
//! of a bare `EINVAL`. When a vCPU's state becomes protected depends on the type
//! ([`ProtectionPoint`]); [`GuestStateGuard::new`] assumes it already is, which is always
//! safe, and [`GuestStateGuard::before_launch`] follows the launch flow.

use std::fmt;

use thiserror::Error;

use crate::VmType;

/// How a vCPU operation relates to KVM's protected-guest-state rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestStateAccess {
    /// Reads or writes vCPU register state; KVM fails it with `EINVAL` once the state of a
    /// protected-state VM's vCPU is protected (Linux 6.10).
    Registers,
    /// Copies register state through `kvm_run` (sync regs); KVM refuses it on every VM with
    /// protected state, before and after launch (2025, see [`VmType::allows_sync_regs`]).
    SyncRegs,
    /// Not covered by the rule.
    None,
}

/// A vCPU operation (x86), named after its ioctl.
///
/// [`VcpuOp::accesses_guest_state`] is true exactly for the ioctls KVM's rule covers. Other
/// operations here do touch vCPU state in a wider sense (events, MSRs, LAPIC, MP state,
/// nested state, address translation) but are not part of that rule; KVM may still reject
/// some of them on protected VMs through type-specific checks (for example per-MSR checks for
/// SEV-ES), which this crate does not model and the search tool could not confirm one by one.
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
    /// `KVM_SET_XSAVE`.
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

    /// How the operation relates to KVM's protected-guest-state rule.
    pub const fn guest_state_access(self) -> GuestStateAccess {
        match self {
            VcpuOp::GetRegs
            | VcpuOp::SetRegs
            | VcpuOp::GetSregs
            | VcpuOp::SetSregs
            | VcpuOp::GetSregs2
            | VcpuOp::SetSregs2
            | VcpuOp::GetFpu
            | VcpuOp::SetFpu
            | VcpuOp::GetXsave
            | VcpuOp::GetXsave2
            | VcpuOp::SetXsave
            | VcpuOp::GetXcrs
            | VcpuOp::SetXcrs
            | VcpuOp::GetDebugRegs
            | VcpuOp::SetDebugRegs => GuestStateAccess::Registers,
            VcpuOp::SyncRegs => GuestStateAccess::SyncRegs,
            VcpuOp::GetVcpuEvents
            | VcpuOp::SetVcpuEvents
            | VcpuOp::GetMsrs
            | VcpuOp::SetMsrs
            | VcpuOp::GetLapic
            | VcpuOp::SetLapic
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
            | VcpuOp::SetGuestDebug
            | VcpuOp::GetNestedState
            | VcpuOp::SetNestedState
            | VcpuOp::GetTscKhz
            | VcpuOp::SetTscKhz => GuestStateAccess::None,
        }
    }

    /// Whether KVM refuses the operation on a VM with protected guest state.
    pub const fn accesses_guest_state(self) -> bool {
        !matches!(self.guest_state_access(), GuestStateAccess::None)
    }
}

impl fmt::Display for VcpuOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.ioctl_name())
    }
}

/// When a protected-state VM's vCPU state stops being accessible to KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtectionPoint {
    /// From vCPU creation: TDX (`tdx_vcpu_create()` sets `guest_state_protected` unless the
    /// TD has the DEBUG attribute, arch/x86/kvm/vmx/tdx.c, Linux 6.16).
    VcpuCreation,
    /// From `KVM_SEV_LAUNCH_UPDATE_VMSA`, which encrypts the VMSA: SEV-ES
    /// (arch/x86/kvm/svm/sev.c sets `guest_state_protected` after the firmware command).
    LaunchUpdateVmsa,
    /// From `KVM_SEV_SNP_LAUNCH_FINISH`, which encrypts each vCPU's VMSA: SEV-SNP. (Taken from
    /// arch/x86/kvm/svm/sev.c as remembered; not re-confirmed with the search tool.)
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

/// An operation refused because the VM's guest state is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum GuestStateError {
    /// Register access on a vCPU whose state is protected; KVM would fail it with `EINVAL`.
    #[error(
        "{op} refused on a {vm_type} VM: the vCPU's guest state is protected and KVM would \
         fail the ioctl with EINVAL (Linux 6.10+)"
    )]
    StateProtected {
        /// The refused operation.
        op: VcpuOp,
        /// The VM's type.
        vm_type: VmType,
    },
    /// Sync regs on a VM type with protected state; KVM would fail `KVM_RUN` with `EINVAL`.
    #[error(
        "{op} refused on a {vm_type} VM: KVM does not allow sync regs on VMs with protected \
         guest state (KVM_RUN would fail with EINVAL)"
    )]
    SyncRegsNotAllowed {
        /// The refused operation ([`VcpuOp::SyncRegs`]).
        op: VcpuOp,
        /// The VM's type.
        vm_type: VmType,
    },
}

impl GuestStateError {
    /// The refused operation.
    pub const fn op(&self) -> VcpuOp {
        match self {
            GuestStateError::StateProtected { op, .. }
            | GuestStateError::SyncRegsNotAllowed { op, .. } => *op,
        }
    }

    /// The VM type that refused it.
    pub const fn vm_type(&self) -> VmType {
        match self {
            GuestStateError::StateProtected { vm_type, .. }
            | GuestStateError::SyncRegsNotAllowed { vm_type, .. } => *vm_type,
        }
    }

    /// The errno KVM itself returns for the operation (`EINVAL`), for callers that must
    /// report in the kernel's terms.
    pub const fn kernel_errno(&self) -> i32 {
        libc::EINVAL
    }
}

/// Whether a vCPU's register state is, as far as the guard knows, still accessible to KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatePhase {
    /// Before the type's [`ProtectionPoint`]: KVM still reads and writes the state.
    Accessible,
    /// After it (or assumed to be): KVM refuses register access.
    Protected,
}

/// Applies KVM's protected-guest-state rule for one vCPU (or all vCPUs of a VM in the same
/// phase) before the kernel is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestStateGuard {
    vm_type: VmType,
    phase: StatePhase,
}

impl GuestStateGuard {
    /// A guard that assumes the vCPU's state is already protected if the type can protect it.
    ///
    /// This is the conservative choice and the right one for TDX and for any vCPU past its
    /// launch; a VMM that sets the initial register state of SEV-ES/SNP vCPUs before the
    /// launch commands uses [`GuestStateGuard::before_launch`] instead.
    pub const fn new(vm_type: VmType) -> Self {
        let phase = if vm_type.has_protected_state() {
            StatePhase::Protected
        } else {
            StatePhase::Accessible
        };
        GuestStateGuard { vm_type, phase }
    }

    /// A guard for a vCPU that has just been created: its state is accessible until the
    /// type's [`ProtectionPoint`] (at once for TDX). Call [`GuestStateGuard::protect`] after
    /// the launch command that protects it.
    pub const fn before_launch(vm_type: VmType) -> Self {
        let phase = match ProtectionPoint::of(vm_type) {
            Some(ProtectionPoint::VcpuCreation) => StatePhase::Protected,
            _ => StatePhase::Accessible,
        };
        GuestStateGuard { vm_type, phase }
    }

    /// Records that the vCPU's state has passed its [`ProtectionPoint`]. Has no effect on the
    /// checks for types without protected state, as in KVM, whose rule also requires
    /// `has_protected_state`.
    pub fn protect(&mut self) {
        self.phase = StatePhase::Protected;
    }

    /// The VM type the guard is for.
    pub const fn vm_type(&self) -> VmType {
        self.vm_type
    }

    /// The phase the guard believes the vCPU is in.
    pub const fn phase(&self) -> StatePhase {
        self.phase
    }

    /// Whether KVM would refuse register access now: the type has protected state and the
    /// vCPU has passed its protection point (`has_protected_state && guest_state_protected`).
    pub const fn is_state_protected(&self) -> bool {
        self.vm_type.has_protected_state() && matches!(self.phase, StatePhase::Protected)
    }

    /// `Ok` if KVM would accept `op` on this vCPU as far as the protected-state rule goes,
    /// otherwise the typed refusal.
    pub const fn check(&self, op: VcpuOp) -> Result<(), GuestStateError> {
        let vm_type = self.vm_type;
        match op.guest_state_access() {
            GuestStateAccess::None => Ok(()),
            GuestStateAccess::Registers => {
                if self.is_state_protected() {
                    Err(GuestStateError::StateProtected { op, vm_type })
                } else {
                    Ok(())
                }
            }
            GuestStateAccess::SyncRegs => {
                if vm_type.allows_sync_regs() {
                    Ok(())
                } else {
                    Err(GuestStateError::SyncRegsNotAllowed { op, vm_type })
                }
            }
        }
    }

    /// The check KVM makes on `KVM_RUN` for the sync-regs fields of `kvm_run`: zero masks are
    /// always fine, non-zero ones need a type that allows sync regs.
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

    /// The ioctls named in "KVM: x86: add fields to struct kvm_arch for CoCo features".
    const KERNEL_RULE: [&str; 15] = [
        "KVM_GET_REGS",
        "KVM_SET_REGS",
        "KVM_GET_SREGS",
        "KVM_SET_SREGS",
        "KVM_GET_SREGS2",
        "KVM_SET_SREGS2",
        "KVM_GET_FPU",
        "KVM_SET_FPU",
        "KVM_GET_XSAVE",
        "KVM_GET_XSAVE2",
        "KVM_SET_XSAVE",
        "KVM_GET_XCRS",
        "KVM_SET_XCRS",
        "KVM_GET_DEBUGREGS",
        "KVM_SET_DEBUGREGS",
    ];

    #[test]
    fn classification_table_matches_the_kernel_rule() {
        for op in VcpuOp::ALL {
            let in_rule = KERNEL_RULE.contains(&op.ioctl_name());
            assert_eq!(
                op.guest_state_access() == GuestStateAccess::Registers,
                in_rule,
                "{op}"
            );
            assert_eq!(
                op.accesses_guest_state(),
                in_rule || op == VcpuOp::SyncRegs,
                "{op}"
            );
            assert_eq!(op.to_string(), op.ioctl_name());
        }
        let names: std::collections::HashSet<_> =
            VcpuOp::ALL.iter().map(|op| op.ioctl_name()).collect();
        assert_eq!(names.len(), VcpuOp::ALL.len(), "ioctl names are unique");
    }

    #[test]
    fn default_sw_protected_and_sev_allow_everything() {
        for ty in [VmType::Default, VmType::SwProtected, VmType::Sev] {
            for mut guard in [GuestStateGuard::new(ty), GuestStateGuard::before_launch(ty)] {
                for op in VcpuOp::ALL {
                    assert_eq!(guard.check(op), Ok(()), "{ty} {op}");
                }
                guard.protect();
                assert!(!guard.is_state_protected(), "{ty}");
                for op in VcpuOp::ALL {
                    assert_eq!(guard.check(op), Ok(()), "{ty} {op} after protect");
                }
            }
        }
    }

    #[test]
    fn protected_types_refuse_every_guest_state_op() {
        for ty in [VmType::SevEs, VmType::Snp, VmType::Tdx] {
            let guard = GuestStateGuard::new(ty);
            assert!(guard.is_state_protected());
            assert_eq!(guard.phase(), StatePhase::Protected);
            for op in VcpuOp::ALL {
                let result = guard.check(op);
                if op.accesses_guest_state() {
                    let err = result.expect_err("refused");
                    assert_eq!(err.op(), op);
                    assert_eq!(err.vm_type(), ty);
                    assert_eq!(err.kernel_errno(), libc::EINVAL);
                    let msg = err.to_string();
                    assert!(msg.contains(op.ioctl_name()), "{msg}");
                    assert!(msg.contains(ty.name()), "{msg}");
                } else {
                    assert_eq!(result, Ok(()), "{ty} {op}");
                }
            }
        }
    }

    #[test]
    fn before_launch_follows_the_protection_point() {
        // SEV-ES and SNP: registers accessible until protect(), sync regs never.
        for ty in [VmType::SevEs, VmType::Snp] {
            let mut guard = GuestStateGuard::before_launch(ty);
            assert_eq!(guard.phase(), StatePhase::Accessible);
            assert_eq!(guard.check(VcpuOp::SetRegs), Ok(()));
            assert!(matches!(
                guard.check(VcpuOp::SyncRegs),
                Err(GuestStateError::SyncRegsNotAllowed { .. })
            ));
            guard.protect();
            assert!(matches!(
                guard.check(VcpuOp::SetRegs),
                Err(GuestStateError::StateProtected { .. })
            ));
        }
        // TDX: protected from vCPU creation.
        let guard = GuestStateGuard::before_launch(VmType::Tdx);
        assert!(guard.is_state_protected());
        assert_eq!(guard.vm_type(), VmType::Tdx);
        assert_eq!(
            ProtectionPoint::of(VmType::Tdx),
            Some(ProtectionPoint::VcpuCreation)
        );
        assert_eq!(ProtectionPoint::of(VmType::Sev), None);
    }

    #[test]
    fn sync_regs_masks() {
        let es = GuestStateGuard::before_launch(VmType::SevEs);
        assert_eq!(es.check_sync_regs(0, 0), Ok(()));
        assert!(es.check_sync_regs(1, 0).is_err());
        assert!(es.check_sync_regs(0, 4).is_err());
        let default = GuestStateGuard::new(VmType::Default);
        assert_eq!(default.check_sync_regs(7, 7), Ok(()));
    }

    proptest! {
        #[test]
        fn guard_mirrors_the_kernel_condition(
            ty_index in 0usize..VmType::ALL.len(),
            op_index in 0usize..VcpuOp::ALL.len(),
            protected in any::<bool>(),
        ) {
            let ty = VmType::ALL[ty_index];
            let op = VcpuOp::ALL[op_index];
            let mut guard = GuestStateGuard::before_launch(ty);
            if protected {
                guard.protect();
            }
            let state_protected = ty.has_protected_state()
                && (protected || ProtectionPoint::of(ty) == Some(ProtectionPoint::VcpuCreation));
            let kernel_refuses = match op.guest_state_access() {
                GuestStateAccess::Registers => state_protected,
                GuestStateAccess::SyncRegs => ty.has_protected_state(),
                GuestStateAccess::None => false,
            };
            prop_assert_eq!(guard.check(op).is_err(), kernel_refuses);
            // The conservative guard refuses at least as much.
            prop_assert!(guard.check(op).is_ok() || GuestStateGuard::new(ty).check(op).is_err());
        }
    }
}
