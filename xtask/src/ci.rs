//! `cargo xtask ci`: the test command of README.md, run by `.ci/run`.
//!
//! It runs, in order and stopping at the first failure:
//!
//! 1. `cargo fmt --check`, clippy on all targets (`-D warnings -D
//!    clippy::undocumented_unsafe_blocks`) and `cargo doc` with warnings denied;
//! 2. tier *unit*: every package's unit tests and doctests (no KVM);
//! 3. tier *kvm-local*: every package's integration tests with `REQUIRE_KVM=1` on this
//!    machine's `/dev/kvm`;
//! 4. tier *kvm-nested*: the `kvm` and `smoke` binaries again inside the nested kvm-amd host;
//! 5. line coverage per crate, checked against `coverage_config_x86_64.json`.
//!
//! Test output streams through as it comes; each tier is also tallied from libtest's
//! `test result:` lines, and every skip is listed with the test and its reason. The last line
//! is `ci: N passed, N failed, N skipped`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cargo_metadata::{MetadataCommand, TargetKind};

use crate::coverage;
use crate::l1;
use crate::minimal_versions;

/// Errors from `cargo xtask ci`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A step's program could not be started.
    #[error("cannot start step `{step}`")]
    Spawn {
        /// The step.
        step: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A step ran and failed.
    #[error("step `{step}` failed ({status})")]
    StepFailed {
        /// The step.
        step: String,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// `cargo metadata` failed or printed something unexpected.
    #[error("cannot read the workspace members from `cargo metadata`")]
    Metadata(#[source] cargo_metadata::Error),
    /// The minimal-versions build failed or could not run.
    #[error(transparent)]
    MinimalVersions(#[from] minimal_versions::Error),
    /// The coverage gate failed or could not run.
    #[error(transparent)]
    Coverage(#[from] coverage::Error),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The test tiers, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Unit tests and doctests; no KVM.
    Unit,
    /// Integration tests on the local `/dev/kvm`.
    KvmLocal,
    /// The KVM test binaries inside the nested kvm-amd host.
    KvmNested,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Unit => "unit",
            Tier::KvmLocal => "kvm-local",
            Tier::KvmNested => "kvm-nested",
        })
    }
}

/// Counts of one tier, summed over libtest's `test result:` lines.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Tests reported as ignored: skipped for a missing host feature, with a reason.
    pub skipped: u64,
    /// `(binary label, test name, reason)` of every skip seen.
    pub skips: Vec<(String, String, String)>,
    /// `(binary label, retry)` of the nested runner's retry lines: a boot of the test host
    /// that froze, or ended without its result, and was booted again. Kept apart from test
    /// failures.
    pub frozen_retries: Vec<(String, String)>,
}

impl Tally {
    /// Reads one line of test output. `label` names the binary the line came from.
    pub fn read_line(&mut self, label: &str, line: &str) {
        let line = line.trim_end_matches(['\r', '\n']);
        // Anywhere in the line: a test that echoes the runner's lines may do so after
        // libtest's `test name ... ` and before its result.
        if let Some(at) = line.find(l1::FROZEN_RETRY_PREFIX) {
            let retry = &line[at + l1::FROZEN_RETRY_PREFIX.len()..];
            self.frozen_retries
                .push((label.to_owned(), retry.trim().to_owned()));
            return;
        }
        // Only lines that start with it: `nested-tests` repeats them indented in its summary.
        if let Some(counts) = line.strip_prefix("test result: ") {
            self.passed += count(counts, "passed");
            self.failed += count(counts, "failed");
            self.skipped += count(counts, "ignored");
        } else if let Some(rest) = line.strip_prefix("test ") {
            // `test [kind] name ... ignored (reason)` (libtest-mimic's run-time skip), or
            // `... ignored, reason` (libtest's `#[ignore = "reason"]`).
            if let Some((name, outcome)) = rest.split_once(" ... ") {
                let reason = outcome
                    .strip_prefix("ignored (")
                    .and_then(|r| r.strip_suffix(')'))
                    .or_else(|| outcome.strip_prefix("ignored, "));
                if let Some(reason) = reason {
                    let name = name.trim();
                    let name = name.strip_prefix("[kvm] ").unwrap_or(name).trim();
                    let skip = (label.to_owned(), name.to_owned(), reason.trim().to_owned());
                    // A step a frozen test host interrupted runs again and prints its skips
                    // again: list each once.
                    if !self.skips.contains(&skip) {
                        self.skips.push(skip);
                    }
                }
            }
        }
    }

