//! Fuzz targets for every parser of bytes a guest or a user controls in this workspace, one
//! function per target taking the raw fuzz input. A target panics only where a promise of
//! the code under test breaks; errors the code reports for bad input are expected.
//!
//! The same functions run under libFuzzer (`cargo-fuzz/`, nightly) and over the committed
//! corpus on stable (`tests/replay.rs`); see the README for the commands.
//!
//! ```
//! // A bzImage header with nothing behind it: refused, no crash.
//! let mut header = vec![0u8; 0x240];
//! header[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
//! header[0x202..0x206].copy_from_slice(b"HdrS");
//! vmm_fuzz::kernel_image(&header);
//! vmm_fuzz::config(br#"{"kernel": "/k", "vcpus": 0}"#);
//! ```
#![deny(missing_docs)]
#![cfg(target_arch = "x86_64")]

mod config;
mod devices;
mod exit_dispatch;
pub mod guest_boot;
pub mod images;
mod initramfs;
pub mod input;
mod kernel;
mod msr_filter;
pub mod platform;
mod xsave;

pub use config::config;
pub use devices::devices;
pub use exit_dispatch::exit_dispatch;
pub use initramfs::initramfs;
pub use kernel::kernel_image;
pub use msr_filter::msr_filter;
pub use xsave::xsave_layout;

/// A fuzz target: one run on one input.
pub type Target = fn(&[u8]);

/// Every target by the name of its corpus directory and its `cargo fuzz` target.
pub const TARGETS: [(&str, Target); 7] = [
    ("kernel_image", kernel_image),
    ("config", config),
    ("initramfs", initramfs),
    ("xsave_layout", xsave_layout),
    ("msr_filter", msr_filter),
    ("devices", devices),
    ("exit_dispatch", exit_dispatch),
];
