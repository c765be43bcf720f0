//! Guest register access through kvm_run's shared sync-regs area (KVM_CAP_SYNC_REGS) with dirty tracking and an ioctl fallback.
//!
//! Nothing is implemented in this crate yet; its issue describes what it will hold.
#![deny(missing_docs)]