    fn add(&mut self, other: Tally) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.skipped += other.skipped;
        self.skips.extend(other.skips);
        self.frozen_retries.extend(other.frozen_retries);
    }
}

/// The number before `word` in `N passed; N failed; ...`, or 0.
fn count(counts: &str, word: &str) -> u64 {
    counts
        .split([';', '.'])
        .filter_map(|part| part.trim().strip_suffix(word))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

/// Runs the whole CI test command in `workspace`.
pub fn run(workspace: &Path) -> Result<()> {
    let started = Instant::now();
    let members = workspace_members(workspace)?;
    let mut timings = Vec::new();

    for (name, args) in [
        ("fmt", vec!["fmt", "--all", "--check"]),
        (
            "clippy",
            vec![
                "clippy",
                "--workspace",
                "--all-targets",
                "--locked",
                "--",
                "-D",
                "warnings",
                "-D",
                "clippy::undocumented_unsafe_blocks",
            ],
        ),
        ("doc", vec!["doc", "--workspace", "--no-deps", "--locked"]),
    ] {
        let step = Instant::now();
        banner(name);
        let mut command = cargo(workspace);
        command.args(&args).env("RUSTDOCFLAGS", "-D warnings");
        run_plain(name, &mut command)?;
        timings.push((name.to_owned(), step.elapsed()));
    }

    let libraries: Vec<&Member> = members.iter().filter(|m| m.publish).collect();
    let step = Instant::now();
    banner("package");
    package(workspace, &libraries)?;
    timings.push(("package".into(), step.elapsed()));

    let mut tiers: BTreeMap<Tier, Tally> = BTreeMap::new();
    for tier in [Tier::Unit, Tier::KvmLocal] {
        let step = Instant::now();
        banner(&format!("tier {tier}"));
        for package in &members {
            let passes = match tier {
                Tier::Unit => vec![package.unit_test_targets(), package.doc_test_targets()],
                Tier::KvmLocal | Tier::KvmNested => vec![package.integration_test_targets()],
            };
            for selection in passes.into_iter().flatten() {
                let mut command = cargo(workspace);
                command
                    .args(["test", "--locked", "--package", &package.name])
                    .args(&selection);
                if tier == Tier::KvmLocal {
                    command.env("REQUIRE_KVM", "1");
                }
                let step_name = format!("{tier}: {}", package.name);
                let tally = run_tests(&step_name, command, |_| None, &package.name)?;
                tiers.entry(tier).or_default().add(tally);
            }
        }
        timings.push((format!("tier {tier}"), step.elapsed()));
    }

    let step = Instant::now();
    banner("examples");
    examples(workspace, &libraries)?;
    timings.push(("examples".into(), step.elapsed()));

    let step = Instant::now();
    banner("tier kvm-nested");
    // This very binary, through /proc/self/exe: the path it was started from may name another
    // file by now, or none (a test build of the workspace with other features relinks
    // target/debug/xtask, and the old file is unlinked).
    let mut nested = Command::new("/proc/self/exe");
    nested.current_dir(workspace).arg("nested-tests");
    let tally = run_tests(
        "kvm-nested",
        nested,
        |line| l1::parse_step_header(line).map(str::to_owned),
        "L1",
    )?;
    tiers.insert(Tier::KvmNested, tally);
    timings.push(("tier kvm-nested".into(), step.elapsed()));

    let step = Instant::now();
    banner("minimal-versions");
    minimal_versions::run(workspace)?;
    timings.push(("minimal-versions".into(), step.elapsed()));

    let step = Instant::now();
    banner("coverage");
    let report = coverage::run(workspace)?;
    timings.push(("coverage".into(), step.elapsed()));

    banner("summary");
    println!(
        "{:<12} {:>7} {:>7} {:>8}",
        "tier", "passed", "failed", "skipped"
    );
    for (tier, tally) in &tiers {
        println!(
            "{:<12} {:>7} {:>7} {:>8}",
            tier.to_string(),
            tally.passed,
            tally.failed,
            tally.skipped
        );
    }
    println!("skipped, and why:");
    for (tier, tally) in &tiers {
        for (label, test, reason) in &tally.skips {
            println!("  {tier:<10} {label}::{test}: {reason}");
        }
    }
    let lost: Vec<(&Tier, &String, &String)> = tiers
        .iter()
        .flat_map(|(tier, tally)| {
            tally
                .frozen_retries
                .iter()
                .map(move |(label, retry)| (tier, label, retry))
        })
        .filter(|(tier, label, _)| !is_deliberate_freeze(**tier, label))
        .collect();
    println!(
        "test host lost (frozen, or ended without its result) and booted again, not test failures: {}",
        lost.len()
    );
    for (tier, label, retry) in lost {
        println!("  {tier:<10} {label}: {retry}");
    }
    print!("{report}");
    println!("wall time per step:");
    for (name, elapsed) in &timings {
        println!("  {name:<16} {}", seconds(*elapsed));
    }
    println!("  {:<16} {}", "total", seconds(started.elapsed()));
    let total = tiers.into_values().fold(Tally::default(), |mut all, t| {
        all.add(t);
        all
    });
    println!(
        "ci: {} passed, {} failed, {} skipped",
        total.passed, total.failed, total.skipped
    );
    Ok(())
}

/// `cargo package` (with its build of each packaged crate) and `cargo publish --dry-run` for
/// the publishable crates, together, so that their dependencies on each other resolve.
fn package(workspace: &Path, libraries: &[&Member]) -> Result<()> {
    let selection: Vec<&str> = libraries
        .iter()
        .flat_map(|m| ["--package", m.name.as_str()])
        .collect();
    let mut command = cargo(workspace);
    command
        .args(["package", "--locked", "--allow-dirty"])
        .args(&selection);
    run_plain("cargo package", &mut command)?;
    let mut command = cargo(workspace);
    command
        .args([
            "publish",
            "--dry-run",
            "--locked",
            "--allow-dirty",
            "--no-verify",
        ])
        .args(&selection);
    run_plain("cargo publish --dry-run", &mut command)
}

/// Runs every example of the publishable crates on this machine's `/dev/kvm`; measurement
/// reports (`*_report`) are left to their README's `--release` command.
fn examples(workspace: &Path, libraries: &[&Member]) -> Result<()> {
    for member in libraries {
        for example in &member.examples {
            if example.ends_with("_report") {
                println!("examples: {}::{example} not run here: a measurement, run it with --release as its README says", member.name);
                continue;
            }
            println!("examples: {}::{example}", member.name);
            let mut command = cargo(workspace);
            command
                .args([
                    "run",
                    "--locked",
                    "--package",
                    &member.name,
                    "--example",
                    example,
                ])
                .env("REQUIRE_KVM", "1");
            run_plain(&format!("example {}::{example}", member.name), &mut command)?;
        }
    }
    Ok(())
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn banner(name: &str) {
    println!("\n==== {name} ====");
}

fn cargo(workspace: &Path) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace).stdin(Stdio::null());
    command
}

