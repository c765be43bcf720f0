//! The VMM's path from files to a guest ready to start, run on fuzzed files: the config
//! checks ([`VmConfig::validate`]), loading the kernel and the initramfs into guest memory
//! ([`boot::load_kernel`]) and the boot parameters ([`boot::write_platform_tables`]), with
//! what each step promises checked against the files it was given.

use std::io::{Cursor, Write};

use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_modlist_entry, hvm_start_info};
use tempfile::NamedTempFile;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_reference::boot;
use vmm_reference::config::{self, required_mem_bytes, Overrides, VmConfig, DEFAULT_CMDLINE};
use vmm_reference::kernel_image::KernelInfo;
use vmm_reference::memory;
use vmm_reference::regs::EntryPoint;
use vmm_reference::sys::{
    CMDLINE_ADDR, PVH_INFO_ADDR, SETUP_HEADER_MAGIC, XEN_HVM_START_MAGIC_VALUE, ZERO_PAGE_ADDR,
};

/// Page size the initramfs is aligned to.
const PAGE_SIZE: u64 = 4096;
/// The highest address an initrd may end at under the 64-bit boot protocol when the header
/// gives no `initrd_addr_max` (boot.rst: 0x37ffffff for protocols before 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// A file holding `bytes`, removed when dropped.
pub fn temp_file(bytes: &[u8]) -> NamedTempFile {
    let mut file = NamedTempFile::new().expect("a temporary file can be created");
    file.write_all(bytes)
        .expect("a temporary file can be written");
    file
}

/// What a guest would be started with.
pub struct PreparedGuest {
    /// Its memory, with kernel, initramfs and tables in place.
    pub mem: memory::GuestRam,
    /// Where its boot vCPU starts.
    pub entry: EntryPoint,
}

