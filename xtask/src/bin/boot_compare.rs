//! Boot time to the marker line and peak resident memory: vmm-reference next to QEMU microvm.
//!
//! `boot_compare run` runs inside the nested kvm-amd test host (L1). It boots the same kernel,
//! initramfs and command line with vmm-reference and with `qemu-system-x86_64 -M microvm`, each
//! from the bzImage and from the ELF vmlinux through its PVH entry (vmm-reference also with
//! transparent huge pages off), one run of every variant per round, the order rotated round by
//! round, and for each run prints
//!
//! ```text
//! RUN vmm=<variant> boot_ms=<ms> guest_uptime_s=<s> maxrss_kib=<KiB> end=<exited|killed> [overhead_kib=<KiB>]
//! ```
//!
//! `overhead_kib` (vmm-reference only, from its `--profile` report) is the resident memory
//! outside guest RAM at exit, from `/proc/self/smaps`.
//!
//! `boot_ms` is the time from `spawn` to the first line holding the marker on the VMM's stdout
//! (the guest's serial console); `guest_uptime_s` is the guest's `/proc/uptime` that the marker
//! line carries; `maxrss_kib` is the process's `ru_maxrss` from `wait4(2)`, its peak resident
//! set over its whole life (guest memory that the guest touched included).
//!
//! `boot_compare summarize LOG...` runs on the host over the collected output of several L1
//! boots and prints the minimum and median of each VMM and the ratios ours/QEMU. The README's
//! section "Measured: boot time and peak memory against QEMU microvm" has the commands.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};

/// The marker line's prefix.
const MARKER: &str = xtask::guest::MARKER;

