//! An exit profile: for one vCPU, every exit by kind and address (port, MMIO address, MSR
//! index) with its count, the time the run loop spent handling it and the time the vCPU was
//! inside `KVM_RUN` before it, plus when the first `KVM_RUN` started.
//!
//! A profile is off unless asked for ([`Vcpu::with_profile`](crate::Vcpu::with_profile)); when
//! it is on, each exit costs two extra clock reads and a hash-map update on the vCPU thread.
//! The vCPU keeps its profile on its own thread and publishes it into the caller's
//! [`ProfileSlot`] when its run loop ends, so the hot path takes no lock.
//!
//! ```
//! use std::time::Duration;
//! use vcpu_runner::profile::{ExitKey, ExitProfile};
//!
//! let mut profile = ExitProfile::default();
//! profile.record(ExitKey::PortWrite(0x3f8), Duration::from_micros(30), Duration::from_micros(2));
//! profile.record(ExitKey::PortWrite(0x3f8), Duration::from_micros(10), Duration::from_micros(2));
//! profile.record(ExitKey::Hlt, Duration::from_millis(4), Duration::from_micros(1));
//! let rows = profile.rows();
//! assert_eq!(rows[0].0, ExitKey::PortWrite(0x3f8)); // most handling time first
//! assert_eq!(rows[0].1.count, 2);
//! assert_eq!(profile.total().count, 3);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;

/// Where a vCPU publishes its profile when its run loop ends.
pub type ProfileSlot = Arc<Mutex<Option<ExitProfile>>>;

/// What an exit was, as a profile counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExitKey {
    /// A guest `in` from this port.
    PortRead(u16),
    /// A guest `out` to this port.
    PortWrite(u16),
    /// An MMIO read at this guest-physical address.
    MmioRead(u64),
    /// An MMIO write at this guest-physical address.
    MmioWrite(u64),
    /// A `RDMSR` of this index that exited to userspace.
    Rdmsr(u32),
    /// A `WRMSR` of this index that exited to userspace.
    Wrmsr(u32),
    /// `KVM_EXIT_HLT` (only without an in-kernel local APIC).
    Hlt,
    /// `KVM_EXIT_INTR`, or `KVM_RUN` returning `EINTR`/`EAGAIN`: a kick or a signal.
    Interrupted,
    /// `KVM_EXIT_SHUTDOWN`: a triple fault.
    Shutdown,
    /// `KVM_EXIT_SYSTEM_EVENT`.
    SystemEvent,
    /// Any other exit reason (`KVM_EXIT_*` number).
    Other(u32),
}

impl ExitKey {
    /// The key of `exit`.
    ///
    /// ```
    /// use kvm_ioctls::VcpuExit;
    /// use vcpu_runner::profile::ExitKey;
    ///
    /// assert_eq!(ExitKey::of(&VcpuExit::IoOut(0x80, &[0])), ExitKey::PortWrite(0x80));
    /// assert_eq!(ExitKey::of(&VcpuExit::Hlt), ExitKey::Hlt);
    /// ```
    pub fn of(exit: &VcpuExit<'_>) -> Self {
        match exit {
            VcpuExit::IoIn(port, _) => ExitKey::PortRead(*port),
            VcpuExit::IoOut(port, _) => ExitKey::PortWrite(*port),
            VcpuExit::MmioRead(addr, _) => ExitKey::MmioRead(*addr),
            VcpuExit::MmioWrite(addr, _) => ExitKey::MmioWrite(*addr),
            VcpuExit::X86Rdmsr(read) => ExitKey::Rdmsr(read.index),
            VcpuExit::X86Wrmsr(write) => ExitKey::Wrmsr(write.index),
            VcpuExit::Hlt => ExitKey::Hlt,
            VcpuExit::Intr => ExitKey::Interrupted,
            VcpuExit::Shutdown => ExitKey::Shutdown,
            VcpuExit::SystemEvent(..) => ExitKey::SystemEvent,
            VcpuExit::Unsupported(reason) => ExitKey::Other(*reason),
            other => ExitKey::Other(exit_number(other)),
        }
    }
}

