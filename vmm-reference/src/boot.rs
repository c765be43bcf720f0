//! Puts a guest into memory the way a boot loader would: the kernel (bzImage or ELF, with
//! linux-loader), the command line, the initramfs at the top of low RAM (above the kernel's
//! whole start-up footprint), the ACPI and MP
//! tables, a reset stub at the reset vector, and either the zero page with its e820 map
//! (64-bit boot protocol) or the PVH start info with its memory map and module list.

use std::fs::File;
use std::io;
use std::path::PathBuf;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::ValidConfig;
use crate::kernel_image::KernelFormat;
use crate::memory::{self, E820Entry};
use crate::regs::{self, EntryPoint};
use crate::sys::{
    ACPI_RSDP_ADDR, BOOT_FLAG_MAGIC, CMDLINE_ADDR, CMDLINE_MAX_LEN, HIMEM_START, I8042_CMD_RESET,
    I8042_COMMAND_PORT, LOADER_TYPE_UNDEFINED, PVH_INFO_ADDR, RESET_VECTOR_ADDR,
    SETUP_HEADER_MAGIC, STARTUP_64_OFFSET, XEN_HVM_START_MAGIC_VALUE, ZERO_PAGE_ADDR,
};
use crate::{acpi, mptable};

/// Page size for initramfs alignment.
const PAGE_SIZE: u64 = 4096;
/// Highest address the 64-bit protocol lets an initrd end at when the header gives none.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// What a PC's firmware does at the reset vector, reduced to resetting: real-mode code that
/// pulses the reset line through the i8042, which the VMM reports as a reset. Linux's default
/// restart order on this (hardware-reduced ACPI) platform reaches it through
/// `machine_real_restart(MRR_BIOS)`; without it the guest would run whatever bytes lie there.
pub const RESET_VECTOR_STUB: [u8; 7] = [
    0xb0,
    I8042_CMD_RESET, // mov al, 0xfe
    0xe6,
    I8042_COMMAND_PORT, // out 0x64, al
    0xf4,               // hlt
    0xeb,
    0xfd, // jmp short to the hlt
];

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// linux-loader could not load the kernel.
    #[error("cannot load kernel {path}")]
    LoadKernel {
        /// The file.
        path: PathBuf,
        /// What linux-loader reported.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The command line was rejected by linux-loader.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line could not be written.
    #[error("cannot write the kernel command line")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// The initramfs could not be opened.
    #[error("cannot open initramfs {path}")]
    OpenInitramfs {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The initramfs does not fit between the kernel and the top of low RAM.
    #[error(
        "initramfs of {size} bytes does not fit between the kernel end {kernel_end:#x} and \
         {limit:#x}; give the guest more memory"
    )]
    InitramfsDoesNotFit {
        /// Its size.
        size: u64,
        /// End of the loaded kernel.
        kernel_end: u64,
        /// Highest usable end address.
        limit: u64,
    },
    /// The initramfs could not be read into guest memory.
    #[error("cannot read initramfs {path} into guest memory")]
    ReadInitramfs {
        /// The file.
        path: PathBuf,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// ACPI tables.
    #[error("cannot write ACPI tables")]
    Acpi(#[from] acpi::Error),
    /// MP table.
    #[error("cannot write the MP table")]
    MpTable(#[from] mptable::Error),
    /// GDT, page tables.
    #[error("cannot write boot tables")]
    Tables(#[from] regs::Error),
    /// The zero page could not be written.
    #[error("cannot write the zero page")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    /// The PVH start info could not be written.
    #[error("cannot write the PVH start info")]
    PvhInfo(#[source] linux_loader::configurator::Error),
    /// The reset-vector stub could not be written.
    #[error("cannot write the reset-vector stub at {RESET_VECTOR_ADDR:#x}")]
    ResetVector(#[source] vm_memory::GuestMemoryError),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Where the initramfs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitramfsPlacement {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The kernel as loaded into guest memory, with its command line and initramfs.
#[derive(Debug)]
pub struct LoadedKernel {
    loaded: KernelLoaderResult,
    cmdline: Cmdline,
    initramfs: Option<InitramfsPlacement>,
}

impl LoadedKernel {
    /// Where the loaded kernel image lies in guest memory: from 1 MiB (the lowest a kernel is
    /// loaded here) to the end of its last segment. Nothing else is written into it.
    pub fn image_range(&self) -> (GuestAddress, GuestAddress) {
        (
            GuestAddress(HIMEM_START),
            GuestAddress(self.loaded.kernel_end.max(HIMEM_START)),
        )
    }
}

/// Loads the kernel (linux-loader's bzImage or ELF loader), writes its command line and
/// places the initramfs above everything the kernel occupies while it starts.
///
/// # Errors
///
/// [`Error::OpenKernel`], [`Error::LoadKernel`], [`Error::Cmdline`],
/// [`Error::WriteCmdline`], and the initramfs errors.
pub fn load_kernel(mem: &GuestMemoryMmap, cfg: &ValidConfig) -> Result<LoadedKernel> {
    let c = cfg.config();
    let mut kernel = File::open(&c.kernel).map_err(|source| Error::OpenKernel {
        path: c.kernel.clone(),
        source,
    })?;
    let loaded = match cfg.kernel_format() {
        KernelFormat::BzImage => {
            BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
        }
        KernelFormat::Elf => Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))),
    }
    .map_err(|source| Error::LoadKernel {
        path: c.kernel.clone(),
        source,
    })?;

    let cmdline = Cmdline::try_from(&c.cmdline, CMDLINE_MAX_LEN).map_err(Error::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline).map_err(Error::WriteCmdline)?;

    let initrd_max = loaded
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let initramfs = match &c.initramfs {
        None => None,
        Some(path) => Some(load_initramfs(
            mem,
            cfg,
            path,
            // Above everything the kernel occupies while it starts, not only above the
            // loaded bytes: the decompressor would overwrite an initramfs in its range.
            loaded.kernel_end.max(cfg.kernel_mem_end()),
            initrd_max,
        )?),
    };

    Ok(LoadedKernel {
        loaded,
        cmdline,
        initramfs,
    })
}

/// Writes the platform tables for `cfg` (ACPI, MP table, the boot GDT and page tables, the
/// reset-vector stub) and the boot parameters for `kernel` (the zero page, or the PVH start
/// info for an ELF kernel with a PVH entry), and returns where the boot vCPU starts.
///
/// # Errors
///
/// The error of the table that could not be written.
pub fn write_platform_tables(
    mem: &GuestMemoryMmap,
    cfg: &ValidConfig,
    kernel: &LoadedKernel,
) -> Result<EntryPoint> {
    let c = cfg.config();
    let LoadedKernel {
        loaded,
        cmdline,
        initramfs,
    } = kernel;
    let initramfs = *initramfs;
    let rsdp = acpi::write_tables(mem, GuestAddress(ACPI_RSDP_ADDR), c.vcpus as u8)?;
    mptable::write(mem, c.vcpus as u8)?;
    regs::write_boot_tables(mem)?;
    mem.write_slice(&RESET_VECTOR_STUB, GuestAddress(RESET_VECTOR_ADDR))
        .map_err(Error::ResetVector)?;
    let e820 = memory::e820_map(cfg.mem_bytes());

    match (cfg.kernel_format(), loaded.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_pvh_info(mem, &e820, initramfs, rsdp.0)?;
            Ok(EntryPoint::Pvh {
                eip: entry.0,
                start_info: PVH_INFO_ADDR,
            })
        }
        (format, _) => {
            let rip = match format {
                KernelFormat::BzImage => loaded.kernel_load.0 + STARTUP_64_OFFSET,
                KernelFormat::Elf => loaded.kernel_load.0,
            };
            write_zero_page(mem, loaded, &e820, initramfs, rsdp.0, cmdline)?;
            Ok(EntryPoint::Linux64 {
                rip,
                zero_page: ZERO_PAGE_ADDR,
            })
        }
    }
}

/// The highest page-aligned address below `limit` where `size` bytes fit above `kernel_end`.
pub fn initramfs_addr(size: u64, kernel_end: u64, limit: u64) -> Option<u64> {
    let addr = limit.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end).then_some(addr)
}

fn load_initramfs(
    mem: &GuestMemoryMmap,
    cfg: &ValidConfig,
    path: &PathBuf,
    kernel_end: u64,
    initrd_max: u64,
) -> Result<InitramfsPlacement> {
    let mut file = File::open(path).map_err(|source| Error::OpenInitramfs {
        path: path.clone(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| Error::OpenInitramfs {
            path: path.clone(),
            source,
        })?
        .len();
    let limit = memory::low_ram_end(cfg.mem_bytes()).min(initrd_max.saturating_add(1));
    let addr = initramfs_addr(size, kernel_end, limit).ok_or(Error::InitramfsDoesNotFit {
        size,
        kernel_end,
        limit,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| Error::ReadInitramfs {
            path: path.clone(),
            source,
        })?;
    Ok(InitramfsPlacement { addr, size })
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    loaded: &KernelLoaderResult,
    e820: &[E820Entry],
    initramfs: Option<InitramfsPlacement>,
    rsdp: u64,
    cmdline: &Cmdline,
) -> Result<()> {
    let mut params = boot_params {
        hdr: loaded.setup_header.unwrap_or_else(|| setup_header {
            boot_flag: BOOT_FLAG_MAGIC,
            header: SETUP_HEADER_MAGIC,
            ..Default::default()
        }),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline
        .as_cstring()
        .map(|s| s.as_bytes().len())
        .unwrap_or(0) as u32;
    if let Some(i) = initramfs {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(Error::ZeroPage)
}

/// The PVH boot parameters for linux-loader's [`PvhBootConfigurator`]: the start info at
/// `base`, the memory map right after it, then the module list (the initramfs, if any).
pub fn pvh_boot_params(
    base: u64,
    e820: &[E820Entry],
    initramfs: Option<InitramfsPlacement>,
    rsdp: u64,
) -> BootParams {
    let memmap_addr = base + size_of::<hvm_start_info>() as u64;
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modlist_addr = memmap_addr + (size_of::<hvm_memmap_table_entry>() * memmap.len()) as u64;
    let modules: Vec<hvm_modlist_entry> = initramfs
        .map(|i| hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { modlist_addr },
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp,
        memmap_paddr: memmap_addr,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(base));
    params.set_sections(&memmap, GuestAddress(memmap_addr));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(modlist_addr));
    }
    params
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    initramfs: Option<InitramfsPlacement>,
    rsdp: u64,
) -> Result<()> {
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &pvh_boot_params(PVH_INFO_ADDR, e820, initramfs, rsdp),
        mem,
    )
    .map_err(Error::PvhInfo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pvh_layout() {
        let e820 = memory::e820_map(256 << 20);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let initramfs = InitramfsPlacement {
            addr: 0x800_0000,
            size: 0x1000,
        };
        let params = pvh_boot_params(PVH_INFO_ADDR, &e820, Some(initramfs), ACPI_RSDP_ADDR);
        PvhBootConfigurator::write_bootparams(&params, &mem).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!((info.version, info.nr_modules), (1, 1));
        assert_eq!(info.memmap_paddr, PVH_INFO_ADDR + 56);
        assert_eq!(info.memmap_entries as usize, e820.len());
        assert_eq!(
            (info.cmdline_paddr, info.rsdp_paddr),
            (CMDLINE_ADDR, ACPI_RSDP_ADDR)
        );
        let entry: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr)).unwrap();
        assert_eq!(
            (entry.addr, entry.size, entry.type_),
            (e820[0].addr, e820[0].size, e820[0].kind)
        );
        assert_eq!(
            info.modlist_paddr,
            info.memmap_paddr + 24 * e820.len() as u64
        );
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x800_0000, 0x1000));

        let none = pvh_boot_params(PVH_INFO_ADDR, &e820, None, 0);
        assert!(none.modules.is_none());
        PvhBootConfigurator::write_bootparams(&none, &mem).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }

    proptest! {
        #[test]
        fn initramfs_placement(size in 0u64..(1 << 30), kernel_end in 0u64..(1 << 29), limit in 0u64..(1 << 30)) {
            match initramfs_addr(size, kernel_end, limit) {
                Some(a) => {
                    prop_assert_eq!(a % PAGE_SIZE, 0);
                    prop_assert!(a >= kernel_end && a + size <= limit);
                }
                None => prop_assert!(size > limit || ((limit - size) & !(PAGE_SIZE - 1)) < kernel_end),
            }
        }
    }
}