fn run_plain(step: &str, command: &mut Command) -> Result<()> {
    let status = command.status().map_err(|source| Error::Spawn {
        step: step.to_owned(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::StepFailed {
            step: step.to_owned(),
            status,
        })
    }
}

/// Whether a retry line comes from the test that freezes a test host on purpose
/// (`xtask/tests/frozen_host.rs`, run in the kvm-local tier as part of the xtask package).
fn is_deliberate_freeze(tier: Tier, label: &str) -> bool {
    tier == Tier::KvmLocal && label == "xtask"
}

/// Runs a test command with stdout and stderr merged into one pipe (so their order is
/// kept), echoes every line, and tallies the results. `header` recognises a line that starts
/// a new binary's output and returns its label.
fn run_tests(
    step: &str,
    mut command: Command,
    header: impl Fn(&str) -> Option<String>,
    default_label: &str,
) -> Result<Tally> {
    let spawn_err = |source| Error::Spawn {
        step: step.to_owned(),
        source,
    };
    let (reader, writer) = std::io::pipe().map_err(spawn_err)?;
    let writer_clone = writer.try_clone().map_err(spawn_err)?;
    let mut child = command
        .stdout(writer)
        .stderr(writer_clone)
        .spawn()
        .map_err(spawn_err)?;
    // `command` holds the parent's copies of the write end: drop it, so that EOF comes when
    // the child (and any grandchild holding the pipe) exits.
    drop(command);

    let mut tally = Tally::default();
    let mut label = default_label.to_owned();
    for line in BufReader::new(reader).lines() {
        let line = line.map_err(spawn_err)?;
        println!("{line}");
        if let Some(next) = header(&line) {
            label = next;
        }
        tally.read_line(&label, &line);
    }
    let status = child.wait().map_err(spawn_err)?;
    if status.success() {
        Ok(tally)
    } else {
        Err(Error::StepFailed {
            step: step.to_owned(),
            status,
        })
    }
}

/// A workspace member and the kinds of target it has.
#[derive(Debug)]
struct Member {
    name: String,
    kinds: Vec<String>,
    /// Whether it may be published (no `publish = false`): a library crate for users.
    publish: bool,
    /// Its example targets.
    examples: Vec<String>,
}

impl Member {
    fn has(&self, kind: &str) -> bool {
        self.kinds.iter().any(|k| k == kind)
    }

    /// `cargo test` arguments selecting the unit tests of the library and binaries.
    fn unit_test_targets(&self) -> Option<Vec<&'static str>> {
        match (self.has("lib"), self.has("bin")) {
            (true, true) => Some(vec!["--lib", "--bins"]),
            (true, false) => Some(vec!["--lib"]),
            (false, true) => Some(vec!["--bins"]),
            (false, false) => None,
        }
    }

    /// `cargo test` arguments selecting the doctests (libraries only).
    fn doc_test_targets(&self) -> Option<Vec<&'static str>> {
        self.has("lib").then(|| vec!["--doc"])
    }

    /// `cargo test` arguments selecting every integration test.
    fn integration_test_targets(&self) -> Option<Vec<&'static str>> {
        self.has("test").then(|| vec!["--test", "*"])
    }
}

