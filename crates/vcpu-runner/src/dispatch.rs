//! Exit dispatch: a plain function from a [`VcpuExit`] to an [`ExitOutcome`].
//!
//! [`dispatch`] answers what can be answered in place — port I/O and MMIO through the
//! [`Buses`], MSR accesses through an [`MsrHandler`] — and classifies everything else for the
//! run loop. It never touches a vCPU file descriptor, so unit tests drive it with synthetic
//! exits (`VcpuExit::IoOut(0x80, &[1])`), and it never panics on anything a guest does.

use std::fmt;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;

use crate::bus::{Access, Buses};

/// The guest must take a general-protection fault (#GP) for this MSR access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneralProtection;

/// Answers guest `RDMSR`/`WRMSR` that exit to userspace (`KVM_EXIT_X86_RDMSR`/`WRMSR`,
/// Linux 5.10, enabled with `KVM_CAP_X86_USER_SPACE_MSR`).
///
/// `None` means "not mine": the next handler in a chain is asked, and if none claims the
/// access the guest gets #GP, which is what KVM itself does for an MSR it does not know.
pub trait MsrHandler: Send {
    /// A guest `RDMSR` of `index`.
    fn read(&mut self, index: u32) -> Option<Result<u64, GeneralProtection>>;
    /// A guest `WRMSR` of `value` to `index`.
    fn write(&mut self, index: u32, value: u64) -> Option<Result<(), GeneralProtection>>;
}

/// No MSR is handled in userspace.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMsrs;

impl MsrHandler for NoMsrs {
    fn read(&mut self, _index: u32) -> Option<Result<u64, GeneralProtection>> {
        None
    }
    fn write(&mut self, _index: u32, _value: u64) -> Option<Result<(), GeneralProtection>> {
        None
    }
}

/// Handlers asked in order; the first that claims an access answers it.
impl MsrHandler for Vec<Box<dyn MsrHandler>> {
    fn read(&mut self, index: u32) -> Option<Result<u64, GeneralProtection>> {
        self.iter_mut().find_map(|h| h.read(index))
    }
    fn write(&mut self, index: u32, value: u64) -> Option<Result<(), GeneralProtection>> {
        self.iter_mut().find_map(|h| h.write(index, value))
    }
}

/// IA32_FEATURE_CONTROL emulated by msr-featctl, with KVM's VMX rules.
impl MsrHandler for msr_featctl::EmulatedFeatureControl {
    fn read(&mut self, index: u32) -> Option<Result<u64, GeneralProtection>> {
        (index == msr_featctl::sys::MSR_IA32_FEAT_CTL).then(|| Ok(self.handle_rdmsr()))
    }
    fn write(&mut self, index: u32, value: u64) -> Option<Result<(), GeneralProtection>> {
        if index != msr_featctl::sys::MSR_IA32_FEAT_CTL {
            return None;
        }
        Some(match self.handle_wrmsr(value) {
            msr_featctl::WriteCheck::Accepted(_) => Ok(()),
            msr_featctl::WriteCheck::GeneralProtection(reason) => {
                log::debug!("guest WRMSR 0x3a = {value:#x} refused: {reason:?}");
                Err(GeneralProtection)
            }
        })
    }
}

/// Per-vCPU exit counters, for diagnostics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStats {
    /// Every exit dispatched.
    pub exits: u64,
    /// Port reads (`in`).
    pub pio_reads: u64,
    /// Port writes (`out`).
    pub pio_writes: u64,
    /// MMIO reads.
    pub mmio_reads: u64,
    /// MMIO writes.
    pub mmio_writes: u64,
    /// MSR exits (reads and writes).
    pub msr: u64,
    /// Port accesses no device claimed (reads answered with all ones, writes dropped).
    pub unclaimed_pio: u64,
    /// MMIO accesses no device claimed.
    pub unclaimed_mmio: u64,
    /// MSR exits no handler claimed (the guest got #GP).
    pub unclaimed_msr: u64,
    /// `KVM_EXIT_INTR` exits and `EINTR` returns from `KVM_RUN` (kicks).
    pub interrupts: u64,
}

