//! Dynamic XSTATE (AMX) guest permission for KVM VMMs, requested in line with KVM's policy,
//! with XSAVE layout, buffer sizing and a vCPU's extended state.
//!
//! Since Linux 5.17 a KVM guest can use AMX tile data (XSTATE component 18, 8 KiB per vCPU)
//! only if the VMM process holds a per-process *guest permission* for it, requested before
//! its first vCPU exists and frozen after. This crate:
//!
//! * names XSTATE components and sets of them ([`XFeature`], [`XFeatureSet`]);
//! * queries what the CPU supports, what the process is permitted and what KVM can expose,
//!   behind the [`XstateHost`] trait ([`SystemHost`] is the running kernel);
//! * requests the permission a guest CPUID needs ([`GuestPermission::request_for_cpuid`],
//!   the recommended door) or a set of features ([`GuestPermission::request`]), for what KVM
//!   supports and nothing else, saying exactly why a feature cannot be had, and returns a
//!   [`GuestPermission`] that vCPU creation takes as proof;
//! * checks a CPUID table against the permission before `KVM_SET_CPUID2`
//!   ([`GuestPermission::check_cpuid`]) and clears what it must not advertise ([`cpuid`]);
//! * reads the XSAVE layout from CPUID leaf 0xD ([`XsaveLayout`]), checks it against
//!   `KVM_CAP_XSAVE2`, and saves and restores a vCPU's extended state — XSAVE image, XCRs,
//!   `IA32_XFD`, `IA32_XFD_ERR` — as one serializable value ([`VcpuXstate`]);
//! * reports what the granted dynamic features cost per vCPU ([`VcpuCost`]).
//!
//! The pure parts need no KVM:
//!
//! ```
//! use xstate_perm::{XFeature, XFeatureSet};
//!
//! let supported = XFeatureSet::from_bits(0x602e7);
//! assert_eq!(supported.to_string(), "x87|sse|avx|opmask|zmm_hi256|hi16_zmm|pkru|xtilecfg|xtiledata");
//! assert!(supported.contains_all(XFeatureSet::AMX));
//! assert_eq!(supported.intersection(XFeatureSet::DYNAMIC), XFeature::XtileData.into());
//! ```
//!
//! In a VMM, before the first vCPU of the process (see the README and
//! `examples/cpuid_first.rs` for the whole sequence):
//!
//! ```no_run
//! use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
//! use kvm_ioctls::Kvm;
//! use xstate_perm::{GuestPermission, SystemHost, VcpuXstate};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = Kvm::new()?;
//! let host = SystemHost::new(&kvm);
//! let intended = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?; // the guest's CPUID
//! let permission = GuestPermission::request_for_cpuid(&host, &intended)?;
//! let cpuid = permission.guest_cpuid(&intended)?;
//! permission.check_cpuid(&cpuid)?;
//!
//! let vm = kvm.create_vm()?;
//! let vcpu = permission.create_vcpu(&vm, 0)?;
//! vcpu.set_cpuid2(&cpuid)?;
//! let state = VcpuXstate::save(&vm, &vcpu)?;
//! state.restore(&permission, &vm, &vcpu)?;
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

/// The crate README, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
