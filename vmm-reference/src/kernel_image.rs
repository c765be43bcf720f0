//! Recognizes a kernel file before anything is loaded: a bzImage (Linux boot protocol) or an
//! x86-64 ELF `vmlinux`, complete as its own headers describe it. linux-loader trusts the
//! file length, so a truncated bzImage would load without error and fail inside the guest;
//! checking here turns that into a clear error.

use std::io::{self, Read, Seek, SeekFrom};

use crate::sys::{
    BOOT_FLAG_MAGIC, BOOT_FLAG_OFFSET, ELF_MAGIC, HEADER_MAGIC_OFFSET, HIMEM_START,
    SETUP_HEADER_MAGIC, SETUP_SECTS_OFFSET, SYSSIZE_OFFSET, XLF_KERNEL_64,
};

/// ELF64 header size.
const ELF64_EHDR_LEN: usize = 64;
/// ELF64 program header size.
const ELF64_PHDR_LEN: u64 = 56;
/// `EI_CLASS` value of a 64-bit ELF.
const ELFCLASS64: u8 = 2;
/// `e_machine` of x86-64.
const EM_X86_64: u16 = 62;
/// `p_type` of a loadable segment.
const PT_LOAD: u32 = 1;
/// Offset of `version` in a bzImage (boot protocol version).
const PROTOCOL_VERSION_OFFSET: usize = 0x206;
/// Offset of `loadflags`.
const LOADFLAGS_OFFSET: usize = 0x211;
/// `loadflags` bit 0, LOADED_HIGH: the protected-mode code is loaded at 0x100000. Every
/// kernel with the 64-bit entry sets it; linux-loader refuses a bzImage without it.
const LOADED_HIGH: u8 = 1 << 0;
/// Offset of `code32_start`: where the protected-mode kernel is loaded by default;
/// linux-loader refuses one below the 1 MiB this VMM loads it at.
const CODE32_START_OFFSET: usize = 0x214;
/// Offset of `xloadflags` (protocol 2.12+).
const XLOADFLAGS_OFFSET: usize = 0x236;
/// The oldest boot protocol with a 64-bit entry and `xloadflags` (2.12, Linux 3.8).
const MIN_PROTOCOL_VERSION: u16 = 0x020c;
/// How much of the file the header checks read.
const HEADER_READ_LEN: usize = 0x1000;
/// Offset of `kernel_alignment` (protocol 2.05+).
const KERNEL_ALIGNMENT_OFFSET: usize = 0x230;
/// Offset of `pref_address` (protocol 2.10+): where a relocatable kernel decompresses itself
/// at the lowest (`LOAD_PHYSICAL_ADDR`).
const PREF_ADDRESS_OFFSET: usize = 0x258;
/// Offset of `init_size` (protocol 2.10+): the memory the kernel needs from that address on
/// until it has set up its own memory management.
const INIT_SIZE_OFFSET: usize = 0x260;

/// What is wrong with a kernel file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be opened.
    #[error("cannot open the file")]
    Open(#[source] io::Error),
    /// The file cannot be read.
    #[error("cannot read the file")]
    Read(#[source] io::Error),
    /// The path names something other than a regular file (a device, a directory, a FIFO).
    #[error("is not a regular file")]
    NotARegularFile,
    /// The file is empty.
    #[error("is empty")]
    Empty,
    /// Neither ELF magic nor a bzImage header.
    #[error("is not a kernel: neither an ELF vmlinux nor a bzImage (no \"HdrS\" at 0x202)")]
    NotAKernel,
    /// Shorter than its headers say.
    #[error("is truncated: {actual} bytes, its headers describe {expected}")]
    Truncated {
        /// Length the headers imply.
        expected: u64,
        /// Length of the file.
        actual: u64,
    },
    /// An ELF file this VMM cannot boot.
    #[error("is an ELF file but not an x86-64 kernel: {0}")]
    UnsupportedElf(&'static str),
    /// A bzImage whose boot protocol predates the 64-bit entry.
    #[error("is a bzImage with boot protocol {major}.{minor:02}; 2.12 or later is needed")]
    OldBootProtocol {
        /// Major version.
        major: u8,
        /// Minor version.
        minor: u8,
    },
    /// A bzImage without the 64-bit entry point.
    #[error("is a bzImage without a 64-bit entry point (XLF_KERNEL_64 clear)")]
    No64BitEntry,
    /// A bzImage whose protected-mode code is not loaded high.
    #[error("is not a bzImage the 64-bit boot protocol can load high: loadflags lack LOADED_HIGH")]
    NotLoadedHigh,
    /// A bzImage that wants its protected-mode code below 1 MiB.
    #[error(
        "is a bzImage whose code32_start {code32_start:#x} is below 1 MiB, where the 64-bit \
         boot protocol loads the kernel"
    )]
    Code32StartBelowHighMemory {
        /// `code32_start` from the header.
        code32_start: u32,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The kinds of kernel file this VMM boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage, booted through the 64-bit boot protocol with a zero page.
    BzImage,
    /// An ELF vmlinux; booted through PVH when it has a PVH note.
    Elf,
}

/// What the headers of a kernel file say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelInfo {
    /// The kind of file.
    pub format: KernelFormat,
    /// The end of the guest-physical memory the kernel occupies while it starts, when loaded
    /// where this VMM loads it: for a bzImage, `init_size` bytes from where its 64-bit entry
    /// decompresses it (`pref_address`, or the load address rounded up to
    /// `kernel_alignment` if higher: `startup_64` in arch/x86/boot/compressed/head_64.S); for
    /// an ELF vmlinux, the end of its highest loadable segment (`p_paddr + p_memsz`).
    pub mem_end: u64,
}

