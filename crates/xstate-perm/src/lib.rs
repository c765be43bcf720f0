//! Dynamic XSTATE (AMX) guest permission for KVM VMMs, requested in line with KVM's policy,
//! with XSAVE layout and buffer sizing.
//!
//! Since Linux 5.17 a KVM guest can use AMX tile data (XSTATE component 18, 8 KiB per vCPU)
//! only if the VMM process holds a per-process *guest permission* for it, requested before
//! its first vCPU exists and frozen after. This crate:
//!
//! * names XSTATE components and sets of them ([`XFeature`], [`XFeatureSet`]);
//! * queries what the CPU supports, what the process is permitted and what KVM can expose,
//!   behind the [`XstateHost`] trait ([`SystemHost`] is the running kernel);
//! * requests the permission for what KVM supports and nothing else, saying exactly why a
//!   feature cannot be had, and returns a [`GuestPermission`] that vCPU creation takes;
//! * reads the XSAVE layout from CPUID leaf 0xD ([`XsaveLayout`]), checks it against
//!   `KVM_CAP_XSAVE2`, limits a guest's leaf 0xD to the permission, and moves a vCPU's XSAVE
//!   state with a buffer of the right size ([`XsaveState`]);
//! * reports what the granted dynamic features cost per vCPU ([`VcpuCost`]).
//!
//! ```no_run
//! use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
//! use kvm_ioctls::Kvm;
//! use xstate_perm::{GuestPermission, RequestError, SystemHost, XFeature, XsaveLayout, XsaveState};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = Kvm::new()?;
//! let host = SystemHost::new(&kvm);
//! // Before any vCPU exists: ask for AMX, or settle for what this host gives.
//! let permission = match GuestPermission::request_feature(&host, XFeature::XtileData) {
//!     Ok(permission) => permission,
//!     Err(e @ (RequestError::CpuLacks { .. } | RequestError::KvmWillNotExpose { .. })) => {
//!         eprintln!("no AMX for guests: {e}");
//!         GuestPermission::request_kvm_supported(&host)?
//!     }
//!     Err(e) => return Err(e.into()),
//! };
//! let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
//! let layout = XsaveLayout::from_kvm_cpuid(&supported)?;
//! println!("guests get {}, costing {:?} per vCPU", permission.guest_features(), permission.cost(&layout)?);
//!
//! let vm = kvm.create_vm()?;
//! let vcpu = permission.create_vcpu(&vm, 0)?;
//! vcpu.set_cpuid2(&permission.guest_cpuid(&supported)?)?;
//! layout.check_xsave2(vm.check_extension_int(kvm_ioctls::Cap::Xsave2), permission.guest_features())?;
//! let state = XsaveState::get(&vm, &vcpu)?;
//! state.set(&vm, &vcpu)?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![warn(clippy::missing_errors_doc)]
#![cfg(target_arch = "x86_64")]

pub mod cpuid;
pub mod host;
pub mod layout;
pub mod permission;
pub mod state;
pub mod sys;
pub mod xfeature;

pub use cpuid::CpuidError;
pub use host::{RequestPath, SystemHost, XstateHost};
pub use layout::{ComponentLayout, XsaveLayout};
pub use permission::{GuestPermission, RequestError, VcpuCost};
pub use state::{VcpuXstate, XsaveState};
pub use xfeature::{XFeature, XFeatureSet};
