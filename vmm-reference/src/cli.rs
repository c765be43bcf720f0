//! The command line: `boot` and `probe`, and what each maps to. (The developer commands —
//! the demo, the default guest's initramfs, the boot-time comparison — live in xtask.)

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Overrides, VmConfig};
use crate::memory::HugePages;

/// Exit status for invalid input (as clap uses for usage errors).
pub const EXIT_USAGE: i32 = 2;

/// vmm-reference: boot Linux on KVM with a serial console, composed from the workspace crates.
#[derive(Debug, Parser)]
#[command(
    name = "vmm-reference",
    version,
    after_help = "Logging goes to stderr; RUST_LOG sets its level (default warn): \
                  RUST_LOG=info, RUST_LOG=debug, or per module, e.g. RUST_LOG=vcpu_runner=debug."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: CliCommand,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Boot a kernel with an initramfs; the guest's serial console is this terminal.
    Boot(BootArgs),
    /// Report what this host's KVM offers each crate.
    Probe {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `boot` flags; each overrides the same key of `--config`.
#[derive(Debug, Args)]
pub struct BootArgs {
    /// JSON config file with the keys kernel, initramfs, cmdline, mem_mib, vcpus, amx,
    /// nested_virt, seccomp, huge_pages.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kernel: a bzImage, or an ELF vmlinux with a PVH note.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed).
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1"].
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest memory in MiB [default: 256].
    #[arg(long)]
    pub mem_mib: Option<u64>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Give the guest AMX where the CPU and KVM allow it.
    #[arg(long)]
    pub amx: bool,
    /// Expose VMX/SVM to the guest.
    #[arg(long)]
    pub nested_virt: bool,
    /// At exit, print a boot profile to stderr: time to each build step, to each vCPU's first
    /// KVM_RUN and to the first console byte; every vCPU's exits by kind and port/MMIO address
    /// with counts and handling time; resident memory split into guest RAM and the rest.
    #[arg(long)]
    pub profile: bool,
    /// Back guest RAM with transparent huge pages (on) or 4 KiB pages only (off)
    /// [default: on].
    #[arg(long, value_enum)]
    pub huge_pages: Option<HugePages>,
    /// Run without the per-thread seccomp filters (to debug a forbidden syscall, which
    /// otherwise ends the VMM with status 4 and names the syscall).
    #[arg(long)]
    pub no_seccomp: bool,
}

impl BootArgs {
    /// The configuration these flags (and their config file) describe.
    pub fn to_config(&self) -> config::Result<VmConfig> {
        VmConfig::from_file_and_flags(
            self.config.as_deref(),
            Overrides {
                kernel: self.kernel.clone(),
                initramfs: self.initramfs.clone(),
                cmdline: self.cmdline.clone(),
                mem_mib: self.mem_mib,
                vcpus: self.vcpus,
                amx: self.amx,
                nested_virt: self.nested_virt,
                no_seccomp: self.no_seccomp,
                huge_pages: self.huge_pages,
            },
        )
    }
}

/// An error and its chain of causes on one line, as the binary prints it: `error: cause:
/// cause`, each part once. Some libraries repeat their source's text inside their own
/// message (linux-loader: `Kernel Loader: failed to load bzImage kernel image: Kernel Loader:
/// Invalid bzImage`, serde_json through our config error); so a message loses a trailing copy
/// of its source's text, a cause loses a leading `prefix: ` the part before it already
/// starts with, and a cause whose text the line already holds is left out. Line breaks
/// inside a message become `; `.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let one_line = |e: &dyn std::error::Error| {
        e.to_string()
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut line = String::new();
    let mut previous_prefix: Option<String> = None;
    let mut current = Some(e);
    while let Some(err) = current {
        let mut text = one_line(err);
        let source = err.source();
        if let Some(own) = source
            .map(one_line)
            .and_then(|s| text.strip_suffix(&s).map(str::to_owned))
            .and_then(|t| t.strip_suffix(": ").map(str::to_owned))
        {
            text = own;
        }
        let prefix = text.find(": ").map(|i| text[..i + 2].to_owned());
        if let Some(p) = &previous_prefix {
            if let Some(rest) = text.strip_prefix(p.as_str()) {
                text = rest.to_owned();
            }
        }
        if !text.is_empty() && !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        previous_prefix = prefix;
        current = source;
    }
    line
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
    fn boot_flags_make_a_config() {
        let cli = Cli::try_parse_from([
            "vmm-reference",
            "boot",
            "--kernel",
            "/k",
            "--vcpus",
            "2",
            "--mem-mib",
            "128",
        ])
        .unwrap();
        let CliCommand::Boot(args) = cli.command else {
            panic!("not boot")
        };
        let c = args.to_config().unwrap();
        assert_eq!((c.vcpus, c.mem_mib), (2, 128));
        assert_eq!(c.cmdline, config::DEFAULT_CMDLINE);
        assert!(c.seccomp);
        let cli = Cli::try_parse_from(["vmm-reference", "boot", "--kernel", "/k", "--no-seccomp"])
            .unwrap();
        let CliCommand::Boot(args) = cli.command else {
            panic!("not boot")
        };
        assert!(!args.to_config().unwrap().seccomp);
    }

    #[test]
    fn error_chain_joins_sources() {
        let e = config::Error::Kernel {
            path: "/k".into(),
            source: crate::kernel_image::Error::NotAKernel,
        };
        assert!(error_chain(&e).starts_with("kernel /k: is not a kernel"));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Layer {
        text: &'static str,
        #[source]
        source: Option<Box<Layer>>,
    }

    fn layers(texts: &[&'static str]) -> Option<Box<Layer>> {
        texts.split_first().map(|(text, rest)| {
            Box::new(Layer {
                text,
                source: layers(rest),
            })
        })
    }

    #[test]
    fn error_chain_of_a_linux_loader_error_says_each_part_once() {
        let e = crate::boot::Error::LoadKernel {
            path: "/k".into(),
            source: linux_loader::loader::Error::Bzimage(
                linux_loader::loader::bzimage::Error::InvalidBzImage,
            ),
        };
        assert_eq!(
            error_chain(&e),
            "cannot load kernel /k: Kernel Loader: failed to load bzImage kernel image: \
             Invalid bzImage"
        );
    }

    #[test]
    fn error_chain_drops_causes_the_line_already_holds() {
        // As linux-loader nests its errors: each message embeds its source's text.
        let e = layers(&[
            "cannot load kernel /k",
            "Kernel Loader: failed to load bzImage kernel image: Kernel Loader: Invalid bzImage",
            "Kernel Loader: Invalid bzImage",
            "Invalid bzImage",
        ])
        .unwrap();
        assert_eq!(
            error_chain(&*e),
            "cannot load kernel /k: Kernel Loader: failed to load bzImage kernel image: \
             Invalid bzImage"
        );
        let e = layers(&["vCPU 1", "KVM_RUN failed", "Bad address (os error 14)"]).unwrap();
        assert_eq!(
            error_chain(&*e),
            "vCPU 1: KVM_RUN failed: Bad address (os error 14)"
        );
        let e = layers(&["registers:\nrip 0\n", "gone"]).unwrap();
        assert_eq!(error_chain(&*e), "registers:; rip 0: gone");
    }
}
