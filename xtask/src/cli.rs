//! The command line of `cargo xtask`.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::image::GuestPath;
use crate::l1::MachineOptions;
use crate::payload::HostFile;

/// Project automation for the composable-vmm workspace.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", version, about)]
pub struct Cli {
    /// The task to run.
    #[command(subcommand)]
    pub task: Task,
}

/// The tasks.
#[derive(Debug, Subcommand)]
pub enum Task {
    /// Run CMD inside the nested real-KVM test host (L1, kvm-amd under QEMU TCG).
    ///
    /// CMD runs as root in /tmp with /dev/kvm from kvm-amd and NESTED_KVM_VENDOR=kvm_amd set.
    /// If CMD is a host path the image does not already provide (busybox provides /bin/sh and
    /// other applets), it is copied in with its shared libraries. Exits with CMD's status;
    /// 97 if L1 could not load kvm-amd; 125 if the run failed otherwise (build, QEMU,
    /// timeout, L1 crash).
    Nested(NestedArgs),
    /// Build the `kvm` and `smoke` test binaries and run them all in one L1 boot.
    ///
    /// Each binary runs with REQUIRE_KVM=1 and the extra test args. Exits non-zero if any
    /// binary failed or did not finish.
    NestedTests(NestedTestsArgs),
    /// Print the path of the cached L1 kernel (bzImage), fetching it if missing.
    NestedKernel {
        /// Print the path of its ELF vmlinux instead (extracted from the bzImage once, for
        /// booting the same kernel through its PVH entry).
        #[arg(long)]
        vmlinux: bool,
    },
    /// Boot the reference VMM's default guest: installs what is missing first (as root),
    /// then boots directly on a VMX/SVM host, inside the nested test host otherwise.
    Demo(DemoArgs),
    /// Build the reference VMM as it ships: release, statically linked (glibc's libc.a; no
    /// dynamic loader, no shared libc mapped), and print the binary's path.
    ///
    /// `cargo rustc` gives `-C target-feature=+crt-static` to the binary alone, so the
    /// proc-macros it uses still build as shared objects and the path stays
    /// `target/release/vmm-reference`. A later plain `cargo build --release` relinks it
    /// dynamically.
    BuildVmm,
    /// Install what the nested test host, the demo and CI need (Debian packages; as root).
    Setup,
    /// Build and unit-test the publishable crates against the lowest dependency versions
    /// their requirements allow (in a copy of the workspace).
    MinimalVersions,
    /// Soak the nested test host: many guest boots and runs of the KVM test binaries in one
    /// L1 boot, counting the times L1 froze and where.
    ///
    /// Guest boot i (from 0) has 1, 2 or 4 vCPUs by i mod 3 and ends by poweroff, reboot or
    /// panic by (i / 3) mod 3, so every 9 boots run each combination once. A boot passes
    /// when the VMM's exit status (0, 0, 3), the marker with the vCPU count, the guest
    /// init's line for its ending, a kernel panic seen exactly when one was asked for, and
    /// the VMM's last line (`guest powered off`, `guest requested reset`, `guest reset
    /// without an orderly shutdown`) all match. The summary counts passes, failures and
    /// test-host freezes per combination. Exits non-zero if any boot or test run failed.
    ///
    /// 100 guest boots and no test binaries: `cargo xtask nested-soak --boots 100 --test-runs 0`.
    NestedSoak(SoakArgs),
    /// Write the reference VMM's default guest initramfs (busybox, `/init` with the marker).
    GuestInitramfs {
        /// Where to write it.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// The test command of README.md: fmt, clippy, doc, the unit, kvm-local and kvm-nested
    /// tiers, and the per-crate coverage gate, with a summary of each tier and its skips.
    Ci,
    /// Only the per-crate line-coverage gate of `coverage_config_x86_64.json` (tarpaulin).
    Coverage,
}

/// Options shared by every task that boots L1.
#[derive(Debug, Args)]
pub struct HostArgs {
    /// Copy a host file into L1; DEST defaults to /bin/NAME for an executable, else
    /// /data/NAME. Repeatable.
    #[arg(long = "file", value_name = "SRC[:DEST]")]
    pub files: Vec<FileSpec>,
    /// Set an environment variable for the command(s) in L1. Repeatable.
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<EnvVar>,
    /// Number of L1 vCPUs.
    #[arg(long, default_value_t = MachineOptions::DEFAULT.smp, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub smp: u32,
    /// L1 memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = MachineOptions::DEFAULT.mem_mib, value_parser = clap::value_parser!(u32).range(256..))]
    pub mem: u32,
    /// Kill one boot of L1 after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = MachineOptions::DEFAULT.timeout.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// Declare L1 frozen after this many seconds without a console line or a heartbeat.
    #[arg(long, value_name = "SECS", default_value_t = MachineOptions::DEFAULT.silence.as_secs(), value_parser = clap::value_parser!(u64).range(5..))]
    pub silence: u64,
    /// Kill a step inside L1 (a test timeout, never retried) after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = MachineOptions::DEFAULT.step_timeout.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub step_timeout: u64,
    /// Boot a frozen L1 again this many times at most, resuming at the step it froze in.
    #[arg(long, value_name = "N", default_value_t = MachineOptions::DEFAULT.freeze_retries, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub freeze_retries: u32,
}

impl HostArgs {
    /// The `--env` variables as name/value pairs.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|var| (var.name.clone(), var.value.clone()))
            .collect()
    }

