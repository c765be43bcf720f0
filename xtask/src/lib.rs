//! Project automation for the composable-vmm workspace, run as `cargo xtask <task>`.
//!
//! The main task is a *nested real-KVM test host*. The machines this project is built on
//! expose a `/dev/kvm` backed by `kvm_pvm`, which cannot boot a stock Linux kernel and has
//! neither VMX nor SVM. QEMU's TCG emulator implements AMD SVM, so a Debian cloud kernel
//! booted under TCG with `-cpu EPYC,+svm` can load `kvm-amd`; the workspace's KVM tests then
//! run inside that guest (L1) against a real vendor module.
//!
//! * [`debian`] fetches and caches the L1 kernel package (no registry access once cached);
//! * [`image`], [`payload`] and [`elf`] build the initramfs;
//! * [`init_script`] and [`protocol`] define what L1 runs and how it reports back;
//! * [`qemu`] boots it, and [`l1`] ties the pieces together;
//! * [`nested`] and [`nested_tests`] are the `nested` and `nested-tests` tasks;
//! * [`ci`] is the whole test command CI runs, and [`coverage`] its per-crate coverage gate.
//!
//! ```
//! use xtask::protocol::Marker;
//!
//! // The last console line of L1 carries the exit status out of the VM.
//! assert_eq!(Marker::parse("NESTED-RESULT rc=3"), Some(Marker::Result { rc: 3 }));
//! ```

#![deny(missing_docs)]

use std::path::{Path, PathBuf};

pub mod cargo_tests;
pub mod ci;
pub mod cli;
pub mod command;
pub mod coverage;
pub mod debian;
pub mod demo;
pub mod elf;
pub mod guest;
pub mod image;
pub mod init_script;
pub mod l1;
pub mod minimal_versions;
pub mod nested;
pub mod nested_soak;
pub mod nested_tests;
pub mod payload;
pub mod protocol;
pub mod qemu;
pub mod scratch;
pub mod setup;
pub mod tiny_guest;
pub mod vmlinux;

/// Environment variable that overrides [`cache_dir`].
pub const CACHE_DIR_ENV: &str = "NESTED_CACHE_DIR";

/// The workspace root (the xtask crate is one of its members).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The one cache of the workspace on this machine (the Debian kernel package, the guest
/// initramfs, per-run scratch files), shared by the demo, the tests and CI, and by every
/// clone: `$NESTED_CACHE_DIR` if set; else `/var/cache/composable-vmm` for root and
/// `$XDG_CACHE_HOME/composable-vmm` (or `~/.cache/composable-vmm`) for other users.
pub fn cache_dir() -> PathBuf {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var(CACHE_DIR_ENV) {
        return dir;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/composable-vmm");
    }
    var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|home| home.join(".cache")))
        .unwrap_or_else(|| workspace_root().join(".cache"))
        .join("composable-vmm")
}
