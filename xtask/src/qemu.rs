//! Booting L1: QEMU's TCG emulator with an SVM-capable CPU model, console on stdout.
//!
//! TCG implements AMD SVM, so a Linux guest on `-cpu EPYC,+svm` can load `kvm-amd` even
//! though the host's own `/dev/kvm` has neither VMX nor SVM. QEMU warns once per vCPU for each
//! EPYC feature TCG lacks ("TCG doesn't support requested feature"); those warnings are
//! expected and harmless, and are dropped from QEMU's stderr.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::command::CommandLine;

/// The QEMU system emulator binary (Debian package `qemu-system-x86`).
const QEMU: &str = "qemu-system-x86_64";

/// The text of QEMU's expected warnings about CPU model features TCG cannot emulate.
const TCG_FEATURE_WARNING: &str = "TCG doesn't support requested feature";

/// How many console lines a [`Error::Frozen`] report keeps.
pub const LAST_LINES: usize = 20;

/// Errors from running QEMU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// QEMU could not be started.
    #[error("cannot start `{command}` (is qemu-system-x86 installed?)")]
    Spawn {
        /// The command line.
        command: CommandLine,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for QEMU failed.
    #[error("cannot wait for QEMU")]
    Wait(#[source] std::io::Error),
    /// L1 did not power off in time although it kept showing signs of life; QEMU was killed.
    #[error("L1 did not finish within {} s; QEMU was killed", .0.as_secs())]
    Timeout(Duration),
    /// L1 showed no sign of life (no console line, no heartbeat) for the silence limit, or
    /// its kernel reported a CPU stuck (a soft lockup or an RCU stall, which under TCG with
    /// nested SVM has been seen to last until the step's timeout): the test host itself
    /// froze. QEMU was killed.
    #[error("test host frozen: {}; QEMU was killed", match stuck {
        Some(line) => format!("its kernel reported a stuck CPU: {line}"),
        None => format!("no console output and no heartbeat for {} s", silent_for.as_secs()),
    })]
    Frozen {
        /// How long it had been silent when it was killed.
        silent_for: Duration,
        /// The kernel's stuck-CPU report that ended it, when that was the cause.
        stuck: Option<String>,
        /// How long after the start it was killed.
        after: Duration,
        /// The last console lines it printed, oldest first.
        last_lines: Vec<String>,
    },
    /// QEMU itself failed (bad arguments, missing kernel, ...), as opposed to L1 exiting.
    #[error("QEMU exited with {0}")]
    Failed(ExitStatus),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// When to give up on a running test host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watchdog {
    /// The longest the whole run may take.
    pub timeout: Duration,
    /// The longest the host may go without printing a console line or a heartbeat before it
    /// is declared frozen, once its heartbeat has started.
    pub silence: Duration,
    /// The same limit before the first heartbeat: the kernel boots with `quiet` and prints
    /// little before `/init` starts the heartbeat, and under load that phase alone has taken
    /// over 15 s.
    pub boot_silence: Duration,
}

/// What a run that ended showed of its own health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    /// The longest time between two signs of life (console lines or heartbeats), from the
    /// start: how close a healthy run came to the silence limit.
    pub longest_silence: Duration,
}

/// The emulated machine that runs L1.
#[derive(Debug, Clone)]
pub struct Machine {
    /// The bzImage to boot.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// Number of vCPUs.
    pub smp: u32,
    /// Memory in MiB.
    pub mem_mib: u32,
    /// The file behind L1's second serial port (`/dev/ttyS1`), where its `/init` writes a
    /// heartbeat. Kept apart from the console so that a heartbeat never lands in the middle
    /// of a test's output line.
    pub heartbeat: PathBuf,
}

impl Machine {
    /// The QEMU command line. `panic=-1` reboots on a panic and `-no-reboot` turns that
    /// reboot into an exit, so a crashed L1 ends QEMU instead of hanging. `-nic none` leaves
    /// out the network card, whose iPXE option ROM would add a second to every boot. The
    /// first serial port is the console on stdio (with QEMU's monitor multiplexed, as
    /// `-nographic` has it), the second the heartbeat file.
    pub fn command(&self) -> Command {
        let mut command = Command::new(QEMU);
        let mut heartbeat = std::ffi::OsString::from("file:");
        heartbeat.push(&self.heartbeat);
        command
            .args(["-accel", "tcg,thread=multi", "-cpu", "EPYC,+svm"])
            .args(["-smp", &self.smp.to_string()])
            .args(["-m", &self.mem_mib.to_string()])
            .args(["-nographic", "-no-reboot", "-nic", "none"])
            .args(["-serial", "mon:stdio", "-serial"])
            .arg(heartbeat)
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet"]);
        command
    }