    /// The `--file` files with their destinations.
    pub fn host_files(&self) -> crate::payload::Result<Vec<HostFile>> {
        self.files.iter().map(FileSpec::to_host_file).collect()
    }

    /// The machine size and time limit.
    pub fn machine(&self) -> MachineOptions {
        MachineOptions {
            smp: self.smp,
            mem_mib: self.mem,
            timeout: Duration::from_secs(self.timeout),
            silence: Duration::from_secs(self.silence),
            boot_silence: MachineOptions::DEFAULT.boot_silence,
            step_timeout: Duration::from_secs(self.step_timeout),
            freeze_retries: self.freeze_retries,
            retry_ended: MachineOptions::DEFAULT.retry_ended,
        }
    }
}

/// Arguments of `cargo xtask nested`.
#[derive(Debug, Args)]
pub struct NestedArgs {
    /// Options for L1.
    #[command(flatten)]
    pub host: HostArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Arguments of `cargo xtask nested-tests`.
#[derive(Debug, Args)]
pub struct NestedTestsArgs {
    /// Only this package's test targets (default: the whole workspace). Repeatable.
    #[arg(long = "package", short = 'p', value_name = "P")]
    pub packages: Vec<String>,
    /// Options for L1.
    #[command(flatten)]
    pub host: HostArgs,
    /// Arguments passed to every test binary.
    #[arg(last = true, value_name = "TEST ARGS")]
    pub test_args: Vec<String>,
}

/// Options of `cargo xtask demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vcpus: u32,
    /// How the guest ends after printing its marker.
    #[arg(long, default_value = "poweroff", value_parser = ["poweroff", "reboot"])]
    pub end: String,
    /// Boot inside the nested test host even where the host could run the guest directly.
    #[arg(long)]
    pub nested: bool,
    /// Boot the kernel's bzImage (64-bit boot protocol) instead of its ELF vmlinux through
    /// the PVH entry, the faster path (no decompression in the guest).
    #[arg(long)]
    pub bzimage: bool,
}

/// Options of `cargo xtask nested-soak`.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Guest boots (reference VMM, default guest, cycling through 1/2/4 vCPUs and the
    /// poweroff/reboot/panic endings; a multiple of 9 covers every combination evenly).
    #[arg(long, default_value_t = 200)]
    pub boots: u32,
    /// Runs of every `kvm` and `smoke` test binary, spread between the boots.
    #[arg(long, default_value_t = 20)]
    pub test_runs: u32,
    /// How many freezes to recover from before giving up.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub max_freezes: u32,
    /// An extra `vmm-reference boot` argument for every guest boot (repeatable), e.g.
    /// `--vmm-arg=--huge-pages --vmm-arg=on`.
    #[arg(long = "vmm-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub vmm_args: Vec<String>,
    /// Options for L1 (its `--timeout` grows to what the steps may take in all).
    #[command(flatten)]
    pub host: HostArgs,
}

/// Errors in argument values.
#[derive(Debug, thiserror::Error)]
pub enum ArgError {
    /// `--file` with an empty source.
    #[error("--file needs a source path: SRC[:DEST]")]
    EmptySource,
    /// `--file` with an invalid destination.
    #[error(transparent)]
    Destination(#[from] crate::image::Error),
    /// `--env` without `=` or with an invalid name.
    #[error("--env needs NAME=VALUE with NAME made of letters, digits and `_`, not starting with a digit: {0:?}")]
    Env(String),
}

/// `--file SRC[:DEST]`: a host file and, optionally, its path inside L1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// The host path.
    pub source: PathBuf,
    /// The path inside L1; `None` for the default.
    pub dest: Option<GuestPath>,
}

