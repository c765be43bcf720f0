//! `cargo xtask demo`: the README's first command. It makes sure the machine has what the
//! demo needs (see [`crate::setup`]) before building anything, prepares the default guest
//! (the cached Debian kernel and the guest initramfs, in the one cache the tests and CI use),
//! builds the reference VMM and boots the guest with it: directly where the host has hardware
//! virtualization (VMX or SVM in `/proc/cpuinfo` and `kvm_intel`/`kvm_amd` loaded), otherwise
//! inside the nested kvm-amd test host. The guest console is shown through to the marker line.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cli::DemoArgs;
use crate::command::{self, CommandLine};
use crate::debian;
use crate::guest;
use crate::init_script::Step;
use crate::l1::{self, L1Image};
use crate::payload;
use crate::setup;

/// Errors from the demo.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The machine lacks something and it could not be installed.
    #[error(transparent)]
    Setup(#[from] setup::Error),
    /// The kernel could not be fetched.
    #[error(transparent)]
    Kernel(#[from] debian::Error),
    /// The ELF vmlinux could not be extracted from the bzImage.
    #[error("cannot extract the ELF vmlinux for the PVH boot (`--bzimage` boots the bzImage)")]
    Vmlinux(#[from] crate::vmlinux::Error),
    /// The guest initramfs could not be built.
    #[error(transparent)]
    Guest(#[from] guest::Error),
    /// The reference VMM did not build.
    #[error("cannot build vmm-reference")]
    Build(#[source] command::Error),
    /// The reference VMM could not be started.
    #[error("cannot start `{command}`")]
    Spawn {
        /// The command.
        command: CommandLine,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The nested test host failed.
    #[error(transparent)]
    Host(#[from] l1::Error),
    /// A file could not be added to the test host.
    #[error(transparent)]
    File(#[from] payload::Error),
    /// A destination path is invalid.
    #[error(transparent)]
    Destination(#[from] crate::image::Error),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The arguments of `cargo` that build the reference VMM as it ships: release, with glibc
/// linked statically into the binary alone (`cargo rustc` passes the flag to the final crate
/// only; `RUSTFLAGS` would reach the proc-macros too, which cannot link statically).
pub const BUILD_VMM_ARGS: [&str; 10] = [
    "rustc",
    "--release",
    "--locked",
    "--package",
    "vmm-reference",
    "--bin",
    "vmm-reference",
    "--",
    "-C",
    "target-feature=+crt-static",
];

/// Builds the reference VMM as it ships ([`BUILD_VMM_ARGS`]) and returns the binary's path.
///
/// # Errors
///
/// [`Error::Build`] if cargo failed.
pub fn build_vmm(workspace: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    command::output(
        Command::new(cargo)
            .current_dir(workspace)
            .args(BUILD_VMM_ARGS),
    )
    .map_err(Error::Build)?;
    Ok(workspace.join("target/release/vmm-reference"))
}

/// Whether this host can run the guest directly: VMX or SVM in the CPU flags and the matching
/// KVM vendor module loaded (a PVM- or TCG-backed `/dev/kvm` cannot boot a stock kernel).
pub fn host_has_hardware_virt(cpuinfo: &str, module_loaded: impl Fn(&str) -> bool) -> bool {
    let flags: Vec<&str> = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(str::split_whitespace)
        .collect();
    (flags.contains(&"vmx") && module_loaded("kvm_intel"))
        || (flags.contains(&"svm") && module_loaded("kvm_amd"))
}

/// The `vmm-reference boot` arguments for the default guest.
pub fn boot_args(kernel: &str, initramfs: &str, vcpus: u32, end: &str) -> Vec<String> {
    [
        "boot",
        "--kernel",
        kernel,
        "--initramfs",
        initramfs,
        "--vcpus",
        &vcpus.to_string(),
        "--mem-mib",
        "256",
        "--cmdline",
        &format!("console=ttyS0 reboot=k panic=-1 vmmref.end={end}"),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs the demo; returns the exit status to end with (the VMM's).
pub fn run(workspace: &Path, cache_dir: &Path, args: &DemoArgs) -> Result<u8> {
    setup::ensure()?;
    let tree = debian::KernelCache::new(cache_dir).get_or_fetch()?;
    let (kernel, guest_kernel) = if args.bzimage {
        (tree.vmlinuz.clone(), "/data/bzImage")
    } else {
        (
            crate::vmlinux::cached(&tree.vmlinuz, &tree.release)?,
            "/data/vmlinux",
        )
    };
    let initramfs = guest::cached_initramfs(cache_dir, Path::new(l1::BUSYBOX))?;
    println!("demo: building vmm-reference (release, static)");
    let vmm = build_vmm(workspace)?;

    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let direct = !args.nested
        && host_has_hardware_virt(&cpuinfo, |m| Path::new("/sys/module").join(m).exists());
    if direct {
        println!("demo: this host has hardware virtualization; booting directly");
        let mut command = Command::new(&vmm);
        command.args(boot_args(
            &kernel.to_string_lossy(),
            &initramfs.to_string_lossy(),
            args.vcpus,
            &args.end,
        ));
        let status = command.status().map_err(|source| Error::Spawn {
            command: CommandLine::of(&command),
            source,
        })?;
        return Ok(status.code().map_or(1, |c| u8::try_from(c).unwrap_or(1)));
    }

    println!(
        "demo: no VMX/SVM with its KVM module here; booting inside the nested kvm-amd test host"
    );
    let mut image = L1Image::new(cache_dir)?;
    image.add_files_at([
        (vmm, "/bin/vmm-reference"),
        (kernel, guest_kernel),
        (initramfs, "/data/initramfs.cpio"),
    ])?;
    let mut argv = vec!["/bin/vmm-reference".to_owned()];
    argv.extend(boot_args(
        guest_kernel,
        "/data/initramfs.cpio",
        args.vcpus,
        &args.end,
    ));
    let step = Step {
        label: "vmm-reference".into(),
        argv,
    };
    let outcome = image.boot(Vec::new(), vec![step], l1::MachineOptions::DEFAULT)?;
    Ok(outcome.rc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_virt_needs_flag_and_module() {
        let intel = "flags\t\t: fpu vmx sse\n";
        assert!(host_has_hardware_virt(intel, |m| m == "kvm_intel"));
        assert!(!host_has_hardware_virt(intel, |m| m == "kvm_amd"));
        let pvm = "flags\t\t: fpu sse hypervisor\n";
        assert!(!host_has_hardware_virt(pvm, |_| true));
    }

    #[test]
    fn boot_args_name_the_end_action() {
        let args = boot_args("/k", "/i", 2, "reboot");
        assert_eq!(args[0], "boot");
        assert!(args.contains(&"2".to_owned()));
        assert!(args.last().unwrap().ends_with("vmmref.end=reboot"));
    }
}
