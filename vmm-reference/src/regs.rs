//! Boot register state: the identity-mapped page tables, GDT and registers for Linux's 64-bit
//! boot protocol (Documentation/arch/x86/boot.rst, "64-bit boot protocol"), and the 32-bit
//! flat protected mode the PVH entry expects (xen docs/misc/pvh.pandoc).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::sys::{
    BOOT_STACK_ADDR, EFER_LMA, EFER_LME, FPU_FCW_DEFAULT, GDT_ADDR, IDT_ADDR, MXCSR_DEFAULT,
    PDE_PS, PDPT_ADDR, PD_ADDR, PML4_ADDR, PTE_PRESENT_RW, RFLAGS_RESERVED, X86_CR0_ET, X86_CR0_PE,
    X86_CR0_PG, X86_CR4_PAE,
};

/// GDT: null, 64-bit code, data, TSS, 32-bit code (flags as in the descriptor's bytes 5-6).
const GDT: [(u16, u32, u32); 5] = [
    (0, 0, 0),
    (0xa09b, 0, 0xfffff),
    (0xc093, 0, 0xfffff),
    (0x808b, 0, 0xfffff),
    (0xc09b, 0, 0xfffff),
];
const CODE64: usize = 1;
const DATA: usize = 2;
const TSS: usize = 3;
const CODE32: usize = 4;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A table could not be written to guest memory.
    #[error("cannot write the boot {what} at {addr:#x}")]
    Write {
        /// What.
        what: &'static str,
        /// Where.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit mode at `rip`, RSI = zero page.
    Linux64 {
        /// Entry address.
        rip: u64,
        /// The zero page (`struct boot_params`).
        zero_page: u64,
    },
    /// 32-bit flat protected mode, paging off, at `eip`; EBX = `hvm_start_info`.
    Pvh {
        /// Entry address from the PVH ELF note.
        eip: u64,
        /// The start info.
        start_info: u64,
    },
}

fn gdt_entry((flags, base, limit): (u16, u32, u32)) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn segment(index: usize) -> kvm_segment {
    let (flags, base, limit) = GDT[index];
    let g = (flags >> 15) & 1;
    let present = ((flags >> 7) & 1) as u8;
    kvm_segment {
        base: u64::from(base),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: (index * 8) as u16,
        type_: (flags & 0xf) as u8,
        present,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    value: T,
) -> Result<()> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| Error::Write { what, addr, source })
}

/// Writes the GDT, an empty IDT and page tables identity-mapping the first GiB with 2-MiB
/// pages (the 64-bit protocol needs the kernel, zero page and command line mapped).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, e) in GDT.iter().enumerate() {
        write(mem, "GDT", GDT_ADDR + 8 * i as u64, gdt_entry(*e))?;
    }
    write(mem, "IDT", IDT_ADDR, 0u64)?;
    write(mem, "PML4", PML4_ADDR, PDPT_ADDR | PTE_PRESENT_RW)?;
    write(mem, "PDPT", PDPT_ADDR, PD_ADDR | PTE_PRESENT_RW)?;
    for i in 0..512u64 {
        write(
            mem,
            "PD",
            PD_ADDR + 8 * i,
            (i << 21) | PDE_PS | PTE_PRESENT_RW,
        )?;
    }
    Ok(())
}

/// Special registers for `entry`, starting from the vCPU's reset state `base`.
pub fn boot_sregs(base: &kvm_sregs, entry: EntryPoint) -> kvm_sregs {
    let mut s = *base;
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (GDT.len() * 8 - 1) as u16;
    s.idt.base = IDT_ADDR;
    s.idt.limit = 7;
    let data = segment(DATA);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment(TSS);
    match entry {
        EntryPoint::Linux64 { .. } => {
            s.cs = segment(CODE64);
            s.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            s.cr3 = PML4_ADDR;
            s.cr4 |= X86_CR4_PAE;
            s.efer |= EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh { .. } => {
            s.cs = segment(CODE32);
            s.cr0 = (s.cr0 | X86_CR0_PE | X86_CR0_ET) & !X86_CR0_PG;
            s.cr4 = 0;
            s.efer = 0;
        }
    }
    s
}

/// General registers for `entry`.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    let mut r = kvm_regs {
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match entry {
        EntryPoint::Linux64 { rip, zero_page } => {
            r.rip = rip;
            r.rsp = BOOT_STACK_ADDR;
            r.rbp = BOOT_STACK_ADDR;
            r.rsi = zero_page;
        }
        EntryPoint::Pvh { eip, start_info } => {
            r.rip = eip;
            r.rbx = start_info;
        }
    }
    r
}

/// The FPU state after `FNINIT` with the default MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_FCW_DEFAULT,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode() {
        assert_eq!(gdt_entry(GDT[CODE64]), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(GDT[DATA]), 0x00cf_9300_0000_ffff);
        let cs = segment(CODE64);
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.limit, cs.selector),
            (1, 0, 1, 0xffff_ffff, 8)
        );
        let cs32 = segment(CODE32);
        assert_eq!((cs32.l, cs32.db, cs32.type_), (0, 1, 0xb));
        assert_eq!(segment(0).unusable, 1);
    }

    #[test]
    fn entry_states() {
        let base = kvm_sregs::default();
        let l = EntryPoint::Linux64 {
            rip: 0x100200,
            zero_page: 0x7000,
        };
        let s = boot_sregs(&base, l);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!(boot_regs(l).rsi, 0x7000);
        let p = EntryPoint::Pvh {
            eip: 0x1000000,
            start_info: 0x6000,
        };
        let s = boot_sregs(&base, p);
        assert_eq!((s.cr0 & X86_CR0_PG, s.efer, s.cs.db), (0, 0, 1));
        assert_eq!(boot_regs(p).rbx, 0x6000);
        assert_eq!(boot_fpu().fcw, FPU_FCW_DEFAULT);
    }

    #[test]
    fn tables_are_written() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | PDE_PS | PTE_PRESENT_RW);
        let tiny = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            write_boot_tables(&tiny),
            Err(Error::Write { what: "PML4", .. })
        ));
    }
}
