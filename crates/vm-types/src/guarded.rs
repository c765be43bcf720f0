//! A vCPU wrapper that consults a [`GuestStateGuard`] before every guest-state ioctl.
//!
//! [`GuardedVcpu`] owns a `kvm_ioctls::VcpuFd` and offers the register ioctls of KVM's
//! protected-state rule, plus `KVM_RUN` and the sync-regs switches. A refused call never
//! reaches the kernel and comes back as [`VcpuError::Refused`], naming the operation and the
//! VM type. The guard must be for the type the VM was created with ([`crate::create_vm`]);
//! KVM offers no ioctl to read a VM's type back, so the wrapper cannot check that itself.

use kvm_bindings::{kvm_debugregs, kvm_fpu, kvm_regs, kvm_sregs, kvm_xcrs, kvm_xsave};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use thiserror::Error;

use crate::guard::{GuestStateError, GuestStateGuard, VcpuOp};

/// Errors of guarded vCPU operations.
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
}

/// Result of this module's operations.
pub type Result<T> = std::result::Result<T, VcpuError>;

/// A vCPU whose guest-state ioctls go through a [`GuestStateGuard`] first.
#[derive(Debug)]
pub struct GuardedVcpu {
    vcpu: VcpuFd,
    guard: GuestStateGuard,
}

macro_rules! guarded_get {
    ($(#[$doc:meta])* $name:ident, $op:expr, $ty:ty) => {
        $(#[$doc])*
        pub fn $name(&self) -> Result<$ty> {
            self.guard.check($op)?;
            self.vcpu
                .$name()
                .map_err(|source| VcpuError::Ioctl { op: $op, source })
        }
    };
}

macro_rules! guarded_set {
    ($(#[$doc:meta])* $name:ident, $op:expr, $ty:ty) => {
        $(#[$doc])*
        pub fn $name(&self, value: &$ty) -> Result<()> {
            self.guard.check($op)?;
            self.vcpu
                .$name(value)
                .map_err(|source| VcpuError::Ioctl { op: $op, source })
        }
    };
}

impl GuardedVcpu {
    /// Wraps `vcpu`, whose VM has the type `guard` is for.
    pub fn new(vcpu: VcpuFd, guard: GuestStateGuard) -> Self {
        GuardedVcpu { vcpu, guard }
    }

    /// The guard.
    pub fn guard(&self) -> &GuestStateGuard {
        &self.guard
    }

    /// Records that the vCPU's state has passed its protection point (after
    /// `KVM_SEV_LAUNCH_UPDATE_VMSA` or `KVM_SEV_SNP_LAUNCH_FINISH`).
    pub fn protect_state(&mut self) {
        self.guard.protect();
    }

    /// The vCPU, for operations outside the guard's rule.
    pub fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    /// Gives the vCPU back.
    pub fn into_inner(self) -> VcpuFd {
        self.vcpu
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
        /// `KVM_GET_XSAVE`, if the guard allows it.
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

    /// Asks KVM to copy `reg` into `kvm_run` on every exit, if the VM type allows sync regs.
    pub fn set_sync_valid_reg(&mut self, reg: SyncReg) -> Result<()> {
        self.guard.check(VcpuOp::SyncRegs)?;
        self.vcpu.set_sync_valid_reg(reg);
        Ok(())
    }

    /// Marks `reg` in `kvm_run` as written by userspace, if the VM type allows sync regs.
    pub fn set_sync_dirty_reg(&mut self, reg: SyncReg) -> Result<()> {
        self.guard.check(VcpuOp::SyncRegs)?;
        self.vcpu.set_sync_dirty_reg(reg);
        Ok(())
    }

    /// `KVM_RUN`, after the check KVM makes on the sync-regs fields of `kvm_run` (which the
    /// caller may have set through [`GuardedVcpu::vcpu`]'s owner before wrapping it).
    pub fn run(&mut self) -> Result<VcpuExit<'_>> {
        let run = self.vcpu.get_kvm_run();
        self.guard
            .check_sync_regs(run.kvm_valid_regs, run.kvm_dirty_regs)?;
        self.vcpu.run().map_err(|source| VcpuError::Ioctl {
            op: VcpuOp::Run,
            source,
        })
    }
}
