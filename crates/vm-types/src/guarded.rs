//! A vCPU wrapper that consults the guest-state guard before every guest-state ioctl.
//!
//! [`GuardedVcpu`] owns a `kvm_ioctls::VcpuFd` and offers every vCPU state ioctl kvm-ioctls
//! has (registers, special registers, FPU, XSAVE and XSAVE2, XCRs, debug registers, events,
//! MSRs, LAPIC, MP state, nested state, TSC frequency, guest debug), `KVM_{GET,SET}_SREGS2`
//! (which kvm-ioctls lacks), `KVM_RUN` and the sync-regs switches. CPUID, interrupt injection
//! and address translation go through [`GuardedVcpu::vcpu`]. A refused call never reaches the kernel and
//! comes back as [`VcpuError::Refused`], naming the operation, the VM type and the kernel check.
//!
//! The guard follows the VM's launch: a vCPU made by [`crate::TypedVm::guard_vcpu`] shares the
//! VM's [`LaunchState`], so register setup before the launch step works and the same calls
//! are refused after [`crate::TypedVm::mark_launched`].

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_guest_debug, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs,
    kvm_sregs2, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, Xsave,
};
use kvm_ioctls::{KvmNestedStateBuffer, SyncReg, VcpuExit, VcpuFd};
use std::num::NonZeroUsize;
use thiserror::Error;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

use crate::guard::{GuestStateError, GuestStateGuard, LaunchPhase, ProtectionConfig, VcpuOp};
use crate::sys;
use crate::typed::LaunchState;
use crate::VmType;