impl KernelFormat {
    /// Reads the headers of `file` and checks that the file holds all they describe.
    pub fn detect<F: Read + Seek>(file: &mut F) -> Result<Self> {
        KernelInfo::inspect(file).map(|i| i.format)
    }
}

impl KernelInfo {
    /// Reads the headers of `file`, checks that the file holds all they describe and says
    /// how much memory the kernel occupies.
    pub fn inspect<F: Read + Seek>(file: &mut F) -> Result<Self> {
        let len = file.seek(SeekFrom::End(0)).map_err(Error::Read)?;
        if len == 0 {
            return Err(Error::Empty);
        }
        file.rewind().map_err(Error::Read)?;
        let mut head = Vec::with_capacity(HEADER_READ_LEN);
        file.take(HEADER_READ_LEN as u64)
            .read_to_end(&mut head)
            .map_err(Error::Read)?;
        if head.starts_with(&ELF_MAGIC) {
            return check_elf(file, &head, len).map(|mem_end| KernelInfo {
                format: KernelFormat::Elf,
                mem_end,
            });
        }
        check_bzimage(&head, len).map(|mem_end| KernelInfo {
            format: KernelFormat::BzImage,
            mem_end,
        })
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn check_bzimage(head: &[u8], len: u64) -> Result<u64> {
    let (Some(flag), Some(magic)) = (
        u16_at(head, BOOT_FLAG_OFFSET),
        u32_at(head, HEADER_MAGIC_OFFSET),
    ) else {
        return Err(Error::NotAKernel);
    };
    if flag != BOOT_FLAG_MAGIC || magic != SETUP_HEADER_MAGIC {
        return Err(Error::NotAKernel);
    }
    let version = u16_at(head, PROTOCOL_VERSION_OFFSET).ok_or(Error::NotAKernel)?;
    if version < MIN_PROTOCOL_VERSION {
        let [minor, major] = version.to_le_bytes();
        return Err(Error::OldBootProtocol { major, minor });
    }
    let xloadflags = u16_at(head, XLOADFLAGS_OFFSET).ok_or(Error::NotAKernel)?;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::No64BitEntry);
    }
    if head[LOADFLAGS_OFFSET] & LOADED_HIGH == 0 {
        return Err(Error::NotLoadedHigh);
    }
    let code32_start = u32_at(head, CODE32_START_OFFSET).ok_or(Error::NotAKernel)?;
    if u64::from(code32_start) < HIMEM_START {
        return Err(Error::Code32StartBelowHighMemory { code32_start });
    }
    let setup_sects = match head[SETUP_SECTS_OFFSET] {
        0 => 4,
        n => u64::from(n),
    };
    let syssize = u64::from(u32_at(head, SYSSIZE_OFFSET).ok_or(Error::NotAKernel)?);
    let expected = (setup_sects + 1) * 512 + syssize * 16;
    if len < expected {
        return Err(Error::Truncated {
            expected,
            actual: len,
        });
    }
    let alignment = u64::from(u32_at(head, KERNEL_ALIGNMENT_OFFSET).ok_or(Error::NotAKernel)?);
    let pref_address = u64_at(head, PREF_ADDRESS_OFFSET).ok_or(Error::NotAKernel)?;
    let init_size = u64::from(u32_at(head, INIT_SIZE_OFFSET).ok_or(Error::NotAKernel)?);
    let loaded_end = HIMEM_START.saturating_add(syssize * 16);
    let aligned_load = match alignment {
        0 => HIMEM_START,
        a => HIMEM_START.div_ceil(a).saturating_mul(a),
    };
    let decompress_at = aligned_load.max(pref_address);
    Ok(decompress_at.saturating_add(init_size).max(loaded_end))
}

