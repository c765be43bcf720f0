//! The VM configuration: what `boot` flags and a JSON config file both describe, and its
//! validation, done before any KVM object exists so that bad input gives a specific error.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::kernel_image::{self, KernelFormat, KernelInfo};
use crate::memory::HugePages;
use crate::sys::{CMDLINE_MAX_LEN, MAX_VCPUS};

/// The default kernel command line: serial console, reboot through the i8042 (which this VMM
/// reports as a reset), and reboot at once on a panic instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// Default guest memory.
pub const DEFAULT_MEM_MIB: u64 = 256;
/// The least memory accepted whatever the kernel, checked before the files are read; the
/// minimum for the given kernel and initramfs ([`required_mem_bytes`]) is checked after.
pub const MIN_MEM_MIB: u64 = 64;
/// Memory a started Linux guest needs beyond its image and its initramfs to run a small
/// init (page tables, slab, per-CPU areas, user space), in MiB.
pub const RUNTIME_MARGIN_MIB: u64 = 32;
/// The most memory accepted (64 GiB): guest RAM is one anonymous mapping per region.
pub const MAX_MEM_MIB: u64 = 64 * 1024;

/// Errors of configuration loading and validation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be opened or read.
    #[error("cannot read config file {path}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The config file's path names something other than a regular file.
    #[error("config file {path}: is not a regular file")]
    ConfigNotARegularFile {
        /// The path.
        path: PathBuf,
    },
    /// The config file is not valid JSON for a [`VmConfig`] (unknown keys included).
    #[error("invalid config file {path}: {source}")]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// What serde found.
        #[source]
        source: serde_json::Error,
    },
    /// Neither a flag nor the config file named a kernel.
    #[error("no kernel given: pass --kernel or a config file with \"kernel\"")]
    NoKernel,
    /// `vcpus` is zero.
    #[error("vcpus must be at least 1")]
    NoVcpus,
    /// `vcpus` exceeds what one-byte APIC IDs in the MP table allow.
    #[error("too many vcpus: {requested} requested, at most {max} supported")]
    TooManyVcpus {
        /// What was asked.
        requested: u32,
        /// The limit.
        max: u32,
    },
    /// Less memory than a Linux guest needs.
    #[error("too little memory: {mem_mib} MiB, at least {min} MiB needed")]
    TooLittleMemory {
        /// What was asked.
        mem_mib: u64,
        /// The limit.
        min: u64,
    },
    /// More memory than this VMM maps.
    #[error("too much memory: {mem_mib} MiB, at most {max} MiB supported")]
    TooMuchMemory {
        /// What was asked.
        mem_mib: u64,
        /// The limit.
        max: u64,
    },
    /// The command line does not fit the boot protocol's buffer.
    #[error("kernel command line too long: {len} bytes, at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit (without the NUL).
        max: usize,
    },
    /// The kernel file is missing, unreadable, truncated or not a kernel.
    #[error("kernel {path}")]
    Kernel {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: kernel_image::Error,
    },
    /// The initramfs path names something other than a regular file.
    #[error("initramfs {path}: is not a regular file")]
    InitramfsNotARegularFile {
        /// The path.
        path: PathBuf,
    },
    /// The initramfs cannot be opened or its size read.
    #[error("cannot open initramfs {path}")]
    Initramfs {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Less memory than this kernel and initramfs need ([`required_mem_bytes`]).
    #[error(
        "too little memory for this kernel and initramfs: {mem_mib} MiB, at least {min_mib} MiB \
         needed (the kernel occupies memory up to {kernel_end:#x} while it starts, the \
         initramfs of {initramfs_size} bytes is placed above that and unpacked, and the \
         running kernel needs {RUNTIME_MARGIN_MIB} MiB more)"
    )]
    TooLittleMemoryForGuest {
        /// What was asked.
        mem_mib: u64,
        /// The least that works.
        min_mib: u64,
        /// [`KernelInfo::mem_end`].
        kernel_end: u64,
        /// The initramfs size (0 without one).
        initramfs_size: u64,
    },
    /// The initramfs does not fit in guest memory.
    #[error(
        "initramfs {path} is larger than guest memory: {size} bytes, guest memory {mem_mib} MiB"
    )]
    InitramfsTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Guest memory.
        mem_mib: u64,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything needed to build a VM; the JSON config file has exactly these keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// A bzImage, or an ELF vmlinux (booted through its PVH note when it has one).
    pub kernel: PathBuf,
    /// An initramfs (cpio, optionally compressed), loaded as the initrd.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// The kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Ask for the AMX guest permission (granted only where the CPU and KVM allow it).
    #[serde(default)]
    pub amx: bool,
    /// Expose the host's VMX or SVM to the guest (nested virtualization); with VMX, the VMM
    /// also provides IA32_FEATURE_CONTROL as firmware would.
    #[serde(default)]
    pub nested_virt: bool,
    /// Confine each VMM thread to the syscalls it needs with a seccomp filter once the guest
    /// runs ([`crate::seccomp`]); `false` only to debug a forbidden syscall.
    #[serde(default = "default_seccomp")]
    pub seccomp: bool,
    /// Back guest RAM with transparent huge pages (`"on"`) or 4 KiB pages (`"off"`).
    #[serde(default)]
    pub huge_pages: HugePages,
}