/// The command line of both guests: the demo's, with `quiet` so that the boot log does not
/// turn the measurement into one of serial-port throughput. The marker still reaches the
/// console (init writes it to the tty and to `/dev/kmsg` at level 2).
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// Errors of this program.
#[derive(Debug, thiserror::Error)]
enum Error {
    /// A VMM process could not be started.
    #[error("cannot start {vmm}")]
    Spawn {
        /// Which VMM.
        vmm: Vmm,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tiny guest could not be written.
    #[error("cannot write the tiny guest to {}", path.display())]
    WriteTiny {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `wait4(2)` failed.
    #[error("wait4 on the {vmm} process failed")]
    Wait {
        /// Which VMM.
        vmm: Vmm,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// A log file could not be read.
    #[error("cannot read {path}")]
    ReadLog {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `RUN` line in a log is malformed.
    #[error("{path}:{line}: malformed RUN line")]
    BadRun {
        /// Which file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// The runs hold no successful run of one VMM.
    #[error("no successful run of {0} in the logs")]
    NoRuns(&'static str),
}

/// Result of this program.
type Result<T> = std::result::Result<T, Error>;

/// The variants compared: a VMM and its boot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Vmm {
    /// vmm-reference, bzImage (64-bit boot protocol), `--huge-pages on`.
    OursBzimage,
    /// vmm-reference, ELF vmlinux through PVH, `--huge-pages on`.
    OursPvh,
    /// vmm-reference, PVH, guest RAM in 4 KiB pages (`--huge-pages off`).
    OursPvh4k,
    /// QEMU microvm, bzImage (through qboot and linuxboot_dma).
    QemuBzimage,
    /// QEMU microvm, ELF vmlinux through PVH.
    QemuPvh,
    /// vmm-reference, the tiny PVH guest of [`xtask::tiny_guest`] (prints the marker, no
    /// Linux): what the VMM costs before any guest work.
    OursTiny,
    /// QEMU microvm, the same tiny guest.
    QemuTiny,
}

/// Every variant, in table order.
const VARIANTS: [Vmm; 7] = [
    Vmm::OursBzimage,
    Vmm::OursPvh,
    Vmm::OursPvh4k,
    Vmm::QemuBzimage,
    Vmm::QemuPvh,
    Vmm::OursTiny,
    Vmm::QemuTiny,
];

/// Pairs whose ratios the summary prints: same boot path, and each VMM's fastest path.
const PAIRS: [(Vmm, Vmm); 5] = [
    (Vmm::OursBzimage, Vmm::QemuBzimage),
    (Vmm::OursPvh, Vmm::QemuPvh),
    (Vmm::OursPvh4k, Vmm::QemuPvh),
    (Vmm::OursPvh, Vmm::QemuBzimage),
    (Vmm::OursTiny, Vmm::QemuTiny),
];

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::OursBzimage => "ours-bzimage",
            Vmm::OursPvh => "ours-pvh",
            Vmm::OursPvh4k => "ours-pvh-4k",
            Vmm::QemuBzimage => "qemu-bzimage",
            Vmm::QemuPvh => "qemu-pvh",
            Vmm::OursTiny => "ours-tiny",
            Vmm::QemuTiny => "qemu-tiny",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Vmm::OursBzimage => "vmm-reference, bzImage, THP on (default)",
            Vmm::OursPvh => "vmm-reference, PVH, THP on (default)",
            Vmm::OursPvh4k => "vmm-reference, PVH, THP off",
            Vmm::QemuBzimage => "QEMU microvm, bzImage",
            Vmm::QemuPvh => "QEMU microvm, PVH",
            Vmm::OursTiny => "vmm-reference, tiny PVH guest (no Linux)",
            Vmm::QemuTiny => "QEMU microvm, tiny PVH guest (no Linux)",
        }
    }

    fn is_ours(self) -> bool {
        matches!(
            self,
            Vmm::OursBzimage | Vmm::OursPvh | Vmm::OursPvh4k | Vmm::OursTiny
        )
    }

    /// The tiny guest instead of Linux.
    fn is_tiny(self) -> bool {
        matches!(self, Vmm::OursTiny | Vmm::QemuTiny)
    }

    fn pvh(self) -> bool {
        matches!(self, Vmm::OursPvh | Vmm::OursPvh4k | Vmm::QemuPvh)
    }

    /// `ours` and `qemu` are the names of earlier logs, which had bzImage runs only.
    fn from_name(name: &str) -> Option<Vmm> {
        match name {
            "ours" => Some(Vmm::OursBzimage),
            "qemu" => Some(Vmm::QemuBzimage),
            _ => VARIANTS.into_iter().find(|v| v.name() == name),
        }
    }
}

impl std::fmt::Display for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Boot time and peak memory: vmm-reference against QEMU microvm.
#[derive(Debug, Parser)]
#[command(name = "boot_compare")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Boot every variant in turn (inside a host with hardware KVM) and print RUN lines.
    Run(Box<RunArgs>),
    /// Minimum and median per VMM, and ratios, over the RUN lines of the given logs.
    Summarize {
        /// Logs holding RUN lines (other lines are ignored).
        #[arg(required = true)]
        logs: Vec<PathBuf>,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// The vmm-reference binary.
    #[arg(long, default_value = "/bin/vmm-reference")]
    vmm_reference: PathBuf,
    /// The QEMU binary.
    #[arg(long, default_value = "/bin/qemu-system-x86_64")]
    qemu: PathBuf,
    /// QEMU's data directory (`-L`): it needs bios-microvm.bin and linuxboot_dma.bin.
    #[arg(long, default_value = "/data/qemu")]
    qemu_data: PathBuf,
    /// Guest kernel (bzImage).
    #[arg(long, default_value = "/data/bzImage")]
    kernel: PathBuf,
    /// The same kernel as an ELF vmlinux with a PVH note (`cargo xtask nested-kernel --vmlinux`).
    #[arg(long, default_value = "/data/vmlinux")]
    vmlinux: PathBuf,
    /// Where the tiny guest ([`xtask::tiny_guest`]) is written before the first run.
    #[arg(long, default_value = "/tmp/tiny-pvh.elf")]
    tiny: PathBuf,
    /// Guest initramfs (the vmm-reference default one: it prints the marker).
    #[arg(long, default_value = "/data/initramfs.cpio")]
    initramfs: PathBuf,
    /// Guest kernel command line, the same for both VMMs.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Rounds; each runs every variant once.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// The variants to run [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    variants: Vec<Vmm>,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u32,
    /// Rotate the order of the variants by this much in the first round (then by one more
    /// each round), so that separate test-host boots start with different variants.
    #[arg(long, default_value_t = 0)]
    rotate: usize,
    /// Seconds to wait for the marker before the run counts as failed.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Seconds the guest gets after the marker to power off before it is killed.
    #[arg(long, default_value_t = 10)]
    grace: u64,
    /// Also print the guest console, each line prefixed with `[<vmm>] ` (for diagnosis, e.g.
    /// with a command line without `quiet`; it adds work to the measured path).
    #[arg(long)]
    echo: bool,
}

/// How a run's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// It exited by itself (the guest powered off).
    Exited,
    /// It was killed after the grace period or the timeout.
    Killed,
}

/// One measured run.
#[derive(Debug, Clone, PartialEq)]
struct RunRecord {
    vmm: Vmm,
    /// Spawn to marker, in milliseconds; `None` if the marker never came.
    boot_ms: Option<f64>,
    /// The guest's uptime that the marker line reports.
    guest_uptime_s: Option<f64>,
    /// Peak resident set, KiB.
    maxrss_kib: u64,
    end: End,
    /// vmm-reference's resident memory outside guest RAM at exit, KiB.
    overhead_kib: Option<u64>,
}

impl RunRecord {
    fn line(&self) -> String {
        let opt = |v: Option<f64>, prec: usize| match v {
            Some(v) => format!("{v:.prec$}"),
            None => "none".to_string(),
        };
        let mut line = format!(
            "RUN vmm={} boot_ms={} guest_uptime_s={} maxrss_kib={} end={}",
            self.vmm,
            opt(self.boot_ms, 1),
            opt(self.guest_uptime_s, 2),
            self.maxrss_kib,
            match self.end {
                End::Exited => "exited",
                End::Killed => "killed",
            }
        );
        if let Some(kib) = self.overhead_kib {
            line.push_str(&format!(" overhead_kib={kib}"));
        }
        line
    }
}

/// Parses the `RUN ...` part of a line (anything before `RUN ` is ignored: the serial console
/// of the test host may prefix it). `Ok(None)` for lines that hold no RUN record.
fn parse_run(line: &str) -> std::result::Result<Option<RunRecord>, ()> {
    let Some(start) = line.find("RUN vmm=") else {
        return Ok(None);
    };
    let mut vmm = None;
    let mut boot_ms = None;
    let mut uptime = None;
    let mut maxrss = None;
    let mut end = None;
    let mut overhead = None;
    let num = |v: &str| -> std::result::Result<Option<f64>, ()> {
        if v == "none" {
            return Ok(None);
        }
        match v.parse::<f64>() {
            Ok(x) if x.is_finite() && x >= 0.0 => Ok(Some(x)),
            _ => Err(()),
        }
    };
    for field in line[start + 4..].split_whitespace() {
        let (key, value) = field.split_once('=').ok_or(())?;
        match key {
            "vmm" => vmm = Some(Vmm::from_name(value).ok_or(())?),
            "boot_ms" => boot_ms = Some(num(value)?),
            "guest_uptime_s" => uptime = Some(num(value)?),
            "maxrss_kib" => maxrss = Some(value.parse::<u64>().map_err(|_| ())?),
            "overhead_kib" => overhead = Some(value.parse::<u64>().map_err(|_| ())?),
            "end" => {
                end = Some(match value {
                    "exited" => End::Exited,
                    "killed" => End::Killed,
                    _ => return Err(()),
                })
            }
            _ => return Err(()),
        }
    }
    Ok(Some(RunRecord {
        vmm: vmm.ok_or(())?,
        boot_ms: boot_ms.ok_or(())?,
        guest_uptime_s: uptime.ok_or(())?,
        maxrss_kib: maxrss.ok_or(())?,
        end: end.ok_or(())?,
        overhead_kib: overhead,
    }))
}

/// The guest uptime in a marker line (`... uptime=S`).
fn marker_uptime(line: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("uptime="))
        .and_then(|v| v.trim().parse().ok())
}

