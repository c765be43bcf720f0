//! `cargo xtask nested-soak`: many guest boots and runs of the KVM test binaries in the nested
//! test host, to find out how often the test host freezes and where.
//!
//! Everything runs as steps of one L1 boot; a frozen L1 is booted again and resumes at the
//! step it froze in (up to `--freeze-retries`, high by default), so one run counts every
//! freeze. Guest boots use the reference VMM with the default guest (see [`crate::guest`]),
//! alternating 1 and 2 vCPUs; a round of every `kvm` and `smoke` binary is spread evenly
//! between them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cargo_tests::{self, TestBinary};
use crate::cli::SoakArgs;
use crate::command;
use crate::guest;
use crate::image::GuestPath;
use crate::init_script::Step;
use crate::l1::{self, FreezeReport, L1Image, Outcome};
use crate::payload::{self, HostFile};

/// Errors from `cargo xtask nested-soak`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The test binaries could not be built.
    #[error(transparent)]
    Build(#[from] cargo_tests::Error),
    /// The reference VMM could not be built.
    #[error("cannot build vmm-reference")]
    BuildVmm(#[source] command::Error),
    /// The guest initramfs could not be built.
    #[error(transparent)]
    Guest(#[from] guest::Error),
    /// Building or booting L1 failed, or it froze more often than allowed.
    #[error(transparent)]
    Host(#[from] l1::Error),
    /// A file could not be added to L1.
    #[error(transparent)]
    File(#[from] payload::Error),
    /// A destination path is invalid.
    #[error(transparent)]
    Destination(#[from] crate::image::Error),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// What one kind of step did over the soak.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Count {
    ran: u32,
    passed: u32,
    failed: Vec<String>,
}

/// The soak's result.
#[derive(Debug, Clone, PartialEq)]
pub struct SoakReport {
    boots: Count,
    tests: Count,
    freezes: Vec<FreezeReport>,
    seconds: f64,
}

impl SoakReport {
    fn new(outcome: &Outcome, seconds: f64) -> Self {
        let mut boots = Count::default();
        let mut tests = Count::default();
        for step in &outcome.steps {
            let count = if step.label.starts_with(BOOT_PREFIX) {
                &mut boots
            } else {
                &mut tests
            };
            count.ran += 1;
            let ok = step.rc == Some(0)
                && !step.timed_out
                && (step.label.starts_with(BOOT_PREFIX) || !step.test_results.is_empty());
            if ok {
                count.passed += 1;
            } else {
                count.failed.push(format!(
                    "{} (rc={}{})",
                    step.label,
                    step.rc.map_or("none".to_owned(), |rc| rc.to_string()),
                    if step.timed_out { ", step timeout" } else { "" }
                ));
            }
        }
        Self {
            boots,
            tests,
            freezes: outcome.freezes.clone(),
            seconds,
        }
    }

    /// Whether every step passed (freezes are counted, not failures).
    pub fn passed(&self) -> bool {
        self.boots.failed.is_empty() && self.tests.failed.is_empty()
    }
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "\nnested-soak summary ({:.0} s):", self.seconds)?;
        for (name, count) in [
            ("guest boots", &self.boots),
            ("test-binary runs", &self.tests),
        ] {
            writeln!(f, "  {name}: {} ran, {} passed", count.ran, count.passed)?;
            for failed in &count.failed {
                writeln!(f, "    failed: {failed}")?;
            }
        }
        writeln!(
            f,
            "  test-host freezes: {} in {} L1 boots",
            self.freezes.len(),
            self.freezes.len() + 1
        )?;
        for freeze in &self.freezes {
            writeln!(f, "    {freeze}")?;
            if let Some(last) = freeze.last_lines.last() {
                writeln!(f, "      last line: {last}")?;
            }
        }
        Ok(())
    }
}

/// Label prefix of a guest-boot step.
const BOOT_PREFIX: &str = "boot-";

/// The steps: `boots` guest boots with a round of `binaries` after every `boots / rounds`.
fn plan(boots: u32, rounds: u32, binaries: &[(String, String)]) -> Vec<Step> {
    let mut steps = Vec::new();
    let every = boots.checked_div(rounds).map_or(u32::MAX, |n| n.max(1));
    let mut rounds_done = 0;
    for i in 1..=boots {
        let vcpus = if i % 2 == 0 { 2 } else { 1 };
        steps.push(Step {
            label: format!("{BOOT_PREFIX}{i}-{vcpus}vcpu"),
            argv: [
                "/bin/vmm-reference",
                "boot",
                "--kernel",
                "/data/bzImage",
                "--initramfs",
                "/data/initramfs.cpio",
                "--vcpus",
                &vcpus.to_string(),
                "--cmdline",
                "console=ttyS0 reboot=k panic=-1 quiet",
            ]
            .map(str::to_owned)
            .to_vec(),
        });
        if i % every == 0 && rounds_done < rounds {
            rounds_done += 1;
            steps.extend(binaries.iter().map(|(label, path)| Step {
                label: format!("tests-{rounds_done}/{label}"),
                argv: vec![path.clone()],
            }));
        }
    }
    for round in rounds_done + 1..=rounds {
        steps.extend(binaries.iter().map(|(label, path)| Step {
            label: format!("tests-{round}/{label}"),
            argv: vec![path.clone()],
        }));
    }
    steps
}

/// Builds what the soak needs, runs it in L1 and prints the report.
pub fn run(workspace: &Path, cache_dir: &Path, args: &SoakArgs) -> Result<SoakReport> {
    let started = Instant::now();
    let binaries: Vec<TestBinary> = if args.test_runs > 0 {
        cargo_tests::build(workspace, &[])?
    } else {
        Vec::new()
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    command::output(Command::new(cargo).current_dir(workspace).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "vmm-reference",
    ]))
    .map_err(Error::BuildVmm)?;
    let vmm: PathBuf = workspace.join("target/release/vmm-reference");
    let initramfs = guest::cached_initramfs(cache_dir, Path::new(l1::BUSYBOX))?;

    let mut image = L1Image::new(cache_dir)?;
    let kernel = image.kernel().vmlinuz.clone();
    image.add_files_at([
        (vmm, "/bin/vmm-reference"),
        (kernel, "/data/bzImage"),
        (initramfs, "/data/initramfs.cpio"),
    ])?;
    let mut placed = Vec::new();
    for binary in &binaries {
        let dest: GuestPath = format!("/tests/{}/{}", binary.package, binary.target).parse()?;
        image.add_host_file(&HostFile {
            source: binary.executable.clone(),
            dest: dest.clone(),
        })?;
        placed.push((binary.label(), dest.to_string()));
    }
    let steps = plan(args.boots, args.test_runs, &placed);
    let env = vec![("REQUIRE_KVM".to_owned(), "1".to_owned())];
    let mut options = args.host.machine();
    options.freeze_retries = args.max_freezes;
    // One L1 boot runs the whole soak: its limit is what the steps may take in all.
    options.timeout = options.timeout.max(Duration::from_secs(
        u64::from(args.boots) * 120 + u64::from(args.test_runs) * 600,
    ));
    let outcome = image.boot(env, steps, options)?;
    let report = SoakReport::new(&outcome, started.elapsed().as_secs_f64());
    print!("{report}");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::StepReport;

    #[test]
    fn plan_spreads_test_rounds_between_boots() {
        let binaries = [("a/kvm".to_owned(), "/tests/a/kvm".to_owned())];
        let steps = plan(10, 2, &binaries);
        let labels: Vec<_> = steps.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels.len(), 12);
        assert_eq!(labels[0], "boot-1-1vcpu");
        assert_eq!(labels[1], "boot-2-2vcpu");
        assert_eq!(labels[5], "tests-1/a/kvm");
        assert_eq!(labels[11], "tests-2/a/kvm");
        assert!(steps[1].argv.contains(&"2".to_owned()));
        // More rounds than boots: the rest run at the end.
        assert_eq!(plan(1, 3, &binaries).len(), 4);
        assert_eq!(plan(3, 0, &binaries).len(), 3);
    }

    #[test]
    fn report_counts_failures_and_freezes() {
        let step = |label: &str, rc, result: &str| StepReport {
            label: label.into(),
            rc,
            test_results: if result.is_empty() {
                Vec::new()
            } else {
                vec![result.into()]
            },
            timed_out: false,
        };
        let outcome = Outcome {
            rc: 3,
            steps: vec![
                step("boot-1-1vcpu", Some(0), ""),
                step("boot-2-2vcpu", Some(3), ""),
                step("tests-1/a/kvm", Some(0), "test result: ok."),
                step("tests-1/b/kvm", Some(0), ""),
            ],
            freezes: vec![FreezeReport {
                attempt: 1,
                step: Some("boot-2-2vcpu".into()),
                silent_for: std::time::Duration::from_secs(60),
                after: std::time::Duration::from_secs(99),
                last_lines: vec!["VMM-REFERENCE-BOOT-OK".into()],
            }],
        };
        let report = SoakReport::new(&outcome, 1.0);
        assert!(!report.passed());
        let text = report.to_string();
        assert!(text.contains("guest boots: 2 ran, 1 passed"), "{text}");
        assert!(text.contains("failed: boot-2-2vcpu (rc=3)"), "{text}");
        assert!(text.contains("failed: tests-1/b/kvm (rc=0)"), "{text}");
        assert!(
            text.contains("test-host freezes: 1 in 2 L1 boots"),
            "{text}"
        );
        assert!(text.contains("last line: VMM-REFERENCE-BOOT-OK"), "{text}");
    }
}
