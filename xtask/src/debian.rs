//! The L1 kernel: a Debian 6.1 cloud kernel package, fetched once and cached unpacked.
//!
//! Debian's `linux-image-6.1.0-<abi>-cloud-amd64` has what the nested test host needs built in
//! (8250 serial console, gzip initrd, devtmpfs) and ships `kvm.ko`, `kvm-amd.ko` and their
//! dependency `irqbypass.ko` as modules. The package is fetched with `apt-get download` and
//! unpacked with `dpkg-deb -x` into the cache:
//!
//! ```text
//! <cache>/debs/<package>_<version>_amd64.deb
//! <cache>/kernel/<package>/{boot,lib}/...     the unpacked package
//! <cache>/kernel/SELECTED                     names the package above; written last
//! ```
//!
//! Once `SELECTED` exists the cache is used as it is: no `apt` program runs again, so a warm
//! cache needs no package registry. Delete the cache directory to move to a newer kernel.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command;

/// The Debian meta-package whose dependency names the current cloud kernel.
pub const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Every accepted kernel package is `linux-image-6.1.0-<abi>-cloud-amd64`.
const PACKAGE_PREFIX: &str = "linux-image-6.1.0-";
const PACKAGE_SUFFIX: &str = "-cloud-amd64";

/// The modules that give L1 a `/dev/kvm`, relative to `lib/modules/<release>/kernel/` and
/// without extension, in load order (`kvm` needs `irqbypass`; `kvm-amd` needs `kvm`).
pub const KVM_MODULES: [&str; 3] = [
    "virt/lib/irqbypass",
    "arch/x86/kvm/kvm",
    "arch/x86/kvm/kvm-amd",
];

/// Name of the file, in `<cache>/kernel/`, that names the unpacked package in use.
const SELECTED: &str = "SELECTED";

/// Errors from fetching, unpacking or reading the cached kernel package.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `apt-cache` could not name a 6.1 cloud kernel package.
    #[error("no `{PACKAGE_PREFIX}<abi>{PACKAGE_SUFFIX}` package found via `apt-cache`; is the Debian 12 archive configured?")]
    NoKernelPackage,
    /// An `apt-cache`, `apt-get`, `dpkg-deb` or decompressor run failed.
    #[error("cannot {operation}")]
    Tool {
        /// What was being done, e.g. "download linux-image-6.1.0-56-cloud-amd64".
        operation: String,
        /// The failed program run.
        #[source]
        source: command::Error,
    },
    /// A filesystem operation on the cache failed.
    #[error("cannot {operation} {}", path.display())]
    Io {
        /// What was being done, e.g. "read directory".
        operation: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The unpacked package lacks a file the nested host needs.
    #[error("the kernel package in {} has no {what}", tree.display())]
    Incomplete {
        /// The unpacked package.
        tree: PathBuf,
        /// What is missing.
        what: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io {
        operation,
        path,
        source,
    }
}

/// How a kernel module file is compressed (Debian 6.1 packages ship them uncompressed, later
/// ones compress them; busybox `insmod` only loads plain ELF objects).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleCompression {
    /// A plain `.ko`.
    None,
    /// `.ko.xz`.
    Xz,
    /// `.ko.zst`.
    Zstd,
    /// `.ko.gz`.
    Gzip,
}

impl ModuleCompression {
    /// All forms, with the file-name extension each one has.
    const ALL: [(ModuleCompression, &'static str); 4] = [
        (Self::None, "ko"),
        (Self::Xz, "ko.xz"),
        (Self::Zstd, "ko.zst"),
        (Self::Gzip, "ko.gz"),
    ];

    /// The program that decompresses this form to stdout with `-dc`.
    fn decompressor(self) -> Option<&'static str> {
        match self {
            Self::None => None,
            Self::Xz => Some("xz"),
            Self::Zstd => Some("zstd"),
            Self::Gzip => Some("gzip"),
        }
    }
}

/// One kernel module file found in the unpacked package.
#[derive(Debug, Clone)]
pub struct KernelModule {
    /// The module name, i.e. the file name without extension (`kvm-amd`).
    pub name: String,
    /// Where the file is.
    pub path: PathBuf,
    /// How it is compressed.
    pub compression: ModuleCompression,
}

impl KernelModule {
    /// Returns the module as a plain ELF object, decompressing it on the host if needed.
    pub fn read_uncompressed(&self) -> Result<Vec<u8>> {
        match self.compression.decompressor() {
            None => fs::read(&self.path).map_err(io_error("read", &self.path)),
            Some(program) => command::output(Command::new(program).arg("-dc").arg(&self.path))
                .map_err(|source| Error::Tool {
                    operation: format!("decompress {}", self.path.display()),
                    source,
                }),
        }
    }
}

/// An unpacked kernel package: the L1 kernel image and its modules.
#[derive(Debug, Clone)]
pub struct KernelTree {
    /// The Debian package name, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// The kernel release (`uname -r`), e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The bzImage, `boot/vmlinuz-<release>`.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>/kernel`.
    pub modules_dir: PathBuf,
}

