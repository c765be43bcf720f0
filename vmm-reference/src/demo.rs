//! `vmm-reference demo`: the README's main command. It prepares the default guest (the Debian
//! cloud kernel that `cargo xtask nested-kernel` caches, and a busybox initramfs built here and
//! cached) and boots it: directly where the host has hardware virtualization (VMX or SVM in
//! `/proc/cpuinfo` and `kvm_intel`/`kvm_amd` loaded), otherwise inside the nested test host
//! (`cargo xtask nested`), with the guest console shown through to the marker line.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::initramfs;

/// Where the demo caches its initramfs unless `VMM_REFERENCE_CACHE` says otherwise.
const DEFAULT_CACHE: &str = ".cache/vmm-reference";
/// The static busybox from Debian's `busybox-static`.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A helper program could not be run or failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status or stderr.
        detail: String,
    },
    /// A helper program could not be started.
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The cache directory could not be created.
    #[error("cannot create the cache directory {path}")]
    Cache {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The initramfs could not be built.
    #[error("cannot build the initramfs")]
    Initramfs(#[from] initramfs::Error),
    /// The running executable's path is unknown.
    #[error("cannot find this executable")]
    CurrentExe(#[source] io::Error),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The workspace root (the demo runs `cargo xtask` there).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Whether this host can run the guest directly: VMX or SVM in the CPU flags and the matching
/// KVM vendor module loaded (a PVM- or TCG-backed `/dev/kvm` cannot boot a stock kernel).
pub fn host_has_hardware_virt(cpuinfo: &str, module_loaded: impl Fn(&str) -> bool) -> bool {
    let flags = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .collect::<Vec<_>>();
    (flags.contains(&"vmx") && module_loaded("kvm_intel"))
        || (flags.contains(&"svm") && module_loaded("kvm_amd"))
}

fn run_capture(cmd: &mut Command) -> Result<String> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            command,
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The default guest: the kernel path and the initramfs (built if missing).
#[derive(Debug, Clone)]
pub struct DefaultGuest {
    /// Debian cloud kernel bzImage.
    pub kernel: PathBuf,
    /// Busybox initramfs.
    pub initramfs: PathBuf,
}

/// Prepares the default guest, reusing what is cached.
pub fn prepare(busybox: &Path) -> Result<DefaultGuest> {
    let root = workspace_root();
    let kernel = PathBuf::from(run_capture(
        Command::new("cargo")
            .args(["xtask", "nested-kernel"])
            .current_dir(&root),
    )?);
    let cache = std::env::var_os("VMM_REFERENCE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(DEFAULT_CACHE));
    std::fs::create_dir_all(&cache).map_err(|source| Error::Cache {
        path: cache.clone(),
        source,
    })?;
    let initramfs = cache.join("initramfs.cpio");
    if !initramfs.exists() {
        eprintln!("demo: building {}", initramfs.display());
        initramfs::write(busybox, &initramfs)?;
    }
    Ok(DefaultGuest { kernel, initramfs })
}

/// The `boot` arguments for the default guest.
pub fn boot_args(kernel: &str, initramfs: &str, vcpus: u32, end: &str) -> Vec<String> {
    vec![
        "boot".into(),
        "--kernel".into(),
        kernel.into(),
        "--initramfs".into(),
        initramfs.into(),
        "--vcpus".into(),
        vcpus.to_string(),
        "--mem-mib".into(),
        "256".into(),
        "--cmdline".into(),
        format!("console=ttyS0 reboot=k panic=-1 vmmref.end={end}"),
    ]
}

/// Boots the default guest where it can run; returns the exit status to end with.
pub fn run(busybox: &Path, vcpus: u32, end: &str, force_nested: bool) -> Result<i32> {
    let guest = prepare(busybox)?;
    let exe = std::env::current_exe().map_err(Error::CurrentExe)?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let direct = !force_nested
        && host_has_hardware_virt(&cpuinfo, |m| Path::new("/sys/module").join(m).exists());
    let mut cmd = if direct {
        eprintln!("demo: this host has hardware virtualization; booting directly");
        let mut c = Command::new(&exe);
        c.args(boot_args(
            &guest.kernel.to_string_lossy(),
            &guest.initramfs.to_string_lossy(),
            vcpus,
            end,
        ));
        c
    } else {
        eprintln!("demo: no VMX/SVM with its KVM module here; booting inside the nested test host");
        let mut c = Command::new("cargo");
        c.current_dir(workspace_root()).args([
            "xtask".into(),
            "nested".into(),
            "--timeout".into(),
            "300".into(),
            "--file".into(),
            format!("{}:/bin/vmm-reference", exe.display()),
            "--file".into(),
            format!("{}:/data/bzImage", guest.kernel.display()),
            "--file".into(),
            format!("{}:/data/initramfs.cpio", guest.initramfs.display()),
            "--".into(),
            "/bin/vmm-reference".into(),
        ]);
        c.args(boot_args(
            "/data/bzImage",
            "/data/initramfs.cpio",
            vcpus,
            end,
        ));
        c
    };
    let status = cmd.status().map_err(|source| Error::Spawn {
        command: format!("{cmd:?}"),
        source,
    })?;
    Ok(status.code().unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_virt_needs_flag_and_module() {
        let svm = "processor : 0\nflags\t\t: fpu svm lm\n";
        assert!(host_has_hardware_virt(svm, |m| m == "kvm_amd"));
        assert!(!host_has_hardware_virt(svm, |m| m == "kvm_pvm"));
        assert!(!host_has_hardware_virt("flags : fpu lm\n", |_| true));
        assert!(host_has_hardware_virt("flags : vmx\n", |m| m == "kvm_intel"));
    }

    #[test]
    fn boot_args_name_the_end_action() {
        let a = boot_args("/k", "/i", 2, "reboot");
        assert!(a.iter().any(|s| s.ends_with("vmmref.end=reboot")));
        assert_eq!(a[6], "2");
    }
}