impl FileSpec {
    /// The file with its destination, defaulted from the file's type if not given.
    pub fn to_host_file(&self) -> crate::payload::Result<HostFile> {
        match &self.dest {
            Some(dest) => Ok(HostFile {
                source: self.source.clone(),
                dest: dest.clone(),
            }),
            None => HostFile::with_default_dest(self.source.clone()),
        }
    }
}

impl FromStr for FileSpec {
    type Err = ArgError;

    /// Splits at the first `:` (DEST is absolute, so a `:` in SRC needs an explicit DEST).
    fn from_str(text: &str) -> Result<Self, ArgError> {
        let (source, dest) = match text.split_once(':') {
            Some((source, dest)) => (source, Some(dest.parse()?)),
            None => (text, None),
        };
        if source.is_empty() {
            return Err(ArgError::EmptySource);
        }
        Ok(Self {
            source: source.into(),
            dest,
        })
    }
}

/// `--env NAME=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    /// A shell identifier.
    pub name: String,
    /// Any text.
    pub value: String,
}

impl FromStr for EnvVar {
    type Err = ArgError;

    fn from_str(text: &str) -> Result<Self, ArgError> {
        let invalid = || ArgError::Env(text.to_owned());
        let (name, value) = text.split_once('=').ok_or_else(invalid)?;
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(invalid());
        }
        Ok(Self {
            name: name.to_owned(),
            value: value.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn file_spec_with_and_without_dest() {
        let plain: FileSpec = "target/debug/vmm".parse().unwrap();
        assert_eq!(plain.source, PathBuf::from("target/debug/vmm"));
        assert_eq!(plain.dest, None);
        let placed: FileSpec = "/boot/vmlinuz:/data/bzImage".parse().unwrap();
        assert_eq!(placed.source, PathBuf::from("/boot/vmlinuz"));
        assert_eq!(placed.dest.unwrap().to_string(), "/data/bzImage");
    }

    #[test]
    fn file_spec_rejects_bad_input() {
        assert!(":/data/x".parse::<FileSpec>().is_err());
        assert!("x:relative".parse::<FileSpec>().is_err());
        assert!("x:".parse::<FileSpec>().is_err());
        assert!("x:/data/../etc/passwd".parse::<FileSpec>().is_err());
    }

    #[test]
    fn env_var_parsing() {
        let var: EnvVar = "RUST_LOG=debug=x".parse().unwrap();
        assert_eq!(
            (var.name.as_str(), var.value.as_str()),
            ("RUST_LOG", "debug=x")
        );
        assert_eq!("EMPTY=".parse::<EnvVar>().unwrap().value, "");
        for bad in ["NOVALUE", "=x", "1X=y", "A-B=c", "A B=c"] {
            assert!(bad.parse::<EnvVar>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn nested_takes_everything_after_double_dash() {
        let cli = Cli::try_parse_from([
            "xtask",
            "nested",
            "--file",
            "a:/data/a",
            "--smp",
            "1",
            "--",
            "/bin/sh",
            "-c",
            "exit 3",
        ])
        .unwrap();
        let Task::Nested(args) = cli.task else {
            panic!("parsed as {:?}", cli.task);
        };
        assert_eq!(args.command, ["/bin/sh", "-c", "exit 3"]);
        assert_eq!(args.host.smp, 1);
        assert_eq!(args.host.mem, 2048);
        assert_eq!(args.host.files.len(), 1);
    }

    #[test]
    fn nested_requires_a_command() {
        assert!(Cli::try_parse_from(["xtask", "nested"]).is_err());
    }

    #[test]
    fn nested_tests_packages_and_test_args() {
        let cli = Cli::try_parse_from([
            "xtask",
            "nested-tests",
            "-p",
            "sync-regs",
            "--package",
            "workspace-tests",
            "--",
            "--nocapture",
        ])
        .unwrap();
        let Task::NestedTests(args) = cli.task else {
            panic!("parsed as {:?}", cli.task);
        };
        assert_eq!(args.packages, ["sync-regs", "workspace-tests"]);
        assert_eq!(args.test_args, ["--nocapture"]);
    }
}