impl KernelTree {
    /// Reads the layout of a package unpacked at `root`.
    fn open(package: &str, root: &Path) -> Result<Self> {
        let incomplete = |what: &str| Error::Incomplete {
            tree: root.to_owned(),
            what: what.to_owned(),
        };
        // Debian 12 installs modules under /lib; merged-/usr packages under /usr/lib.
        let modules_root = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|dir| root.join(dir))
            .find(|dir| dir.is_dir())
            .ok_or_else(|| incomplete("lib/modules directory"))?;
        let mut releases = fs::read_dir(&modules_root)
            .map_err(io_error("read directory", &modules_root))?
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().is_dir())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect::<Vec<_>>();
        let release = match releases.len() {
            1 => releases.remove(0),
            _ => return Err(incomplete("single lib/modules/<release> directory")),
        };
        let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
        if !vmlinuz.is_file() {
            return Err(incomplete(&format!("boot/vmlinuz-{release}")));
        }
        Ok(Self {
            package: package.to_owned(),
            modules_dir: modules_root.join(&release).join("kernel"),
            release,
            vmlinuz,
        })
    }

    /// Finds module `relative` (a path under `kernel/` without extension, see
    /// [`KVM_MODULES`]) in whichever compression the package ships it.
    pub fn module(&self, relative: &str) -> Result<KernelModule> {
        let name = relative.rsplit('/').next().unwrap_or(relative).to_owned();
        ModuleCompression::ALL
            .iter()
            .map(|&(compression, ext)| {
                (
                    compression,
                    self.modules_dir.join(format!("{relative}.{ext}")),
                )
            })
            .find(|(_, path)| path.is_file())
            .map(|(compression, path)| KernelModule {
                name,
                path,
                compression,
            })
            .ok_or_else(|| Error::Incomplete {
                tree: self.modules_dir.clone(),
                what: format!("module {relative}.ko"),
            })
    }

    /// The modules that provide `/dev/kvm` on AMD, in load order.
    pub fn kvm_modules(&self) -> Result<Vec<KernelModule>> {
        KVM_MODULES.iter().map(|m| self.module(m)).collect()
    }
}

/// The kernel package cache under `<cache>/`.
#[derive(Debug, Clone)]
pub struct KernelCache {
    root: PathBuf,
}

impl KernelCache {
    /// A cache rooted at `root` (created on first fetch).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn kernels_dir(&self) -> PathBuf {
        self.root.join("kernel")
    }

    /// The cached kernel, if one was unpacked before. Runs no external program.
    pub fn cached(&self) -> Result<Option<KernelTree>> {
        let selected = self.kernels_dir().join(SELECTED);
        let package = match fs::read_to_string(&selected) {
            Ok(text) => text.trim().to_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("read", &selected)(e)),
        };
        KernelTree::open(&package, &self.kernels_dir().join(&package)).map(Some)
    }

    /// The cached kernel, fetching and unpacking it first if the cache has none.
    pub fn get_or_fetch(&self) -> Result<KernelTree> {
        match self.cached()? {
            Some(tree) => Ok(tree),
            None => self.fetch(),
        }
    }

    /// Resolves the current 6.1 cloud kernel package, downloads and unpacks it, and selects it.
    pub fn fetch(&self) -> Result<KernelTree> {
        let package = resolve_package()?;
        let deb = self.download(&package)?;
        let kernels = self.kernels_dir();
        let tree = kernels.join(&package);
        // Unpack beside the final place and rename, so that a crash or a concurrent run
        // never leaves a half-unpacked tree where `SELECTED` could point.
        let partial = kernels.join(format!("{package}.partial-{}", std::process::id()));
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(io_error("remove", &partial))?;
        }
        fs::create_dir_all(&partial).map_err(io_error("create directory", &partial))?;
        eprintln!("xtask: unpacking {}", deb.display());
        command::output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial)).map_err(
            |source| Error::Tool {
                operation: format!("unpack {}", deb.display()),
                source,
            },
        )?;
        if tree.exists() {
            // Another run unpacked the same package meanwhile; its tree is as good as ours.
            fs::remove_dir_all(&partial).map_err(io_error("remove", &partial))?;
        } else {
            fs::rename(&partial, &tree).map_err(io_error("rename into place", &partial))?;
        }
        let opened = KernelTree::open(&package, &tree)?;
        let selected = kernels.join(SELECTED);
        fs::write(&selected, format!("{package}\n")).map_err(io_error("write", &selected))?;
        Ok(opened)
    }

    /// Downloads `package` into `<cache>/debs/` unless a `.deb` of it is already there.
    fn download(&self, package: &str) -> Result<PathBuf> {
        let debs = self.root.join("debs");
        fs::create_dir_all(&debs).map_err(io_error("create directory", &debs))?;
        if let Some(deb) = find_deb(&debs, package)? {
            return Ok(deb);
        }
        eprintln!("xtask: downloading {package} with apt-get");
        command::output(
            Command::new("apt-get")
                .arg("download")
                .arg(package)
                .current_dir(&debs),
        )
        .map_err(|source| Error::Tool {
            operation: format!("download {package}"),
            source,
        })?;
        find_deb(&debs, package)?.ok_or_else(|| Error::Incomplete {
            tree: debs.clone(),
            what: format!("{package}_*.deb after apt-get download"),
        })
    }
}