/// Minimum and median of a sample; `None` when it is empty. The median of an even count is
/// the mean of the two middle values.
fn min_median(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((v[0], median))
}

/// The statistics of one VMM over a set of runs.
#[derive(Debug, Clone, PartialEq)]
struct Stats {
    runs: usize,
    failed: usize,
    boot_min_ms: f64,
    boot_median_ms: f64,
    uptime_median_s: Option<f64>,
    rss_min_kib: f64,
    rss_median_kib: f64,
    rss_max_kib: f64,
    killed: usize,
    /// Median of the VMM overhead outside guest RAM, KiB (vmm-reference only).
    overhead_median_kib: Option<f64>,
    overhead_max_kib: Option<f64>,
}

fn stats(records: &[RunRecord], vmm: Vmm) -> Option<Stats> {
    let mine: Vec<&RunRecord> = records.iter().filter(|r| r.vmm == vmm).collect();
    let ok: Vec<&RunRecord> = mine
        .iter()
        .copied()
        .filter(|r| r.boot_ms.is_some())
        .collect();
    let boots: Vec<f64> = ok.iter().filter_map(|r| r.boot_ms).collect();
    let uptimes: Vec<f64> = ok.iter().filter_map(|r| r.guest_uptime_s).collect();
    let rss: Vec<f64> = ok.iter().map(|r| r.maxrss_kib as f64).collect();
    let overheads: Vec<f64> = ok
        .iter()
        .filter_map(|r| r.overhead_kib.map(|k| k as f64))
        .collect();
    let (boot_min_ms, boot_median_ms) = min_median(&boots)?;
    let (rss_min_kib, rss_median_kib) = min_median(&rss)?;
    Some(Stats {
        runs: ok.len(),
        failed: mine.len() - ok.len(),
        boot_min_ms,
        boot_median_ms,
        uptime_median_s: min_median(&uptimes).map(|(_, m)| m),
        rss_min_kib,
        rss_median_kib,
        rss_max_kib: rss.iter().copied().fold(0.0, f64::max),
        killed: ok.iter().filter(|r| r.end == End::Killed).count(),
        overhead_median_kib: min_median(&overheads).map(|(_, m)| m),
        overhead_max_kib: overheads.iter().copied().reduce(f64::max),
    })
}

/// What is left of each VMM's PVH boot once its tiny-guest boot (the VMM's fixed cost) is taken
/// off, by median: the guest's own work plus loading its kernel. Empty without those runs.
fn guest_share(all: &[(Vmm, Stats)]) -> String {
    let median = |v: Vmm| {
        all.iter()
            .find(|(w, _)| *w == v)
            .map(|(_, s)| s.boot_median_ms)
    };
    let (Some(op), Some(ot), Some(qp), Some(qt)) = (
        median(Vmm::OursPvh),
        median(Vmm::OursTiny),
        median(Vmm::QemuPvh),
        median(Vmm::QemuTiny),
    ) else {
        return String::new();
    };
    format!(
        "\nPVH boot, median, split at the tiny guest's median (the VMM's fixed cost): \
         ours {ot:.0} + {:.0} ms, QEMU {qt:.0} + {:.0} ms; the rest (guest work and loading \
         the kernel) ours/QEMU {:.2}.\n",
        op - ot,
        qp - qt,
        (op - ot) / (qp - qt)
    )
}

