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
//! [`VcpuRegisters`] owns the vCPU and hides all of that: reads are cached per exit, writes
//! mark their set dirty, dirty sets are flushed before `KVM_RUN` and kept dirty until the
//! kernel reports them applied, sets the capability does not offer (or a protected-state VM
//! type, where KVM refuses sync regs) go through ioctls, and the copy-out selection can
//! change between runs. [`RegisterDump`] formats a snapshot for diagnostics.
//!
//! ```no_run
//! use kvm_ioctls::{Kvm, VcpuExit};
//! use sync_regs::{RegSet, VcpuRegisters};
//! use vm_types::VmType;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! let vcpu = vm.create_vcpu(0)?;
//! // (guest memory and the initial vCPU state are set up here)
//! let mut regs = VcpuRegisters::new(&vm, vcpu, VmType::Default);
//! regs.set_selection(RegSet::REGS)?;
//! loop {
//!     let port = match regs.run()? {
//!         VcpuExit::IoOut(port, _) => port,
//!         VcpuExit::Hlt => break,
//!         other => panic!("unexpected exit {other:?}"),
//!     };
//!     // An emulator-style handler: read RIP and RAX from the kvm_run copy, write RAX.
//!     let r = regs.regs_mut()?;
//!     println!("out to {port:#x} at rip {:#x}", r.rip);
//!     r.rax += 1; // applied by the kernel on the next KVM_RUN, without KVM_SET_REGS
//! }
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod dump;
pub mod reg_set;
pub mod registers;
pub mod sys;

pub use dump::RegisterDump;
pub use reg_set::{RegKind, RegSet, UnknownBits};
pub use registers::{Error, HandOffError, Result, VcpuRegisters};
