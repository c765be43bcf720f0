//! Kernel files built from a few header fields, for the targets that need a kernel the VMM
//! accepts in order to reach what comes after it (configuration checks, initramfs
//! placement). Offsets are those of the Linux/x86 boot protocol
//! (Documentation/arch/x86/boot.rst, "The real-mode kernel header").

use vmm_reference::sys::{
    BOOT_FLAG_MAGIC, BOOT_FLAG_OFFSET, HEADER_MAGIC_OFFSET, HIMEM_START, SETUP_HEADER_MAGIC,
    SETUP_SECTS_OFFSET, SYSSIZE_OFFSET, XLF_KERNEL_64,
};

/// `version`: boot protocol version.
const VERSION_OFFSET: usize = 0x206;
/// `loadflags`.
const LOADFLAGS_OFFSET: usize = 0x211;
/// `code32_start`.
const CODE32_START_OFFSET: usize = 0x214;
/// `initrd_addr_max` (protocol 2.03+).
const INITRD_ADDR_MAX_OFFSET: usize = 0x22c;
/// `kernel_alignment` (protocol 2.05+).
const KERNEL_ALIGNMENT_OFFSET: usize = 0x230;
/// `xloadflags` (protocol 2.12+).
const XLOADFLAGS_OFFSET: usize = 0x236;
/// `pref_address` (protocol 2.10+).
const PREF_ADDRESS_OFFSET: usize = 0x258;
/// `init_size` (protocol 2.10+).
const INIT_SIZE_OFFSET: usize = 0x260;
/// Protocol 2.15, what current kernels carry.
const PROTOCOL_2_15: u16 = 0x020f;
/// `loadflags` LOADED_HIGH.
const LOADED_HIGH: u8 = 1;
/// One setup sector after the boot sector.
const SETUP_SECTS: u8 = 1;
/// Size of a boot-protocol sector.
const SECTOR: usize = 512;
/// `syssize` counts 16-byte paragraphs.
const PARAGRAPH: usize = 16;

/// The header fields of a bzImage that decide where the VMM puts the kernel and what comes
/// after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BzImageFields {
    /// Paragraphs of protected-mode code after the setup sectors.
    pub syssize: u16,
    /// `initrd_addr_max`; 0 lets the VMM use the protocol's default.
    pub initrd_addr_max: u32,
    /// `kernel_alignment`.
    pub kernel_alignment: u32,
    /// `pref_address`.
    pub pref_address: u64,
    /// `init_size`.
    pub init_size: u32,
}

impl Default for BzImageFields {
    /// A small kernel with a header like that of a Debian cloud kernel.
    fn default() -> Self {
        BzImageFields {
            syssize: 0x10,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            pref_address: 0x100_0000,
            init_size: 0x10_0000,
        }
    }
}

fn put(image: &mut [u8], at: usize, bytes: &[u8]) {
    image[at..at + bytes.len()].copy_from_slice(bytes);
}

/// A complete bzImage: boot sector, one setup sector, and `syssize` paragraphs of code
/// (zeros), with a header the 64-bit boot protocol accepts.
pub fn bzimage(fields: BzImageFields) -> Vec<u8> {
    let len = (usize::from(SETUP_SECTS) + 1) * SECTOR + usize::from(fields.syssize) * PARAGRAPH;
    let mut image = vec![0u8; len.max(2 * SECTOR)];
    image[SETUP_SECTS_OFFSET] = SETUP_SECTS;
    put(
        &mut image,
        SYSSIZE_OFFSET,
        &u32::from(fields.syssize).to_le_bytes(),
    );
    put(&mut image, BOOT_FLAG_OFFSET, &BOOT_FLAG_MAGIC.to_le_bytes());
    put(
        &mut image,
        HEADER_MAGIC_OFFSET,
        &SETUP_HEADER_MAGIC.to_le_bytes(),
    );
    put(&mut image, VERSION_OFFSET, &PROTOCOL_2_15.to_le_bytes());
    image[LOADFLAGS_OFFSET] = LOADED_HIGH;
    put(
        &mut image,
        CODE32_START_OFFSET,
        &(HIMEM_START as u32).to_le_bytes(),
    );
    put(
        &mut image,
        INITRD_ADDR_MAX_OFFSET,
        &fields.initrd_addr_max.to_le_bytes(),
    );
    put(
        &mut image,
        KERNEL_ALIGNMENT_OFFSET,
        &fields.kernel_alignment.to_le_bytes(),
    );
    put(&mut image, XLOADFLAGS_OFFSET, &XLF_KERNEL_64.to_le_bytes());
    put(
        &mut image,
        PREF_ADDRESS_OFFSET,
        &fields.pref_address.to_le_bytes(),
    );
    put(
        &mut image,
        INIT_SIZE_OFFSET,
        &fields.init_size.to_le_bytes(),
    );
    image
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use vmm_reference::kernel_image::{KernelFormat, KernelInfo};

    #[test]
    fn the_vmm_accepts_the_built_kernel() {
        let fields = BzImageFields::default();
        let info = KernelInfo::inspect(&mut Cursor::new(bzimage(fields))).unwrap();
        assert_eq!(info.format, KernelFormat::BzImage);
        assert_eq!(
            info.mem_end,
            fields.pref_address + u64::from(fields.init_size)
        );
    }
}
