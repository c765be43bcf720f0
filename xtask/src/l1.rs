//! The nested test host (L1): a Debian kernel with kvm-amd, booted under QEMU TCG with a
//! generated initramfs, that runs commands and reports their status over its console.
//!
//! The image holds static busybox (with a link for each applet at its usual path), the three
//! KVM modules (decompressed on the host if the package compresses them), `/dev/console`,
//! the host files of the run with their shared libraries, and `/init`. Only the kernel
//! package is cached; the image is rebuilt for every run (tens of milliseconds) and written
//! uncompressed: at ~10 MiB, `gzip -1` made no measurable difference to the boot time, and
//! an uncompressed archive needs no compressor on the host.

use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::command;
use crate::debian::{self, KernelTree};
use crate::image::{self, FileSource, GuestPath, Initramfs};
use crate::init_script::{InitScript, Step, MODULE_DIR};
use crate::payload::{self, HostFile, Stager};
use crate::protocol::{strip_ansi, Marker, StepReport, Transcript};
use crate::qemu::{self, Machine};
use crate::scratch::ScratchDir;

/// The static busybox of Debian's `busybox-static`, L1's shell and tools.
pub const BUSYBOX: &str = "/bin/busybox";

/// Errors from building or booting L1, or from what it reported.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel package could not be fetched or read.
    #[error(transparent)]
    Kernel(#[from] debian::Error),
    /// The scratch directory could not be created.
    #[error("cannot create a scratch directory in {}", dir.display())]
    Scratch {
        /// Its parent.
        dir: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Busybox could not list its applets.
    #[error("cannot list the busybox applets (is busybox-static installed?)")]
    Busybox(#[source] command::Error),
    /// A host file could not be added.
    #[error(transparent)]
    Payload(#[from] payload::Error),
    /// The initramfs could not be written.
    #[error(transparent)]
    Image(#[from] image::Error),
    /// The initramfs file could not be created.
    #[error("cannot create {}", path.display())]
    CreateInitrd {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// QEMU failed or timed out.
    #[error(transparent)]
    Qemu(#[from] qemu::Error),
    /// L1 could not provide kvm-amd, so nothing was run.
    #[error("L1 has no usable kvm-amd: {0}")]
    NoKvm(String),
    /// The test host froze more often than the retry bound allows.
    #[error("{}", frozen_summary(.0))]
    Frozen(Vec<FreezeReport>),
    /// L1 powered off or crashed without printing its result line.
    #[error("L1 ended without reporting a result (kernel panic, or /init died); see the console output above")]
    NoResult,
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The size of the emulated machine, how long it may run, and how a frozen one is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineOptions {
    /// Number of vCPUs.
    pub smp: u32,
    /// Memory in MiB.
    pub mem_mib: u32,
    /// How long one boot of L1 may run before QEMU is killed.
    pub timeout: Duration,
    /// How long L1 may show no sign of life (console line or heartbeat) before it is
    /// declared frozen.
    pub silence: Duration,
    /// The same before its first heartbeat (the kernel's quiet boot up to `/init`).
    pub boot_silence: Duration,
    /// How long one step may run inside L1 before `/init` kills it (a test timeout, reported
    /// as the step's failure and never retried).
    pub step_timeout: Duration,
    /// How many times a frozen L1 is booted again to resume from the step it froze in.
    pub freeze_retries: u32,
    /// Whether an L1 that ends without reporting its result (its kernel died or QEMU
    /// exited) counts as a lost test host, booted again like a frozen one within
    /// `freeze_retries`, instead of failing the run at once.
    pub retry_ended: bool,
}

impl MachineOptions {
    /// The defaults of `cargo xtask nested` and `nested-tests`: 2 vCPUs, 2 GiB; 900 s per
    /// boot. The silence limit of 60 s is 30 heartbeats: healthy runs show at most a few
    /// seconds between signs of life (the boot up to `/init`, about 3 s; up to 6.5 s with
    /// the machine busy), and a step that is merely quiet does not stop the heartbeat. Before
    /// the first heartbeat 120 s: under load the quiet kernel boot alone has gone past 15 s.
    /// A step may take 600 s, which is more than ten times the slowest test binary measured
    /// in L1. Two retries after a freeze or after an L1 that ended without its result (the
    /// emulated host's kernel can die while it runs a guest, e.g. of a kernel stack overflow
    /// in its exception entry).
    pub const DEFAULT: Self = Self {
        smp: 2,
        mem_mib: 2048,
        timeout: Duration::from_secs(900),
        silence: Duration::from_secs(60),
        boot_silence: Duration::from_secs(120),
        step_timeout: Duration::from_secs(600),
        freeze_retries: 2,
        retry_ended: true,
    };
}

/// Where and how a test host froze.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreezeReport {
    /// Which boot of L1 froze (1 for the first).
    pub attempt: u32,
    /// The step that was running, if one was.
    pub step: Option<String>,
    /// How long it had been silent.
    pub silent_for: Duration,
    /// Its kernel's stuck-CPU report, when that (not silence) ended it.
    pub stuck: Option<String>,
    /// Whether L1 ended without its result (rather than going silent or stuck).
    pub ended: bool,
    /// How long after its start it was declared frozen.
    pub after: Duration,
    /// Its last console lines, oldest first.
    pub last_lines: Vec<String>,
}

impl fmt::Display for FreezeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "test host frozen in boot {} {}: {}, {:.0} s after it started",
            self.attempt,
            match &self.step {
                Some(step) => format!("during step `{step}`"),
                None => "before any step ran".to_owned(),
            },
            match &self.stuck {
                _ if self.ended => "L1 ended without reporting its result".to_owned(),
                Some(line) => format!("its kernel reported a stuck CPU ({})", line.trim()),
                None => format!(
                    "no console output and no heartbeat for {} s",
                    self.silent_for.as_secs()
                ),
            },
            self.after.as_secs_f64(),
        )
    }
}

fn frozen_summary(reports: &[FreezeReport]) -> String {
    let mut text = format!(
        "the test host froze {} times, more than the {} retries allowed:",
        reports.len(),
        reports.len().saturating_sub(1)
    );
    for report in reports {
        text.push_str(&format!("\n  {report}"));
    }
    text
}

/// The prefix of the line printed on stdout for each frozen boot that is retried, which
/// `cargo xtask ci` counts.
pub const FROZEN_RETRY_PREFIX: &str = "xtask: FROZEN-HOST-RETRY";

/// What a finished L1 run reported, over all its boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The overall status: that of the last step that failed, or of `/init` itself.
    pub rc: u8,
    /// Each step that ran to its end (or to the end of L1), in order. A step a frozen boot
    /// interrupted appears once, from the boot that ran it again.
    pub steps: Vec<StepReport>,
    /// The boots that froze and were retried.
    pub freezes: Vec<FreezeReport>,
}

/// Decides what to do after a boot froze: keeps the steps that ended, returns the report
/// and the steps still to run (starting with the one that was running).
fn after_freeze(
    transcript: Transcript,
    remaining: &mut Vec<Step>,
    done: &mut Vec<StepReport>,
    attempt: u32,
    error: qemu::Error,
) -> std::result::Result<FreezeReport, qemu::Error> {
    let qemu::Error::Frozen {
        silent_for,
        stuck,
        after,
        last_lines,
    } = error
    else {
        return Err(error);
    };
    let step = keep_ended_steps(transcript, remaining, done);
    Ok(FreezeReport {
        attempt,
        step,
        silent_for,
        stuck,
        ended: false,
        after,
        last_lines,
    })
}

/// The report of a boot that ended without its result, after keeping the steps that ended
/// (as [`after_freeze`] does).
fn after_lost_end(
    transcript: Transcript,
    remaining: &mut Vec<Step>,
    done: &mut Vec<StepReport>,
    attempt: u32,
    after: Duration,
) -> FreezeReport {
    let step = keep_ended_steps(transcript, remaining, done);
    FreezeReport {
        attempt,
        step,
        silent_for: Duration::ZERO,
        stuck: None,
        ended: true,
        after,
        last_lines: Vec::new(),
    }
}

/// Moves the steps of `transcript` that ended to `done`, drops them from `remaining` and
/// returns the label of the step that was running, if one was.
fn keep_ended_steps(
    transcript: Transcript,
    remaining: &mut Vec<Step>,
    done: &mut Vec<StepReport>,
) -> Option<String> {
    let ended = transcript
        .steps
        .iter()
        .take_while(|step| step.rc.is_some())
        .count();
    let step = transcript.steps.get(ended).map(|step| step.label.clone());
    done.extend(transcript.steps.into_iter().take(ended));
    remaining.drain(..ended.min(remaining.len()));
    step
}

/// An L1 initramfs under construction, with the kernel it is for.
#[derive(Debug)]
pub struct L1Image {
    kernel: KernelTree,
    tree: Initramfs,
    /// The module names in `/lib/modules`, in load order.
    modules: Vec<String>,
    stager: Stager,
    // Declared last so that it is removed after everything that uses it.
    scratch: ScratchDir,
}

impl L1Image {
    /// Starts an image for the cached kernel (fetched into `cache_dir` if missing) with
    /// busybox, the KVM modules and the directories `/init` mounts on.
    pub fn new(cache_dir: &Path) -> Result<Self> {
        let kernel = debian::KernelCache::new(cache_dir).get_or_fetch()?;
        let scratch = ScratchDir::create(cache_dir).map_err(|source| Error::Scratch {
            dir: cache_dir.to_owned(),
            source,
        })?;
        let mut image = Self {
            stager: Stager::new(scratch.path()),
            tree: Initramfs::new(),
            modules: Vec::new(),
            kernel,
            scratch,
        };
        image.add_base()?;
        Ok(image)
    }

    fn add_base(&mut self) -> Result<()> {
        for dir in ["/proc", "/sys", "/dev", "/tmp", "/data"] {
            self.tree.add_directory(&dir.parse()?);
        }
        // The kernel opens /dev/console for /init's stdio before anything is mounted.
        self.tree
            .add_char_device(&"/dev/console".parse()?, 0o600, 5, 1);

        let busybox: GuestPath = BUSYBOX.parse()?;
        self.add_host_file(&HostFile {
            source: BUSYBOX.into(),
            dest: busybox.clone(),
        })?;
        let applets =
            command::output(Command::new(BUSYBOX).arg("--list-full")).map_err(Error::Busybox)?;
        for applet in String::from_utf8_lossy(&applets).lines() {
            let link: GuestPath = format!("/{}", applet.trim()).parse()?;
            if link != busybox {
                self.tree.add_symlink(&link, BUSYBOX);
            }
        }

        for module in self.kernel.kvm_modules()? {
            let bytes = module.read_uncompressed()?;
            let dest: GuestPath = format!("{MODULE_DIR}/{}.ko", module.name).parse()?;
            self.tree.add_file(&dest, FileSource::Bytes(bytes), 0o644);
            self.modules.push(module.name);
        }
        Ok(())
    }

    /// The kernel the image is for.
    pub fn kernel(&self) -> &KernelTree {
        &self.kernel
    }

    /// Whether the image already has something at `path` (e.g. `/bin/sh` from busybox).
    pub fn provides(&self, path: &GuestPath) -> bool {
        self.tree.contains(path)
    }

    /// Adds host files at the given places in L1, each as [`L1Image::add_host_file`] does.
    pub fn add_files_at<'a>(
        &mut self,
        files: impl IntoIterator<Item = (PathBuf, &'a str)>,
    ) -> Result<()> {
        for (source, dest) in files {
            self.add_host_file(&HostFile {
                source,
                dest: dest.parse()?,
            })?;
        }
        Ok(())
    }

    /// Adds a host file, with its shared libraries if it is a dynamically linked executable.
    pub fn add_host_file(&mut self, file: &HostFile) -> Result<()> {
        Ok(self.stager.add(&mut self.tree, file)?)
    }

    /// Adds an `/init` that runs `steps` with `env`, boots L1 and streams its console to
    /// stdout until it powers off. Succeeds only if L1 loaded kvm-amd and printed its result.
    ///
    /// A boot that goes silent for `options.silence` is a frozen test host: it is reported,
    /// and L1 is booted again (at most `options.freeze_retries` times) to run the step that
    /// was running and those after it; steps that ended are not run again. Inside L1 each
    /// step sees `NESTED_ATTEMPT` (1 for the first boot).
    pub fn boot(
        mut self,
        env: Vec<(String, String)>,
        steps: Vec<Step>,
        options: MachineOptions,
    ) -> Result<Outcome> {
        let modules = std::mem::take(&mut self.modules);
        let mut remaining = steps;
        let mut done = Vec::new();
        let mut freezes: Vec<FreezeReport> = Vec::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut env = env.clone();
            env.push((ATTEMPT_ENV.to_owned(), attempt.to_string()));
            let init = InitScript {
                modules: modules.clone(),
                env,
                steps: remaining.clone(),
                step_timeout_secs: u32::try_from(options.step_timeout.as_secs())
                    .unwrap_or(u32::MAX),
            };
            let booted = Instant::now();
            let (transcript, result) = self.boot_once(&init, options)?;
            match result {
                Ok(stats) => {
                    eprintln!(
                        "xtask: longest silence of L1 {:.1} s (frozen after {} s)",
                        stats.longest_silence.as_secs_f64(),
                        options.silence.as_secs()
                    );
                    if let Some(message) = transcript.setup_error {
                        return Err(Error::NoKvm(message));
                    }
                    let Some(rc) = transcript.result else {
                        if !options.retry_ended {
                            return Err(Error::NoResult);
                        }
                        let report = after_lost_end(
                            transcript,
                            &mut remaining,
                            &mut done,
                            attempt,
                            booted.elapsed(),
                        );
                        println!("xtask: {report}");
                        freezes.push(report);
                        if freezes.len() > options.freeze_retries as usize {
                            return Err(Error::Frozen(freezes));
                        }
                        println!(
                            "{FROZEN_RETRY_PREFIX} {} of {}: booting L1 again, resuming at `{}`",
                            freezes.len(),
                            options.freeze_retries,
                            remaining
                                .first()
                                .map_or("(no steps left)", |step| step.label.as_str())
                        );
                        continue;
                    };
                    done.extend(transcript.steps);
                    let rc = if rc != 0 {
                        rc
                    } else {
                        done.iter()
                            .filter_map(|step| step.rc)
                            .rfind(|&rc| rc != 0)
                            .unwrap_or(0)
                    };
                    return Ok(Outcome {
                        rc,
                        steps: done,
                        freezes,
                    });
                }
                Err(error) => {
                    let report =
                        after_freeze(transcript, &mut remaining, &mut done, attempt, error)?;
                    println!("xtask: {report}; its last console lines:");
                    for line in &report.last_lines {
                        println!("xtask:   | {}", strip_ansi(line));
                    }
                    freezes.push(report);
                    if freezes.len() > options.freeze_retries as usize {
                        return Err(Error::Frozen(freezes));
                    }
                    let resume = remaining
                        .first()
                        .map_or("(no steps left)".to_owned(), |step| step.label.clone());
                    println!(
                        "{FROZEN_RETRY_PREFIX} {} of {}: booting L1 again, resuming at `{resume}`",
                        freezes.len(),
                        options.freeze_retries
                    );
                }
            }
        }
    }

    /// Writes the image with `init` and boots it once.
    fn boot_once(
        &mut self,
        init: &InitScript,
        options: MachineOptions,
    ) -> Result<(Transcript, qemu::Result<qemu::RunStats>)> {
        let script = init.render().into_bytes();
        self.tree
            .add_file(&"/init".parse()?, FileSource::Bytes(script), 0o755);
        let initrd = self.scratch.path().join("initrd.cpio");
        let file = File::create(&initrd).map_err(|source| Error::CreateInitrd {
            path: initrd.clone(),
            source,
        })?;
        self.tree.write(BufWriter::new(file))?;

        let machine = Machine {
            kernel: self.kernel.vmlinuz.clone(),
            initrd,
            smp: options.smp,
            mem_mib: options.mem_mib,
            heartbeat: self.scratch.path().join("heartbeat"),
        };
        eprintln!(
            "xtask: booting L1 ({}, {} vCPUs, {} MiB)",
            self.kernel.release, options.smp, options.mem_mib
        );
        let started = Instant::now();
        let mut transcript = Transcript::default();
        let watchdog = qemu::Watchdog {
            timeout: options.timeout,
            silence: options.silence,
            boot_silence: options.boot_silence,
        };
        let result = machine.run(watchdog, |line| {
            if let Some(Marker::Begin { label }) = transcript.observe(line) {
                println!("{}", step_header(&label));
            } else {
                // Firmware and tests may send terminal control sequences (SeaBIOS starts
                // with a terminal reset); keep them away from the user's terminal.
                println!("{}", strip_ansi(line));
            }
        });
        eprintln!("xtask: L1 ran for {:.1} s", started.elapsed().as_secs_f64());
        match result {
            Ok(stats) => Ok((transcript, Ok(stats))),
            Err(frozen @ qemu::Error::Frozen { .. }) => Ok((transcript, Err(frozen))),
            Err(other) => Err(other.into()),
        }
    }
}

/// The variable that tells a step which boot of L1 it runs in (1 for the first).
pub const ATTEMPT_ENV: &str = "NESTED_ATTEMPT";

/// The line printed on the host before a step's output in L1.
pub fn step_header(label: &str) -> String {
    format!("{STEP_HEADER_RULE} L1: {label} {STEP_HEADER_RULE}")
}

/// The step label of a line printed by [`step_header`].
pub fn parse_step_header(line: &str) -> Option<&str> {
    line.trim_end()
        .strip_prefix(STEP_HEADER_RULE)?
        .strip_suffix(STEP_HEADER_RULE)?
        .trim()
        .strip_prefix("L1: ")
}

const STEP_HEADER_RULE: &str = "====================";

#[cfg(test)]
mod tests {
    use super::*;

    fn step(label: &str) -> Step {
        Step {
            label: label.into(),
            argv: vec!["true".into()],
        }
    }

    fn frozen() -> qemu::Error {
        qemu::Error::Frozen {
            stuck: None,
            silent_for: Duration::from_secs(60),
            after: Duration::from_secs(100),
            last_lines: vec!["test b ... ".into()],
        }
    }

    #[test]
    fn a_freeze_resumes_at_the_running_step_and_keeps_the_ended_ones() {
        let mut transcript = Transcript::default();
        for line in [
            "NESTED-BEGIN a",
            "test result: ok. 1 passed",
            "NESTED-END a rc=0",
            "NESTED-BEGIN b",
        ] {
            transcript.observe(line);
        }
        let mut remaining = vec![step("a"), step("b"), step("c")];
        let mut done = Vec::new();
        let report = after_freeze(transcript, &mut remaining, &mut done, 1, frozen()).unwrap();
        assert_eq!(report.step.as_deref(), Some("b"));
        assert_eq!(report.attempt, 1);
        assert_eq!(report.last_lines, ["test b ... "]);
        assert_eq!(
            remaining
                .iter()
                .map(|s| s.label.as_str())
                .collect::<Vec<_>>(),
            ["b", "c"]
        );
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].label, "a");
        let text = report.to_string();
        assert!(text.contains("during step `b`"), "{text}");
        assert!(text.contains("60 s"), "{text}");
    }

    #[test]
    fn a_freeze_before_any_step_reruns_everything() {
        let mut remaining = vec![step("a")];
        let mut done = Vec::new();
        let report = after_freeze(
            Transcript::default(),
            &mut remaining,
            &mut done,
            2,
            frozen(),
        )
        .unwrap();
        assert_eq!(report.step, None);
        assert_eq!(remaining.len(), 1);
        assert!(done.is_empty());
        assert!(report.to_string().contains("before any step ran"));
    }

    #[test]
    fn an_ended_boot_resumes_at_the_running_step() {
        let mut transcript = Transcript::default();
        for line in ["NESTED-BEGIN a", "NESTED-END a rc=0", "NESTED-BEGIN b"] {
            transcript.observe(line);
        }
        let mut remaining = vec![step("a"), step("b"), step("c")];
        let mut done = Vec::new();
        let report = after_lost_end(
            transcript,
            &mut remaining,
            &mut done,
            3,
            Duration::from_secs(580),
        );
        assert_eq!(report.step.as_deref(), Some("b"));
        assert!(report.ended);
        assert_eq!(remaining.len(), 2);
        assert_eq!(done.len(), 1);
        let text = report.to_string();
        assert!(
            text.contains("boot 3 during step `b`: L1 ended without reporting its result"),
            "{text}"
        );
    }

    #[test]
    fn only_a_freeze_is_retried() {
        let mut remaining = vec![step("a")];
        let mut done = Vec::new();
        let error = after_freeze(
            Transcript::default(),
            &mut remaining,
            &mut done,
            1,
            qemu::Error::Timeout(Duration::from_secs(900)),
        )
        .unwrap_err();
        assert!(matches!(error, qemu::Error::Timeout(_)));
        assert_eq!(remaining.len(), 1);
    }

    #[test]
    fn too_many_freezes_name_every_one() {
        let report = |attempt| FreezeReport {
            attempt,
            step: Some("x/kvm".into()),
            silent_for: Duration::from_secs(60),
            stuck: None,
            ended: false,
            after: Duration::from_secs(5),
            last_lines: Vec::new(),
        };
        let text = Error::Frozen(vec![report(1), report(2), report(3)]).to_string();
        assert!(
            text.starts_with("the test host froze 3 times, more than the 2 retries"),
            "{text}"
        );
        assert_eq!(text.matches("during step `x/kvm`").count(), 3, "{text}");
    }

    #[test]
    fn step_headers_round_trip() {
        let header = step_header("vm-types/kvm");
        assert_eq!(parse_step_header(&header), Some("vm-types/kvm"));
        assert_eq!(parse_step_header("test result: ok."), None);
        assert_eq!(
            parse_step_header("==================== plain ===================="),
            None
        );
    }
}
