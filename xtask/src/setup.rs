//! What the machine needs for the nested test host, the demo and CI, in one place:
//! `cargo xtask setup` installs it, `cargo xtask demo` checks it before building anything, and
//! `.ci/run` calls `setup`.
//!
//! Debian packages only. As root a missing package is installed with `apt-get`; otherwise the
//! task stops and prints the one command that installs everything missing.

use std::path::Path;
use std::process::Command;

use crate::command::{self, is_available};

/// A tool and the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// A program on `PATH`, or an absolute path of a file.
    pub provides: &'static str,
    /// The Debian package.
    pub package: &'static str,
    /// What it is for.
    pub why: &'static str,
}

/// Everything the nested test host and the demo need besides the Rust toolchain.
pub const NEEDS: [Need; 4] = [
    Need {
        provides: "qemu-system-x86_64",
        package: "qemu-system-x86",
        why: "boots the nested kvm-amd test host",
    },
    Need {
        provides: "/bin/busybox",
        package: "busybox-static",
        why: "the shell and tools of the test host and the default guest",
    },
    Need {
        provides: "strip",
        package: "binutils",
        why: "strips debug info from binaries copied into the test host",
    },
    Need {
        provides: "dpkg-deb",
        package: "dpkg",
        why: "unpacks the Debian kernel package",
    },
];

/// Errors from checking or installing what is needed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something is missing and this user cannot install it.
    #[error("missing {}; as root, run: {}", list(.0), install_line(.0))]
    Missing(Vec<Need>),
    /// `apt-get` failed.
    #[error("installing {} failed", list(.missing))]
    Install {
        /// What was to be installed.
        missing: Vec<Need>,
        /// The failure.
        #[source]
        source: command::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

fn list(needs: &[Need]) -> String {
    needs
        .iter()
        .map(|n| format!("{} ({}, for: {})", n.provides, n.package, n.why))
        .collect::<Vec<_>>()
        .join(", ")
}

fn install_line(needs: &[Need]) -> String {
    let packages: Vec<_> = needs.iter().map(|n| n.package).collect();
    format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        packages.join(" ")
    )
}

/// What is missing on this machine.
pub fn missing() -> Vec<Need> {
    missing_with(|need| {
        if need.provides.starts_with('/') {
            Path::new(need.provides).exists()
        } else {
            is_available(need.provides)
        }
    })
}

fn missing_with(present: impl Fn(&Need) -> bool) -> Vec<Need> {
    NEEDS
        .iter()
        .filter(|need| !present(need))
        .copied()
        .collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Installs what is missing (as root), or fails with the command that would.
pub fn ensure() -> Result<()> {
    let missing = missing();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        return Err(Error::Missing(missing));
    }
    println!("setup: installing {}", list(&missing));
    let packages: Vec<_> = missing.iter().map(|n| n.package).collect();
    let install = |source| Error::Install {
        missing: missing.clone(),
        source,
    };
    command::output(Command::new("apt-get").args(["update", "-qq"])).map_err(install)?;
    command::output(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&packages),
    )
    .map_err(install)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_missing_are_named_with_one_install_command() {
        let missing =
            missing_with(|need| need.package != "qemu-system-x86" && need.package != "binutils");
        let text = Error::Missing(missing).to_string();
        assert!(
            text.contains("qemu-system-x86_64 (qemu-system-x86"),
            "{text}"
        );
        assert!(
            text.ends_with("apt-get install -y --no-install-recommends qemu-system-x86 binutils"),
            "{text}"
        );
        assert!(!text.contains("busybox"), "{text}");
    }

    #[test]
    fn nothing_missing_when_all_present() {
        assert!(missing_with(|_| true).is_empty());
    }
}
