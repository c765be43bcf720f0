//! IA32_FEATURE_CONTROL (MSR 0x3a) with KVM's semantics — natively where KVM holds the MSR,
//! emulated through MSR filters where it does not — plus KVM's MSR exit and filter controls
//! and the feature MSRs a VMM may choose for its vCPU model.
//!
//! Firmware writes IA32_FEATURE_CONTROL before the OS runs, and a nested-VMX guest cannot
//! execute `VMXON` unless "VMX outside SMX" and `LOCKED` are set. A VMM therefore sets the MSR
//! the way firmware would:
//!
//! * on **kvm_intel**, KVM keeps its own copy and checks it on `VMXON`, so the value must go
//!   through `KVM_SET_MSRS` ([`native`]), after the vCPU's CPUID is set
//!   ([`native::ConfiguredVcpu`]);
//! * on **kvm_amd and kvm_pvm**, KVM has no such MSR, so the VMM answers guest accesses itself
//!   ([`emulated`]).
//!
//! [`mode::resolve`] decides between the two from a probe run in a child process
//! ([`mode::probe_msr`]), and never emulates where KVM holds the MSR.
//!
//! * [`FeatureControl`], [`GuestCpuidFeatures`], [`KvmSupport`]: the value, its named bits,
//!   the bits a guest may write for what KVM really exposes, the firmware-style value, and the
//!   write rules ([`WriteCheck`] for guest writes, [`HostWriteError`] for host writes).
//! * [`emulated`]: user-space MSR exits for any combination of reasons, [`emulated::MsrFilter`]
//!   checked against KVM's rules before the ioctl, and [`EmulatedFeatureControl`].
//! * [`feature_msrs`]: the feature-MSR list and host values, applying them to vCPUs before
//!   their first run, and a VMX capability builder that only narrows.
//!
//! ```
//! use msr_featctl::{EmulatedFeatureControl, FeatureControl, GuestCpuidFeatures, WriteCheck};
//!
//! // The per-vCPU state the emulated path keeps, answering guest accesses as kvm_intel would.
//! let features = GuestCpuidFeatures { vmx: true, ..Default::default() };
//! let mut feat_ctl = EmulatedFeatureControl::with_firmware_value(features);
//! assert_eq!(feat_ctl.handle_rdmsr(), 0x5); // LOCKED | VMX outside SMX
//! assert!(matches!(feat_ctl.handle_wrmsr(0x1), WriteCheck::GeneralProtection(_))); // locked
//! assert_eq!(feat_ctl.value(), FeatureControl::LOCKED | FeatureControl::VMX_OUTSIDE_SMX);
//! ```
//!
//! The KVM side, in the order it must happen, is in `examples/vmm_msr_filter.rs`.
#![deny(missing_docs)]
#![warn(clippy::missing_errors_doc)]

pub mod emulated;
pub mod feature_control;
pub mod feature_msrs;
pub mod mode;
mod msr_io;
pub mod native;
pub mod sys;

#[cfg(test)]
mod fake_kernel;

pub use emulated::{EmulatedFeatureControl, FeatCtlSnapshot, MsrExitAnswer};
pub use feature_control::{
    Exposure, FeatureControl, GpReason, GuestCpuidFeatures, HostWriteError, KvmSupport, WriteCheck,
};
pub use mode::{probe, FeatCtlReport, Mode, ProbeVerdict, Resolution, ResolvedMode};
pub use native::{apply_firmware_value, apply_native, ConfiguredVcpu, HostWriteRefusal};

/// The crate README, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
