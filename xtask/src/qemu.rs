//! Booting L1: QEMU's TCG emulator with an SVM-capable CPU model, console on stdout.
//!
//! TCG implements AMD SVM, so a Linux guest on `-cpu EPYC,+svm` can load `kvm-amd` even
//! though the host's own `/dev/kvm` has neither VMX nor SVM. QEMU warns once per vCPU for each
//! EPYC feature TCG lacks ("TCG doesn't support requested feature"); those warnings are
//! expected and harmless, and are dropped from QEMU's stderr.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::command::CommandLine;

/// The QEMU system emulator binary (Debian package `qemu-system-x86`).
const QEMU: &str = "qemu-system-x86_64";

/// The text of QEMU's expected warnings about CPU model features TCG cannot emulate.
const TCG_FEATURE_WARNING: &str = "TCG doesn't support requested feature";

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
    /// L1 did not power off in time; QEMU was killed.
    #[error("L1 did not finish within {} s; QEMU was killed", .0.as_secs())]
    Timeout(Duration),
    /// QEMU itself failed (bad arguments, missing kernel, ...), as opposed to L1 exiting.
    #[error("QEMU exited with {0}")]
    Failed(ExitStatus),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

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
}

impl Machine {
    /// The QEMU command line. `panic=-1` reboots on a panic and `-no-reboot` turns that
    /// reboot into an exit, so a crashed L1 ends QEMU instead of hanging. `-nic none` leaves
    /// out the network card, whose iPXE option ROM would add a second to every boot.
    pub fn command(&self) -> Command {
        let mut command = Command::new(QEMU);
        command
            .args(["-accel", "tcg,thread=multi", "-cpu", "EPYC,+svm"])
            .args(["-smp", &self.smp.to_string()])
            .args(["-m", &self.mem_mib.to_string()])
            .args(["-nographic", "-no-reboot", "-nic", "none"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet"]);
        command
    }

    /// Boots the machine and calls `on_line` with each console line (lossily decoded, line
    /// terminator removed) until it powers off; kills QEMU after `timeout`.
    pub fn run(&self, timeout: Duration, mut on_line: impl FnMut(&str)) -> Result<()> {
        let mut command = self.command();
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

        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(remaining) {
                Ok(line) => {
                    let text = String::from_utf8_lossy(&line);
                    on_line(text.trim_end_matches(['\n', '\r']));
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(kill(&mut child, Error::Timeout(timeout)));
                }
            }
        }
        // The reader only ends at EOF, which it has reached; it cannot have panicked.
        let _ = reader.join();
        let status = child.wait().map_err(Error::Wait)?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::Failed(status))
        }
    }
}

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
        };
        assert_eq!(
            CommandLine::of(&machine.command()).to_string(),
            "qemu-system-x86_64 -accel tcg,thread=multi -cpu EPYC,+svm -smp 2 -m 2048 \
             -nographic -no-reboot -nic none -kernel /k/vmlinuz -initrd /k/initrd.cpio \
             -append console=ttyS0 panic=-1 quiet"
        );
    }
}
