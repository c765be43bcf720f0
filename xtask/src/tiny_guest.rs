//! The smallest guest both VMMs of `boot_compare` boot: an ELF with a PVH entry whose code
//! prints the marker line on COM1 and then triple-faults, which ends either VMM (QEMU with
//! `-no-reboot` exits, vmm-reference exits with status 3).
//!
//! The time from spawn to its marker is what a VMM costs before any guest work: process start,
//! KVM set-up, firmware (QEMU's qboot), loading a kernel of a few hundred bytes, entering the
//! guest and one console line. Subtracted from a Linux boot on the same VMM, what is left is
//! the guest's own work and loading its bigger kernel.
//!
//! The PVH entry runs in 32-bit protected mode with paging off and flat segments (the PVH
//! boot ABI, `arch/x86/platform/pvh/head.S` in Linux), so the code is position-dependent
//! 32-bit code at [`LOAD_ADDRESS`].

/// Where the image is loaded (guest-physical and virtual): 1 MiB, where both VMMs load a PVH
/// kernel's segments that ask for it.
pub const LOAD_ADDRESS: u64 = 0x10_0000;

/// The line the guest prints (the `boot_compare` marker, then CR LF).
pub const LINE: &[u8] = b"VMM-REFERENCE-BOOT-OK tiny\r\n";

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point note (`include/xen/interface/elfnote.h`).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PHDRS: usize = 2;
const NOTE_OFFSET: usize = EHDR_SIZE + PHDRS * PHDR_SIZE;
/// Note header (3 words), "Xen\0", and a 4-byte entry address.
const NOTE_SIZE: usize = 12 + 4 + 4;
const CODE_OFFSET: usize = NOTE_OFFSET + NOTE_SIZE;

/// The guest code at `entry` (its address), followed by a 6-byte zero IDT descriptor and
/// [`LINE`] with a terminating zero:
///
/// ```text
///        mov   esi, LINE            ; BE imm32
///        mov   dx, 0x3f8            ; 66 BA F8 03
/// next:  lodsb                      ; AC
///        test  al, al               ; 84 C0
///        jz    done                 ; 74 03
///        out   dx, al               ; EE
///        jmp   next                 ; EB F8
/// done:  lidt  [ZERO_IDT]           ; 0F 01 1D imm32
///        int3                       ; CC: no IDT, so #BP -> #GP -> #DF -> triple fault
///        hlt                        ; F4 (not reached)
/// ```
///
/// COM1's transmitter is not polled: both VMMs take every byte written to THR at once.
fn code(entry: u32) -> Vec<u8> {
    const CODE_LEN: u32 = 26;
    let zero_idt = entry + CODE_LEN;
    let line = zero_idt + 6;
    let mut c = vec![0xBE];
    c.extend_from_slice(&line.to_le_bytes());
    c.extend_from_slice(&[
        0x66, 0xBA, 0xF8, 0x03, 0xAC, 0x84, 0xC0, 0x74, 0x03, 0xEE, 0xEB, 0xF8,
    ]);
    c.extend_from_slice(&[0x0F, 0x01, 0x1D]);
    c.extend_from_slice(&zero_idt.to_le_bytes());
    c.extend_from_slice(&[0xCC, 0xF4]);
    debug_assert_eq!(c.len(), CODE_LEN as usize);
    c.extend_from_slice(&[0; 6]);
    c.extend_from_slice(LINE);
    c.push(0);
    c
}