/// Errors of guarded vCPU operations.
#[non_exhaustive]
#[derive(Debug, Error)]
pub enum VcpuError {
    /// The guard refused the operation; the kernel was not asked.
    #[error(transparent)]
    Refused(#[from] GuestStateError),
    /// The guard allowed the operation and the ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        /// The operation.
        op: VcpuOp,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_CREATE_VCPU` failed.
    #[error("KVM_CREATE_VCPU of vCPU {id} failed")]
    CreateVcpu {
        /// The vCPU id asked for.
        id: u64,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Result of this module's operations.
pub type Result<T> = std::result::Result<T, VcpuError>;

/// A vCPU whose guest-state ioctls go through the guest-state guard first.
#[derive(Debug)]
pub struct GuardedVcpu {
    vcpu: VcpuFd,
    vm_type: VmType,
    config: ProtectionConfig,
    launch: LaunchState,
}

macro_rules! guarded_get {
    ($(#[$doc:meta])* $name:ident, $op:expr, $ty:ty) => {
        $(#[$doc])*
        ///
        /// # Errors
        ///
        /// [`VcpuError::Refused`] if the guard refuses it, [`VcpuError::Ioctl`] if the kernel
        /// does.
        pub fn $name(&self) -> Result<$ty> {
            self.check($op)?;
            self.vcpu
                .$name()
                .map_err(|source| VcpuError::Ioctl { op: $op, source })
        }
    };
}

macro_rules! guarded_set {
    ($(#[$doc:meta])* $name:ident, $op:expr, $ty:ty) => {
        $(#[$doc])*
        ///
        /// # Errors
        ///
        /// [`VcpuError::Refused`] if the guard refuses it, [`VcpuError::Ioctl`] if the kernel
        /// does.
        pub fn $name(&self, value: &$ty) -> Result<()> {
            self.check($op)?;
            self.vcpu
                .$name(value)
                .map_err(|source| VcpuError::Ioctl { op: $op, source })
        }
    };
}

impl GuardedVcpu {
    /// Wraps `vcpu`, whose VM has the type `guard` is for, with a launch state of its own
    /// starting at the guard's phase. Prefer [`crate::TypedVm::guard_vcpu`], whose vCPUs
    /// follow the VM's launch.
    pub fn new(vcpu: VcpuFd, guard: GuestStateGuard) -> Self {
        let launch = match guard.phase() {
            LaunchPhase::BeforeLaunch => LaunchState::before_launch(),
            LaunchPhase::Launched => LaunchState::launched(),
        };
        GuardedVcpu::with_launch_state(vcpu, guard.vm_type(), guard.config(), launch)
    }

    /// Wraps `vcpu` of a VM of type `vm_type` whose launch is tracked by `launch`.
    pub fn with_launch_state(
        vcpu: VcpuFd,
        vm_type: VmType,
        config: ProtectionConfig,
        launch: LaunchState,
    ) -> Self {
        GuardedVcpu {
            vcpu,
            vm_type,
            config,
            launch,
        }
    }

    /// The guard as of now.
    pub fn guard(&self) -> GuestStateGuard {
        GuestStateGuard::at(self.vm_type, self.launch.phase(), self.config)
    }

    /// The launch state this vCPU follows.
    pub fn launch_state(&self) -> &LaunchState {
        &self.launch
    }

    /// Records that the VM passed its launch step, for every vCPU sharing the launch state.
    pub fn mark_launched(&self) {
        self.launch.mark_launched();
    }

    /// The vCPU, for operations outside the guard.
    pub fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    /// Gives the vCPU back.
    pub fn into_inner(self) -> VcpuFd {
        self.vcpu
    }

    fn check(&self, op: VcpuOp) -> std::result::Result<(), GuestStateError> {
        self.guard().check(op)
    }

    guarded_get!(
        /// `KVM_GET_REGS`, if the guard allows it.
        get_regs, VcpuOp::GetRegs, kvm_regs
    );
    guarded_set!(
        /// `KVM_SET_REGS`, if the guard allows it.
        set_regs, VcpuOp::SetRegs, kvm_regs
    );
    guarded_get!(
        /// `KVM_GET_SREGS`, if the guard allows it.
        get_sregs, VcpuOp::GetSregs, kvm_sregs
    );
    guarded_set!(
        /// `KVM_SET_SREGS`, if the guard allows it.
        set_sregs, VcpuOp::SetSregs, kvm_sregs
    );
    guarded_get!(
        /// `KVM_GET_FPU`, if the guard allows it.
        get_fpu, VcpuOp::GetFpu, kvm_fpu
    );
    guarded_set!(
        /// `KVM_SET_FPU`, if the guard allows it.
        set_fpu, VcpuOp::SetFpu, kvm_fpu
    );
    guarded_get!(
        /// `KVM_GET_XSAVE` (the 4096-byte legacy buffer), if the guard allows it.
        get_xsave, VcpuOp::GetXsave, kvm_xsave
    );
    guarded_get!(
        /// `KVM_GET_XCRS`, if the guard allows it.
        get_xcrs, VcpuOp::GetXcrs, kvm_xcrs
    );
    guarded_set!(
        /// `KVM_SET_XCRS`, if the guard allows it.
        set_xcrs, VcpuOp::SetXcrs, kvm_xcrs
    );
    guarded_get!(
        /// `KVM_GET_DEBUGREGS`, if the guard allows it.
        get_debug_regs, VcpuOp::GetDebugRegs, kvm_debugregs
    );
    guarded_set!(
        /// `KVM_SET_DEBUGREGS`, if the guard allows it.
        set_debug_regs, VcpuOp::SetDebugRegs, kvm_debugregs
    );
    guarded_get!(
        /// `KVM_GET_VCPU_EVENTS`, if the guard allows it.
        get_vcpu_events, VcpuOp::GetVcpuEvents, kvm_vcpu_events
    );
    guarded_set!(
        /// `KVM_SET_VCPU_EVENTS`, if the guard allows it.
        set_vcpu_events, VcpuOp::SetVcpuEvents, kvm_vcpu_events
    );
    guarded_get!(
        /// `KVM_GET_LAPIC`, if the guard allows it (refused on TDX).
        get_lapic, VcpuOp::GetLapic, kvm_lapic_state
    );
    guarded_set!(
        /// `KVM_SET_LAPIC`, if the guard allows it (refused on TDX).
        set_lapic, VcpuOp::SetLapic, kvm_lapic_state
    );
    guarded_get!(
        /// `KVM_GET_MP_STATE`, if the guard allows it.
        get_mp_state, VcpuOp::GetMpState, kvm_mp_state
    );
    guarded_set!(
        /// `KVM_SET_GUEST_DEBUG`, if the guard allows it (refused once the state is
        /// protected).
        set_guest_debug, VcpuOp::SetGuestDebug, kvm_guest_debug
    );
    guarded_get!(
        /// `KVM_GET_TSC_KHZ`, if the guard allows it.
        get_tsc_khz, VcpuOp::GetTscKhz, u32
    );

    /// `KVM_SET_MP_STATE`, if the guard allows it.
    ///
    /// # Errors
    ///
    /// [`VcpuError::Refused`] if the guard refuses it, [`VcpuError::Ioctl`] if the kernel does.
    pub fn set_mp_state(&self, mp_state: kvm_mp_state) -> Result<()> {
        let op = VcpuOp::SetMpState;
        self.check(op)?;
        self.vcpu
            .set_mp_state(mp_state)
            .map_err(|source| VcpuError::Ioctl { op, source })
    }

    /// The vCPU `KVM_SET_TSC_KHZ`, if the guard allows it (refused where the TSC is
    /// protected: TDX, and SNP with Secure TSC after launch).
    ///
    /// # Errors
    ///
    /// [`VcpuError::Refused`] if the guard refuses it, [`VcpuError::Ioctl`] if the kernel does.
    pub fn set_tsc_khz(&self, khz: u32) -> Result<()> {
        let op = VcpuOp::SetTscKhz;
        self.check(op)?;
        self.vcpu
            .set_tsc_khz(khz)
            .map_err(|source| VcpuError::Ioctl { op, source })
    }

    /// `KVM_GET_MSRS` for the entries of `msrs`, if the guard allows every index; returns how
    /// many entries the kernel read, as kvm-ioctls does.
    ///
    /// # Errors
    ///
    /// [`VcpuError::Refused`] naming the first refused MSR, [`VcpuError::Ioctl`] if the kernel
    /// fails the ioctl.
    pub fn get_msrs(&self, msrs: &mut Msrs) -> Result<usize> {
        let op = VcpuOp::GetMsrs;
        self.check_msrs(op, msrs)?;
        self.vcpu
            .get_msrs(msrs)
            .map_err(|source| VcpuError::Ioctl { op, source })
    }

    /// `KVM_SET_MSRS` for the entries of `msrs`, if the guard allows every index; returns how
    /// many entries the kernel wrote.
    ///
    /// # Errors
    ///
    /// [`VcpuError::Refused`] naming the first refused MSR, [`VcpuError::Ioctl`] if the kernel
    /// fails the ioctl.
    pub fn set_msrs(&self, msrs: &Msrs) -> Result<usize> {
        let op = VcpuOp::SetMsrs;
        self.check_msrs(op, msrs)?;
        self.vcpu
            .set_msrs(msrs)
            .map_err(|source| VcpuError::Ioctl { op, source })
    }

    fn check_msrs(&self, op: VcpuOp, msrs: &Msrs) -> std::result::Result<(), GuestStateError> {
        let guard = self.guard();
        guard.check(op)?;
        guard.check_msrs(op, msrs.as_slice().iter().map(|entry| entry.index))
    }

    /// `KVM_GET_NESTED_STATE` into `buffer` (`KVM_CAP_NESTED_STATE`), if the guard allows it;
    /// `None` when the vCPU has no nested state, as in kvm-ioctls.
    ///
    /// # Errors
    ///
    /// [`VcpuError::Refused`] if the guard refuses it, [`VcpuError::Ioctl`] if the kernel does.
    pub fn nested_state(&self, buffer: &mut KvmNestedStateBuffer) -> Result<Option<NonZeroUsize>> {
        let op = VcpuOp::GetNestedState;
        self.check(op)?;
        self.vcpu
            .nested_state(buffer)
            .map_err(|source| VcpuError::Ioctl { op, source })
    }

    /// `KVM_SET_NESTED_STATE`, if the guard allows it.
    ///
    /// # Errors
    ///
    /// [`VcpuError::Refused`] if the guard refuses it, [`VcpuError::Ioctl`] if the kernel does.
    pub fn set_nested_state(&self, state: &KvmNestedStateBuffer) -> Result<()> {
        let op = VcpuOp::SetNestedState;
        self.check(op)?;
        self.vcpu
            .set_nested_state(state)
            .map_err(|source| VcpuError::Ioctl { op, source })
    }

    /// `KVM_GET_SREGS2` (special registers with the PDPTRs, `KVM_CAP_SREGS2`, Linux 5.14), if
    /// the guard allows it.
    ///
    /// # Errors
    ///
    /// [`VcpuError::Refused`] if the guard refuses it, [`VcpuError::Ioctl`] if the kernel does
    /// (`EINVAL` on a kernel without `KVM_CAP_SREGS2`).
    pub fn get_sregs2(&self) -> Result<kvm_sregs2> {
        let op = VcpuOp::GetSregs2;
        self.check(op)?;
        let mut sregs2 = kvm_sregs2::default();
        // SAFETY: KVM_GET_SREGS2 writes one struct kvm_sregs2 through the pointer, which points
        // at a live local of exactly that type; the fd is the vCPU fd owned by `self.vcpu`.
        let ret = unsafe { ioctl_with_mut_ref(&self.vcpu, sys::KVM_GET_SREGS2(), &mut sregs2) };
        if ret == 0 {
            Ok(sregs2)
        } else {
            Err(VcpuError::Ioctl {
                op,
                source: kvm_ioctls::Error::last(),
            })
        }
    }

    /// `KVM_SET_SREGS2`, if the guard allows it.
    ///
    /// # Errors
    ///
    /// [`VcpuError::Refused`] if the guard refuses it, [`VcpuError::Ioctl`] if the kernel does.
    pub fn set_sregs2(&self, sregs2: &kvm_sregs2) -> Result<()> {
        let op = VcpuOp::SetSregs2;
        self.check(op)?;
        // SAFETY: KVM_SET_SREGS2 reads one struct kvm_sregs2 through the pointer, which points
        // at a live value of exactly that type; the fd is the vCPU fd owned by `self.vcpu`.
        let ret = unsafe { ioctl_with_ref(&self.vcpu, sys::KVM_SET_SREGS2(), sregs2) };
        if ret == 0 {
            Ok(())
        } else {
            Err(VcpuError::Ioctl {
                op,
                source: kvm_ioctls::Error::last(),
            })
        }
    }

    /// `KVM_SET_XSAVE` with the legacy 4096-byte buffer, if the guard allows it.
    ///
    /// # Safety
    ///
    /// As `kvm_ioctls::VcpuFd::set_xsave`: the kernel reads `KVM_CAP_XSAVE2` bytes (at least
    /// 4096), so the caller must make sure the VM's `KVM_CAP_XSAVE2` is at most
    /// `size_of::<kvm_xsave>()`, or use [`GuardedVcpu::set_xsave2`].
    ///
    /// # Errors
    ///
    /// [`VcpuError::Refused`] if the guard refuses it, [`VcpuError::Ioctl`] if the kernel does.
    pub unsafe fn set_xsave(&self, xsave: &kvm_xsave) -> Result<()> {
        let op = VcpuOp::SetXsave;
        self.check(op)?;
        // SAFETY: the caller upholds set_xsave's contract, documented above.
        unsafe { self.vcpu.set_xsave(xsave) }.map_err(|source| VcpuError::Ioctl { op, source })
    }

    /// `KVM_GET_XSAVE2` into `xsave`, if the guard allows it.
    ///
    /// # Safety
    ///
    /// As `kvm_ioctls::VcpuFd::get_xsave2`: `xsave` must hold at least as many bytes as the
    /// VM's `KVM_CAP_XSAVE2` reports.
    ///
    /// # Errors
    ///
    /// [`VcpuError::Refused`] if the guard refuses it, [`VcpuError::Ioctl`] if the kernel does.
    pub unsafe fn get_xsave2(&self, xsave: &mut Xsave) -> Result<()> {
        let op = VcpuOp::GetXsave2;
        self.check(op)?;
        // SAFETY: the caller upholds get_xsave2's contract, documented above.
        unsafe { self.vcpu.get_xsave2(xsave) }.map_err(|source| VcpuError::Ioctl { op, source })
    }

    /// `KVM_SET_XSAVE` with a `KVM_CAP_XSAVE2`-sized buffer, if the guard allows it.
    ///
    /// # Safety
    ///
    /// As `kvm_ioctls::VcpuFd::set_xsave2`: `xsave` must hold at least as many bytes as the
    /// VM's `KVM_CAP_XSAVE2` reports.
    ///
    /// # Errors
    ///
    /// [`VcpuError::Refused`] if the guard refuses it, [`VcpuError::Ioctl`] if the kernel does.
    pub unsafe fn set_xsave2(&self, xsave: &Xsave) -> Result<()> {
        let op = VcpuOp::SetXsave;
        self.check(op)?;
        // SAFETY: the caller upholds set_xsave2's contract, documented above.
        unsafe { self.vcpu.set_xsave2(xsave) }.map_err(|source| VcpuError::Ioctl { op, source })
    }

    /// Asks KVM to copy `reg` into `kvm_run` on every exit, if the VM type allows sync regs.
    ///
    /// # Errors
    ///
    /// [`VcpuError::Refused`] on a protected-state type.
    pub fn set_sync_valid_reg(&mut self, reg: SyncReg) -> Result<()> {
        self.check(VcpuOp::SyncRegs)?;
        self.vcpu.set_sync_valid_reg(reg);
        Ok(())
    }

    /// Marks `reg` in `kvm_run` as written by userspace, if the VM type allows sync regs.
    ///
    /// # Errors
    ///
    /// [`VcpuError::Refused`] on a protected-state type.
    pub fn set_sync_dirty_reg(&mut self, reg: SyncReg) -> Result<()> {
        self.check(VcpuOp::SyncRegs)?;
        self.vcpu.set_sync_dirty_reg(reg);
        Ok(())
    }

    /// `KVM_RUN`, after the check KVM makes on the sync-regs fields of `kvm_run` (which the
    /// vCPU's previous owner may have set before wrapping it).
    ///
    /// # Errors
    ///
    /// [`VcpuError::Refused`] for sync-regs fields on a protected-state type,
    /// [`VcpuError::Ioctl`] if `KVM_RUN` fails.
    pub fn run(&mut self) -> Result<VcpuExit<'_>> {
        let guard = self.guard();
        let run = self.vcpu.get_kvm_run();
        guard.check_sync_regs(run.kvm_valid_regs, run.kvm_dirty_regs)?;
        self.vcpu.run().map_err(|source| VcpuError::Ioctl {
            op: VcpuOp::Run,
            source,
        })
    }
}
