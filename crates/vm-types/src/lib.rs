//! KVM VM types (default, SW-protected, SEV, SEV-ES, SNP, TDX): host support, properties, and
//! a guard against guest-state access on protected VMs.
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
