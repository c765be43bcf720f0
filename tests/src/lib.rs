//! Workspace-level tests. The smoke tests of the KVM tiers live in `smoke.rs`; end-to-end
//! tests of the reference VMM will join them once it boots guests.
#![deny(missing_docs)]
