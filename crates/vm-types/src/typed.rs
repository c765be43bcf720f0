//! A VM handle that carries its type, and the launch state its vCPUs share.
//!
//! KVM has no ioctl that reads a VM's type back, so whatever guards a vCPU has to be told the
//! type. [`TypedVm`] is created with the type (or told it once, [`TypedVm::assume_type`]) and
//! creates vCPUs that are guarded by construction: each [`GuardedVcpu`] gets the VM's type,
//! [`ProtectionConfig`] and a [`LaunchState`] shared with the VM, so one
//! [`TypedVm::mark_launched`] after the launch command moves every vCPU's guard from
//! "setup allowed" to "protected state refused".

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::guard::{GuestStateGuard, LaunchPhase, ProtectionConfig};
use crate::guarded::GuardedVcpu;
use crate::host;
use crate::VmType;

/// Whether a VM has passed its launch step, shared between a [`TypedVm`] and its vCPUs.
///
/// Clones share the state. The launch is one-way: there is no way back, as in KVM.
///
/// ```
/// use vm_types::{LaunchPhase, LaunchState};
///
/// let vm_side = LaunchState::before_launch();
/// let vcpu_side = vm_side.clone();
/// vm_side.mark_launched();
/// assert_eq!(vcpu_side.phase(), LaunchPhase::Launched);
/// ```
#[derive(Debug, Clone, Default)]
pub struct LaunchState(Arc<AtomicBool>);

impl LaunchState {
    /// A state before launch.
    pub fn before_launch() -> Self {
        LaunchState::default()
    }

    /// A state already past launch.
    pub fn launched() -> Self {
        LaunchState(Arc::new(AtomicBool::new(true)))
    }

    /// Records that the launch step has completed.
    pub fn mark_launched(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// The current phase.
    pub fn phase(&self) -> LaunchPhase {
        if self.0.load(Ordering::Acquire) {
            LaunchPhase::Launched
        } else {
            LaunchPhase::BeforeLaunch
        }
    }
}

/// A VM file descriptor with the type it was created with.
///
/// It lends the `VmFd` for everything that is not vCPU state ([`TypedVm::fd`]: memory slots,
/// irqchip, launch commands through `KVM_MEMORY_ENCRYPT_OP`), and guards the vCPUs created
/// ([`TypedVm::guard_vcpu`]).
#[derive(Debug)]
pub struct TypedVm {
    fd: VmFd,
    vm_type: VmType,
    config: ProtectionConfig,
    launch: LaunchState,
}

impl TypedVm {
    /// Creates a VM of type `ty` ([`crate::create_vm`]), before its launch, with the default
    /// [`ProtectionConfig`].
    ///
    /// # Errors
    ///
    /// [`host::Error`] as [`crate::create_vm`]: the host does not report the type, or
    /// `KVM_CREATE_VM` failed.
    pub fn create(kvm: &Kvm, ty: VmType) -> host::Result<Self> {
        TypedVm::create_with(kvm, ty, ProtectionConfig::DEFAULT)
    }

    /// [`TypedVm::create`] with the per-VM choices the VMM will make before creating vCPUs
    /// (TDX DEBUG attribute, SNP Secure TSC) and the guest CPUID facts of `config`.
    ///
    /// # Errors
    ///
    /// As [`TypedVm::create`].
    pub fn create_with(kvm: &Kvm, ty: VmType, config: ProtectionConfig) -> host::Result<Self> {
        let fd = host::create_vm(kvm, ty)?;
        Ok(TypedVm::assume_type(fd, ty).with_config(config))
    }

    /// Wraps an existing VM that the caller created with type `ty`, before its launch.
    ///
    /// KVM cannot be asked for a VM's type, so this trusts the caller; a wrong type makes the
    /// guard refuse what KVM would accept or let through what KVM refuses.
    pub fn assume_type(fd: VmFd, ty: VmType) -> Self {
        TypedVm {
            fd,
            vm_type: ty,
            config: ProtectionConfig::DEFAULT,
            launch: LaunchState::before_launch(),
        }
    }

    fn with_config(self, config: ProtectionConfig) -> Self {
        TypedVm { config, ..self }
    }

    /// The VM's type.
    pub fn vm_type(&self) -> VmType {
        self.vm_type
    }

    /// The per-VM protection choices.
    pub fn config(&self) -> ProtectionConfig {
        self.config
    }

    /// The VM file descriptor, lent for VM-level ioctls.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The launch state shared with the VM's guarded vCPUs, for other components that guard
    /// vCPU state of this VM (a register cache, a run loop).
    pub fn launch_state(&self) -> LaunchState {
        self.launch.clone()
    }

    /// The guard for this VM's vCPUs as of now.
    pub fn guard(&self) -> GuestStateGuard {
        GuestStateGuard::at(self.vm_type, self.launch.phase(), self.config)
    }

    /// Records that the launch step completed (`KVM_SEV_LAUNCH_UPDATE_VMSA` for SEV-ES,
    /// `KVM_SEV_SNP_LAUNCH_FINISH` for SNP, `KVM_TDX_FINALIZE_VM` for TDX): from now on every
    /// vCPU created by this VM refuses what KVM refuses after launch.
    pub fn mark_launched(&self) {
        self.launch.mark_launched();
    }

    /// Whether [`TypedVm::mark_launched`] was called.
    pub fn is_launched(&self) -> bool {
        self.launch.phase() == LaunchPhase::Launched
    }

    /// Guards a vCPU of this VM, following this VM's type and launch state. The handle does
    /// not create vCPUs itself: creating the first vCPU freezes the process's XSTATE guest
    /// permission, so vCPUs come from whatever settled it (xstate-perm's
    /// `GuestPermission::create_vcpu(vm.fd(), id)`, or the VMM's own set-up) and are guarded
    /// here.
    pub fn guard_vcpu(&self, vcpu: VcpuFd) -> GuardedVcpu {
        GuardedVcpu::with_launch_state(vcpu, self.vm_type, self.config, self.launch.clone())
    }

    /// Gives the VM file descriptor back.
    pub fn into_inner(self) -> VmFd {
        self.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_state_is_shared_and_one_way() {
        let a = LaunchState::before_launch();
        let b = a.clone();
        assert_eq!(b.phase(), LaunchPhase::BeforeLaunch);
        a.mark_launched();
        assert_eq!(b.phase(), LaunchPhase::Launched);
        a.mark_launched();
        assert_eq!(a.phase(), LaunchPhase::Launched);
        assert_eq!(LaunchState::launched().phase(), LaunchPhase::Launched);
        assert_eq!(LaunchState::default().phase(), LaunchPhase::BeforeLaunch);
    }
}
