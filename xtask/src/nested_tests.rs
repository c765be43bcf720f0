//! `cargo xtask nested-tests`: run every `kvm` and `smoke` test binary in one L1 boot.

use std::fmt;
use std::path::Path;

use crate::cargo_tests::{self, TestBinary};
use crate::cli::NestedTestsArgs;
use crate::image::GuestPath;
use crate::init_script::Step;
use crate::l1::{self, L1Image, Outcome};
use crate::payload::{self, HostFile};

/// Where the test binaries go inside L1: `<dir>/<package>/<target>`.
const TEST_DIR: &str = "/tests";

/// Errors from `cargo xtask nested-tests`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The test binaries could not be built.
    #[error(transparent)]
    Build(#[from] cargo_tests::Error),
    /// Building or booting L1 failed, or L1 did not report a result.
    #[error(transparent)]
    Host(#[from] l1::Error),
    /// A `--file` or test binary could not be added.
    #[error(transparent)]
    File(#[from] payload::Error),
    /// A test binary's destination path is invalid (an odd package name).
    #[error(transparent)]
    Destination(#[from] crate::image::Error),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Builds the test binaries of `workspace`, runs them in L1 and prints a summary; returns
/// whether every binary ran and passed.
pub fn run(workspace: &Path, cache_dir: &Path, args: &NestedTestsArgs) -> Result<bool> {
    let binaries = cargo_tests::build(workspace, &args.packages)?;
    let mut image = L1Image::new(cache_dir)?;
    for file in args.host.host_files()? {
        image.add_host_file(&file)?;
    }
    let mut steps = Vec::with_capacity(binaries.len());
    for binary in &binaries {
        let dest: GuestPath = format!("{TEST_DIR}/{}/{}", binary.package, binary.target).parse()?;
        let mut argv = vec![dest.to_string()];
        image.add_host_file(&HostFile {
            source: binary.executable.clone(),
            dest,
        })?;
        argv.extend(args.test_args.iter().cloned());
        steps.push(Step {
            label: binary.label(),
            argv,
        });
    }
    let mut env = vec![("REQUIRE_KVM".to_owned(), "1".to_owned())];
    env.extend(args.host.env_pairs());

    let outcome = image.boot(env, steps, args.host.machine())?;
    let summary = Summary::new(&binaries, &outcome);
    print!("{summary}");
    Ok(summary.passed())
}

/// How one binary fared.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Passed,
    /// Exited 0 without printing libtest's `test result:` line, so it ran no tests (a stub
    /// `main`, or a harness that is not libtest-compatible); a run that tested nothing is
    /// not a pass.
    NoTestResult,
    Failed(u8),
    /// `/init` killed it for overstaying the step timeout while L1 was alive.
    TimedOut,
    /// L1 ended while it ran.
    Unfinished,
    /// L1 ended before it started.
    NotRun,
}

/// The per-binary results of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Summary {
    rows: Vec<(String, Verdict, Vec<String>)>,
    freezes: Vec<l1::FreezeReport>,
}

impl Summary {
    fn new(binaries: &[TestBinary], outcome: &Outcome) -> Self {
        let rows = binaries
            .iter()
            .map(|binary| {
                let label = binary.label();
                match outcome.steps.iter().find(|step| step.label == label) {
                    None => (label, Verdict::NotRun, Vec::new()),
                    Some(step) => {
                        let verdict = match step.rc {
                            Some(_) if step.timed_out => Verdict::TimedOut,
                            Some(0) if step.test_results.is_empty() => Verdict::NoTestResult,
                            Some(0) => Verdict::Passed,
                            Some(rc) => Verdict::Failed(rc),
                            None => Verdict::Unfinished,
                        };
                        (label, verdict, step.test_results.clone())
                    }
                }
            })
            .collect();
        Self {
            rows,
            freezes: outcome.freezes.clone(),
        }
    }

    fn passed(&self) -> bool {
        self.rows
            .iter()
            .all(|(_, verdict, _)| *verdict == Verdict::Passed)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "\nnested-tests summary (L1 with kvm_amd):")?;
        let width = self
            .rows
            .iter()
            .map(|(label, ..)| label.len())
            .max()
            .unwrap_or(0);
        for (label, verdict, results) in &self.rows {
            let verdict = match verdict {
                Verdict::Passed => "ok".to_owned(),
                Verdict::NoTestResult => "FAILED (exit 0, but no tests ran)".to_owned(),
                Verdict::Failed(rc) => format!("FAILED (rc={rc})"),
                Verdict::TimedOut => "FAILED (test timeout: killed by the step timeout)".to_owned(),
                Verdict::Unfinished => "UNFINISHED".to_owned(),
                Verdict::NotRun => "NOT RUN".to_owned(),
            };
            writeln!(f, "  {label:width$}  {verdict}")?;
            if results.is_empty() {
                writeln!(f, "  {:width$}    (no `test result:` line)", "")?;
            }
            for result in results {
                writeln!(f, "  {:width$}    {result}", "")?;
            }
        }
        writeln!(f, "frozen-host retries: {}", self.freezes.len())?;
        for freeze in &self.freezes {
            writeln!(f, "  {freeze}")?;
        }
        let verdict = if self.passed() { "ok" } else { "FAILED" };
        writeln!(f, "nested-tests: {verdict}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::StepReport;

    fn binary(package: &str, target: &str) -> TestBinary {
        TestBinary {
            package: package.into(),
            target: target.into(),
            executable: format!("/t/{target}").into(),
        }
    }

    fn step(label: &str, rc: Option<u8>, result: &str) -> StepReport {
        StepReport {
            label: label.into(),
            rc,
            test_results: vec![result.into()],
            timed_out: false,
        }
    }

    #[test]
    fn every_binary_must_pass() {
        let binaries = [binary("a", "kvm"), binary("b", "smoke")];
        let outcome = Outcome {
            rc: 0,
            steps: vec![
                step("a/kvm", Some(0), "test result: ok. 1 passed"),
                step("b/smoke", Some(0), "test result: ok. 2 passed"),
            ],
            freezes: vec![l1::FreezeReport {
                attempt: 1,
                step: Some("b/smoke".into()),
                silent_for: std::time::Duration::from_secs(60),
                stuck: None,
                ended: false,
                after: std::time::Duration::from_secs(30),
                last_lines: Vec::new(),
            }],
        };
        let summary = Summary::new(&binaries, &outcome);
        assert!(summary.passed());
        let text = summary.to_string();
        assert!(text.contains("test result: ok. 2 passed"), "{text}");
        assert!(text.ends_with("nested-tests: ok\n"), "{text}");
        assert!(
            text.contains(
                "frozen-host retries: 1\n  test host frozen in boot 1 during step `b/smoke`"
            ),
            "{text}"
        );
    }

    #[test]
    fn failed_unfinished_and_missing_binaries_fail_the_run() {
        let binaries = [
            binary("a", "kvm"),
            binary("b", "kvm"),
            binary("c", "kvm"),
            binary("d", "smoke"),
            binary("e", "kvm"),
        ];
        let mut hung = step("e/kvm", Some(143), "");
        hung.timed_out = true;
        let stub = StepReport {
            label: "c/kvm".into(),
            rc: Some(0),
            test_results: Vec::new(),
            timed_out: false,
        };
        let outcome = Outcome {
            rc: 101,
            steps: vec![
                step("a/kvm", Some(101), "test result: FAILED. 1 failed"),
                step("b/kvm", None, ""),
                stub,
                hung,
            ],
            freezes: Vec::new(),
        };
        let summary = Summary::new(&binaries, &outcome);
        assert!(!summary.passed());
        assert_eq!(
            summary
                .rows
                .iter()
                .map(|(_, verdict, _)| verdict.clone())
                .collect::<Vec<_>>(),
            [
                Verdict::Failed(101),
                Verdict::Unfinished,
                Verdict::NoTestResult,
                Verdict::NotRun,
                Verdict::TimedOut
            ]
        );
    }
}