/// The summary (Markdown): a row per variant with runs, then the ratios of [`PAIRS`] and the
/// ratio of each VMM's fastest variant (by median boot time). Errors when no vmm-reference or
/// no QEMU variant has a successful run.
fn summary(records: &[RunRecord]) -> Result<String> {
    let all: Vec<(Vmm, Stats)> = VARIANTS
        .into_iter()
        .filter_map(|v| stats(records, v).map(|s| (v, s)))
        .collect();
    let fastest = |ours: bool| {
        all.iter()
            .filter(|(v, _)| v.is_ours() == ours && !v.is_tiny())
            .min_by(|a, b| a.1.boot_median_ms.total_cmp(&b.1.boot_median_ms))
    };
    if !all.iter().any(|(v, _)| v.is_ours()) {
        return Err(Error::NoRuns("vmm-reference"));
    }
    if !all.iter().any(|(v, _)| !v.is_ours()) {
        return Err(Error::NoRuns("QEMU"));
    }
    let up = |s: &Stats| {
        s.uptime_median_s
            .map_or_else(|| "-".to_string(), |u| format!("{u:.2}"))
    };
    let mib = |k: f64| k / 1024.0;
    let mut out = String::new();
    out.push_str(
        "| | runs (failed) | boot min ms | boot median ms | guest uptime at marker, median s | \
         peak RSS median MiB | peak RSS max MiB | VMM overhead median (max) MiB |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (v, s) in &all {
        let overhead = match (s.overhead_median_kib, s.overhead_max_kib) {
            (Some(m), Some(x)) => format!("{:.2} ({:.2})", mib(m), mib(x)),
            _ => "-".to_string(),
        };
        out.push_str(&format!(
            "| {} | {} ({}) | {:.0} | {:.0} | {} | {:.1} | {:.1} | {overhead} |\n",
            v.label(),
            s.runs,
            s.failed,
            s.boot_min_ms,
            s.boot_median_ms,
            up(s),
            mib(s.rss_median_kib),
            mib(s.rss_max_kib)
        ));
    }
    let mut ratio_rows: Vec<(String, &Stats, &Stats)> = PAIRS
        .iter()
        .filter_map(|(a, b)| {
            let sa = &all.iter().find(|(v, _)| v == a)?.1;
            let sb = &all.iter().find(|(v, _)| v == b)?.1;
            Some((format!("{} / {}", a.name(), b.name()), sa, sb))
        })
        .collect();
    // Linux boots only: the tiny guest is no way to boot Linux.
    if let (Some(best_ours), Some(best_qemu)) = (fastest(true), fastest(false)) {
        ratio_rows.push((
            format!("fastest: {} / {}", best_ours.0.name(), best_qemu.0.name()),
            &best_ours.1,
            &best_qemu.1,
        ));
    }
    out.push_str(
        "\n| ratio | boot min | boot median | peak RSS median | peak RSS max |\n|---|---|---|---|---|\n",
    );
    for (name, a, b) in ratio_rows {
        out.push_str(&format!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            a.boot_min_ms / b.boot_min_ms,
            a.boot_median_ms / b.boot_median_ms,
            a.rss_median_kib / b.rss_median_kib,
            a.rss_max_kib / b.rss_max_kib
        ));
    }
    out.push_str(&guest_share(&all));
    let killed: Vec<String> = all
        .iter()
        .filter(|(_, s)| s.killed > 0)
        .map(|(v, s)| format!("{} {}", v.name(), s.killed))
        .collect();
    if !killed.is_empty() {
        out.push_str(&format!(
            "\nKilled after the marker (no power-off within the grace period): {}.\n",
            killed.join(", ")
        ));
    }
    Ok(out)
}