fn default_seccomp() -> bool {
    true
}
fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_mem_mib() -> u64 {
    DEFAULT_MEM_MIB
}
fn default_vcpus() -> u32 {
    1
}

/// Values given on the command line; each present one overrides the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initramfs`.
    pub initramfs: Option<PathBuf>,
    /// `--cmdline`.
    pub cmdline: Option<String>,
    /// `--mem-mib`.
    pub mem_mib: Option<u64>,
    /// `--vcpus`.
    pub vcpus: Option<u32>,
    /// `--amx`.
    pub amx: bool,
    /// `--nested-virt`.
    pub nested_virt: bool,
    /// `--no-seccomp`: turns seccomp off whatever the file says.
    pub no_seccomp: bool,
    /// `--huge-pages`.
    pub huge_pages: Option<HugePages>,
}

/// A configuration whose values and files were checked; only this builds a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidConfig {
    config: VmConfig,
    kernel: KernelInfo,
    initramfs_size: Option<u64>,
}

/// The guest memory a kernel and initramfs need: the kernel's footprint while it starts
/// ([`KernelInfo::mem_end`], page-aligned), the initramfs placed above it (the VMM loads it
/// there; inside the kernel's range the decompressor would overwrite it), the initramfs's
/// size again for its unpacked copy (exact for an uncompressed cpio), and
/// [`RUNTIME_MARGIN_MIB`].
pub fn required_mem_bytes(kernel_mem_end: u64, initramfs_size: u64) -> u64 {
    // A header can claim an end within a page of u64::MAX: round up without overflowing.
    kernel_mem_end
        .checked_next_multiple_of(4096)
        .unwrap_or(u64::MAX)
        .saturating_add(initramfs_size.saturating_mul(2))
        .saturating_add(RUNTIME_MARGIN_MIB << 20)
}

impl ValidConfig {
    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }
    /// What the kernel file is.
    pub fn kernel_format(&self) -> KernelFormat {
        self.kernel.format
    }
    /// The end of the memory the kernel occupies while it starts ([`KernelInfo::mem_end`]).
    pub fn kernel_mem_end(&self) -> u64 {
        self.kernel.mem_end
    }
    /// The initramfs size in bytes, if there is one.
    pub fn initramfs_size(&self) -> Option<u64> {
        self.initramfs_size
    }
    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.config.mem_mib << 20
    }
}

