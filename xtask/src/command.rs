//! Running the host tools the xtask depends on (`apt-get`, `dpkg-deb`, `strip`, ...).
//!
//! Short-lived programs run through [`output`] or [`output_unchecked`], so that a failure
//! names the program, its arguments and its exit status together with what it wrote to
//! stderr. (QEMU and `cargo test`, whose output is streamed, are run by their own modules.)

use std::ffi::OsStr;
use std::fmt;
use std::process::{Command, ExitStatus, Output, Stdio};

/// Errors from running an external program.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program could not be started at all (usually: it is not installed).
    #[error("cannot start `{command}`")]
    Spawn {
        /// The command line that was attempted.
        command: CommandLine,
        /// The error from `execve` or `fork`.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line that failed.
        command: CommandLine,
        /// Its exit status.
        status: ExitStatus,
        /// What it wrote to stderr, trimmed.
        stderr: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A printable rendering of a [`Command`]'s program and arguments, kept for error messages.
#[derive(Debug, Clone)]
pub struct CommandLine(String);

impl CommandLine {
    /// Renders `command` as `program arg1 arg2 ...` (lossily, for messages only).
    pub fn of(command: &Command) -> Self {
        let words = std::iter::once(command.get_program())
            .chain(command.get_args())
            .map(OsStr::to_string_lossy)
            .collect::<Vec<_>>();
        Self(words.join(" "))
    }
}

impl fmt::Display for CommandLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Runs `command` to completion with stdout and stderr captured, whatever its exit status.
pub fn output_unchecked(command: &mut Command) -> Result<Output> {
    command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            command: CommandLine::of(command),
            source,
        })
}

/// Runs `command` to completion and returns its stdout; a non-zero exit is an error.
pub fn output(command: &mut Command) -> Result<Vec<u8>> {
    let out = output_unchecked(command)?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(Error::Failed {
            command: CommandLine::of(command),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Whether `program` can be found on `PATH` (used to make optional tools such as `strip` optional).
pub fn is_available(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_renders_program_and_args() {
        let mut command = Command::new("dpkg-deb");
        command.args(["-x", "a.deb", "out"]);
        assert_eq!(
            CommandLine::of(&command).to_string(),
            "dpkg-deb -x a.deb out"
        );
    }

    #[test]
    fn failed_command_reports_status_and_stderr() {
        let err = output(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("sh -c"), "{message}");
        assert!(message.contains("oops"), "{message}");
    }
}
