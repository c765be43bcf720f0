//! Dynamic XSTATE (AMX) guest permission for KVM VMMs, requested in line with KVM's policy, with XSAVE layout and buffer sizing.
//!
//! Nothing is implemented in this crate yet; its issue describes what it will hold.
#![deny(missing_docs)]