fn workspace_members(workspace: &Path) -> Result<Vec<Member>> {
    let metadata = MetadataCommand::new()
        .current_dir(workspace)
        .no_deps()
        .other_options(vec!["--locked".to_owned()])
        .exec()
        .map_err(Error::Metadata)?;
    Ok(metadata
        .packages
        .into_iter()
        .map(|p| Member {
            name: p.name.to_string(),
            // `None` when any registry may have it, `[]` for `publish = false`.
            publish: p.publish.is_none_or(|registries| !registries.is_empty()),
            examples: p
                .targets
                .iter()
                .filter(|t| t.is_kind(TargetKind::Example))
                .map(|t| t.name.clone())
                .collect(),
            kinds: p
                .targets
                .iter()
                .flat_map(|t| &t.kind)
                .map(ToString::to_string)
                .collect(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_libtest_result_lines() {
        let mut tally = Tally::default();
        tally.read_line(
            "a",
            "test result: ok. 5 passed; 0 failed; 2 ignored; 0 measured; 1 filtered out; finished in 0.01s",
        );
        tally.read_line(
            "b",
            "test result: FAILED. 1 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s\r",
        );
        // nested-tests' summary repeats a binary's result line, indented: not counted twice.
        tally.read_line(
            "b",
            "                 test result: ok. 7 passed; 0 failed; 0 ignored; 0 measured",
        );
        assert_eq!((tally.passed, tally.failed, tally.skipped), (6, 3, 2));
    }

    #[test]
    fn frozen_host_retries_are_counted_apart_from_tests_and_skips_listed_once() {
        let mut tally = Tally::default();
        let skip = "test [kvm] amx ... ignored (no AMX)";
        tally.read_line("x/kvm", skip);
        tally.read_line(
            "x/kvm",
            &format!(
                "{} 1 of 2: booting L1 again, resuming at `x/kvm`",
                l1::FROZEN_RETRY_PREFIX
            ),
        );
        tally.read_line("x/kvm", skip);
        tally.read_line("x/kvm", "test result: ok. 3 passed; 0 failed; 1 ignored");
        // Also after libtest's `test name ... `, where a test echoes the runner's line.
        tally.read_line(
            "workspace-tests",
            &format!(
                "test nested::boots ... {} 1 of 2: booting L1 again, resuming at `/bin/sh`",
                l1::FROZEN_RETRY_PREFIX
            ),
        );
        assert_eq!(
            tally.frozen_retries,
            [
                (
                    "x/kvm".to_owned(),
                    "1 of 2: booting L1 again, resuming at `x/kvm`".to_owned()
                ),
                (
                    "workspace-tests".to_owned(),
                    "1 of 2: booting L1 again, resuming at `/bin/sh`".to_owned()
                )
            ]
        );
        assert!(is_deliberate_freeze(Tier::KvmLocal, "xtask"));
        assert!(!is_deliberate_freeze(Tier::KvmLocal, "workspace-tests"));
        assert!(!is_deliberate_freeze(Tier::KvmNested, "xtask"));
        assert_eq!(tally.skips.len(), 1);
        assert_eq!((tally.passed, tally.failed, tally.skipped), (3, 0, 1));
    }

    #[test]
    fn collects_skip_reasons_with_their_binary() {
        let mut tally = Tally::default();
        tally.read_line(
            "vm-types/kvm",
            "test [kvm] create_sev_vm                 ... ignored, host lacks VM type SEV (2)",
        );
        tally.read_line(
            "smoke",
            "test [kvm] nested_vendor ... ignored (not inside the nested host (NESTED_KVM_VENDOR unset))",
        );
        tally.read_line("vm-types/kvm", "test [kvm] create_default ... ok");
        tally.read_line("vm-types/kvm", "test plain ... ignored");
        assert_eq!(
            tally.skips,
            vec![
                (
                    "vm-types/kvm".to_owned(),
                    "create_sev_vm".to_owned(),
                    "host lacks VM type SEV (2)".to_owned()
                ),
                (
                    "smoke".to_owned(),
                    "nested_vendor".to_owned(),
                    "not inside the nested host (NESTED_KVM_VENDOR unset)".to_owned()
                )
            ]
        );
    }

    #[test]
    fn counts_ignore_other_words() {
        assert_eq!(count("ok. 3 passed; 1 failed; 0 ignored", "passed"), 3);
        assert_eq!(count("ok. 3 passed; 1 failed; 0 ignored", "measured"), 0);
    }

    #[test]
    fn members_pick_the_passes_they_can_run() {
        let lib_only = Member {
            name: "x".into(),
            kinds: vec!["lib".into()],
            publish: true,
            examples: Vec::new(),
        };
        assert_eq!(lib_only.unit_test_targets(), Some(vec!["--lib"]));
        assert_eq!(lib_only.doc_test_targets(), Some(vec!["--doc"]));
        assert_eq!(lib_only.integration_test_targets(), None);
        let bin_with_tests = Member {
            name: "y".into(),
            kinds: vec!["bin".into(), "test".into()],
            publish: false,
            examples: Vec::new(),
        };
        assert_eq!(bin_with_tests.unit_test_targets(), Some(vec!["--bins"]));
        assert_eq!(bin_with_tests.doc_test_targets(), None);
        assert_eq!(
            bin_with_tests.integration_test_targets(),
            Some(vec!["--test", "*"])
        );
    }

    #[test]
    fn this_workspace_lists_its_members_targets_and_publishability() {
        let members = workspace_members(&crate::workspace_root()).unwrap();
        let member = |name: &str| members.iter().find(|m| m.name == name).unwrap();
        assert!(!member("xtask").publish);
        assert!(member("xtask").has("bin") && member("xtask").has("test"));
        let featctl = member("msr-featctl");
        assert!(featctl.publish && featctl.has("lib"));
        assert_eq!(featctl.examples, ["vmm_msr_filter"]);
    }
}
