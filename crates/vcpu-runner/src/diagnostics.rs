//! What the run loop reports when a vCPU fails: registers, KVM's own data about the failure,
//! and the exit counters.

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs, KVM_EXIT_INTERNAL_ERROR};
use kvm_ioctls::VcpuFd;

use crate::dispatch::ExitStats;
use crate::sys::KVM_INTERNAL_ERROR_MAX_DATA;

/// The registers of a vCPU at the moment it failed.
///
/// Read with `KVM_GET_REGS` and `KVM_GET_SREGS`. This is the one place a register dump is
/// taken; when the `sync-regs` crate's `RegisterDump` lands it replaces this type and
/// [`capture_registers`].
#[derive(Clone, Copy)]
pub struct RegisterDump {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
}

impl fmt::Debug for RegisterDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
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
        writeln!(f, "RIP={:016x} RFL={:08x}", r.rip, r.rflags)?;
        let s = &self.sregs;
        for (name, seg) in [("CS", &s.cs), ("DS", &s.ds), ("SS", &s.ss), ("TR", &s.tr)] {
            writeln!(
                f,
                "{name} ={:04x} {:016x} {:08x} type={:x} l={} db={} p={}",
                seg.selector, seg.base, seg.limit, seg.type_, seg.l, seg.db, seg.present
            )?;
        }
        writeln!(f, "GDT={:016x} {:08x}", s.gdt.base, s.gdt.limit)?;
        writeln!(f, "IDT={:016x} {:08x}", s.idt.base, s.idt.limit)?;
        write!(
            f,
            "CR0={:016x} CR2={:016x} CR3={:016x} CR4={:016x} EFER={:016x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        )
    }
}

/// Reads the registers of `fd` for a dump.
pub fn capture_registers(fd: &VcpuFd) -> Result<RegisterDump, kvm_ioctls::Error> {
    Ok(RegisterDump {
        regs: fd.get_regs()?,
        sregs: fd.get_sregs()?,
    })
}

/// A copy of `kvm_run.internal` from a `KVM_EXIT_INTERNAL_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalErrorInfo {
    /// `KVM_INTERNAL_ERROR_*`: 1 emulation failure, 2 exception while delivering an
    /// exception, 3 event delivery failed, 4 unexpected exit reason.
    pub suberror: u32,
    /// The suberror's data (`data[..ndata]`, `ndata` capped at the array size).
    pub data: Vec<u64>,
}

impl InternalErrorInfo {
    /// Copies the internal-error data out of `run`. `None` when `run` is not at an internal
    /// error exit, so the union is never read through the wrong member.
    pub fn from_run(run: &kvm_run) -> Option<Self> {
        if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
            return None;
        }
        // SAFETY: the exit reason says `internal` is the valid member of the union; it is
        // plain integers, copied out.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(KVM_INTERNAL_ERROR_MAX_DATA);
        Some(InternalErrorInfo {
            suberror: internal.suberror,
            data: internal.data[..ndata].to_vec(),
        })
    }

    /// The suberror's name in `include/uapi/linux/kvm.h`.
    pub fn suberror_name(&self) -> &'static str {
        match self.suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "KVM_INTERNAL_ERROR_EMULATION",
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "KVM_INTERNAL_ERROR_SIMUL_EX",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "KVM_INTERNAL_ERROR_DELIVERY_EV",
            kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => {
                "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON"
            }
            _ => "unknown suberror",
        }
    }
}

impl fmt::Display for InternalErrorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "suberror {} ({}), data {:x?}",
            self.suberror,
            self.suberror_name(),
            self.data
        )
    }
}

/// Everything known about a vCPU when it failed.
#[derive(Debug)]
pub struct Diagnostics {
    /// The registers, or why they could not be read.
    pub registers: Result<RegisterDump, kvm_ioctls::Error>,
    /// The vCPU's exit counters up to the failure.
    pub stats: ExitStats,
}

impl Diagnostics {
    /// Collects diagnostics from `fd`.
    pub fn collect(fd: &VcpuFd, stats: ExitStats) -> Self {
        Diagnostics {
            registers: capture_registers(fd),
            stats,
        }
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.stats)?;
        match &self.registers {
            Ok(dump) => write!(f, "{dump}"),
            Err(e) => write!(f, "registers unavailable: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_error_data_is_copied_and_capped() {
        let mut run = kvm_run {
            exit_reason: KVM_EXIT_INTERNAL_ERROR,
            ..Default::default()
        };
        run.__bindgen_anon_1.internal.suberror = 1;
        run.__bindgen_anon_1.internal.ndata = 2;
        // SAFETY: plain-integer union member, written to build a synthetic exit.
        unsafe {
            run.__bindgen_anon_1.internal.data[0] = 0xabc;
            run.__bindgen_anon_1.internal.data[1] = 0xdef;
        }
        let info = InternalErrorInfo::from_run(&run).unwrap();
        assert_eq!(
            info,
            InternalErrorInfo {
                suberror: 1,
                data: vec![0xabc, 0xdef]
            }
        );
        assert_eq!(
            info.to_string(),
            "suberror 1 (KVM_INTERNAL_ERROR_EMULATION), data [abc, def]"
        );

        // A kernel (or a corrupted page) claiming more data than the array holds.
        run.__bindgen_anon_1.internal.ndata = 1000;
        run.__bindgen_anon_1.internal.suberror = 77;
        let info = InternalErrorInfo::from_run(&run).unwrap();
        assert_eq!(info.data.len(), KVM_INTERNAL_ERROR_MAX_DATA);
        assert_eq!(info.suberror_name(), "unknown suberror");

        run.exit_reason = kvm_bindings::KVM_EXIT_HLT;
        assert_eq!(InternalErrorInfo::from_run(&run), None);
    }

    #[test]
    fn suberror_names() {
        for (n, name) in [
            (2, "KVM_INTERNAL_ERROR_SIMUL_EX"),
            (3, "KVM_INTERNAL_ERROR_DELIVERY_EV"),
            (4, "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON"),
        ] {
            let info = InternalErrorInfo {
                suberror: n,
                data: vec![],
            };
            assert_eq!(info.suberror_name(), name);
        }
    }

    #[test]
    fn dump_and_diagnostics_display() {
        let mut regs = kvm_regs {
            rip: 0x1_0000,
            ..Default::default()
        };
        regs.rax = 0x42;
        let dump = RegisterDump {
            regs,
            sregs: kvm_sregs::default(),
        };
        let text = format!("{dump:?}");
        assert!(text.contains("RIP=0000000000010000"), "{text}");
        assert!(text.contains("RAX=0000000000000042"), "{text}");
        let diag = Diagnostics {
            registers: Ok(dump),
            stats: ExitStats::default(),
        };
        assert!(diag.to_string().contains("exits 0"));
        let diag = Diagnostics {
            registers: Err(kvm_ioctls::Error::new(libc::EBADF)),
            stats: ExitStats::default(),
        };
        assert!(diag.to_string().contains("registers unavailable"));
    }
}
