//! The vCPU thread and run loop: exit dispatch to device buses, kick, pause, shutdown and diagnostics.
//!
//! Nothing is implemented in this crate yet; its issue describes what it will hold.
#![deny(missing_docs)]