/// The guest as an ELF64 file: one `PT_LOAD` segment holding the whole file at
/// [`LOAD_ADDRESS`], and a `PT_NOTE` with the PVH entry.
pub fn pvh_elf() -> Vec<u8> {
    let entry = LOAD_ADDRESS + CODE_OFFSET as u64;
    let code = code(entry as u32);
    let file_len = (CODE_OFFSET + code.len()) as u64;

    let mut f = Vec::with_capacity(file_len as usize);
    // ELF header: ELFCLASS64, little-endian, version 1, ET_EXEC, EM_X86_64.
    f.extend_from_slice(&[0x7F, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type
    f.extend_from_slice(&62u16.to_le_bytes()); // e_machine
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&entry.to_le_bytes()); // e_entry
    f.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes()); // e_ehsize
    f.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes()); // e_phentsize
    f.extend_from_slice(&(PHDRS as u16).to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx

    let phdr =
        |f: &mut Vec<u8>, kind: u32, flags: u32, offset: u64, addr: u64, len: u64, align: u64| {
            f.extend_from_slice(&kind.to_le_bytes());
            f.extend_from_slice(&flags.to_le_bytes());
            f.extend_from_slice(&offset.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
            f.extend_from_slice(&addr.to_le_bytes()); // p_paddr
            f.extend_from_slice(&len.to_le_bytes()); // p_filesz
            f.extend_from_slice(&len.to_le_bytes()); // p_memsz
            f.extend_from_slice(&align.to_le_bytes());
        };
    // PT_LOAD, read/write/execute, the whole file.
    phdr(&mut f, 1, 7, 0, LOAD_ADDRESS, file_len, 0x1000);
    // PT_NOTE.
    let note_addr = LOAD_ADDRESS + NOTE_OFFSET as u64;
    phdr(
        &mut f,
        4,
        4,
        NOTE_OFFSET as u64,
        note_addr,
        NOTE_SIZE as u64,
        4,
    );

    f.extend_from_slice(&4u32.to_le_bytes()); // n_namesz
    f.extend_from_slice(&4u32.to_le_bytes()); // n_descsz
    f.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    f.extend_from_slice(b"Xen\0");
    f.extend_from_slice(&(entry as u32).to_le_bytes());

    f.extend_from_slice(&code);
    debug_assert_eq!(f.len() as u64, file_len);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The file as a loader reads it: the load segment maps file offset `o` to
    /// `LOAD_ADDRESS + o`, and the PVH note names an entry inside it.
    #[test]
    fn the_pvh_note_names_the_code_and_the_code_names_the_line() {
        let f = pvh_elf();
        assert_eq!(&f[..4], b"\x7fELF");
        assert_eq!(f[4], 2, "ELFCLASS64");
        assert_eq!(u16_at(&f, 18), 62, "EM_X86_64");
        let phoff = u64_at(&f, 32) as usize;
        let phnum = u16_at(&f, 56) as usize;
        let mut load = None;
        let mut pvh_entry = None;
        for i in 0..phnum {
            let p = phoff + i * PHDR_SIZE;
            let (offset, paddr, filesz) =
                (u64_at(&f, p + 8), u64_at(&f, p + 24), u64_at(&f, p + 32));
            match u32_at(&f, p) {
                1 => load = Some((offset, paddr, filesz)),
                4 => {
                    let n = offset as usize;
                    assert_eq!(u32_at(&f, n + 8), XEN_ELFNOTE_PHYS32_ENTRY);
                    assert_eq!(&f[n + 12..n + 16], b"Xen\0");
                    pvh_entry = Some(u64::from(u32_at(&f, n + 16)));
                }
                other => panic!("unexpected segment type {other}"),
            }
        }
        let (offset, paddr, filesz) = load.expect("a PT_LOAD segment");
        assert_eq!((offset, paddr, filesz), (0, LOAD_ADDRESS, f.len() as u64));
        let entry = pvh_entry.expect("a PVH note");
        assert_eq!(entry, u64_at(&f, 24), "e_entry and the note agree");
        let at = |addr: u64| (addr - paddr) as usize;
        let code = &f[at(entry)..];
        // mov esi, imm32: the line, zero-terminated.
        assert_eq!(code[0], 0xBE);
        let line = at(u64::from(u32_at(code, 1)));
        assert_eq!(&f[line..line + LINE.len()], LINE);
        assert_eq!(f[line + LINE.len()], 0);
        assert!(LINE.starts_with(crate::guest::MARKER.as_bytes()));
        // lidt [imm32]: six zero bytes.
        let lidt = code
            .windows(3)
            .position(|w| w == [0x0F, 0x01, 0x1D])
            .unwrap();
        let idt = at(u64::from(u32_at(code, lidt + 3)));
        assert_eq!(&f[idt..idt + 6], &[0; 6]);
        // The loop's jumps land on lodsb (AC) and on the lidt.
        let jz = code.iter().position(|&b| b == 0x74).unwrap();
        assert_eq!(jz + 2 + code[jz + 1] as usize, lidt);
        let jmp = code.iter().position(|&b| b == 0xEB).unwrap();
        let back = (jmp + 2) as isize + code[jmp + 1] as i8 as isize;
        assert_eq!(code[back as usize], 0xAC);
    }
}