/// The command line of one VMM for `args`.
fn vmm_command(vmm: Vmm, args: &RunArgs) -> Command {
    let cmdline = format!("{} vmmref.end=poweroff", args.cmdline);
    let kernel = if vmm.is_tiny() {
        &args.tiny
    } else if vmm.pvh() {
        &args.vmlinux
    } else {
        &args.kernel
    };
    if vmm.is_ours() {
        let mut c = Command::new(&args.vmm_reference);
        let huge_pages = if vmm == Vmm::OursPvh4k { "off" } else { "on" };
        c.arg("boot").arg("--kernel").arg(kernel);
        if !vmm.is_tiny() {
            c.arg("--initramfs").arg(&args.initramfs);
        }
        c.args(["--vcpus", &args.vcpus.to_string()])
            .args(["--mem-mib", &args.mem_mib.to_string()])
            .args(["--huge-pages", huge_pages])
            .arg("--profile")
            .arg("--cmdline")
            .arg(cmdline);
        c
    } else {
        let mut c = Command::new(&args.qemu);
        c.args(["-M", "microvm,rtc=on", "-enable-kvm", "-cpu", "host"])
            .args(["-m", &args.mem_mib.to_string()])
            .args(["-smp", &args.vcpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-no-reboot"])
            .arg("-L")
            .arg(&args.qemu_data)
            .arg("-kernel")
            .arg(kernel);
        if !vmm.is_tiny() {
            c.arg("-initrd").arg(&args.initramfs);
        }
        c.arg("-append").arg(cmdline);
        c
    }
}

/// The overhead line of vmm-reference's `--profile` report (`VMM outside guest RAM X MiB`),
/// in KiB.
fn profile_overhead_kib(line: &str) -> Option<u64> {
    let rest = line.split("VMM outside guest RAM ").nth(1)?;
    let mib: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Some((mib * 1024.0).round() as u64)
}

/// `wait4(2)` on `pid`; with `nohang`, `Ok(None)` while it still runs. Returns `ru_maxrss`.
fn wait4(pid: libc::pid_t, nohang: bool, vmm: Vmm) -> Result<Option<u64>> {
    let mut status = 0;
    // SAFETY: all-zero is a valid `rusage` (plain integers and timevals).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = if nohang { libc::WNOHANG } else { 0 };
    loop {
        // SAFETY: `status` and `usage` are valid for writes for the duration of the call; `pid`
        // is our own unreaped child, so no other process can be reaped by mistake.
        let rc = unsafe { libc::wait4(pid, &mut status, flags, &mut usage) };
        if rc == pid {
            // ru_maxrss is in KiB on Linux and never negative.
            return Ok(Some(u64::try_from(usage.ru_maxrss).unwrap_or(0)));
        }
        if rc == 0 {
            return Ok(None);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::Wait { vmm, source: err });
        }
    }
}

/// Sends SIGKILL to our child `pid` (not yet reaped, so the pid cannot have been reused).
fn kill(pid: libc::pid_t) {
    // SAFETY: plain syscall on our own unreaped child; a failure (it exited meanwhile) is
    // harmless because the reap that follows collects it either way.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// One run: spawn, wait for the marker, give the guest time to power off, reap.
fn run_once(vmm: Vmm, args: &RunArgs) -> Result<RunRecord> {
    let mut cmd = vmm_command(vmm, args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    if vmm.is_ours() {
        cmd.stderr(Stdio::piped());
    }
    let start = Instant::now();
    let mut child: Child = cmd.spawn().map_err(|source| Error::Spawn { vmm, source })?;
    let pid = child.id() as libc::pid_t;
    let profile = child.stderr.take().map(|err| {
        thread::spawn(move || {
            BufReader::new(err)
                .lines()
                .map_while(|l| l.ok())
                .find_map(|l| profile_overhead_kib(&l))
        })
    });
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let echo = args.echo;
    let reader = child.stdout.take().map(|out| {
        thread::spawn(move || {
            // Drain to EOF so the VMM never blocks on a full pipe; lines after the marker go
            // nowhere once the receiver is gone.
            for line in BufReader::new(out).split(b'\n').map_while(|l| l.ok()) {
                if echo {
                    println!("[{vmm}] {}", String::from_utf8_lossy(&line).trim_end());
                }
                let _ = tx.send((Instant::now(), String::from_utf8_lossy(&line).into_owned()));
            }
        })
    });
    let deadline = start + Duration::from_secs(args.timeout);
    let mut boot_ms = None;
    let mut guest_uptime_s = None;
    while boot_ms.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) if line.contains(MARKER) => {
                boot_ms = Some(at.duration_since(start).as_secs_f64() * 1000.0);
                guest_uptime_s = marker_uptime(&line);
            }
            Ok(_) => {}
            // Timeout, or stdout closed (the VMM ended without the marker).
            Err(_) => break,
        }
    }
    drop(rx);
    let grace_end = Instant::now() + Duration::from_secs(args.grace);
    let mut end = End::Exited;
    let maxrss_kib = loop {
        if let Some(rss) = wait4(pid, true, vmm)? {
            break rss;
        }
        if boot_ms.is_none() || Instant::now() >= grace_end {
            kill(pid);
            end = End::Killed;
            break wait4(pid, false, vmm)?.unwrap_or(0);
        }
        thread::sleep(Duration::from_millis(5));
    };
    if let Some(r) = reader {
        let _ = r.join();
    }
    let overhead_kib = profile.and_then(|p| p.join().ok().flatten());
    Ok(RunRecord {
        vmm,
        boot_ms,
        guest_uptime_s,
        maxrss_kib,
        end,
        overhead_kib,
    })
}

