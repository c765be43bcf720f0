//! KVM VM types (default, SW-protected, SEV, SEV-ES, SNP, TDX): host support, properties, and a guard against guest-state access on protected VMs.
//!
//! Nothing is implemented in this crate yet; its issue describes what it will hold.
#![deny(missing_docs)]
