//! `cargo xtask nested-soak`: many guest boots and runs of the KVM test binaries in the nested
//! test host, to find out how often the test host freezes and where, and whether every guest
//! ending keeps its exit status.
//!
//! Everything runs as steps of one L1 boot; a lost L1 (frozen, or ended without reporting
//! its result) is booted again and resumes at the step it was lost in (up to
//! `--max-freezes`, high by default), so one run counts every loss; the `froze` column
//! counts both kinds. Guest boots use the reference VMM with the default guest (see [`crate::guest`]).
//! Boot `i` (counting from 0) gets [`VCPU_MIX`]`[i % 3]` vCPUs and ends as
//! [`Ending::MIX`]`[(i / 3) % 3]` says, so every nine boots run each of the nine combinations
//! once. Each boot runs under [`BOOT_CHECK_SCRIPT`] inside L1, which shows the guest console
//! as it comes and then checks the VMM's exit status, the marker with the vCPU count, the
//! line the guest's `/init` prints for its ending, whether the kernel panicked, and the
//! VMM's last line; the summary counts passes, failures and freezes per combination. A round
//! of every `kvm` and `smoke` binary is spread evenly between the boots.

use std::collections::{BTreeMap, HashMap};
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
use crate::protocol::StepReport;
use crate::scratch::ScratchDir;

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
    /// The boot-check script could not be written on the host.
    #[error("cannot write the soak's boot-check script in {}", dir.display())]
    Script {
        /// The directory it was meant for.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The guest vCPU counts the boots cycle through.
pub const VCPU_MIX: [u32; 3] = [1, 2, 4];

/// How a soak guest ends: the value of `vmmref.end=` on its command line, which the default
/// guest's `/init` acts on right after printing its marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ending {
    /// `poweroff -f`: ACPI S5.
    PowerOff,
    /// `reboot -f`: an orderly restart, announced through ACPI `\_TTS` before the reset.
    Reboot,
    /// `echo c > /proc/sysrq-trigger`: a kernel panic, which with `panic=-1` restarts at once
    /// without the `\_TTS` notice.
    Panic,
}

impl Ending {
    /// The endings the boots cycle through, in order.
    pub const MIX: [Self; 3] = [Self::PowerOff, Self::Reboot, Self::Panic];

    /// The word for `vmmref.end=`.
    pub fn name(self) -> &'static str {
        match self {
            Self::PowerOff => "poweroff",
            Self::Reboot => "reboot",
            Self::Panic => "panic",
        }
    }

    /// How a boot with this ending must look, from the VMM's exit-status table
    /// (vmm-reference/README.md) and the default guest's `/init` ([`guest::INIT_SCRIPT`]).
    pub fn expectation(self) -> Expectation {
        match self {
            Self::PowerOff => Expectation {
                rc: 0,
                init_line: "init: powering off",
                kernel_panic: false,
                last_lines: &["vmm-reference: guest powered off"],
            },
            Self::Reboot => Expectation {
                rc: 0,
                init_line: "init: rebooting",
                kernel_panic: false,
                last_lines: &["vmm-reference: guest requested reset"],
            },
            // The default initramfs loads no pvpanic driver, so the panic shows as a reset
            // without the shutdown notice. A pvpanic report is the VMM's other word for the
            // same event, with the same status, and is accepted too.
            Self::Panic => Expectation {
                rc: 3,
                init_line: "init: panicking",
                kernel_panic: true,
                last_lines: &[
                    "vmm-reference: guest reset without an orderly shutdown",
                    "vmm-reference: guest panicked (pvpanic)",
                ],
            },
        }
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// What a guest boot with a given ending must show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectation {
    /// The VMM's exit status.
    pub rc: u8,
    /// The line the guest's `/init` prints before it ends the guest this way.
    pub init_line: &'static str,
    /// Whether the console shows `Kernel panic` (and must not, where this is false).
    pub kernel_panic: bool,
    /// The accepted beginnings of the last non-empty line of the VMM's output (its verdict,
    /// printed on stderr after the guest console has drained).
    pub last_lines: &'static [&'static str],
}

/// One guest boot of the soak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBoot {
    /// Its number, from 1.
    pub number: u32,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// How the guest ends.
    pub ending: Ending,
}

impl GuestBoot {
    /// Boot `index` (from 0) of the mix: the vCPU count changes every boot, the ending every
    /// three boots, so any nine consecutive boots starting at a multiple of nine cover each
    /// combination once.
    pub fn nth(index: u32) -> Self {
        let len = VCPU_MIX.len() as u32;
        Self {
            number: index + 1,
            vcpus: VCPU_MIX[(index % len) as usize],
            ending: Ending::MIX[((index / len) % len) as usize],
        }
    }

