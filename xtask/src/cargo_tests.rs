//! Building the workspace's real-KVM test binaries and picking them out of cargo's messages.
//!
//! The tests that need a real KVM live in integration-test targets named `kvm` (one per
//! crate) and `smoke` (workspace level). They use a libtest-mimic harness, so each binary
//! runs on its own and prints libtest's `test result:` line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cargo_metadata::{Message, MetadataCommand, PackageId, TargetKind};

use crate::command::{self, CommandLine};

/// The integration-test target names that are run inside L1.
pub const NESTED_TEST_TARGETS: [&str; 2] = ["kvm", "smoke"];

/// Errors from building or selecting the test binaries.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `cargo test --no-run` failed (see its diagnostics above).
    #[error("cannot build the test binaries")]
    Build(#[source] command::Error),
    /// Cargo printed a line that is not a JSON message.
    #[error("cargo printed {line:?} among its JSON messages")]
    NotJson {
        /// The line.
        line: String,
    },
    /// Cargo's messages could not be read.
    #[error("cannot read cargo's messages")]
    Read(#[source] std::io::Error),
    /// The workspace's packages could not be listed.
    #[error("cannot list the workspace's packages with `cargo metadata`")]
    Metadata(#[source] cargo_metadata::Error),
    /// Nothing to run.
    #[error("no `kvm` or `smoke` test targets in the selected packages")]
    NoTestBinaries,
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// One built test executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBinary {
    /// The package it belongs to.
    pub package: String,
    /// The test target name (`kvm` or `smoke`).
    pub target: String,
    /// The executable on the host.
    pub executable: PathBuf,
}

impl TestBinary {
    /// `package/target`, the binary's label in the console and the summary.
    pub fn label(&self) -> String {
        format!("{}/{}", self.package, self.target)
    }
}

/// Runs `cargo test --no-run` in `workspace` for `packages` (all members if empty) with the
/// default test profile and returns the `kvm` and `smoke` test binaries.
pub fn build(workspace: &Path, packages: &[String]) -> Result<Vec<TestBinary>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cargo_test = Command::new(cargo);
    cargo_test.current_dir(workspace).args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    if packages.is_empty() {
        cargo_test.arg("--workspace");
    }
    for package in packages {
        cargo_test.args(["--package", package]);
    }
    // Diagnostics and progress go to stderr, where the user sees them; JSON to stdout.
    let output = cargo_test
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| {
            Error::Build(command::Error::Spawn {
                command: CommandLine::of(&cargo_test),
                source,
            })
        })?;
    if !output.status.success() {
        return Err(Error::Build(command::Error::Failed {
            command: CommandLine::of(&cargo_test),
            status: output.status,
            stderr: "(see above)".to_owned(),
        }));
    }
    let members = MetadataCommand::new()
        .current_dir(workspace)
        .no_deps()
        .exec()
        .map_err(Error::Metadata)?
        .packages
        .into_iter()
        .map(|package| (package.id, package.name.to_string()))
        .collect();
    let binaries = select(&output.stdout, &members)?;
    if binaries.is_empty() {
        return Err(Error::NoTestBinaries);
    }
    Ok(binaries)
}

/// Picks the `kvm`/`smoke` integration-test executables out of cargo's JSON messages,
/// sorted by label; `members` names the workspace's packages.
fn select(messages: &[u8], members: &HashMap<PackageId, String>) -> Result<Vec<TestBinary>> {
    let mut binaries = Vec::new();
    for message in Message::parse_stream(messages) {
        let artifact = match message.map_err(Error::Read)? {
            Message::CompilerArtifact(artifact) => artifact,
            Message::TextLine(line) => return Err(Error::NotJson { line }),
            _ => continue,
        };
        let (Some(executable), Some(target)) = (
            artifact.executable,
            NESTED_TEST_TARGETS
                .iter()
                .find(|name| **name == artifact.target.name),
        ) else {
            continue;
        };
        if artifact.profile.test && artifact.target.is_kind(TargetKind::Test) {
            binaries.push(TestBinary {
                package: members
                    .get(&artifact.package_id)
                    .cloned()
                    .unwrap_or(artifact.package_id.repr),
                target: (*target).to_owned(),
                executable: executable.into(),
            });
        }
    }
    binaries.sort_by(|a, b| (&a.package, &a.target).cmp(&(&b.package, &b.target)));
    binaries.dedup_by(|a, b| a.executable == b.executable);
    Ok(binaries)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYNC_REGS: &str = "path+file:///w/crates/sync-regs#0.1.0";
    const WORKSPACE_TESTS: &str = "path+file:///w/tests#workspace-tests@0.1.0";

    /// A `compiler-artifact` message as cargo 1.95 prints it.
    fn artifact(package_id: &str, name: &str, kind: &str, test: bool, exe: Option<&str>) -> String {
        serde_json::json!({
            "reason": "compiler-artifact",
            "package_id": package_id,
            "manifest_path": "/w/Cargo.toml",
            "target": {
                "name": name,
                "kind": [kind],
                "crate_types": ["bin"],
                "src_path": "/w/src/x.rs",
                "edition": "2021",
                "doc": false,
                "doctest": false,
                "test": true,
            },
            "profile": {
                "opt_level": "0",
                "debuginfo": 2,
                "debug_assertions": true,
                "overflow_checks": true,
                "test": test,
            },
            "features": [],
            "filenames": [exe.unwrap_or("/t/liblibc.rlib")],
            "executable": exe,
            "fresh": true,
        })
        .to_string()
    }

    fn members() -> HashMap<PackageId, String> {
        [
            (SYNC_REGS, "sync-regs"),
            (WORKSPACE_TESTS, "workspace-tests"),
        ]
        .into_iter()
        .map(|(id, name)| (PackageId { repr: id.into() }, name.into()))
        .collect()
    }

    #[test]
    fn selects_only_kvm_and_smoke_integration_tests() {
        let messages = [
            artifact(SYNC_REGS, "kvm", "test", true, Some("/t/kvm-1")),
            artifact(WORKSPACE_TESTS, "smoke", "test", true, Some("/t/smoke-2")),
            // A unit-test binary of a library that happens to be called `kvm`.
            artifact(
                "path+file:///w/crates/kvm#0.1.0",
                "kvm",
                "lib",
                true,
                Some("/t/kvm-3"),
            ),
            // Another integration test.
            artifact(SYNC_REGS, "layout", "test", true, Some("/t/layout-4")),
            // A non-test build of a `smoke` binary.
            artifact(WORKSPACE_TESTS, "smoke", "bin", false, Some("/t/smoke")),
            artifact(
                "registry+https://github.com/rust-lang/crates.io-index#libc@0.2.0",
                "libc",
                "lib",
                false,
                None,
            ),
            r#"{"reason":"build-finished","success":true}"#.to_owned(),
        ]
        .join("\n");
        let selected = select(messages.as_bytes(), &members()).unwrap();
        assert_eq!(
            selected,
            [
                TestBinary {
                    package: "sync-regs".into(),
                    target: "kvm".into(),
                    executable: "/t/kvm-1".into()
                },
                TestBinary {
                    package: "workspace-tests".into(),
                    target: "smoke".into(),
                    executable: "/t/smoke-2".into()
                },
            ]
        );
        assert_eq!(selected[1].label(), "workspace-tests/smoke");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(select(b"Compiling foo\n", &members()).is_err());
    }
}
