//! Guest register access through `kvm_run`'s shared sync-regs area (`KVM_CAP_SYNC_REGS`),
//! with dirty tracking and a per-set ioctl fallback.
//!
//! `KVM_CAP_SYNC_REGS` (x86 since Linux 4.16) lets KVM copy a vCPU's regs, sregs and events
//! into `kvm_run` on every return from `KVM_RUN`, for the sets userspace selects in
//! `kvm_valid_regs`, and apply the sets marked in `kvm_dirty_regs` on the next entry. It
//! saves the `KVM_GET_*`/`KVM_SET_*` ioctls of exit handlers that read or change guest state
//! (instruction emulation, hypercalls, debugging), but the raw interface is easy to misuse:
//! a write whose dirty bit is forgotten is silently lost, the kernel overwrites the selected
//! sets on every exit, and an invalid image fails the next `KVM_RUN` with `EINVAL`.
//!
//! [`RegisterCache`] adds the cache and its rules, not ownership: the run loop keeps the
//! `VcpuFd` and lends it to the cache. Before `KVM_RUN` the loop calls
//! [`RegisterCache::stage`] (pending writes go out in the kernel's order: by ioctl where they
//! must, through `kvm_run` otherwise); after it, [`RegisterCache::finish`] (a write counts as
//! applied only once the kernel has cleared its `kvm_dirty_regs` bit; the selected sets are
//! then read from `kvm_run`). In between, exit handlers read and write registers next to the
//! exit they handle. [`RegisterCache::run`] does the three steps around one `KVM_RUN`.
//! [`RegisterDump`] formats a snapshot for diagnostics.
//!
//! ```no_run
//! use kvm_ioctls::{Kvm, VcpuExit};
//! use sync_regs::{RegSet, RegisterCache};
//! use vm_types::VmType;
//!
//! /// What the loop keeps of an exit once the vCPU is free again.
//! enum Exit {
//!     Out(u16),
//!     Halt,
//!     Other(String),
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! let mut vcpu = vm.create_vcpu(0)?; // the loop owns the vCPU
//! // (guest memory and the initial vCPU state are set up here)
//! let mut regs = RegisterCache::new(&vm, VmType::Default);
//! regs.set_selection(RegSet::REGS)?;
//! loop {
//!     let exit = regs.run(&mut vcpu, |exit| match exit {
//!         VcpuExit::IoOut(port, _) => Exit::Out(port),
//!         VcpuExit::Hlt => Exit::Halt,
//!         other => Exit::Other(format!("{other:?}")),
//!     })?;
//!     // The exit and the registers together: RIP and RAX from the kvm_run copy.
//!     match exit {
//!         Exit::Out(port) => {
//!             let r = regs.regs_mut(&vcpu)?;
//!             println!("out to {port:#x} at rip {:#x}", r.rip);
//!             r.rax += 1; // applied by the kernel on the next KVM_RUN, no KVM_SET_REGS
//!         }
//!         Exit::Halt => break,
//!         Exit::Other(what) => return Err(format!("{what}\n{}", regs.dump(&vcpu)?).into()),
//!     }
//! }
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![warn(clippy::missing_errors_doc)]

pub mod dump;
pub mod reg_set;
pub mod registers;
pub mod sys;

pub use dump::RegisterDump;
pub use reg_set::{RegKind, RegSet, UnknownBits};
pub use registers::{Error, RegisterCache, Registers, Result};

/// The crate README, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
