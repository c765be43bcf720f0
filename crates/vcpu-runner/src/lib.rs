//! The vCPU thread and run loop: exit dispatch to device buses, kick, pause, shutdown and
//! diagnostics.
//!
//! * [`bus`]: port I/O and MMIO buses keyed by address ranges; devices implement
//!   [`BusDevice`]; overlapping ranges are refused. Unclaimed reads return all ones.
//! * [`mod@dispatch`]: [`dispatch()`], a plain function from a `VcpuExit` to an [`ExitOutcome`],
//!   with MSR exits routed to an [`MsrHandler`] (implemented for msr-featctl's
//!   `EmulatedFeatureControl`).
//! * [`vcpu`]: [`Vcpu`] owns its `VcpuFd` and keeps sync-regs' `RegisterCache` beside it (the
//!   loop stages register writes before `KVM_RUN` and settles the cache after it, so an
//!   [`ExitHook`] gets each exit and its registers together); [`Vcpu::spawn`] moves it onto
//!   its own thread whose run loop has an explicit [`VcpuState`] and takes [`Command`]s
//!   through a [`VcpuHandle`].
//! * [`kick`]: the kick primitive (a blocked real-time signal unblocked only inside
//!   `KVM_RUN` via `KVM_SET_SIGNAL_MASK`), and why it cannot lose a kick.
//! * [`vm`]: [`VmRunner`], one thread per vCPU, a shared [`VmOutcome`] and a bounded join.
//! * [`profile`]: an opt-in exit profile per vCPU (exits by kind and address, counts, handling
//!   time, time to the first `KVM_RUN`).
//! * [`diagnostics`]: register dump, internal-error data and counters for failures and
//!   triple faults.
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use sync_regs::RegisterCache;
//! use vcpu_runner::{BusDevice, Buses, NoMsrs, Vcpu, VmOutcome, VmRunner};
//! use vm_types::VmType;
//!
//! /// A port that prints what the guest writes to it.
//! struct DebugPort;
//! impl BusDevice for DebugPort {
//!     fn read(&mut self, _offset: u64, data: &mut [u8]) {
//!         data.fill(0);
//!     }
//!     fn write(&mut self, _offset: u64, data: &[u8]) {
//!         println!("guest wrote {data:02x?}");
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! // ... guest memory and registers ...
//! let mut buses = Buses::new();
//! buses.pio.insert(0x80, 1, Arc::new(Mutex::new(DebugPort)))?;
//! let buses = Arc::new(buses);
//! let registers = RegisterCache::new(&vm, VmType::Default);
//! let vcpu = Vcpu::new(0, vm.create_vcpu(0)?, registers, buses.clone(), Box::new(NoMsrs));
//!
//! let runner = VmRunner::spawn(vec![vcpu])?;
//! runner.start()?;
//! runner.wait(Duration::from_secs(10));
//! match runner.shutdown(Duration::from_secs(1))? {
//!     VmOutcome::Error { vcpu, error } => eprintln!("vCPU {vcpu}: {error}"), // with registers
//!     VmOutcome::TripleFault { vcpu, diagnostics } => eprintln!("vCPU {vcpu}: {diagnostics:?}"),
//!     outcome => println!("{outcome}"),
//! }
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![warn(clippy::missing_errors_doc)]

pub mod bus;
pub mod diagnostics;
pub mod dispatch;
pub mod kick;
pub mod profile;
pub mod sys;
pub mod vcpu;
pub mod vm;

pub use bus::{AddressSpace, Bus, BusDevice, BusRange, Buses, SharedDevice};
pub use diagnostics::{Diagnostics, InternalErrorInfo};
pub use dispatch::{
    dispatch, ExitOutcome, ExitRecord, ExitStats, GeneralProtection, MsrHandler, NoMsrs,
    SystemEvent, UnhandledExit,
};
pub use vcpu::{
    Command, ExitHook, StopReason, Vcpu, VcpuContext, VcpuHandle, VcpuState, VcpuThread,
};
pub use vm::{VmOutcome, VmRunner};

/// The crate README, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