/// Validates a configuration naming `kernel` and `initramfs` (written to files), loads them
/// as the VMM does and writes the platform tables; `None` where the VMM refuses the files,
/// after checking that the refusal is the one the headers call for.
///
/// # Panics
///
/// Where a step breaks its promise: a validation result other than the headers imply,
/// tables that cannot be written for a loaded kernel, boot parameters that do not describe
/// the initramfs where it was loaded.
pub fn prepare(
    kernel: &[u8],
    initramfs: Option<&[u8]>,
    mem_mib: u64,
    vcpus: u32,
) -> Option<PreparedGuest> {
    let kernel_file = temp_file(kernel);
    let initramfs_file = initramfs.map(temp_file);
    let cfg = VmConfig::from_file_and_flags(
        None,
        Overrides {
            kernel: Some(kernel_file.path().to_path_buf()),
            initramfs: initramfs_file.as_ref().map(|f| f.path().to_path_buf()),
            cmdline: Some(DEFAULT_CMDLINE.to_string()),
            mem_mib: Some(mem_mib),
            vcpus: Some(vcpus),
            ..Overrides::default()
        },
    )
    .expect("a kernel is named");
    let mem_bytes = mem_mib << 20;
    let initramfs_len = initramfs.map_or(0, |i| i.len() as u64);
    let headers = KernelInfo::inspect(&mut Cursor::new(kernel));
    let valid = match (cfg.validate(), headers) {
        (Err(config::Error::Kernel { .. }), Err(_)) => return None,
        (Err(config::Error::InitramfsTooLarge { size, .. }), Ok(_)) => {
            assert!(size == initramfs_len && size >= mem_bytes);
            return None;
        }
        (Err(config::Error::TooLittleMemoryForGuest { kernel_end, .. }), Ok(info)) => {
            assert_eq!(kernel_end, info.mem_end);
            assert!(mem_bytes < required_mem_bytes(info.mem_end, initramfs_len));
            return None;
        }
        (Ok(valid), Ok(info)) => {
            assert!(initramfs_len < mem_bytes);
            assert!(mem_bytes >= required_mem_bytes(info.mem_end, initramfs_len));
            assert_eq!(valid.kernel_mem_end(), info.mem_end);
            assert_eq!(valid.kernel_format(), info.format);
            assert_eq!(valid.initramfs_size(), initramfs.map(|i| i.len() as u64));
            valid
        }
        (result, headers) => panic!(
            "validate() gave {result:?} for a kernel whose headers read {headers:?} \
             (initramfs {initramfs_len} bytes, {mem_mib} MiB)"
        ),
    };
    let ram = memory::create_guest_memory(mem_bytes, memory::HugePages::Off)
        .expect("guest memory can be mapped");
    let mem = ram.memory();
    // linux-loader may still refuse what the header checks let through (an ELF segment
    // outside guest memory, a bzImage whose code32_start lies beyond it): an error, not a
    // crash.
    let loaded = boot::load_kernel(mem, &valid).ok()?;
    let entry = boot::write_platform_tables(mem, &valid, &loaded)
        .expect("the platform tables fit every memory size the config accepts");
    let module = match entry {
        EntryPoint::Linux64 { zero_page, .. } => {
            assert_eq!(zero_page, ZERO_PAGE_ADDR);
            let params: boot_params = mem.read_obj(GuestAddress(zero_page)).unwrap();
            let hdr = params.hdr;
            assert_eq!({ hdr.header }, SETUP_HEADER_MAGIC);
            assert_eq!(u64::from(hdr.cmd_line_ptr), CMDLINE_ADDR);
            assert_eq!(
                usize::from(params.e820_entries),
                memory::e820_map(mem_bytes).len()
            );
            let initrd_max = match hdr.initrd_addr_max {
                0 => DEFAULT_INITRD_ADDR_MAX,
                max => u64::from(max),
            };
            initramfs.map(|_| {
                (
                    u64::from(hdr.ramdisk_image),
                    u64::from(hdr.ramdisk_size),
                    initrd_max,
                )
            })
        }
        EntryPoint::Pvh { start_info, .. } => {
            assert_eq!(start_info, PVH_INFO_ADDR);
            let info: hvm_start_info = mem.read_obj(GuestAddress(start_info)).unwrap();
            assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
            assert_eq!(info.cmdline_paddr, CMDLINE_ADDR);
            assert_eq!(info.nr_modules, u32::from(initramfs.is_some()));
            initramfs.map(|_| {
                let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
                (m.paddr, m.size, DEFAULT_INITRD_ADDR_MAX)
            })
        }
    };
    if let (Some(content), Some((addr, size, initrd_max))) = (initramfs, module) {
        check_initramfs(
            mem,
            mem_bytes,
            valid.kernel_mem_end(),
            initrd_max,
            content,
            addr,
            size,
        );
    }
    drop((kernel_file, initramfs_file));
    Some(PreparedGuest { mem: ram, entry })
}

/// The initramfs the boot parameters describe is `content`, page-aligned, above what the
/// kernel occupies while it starts, and below both the end of low RAM and the header's
/// `initrd_addr_max`.
fn check_initramfs(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel_mem_end: u64,
    initrd_max: u64,
    content: &[u8],
    addr: u64,
    size: u64,
) {
    assert_eq!(size, content.len() as u64);
    assert_eq!(addr % PAGE_SIZE, 0, "initramfs at {addr:#x}");
    assert!(
        addr >= kernel_mem_end,
        "initramfs at {addr:#x} below {kernel_mem_end:#x}"
    );
    let end = addr + size;
    assert!(
        end <= memory::low_ram_end(mem_bytes),
        "initramfs ends at {end:#x}"
    );
    assert!(
        end <= initrd_max + 1,
        "initramfs ends at {end:#x}, max {initrd_max:#x}"
    );
    let mut loaded = vec![0u8; content.len()];
    mem.read_slice(&mut loaded, GuestAddress(addr)).unwrap();
    assert!(
        loaded == content,
        "guest memory differs from the initramfs file"
    );
}