fn run(args: &RunArgs) -> Result<bool> {
    let variants: Vec<Vmm> = if args.variants.is_empty() {
        VARIANTS.to_vec()
    } else {
        args.variants.clone()
    };
    println!(
        "BOOT-COMPARE-BEGIN runs={} vcpus={} mem_mib={} rotate={} cmdline={:?}",
        args.runs, args.vcpus, args.mem_mib, args.rotate, args.cmdline
    );
    if variants.iter().any(|v| v.is_tiny()) {
        std::fs::write(&args.tiny, xtask::tiny_guest::pvh_elf()).map_err(|source| {
            Error::WriteTiny {
                path: args.tiny.clone(),
                source,
            }
        })?;
    }
    let mut records = Vec::new();
    for round in 0..args.runs as usize {
        let mut order = variants.clone();
        order.rotate_left((args.rotate + round) % variants.len());
        for vmm in order {
            let r = run_once(vmm, args)?;
            println!("{}", r.line());
            records.push(r);
        }
    }
    let all_ok = records.iter().all(|r| r.boot_ms.is_some());
    match summary(&records) {
        Ok(table) => println!("BOOT-COMPARE-L1-SUMMARY\n{table}"),
        Err(e) => println!("BOOT-COMPARE-L1-SUMMARY unavailable: {e}"),
    }
    Ok(all_ok)
}

/// For each boot of the test host (a group of runs), the ratio a/b of the median boot times;
/// groups without a successful run of both are left out. Pairing within a boot takes out the
/// boot-to-boot variation of the nested host.
fn per_boot_ratios(groups: &[Vec<RunRecord>], a: Vmm, b: Vmm) -> Vec<f64> {
    groups
        .iter()
        .filter_map(|g| {
            let sa = stats(g, a)?;
            let sb = stats(g, b)?;
            Some(sa.boot_median_ms / sb.boot_median_ms)
        })
        .collect()
}