impl VmConfig {
    /// Parses a JSON config; unknown keys are an error.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| Error::ParseConfig {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads and parses a JSON config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let read_error = |source| Error::ReadConfig {
            path: path.to_path_buf(),
            source,
        };
        // Before reading: a device such as /dev/zero never ends.
        if !std::fs::metadata(path).map_err(read_error)?.is_file() {
            return Err(Error::ConfigNotARegularFile {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Builds a configuration from an optional config file and flags that override it.
    pub fn from_file_and_flags(file: Option<&Path>, flags: Overrides) -> Result<Self> {
        let base = file.map(Self::from_file).transpose()?;
        let kernel = flags
            .kernel
            .or_else(|| base.as_ref().map(|b| b.kernel.clone()))
            .ok_or(Error::NoKernel)?;
        let base = base.unwrap_or_else(|| VmConfig {
            kernel: kernel.clone(),
            initramfs: None,
            cmdline: default_cmdline(),
            mem_mib: default_mem_mib(),
            vcpus: default_vcpus(),
            amx: false,
            nested_virt: false,
            seccomp: default_seccomp(),
            huge_pages: HugePages::default(),
        });
        Ok(VmConfig {
            kernel,
            initramfs: flags.initramfs.or(base.initramfs),
            cmdline: flags.cmdline.unwrap_or(base.cmdline),
            mem_mib: flags.mem_mib.unwrap_or(base.mem_mib),
            vcpus: flags.vcpus.unwrap_or(base.vcpus),
            amx: flags.amx || base.amx,
            nested_virt: flags.nested_virt || base.nested_virt,
            seccomp: base.seccomp && !flags.no_seccomp,
            huge_pages: flags.huge_pages.unwrap_or(base.huge_pages),
        })
    }

    /// Checks the numbers first, then the files, and returns the proof of validity.
    pub fn validate(self) -> Result<ValidConfig> {
        self.check_values()?;
        let kernel = std::fs::metadata(&self.kernel)
            .map_err(kernel_image::Error::Open)
            .and_then(|m| {
                m.is_file()
                    .then_some(())
                    .ok_or(kernel_image::Error::NotARegularFile)
            })
            .and_then(|()| File::open(&self.kernel).map_err(kernel_image::Error::Open))
            .and_then(|mut f| KernelInfo::inspect(&mut f))
            .map_err(|source| Error::Kernel {
                path: self.kernel.clone(),
                source,
            })?;
        let initramfs_size = match &self.initramfs {
            None => None,
            Some(path) => {
                let metadata = std::fs::metadata(path).map_err(|source| Error::Initramfs {
                    path: path.clone(),
                    source,
                })?;
                if !metadata.is_file() {
                    return Err(Error::InitramfsNotARegularFile { path: path.clone() });
                }
                let size = metadata.len();
                if size >= self.mem_mib << 20 {
                    return Err(Error::InitramfsTooLarge {
                        path: path.clone(),
                        size,
                        mem_mib: self.mem_mib,
                    });
                }
                Some(size)
            }
        };
        let required = required_mem_bytes(kernel.mem_end, initramfs_size.unwrap_or(0));
        if self.mem_mib << 20 < required {
            return Err(Error::TooLittleMemoryForGuest {
                mem_mib: self.mem_mib,
                min_mib: required.div_ceil(1 << 20),
                kernel_end: kernel.mem_end,
                initramfs_size: initramfs_size.unwrap_or(0),
            });
        }
        Ok(ValidConfig {
            config: self,
            kernel,
            initramfs_size,
        })
    }

    fn check_values(&self) -> Result<()> {
        if self.vcpus == 0 {
            return Err(Error::NoVcpus);
        }
        if self.vcpus > u32::from(MAX_VCPUS) {
            return Err(Error::TooManyVcpus {
                requested: self.vcpus,
                max: u32::from(MAX_VCPUS),
            });
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(Error::TooLittleMemory {
                mem_mib: self.mem_mib,
                min: MIN_MEM_MIB,
            });
        }
        if self.mem_mib > MAX_MEM_MIB {
            return Err(Error::TooMuchMemory {
                mem_mib: self.mem_mib,
                max: MAX_MEM_MIB,
            });
        }
        if self.cmdline.len() >= CMDLINE_MAX_LEN {
            return Err(Error::CmdlineTooLong {
                len: self.cmdline.len(),
                max: CMDLINE_MAX_LEN - 1,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_memory_never_overflows() {
        // Found by the kernel_image fuzz target: a header whose end is within a page of the
        // top of the address space.
        for end in [u64::MAX, u64::MAX - 1, u64::MAX - 4095, u64::MAX - 4096] {
            assert_eq!(required_mem_bytes(end, 0), u64::MAX, "{end:#x}");
            assert_eq!(required_mem_bytes(end, u64::MAX), u64::MAX, "{end:#x}");
        }
        assert_eq!(
            required_mem_bytes(0x100_0001, 10),
            0x100_1000 + 20 + (RUNTIME_MARGIN_MIB << 20)
        );
    }
    use proptest::prelude::*;

    fn config(vcpus: u32, mem_mib: u64) -> VmConfig {
        VmConfig {
            kernel: PathBuf::from("/nonexistent/kernel"),
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.into(),
            mem_mib,
            vcpus,
            amx: false,
            nested_virt: false,
            seccomp: true,
            huge_pages: HugePages::Off,
        }
    }

    #[test]
    fn json_defaults_and_unknown_keys() {
        let c = VmConfig::from_json(r#"{"kernel": "/k"}"#, Path::new("c.json")).unwrap();
        assert_eq!(c.mem_mib, DEFAULT_MEM_MIB);
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert!(c.seccomp, "seccomp is on unless turned off");
        let e = VmConfig::from_json(r#"{"kernel": "/k", "memory": 5}"#, Path::new("c.json"))
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `memory`"), "{e}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("vmmref-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.json");
        std::fs::write(&path, r#"{"kernel": "/k", "vcpus": 2, "mem_mib": 128}"#).unwrap();
        let c = VmConfig::from_file_and_flags(
            Some(&path),
            Overrides {
                vcpus: Some(3),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (c.vcpus, c.mem_mib, c.kernel.as_path()),
            (3, 128, Path::new("/k"))
        );
        assert!(c.seccomp);
        std::fs::write(&path, r#"{"kernel": "/k", "seccomp": false}"#).unwrap();
        let off = VmConfig::from_file_and_flags(Some(&path), Overrides::default()).unwrap();
        assert!(!off.seccomp, "the file turns seccomp off");
        std::fs::write(&path, r#"{"kernel": "/k", "seccomp": true}"#).unwrap();
        let flag = Overrides {
            no_seccomp: true,
            ..Default::default()
        };
        let off = VmConfig::from_file_and_flags(Some(&path), flag.clone()).unwrap();
        assert!(!off.seccomp, "--no-seccomp wins over the file");
        let off = VmConfig::from_file_and_flags(
            None,
            Overrides {
                kernel: Some("/k".into()),
                ..flag
            },
        )
        .unwrap();
        assert!(!off.seccomp, "--no-seccomp without a file");
        assert!(matches!(
            VmConfig::from_file_and_flags(None, Overrides::default()),
            Err(Error::NoKernel)
        ));
        assert!(matches!(
            VmConfig::from_file_and_flags(Some(&dir.join("missing.json")), Overrides::default()),
            Err(Error::ReadConfig { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn values_are_checked_before_files() {
        assert!(matches!(config(0, 256).validate(), Err(Error::NoVcpus)));
        assert!(matches!(
            config(255, 256).validate(),
            Err(Error::TooManyVcpus { requested: 255, .. })
        ));
        assert!(matches!(
            config(1, 16).validate(),
            Err(Error::TooLittleMemory { mem_mib: 16, .. })
        ));
        assert!(matches!(
            config(1, MAX_MEM_MIB + 1).validate(),
            Err(Error::TooMuchMemory { .. })
        ));
        let mut long = config(1, 256);
        long.cmdline = "x".repeat(CMDLINE_MAX_LEN);
        assert!(matches!(long.validate(), Err(Error::CmdlineTooLong { .. })));
        assert!(matches!(
            config(1, 256).validate(),
            Err(Error::Kernel { .. })
        ));
    }

    #[test]
    fn memory_is_checked_against_the_kernel_and_initramfs() {
        let dir = std::env::temp_dir().join(format!("vmmref-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A bzImage header asking for init_size 0x337_8000 at pref_address 16 MiB.
        let mut k = crate::kernel_image::tests::fake_bzimage(0x100, 5120);
        k[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        k[0x260..0x264].copy_from_slice(&0x337_8000u32.to_le_bytes());
        let kernel = dir.join("bzImage");
        std::fs::write(&kernel, k).unwrap();
        let initramfs = dir.join("initramfs");
        std::fs::File::create(&initramfs)
            .unwrap()
            .set_len(3 << 20)
            .unwrap();
        let mut c = config(1, 64);
        c.kernel = kernel.clone();
        c.initramfs = Some(initramfs.clone());
        // 67.47 MiB of kernel, 2 x 3 MiB of initramfs, 32 MiB to run: 105.47 -> 106 MiB.
        let e = c.clone().validate().unwrap_err();
        assert!(
            matches!(
                e,
                Error::TooLittleMemoryForGuest {
                    mem_mib: 64,
                    min_mib: 106,
                    kernel_end: 0x4378000,
                    initramfs_size: 0x30_0000
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("at least 106 MiB"), "{e}");
        c.mem_mib = 105;
        assert!(c.clone().validate().is_err());
        c.mem_mib = 106;
        assert_eq!(c.validate().unwrap().kernel_mem_end(), 0x4378000);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        #[test]
        fn vcpu_and_memory_bounds(vcpus in 0u32..400, mem in 0u64..(MAX_MEM_MIB + 100)) {
            let result = config(vcpus, mem).validate();
            let values_ok = (1..=u32::from(MAX_VCPUS)).contains(&vcpus)
                && (MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem);
            // With valid values the (missing) kernel file is what fails.
            prop_assert_eq!(matches!(result, Err(Error::Kernel { .. })), values_ok);
        }
    }
}
