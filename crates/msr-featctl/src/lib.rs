//! IA32_FEATURE_CONTROL (MSR 0x3a) with KVM's semantics, applied natively or emulated
//! through MSR filters.
//!
//! Firmware writes IA32_FEATURE_CONTROL before the OS runs, and a nested-VMX guest cannot
//! execute `VMXON` unless "VMX outside SMX" and `LOCKED` are set. A VMM therefore sets the MSR
//! the way firmware would. Only KVM's VMX code holds this MSR: on other KVMs (kvm_amd, PVM)
//! `KVM_SET_MSRS` of it writes nothing. This crate gives the MSR KVM's semantics everywhere:
//!
//! * [`FeatureControl`] and [`GuestCpuidFeatures`]: the value, its named bits, the bits a guest
//!   may write for its CPUID and MCG_CAP, the firmware-style value, and the write rules for host
//!   and guest writes ([`WriteCheck`]).
//! * [`native`]: apply a value with `KVM_SET_MSRS` and verify it with `KVM_GET_MSRS`.
//! * [`emulated`]: MSR filter + user-space MSR exits, and [`EmulatedFeatureControl`], the
//!   per-vCPU state that answers guest `RDMSR`/`WRMSR` exits (injecting #GP where KVM would)
//!   and can be saved and restored.
//! * [`mode`]: pick native, emulated or automatic, and [`probe`] the host for a report.
//!
//! ```no_run
//! use kvm_ioctls::Kvm;
//! use msr_featctl::{emulated, mode, EmulatedFeatureControl, GuestCpuidFeatures, Mode};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = Kvm::new()?;
//! println!("{}", msr_featctl::probe(&kvm)?);
//!
//! let vm = kvm.create_vm()?;
//! let features = GuestCpuidFeatures { vmx: true, ..Default::default() };
//! let resolution = mode::resolve(&kvm, Mode::Automatic, features.firmware_value())?;
//! if resolution.mode == mode::ResolvedMode::Emulated {
//!     emulated::enable_emulation(&vm)?;
//!     let mut feat_ctl = EmulatedFeatureControl::with_firmware_value(features);
//!     let mut vcpu = vm.create_vcpu(0)?;
//!     // ... set up registers and memory, then in the vCPU loop:
//!     let mut exit = vcpu.run()?;
//!     if let Some(answer) = feat_ctl.handle_exit(&mut exit) {
//!         println!("answered a guest access of MSR 0x3a: {answer:?}");
//!     }
//! }
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod emulated;
pub mod feature_control;
pub mod mode;
pub mod native;
pub mod sys;

pub use emulated::{EmulatedFeatureControl, FeatCtlSnapshot, MsrExitAnswer};
pub use feature_control::{FeatureControl, GpReason, GuestCpuidFeatures, WriteCheck};
pub use mode::{probe, FeatCtlReport, Mode, Resolution, ResolvedMode};
pub use native::{apply_native, NativeOutcome};
