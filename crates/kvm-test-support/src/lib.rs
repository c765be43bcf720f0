//! Shared support for tests that need `/dev/kvm`.
//!
//! Every KVM test in this workspace goes through this crate, so that the three test tiers
//! behave the same way everywhere:
//!
//! * [`harness`] runs a list of [`KvmTest`]s under a [`libtest_mimic`] harness. A test
//!   declares the host features it needs ([`Requirement`]); where the host lacks one, the test
//!   is reported as *ignored* with the reason, never as passed. With `REQUIRE_KVM=1` a missing
//!   or unusable `/dev/kvm` is a failure instead of a skip (CI sets it).
//! * [`guest`] is a tiny-guest kit: guest memory, a vCPU in real mode or in 64-bit long mode
//!   with identity-mapped page tables built in guest memory, machine code loaded at a known
//!   address, and running to an owned, comparable [`GuestExit`].
//!
//! ```no_run
//! use kvm_test_support::{guest::TinyGuest, harness, GuestExit, KvmTest};
//!
//! fn out_then_hlt(kvm: &kvm_ioctls::Kvm) -> harness::TestResult {
//!     // mov al, 0x42 ; out 0x80, al ; hlt
//!     let mut guest = TinyGuest::real_mode(kvm, &[0xb0, 0x42, 0xe6, 0x80, 0xf4])?;
//!     guest.expect_exit(GuestExit::IoOut { port: 0x80, data: vec![0x42] })?;
//!     guest.expect_exit(GuestExit::Hlt)?;
//!     Ok(())
//! }
//!
//! harness::main(vec![KvmTest::new("out_then_hlt", out_then_hlt)]);
//! ```
#![deny(missing_docs)]

pub mod guest;
pub mod harness;

pub use guest::{GuestExit, Mode, TinyGuest};
pub use harness::{KvmTest, Requirement, TestError, TestResult};
