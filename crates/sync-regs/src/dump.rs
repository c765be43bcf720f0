//! A formatted snapshot of a vCPU's registers, for diagnostics and crash reports.

use std::fmt;

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events};

/// RFLAGS bits named in the dump (Intel SDM vol. 1, 3.4.3), in display order.
const RFLAGS_NAMES: [(u64, &str); 9] = [
    (1 << 11, "OF"),
    (1 << 10, "DF"),
    (1 << 9, "IF"),
    (1 << 8, "TF"),
    (1 << 7, "SF"),
    (1 << 6, "ZF"),
    (1 << 4, "AF"),
    (1 << 2, "PF"),
    (1 << 0, "CF"),
];

/// All general-purpose and special registers of one vCPU at one point, plus its events when
/// they were read; [`fmt::Display`] prints them in a QEMU-like `info registers` layout.
///
/// ```
/// use kvm_bindings::{kvm_regs, kvm_sregs};
/// use sync_regs::RegisterDump;
///
/// let regs = kvm_regs { rip: 0xfff0, rflags: 0x2, ..Default::default() };
/// let dump = RegisterDump::new(regs, kvm_sregs::default(), None);
/// assert!(dump.to_string().contains("RIP=000000000000fff0"));
/// ```
#[derive(Clone, Copy)]
pub struct RegisterDump {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// Pending and injected events, when they were part of the snapshot.
    pub events: Option<kvm_vcpu_events>,
}

impl RegisterDump {
    /// A dump of the given register images.
    pub fn new(regs: kvm_regs, sregs: kvm_sregs, events: Option<kvm_vcpu_events>) -> Self {
        RegisterDump {
            regs,
            sregs,
            events,
        }
    }
}

impl fmt::Debug for RegisterDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn segment(f: &mut fmt::Formatter<'_>, name: &str, s: &kvm_segment) -> fmt::Result {
    writeln!(
        f,
        "{name:<3}={:04x} {:016x} {:08x} type={:x} s={} dpl={} p={} db={} l={} g={} avl={} unusable={}",
        s.selector, s.base, s.limit, s.type_, s.s, s.dpl, s.present, s.db, s.l, s.g, s.avl, s.unusable
    )
}

fn table(f: &mut fmt::Formatter<'_>, name: &str, t: &kvm_dtable) -> fmt::Result {
    writeln!(f, "{name:<3}=     {:016x} {:08x}", t.base, t.limit)
}

impl fmt::Display for RegisterDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.regs;
        writeln!(
            f,
            "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}",
            r.rax, r.rbx, r.rcx, r.rdx
        )?;
        writeln!(
            f,
            "RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}",
            r.rsi, r.rdi, r.rbp, r.rsp
        )?;
        writeln!(
            f,
            "R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}",
            r.r8, r.r9, r.r10, r.r11
        )?;
        writeln!(
            f,
            "R12={:016x} R13={:016x} R14={:016x} R15={:016x}",
            r.r12, r.r13, r.r14, r.r15
        )?;
        write!(f, "RIP={:016x} RFL={:08x} [", r.rip, r.rflags)?;
        let set = RFLAGS_NAMES.iter().filter(|(bit, _)| r.rflags & bit != 0);
        for (i, (_, name)) in set.enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(name)?;
        }
        writeln!(f, "]")?;

        let s = &self.sregs;
        segment(f, "ES", &s.es)?;
        segment(f, "CS", &s.cs)?;
        segment(f, "SS", &s.ss)?;
        segment(f, "DS", &s.ds)?;
        segment(f, "FS", &s.fs)?;
        segment(f, "GS", &s.gs)?;
        segment(f, "LDT", &s.ldt)?;
        segment(f, "TR", &s.tr)?;
        table(f, "GDT", &s.gdt)?;
        table(f, "IDT", &s.idt)?;
        writeln!(
            f,
            "CR0={:016x} CR2={:016x} CR3={:016x} CR4={:016x} CR8={:016x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.cr8
        )?;
        write!(f, "EFER={:016x} APIC_BASE={:016x}", s.efer, s.apic_base)?;
        if let Some(e) = &self.events {
            writeln!(f)?;
            write!(
                f,
                "EXC injected={} pending={} nr={} err={:#x} | INT injected={} nr={} shadow={} | \
                 NMI injected={} pending={} masked={} | SMI smm={} pending={} | flags={:#x}",
                e.exception.injected,
                e.exception.pending,
                e.exception.nr,
                e.exception.error_code,
                e.interrupt.injected,
                e.interrupt.nr,
                e.interrupt.shadow,
                e.nmi.injected,
                e.nmi.pending,
                e.nmi.masked,
                e.smi.smm,
                e.smi.pending,
                e.flags
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RegisterDump {
        let regs = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            r8: 8,
            r15: 0xf,
            rip: 0x10000,
            rflags: 0x246, // IF, ZF, PF
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr0: 0x8001_0033,
            cr3: 0x3000,
            efer: 0x500,
            ..Default::default()
        };
        sregs.cs.selector = 0x8;
        sregs.cs.l = 1;
        sregs.gdt.base = 0x500;
        sregs.gdt.limit = 0x17;
        RegisterDump::new(regs, sregs, None)
    }

    #[test]
    fn dump_shows_every_register_group() {
        let text = sample().to_string();
        for needle in [
            "RAX=1122334455667788",
            "R8 =0000000000000008",
            "R15=000000000000000f",
            "RIP=0000000000010000 RFL=00000246 [IF ZF PF]",
            "CS =0008 0000000000000000 00000000 type=0 s=0 dpl=0 p=0 db=0 l=1",
            "GDT=     0000000000000500 00000017",
            "CR0=0000000080010033",
            "CR3=0000000000003000",
            "EFER=0000000000000500",
            "TR ",
            "LDT",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(!text.contains("EXC"), "events printed without being read");
        assert_eq!(format!("{:?}", sample()), text);
    }

    #[test]
    fn dump_with_events_prints_them() {
        let mut events = kvm_vcpu_events::default();
        events.exception.injected = 1;
        events.exception.nr = 13;
        events.exception.error_code = 0x10;
        let mut dump = sample();
        dump.events = Some(events);
        let text = dump.to_string();
        assert!(
            text.contains("EXC injected=1 pending=0 nr=13 err=0x10"),
            "{text}"
        );
    }
}