fn check_elf<F: Read + Seek>(file: &mut F, head: &[u8], len: u64) -> Result<u64> {
    if head.len() < ELF64_EHDR_LEN {
        return Err(Error::Truncated {
            expected: ELF64_EHDR_LEN as u64,
            actual: len,
        });
    }
    if head[4] != ELFCLASS64 {
        return Err(Error::UnsupportedElf("not a 64-bit ELF"));
    }
    if u16_at(head, 18) != Some(EM_X86_64) {
        return Err(Error::UnsupportedElf("machine is not x86-64"));
    }
    let phoff = u64_at(head, 32).ok_or(Error::NotAKernel)?;
    let phnum = u64::from(u16_at(head, 56).ok_or(Error::NotAKernel)?);
    let ph_end = phoff.saturating_add(phnum * ELF64_PHDR_LEN);
    if ph_end > len {
        return Err(Error::Truncated {
            expected: ph_end,
            actual: len,
        });
    }
    let mut phdrs = vec![0u8; (phnum * ELF64_PHDR_LEN) as usize];
    file.seek(SeekFrom::Start(phoff)).map_err(Error::Read)?;
    file.read_exact(&mut phdrs).map_err(Error::Read)?;
    let mut mem_end = None;
    for ph in phdrs.chunks_exact(ELF64_PHDR_LEN as usize) {
        if u32_at(ph, 0) != Some(PT_LOAD) {
            continue;
        }
        let segment_end = u64_at(ph, 24)
            .zip(u64_at(ph, 40))
            .map(|(paddr, memsz)| paddr.saturating_add(memsz))
            .unwrap_or(u64::MAX);
        mem_end = Some(mem_end.unwrap_or(0).max(segment_end));
        let end = u64_at(ph, 8)
            .zip(u64_at(ph, 32))
            .map(|(off, filesz)| off.saturating_add(filesz))
            .unwrap_or(u64::MAX);
        if end > len {
            return Err(Error::Truncated {
                expected: end,
                actual: len,
            });
        }
    }
    mem_end.ok_or(Error::UnsupportedElf("no loadable segment"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    /// A minimal bzImage header: 1 setup sector after the boot sector, `syssize` paragraphs.
    pub(crate) fn fake_bzimage(syssize: u32, total_len: usize) -> Vec<u8> {
        let mut b = vec![0u8; total_len.max(0x240)];
        b[SETUP_SECTS_OFFSET] = 1;
        b[SYSSIZE_OFFSET..SYSSIZE_OFFSET + 4].copy_from_slice(&syssize.to_le_bytes());
        b[BOOT_FLAG_OFFSET..BOOT_FLAG_OFFSET + 2].copy_from_slice(&BOOT_FLAG_MAGIC.to_le_bytes());
        b[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4]
            .copy_from_slice(&SETUP_HEADER_MAGIC.to_le_bytes());
        b[PROTOCOL_VERSION_OFFSET..PROTOCOL_VERSION_OFFSET + 2]
            .copy_from_slice(&0x020fu16.to_le_bytes());
        b[XLOADFLAGS_OFFSET..XLOADFLAGS_OFFSET + 2].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        b[LOADFLAGS_OFFSET] = LOADED_HIGH;
        b[CODE32_START_OFFSET..CODE32_START_OFFSET + 4]
            .copy_from_slice(&(HIMEM_START as u32).to_le_bytes());
        b.truncate(total_len);
        b
    }

    fn elf(phoff: u64, segments: &[(u32, u64, u64)], total_len: usize) -> Vec<u8> {
        let mut b = vec![0u8; total_len.max(phoff as usize + segments.len() * 56)];
        b[..4].copy_from_slice(&ELF_MAGIC);
        b[4] = ELFCLASS64;
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[32..40].copy_from_slice(&phoff.to_le_bytes());
        b[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for (i, (ty, off, size)) in segments.iter().enumerate() {
            let p = phoff as usize + i * 56;
            b[p..p + 4].copy_from_slice(&ty.to_le_bytes());
            b[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
            b[p + 32..p + 40].copy_from_slice(&size.to_le_bytes());
        }
        b.truncate(total_len);
        b
    }

    fn detect(bytes: Vec<u8>) -> Result<KernelFormat> {
        KernelFormat::detect(&mut Cursor::new(bytes))
    }

    #[test]
    fn bzimage_complete_and_truncated() {
        // (1 + 1) * 512 + 0x100 * 16 = 5120 bytes.
        assert_eq!(
            detect(fake_bzimage(0x100, 5120)).unwrap(),
            KernelFormat::BzImage
        );
        assert!(matches!(
            detect(fake_bzimage(0x100, 5119)),
            Err(Error::Truncated {
                expected: 5120,
                actual: 5119
            })
        ));
        let mut old = fake_bzimage(0x100, 5120);
        old[PROTOCOL_VERSION_OFFSET] = 0x04;
        assert!(matches!(
            detect(old),
            Err(Error::OldBootProtocol { major: 2, minor: 4 })
        ));
        let mut no64 = fake_bzimage(0x100, 5120);
        no64[XLOADFLAGS_OFFSET] = 0;
        assert!(matches!(detect(no64), Err(Error::No64BitEntry)));
        let mut low = fake_bzimage(0x100, 5120);
        low[LOADFLAGS_OFFSET] = 0;
        assert!(matches!(detect(low), Err(Error::NotLoadedHigh)));
        let mut below = fake_bzimage(0x100, 5120);
        below[CODE32_START_OFFSET + 2] = 0;
        assert!(matches!(
            detect(below),
            Err(Error::Code32StartBelowHighMemory { code32_start: 0 })
        ));
    }

    #[test]
    fn bzimage_memory_end_follows_the_decompression_address() {
        let mut b = fake_bzimage(0x100, 5120);
        let inspect = |b: &[u8]| KernelInfo::inspect(&mut Cursor::new(b.to_vec())).unwrap();
        // No init_size (headers that leave it zero): the loaded bytes at 1 MiB.
        assert_eq!(inspect(&b).mem_end, HIMEM_START + 0x1000);
        b[KERNEL_ALIGNMENT_OFFSET..KERNEL_ALIGNMENT_OFFSET + 4]
            .copy_from_slice(&0x20_0000u32.to_le_bytes());
        b[INIT_SIZE_OFFSET..INIT_SIZE_OFFSET + 4].copy_from_slice(&0x337_8000u32.to_le_bytes());
        // 1 MiB rounded up to the 2 MiB alignment.
        assert_eq!(inspect(&b).mem_end, 0x20_0000 + 0x337_8000);
        b[PREF_ADDRESS_OFFSET..PREF_ADDRESS_OFFSET + 8]
            .copy_from_slice(&0x100_0000u64.to_le_bytes());
        // The Debian 6.1 cloud kernel's values: 16 MiB + init_size = 67.47 MiB.
        let info = inspect(&b);
        assert_eq!(info.mem_end, 0x100_0000 + 0x337_8000);
        assert_eq!(info.format, KernelFormat::BzImage);
    }

    #[test]
    fn elf_memory_end_is_the_highest_segment_end() {
        let mut b = elf(
            64,
            &[(PT_LOAD, 0x1000, 0x100), (PT_LOAD, 0x1100, 0x100)],
            0x1200,
        );
        for (i, (paddr, memsz)) in [(0x100_0000u64, 0x2000u64), (0x200_0000, 0x5000)]
            .iter()
            .enumerate()
        {
            let p = 64 + i * 56;
            b[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
            b[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
        }
        let info = KernelInfo::inspect(&mut Cursor::new(b)).unwrap();
        assert_eq!((info.format, info.mem_end), (KernelFormat::Elf, 0x200_5000));
    }

    #[test]
    fn not_a_kernel() {
        assert!(matches!(detect(vec![]), Err(Error::Empty)));
        assert!(matches!(
            detect(b"#!/bin/sh\n".to_vec()),
            Err(Error::NotAKernel)
        ));
        assert!(matches!(detect(vec![0u8; 8192]), Err(Error::NotAKernel)));
    }

    #[test]
    fn elf_checks() {
        assert_eq!(
            detect(elf(64, &[(PT_LOAD, 0x1000, 0x100)], 0x1100)).unwrap(),
            KernelFormat::Elf
        );
        assert!(matches!(
            detect(elf(64, &[(PT_LOAD, 0x1000, 0x100)], 0x10ff)),
            Err(Error::Truncated {
                expected: 0x1100,
                ..
            })
        ));
        assert!(matches!(
            detect(elf(64, &[(4, 0, 0)], 0x200)),
            Err(Error::UnsupportedElf(_))
        ));
        assert!(matches!(
            detect(ELF_MAGIC.to_vec()),
            Err(Error::Truncated { .. })
        ));
        let mut e32 = elf(64, &[(PT_LOAD, 0, 16)], 0x100);
        e32[4] = 1;
        assert!(matches!(detect(e32), Err(Error::UnsupportedElf(_))));
        let mut arm = elf(64, &[(PT_LOAD, 0, 16)], 0x100);
        arm[18] = 183;
        assert!(matches!(detect(arm), Err(Error::UnsupportedElf(_))));
        let mut far = elf(64, &[], 0x100);
        far[32..40].copy_from_slice(&0x10_0000u64.to_le_bytes());
        far[56] = 1;
        assert!(matches!(detect(far), Err(Error::Truncated { .. })));
    }
}
