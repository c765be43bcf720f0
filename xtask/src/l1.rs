//! The nested test host (L1): a Debian kernel with kvm-amd, booted under QEMU TCG with a
//! generated initramfs, that runs commands and reports their status over its console.
//!
//! The image holds static busybox (with a link for each applet at its usual path), the three
//! KVM modules (decompressed on the host if the package compresses them), `/dev/console`,
//! the host files of the run with their shared libraries, and `/init`. Only the kernel
//! package is cached; the image is rebuilt for every run (tens of milliseconds) and written
//! uncompressed: at ~10 MiB, `gzip -1` made no measurable difference to the boot time, and
//! an uncompressed archive needs no compressor on the host.

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
    /// L1 powered off or crashed without printing its result line.
    #[error("L1 ended without reporting a result (kernel panic, or /init died); see the console output above")]
    NoResult,
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The size of the emulated machine and how long it may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineOptions {
    /// Number of vCPUs.
    pub smp: u32,
    /// Memory in MiB.
    pub mem_mib: u32,
    /// How long L1 may run before QEMU is killed.
    pub timeout: Duration,
}

/// What a finished L1 run reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The overall status from the `NESTED-RESULT` line.
    pub rc: u8,
    /// Each step that started, with its status and test results.
    pub steps: Vec<StepReport>,
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

    /// Adds a host file, with its shared libraries if it is a dynamically linked executable.
    pub fn add_host_file(&mut self, file: &HostFile) -> Result<()> {
        Ok(self.stager.add(&mut self.tree, file)?)
    }

    /// Adds an `/init` that runs `steps` with `env`, boots L1 and streams its console to
    /// stdout until it powers off. Succeeds only if L1 loaded kvm-amd and printed its result.
    pub fn boot(
        mut self,
        env: Vec<(String, String)>,
        steps: Vec<Step>,
        options: MachineOptions,
    ) -> Result<Outcome> {
        let init = InitScript {
            modules: std::mem::take(&mut self.modules),
            env,
            steps,
        };
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
        };
        eprintln!(
            "xtask: booting L1 ({}, {} vCPUs, {} MiB)",
            self.kernel.release, options.smp, options.mem_mib
        );
        let started = Instant::now();
        let mut transcript = Transcript::default();
        machine.run(options.timeout, |line| {
            if let Some(Marker::Begin { label }) = transcript.observe(line) {
                println!("{}", step_header(&label));
            } else {
                // Firmware and tests may send terminal control sequences (SeaBIOS starts
                // with a terminal reset); keep them away from the user's terminal.
                println!("{}", strip_ansi(line));
            }
        })?;
        eprintln!("xtask: L1 ran for {:.1} s", started.elapsed().as_secs_f64());

        if let Some(message) = transcript.setup_error {
            return Err(Error::NoKvm(message));
        }
        let rc = transcript.result.ok_or(Error::NoResult)?;
        Ok(Outcome {
            rc,
            steps: transcript.steps,
        })
    }
}

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