impl fmt::Display for ExitStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exits {} (pio r/w {}/{}, mmio r/w {}/{}, msr {}, interrupted {}); unclaimed: pio {}, mmio {}, msr {}",
            self.exits,
            self.pio_reads,
            self.pio_writes,
            self.mmio_reads,
            self.mmio_writes,
            self.msr,
            self.interrupts,
            self.unclaimed_pio,
            self.unclaimed_mmio,
            self.unclaimed_msr
        )
    }
}

/// A `KVM_EXIT_SYSTEM_EVENT` (Linux 3.19; `data` since 5.18 — on x86 it comes from PSCI-less
/// paths such as a Hyper-V crash MSR or a SEV termination request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemEvent {
    /// `KVM_SYSTEM_EVENT_SHUTDOWN`: the guest asked to power off.
    Shutdown,
    /// `KVM_SYSTEM_EVENT_RESET`: the guest asked to reset the VM.
    Reset,
    /// `KVM_SYSTEM_EVENT_CRASH`: the guest reported a crash; `data` holds what it reported.
    Crash {
        /// The event data (`kvm_run.system_event.data[..ndata]`).
        data: Vec<u64>,
    },
    /// Any other type (wakeup, suspend, SEV termination, ...), kept raw.
    Other {
        /// `kvm_run.system_event.type`.
        kind: u32,
        /// The event data.
        data: Vec<u64>,
    },
}

impl SystemEvent {
    /// Decodes `kvm_run.system_event`.
    ///
    /// ```
    /// use vcpu_runner::SystemEvent;
    ///
    /// assert_eq!(SystemEvent::from_raw(kvm_bindings::KVM_SYSTEM_EVENT_RESET, &[]), SystemEvent::Reset);
    /// assert_eq!(SystemEvent::from_raw(99, &[1]), SystemEvent::Other { kind: 99, data: vec![1] });
    /// ```
    pub fn from_raw(kind: u32, data: &[u64]) -> Self {
        match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
            KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
            KVM_SYSTEM_EVENT_CRASH => SystemEvent::Crash {
                data: data.to_vec(),
            },
            kind => SystemEvent::Other {
                kind,
                data: data.to_vec(),
            },
        }
    }
}

/// An exit the run loop has no handling for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnhandledExit {
    /// `KVM_EXIT_MEMORY_FAULT` (Linux 6.8): KVM could not map `gpa`.
    MemoryFault {
        /// `memory_fault.flags`.
        flags: u64,
        /// The faulting guest physical address.
        gpa: u64,
        /// The size of the faulting range.
        size: u64,
    },
    /// A known exit with no handler here, by its kvm-ioctls name.
    Known(&'static str),
    /// A `KVM_EXIT_*` number kvm-ioctls does not know.
    Unsupported(u32),
}

impl fmt::Display for UnhandledExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnhandledExit::MemoryFault { flags, gpa, size } => write!(
                f,
                "KVM_EXIT_MEMORY_FAULT at {gpa:#x} size {size:#x} flags {flags:#x}"
            ),
            UnhandledExit::Known(name) => write!(f, "{name}"),
            UnhandledExit::Unsupported(nr) => write!(f, "exit reason {nr}"),
        }
    }
}

/// What the run loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitOutcome {
    /// Handled; re-enter the guest.
    Continue,
    /// `KVM_EXIT_INTR`: a signal interrupted `KVM_RUN`; look at commands, then re-enter.
    Interrupted,
    /// `hlt` with no in-kernel irqchip: nothing can wake this vCPU, so it is done.
    Halted,
    /// `KVM_EXIT_SHUTDOWN`: a triple fault (or, on AMD, a shutdown intercept).
    TripleFault,
    /// `KVM_EXIT_SYSTEM_EVENT`.
    SystemEvent(SystemEvent),
    /// `KVM_EXIT_FAIL_ENTRY`: the hardware refused VM entry.
    FailEntry {
        /// `hardware_entry_failure_reason` (VMX exit reason or SVM exit code).
        hardware_entry_failure_reason: u64,
        /// The host CPU the entry was attempted on.
        cpu: u32,
    },
    /// `KVM_EXIT_INTERNAL_ERROR`; the run loop reads the suberror and data from `kvm_run`.
    InternalError,
    /// An exit this runner does not handle.
    Unhandled(UnhandledExit),
}