    /// The step label: `boot-<number>-<vcpus>vcpu-<ending>`.
    pub fn label(&self) -> String {
        format!(
            "{BOOT_PREFIX}{}-{}vcpu-{}",
            self.number, self.vcpus, self.ending
        )
    }

    /// The combination of vCPU count and ending it belongs to.
    fn combination(&self) -> (u32, Ending) {
        (self.vcpus, self.ending)
    }

    /// The L1 command: the boot-check script with its expectations in the environment,
    /// running the reference VMM with `extra` after its own arguments.
    fn argv(&self, extra: &[String]) -> Vec<String> {
        let want = self.ending.expectation();
        let mut argv = vec![
            "env".to_owned(),
            format!("SOAK_RC={}", want.rc),
            format!("SOAK_CPUS={}", self.vcpus),
            format!("SOAK_INIT_LINE={}", want.init_line),
            format!(
                "SOAK_PANIC={}",
                if want.kernel_panic { "yes" } else { "no" }
            ),
            format!("SOAK_LAST={}", want.last_lines.join(LAST_LINE_SEPARATOR)),
            "/bin/sh".to_owned(),
            BOOT_CHECK_PATH.to_owned(),
        ];
        argv.extend(
            [
                "/bin/vmm-reference",
                "boot",
                "--kernel",
                "/data/bzImage",
                "--initramfs",
                "/data/initramfs.cpio",
                "--vcpus",
                &self.vcpus.to_string(),
                "--cmdline",
                &format!(
                    "console=ttyS0 reboot=k panic=-1 quiet vmmref.end={}",
                    self.ending
                ),
            ]
            .map(str::to_owned),
        );
        argv.extend_from_slice(extra);
        argv
    }
}

/// Where the boot-check script goes in L1.
const BOOT_CHECK_PATH: &str = "/data/soak-boot.sh";

/// Separates the accepted last lines in `SOAK_LAST`.
const LAST_LINE_SEPARATOR: &str = "|";

/// The status [`BOOT_CHECK_SCRIPT`] adds its failed checks to.
const CHECK_FAILED_BASE: u8 = 64;

/// The checks of [`BOOT_CHECK_SCRIPT`], by the bit each adds to [`CHECK_FAILED_BASE`].
const CHECK_RC: u8 = 1;
const CHECK_MARKER: u8 = 2;
const CHECK_INIT_LINE: u8 = 4;
const CHECK_LAST_LINE: u8 = 8;
const CHECK_PANIC: u8 = 16;
const CHECK_ALL: u8 = CHECK_RC | CHECK_MARKER | CHECK_INIT_LINE | CHECK_LAST_LINE | CHECK_PANIC;

/// Runs one soak boot inside L1: the VMM command in its arguments, with the console shown
/// live (the watchdog's last lines stay useful) and kept for the checks. Exits 0 if every
/// check held, else 64 plus the bits of the checks that failed (1 exit status, 2 marker with
/// the vCPU count, 4 the ending's `/init` line, 8 the VMM's last line, 16 kernel panic seen
/// or missed), after a `SOAK-CHECK` line with what it found.
pub const BOOT_CHECK_SCRIPT: &str = r#"# One guest boot of `cargo xtask nested-soak`, checked against SOAK_RC, SOAK_CPUS,
# SOAK_INIT_LINE, SOAK_PANIC (yes/no) and SOAK_LAST (accepted last lines, '|' between them).
work=$(mktemp -d) || exit 125
mkfifo "$work/pipe" || exit 125
tee "$work/console" <"$work/pipe" &
tee_pid=$!
# /init stops a step that overstays with SIGTERM, and kills it 10 s later: the VMM is the one
# to stop (also when the signal comes before its pid is known), and to kill after 5 s if
# SIGTERM did not end it, so that no VMM outlives its step.
vmm=
stopped=no
stop_vmm() {
  kill -TERM $vmm 2>/dev/null
  ( sleep 5; kill -KILL $vmm 2>/dev/null ) >/dev/null 2>&1 &
}
trap 'stopped=yes; [ -z "$vmm" ] || stop_vmm' TERM
"$@" </dev/null >"$work/pipe" 2>&1 &
vmm=$!
[ "$stopped" = no ] || stop_vmm
wait $vmm
rc=$?
# A trapped signal ends `wait` early: wait again for the VMM's own status.
while kill -0 $vmm 2>/dev/null; do wait $vmm; rc=$?; done
wait $tee_pid
tr -d '\r' <"$work/console" >"$work/clean"
failed=0
[ "$rc" = "$SOAK_RC" ] || failed=$((failed + 1))
grep -q "VMM-REFERENCE-BOOT-OK cpus=$SOAK_CPUS " "$work/clean" || failed=$((failed + 2))
grep -qF "$SOAK_INIT_LINE" "$work/clean" || failed=$((failed + 4))
last=$(grep -v '^[[:space:]]*$' "$work/clean" | tail -n 1)
matched=no
saved_ifs=$IFS
IFS='|'
for want in $SOAK_LAST; do
  case "$last" in "$want"*) matched=yes ;; esac
