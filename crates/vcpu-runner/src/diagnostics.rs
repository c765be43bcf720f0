//! What the run loop reports when a vCPU fails: registers, KVM's own data about the failure,
//! and the exit counters.

use std::fmt;

use kvm_bindings::{kvm_run, KVM_EXIT_INTERNAL_ERROR};
use kvm_ioctls::VcpuFd;
use sync_regs::{RegisterCache, RegisterDump};

use crate::dispatch::ExitStats;
use crate::sys::KVM_INTERNAL_ERROR_MAX_DATA;

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

/// Everything known about a vCPU when it failed or triple-faulted.
#[derive(Debug)]
pub struct Diagnostics {
    /// The registers and events at the exit, or why they could not be read.
    pub registers: Result<RegisterDump, sync_regs::Error>,
    /// The vCPU's exit counters up to the failure.
    pub stats: ExitStats,
}

impl Diagnostics {
    /// Collects diagnostics at an exit, through the vCPU's register cache: the sets the
    /// kernel copied into `kvm_run` at this exit are read from there, the others with
    /// `KVM_GET_*` ioctls; the events are left out if only they cannot be read.
    pub fn collect(registers: &mut RegisterCache, fd: &VcpuFd, stats: ExitStats) -> Self {
        Diagnostics {
            registers: registers.dump(fd),
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
        let regs = kvm_bindings::kvm_regs {
            rip: 0x1_0000,
            rax: 0x42,
            ..Default::default()
        };
        let dump = RegisterDump::new(regs, kvm_bindings::kvm_sregs::default(), None);
        let text = format!("{dump}");
        assert!(text.contains("RIP=0000000000010000"), "{text}");
        assert!(text.contains("RAX=0000000000000042"), "{text}");
        let diag = Diagnostics {
            registers: Ok(dump),
            stats: ExitStats::default(),
        };
        assert!(diag.to_string().contains("exits 0"));
        let diag = Diagnostics {
            registers: Err(sync_regs::Error::GetMpState(kvm_ioctls::Error::new(
                libc::EBADF,
            ))),
            stats: ExitStats::default(),
        };
        assert!(diag.to_string().contains("registers unavailable"));
    }
}