impl ExitOutcome {
    /// Whether KVM must be re-entered to complete the instruction behind this exit before
    /// guest state is consistent (api.rst, "KVM_RUN": I/O, MMIO and MSR exits).
    pub fn leaves_instruction_in_flight(exit: &VcpuExit<'_>) -> bool {
        matches!(
            exit,
            VcpuExit::IoIn(..)
                | VcpuExit::IoOut(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..)
                | VcpuExit::X86Rdmsr(_)
                | VcpuExit::X86Wrmsr(_)
        )
    }
}

/// An owned record of one dispatched exit, for code that runs once the exit no longer borrows
/// the vCPU (kvm-ioctls' `VcpuExit` borrows it mutably): port and MMIO accesses with their
/// data — for reads, the data the bus answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitRecord {
    /// A guest `in`.
    PortRead {
        /// The port.
        port: u16,
        /// The bytes returned to the guest.
        data: Vec<u8>,
    },
    /// A guest `out`.
    PortWrite {
        /// The port.
        port: u16,
        /// The bytes the guest wrote.
        data: Vec<u8>,
    },
    /// An MMIO read.
    MmioRead {
        /// The guest physical address.
        addr: u64,
        /// The bytes returned to the guest.
        data: Vec<u8>,
    },
    /// An MMIO write.
    MmioWrite {
        /// The guest physical address.
        addr: u64,
        /// The bytes the guest wrote.
        data: Vec<u8>,
    },
    /// Any other exit; the [`ExitOutcome`] says what it was.
    Other,
}

impl ExitRecord {
    /// Records `exit` (after [`dispatch`], so that read data is what the guest receives).
    ///
    /// ```
    /// use kvm_ioctls::VcpuExit;
    /// use vcpu_runner::ExitRecord;
    ///
    /// let record = ExitRecord::of(&VcpuExit::IoOut(0x3f8, b"A"));
    /// assert_eq!(record, ExitRecord::PortWrite { port: 0x3f8, data: b"A".to_vec() });
    /// assert_eq!(ExitRecord::of(&VcpuExit::Hlt), ExitRecord::Other);
    /// ```
    pub fn of(exit: &VcpuExit<'_>) -> Self {
        match exit {
            VcpuExit::IoIn(port, data) => ExitRecord::PortRead {
                port: *port,
                data: data.to_vec(),
            },
            VcpuExit::IoOut(port, data) => ExitRecord::PortWrite {
                port: *port,
                data: data.to_vec(),
            },
            VcpuExit::MmioRead(addr, data) => ExitRecord::MmioRead {
                addr: *addr,
                data: data.to_vec(),
            },
            VcpuExit::MmioWrite(addr, data) => ExitRecord::MmioWrite {
                addr: *addr,
                data: data.to_vec(),
            },
            _ => ExitRecord::Other,
        }
    }
}