done
IFS=$saved_ifs
[ "$matched" = yes ] || failed=$((failed + 8))
if grep -q 'Kernel panic' "$work/clean"; then panicked=yes; else panicked=no; fi
[ "$panicked" = "$SOAK_PANIC" ] || failed=$((failed + 16))
rm -rf "$work"
echo "SOAK-CHECK rc=$rc (want $SOAK_RC) kernel-panic=$panicked (want $SOAK_PANIC) failed-checks=$failed last line: $last"
[ "$failed" -eq 0 ] || exit $((64 + failed))
"#;

/// Why a guest-boot step did not pass, in words, or `None` if it passed.
fn boot_failure(boot: &GuestBoot, step: &StepReport) -> Option<String> {
    if step.timed_out {
        return Some(format!(
            "overstayed the step timeout (rc={})",
            step.rc.map_or("none".to_owned(), |rc| rc.to_string())
        ));
    }
    let rc = match step.rc {
        None => return Some("did not end (L1 ended first)".to_owned()),
        Some(0) => return None,
        Some(rc) => rc,
    };
    let Some(bits) = rc
        .checked_sub(CHECK_FAILED_BASE)
        .filter(|&bits| bits != 0 && bits & !CHECK_ALL == 0)
    else {
        return Some(format!("the boot check itself failed (rc={rc})"));
    };
    let want = boot.ending.expectation();
    let mut reasons = Vec::new();
    if bits & CHECK_RC != 0 {
        reasons.push(format!("VMM exit status is not {}", want.rc));
    }
    if bits & CHECK_MARKER != 0 {
        reasons.push(format!("no `{} cpus={}` marker", guest::MARKER, boot.vcpus));
    }
    if bits & CHECK_INIT_LINE != 0 {
        reasons.push(format!("no `{}` line", want.init_line));
    }
    if bits & CHECK_LAST_LINE != 0 {
        reasons.push(format!(
            "the VMM's last line is not `{}`",
            want.last_lines.join("` or `")
        ));
    }
    if bits & CHECK_PANIC != 0 {
        reasons.push(if want.kernel_panic {
            "no `Kernel panic` on the console".to_owned()
        } else {
            "a `Kernel panic` on the console".to_owned()
        });
    }
    Some(reasons.join("; "))
}

/// What one kind of step did over the soak.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Count {
    ran: u32,
    passed: u32,
    failed: Vec<String>,
}

/// What the boots of one combination of vCPU count and ending did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    planned: u32,
    passed: u32,
    failed: u32,
    froze: u32,
}

/// The soak's result.
#[derive(Debug, Clone, PartialEq)]
pub struct SoakReport {
    boots: Count,
    tests: Count,
    combinations: BTreeMap<(u32, Ending), Tally>,
    freezes: Vec<FreezeReport>,
    seconds: f64,
}

