//! `cargo xtask minimal-versions`: the publishable crates built and unit-tested against the
//! lowest versions their dependency requirements allow, so that the requirements are honest.
//!
//! The workspace's tracked files are copied to `target/minimal-versions/src` (the real
//! `Cargo.lock` is never touched), the copy's lock file is resolved with cargo's
//! `-Z direct-minimal-versions` (the nightly toolchain where rustup has one; otherwise stable
//! cargo with `RUSTC_BOOTSTRAP=1` for that one command), and `cargo test --lib` runs there
//! with its own target directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command::{self, CommandLine};

/// Errors from the minimal-versions check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tracked files could not be listed or copied.
    #[error("cannot copy the workspace to {}", dir.display())]
    Copy {
        /// The destination.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `git ls-files` failed.
    #[error("cannot list the tracked files")]
    List(#[source] command::Error),
    /// A cargo command failed.
    #[error("`{command}` failed: the lowest allowed dependency versions do not work ({status})")]
    Failed {
        /// The command.
        command: CommandLine,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// A cargo command could not start.
    #[error("cannot start `{command}`")]
    Spawn {
        /// The command.
        command: CommandLine,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The publishable crates, whose requirements other projects resolve.
pub const LIBRARIES: [&str; 5] = [
    "xstate-perm",
    "sync-regs",
    "vm-types",
    "msr-featctl",
    "vcpu-runner",
];

/// Copies the workspace, resolves it to minimal versions and runs the libraries' unit tests.
pub fn run(workspace: &Path) -> Result<()> {
    let base = workspace.join("target").join("minimal-versions");
    let src = base.join("src");
    copy_tracked(workspace, &src)?;

    let mut update = Command::new("cargo");
    if has_nightly() {
        update.arg("+nightly");
    } else {
        // Stable cargo accepts -Z flags with this set; only this command sees it.
        update.env("RUSTC_BOOTSTRAP", "1");
    }
    update
        .current_dir(&src)
        .args(["update", "-Z", "direct-minimal-versions"]);
    run_checked(&mut update)?;

    let mut test = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    test.current_dir(&src)
        .env("CARGO_TARGET_DIR", base.join("target"))
        .args(["test", "--locked", "--lib"]);
    for library in LIBRARIES {
        test.args(["--package", library]);
    }
    run_checked(&mut test)
}

fn has_nightly() -> bool {
    command::output(Command::new("rustup").args(["run", "nightly", "cargo", "--version"])).is_ok()
}

fn run_checked(command: &mut Command) -> Result<()> {
    println!("minimal-versions: {}", CommandLine::of(command));
    let status = command.status().map_err(|source| Error::Spawn {
        command: CommandLine::of(command),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Failed {
            command: CommandLine::of(command),
            status,
        })
    }
}

/// Replaces `dest` with a copy of the files git tracks in `workspace`.
fn copy_tracked(workspace: &Path, dest: &Path) -> Result<()> {
    let listing = command::output(
        Command::new("git")
            .current_dir(workspace)
            .args(["ls-files", "-z"]),
    )
    .map_err(Error::List)?;
    let copy_err = |source| Error::Copy {
        dir: dest.to_owned(),
        source,
    };
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(copy_err)?;
    }
    for name in listing.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let relative =
            Path::new(std::str::from_utf8(name).map_err(|e| copy_err(std::io::Error::other(e)))?);
        let from = workspace.join(relative);
        // A tracked file deleted in the work tree is not part of what is being checked.
        if !from.is_file() {
            continue;
        }
        let to = dest.join(relative);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(copy_err)?;
        }
        std::fs::copy(&from, &to).map_err(copy_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_list_matches_the_publishable_members() {
        let manifest = std::fs::read_to_string(crate::workspace_root().join("Cargo.toml")).unwrap();
        for library in LIBRARIES {
            assert!(
                manifest.contains(&format!("\"crates/{library}\"")),
                "{library} is not a workspace member"
            );
            let own = std::fs::read_to_string(
                crate::workspace_root()
                    .join("crates")
                    .join(library)
                    .join("Cargo.toml"),
            )
            .unwrap();
            assert!(
                !own.contains("publish = false"),
                "{library} is not publishable"
            );
        }
    }
}