/// The `KVM_EXIT_*` number of `exit`.
fn exit_number(exit: &VcpuExit<'_>) -> u32 {
    use kvm_bindings::*;
    match exit {
        VcpuExit::Unknown => KVM_EXIT_UNKNOWN,
        VcpuExit::Exception => KVM_EXIT_EXCEPTION,
        VcpuExit::Hypercall(_) => KVM_EXIT_HYPERCALL,
        VcpuExit::Debug(_) => KVM_EXIT_DEBUG,
        VcpuExit::IrqWindowOpen => KVM_EXIT_IRQ_WINDOW_OPEN,
        VcpuExit::FailEntry(..) => KVM_EXIT_FAIL_ENTRY,
        VcpuExit::SetTpr => KVM_EXIT_SET_TPR,
        VcpuExit::TprAccess => KVM_EXIT_TPR_ACCESS,
        VcpuExit::InternalError => KVM_EXIT_INTERNAL_ERROR,
        VcpuExit::IoapicEoi(_) => KVM_EXIT_IOAPIC_EOI,
        VcpuExit::Hyperv => KVM_EXIT_HYPERV,
        VcpuExit::MemoryFault { .. } => KVM_EXIT_MEMORY_FAULT,
        VcpuExit::Nmi => KVM_EXIT_NMI,
        VcpuExit::Watchdog => KVM_EXIT_WATCHDOG,
        VcpuExit::Epr => KVM_EXIT_EPR,
        VcpuExit::Dcr => KVM_EXIT_DCR,
        VcpuExit::Osi => KVM_EXIT_OSI,
        VcpuExit::PaprHcall => KVM_EXIT_PAPR_HCALL,
        VcpuExit::S390Sieic => KVM_EXIT_S390_SIEIC,
        VcpuExit::S390Reset => KVM_EXIT_S390_RESET,
        VcpuExit::S390Ucontrol => KVM_EXIT_S390_UCONTROL,
        VcpuExit::S390Tsch => KVM_EXIT_S390_TSCH,
        VcpuExit::S390Stsi => KVM_EXIT_S390_STSI,
        VcpuExit::Unsupported(reason) => *reason,
        VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => KVM_EXIT_IO,
        VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => KVM_EXIT_MMIO,
        VcpuExit::X86Rdmsr(_) => KVM_EXIT_X86_RDMSR,
        VcpuExit::X86Wrmsr(_) => KVM_EXIT_X86_WRMSR,
        VcpuExit::Hlt => KVM_EXIT_HLT,
        VcpuExit::Intr => KVM_EXIT_INTR,
        VcpuExit::Shutdown => KVM_EXIT_SHUTDOWN,
        VcpuExit::SystemEvent(..) => KVM_EXIT_SYSTEM_EVENT,
    }
}

impl fmt::Display for ExitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitKey::PortRead(port) => write!(f, "pio read {port:#06x}"),
            ExitKey::PortWrite(port) => write!(f, "pio write {port:#06x}"),
            ExitKey::MmioRead(addr) => write!(f, "mmio read {addr:#x}"),
            ExitKey::MmioWrite(addr) => write!(f, "mmio write {addr:#x}"),
            ExitKey::Rdmsr(index) => write!(f, "rdmsr {index:#x}"),
            ExitKey::Wrmsr(index) => write!(f, "wrmsr {index:#x}"),
            ExitKey::Hlt => f.write_str("hlt"),
            ExitKey::Interrupted => f.write_str("interrupted (kick/signal)"),
            ExitKey::Shutdown => f.write_str("shutdown (triple fault)"),
            ExitKey::SystemEvent => f.write_str("system event"),
            ExitKey::Other(reason) => write!(f, "exit reason {reason}"),
        }
    }
}

/// Counts and times of one [`ExitKey`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitFigures {
    /// How many exits.
    pub count: u64,
    /// Time from `KVM_RUN` returning to the run loop being ready for the next one: dispatch to
    /// the device, the exit hook, the register cache.
    pub handling: Duration,
    /// Time inside the `KVM_RUN` calls that ended in these exits (guest time and the kernel's
    /// own exit handling before it).
    pub in_kvm_run: Duration,
}

impl ExitFigures {
    fn add(&mut self, other: ExitFigures) {
        self.count += other.count;
        self.handling += other.handling;
        self.in_kvm_run += other.in_kvm_run;
    }
}

/// One vCPU's exits, by [`ExitKey`].
#[derive(Debug, Clone, Default)]
pub struct ExitProfile {
    first_run: Option<Instant>,
    by_key: HashMap<ExitKey, ExitFigures>,
}

impl ExitProfile {
    /// When this vCPU first entered `KVM_RUN`; `None` if it never did.
    pub fn first_run(&self) -> Option<Instant> {
        self.first_run
    }

    /// Notes that a `KVM_RUN` starts at `now` (only the first one is kept).
    pub fn entering(&mut self, now: Instant) {
        self.first_run.get_or_insert(now);
    }

    /// Adds one exit of kind `key` that spent `in_kvm_run` in the ioctl and `handling` in the
    /// run loop.
    pub fn record(&mut self, key: ExitKey, in_kvm_run: Duration, handling: Duration) {
        self.by_key.entry(key).or_default().add(ExitFigures {
            count: 1,
            handling,
            in_kvm_run,
        });
    }

    /// Every key with its figures, most handling time first (then most exits, then the key).
    pub fn rows(&self) -> Vec<(ExitKey, ExitFigures)> {
        let mut rows: Vec<_> = self.by_key.iter().map(|(k, v)| (*k, *v)).collect();
        rows.sort_by(|a, b| {
            b.1.handling
                .cmp(&a.1.handling)
                .then(b.1.count.cmp(&a.1.count))
                .then(a.0.cmp(&b.0))
        });
        rows
    }

