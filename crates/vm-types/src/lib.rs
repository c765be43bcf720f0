//! KVM VM types (default, SW-protected, SEV, SEV-ES, SNP, TDX): host support, properties, a VM
//! handle that carries its type, and a guard against guest-state access on protected VMs.
//!
//! Linux 6.8 made the x86 `KVM_CREATE_VM` argument an enumerated VM type and added
//! `KVM_CAP_VM_TYPES`, a bitmask of the types the host accepts. `kvm-ioctls` can create a VM
//! of a raw type but says nothing about what a type implies. This crate adds:
//!
//! * [`VmType`]: the six x86 types, their raw values, and the properties KVM derives from them
//!   (private memory, protected guest state, sync regs, read-only memslots, launch flow), each
//!   documented with the kernel code and release it mirrors.
//! * [`supported_vm_types`] → [`VmTypeSet`], and [`create_vm`] / [`create_vm_raw`], which
//!   refuse a type the host does not report with an error naming the type and the supported
//!   set, instead of the kernel's bare `EINVAL`.
//! * [`TypedVm`]: a VM handle that keeps its type and launch state, and creates
//!   [`GuardedVcpu`]s that follow both.
//! * [`GuestStateGuard`]: the checks with which KVM refuses vCPU ioctls on SEV-ES, SNP and
//!   TDX VMs ([`KernelRule`], each named after the kernel function it models), applied before
//!   the kernel is asked. Its protection point is the launch step: register setup before it
//!   works, access after it is refused.
//! * [`sev_vmsa_features`]: the VMSA SEV features KVM supports, and [`probe()`]: a printable
//!   report of the host's types, their properties and those features.
//!
//! The guard is plain data and runs anywhere:
//!
//! ```
//! use vm_types::{GuestStateGuard, KernelRule, VcpuOp, VmType};
//!
//! // An SEV-ES vCPU: its registers are set up before KVM_SEV_LAUNCH_UPDATE_VMSA...
//! let mut guard = GuestStateGuard::before_launch(VmType::SevEs);
//! assert!(guard.check(VcpuOp::SetRegs).is_ok());
//! assert!(guard.check(VcpuOp::SetGuestDebug).is_ok());
//! // ...and refused after it, as KVM refuses them.
//! guard.mark_launched();
//! let refusal = guard.check(VcpuOp::SetRegs).unwrap_err();
//! assert_eq!(refusal.rule(), KernelRule::GuestStateProtected);
//! assert!(guard.check(VcpuOp::SetGuestDebug).is_err());
//! // Sync regs are refused on every protected-state type, launched or not.
//! assert!(GuestStateGuard::before_launch(VmType::Snp).check(VcpuOp::SyncRegs).is_err());
//! ```
//!
//! With `/dev/kvm`, the VM handle carries the type and guards its vCPUs:
//!
//! ```no_run
//! use kvm_ioctls::Kvm;
//! use vm_types::{TypedVm, VmType};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = Kvm::new()?;
//! println!("{}", vm_types::probe(&kvm));
//! let vm = TypedVm::create(&kvm, VmType::Default)?;
//! let host = xstate_perm::SystemHost::new(&kvm);
//! let permission =
//!     xstate_perm::GuestPermission::request(&host, xstate_perm::XFeatureSet::LEGACY)?;
//! let vcpu = vm.guard_vcpu(permission.create_vcpu(vm.fd(), 0)?); // created through the proof
//! let regs = vcpu.get_regs()?;
//! vcpu.set_regs(&regs)?;
//! vm.mark_launched(); // after the type's launch command; a no-op for DEFAULT
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![warn(clippy::missing_errors_doc)]

pub mod guard;
pub mod guarded;
pub mod host;
pub mod probe;
pub mod sys;
pub mod typed;
pub mod vm_type;
pub mod vmsa;

pub use guard::{
    sev_es_passthrough_msr, GuestStateError, GuestStateGuard, KernelRule, LaunchPhase,
    ProtectionConfig, ProtectionPoint, VcpuOp, VcpuProtection,
};
pub use guarded::{GuardedVcpu, VcpuError};
pub use host::{create_vm, create_vm_raw, supported_vm_types, VmTypeSet};
pub use probe::{probe, ObservedVmCaps, VmTypeEntry, VmTypeReport};
pub use typed::{LaunchState, TypedVm};
pub use vm_type::{LaunchFlow, LinuxVersion, UnknownVmType, VmType};
pub use vmsa::{sev_vmsa_features, VmsaFeatures, VmsaFeaturesQuery};

/// The crate README, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