fn summarize(logs: &[PathBuf]) -> Result<String> {
    // One group per BOOT-COMPARE-BEGIN line (RUN lines before the first one form their own).
    let mut groups: Vec<Vec<RunRecord>> = vec![Vec::new()];
    for path in logs {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadLog {
            path: path.clone(),
            source,
        })?;
        for (i, line) in text.lines().enumerate() {
            // The nested runner's own lines, among them a frozen host's last console lines
            // quoted in its report: those runs were already counted where they were printed.
            if line.trim_start().starts_with("xtask:") {
                continue;
            }
            if line.contains("BOOT-COMPARE-BEGIN") {
                groups.push(Vec::new());
            }
            match parse_run(line) {
                Ok(Some(r)) => {
                    if let Some(group) = groups.last_mut() {
                        group.push(r);
                    }
                }
                Ok(None) => {}
                Err(()) => {
                    return Err(Error::BadRun {
                        path: path.clone(),
                        line: i + 1,
                    })
                }
            }
        }
    }
    let records: Vec<RunRecord> = groups.iter().flatten().cloned().collect();
    let boots = groups.len() - 1;
    let mut out = format!(
        "{} runs over {boots} boots of the test host\n\n{}",
        records.len(),
        summary(&records)?
    );
    let mut first = true;
    for (a, b) in PAIRS {
        let ratios = per_boot_ratios(&groups, a, b);
        if let Some((min, median)) = min_median(&ratios) {
            if first {
                out.push_str("\nPer test-host boot, median boot time:\n");
                first = false;
            }
            let list: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            let max = ratios.iter().copied().fold(f64::MIN, f64::max);
            out.push_str(&format!(
                "- {}/{}: {} (min {min:.2}, median {median:.2}, max {max:.2})\n",
                a.name(),
                b.name(),
                list.join(", ")
            ));
        }
    }
    Ok(out)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Cmd::Run(args) => run(args),
        Cmd::Summarize { logs } => summarize(logs).map(|s| {
            print!("{s}");
            true
        }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("boot_compare: some runs never printed the marker");
            ExitCode::FAILURE
        }
        Err(e) => {
            let mut msg = format!("boot_compare: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(vmm: Vmm, boot: Option<f64>, rss: u64) -> RunRecord {
        RunRecord {
            vmm,
            boot_ms: boot,
            guest_uptime_s: boot.map(|_| 1.25),
            maxrss_kib: rss,
            end: End::Exited,
            overhead_kib: None,
        }
    }

    #[test]
    fn run_lines_round_trip() {
        for r in [
            rec(Vmm::OursBzimage, Some(1234.5), 40_000),
            rec(Vmm::QemuBzimage, None, 1),
            RunRecord {
                end: End::Killed,
                ..rec(Vmm::QemuBzimage, Some(7.0), 9)
            },
            RunRecord {
                overhead_kib: Some(2900),
                ..rec(Vmm::OursPvh4k, Some(7.0), 9)
            },
        ] {
            assert_eq!(parse_run(&r.line()), Ok(Some(r.clone())));
            // A console prefix (carriage return, timestamps) is ignored.
            assert_eq!(
                parse_run(&format!("\r[L1] {}\r", r.line().trim())),
                Ok(Some(r.clone()))
            );
        }
    }

    #[test]
    fn other_lines_are_not_runs_and_bad_runs_are_errors() {
        assert_eq!(
            parse_run("VMM-REFERENCE-BOOT-OK cpus=1 uptime=1.0"),
            Ok(None)
        );
        assert_eq!(parse_run(""), Ok(None));
        for bad in [
            "RUN vmm=xen boot_ms=1 guest_uptime_s=1 maxrss_kib=1 end=exited",
            "RUN vmm=ours boot_ms=-1 guest_uptime_s=1 maxrss_kib=1 end=exited",
            "RUN vmm=ours boot_ms=NaN guest_uptime_s=1 maxrss_kib=1 end=exited",
            "RUN vmm=ours boot_ms=1 guest_uptime_s=1 maxrss_kib=x end=exited",
            "RUN vmm=ours boot_ms=1 guest_uptime_s=1 maxrss_kib=1 end=gone",
            "RUN vmm=ours boot_ms=1 guest_uptime_s=1 maxrss_kib=1",
            "RUN vmm=ours boot_ms=1 guest_uptime_s=1 maxrss_kib=1 end=exited extra",
            "RUN vmm=ours boot_ms=1 guest_uptime_s=1 maxrss_kib=1 end=exited x=1",
        ] {
            assert_eq!(parse_run(bad), Err(()), "{bad}");
        }
    }

    #[test]
    fn marker_uptime_is_read() {
        assert_eq!(
            marker_uptime("VMM-REFERENCE-BOOT-OK cpus=1 uptime=2.53\r"),
            Some(2.53)
        );
        assert_eq!(marker_uptime("VMM-REFERENCE-BOOT-OK cpus=1"), None);
        assert_eq!(marker_uptime("uptime=x"), None);
    }

    #[test]
    fn min_and_median() {
        assert_eq!(min_median(&[]), None);
        assert_eq!(min_median(&[5.0]), Some((5.0, 5.0)));
        assert_eq!(min_median(&[9.0, 1.0, 5.0]), Some((1.0, 5.0)));
        assert_eq!(min_median(&[4.0, 1.0, 2.0, 3.0]), Some((1.0, 2.5)));
    }

    #[test]
    fn stats_leave_failed_runs_out_and_count_them() {
        let records = vec![
            rec(Vmm::OursBzimage, Some(300.0), 30_000),
            rec(Vmm::QemuBzimage, Some(200.0), 100_000),
            rec(Vmm::OursBzimage, None, 5),
            rec(Vmm::QemuBzimage, Some(400.0), 120_000),
            rec(Vmm::OursBzimage, Some(100.0), 20_000),
            rec(Vmm::QemuBzimage, Some(600.0), 110_000),
        ];
        let ours = stats(&records, Vmm::OursBzimage).expect("ours has runs");
        assert_eq!((ours.runs, ours.failed), (2, 1));
        assert_eq!((ours.boot_min_ms, ours.boot_median_ms), (100.0, 200.0));
        assert_eq!(ours.rss_max_kib, 30_000.0);
        let qemu = stats(&records, Vmm::QemuBzimage).expect("qemu has runs");
        assert_eq!((qemu.boot_min_ms, qemu.boot_median_ms), (200.0, 400.0));
        assert_eq!(qemu.rss_median_kib, 110_000.0);
        let table = summary(&records).expect("both have runs");
        // ours/QEMU: min 100/200, median 200/400, RSS median 25000/110000.
        assert!(
            table.contains("| ours-bzimage / qemu-bzimage | 0.50 | 0.50 | 0.23 | 0.25 |"),
            "{table}"
        );
        assert!(
            table.contains("| fastest: ours-bzimage / qemu-bzimage | 0.50 | 0.50 |"),
            "{table}"
        );
    }

    #[test]
    fn per_boot_ratios_pair_runs_within_a_boot() {
        let groups = vec![
            vec![
                rec(Vmm::OursBzimage, Some(30.0), 1),
                rec(Vmm::QemuBzimage, Some(20.0), 1),
            ],
            vec![rec(Vmm::OursBzimage, Some(5.0), 1)],
            vec![
                rec(Vmm::QemuBzimage, Some(100.0), 1),
                rec(Vmm::OursBzimage, Some(50.0), 1),
                rec(Vmm::QemuBzimage, Some(300.0), 1),
                rec(Vmm::OursBzimage, Some(150.0), 1),
            ],
        ];
        assert_eq!(
            per_boot_ratios(&groups, Vmm::OursBzimage, Vmm::QemuBzimage),
            vec![1.5, 0.5]
        );
        assert!(per_boot_ratios(&groups, Vmm::OursPvh, Vmm::QemuPvh).is_empty());
    }

    #[test]
    fn tiny_guests_split_the_pvh_boot_and_are_never_the_fastest() {
        let records = vec![
            rec(Vmm::OursPvh, Some(3000.0), 1),
            rec(Vmm::QemuPvh, Some(5000.0), 1),
            rec(Vmm::OursTiny, Some(500.0), 1),
            rec(Vmm::QemuTiny, Some(1000.0), 1),
        ];
        let table = summary(&records).expect("both have runs");
        assert!(
            table.contains("| fastest: ours-pvh / qemu-pvh | 0.60 |"),
            "{table}"
        );
        assert!(
            table.contains("| ours-tiny / qemu-tiny | 0.50 |"),
            "{table}"
        );
        // The rest: 2500 ms against 4000 ms.
        assert!(
            table.contains(
                "ours 500 + 2500 ms, QEMU 1000 + 4000 ms; the rest (guest work and \
                 loading the kernel) ours/QEMU 0.62."
            ),
            "{table}"
        );
        // Without tiny runs there is no split; with tiny runs only, no fastest.
        let table = summary(&records[..2]).expect("both have runs");
        assert!(!table.contains("split at the tiny guest"), "{table}");
        let table = summary(&records[2..]).expect("both have runs");
        assert!(!table.contains("fastest"), "{table}");
        assert!(
            table.contains("| ours-tiny / qemu-tiny | 0.50 |"),
            "{table}"
        );
    }

    #[test]
    fn summary_needs_both_vmms() {
        let only_ours = vec![rec(Vmm::OursBzimage, Some(1.0), 1)];
        assert!(matches!(summary(&only_ours), Err(Error::NoRuns("QEMU"))));
        let failed_qemu = vec![
            rec(Vmm::OursBzimage, Some(1.0), 1),
            rec(Vmm::QemuBzimage, None, 1),
        ];
        assert!(matches!(summary(&failed_qemu), Err(Error::NoRuns("QEMU"))));
    }

    #[test]
    fn summarize_reads_logs_and_rejects_bad_lines() {
        let dir = std::env::temp_dir().join(format!("boot_compare_test_{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = dir.join("good.log");
        let mut text = String::from("noise\nBOOT-COMPARE-BEGIN runs=1\n");
        text.push_str(&rec(Vmm::OursBzimage, Some(10.0), 2048).line());
        text.push('\n');
        // A frozen host's report quotes its last console lines; they count once.
        text.push_str("xtask:   | BOOT-COMPARE-BEGIN runs=1\n");
        text.push_str(&format!(
            "xtask:   | {}\n",
            rec(Vmm::OursBzimage, Some(10.0), 2048).line()
        ));
        text.push_str(&rec(Vmm::QemuBzimage, Some(20.0), 4096).line());
        text.push_str("\nBOOT-COMPARE-BEGIN runs=1\n");
        std::fs::write(&good, text).expect("write log");
        let out = summarize(std::slice::from_ref(&good)).expect("summary");
        assert!(out.starts_with("2 runs over 2 boots"), "{out}");
        assert!(
            out.contains("| vmm-reference, bzImage, THP on (default) | 1 (0) | 10 | 10 |"),
            "{out}"
        );
        // One boot with both VMMs: 10/20; the empty second boot is left out.
        assert!(
            out.contains("- ours-bzimage/qemu-bzimage: 0.50 (min 0.50, median 0.50, max 0.50)"),
            "{out}"
        );
        let bad = dir.join("bad.log");
        std::fs::write(&bad, "x\nRUN vmm=ours\n").expect("write log");
        assert!(matches!(
            summarize(&[bad]),
            Err(Error::BadRun { line: 2, .. })
        ));
        assert!(matches!(
            summarize(&[dir.join("missing.log")]),
            Err(Error::ReadLog { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn qemu_and_ours_get_the_same_guest() {
        let cli = Cli::try_parse_from(["x", "run", "--runs", "1"]).expect("defaults parse");
        let Cmd::Run(args) = cli.command else {
            panic!("parsed as another subcommand")
        };
        let argv = |c: Command| -> Vec<String> {
            c.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let cmdline = format!("{DEFAULT_CMDLINE} vmmref.end=poweroff");
        for v in VARIANTS {
            let a = argv(vmm_command(v, &args));
            assert!(a.contains(&cmdline), "{v:?}: {a:?}");
            let kernel = if v.is_tiny() {
                "/tmp/tiny-pvh.elf"
            } else if v.pvh() {
                "/data/vmlinux"
            } else {
                "/data/bzImage"
            };
            assert!(a.contains(&kernel.to_string()), "{v:?}: {a:?}");
            assert_eq!(
                a.contains(&"/data/initramfs.cpio".to_string()),
                !v.is_tiny(),
                "{v:?}: {a:?}"
            );
            if v.is_ours() {
                let thp = if v == Vmm::OursPvh4k { "off" } else { "on" };
                assert!(a.windows(2).any(|w| w == ["--huge-pages", thp]), "{a:?}");
                assert!(a.contains(&"--profile".to_string()), "{a:?}");
            } else {
                assert!(a.contains(&"microvm,rtc=on".to_string()), "{a:?}");
            }
            assert_eq!(Vmm::from_name(v.name()), Some(v));
        }
        assert_eq!(Vmm::from_name("ours"), Some(Vmm::OursBzimage));
        assert_eq!(Vmm::from_name("qemu"), Some(Vmm::QemuBzimage));
    }

    #[test]
    fn overhead_is_read_from_the_profile_report() {
        let line =
            "  memory at exit: guest RAM resident 41.2 of 256.0 MiB mapped (0.0 MiB in huge \
                    pages); VMM outside guest RAM 2.9 MiB; peak RSS 45.0 MiB";
        assert_eq!(profile_overhead_kib(line), Some(2970));
        assert_eq!(profile_overhead_kib("VMM outside guest RAM x MiB"), None);
        assert_eq!(profile_overhead_kib("no such line"), None);
    }
}