/// Dispatches one exit: answers I/O, MMIO and MSR exits in place (filling `in` and MMIO read
/// data, MSR read data and the MSR `error` flag in `kvm_run`) and classifies the rest.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use kvm_ioctls::VcpuExit;
/// use vcpu_runner::{dispatch, BusDevice, Buses, ExitOutcome, ExitStats, NoMsrs};
///
/// struct Answer42;
/// impl BusDevice for Answer42 {
///     fn read(&mut self, _offset: u64, data: &mut [u8]) {
///         data.fill(42);
///     }
///     fn write(&mut self, _offset: u64, _data: &[u8]) {}
/// }
///
/// let mut buses = Buses::new();
/// buses.pio.insert(0x60, 1, Arc::new(Mutex::new(Answer42)))?;
/// let mut stats = ExitStats::default();
/// let mut data = [0u8; 1];
/// let outcome = dispatch(&mut VcpuExit::IoIn(0x60, &mut data), &buses, &mut NoMsrs, &mut stats);
/// assert_eq!((outcome, data), (ExitOutcome::Continue, [42]));
/// // Nobody decodes port 0x61: the guest reads all ones, and the access is counted.
/// dispatch(&mut VcpuExit::IoIn(0x61, &mut data), &buses, &mut NoMsrs, &mut stats);
/// assert_eq!((data, stats.unclaimed_pio), ([0xff], 1));
/// assert_eq!(dispatch(&mut VcpuExit::Shutdown, &buses, &mut NoMsrs, &mut stats), ExitOutcome::TripleFault);
/// # Ok::<(), vcpu_runner::bus::Error>(())
/// ```
pub fn dispatch(
    exit: &mut VcpuExit<'_>,
    buses: &Buses,
    msr: &mut dyn MsrHandler,
    stats: &mut ExitStats,
) -> ExitOutcome {
    stats.exits += 1;
    match exit {
        VcpuExit::IoIn(port, data) => {
            stats.pio_reads += 1;
            if buses.pio.read(u64::from(*port), data) == Access::Unclaimed {
                stats.unclaimed_pio += 1;
            }
            ExitOutcome::Continue
        }
        VcpuExit::IoOut(port, data) => {
            stats.pio_writes += 1;
            if buses.pio.write(u64::from(*port), data) == Access::Unclaimed {
                stats.unclaimed_pio += 1;
            }
            ExitOutcome::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            stats.mmio_reads += 1;
            if buses.mmio.read(*addr, data) == Access::Unclaimed {
                stats.unclaimed_mmio += 1;
            }
            ExitOutcome::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            stats.mmio_writes += 1;
            if buses.mmio.write(*addr, data) == Access::Unclaimed {
                stats.unclaimed_mmio += 1;
            }
            ExitOutcome::Continue
        }
        VcpuExit::X86Rdmsr(read) => {
            stats.msr += 1;
            let answer = msr.read(read.index).unwrap_or_else(|| {
                stats.unclaimed_msr += 1;
                log::debug!("guest RDMSR {:#x}: no handler, injecting #GP", read.index);
                Err(GeneralProtection)
            });
            match answer {
                Ok(value) => {
                    *read.data = value;
                    *read.error = 0;
                }
                Err(GeneralProtection) => *read.error = 1,
            }
            ExitOutcome::Continue
        }
        VcpuExit::X86Wrmsr(write) => {
            stats.msr += 1;
            let answer = msr.write(write.index, write.data).unwrap_or_else(|| {
                stats.unclaimed_msr += 1;
                log::debug!(
                    "guest WRMSR {:#x} = {:#x}: no handler, injecting #GP",
                    write.index,
                    write.data
                );
                Err(GeneralProtection)
            });
            *write.error = u8::from(answer.is_err());
            ExitOutcome::Continue
        }
        VcpuExit::Intr => {
            stats.interrupts += 1;
            ExitOutcome::Interrupted
        }
        VcpuExit::Hlt => ExitOutcome::Halted,
        VcpuExit::Shutdown => ExitOutcome::TripleFault,
        VcpuExit::SystemEvent(kind, data) => {
            ExitOutcome::SystemEvent(SystemEvent::from_raw(*kind, data))
        }
        VcpuExit::FailEntry(reason, cpu) => ExitOutcome::FailEntry {
            hardware_entry_failure_reason: *reason,
            cpu: *cpu,
        },
        VcpuExit::InternalError => ExitOutcome::InternalError,
        VcpuExit::MemoryFault { flags, gpa, size } => {
            ExitOutcome::Unhandled(UnhandledExit::MemoryFault {
                flags: *flags,
                gpa: *gpa,
                size: *size,
            })
        }
        VcpuExit::Unsupported(nr) => ExitOutcome::Unhandled(UnhandledExit::Unsupported(*nr)),
        other => ExitOutcome::Unhandled(UnhandledExit::Known(exit_name(other))),
    }
}

