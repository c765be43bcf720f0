//! IA32_FEATURE_CONTROL (MSR 0x3a) with KVM's semantics, applied natively or emulated through MSR filters.
//!
//! Nothing is implemented in this crate yet; its issue describes what it will hold.
#![deny(missing_docs)]