impl SoakReport {
    fn new(outcome: &Outcome, boots_planned: &[GuestBoot], seconds: f64) -> Self {
        let by_label: HashMap<String, &GuestBoot> = boots_planned
            .iter()
            .map(|boot| (boot.label(), boot))
            .collect();
        let mut combinations: BTreeMap<(u32, Ending), Tally> = BTreeMap::new();
        for boot in boots_planned {
            combinations.entry(boot.combination()).or_default().planned += 1;
        }
        let mut boots = Count::default();
        let mut tests = Count::default();
        let mut seen = std::collections::HashSet::new();
        for step in &outcome.steps {
            if let Some(boot) = by_label.get(&step.label) {
                seen.insert(step.label.as_str());
                boots.ran += 1;
                let tally = combinations.entry(boot.combination()).or_default();
                match boot_failure(boot, step) {
                    None => {
                        boots.passed += 1;
                        tally.passed += 1;
                    }
                    Some(why) => {
                        tally.failed += 1;
                        boots.failed.push(format!("{}: {why}", step.label));
                    }
                }
                continue;
            }
            tests.ran += 1;
            if step.rc == Some(0) && !step.timed_out && !step.test_results.is_empty() {
                tests.passed += 1;
            } else {
                tests.failed.push(format!(
                    "{} (rc={}{})",
                    step.label,
                    step.rc.map_or("none".to_owned(), |rc| rc.to_string()),
                    if step.timed_out { ", step timeout" } else { "" }
                ));
            }
        }
        for boot in boots_planned {
            let label = boot.label();
            if !seen.contains(label.as_str()) {
                combinations.entry(boot.combination()).or_default().failed += 1;
                boots.failed.push(format!("{label}: never ran"));
            }
        }
        for freeze in &outcome.freezes {
            let boot = freeze.step.as_ref().and_then(|label| by_label.get(label));
            if let Some(boot) = boot {
                combinations.entry(boot.combination()).or_default().froze += 1;
            }
        }
        Self {
            boots,
            tests,
            combinations,
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
            if name == "guest boots" && !self.combinations.is_empty() {
                writeln!(
                    f,
                    "    {:<6} {:<9} {:>7} {:>7} {:>7} {:>7}",
                    "vCPUs", "ending", "boots", "passed", "failed", "froze"
                )?;
                for ((vcpus, ending), tally) in &self.combinations {
                    writeln!(
                        f,
                        "    {vcpus:<6} {ending:<9} {:>7} {:>7} {:>7} {:>7}",
                        tally.planned, tally.passed, tally.failed, tally.froze
                    )?;
                }
            }
        }
        writeln!(
            f,
            "  test host lost (frozen, or ended without its result): {} in {} L1 boots",
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

/// The soak's steps and the guest boots among them.
#[derive(Debug)]
struct Plan {
    steps: Vec<Step>,
    boots: Vec<GuestBoot>,
}

/// The steps: `boots` guest boots in the mix of [`GuestBoot::nth`], with a round of
/// `binaries` after every `boots / rounds`.
fn plan(boots: u32, rounds: u32, binaries: &[(String, String)], vmm_args: &[String]) -> Plan {
    let mut steps = Vec::new();
    let mut planned = Vec::new();
    let every = boots.checked_div(rounds).map_or(u32::MAX, |n| n.max(1));
    let mut rounds_done = 0;
    let round = |n: u32| {
        binaries.iter().map(move |(label, path)| Step {
            label: format!("tests-{n}/{label}"),
            argv: vec![path.clone()],
        })
    };
    for i in 0..boots {
        let boot = GuestBoot::nth(i);
        steps.push(Step {
            label: boot.label(),
            argv: boot.argv(vmm_args),
        });
        planned.push(boot);
        if boot.number.is_multiple_of(every) && rounds_done < rounds {
            rounds_done += 1;
            steps.extend(round(rounds_done));
        }
    }
    for n in rounds_done + 1..=rounds {
        steps.extend(round(n));
    }
    Plan {
        steps,
        boots: planned,
    }
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
    // Holds the boot-check script until L1's image is written (at boot).
    let scratch = ScratchDir::create(cache_dir).map_err(|source| Error::Script {
        dir: cache_dir.to_owned(),
        source,
    })?;
    let script = scratch.path().join("soak-boot.sh");
    std::fs::write(&script, BOOT_CHECK_SCRIPT).map_err(|source| Error::Script {
        dir: scratch.path().to_owned(),
        source,
    })?;

    let mut image = L1Image::new(cache_dir)?;
    let kernel = image.kernel().vmlinuz.clone();
    image.add_files_at([
        (vmm, "/bin/vmm-reference"),
        (kernel, "/data/bzImage"),
        (initramfs, "/data/initramfs.cpio"),
        (script, BOOT_CHECK_PATH),
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
    let plan = plan(args.boots, args.test_runs, &placed, &args.vmm_args);
    let env = vec![("REQUIRE_KVM".to_owned(), "1".to_owned())];
    let mut options = args.host.machine();
    options.freeze_retries = args.max_freezes;
    // One L1 boot runs the whole soak: its limit is what the steps may take in all.
    options.timeout = options.timeout.max(Duration::from_secs(
        u64::from(args.boots) * 120 + u64::from(args.test_runs) * 600,
    ));
    let outcome = image.boot(env, plan.steps, options)?;
    drop(scratch);
    let report = SoakReport::new(&outcome, &plan.boots, started.elapsed().as_secs_f64());
    print!("{report}");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn step(label: &str, rc: Option<u8>, result: &str) -> StepReport {
        StepReport {
            label: label.into(),
            rc,
            test_results: if result.is_empty() {
                Vec::new()
            } else {
                vec![result.into()]
            },
            timed_out: false,
        }
    }

    #[test]
    fn every_nine_boots_cover_each_combination_once() {
        let boots: Vec<_> = (0..9).map(GuestBoot::nth).collect();
        let combos: HashSet<_> = boots.iter().map(GuestBoot::combination).collect();
        assert_eq!(combos.len(), 9);
        for vcpus in VCPU_MIX {
            for ending in Ending::MIX {
                assert!(
                    combos.contains(&(vcpus, ending)),
                    "{vcpus} {ending} missing"
                );
            }
        }
        // 100 boots: each combination 11 or 12 times, the first (1 vCPU, poweroff) once more.
        let mut counts: HashMap<(u32, Ending), u32> = HashMap::new();
        for i in 0..100 {
            *counts.entry(GuestBoot::nth(i).combination()).or_default() += 1;
        }
        assert_eq!(counts.len(), 9);
        assert_eq!(counts[&(1, Ending::PowerOff)], 12);
        assert_eq!(counts.values().filter(|&&n| n == 11).count(), 8);
        // Consecutive boots change the vCPU count; the ending changes every three.
        assert_eq!(GuestBoot::nth(3).vcpus, 1);
        assert_eq!(GuestBoot::nth(3).ending, Ending::Reboot);
        assert_eq!(GuestBoot::nth(8).vcpus, 4);
        assert_eq!(GuestBoot::nth(8).ending, Ending::Panic);
        assert_eq!(
            GuestBoot::nth(9),
            GuestBoot {
                number: 10,
                ..GuestBoot::nth(0)
            }
        );
    }

    #[test]
    fn plan_spreads_test_rounds_between_boots() {
        let binaries = [("a/kvm".to_owned(), "/tests/a/kvm".to_owned())];
        let plan = plan(10, 2, &binaries, &[]);
        let labels: Vec<_> = plan.steps.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels.len(), 12);
        assert_eq!(plan.boots.len(), 10);
        assert_eq!(labels[0], "boot-1-1vcpu-poweroff");
        assert_eq!(labels[1], "boot-2-2vcpu-poweroff");
        assert_eq!(labels[4], "boot-5-2vcpu-reboot");
        assert_eq!(labels[5], "tests-1/a/kvm");
        assert_eq!(labels[8], "boot-8-2vcpu-panic");
        assert_eq!(labels[11], "tests-2/a/kvm");
        // More rounds than boots: the rest run at the end.
        assert_eq!(plan_len(1, 3, &binaries), 4);
        assert_eq!(plan_len(3, 0, &binaries), 3);
    }

    fn plan_len(boots: u32, rounds: u32, binaries: &[(String, String)]) -> usize {
        plan(boots, rounds, binaries, &[]).steps.len()
    }

    #[test]
    fn a_boot_step_runs_the_vmm_under_the_check_with_its_expectations() {
        let boot = GuestBoot::nth(8);
        let argv = boot.argv(&[]);
        let at = |word: &str| argv.iter().position(|a| a == word).unwrap();
        assert_eq!(argv[0], "env");
        assert!(argv.contains(&"SOAK_RC=3".to_owned()), "{argv:?}");
        assert!(argv.contains(&"SOAK_CPUS=4".to_owned()), "{argv:?}");
        assert!(argv.contains(&"SOAK_PANIC=yes".to_owned()), "{argv:?}");
        assert!(argv.contains(&"SOAK_INIT_LINE=init: panicking".to_owned()));
        assert!(at("/bin/sh") + 1 == at(BOOT_CHECK_PATH));
        assert!(at(BOOT_CHECK_PATH) < at("/bin/vmm-reference"));
        assert_eq!(argv[at("--vcpus") + 1], "4");
        assert!(argv[at("--cmdline") + 1].ends_with(" panic=-1 quiet vmmref.end=panic"));
        let extra = ["--huge-pages".to_owned(), "on".to_owned()];
        let with = boot.argv(&extra);
        assert_eq!(with[with.len() - 2..], extra);
        assert_eq!(with[..argv.len()], argv[..]);
    }

    #[test]
    fn the_guest_init_prints_each_ending_line() {
        for ending in Ending::MIX {
            let echo = format!("echo \"{}\";", ending.expectation().init_line);
            let line = guest::INIT_SCRIPT
                .lines()
                .find(|line| line.contains(&echo))
                .unwrap_or_else(|| panic!("no `{echo}` in the guest /init"));
            let (pattern, _) = line.trim().split_once(')').unwrap();
            // Power-off is the fallback (`*)`) and the default of `end`.
            let default = format!("\nend={}\n", ending.name());
            assert!(
                pattern == ending.name()
                    || (pattern == "*" && guest::INIT_SCRIPT.contains(&default)),
                "`{line}` is not the case of {ending}"
            );
        }
    }

    /// The shell L1 runs the check with (busybox's), where the host has it.
    fn l1_shell() -> Command {
        if Path::new(l1::BUSYBOX).exists() {
            let mut command = Command::new(l1::BUSYBOX);
            command.arg("sh");
            command
        } else {
            Command::new("sh")
        }
    }

    /// Runs the boot check on the host for `boot`, with a fake VMM that prints `console`
    /// (with the serial console's `\r\n`) and exits with `rc`; returns the check's status.
    fn check(boot: &GuestBoot, console: &[&str], rc: u8) -> (u8, String) {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("check.sh");
        std::fs::write(&script, BOOT_CHECK_SCRIPT).unwrap();
        let text: String = console.iter().map(|l| format!("{l}\r\n")).collect();
        let console_file = dir.path().join("console");
        std::fs::write(&console_file, text).unwrap();
        let argv = boot.argv(&[]);
        let vars_end = argv.iter().position(|a| a == "/bin/sh").unwrap();
        let mut command = l1_shell();
        command.arg(&script);
        command.args(["sh", "-c", "cat \"$1\"; exit \"$2\"", "fake-vmm"]);
        command.arg(&console_file).arg(rc.to_string());
        for var in &argv[1..vars_end] {
            let (name, value) = var.split_once('=').unwrap();
            command.env(name, value);
        }
        let output = command.output().unwrap();
        let status = u8::try_from(output.status.code().unwrap()).unwrap();
        (status, String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn console_of(vcpus: u32, ending: Ending) -> Vec<String> {
        let mut lines = vec![
            "[    0.000000] Linux version 6.1.0".to_owned(),
            format!("[    2.5] VMM-REFERENCE-BOOT-OK cpus={vcpus} uptime=2.50"),
            format!("VMM-REFERENCE-BOOT-OK cpus={vcpus} uptime=2.50"),
            ending.expectation().init_line.to_owned(),
        ];
        match ending {
            Ending::PowerOff => lines.push("[    3.6] reboot: Power down".into()),
            Ending::Reboot => lines.push("[    3.6] reboot: Restarting system".into()),
            Ending::Panic => {
                lines.push("[    2.6] sysrq: Trigger a crash".into());
                lines.push("[    2.6] Kernel panic - not syncing: sysrq triggered crash".into());
                lines.push("[    2.6] ---[ end Kernel panic - not syncing ]---".into());
            }
        }
        lines.push(String::new());
        lines.push(match ending {
            Ending::PowerOff => "vmm-reference: guest powered off".into(),
            Ending::Reboot => "vmm-reference: guest requested reset".into(),
            Ending::Panic => "vmm-reference: guest reset without an orderly shutdown (a kernel panic, or an emergency restart)".into(),
        });
        lines
    }

    fn run_check(boot: &GuestBoot, console: &[String], rc: u8) -> (u8, String) {
        let lines: Vec<&str> = console.iter().map(String::as_str).collect();
        check(boot, &lines, rc)
    }

    #[test]
    fn the_check_passes_each_ending_as_it_should_look() {
        for i in 0..9 {
            let boot = GuestBoot::nth(i);
            let rc = boot.ending.expectation().rc;
            let (status, stdout) = run_check(&boot, &console_of(boot.vcpus, boot.ending), rc);
            assert_eq!(status, 0, "{}: {stdout}", boot.label());
            assert!(stdout.contains("SOAK-CHECK rc="), "{stdout}");
            // The console is shown through as it comes.
            assert!(
                stdout.contains(boot.ending.expectation().init_line),
                "{stdout}"
            );
        }
        // A pvpanic report counts as the panic it is.
        let boot = GuestBoot::nth(6);
        let mut console = console_of(1, Ending::Panic);
        *console.last_mut().unwrap() = "vmm-reference: guest panicked (pvpanic)".into();
        assert_eq!(run_check(&boot, &console, 3).0, 0);
    }

    #[test]
    fn a_reboot_is_not_taken_for_a_panic_nor_the_reverse() {
        let panic_boot = GuestBoot::nth(6);
        let (status, _) = run_check(&panic_boot, &console_of(1, Ending::Reboot), 0);
        assert_eq!(
            status,
            CHECK_FAILED_BASE + CHECK_RC + CHECK_INIT_LINE + CHECK_LAST_LINE + CHECK_PANIC
        );
        let step_report = step(&panic_boot.label(), Some(status), "");
        let why = boot_failure(&panic_boot, &step_report).unwrap();
        for part in [
            "VMM exit status is not 3",
            "no `init: panicking` line",
            "guest reset without an orderly shutdown",
            "no `Kernel panic` on the console",
        ] {
            assert!(why.contains(part), "{part:?} not in {why:?}");
        }

        let reboot_boot = GuestBoot::nth(3);
        let (status, _) = run_check(&reboot_boot, &console_of(1, Ending::Panic), 3);
        assert_eq!(
            status,
            CHECK_FAILED_BASE + CHECK_RC + CHECK_INIT_LINE + CHECK_LAST_LINE + CHECK_PANIC
        );
        let why = boot_failure(&reboot_boot, &step(&reboot_boot.label(), Some(status), ""));
        assert!(why.unwrap().contains("a `Kernel panic` on the console"));

        // The right status and last line are not enough: a reboot whose console shows a
        // kernel panic (say, one in the reboot path) fails.
        let mut console = console_of(1, Ending::Reboot);
        console.insert(
            4,
            "[    3.5] Kernel panic - not syncing: Attempted to kill init!".into(),
        );
        assert_eq!(
            run_check(&reboot_boot, &console, 0).0,
            CHECK_FAILED_BASE + CHECK_PANIC
        );
    }

    #[test]
    fn the_check_wants_the_marker_with_the_vcpu_count_and_the_vmm_last() {
        let four = GuestBoot::nth(2);
        assert_eq!(four.vcpus, 4);
        let (status, _) = run_check(&four, &console_of(2, Ending::PowerOff), 0);
        assert_eq!(status, CHECK_FAILED_BASE + CHECK_MARKER);
        let why = boot_failure(&four, &step(&four.label(), Some(status), "")).unwrap();
        assert_eq!(why, "no `VMM-REFERENCE-BOOT-OK cpus=4` marker");
        // The VMM's verdict must be the last thing printed, not only somewhere.
        let mut console = console_of(4, Ending::PowerOff);
        console.push("[    9.9] late guest noise".into());
        assert_eq!(
            run_check(&four, &console, 0).0,
            CHECK_FAILED_BASE + CHECK_LAST_LINE
        );
    }

    #[test]
    fn the_check_passes_a_stop_on_to_the_vmm() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("check.sh");
        std::fs::write(&script, BOOT_CHECK_SCRIPT).unwrap();
        let mut child = l1_shell()
            .arg(&script)
            .args([
                "sh",
                "-c",
                "trap 'echo vmm-stopped; kill $nap; exit 143' TERM; sleep 30 & nap=$!; \
                 echo vmm-started; wait",
            ])
            .envs([
                ("SOAK_RC", "0"),
                ("SOAK_CPUS", "1"),
                ("SOAK_INIT_LINE", "x"),
                ("SOAK_PANIC", "no"),
                ("SOAK_LAST", "y"),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
        assert_eq!(first, "vmm-started\n");
        let started = Instant::now();
        // SAFETY: kill(2) on the pid of a child this test spawned and has not yet reaped.
        let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0);
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        let status = child.wait().unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "{took:?}: {rest}");
        assert!(rest.contains("vmm-stopped"), "{rest}");
        assert!(rest.contains("SOAK-CHECK rc=143 "), "{rest}");
        assert_eq!(
            status.code(),
            Some(i32::from(
                CHECK_FAILED_BASE + CHECK_RC + CHECK_MARKER + CHECK_INIT_LINE + CHECK_LAST_LINE
            ))
        );
    }

    #[test]
    fn the_check_kills_a_vmm_that_ignores_the_stop() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("check.sh");
        std::fs::write(&script, BOOT_CHECK_SCRIPT).unwrap();
        // An ignored SIGTERM stays ignored across exec: `sleep` is the VMM that will not stop.
        let mut child = l1_shell()
            .arg(&script)
            .args(["sh", "-c", "trap '' TERM; echo vmm-started; exec sleep 60"])
            .envs([
                ("SOAK_RC", "0"),
                ("SOAK_CPUS", "1"),
                ("SOAK_INIT_LINE", "x"),
                ("SOAK_PANIC", "no"),
                ("SOAK_LAST", "y"),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
        assert_eq!(first, "vmm-started\n");
        let started = Instant::now();
        // SAFETY: kill(2) on the pid of a child this test spawned and has not yet reaped.
        let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0);
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        child.wait().unwrap();
        let took = started.elapsed();
        // Killed after the 5 s grace, well before /init's own kill at 10 s.
        assert!(took >= Duration::from_secs(4), "{took:?}: {rest}");
        assert!(took < Duration::from_secs(9), "{took:?}: {rest}");
        assert!(rest.contains("SOAK-CHECK rc=137 "), "{rest}");
    }

    #[test]
    fn other_statuses_are_not_read_as_checks() {
        let boot = GuestBoot::nth(0);
        for (rc, want) in [
            (Some(143), "the boot check itself failed (rc=143)"),
            (Some(64), "the boot check itself failed (rc=64)"),
            (Some(125), "the boot check itself failed (rc=125)"),
            (None, "did not end (L1 ended first)"),
        ] {
            assert_eq!(boot_failure(&boot, &step("x", rc, "")).unwrap(), want);
        }
        let mut timed_out = step("x", Some(143), "");
        timed_out.timed_out = true;
        assert!(boot_failure(&boot, &timed_out)
            .unwrap()
            .starts_with("overstayed the step timeout"));
        assert_eq!(boot_failure(&boot, &step("x", Some(0), "")), None);
    }

    #[test]
    fn report_counts_per_combination_failures_and_freezes() {
        let binaries = [("a/kvm".to_owned(), "/tests/a/kvm".to_owned())];
        let plan = plan(10, 0, &binaries, &[]);
        let mut steps: Vec<StepReport> = plan
            .boots
            .iter()
            .map(|b| step(&b.label(), Some(0), ""))
            .collect();
        // Boot 5 (2 vCPUs, reboot) came out as a panic; boot 10 never ran.
        steps[4].rc = Some(CHECK_FAILED_BASE + CHECK_RC + CHECK_PANIC);
        steps.pop();
        steps.push(step("tests-1/a/kvm", Some(0), "test result: ok."));
        steps.push(step("tests-1/b/kvm", Some(0), ""));
        let outcome = Outcome {
            rc: 3,
            steps,
            freezes: vec![FreezeReport {
                attempt: 1,
                step: Some("boot-9-4vcpu-panic".into()),
                silent_for: Duration::from_secs(60),
                stuck: None,
                ended: false,
                after: Duration::from_secs(99),
                last_lines: vec!["VMM-REFERENCE-BOOT-OK".into()],
            }],
        };
        let report = SoakReport::new(&outcome, &plan.boots, 1.0);
        assert!(!report.passed());
        let tally = |vcpus, ending| report.combinations[&(vcpus, ending)];
        assert_eq!(
            tally(2, Ending::Reboot),
            Tally {
                planned: 1,
                passed: 0,
                failed: 1,
                froze: 0
            }
        );
        assert_eq!(
            tally(1, Ending::PowerOff),
            Tally {
                planned: 2,
                passed: 1,
                failed: 1,
                froze: 0
            }
        );
        assert_eq!(tally(4, Ending::Panic).froze, 1);
        assert_eq!(tally(4, Ending::Panic).passed, 1);
        let text = report.to_string();
        assert!(text.contains("guest boots: 9 ran, 8 passed"), "{text}");
        assert!(
            text.contains("failed: boot-5-2vcpu-reboot: VMM exit status is not 0; a `Kernel panic` on the console"),
            "{text}"
        );
        assert!(
            text.contains("failed: boot-10-1vcpu-poweroff: never ran"),
            "{text}"
        );
        assert!(text.contains("failed: tests-1/b/kvm (rc=0)"), "{text}");
        assert!(text.contains("test-binary runs: 2 ran, 1 passed"), "{text}");
        assert!(
            text.contains("    2      reboot          1       0       1       0"),
            "{text}"
        );
        assert!(
            text.contains("    4      panic           1       1       0       1"),
            "{text}"
        );
        assert!(
            text.contains("test host lost (frozen, or ended without its result): 1 in 2 L1 boots"),
            "{text}"
        );
        assert!(text.contains("last line: VMM-REFERENCE-BOOT-OK"), "{text}");
    }

    #[test]
    fn a_clean_report_passes() {
        let plan = plan(9, 0, &[], &[]);
        let steps = plan
            .boots
            .iter()
            .map(|b| step(&b.label(), Some(0), ""))
            .collect();
        let outcome = Outcome {
            rc: 0,
            steps,
            freezes: Vec::new(),
        };
        let report = SoakReport::new(&outcome, &plan.boots, 1.0);
        assert!(report.passed(), "{report}");
        assert_eq!(report.combinations.len(), 9);
        assert!(report
            .combinations
            .values()
            .all(|t| t.planned == 1 && t.passed == 1));
    }
}