    /// Boots the machine and calls `on_line` with each console line (lossily decoded, line
    /// terminator removed) until it powers off. Kills QEMU when `watchdog` says so.
    pub fn run(&self, watchdog: Watchdog, on_line: impl FnMut(&str)) -> Result<RunStats> {
        // A heartbeat file left from an earlier attempt must not count as life.
        let _ = std::fs::remove_file(&self.heartbeat);
        run_console(self.command(), &self.heartbeat, watchdog, on_line)
    }
}

/// Runs `command` (QEMU, or a stand-in in tests) with its stdout as the console: calls
/// `on_line` for each line, and treats a new line or growth of the file `heartbeat` as a sign
/// of life. Ends with [`Error::Frozen`] after `watchdog.silence` without one, and with
/// [`Error::Timeout`] after `watchdog.timeout` in all.
pub fn run_console(
    mut command: Command,
    heartbeat: &Path,
    watchdog: Watchdog,
    mut on_line: impl FnMut(&str),
) -> Result<RunStats> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            command: CommandLine::of(&command),
            source,
        })?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(kill(
            &mut child,
            Error::Wait(std::io::ErrorKind::BrokenPipe.into()),
        ));
    };
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|line| line.ok()) {
            if !line.contains(TCG_FEATURE_WARNING) {
                eprintln!("{line}");
            }
        }
    });
    let (lines_tx, lines) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut line = Vec::new();
        while matches!(stdout.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            if lines_tx.send(std::mem::take(&mut line)).is_err() {
                break;
            }
        }
    });

    let started = Instant::now();
    let deadline = started + watchdog.timeout;
    let mut last_life = started;
    let mut longest_silence = Duration::ZERO;
    let mut heartbeat_len = 0;
    let mut last_lines = VecDeque::with_capacity(LAST_LINES);
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(kill(&mut child, Error::Timeout(watchdog.timeout)));
        }
        let len = std::fs::metadata(heartbeat).map_or(0, |m| m.len());
        if len != heartbeat_len {
            heartbeat_len = len;
            longest_silence = longest_silence.max(now.duration_since(last_life));
            last_life = now;
        }
        let silent_for = now.duration_since(last_life);
        let limit = if heartbeat_len == 0 {
            watchdog.boot_silence.max(watchdog.silence)
        } else {
            watchdog.silence
        };
        if silent_for >= limit {
            let error = Error::Frozen {
                silent_for,
                stuck: None,
                after: now.duration_since(started),
                last_lines: last_lines.into(),
            };
            return Err(kill(&mut child, error));
        }
        let wait = POLL.min(deadline - now).min(limit - silent_for);
        match lines.recv_timeout(wait) {
            Ok(line) => {
                let now = Instant::now();
                longest_silence = longest_silence.max(now.duration_since(last_life));
                last_life = now;
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                if last_lines.len() == LAST_LINES {
                    last_lines.pop_front();
                }
                last_lines.push_back(text.to_owned());
                on_line(text);
                if STUCK_CPU_REPORTS.iter().any(|r| text.contains(r)) {
                    let error = Error::Frozen {
                        silent_for: Duration::ZERO,
                        stuck: Some(text.to_owned()),
                        after: now.duration_since(started),
                        last_lines: last_lines.into(),
                    };
                    return Err(kill(&mut child, error));
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
    // The reader only ends at EOF, which it has reached; it cannot have panicked.
    let _ = reader.join();
    let status = child.wait().map_err(Error::Wait)?;
    if status.success() {
        Ok(RunStats { longest_silence })
    } else {
        Err(Error::Failed(status))
    }
}

/// What L1's kernel prints when one of its CPUs is stuck (kernel/watchdog.c,
/// kernel/rcu/tree_stall.h): the host is not coming back in useful time.
const STUCK_CPU_REPORTS: [&str; 2] = [
    "watchdog: BUG: soft lockup - CPU#",
    "self-detected stall on CPU",
];

/// How often the heartbeat file is looked at while the console is quiet.
const POLL: Duration = Duration::from_millis(250);

/// Kills and reaps `child` (QEMU, started by us), then returns `error`.
fn kill(child: &mut Child, error: Error) -> Error {
    let _ = child.kill();
    let _ = child.wait();
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_the_measured_one() {
        let machine = Machine {
            kernel: "/k/vmlinuz".into(),
            initrd: "/k/initrd.cpio".into(),
            smp: 2,
            mem_mib: 2048,
            heartbeat: "/k/alive".into(),
        };
        assert_eq!(
            CommandLine::of(&machine.command()).to_string(),
            "qemu-system-x86_64 -accel tcg,thread=multi -cpu EPYC,+svm -smp 2 -m 2048 \
             -nographic -no-reboot -nic none -serial mon:stdio -serial file:/k/alive -kernel /k/vmlinuz -initrd /k/initrd.cpio \
             -append console=ttyS0 panic=-1 quiet"
        );
    }

    fn shell(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    fn watchdog(silence_ms: u64) -> Watchdog {
        Watchdog {
            timeout: Duration::from_secs(30),
            silence: Duration::from_millis(silence_ms),
            boot_silence: Duration::ZERO,
        }
    }

    #[test]
    fn a_silent_console_is_a_frozen_host_with_its_last_lines() {
        let dir = std::env::temp_dir().join(format!("xtask-frozen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let started = Instant::now();
        let mut seen = Vec::new();
        let err = run_console(
            shell("echo one; echo two; exec sleep 30"),
            &dir.join("alive"),
            watchdog(700),
            |line| seen.push(line.to_owned()),
        )
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not killed in time"
        );
        let Error::Frozen {
            silent_for,
            last_lines,
            ..
        } = err
        else {
            panic!("not named frozen: {err}");
        };
        assert!(silent_for >= Duration::from_millis(700));
        assert_eq!(last_lines, ["one", "two"]);
        assert_eq!(seen, ["one", "two"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stuck_cpu_report_ends_the_run_as_frozen() {
        let dir = std::env::temp_dir().join(format!("xtask-stuck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let started = Instant::now();
        let err = run_console(
            shell("echo one; echo '[ 36.6] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [vmm-reference:99]'; exec sleep 30"),
            &dir.join("alive"),
            watchdog(20_000),
            |_| {},
        )
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not killed at once"
        );
        let Error::Frozen {
            stuck, last_lines, ..
        } = &err
        else {
            panic!("not named frozen: {err}");
        };
        assert!(
            stuck.as_deref().is_some_and(|l| l.contains("soft lockup")),
            "{err}"
        );
        assert_eq!(last_lines.len(), 2);
        assert!(
            err.to_string().contains("its kernel reported a stuck CPU"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_heartbeat_keeps_a_quiet_console_alive_until_it_stops() {
        let dir = std::env::temp_dir().join(format!("xtask-beat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let alive = dir.join("alive");
        // Quiet console; a heartbeat every 0.2 s for 2 s, then nothing.
        let script = format!(
            "echo start; i=0; while [ $i -lt 10 ]; do echo . >> {0}; sleep 0.2; i=$((i+1)); done; exec sleep 30",
            alive.display()
        );
        let started = Instant::now();
        let err = run_console(shell(&script), &alive, watchdog(1000), |_| {}).unwrap_err();
        let Error::Frozen { after, .. } = err else {
            panic!("not named frozen: {err}");
        };
        // Alive for the 2 s of heartbeats, frozen one silence limit after the last one.
        assert!(
            after >= Duration::from_millis(2500),
            "declared frozen at {after:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn before_the_first_heartbeat_the_boot_limit_applies() {
        let dir = std::env::temp_dir().join(format!("xtask-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let alive = dir.join("alive");
        // 1.5 s of quiet boot (longer than the 0.5 s limit, shorter than the 3 s boot limit),
        // then one heartbeat, then silence: frozen 0.5 s after the heartbeat.
        let script = format!("sleep 1.5; echo . >> {}; exec sleep 30", alive.display());
        let watchdog = Watchdog {
            timeout: Duration::from_secs(30),
            silence: Duration::from_millis(500),
            boot_silence: Duration::from_secs(3),
        };
        let err = run_console(shell(&script), &alive, watchdog, |_| {}).unwrap_err();
        let Error::Frozen { after, .. } = err else {
            panic!("not named frozen: {err}");
        };
        assert!(
            after >= Duration::from_millis(1900),
            "frozen at {after:?}, during the boot"
        );
        assert!(after < Duration::from_secs(3), "frozen at {after:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_chatty_run_past_its_deadline_is_a_timeout_not_a_freeze() {
        let dir = std::env::temp_dir().join(format!("xtask-chatty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = run_console(
            shell("while :; do echo tick; sleep 0.1; done"),
            &dir.join("alive"),
            Watchdog {
                timeout: Duration::from_secs(1),
                silence: Duration::from_millis(500),
                boot_silence: Duration::ZERO,
            },
            |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_run_that_ends_is_ok() {
        let dir = std::env::temp_dir().join(format!("xtask-ends-{}", std::process::id()));
        let mut seen = Vec::new();
        run_console(
            shell("echo done"),
            &dir.join("alive"),
            watchdog(5000),
            |l| seen.push(l.to_owned()),
        )
        .unwrap();
        assert_eq!(seen, ["done"]);
    }
}