    /// The sum over every key.
    pub fn total(&self) -> ExitFigures {
        let mut total = ExitFigures::default();
        for figures in self.by_key.values() {
            total.add(*figures);
        }
        total
    }

    /// The figures of one key.
    pub fn get(&self, key: ExitKey) -> Option<ExitFigures> {
        self.by_key.get(&key).copied()
    }
}

/// A table with the `limit` rows of most handling time, then one line for the rest.
impl fmt::Display for ExitProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let limit = f.precision().unwrap_or(usize::MAX);
        let rows = self.rows();
        writeln!(
            f,
            "{:<28} {:>9} {:>12} {:>12} {:>14}",
            "exit", "count", "handling ms", "per exit us", "in KVM_RUN ms"
        )?;
        let line = |f: &mut fmt::Formatter<'_>, name: &str, v: ExitFigures| {
            let per_exit = if v.count == 0 {
                0.0
            } else {
                v.handling.as_secs_f64() * 1e6 / v.count as f64
            };
            writeln!(
                f,
                "{:<28} {:>9} {:>12.3} {:>12.2} {:>14.3}",
                name,
                v.count,
                v.handling.as_secs_f64() * 1e3,
                per_exit,
                v.in_kvm_run.as_secs_f64() * 1e3
            )
        };
        let mut rest = ExitFigures::default();
        for (i, (key, figures)) in rows.iter().enumerate() {
            if i < limit {
                line(f, &key.to_string(), *figures)?;
            } else {
                rest.add(*figures);
            }
        }
        if rows.len() > limit {
            line(f, &format!("({} other kinds)", rows.len() - limit), rest)?;
        }
        line(f, "total", self.total())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_exits() {
        let mut data = [0u8; 4];
        assert_eq!(
            ExitKey::of(&VcpuExit::IoIn(0x64, &mut data[..1])),
            ExitKey::PortRead(0x64)
        );
        assert_eq!(
            ExitKey::of(&VcpuExit::MmioRead(0xfee0_0030, &mut data)),
            ExitKey::MmioRead(0xfee0_0030)
        );
        assert_eq!(
            ExitKey::of(&VcpuExit::MmioWrite(0xd000_0000, &data)),
            ExitKey::MmioWrite(0xd000_0000)
        );
        assert_eq!(ExitKey::of(&VcpuExit::Intr), ExitKey::Interrupted);
        assert_eq!(ExitKey::of(&VcpuExit::Shutdown), ExitKey::Shutdown);
        assert_eq!(
            ExitKey::of(&VcpuExit::InternalError),
            ExitKey::Other(kvm_bindings::KVM_EXIT_INTERNAL_ERROR)
        );
        assert_eq!(ExitKey::of(&VcpuExit::Unsupported(99)), ExitKey::Other(99));
    }

    #[test]
    fn figures_add_up_and_sort() {
        let mut p = ExitProfile::default();
        let us = Duration::from_micros;
        for _ in 0..3 {
            p.record(ExitKey::PortRead(0x64), us(100), us(5));
        }
        p.record(ExitKey::MmioWrite(0x1000), us(1), us(50));
        p.record(ExitKey::Hlt, us(9000), us(1));
        let rows = p.rows();
        assert_eq!(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            [
                ExitKey::MmioWrite(0x1000),
                ExitKey::PortRead(0x64),
                ExitKey::Hlt
            ]
        );
        assert_eq!(
            p.get(ExitKey::PortRead(0x64)),
            Some(ExitFigures {
                count: 3,
                handling: us(15),
                in_kvm_run: us(300)
            })
        );
        let total = p.total();
        assert_eq!(
            (total.count, total.handling, total.in_kvm_run),
            (5, us(66), us(9301))
        );
    }

    #[test]
    fn first_run_keeps_the_first() {
        let mut p = ExitProfile::default();
        assert_eq!(p.first_run(), None);
        let t0 = Instant::now();
        p.entering(t0);
        p.entering(t0 + Duration::from_secs(1));
        assert_eq!(p.first_run(), Some(t0));
    }

    #[test]
    fn table_limits_rows_and_sums_the_rest() {
        let mut p = ExitProfile::default();
        for port in 0..5u16 {
            p.record(
                ExitKey::PortWrite(0x3f8 + port),
                Duration::ZERO,
                Duration::from_micros(u64::from(10 - port)),
            );
        }
        let text = format!("{p:.2}");
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[1].starts_with("pio write 0x03f8"), "{text}");
        assert!(lines[2].starts_with("pio write 0x03f9"), "{text}");
        assert!(lines[3].starts_with("(3 other kinds)"), "{text}");
        assert!(lines[3].contains(" 3 "), "{text}");
        assert!(lines[4].starts_with("total"), "{text}");
        assert!(lines[4].contains(" 5 "), "{text}");
    }
}
