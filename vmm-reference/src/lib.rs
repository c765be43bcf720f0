//! A reference VMM built from the workspace crates: it boots a Linux bzImage (or an ELF
//! vmlinux through PVH) with an initramfs and a 16550 serial console on KVM.
//!
//! The binary (`main.rs`) only parses the command line; everything it does lives here:
//! [`config`] (flags and JSON, validated before KVM is touched), [`boot`] (loading with
//! linux-loader; [`acpi`], [`mptable`], [`regs`], [`memory`]), [`cpuid`], [`devices`],
//! [`vmm`] (building the VM from vm-types, xstate-perm, msr-featctl and running it with
//! vcpu-runner; each thread confined by its own [`seccomp`] filter while the guest runs) and
//! [`probe`].
//!
//! ```no_run
//! use vmm_reference::config::{Overrides, VmConfig};
//! use vmm_reference::vmm::Vmm;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = VmConfig::from_file_and_flags(
//!     None,
//!     Overrides {
//!         kernel: Some("bzImage".into()),
//!         initramfs: Some("initramfs.cpio".into()),
//!         vcpus: Some(2),
//!         ..Default::default()
//!     },
//! )?
//! .validate()?;
//! let vmm = Vmm::build(&config, Box::new(std::io::stdout()))?;
//! let outcome = vmm.run()?;
//! println!("{outcome}");
//! std::process::exit(outcome.exit_code());
//! # }
//! ```
#![deny(missing_docs)]
#![cfg(target_arch = "x86_64")]

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod host;
pub mod kernel_image;
pub mod memory;
pub mod mptable;
pub mod probe;
pub mod profile;
pub mod regs;
pub mod seccomp;
pub mod sys;
pub mod terminal;
pub mod vmm;