/// The kvm-ioctls name of an exit the dispatcher does not handle.
fn exit_name(exit: &VcpuExit<'_>) -> &'static str {
    match exit {
        VcpuExit::Unknown => "KVM_EXIT_UNKNOWN",
        VcpuExit::Exception => "KVM_EXIT_EXCEPTION",
        VcpuExit::Hypercall(_) => "KVM_EXIT_HYPERCALL",
        VcpuExit::Debug(_) => "KVM_EXIT_DEBUG",
        VcpuExit::IrqWindowOpen => "KVM_EXIT_IRQ_WINDOW_OPEN",
        VcpuExit::SetTpr => "KVM_EXIT_SET_TPR",
        VcpuExit::TprAccess => "KVM_EXIT_TPR_ACCESS",
        VcpuExit::Nmi => "KVM_EXIT_NMI",
        VcpuExit::Watchdog => "KVM_EXIT_WATCHDOG",
        VcpuExit::Epr => "KVM_EXIT_EPR",
        VcpuExit::IoapicEoi(_) => "KVM_EXIT_IOAPIC_EOI",
        VcpuExit::Hyperv => "KVM_EXIT_HYPERV",
        _ => "a non-x86 exit",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::tests::recorder;
    use kvm_ioctls::{MsrExitReason, ReadMsrExit, WriteMsrExit};

    fn buses() -> (
        Buses,
        std::sync::Arc<std::sync::Mutex<crate::bus::tests::Recorder>>,
    ) {
        let mut buses = Buses::new();
        let dev = recorder(0x42);
        buses.pio.insert(0x60, 4, dev.clone()).unwrap();
        buses.mmio.insert(0xd000_0000, 0x1000, dev.clone()).unwrap();
        (buses, dev)
    }

    #[test]
    fn port_io_goes_through_the_pio_bus() {
        let (buses, dev) = buses();
        let mut stats = ExitStats::default();
        let mut data = [0u8; 2];
        let outcome = dispatch(
            &mut VcpuExit::IoIn(0x62, &mut data),
            &buses,
            &mut NoMsrs,
            &mut stats,
        );
        assert_eq!(outcome, ExitOutcome::Continue);
        assert_eq!(data, [0x42, 0x42]);
        let outcome = dispatch(
            &mut VcpuExit::IoOut(0x61, &[9]),
            &buses,
            &mut NoMsrs,
            &mut stats,
        );
        assert_eq!(outcome, ExitOutcome::Continue);
        assert_eq!(dev.lock().unwrap().writes, vec![(1, vec![9])]);
        assert_eq!(dev.lock().unwrap().reads, vec![(2, 2)]);
        assert_eq!(
            (stats.pio_reads, stats.pio_writes, stats.unclaimed_pio),
            (1, 1, 0)
        );
    }

    #[test]
    fn unclaimed_port_and_mmio_read_all_ones_and_are_counted() {
        let (buses, dev) = buses();
        let mut stats = ExitStats::default();
        let mut data = [0u8; 4];
        dispatch(
            &mut VcpuExit::IoIn(0x70, &mut data),
            &buses,
            &mut NoMsrs,
            &mut stats,
        );
        assert_eq!(data, [0xff; 4]);
        dispatch(
            &mut VcpuExit::IoOut(0x70, &[1]),
            &buses,
            &mut NoMsrs,
            &mut stats,
        );
        let mut data = [0u8; 8];
        dispatch(
            &mut VcpuExit::MmioRead(0x1000, &mut data),
            &buses,
            &mut NoMsrs,
            &mut stats,
        );
        assert_eq!(data, [0xff; 8]);
        dispatch(
            &mut VcpuExit::MmioWrite(0x1000, &[1, 2]),
            &buses,
            &mut NoMsrs,
            &mut stats,
        );
        assert_eq!((stats.unclaimed_pio, stats.unclaimed_mmio), (2, 2));
        assert_eq!(stats.exits, 4);
        assert!(dev.lock().unwrap().writes.is_empty());
        assert!(stats.to_string().contains("unclaimed: pio 2, mmio 2"));
    }

    #[test]
    fn mmio_goes_through_the_mmio_bus() {
        let (buses, dev) = buses();
        let mut stats = ExitStats::default();
        let mut data = [0u8; 4];
        let outcome = dispatch(
            &mut VcpuExit::MmioRead(0xd000_0010, &mut data),
            &buses,
            &mut NoMsrs,
            &mut stats,
        );
        assert_eq!(outcome, ExitOutcome::Continue);
        assert_eq!(data, [0x42; 4]);
        dispatch(
            &mut VcpuExit::MmioWrite(0xd000_0ff8, &7u64.to_le_bytes()),
            &buses,
            &mut NoMsrs,
            &mut stats,
        );
        assert_eq!(
            dev.lock().unwrap().writes,
            vec![(0xff8, 7u64.to_le_bytes().to_vec())]
        );
        assert_eq!((stats.mmio_reads, stats.mmio_writes), (1, 1));
    }

    #[test]
    fn guest_events_are_classified() {
        let buses = Buses::new();
        let mut stats = ExitStats::default();
        let mut run = |mut exit: VcpuExit<'_>| dispatch(&mut exit, &buses, &mut NoMsrs, &mut stats);
        assert_eq!(run(VcpuExit::Hlt), ExitOutcome::Halted);
        assert_eq!(run(VcpuExit::Shutdown), ExitOutcome::TripleFault);
        assert_eq!(run(VcpuExit::Intr), ExitOutcome::Interrupted);
        assert_eq!(
            run(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[])),
            ExitOutcome::SystemEvent(SystemEvent::Shutdown)
        );
        assert_eq!(
            run(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[])),
            ExitOutcome::SystemEvent(SystemEvent::Reset)
        );
        assert_eq!(
            run(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[0xdead, 1])),
            ExitOutcome::SystemEvent(SystemEvent::Crash {
                data: vec![0xdead, 1]
            })
        );
        assert_eq!(
            run(VcpuExit::SystemEvent(99, &[5])),
            ExitOutcome::SystemEvent(SystemEvent::Other {
                kind: 99,
                data: vec![5]
            })
        );
        assert_eq!(
            run(VcpuExit::FailEntry(0x21, 3)),
            ExitOutcome::FailEntry {
                hardware_entry_failure_reason: 0x21,
                cpu: 3
            }
        );
        assert_eq!(run(VcpuExit::InternalError), ExitOutcome::InternalError);
    }

    #[test]
    fn unknown_exits_are_unhandled_not_panics() {
        let buses = Buses::new();
        let mut stats = ExitStats::default();
        let mut run = |mut exit: VcpuExit<'_>| dispatch(&mut exit, &buses, &mut NoMsrs, &mut stats);
        assert_eq!(
            run(VcpuExit::Unsupported(1234)),
            ExitOutcome::Unhandled(UnhandledExit::Unsupported(1234))
        );
        assert_eq!(
            run(VcpuExit::Unknown),
            ExitOutcome::Unhandled(UnhandledExit::Known("KVM_EXIT_UNKNOWN"))
        );
        assert_eq!(
            run(VcpuExit::MemoryFault {
                flags: 8,
                gpa: 0x1000,
                size: 0x1000
            }),
            ExitOutcome::Unhandled(UnhandledExit::MemoryFault {
                flags: 8,
                gpa: 0x1000,
                size: 0x1000
            })
        );
        for exit in [
            VcpuExit::Exception,
            VcpuExit::IrqWindowOpen,
            VcpuExit::SetTpr,
            VcpuExit::TprAccess,
            VcpuExit::Nmi,
            VcpuExit::Watchdog,
            VcpuExit::Epr,
            VcpuExit::IoapicEoi(3),
            VcpuExit::Hyperv,
            VcpuExit::Dcr,
        ] {
            assert!(matches!(
                run(exit),
                ExitOutcome::Unhandled(UnhandledExit::Known(_))
            ));
        }
        assert_eq!(UnhandledExit::Unsupported(7).to_string(), "exit reason 7");
        assert!(UnhandledExit::MemoryFault {
            flags: 0,
            gpa: 0x10,
            size: 1
        }
        .to_string()
        .contains("0x10"));
        assert_eq!(UnhandledExit::Known("X").to_string(), "X");
    }

    fn featctl() -> msr_featctl::EmulatedFeatureControl {
        msr_featctl::EmulatedFeatureControl::with_firmware_value(msr_featctl::GuestCpuidFeatures {
            vmx: true,
            ..Default::default()
        })
    }

    #[test]
    fn msr_exits_go_to_the_handler_and_unclaimed_ones_inject_gp() {
        let buses = Buses::new();
        let mut stats = ExitStats::default();
        let mut handler = featctl();
        let expected = handler.handle_rdmsr();

        let (mut error, mut data) = (1u8, 0u64);
        let mut exit = VcpuExit::X86Rdmsr(ReadMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index: 0x3a,
            data: &mut data,
        });
        assert_eq!(
            dispatch(&mut exit, &buses, &mut handler, &mut stats),
            ExitOutcome::Continue
        );
        assert_eq!((error, data), (0, expected));

        // Locked: a guest write takes #GP.
        let mut error = 0u8;
        let mut exit = VcpuExit::X86Wrmsr(WriteMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index: 0x3a,
            data: 0,
        });
        dispatch(&mut exit, &buses, &mut handler, &mut stats);
        assert_eq!(error, 1);

        // Another MSR: nobody claims it, #GP, counted.
        let (mut error, mut data) = (0u8, 0u64);
        let mut exit = VcpuExit::X86Rdmsr(ReadMsrExit {
            error: &mut error,
            reason: MsrExitReason::Unknown,
            index: 0x1234,
            data: &mut data,
        });
        dispatch(&mut exit, &buses, &mut handler, &mut stats);
        assert_eq!(error, 1);
        let mut error = 0u8;
        let mut exit = VcpuExit::X86Wrmsr(WriteMsrExit {
            error: &mut error,
            reason: MsrExitReason::Unknown,
            index: 0x1234,
            data: 5,
        });
        dispatch(&mut exit, &buses, &mut NoMsrs, &mut stats);
        assert_eq!(error, 1);
        assert_eq!((stats.msr, stats.unclaimed_msr), (4, 2));
    }

    #[test]
    fn unlocked_feature_control_write_is_accepted_through_a_chain() {
        let buses = Buses::new();
        let mut stats = ExitStats::default();
        let unlocked = msr_featctl::EmulatedFeatureControl::new(msr_featctl::GuestCpuidFeatures {
            vmx: true,
            ..Default::default()
        });
        let mut chain: Vec<Box<dyn MsrHandler>> = vec![Box::new(NoMsrs), Box::new(unlocked)];
        let mut error = 1u8;
        let mut exit = VcpuExit::X86Wrmsr(WriteMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index: 0x3a,
            data: 0b101,
        });
        dispatch(&mut exit, &buses, &mut chain, &mut stats);
        assert_eq!(error, 0);
        assert_eq!(chain.read(0x3a), Some(Ok(0b101)));
        assert_eq!(chain.read(0x3b), None);
        assert_eq!(chain.write(0x3b, 0), None);
    }

    #[test]
    fn in_flight_instructions_are_the_ones_api_rst_lists() {
        let mut data = [0u8; 1];
        assert!(ExitOutcome::leaves_instruction_in_flight(&VcpuExit::IoIn(
            1, &mut data
        )));
        assert!(ExitOutcome::leaves_instruction_in_flight(
            &VcpuExit::MmioWrite(1, &[1])
        ));
        assert!(!ExitOutcome::leaves_instruction_in_flight(&VcpuExit::Hlt));
        assert!(!ExitOutcome::leaves_instruction_in_flight(&VcpuExit::Intr));
    }
}
