//! Building the workspace's real-KVM test binaries and picking them out of cargo's messages.
//!
//! The tests that need a real KVM live in integration-test targets named `kvm` (one per
//! crate) and `smoke` (workspace level). They use a libtest-mimic harness, so each binary
//! runs on its own and prints libtest's `test result:` line.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

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
    #[error("cannot parse cargo message {line:?}")]
    Message {
        /// The line.
        line: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
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

/// The fields of a cargo JSON message this module reads.
#[derive(Debug, Deserialize)]
struct Message {
    reason: String,
    package_id: Option<String>,
    target: Option<Target>,
    profile: Option<Profile>,
    executable: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct Target {
    name: String,
    kind: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Profile {
    test: bool,
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
    let binaries = select(&String::from_utf8_lossy(&output.stdout))?;
    if binaries.is_empty() {
        return Err(Error::NoTestBinaries);
    }
    Ok(binaries)
}

/// Picks the `kvm`/`smoke` integration-test executables out of cargo's JSON messages,
/// sorted by label.
fn select(messages: &str) -> Result<Vec<TestBinary>> {
    let mut binaries = Vec::new();
    for line in messages.lines().filter(|line| !line.trim().is_empty()) {
        let message: Message = serde_json::from_str(line).map_err(|source| Error::Message {
            line: line.to_owned(),
            source,
        })?;
        if message.reason != "compiler-artifact" {
            continue;
        }
        let (Some(target), Some(profile), Some(executable), Some(package_id)) = (
            message.target,
            message.profile,
            message.executable,
            message.package_id,
        ) else {
            continue;
        };
        let integration_test = target.kind.iter().any(|kind| kind == "test");
        if profile.test && integration_test && NESTED_TEST_TARGETS.contains(&target.name.as_str()) {
            binaries.push(TestBinary {
                package: package_name(&package_id),
                target: target.name,
                executable,
            });
        }
    }
    binaries.sort_by(|a, b| (&a.package, &a.target).cmp(&(&b.package, &b.target)));
    binaries.dedup_by(|a, b| a.executable == b.executable);
    Ok(binaries)
}

/// The package name in a cargo package ID.
///
/// Cargo 1.77 and later print a package ID spec, `path+file:///dir/name#name@1.0.0`, or
/// `path+file:///dir/name#1.0.0` when the name is the last path segment; older versions
/// print `name 1.0.0 (path+file:///dir/name)`.
fn package_name(package_id: &str) -> String {
    match package_id.split_once('#') {
        Some((url, fragment)) => match fragment.split_once('@') {
            Some((name, _version)) => name.to_owned(),
            None => url
                .split(['?', '#'])
                .next()
                .unwrap_or(url)
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or(url)
                .to_owned(),
        },
        None => package_id
            .split_whitespace()
            .next()
            .unwrap_or(package_id)
            .to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(package_id: &str, name: &str, kind: &str, test: bool, exe: Option<&str>) -> String {
        serde_json::json!({
            "reason": "compiler-artifact",
            "package_id": package_id,
            "target": { "name": name, "kind": [kind] },
            "profile": { "test": test },
            "executable": exe,
        })
        .to_string()
    }

    #[test]
    fn selects_only_kvm_and_smoke_integration_tests() {
        let messages = [
            artifact(
                "path+file:///w/crates/sync-regs#0.1.0",
                "kvm",
                "test",
                true,
                Some("/t/kvm-1"),
            ),
            artifact(
                "path+file:///w/tests#workspace-tests@0.1.0",
                "smoke",
                "test",
                true,
                Some("/t/smoke-2"),
            ),
            // A unit-test binary of a library that happens to be called `kvm`.
            artifact(
                "path+file:///w/crates/kvm#0.1.0",
                "kvm",
                "lib",
                true,
                Some("/t/kvm-3"),
            ),
            // Another integration test.
            artifact(
                "path+file:///w/crates/sync-regs#0.1.0",
                "layout",
                "test",
                true,
                Some("/t/layout-4"),
            ),
            // A non-test build of a `smoke` binary.
            artifact(
                "path+file:///w/tests#workspace-tests@0.1.0",
                "smoke",
                "bin",
                false,
                Some("/t/smoke"),
            ),
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
        let selected = select(&messages).unwrap();
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
        assert!(select("Compiling foo\n").is_err());
    }

    #[test]
    fn package_names_from_all_id_formats() {
        assert_eq!(
            package_name("path+file:///w/tests#workspace-tests@0.1.0"),
            "workspace-tests"
        );
        assert_eq!(
            package_name("path+file:///w/crates/sync-regs#0.1.0"),
            "sync-regs"
        );
        assert_eq!(
            package_name("sync-regs 0.1.0 (path+file:///w/crates/sync-regs)"),
            "sync-regs"
        );
    }
}