/// The `.deb` of `package` in `dir`, if any (`apt-get download` names it `<pkg>_<ver>_<arch>.deb`).
fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    let found = fs::read_dir(dir)
        .map_err(io_error("read directory", dir))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&prefix) && name.ends_with(".deb"))
        });
    Ok(found)
}

/// Names the kernel package to use: the dependency of [`META_PACKAGE`] if it is a 6.1 cloud
/// kernel, otherwise the highest-ABI 6.1 cloud kernel that `apt-cache search` lists.
fn resolve_package() -> Result<String> {
    let tool_error = |operation: &str| {
        let operation = operation.to_owned();
        move |source| Error::Tool { operation, source }
    };
    let depends = command::output(Command::new("apt-cache").args(["depends", META_PACKAGE]))
        .map_err(tool_error("resolve the cloud kernel package"))?;
    if let Some(package) = kernel_from_depends(&String::from_utf8_lossy(&depends)) {
        return Ok(package);
    }
    let search = command::output(Command::new("apt-cache").args([
        "search",
        "--names-only",
        "^linux-image-6\\.1\\.0-[0-9]+-cloud-amd64$",
    ]))
    .map_err(tool_error("search for cloud kernel packages"))?;
    kernel_from_search(&String::from_utf8_lossy(&search)).ok_or(Error::NoKernelPackage)
}

/// The ABI number of a `linux-image-6.1.0-<abi>-cloud-amd64` package name.
fn kernel_abi(package: &str) -> Option<u32> {
    package
        .strip_prefix(PACKAGE_PREFIX)?
        .strip_suffix(PACKAGE_SUFFIX)?
        .parse()
        .ok()
}

/// Picks the kernel package out of `apt-cache depends linux-image-cloud-amd64` output.
fn kernel_from_depends(output: &str) -> Option<String> {
    output
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|package| kernel_abi(package).is_some())
        .map(str::to_owned)
}

/// Picks the highest-ABI kernel package out of `apt-cache search` output (`name - summary`).
fn kernel_from_search(output: &str) -> Option<String> {
    output
        .lines()
        .filter_map(|line| line.split(" - ").next())
        .map(str::trim)
        .filter_map(|package| kernel_abi(package).map(|abi| (abi, package)))
        .max()
        .map(|(_, package)| package.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_output_names_the_kernel() {
        let output = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            kernel_from_depends(output).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
    }

    #[test]
    fn depends_output_with_another_series_is_rejected() {
        let output = "linux-image-cloud-amd64\n  Depends: linux-image-6.12.48+deb13-cloud-amd64\n";
        assert_eq!(kernel_from_depends(output), None);
    }

    #[test]
    fn search_output_picks_highest_abi_and_skips_variants() {
        let output = "\
linux-image-6.1.0-9-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-56-cloud-amd64-dbg - Debug symbols
linux-image-6.1.0-47-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-50-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
";
        assert_eq!(
            kernel_from_search(output).as_deref(),
            Some("linux-image-6.1.0-47-cloud-amd64")
        );
    }

    #[test]
    fn kernel_abi_requires_the_exact_shape() {
        assert_eq!(kernel_abi("linux-image-6.1.0-56-cloud-amd64"), Some(56));
        assert_eq!(kernel_abi("linux-image-6.1.0-56-amd64"), None);
        assert_eq!(kernel_abi("linux-image-6.1.0-x-cloud-amd64"), None);
    }

    #[test]
    fn no_package_error_names_the_expected_shape() {
        assert!(Error::NoKernelPackage
            .to_string()
            .contains("linux-image-6.1.0-<abi>-cloud-amd64"));
    }

    #[test]
    fn empty_cache_has_no_kernel() {
        let dir = std::env::temp_dir().join(format!("xtask-debian-test-{}", std::process::id()));
        let cache = KernelCache::new(&dir);
        assert!(cache.cached().unwrap().is_none());
    }

    #[test]
    fn module_lookup_finds_compressed_forms() {
        let dir = std::env::temp_dir().join(format!("xtask-module-test-{}", std::process::id()));
        let kvm = dir.join("arch/x86/kvm");
        fs::create_dir_all(&kvm).unwrap();
        fs::write(kvm.join("kvm-amd.ko.zst"), b"").unwrap();
        let tree = KernelTree {
            package: "p".into(),
            release: "r".into(),
            vmlinuz: dir.join("vmlinuz"),
            modules_dir: dir.clone(),
        };
        let module = tree.module("arch/x86/kvm/kvm-amd").unwrap();
        assert_eq!(module.name, "kvm-amd");
        assert_eq!(module.compression, ModuleCompression::Zstd);
        assert!(tree.module("arch/x86/kvm/kvm").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
