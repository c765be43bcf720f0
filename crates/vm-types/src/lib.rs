//! KVM VM types (default, SW-protected, SEV, SEV-ES, SNP, TDX): host support, properties, and
//! a guard against guest-state access on protected VMs.
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
//! * [`VcpuOp`] and [`GuestStateGuard`]: KVM's rule that vCPU register ioctls and sync regs
//!   fail with `EINVAL` on VMs with protected guest state, applied before the kernel is asked;
//!   [`GuardedVcpu`] wraps a vCPU with it.
//! * [`probe()`]: a printable report of the host's types and their properties.
//!
//! ```no_run
//! use kvm_ioctls::Kvm;
//! use vm_types::{create_vm, GuestStateGuard, VcpuOp, VmType};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = Kvm::new()?;
//! println!("{}", vm_types::probe(&kvm));
//!
//! // An unsupported type fails with a message such as
//! // "KVM_CREATE_VM: VM type SEV_ES (3) is not supported by this host, which supports
//! //  {DEFAULT} (KVM_CAP_VM_TYPES = 0x1)".
//! let ty = VmType::SevEs;
//! match create_vm(&kvm, ty) {
//!     Ok(_vm) => println!("{ty} VM created"),
//!     Err(e) => println!("{e}"),
//! }
//!
//! // The guard a sync-regs user consults before enabling sync regs:
//! let guard = GuestStateGuard::new(ty);
//! if let Err(refusal) = guard.check(VcpuOp::SyncRegs) {
//!     println!("{refusal}");
//! }
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod guard;
pub mod guarded;
pub mod host;
pub mod probe;
pub mod sys;
pub mod vm_type;

pub use guard::{
    GuestStateAccess, GuestStateError, GuestStateGuard, ProtectionPoint, StatePhase, VcpuOp,
};
pub use guarded::{GuardedVcpu, VcpuError};
pub use host::{create_vm, create_vm_raw, supported_vm_types, VmTypeSet};
pub use probe::{probe, ObservedVmCaps, VmTypeEntry, VmTypeReport};
pub use vm_type::{LaunchFlow, LinuxVersion, UnknownVmType, VmType};
