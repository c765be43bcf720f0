//! Builds a VM from a [`ValidConfig`] by composing the workspace crates, runs it, and says how
//! it ended.
//!
//! Order of construction (each step needs the previous ones):
//! 1. `/dev/kvm`; the XSTATE guest permission ([`xstate_perm::GuestPermission`]), which must
//!    exist before the first vCPU and is what creates vCPUs;
//! 2. the VM through [`vm_types::create_vm`] (default type), guest memory slots, TSS, the
//!    in-kernel irqchip (PIC, I/O APIC, local APICs) and PIT;
//! 3. kernel, initramfs, command line, ACPI and MP tables ([`crate::boot`]);
//! 4. devices on the port I/O bus; COM1's interrupt eventfd bound to GSI 4 with irqfd;
//! 5. per vCPU: CPUID, LINT0/LINT1, FPU, boot registers on vCPU 0 through
//!    [`sync_regs::RegisterCache`] (the others wait for INIT/SIPI in the in-kernel LAPIC), IA32_FEATURE_CONTROL when nested VMX is exposed;
//! 6. [`vcpu_runner::VmRunner`] runs one thread per vCPU.
//!
//! [`Vmm::run`] waits until the guest asks to power off or reset or reports a panic (through a
//! device), halts for good after announcing an orderly shutdown, a vCPU ends the VM (triple
//! fault, KVM error), or a terminating signal arrives; then it stops every vCPU.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use msr_featctl::{ConfiguredVcpu, GuestCpuidFeatures, KvmSupport, Mode, ResolvedMode};
use sync_regs::{RegisterCache, RegisterDump};
use vcpu_runner::{Buses, MsrHandler, NoMsrs, Vcpu, VmOutcome, VmRunner};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use xstate_perm::{GuestPermission, RequestError, SystemHost, XFeature, XFeatureSet};

use crate::config::ValidConfig;
use crate::cpuid::{self, VcpuTopology};
use crate::devices::i8042::I8042;
use crate::devices::power::AcpiSleepRegisters;
use crate::devices::pvpanic::PvPanic;
use crate::devices::rtc::CmosRtc;
use crate::devices::serial::{ConsoleOut, ConsoleOutput, SerialConsole};
use crate::devices::{GuestEnd, GuestRequest};
use crate::regs::{self, EntryPoint};
use crate::sys::{
    self, ACPI_PORTS, ACPI_SLEEP_CONTROL_PORT, APIC_LVT0, APIC_LVT1, APIC_MODE_EXTINT,
    APIC_MODE_NMI, CMOS_PORT, CMOS_PORTS, COM1_GSI, COM1_PORT, CPUID_1_ECX_VMX, I8042_PORT,
    I8042_PORTS, KVM_TSS_ADDRESS, PVPANIC_PORT, UART_REGISTERS,
};
use crate::{boot, memory, terminal};

/// How often the main thread looks for a device request or a signal while the VM runs.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How long stopping the vCPUs may take.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after announcing an orderly shutdown (ACPI `\_TTS`) a guest may take to power
/// off or reset before it counts as halted for good. Linux's halt (`halt -f`) stops every CPU
/// with interrupts off (`stop_this_cpu()`); with the in-kernel LAPIC such a vCPU never leaves
/// `KVM_RUN`, so nothing else shows it.
pub const HALT_GRACE: Duration = Duration::from_secs(10);

/// Errors of building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The host's KVM cannot run a Linux guest.
    #[error("cannot boot a Linux guest here")]
    HostUnsupported(#[source] crate::host::Unsupported),
    /// The host's KVM allows fewer vCPUs than configured.
    #[error("this KVM allows at most {max} vCPUs, {requested} configured")]
    TooManyVcpusForHost {
        /// Configured.
        requested: u32,
        /// `KVM_CAP_MAX_VCPUS`.
        max: usize,
    },
    /// The XSTATE guest permission could not be obtained.
    #[error("cannot obtain the XSTATE guest permission")]
    XstatePermission(#[source] RequestError),
    /// Limiting CPUID leaf 0xD to the permission failed.
    #[error("cannot limit CPUID leaf 0xD to the XSTATE permission")]
    XstateCpuid(#[source] xstate_perm::layout::Error),
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_VM` failed.
    #[error("cannot create the VM")]
    CreateVm(#[source] vm_types::host::Error),
    /// Guest memory.
    #[error("cannot set up guest memory")]
    Memory(#[from] memory::Error),
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed")]
    MemorySlot {
        /// The slot.
        slot: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A VM-level ioctl of the platform setup failed.
    #[error("{ioctl} failed")]
    VmIoctl {
        /// Which.
        ioctl: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Loading the guest.
    #[error("cannot load the guest")]
    Boot(#[from] boot::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// A device could not be put on the bus.
    #[error("cannot place a device on the I/O bus")]
    Bus(#[source] vcpu_runner::bus::Error),
    /// Setting the boot vCPU's entry registers failed.
    #[error("vCPU 0: setting the boot registers failed")]
    BootRegisters(#[source] sync_regs::Error),
    /// A vCPU-level ioctl of the setup failed.
    #[error("vCPU {vcpu}: {ioctl} failed")]
    VcpuIoctl {
        /// The vCPU.
        vcpu: u32,
        /// Which.
        ioctl: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Deciding how to provide IA32_FEATURE_CONTROL failed.
    #[error("cannot provide IA32_FEATURE_CONTROL for nested VMX")]
    FeatureControl(#[source] msr_featctl::mode::Error),
    /// Installing the MSR filter for the emulated IA32_FEATURE_CONTROL failed.
    #[error("cannot install the IA32_FEATURE_CONTROL MSR filter")]
    FeatureControlFilter(#[source] msr_featctl::emulated::Error),
    /// Querying what KVM exposes (for the IA32_FEATURE_CONTROL bits) failed.
    #[error("cannot query what KVM exposes for IA32_FEATURE_CONTROL")]
    FeatureControlSupport(#[source] msr_featctl::feature_control::SupportError),
    /// Writing IA32_FEATURE_CONTROL natively failed.
    #[error("vCPU {vcpu}: cannot set IA32_FEATURE_CONTROL")]
    FeatureControlNative {
        /// The vCPU.
        vcpu: u32,
        /// Why.
        #[source]
        source: msr_featctl::native::Error,
    },
    /// The vCPU-thread runner failed.
    #[error("vCPU runner failed")]
    Runner(#[source] vcpu_runner::vm::Error),
    /// Duplicating a vCPU fd for diagnostics failed.
    #[error("cannot duplicate the fd of vCPU {vcpu}")]
    DupVcpu {
        /// The vCPU.
        vcpu: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The console output thread could not start.
    #[error("cannot start the console output thread")]
    ConsoleOutput(#[source] io::Error),
    /// The console input thread could not start.
    #[error("cannot start the console input thread")]
    ConsoleInput(#[source] io::Error),
    /// Signal handlers.
    #[error("cannot set up signal handling")]
    Signals(#[source] terminal::Error),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Whether the error is in the user's input (the kernel, initramfs or command line that
    /// validation could not fully check), which the VMM reports with exit status 2.
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            Error::Boot(
                boot::Error::OpenKernel { .. }
                    | boot::Error::LoadKernel { .. }
                    | boot::Error::Cmdline(_)
                    | boot::Error::OpenInitramfs { .. }
                    | boot::Error::InitramfsDoesNotFit { .. }
                    | boot::Error::ReadInitramfs { .. }
            )
        )
    }
}

/// How a VM run ended, and what the VMM's exit status is for it.
#[derive(Debug)]
pub enum RunOutcome {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest reset the machine after announcing an orderly shutdown (a reboot), or KVM
    /// reported `KVM_SYSTEM_EVENT_RESET`.
    Reset,
    /// The guest reset the machine without announcing a shutdown: Linux does that after a
    /// panic (`panic=N`) and on an emergency restart (sysrq-b).
    ResetWithoutShutdown,
    /// The guest reported a panic through the pvpanic device.
    Panicked,
    /// A terminating signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT).
    Signal(i32),
    /// A vCPU triple-faulted.
    TripleFault {
        /// The vCPU.
        vcpu: u32,
        /// Its registers as vcpu-runner took them at the `KVM_EXIT_SHUTDOWN`, when they could
        /// be read (see [`is_reset_state`] for what they show on kvm-amd).
        dump: Option<Box<RegisterDump>>,
    },
    /// The guest reported a crash through a system event.
    GuestCrash(String),
    /// The guest halted for good.
    Halted {
        /// `true`: it announced an orderly shutdown and neither powered off nor reset within
        /// [`HALT_GRACE`] (Linux's halt); `false`: vcpu-runner saw every vCPU halted with
        /// nothing to wake it.
        after_shutdown_notice: bool,
    },
    /// A vCPU failed (KVM error, unhandled exit); the message holds KVM's data and registers.
    VcpuError(String),
}

impl RunOutcome {
    /// Exit status: 0 for a guest power-off or reboot, 2 is left to usage errors, 3 for a
    /// guest crash (panic, reset without shutdown, triple fault, crash event, halted for
    /// good), 4 for a KVM or VMM error, 128 + signal for a terminating signal as shells report
    /// it.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunOutcome::PowerOff | RunOutcome::Reset => 0,
            RunOutcome::ResetWithoutShutdown
            | RunOutcome::Panicked
            | RunOutcome::TripleFault { .. }
            | RunOutcome::GuestCrash(_)
            | RunOutcome::Halted { .. } => 3,
            RunOutcome::VcpuError(_) => 4,
            RunOutcome::Signal(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunOutcome::PowerOff => f.write_str("guest powered off"),
            RunOutcome::Reset => f.write_str("guest requested reset"),
            RunOutcome::ResetWithoutShutdown => f.write_str(
                "guest reset without an orderly shutdown (a kernel panic, or an emergency restart)",
            ),
            RunOutcome::Panicked => f.write_str("guest panicked (pvpanic)"),
            RunOutcome::Signal(s) => {
                write!(f, "stopped by {} (signal {s})", terminal::signal_name(*s))
            }
            RunOutcome::TripleFault { vcpu, dump } => {
                write!(f, "guest triple fault on vCPU {vcpu}")?;
                match dump {
                    Some(d) if is_reset_state(d) => f.write_str(
                        " (no registers of the fault: KVM had already reset the vCPU when it \
                         reported the triple fault, as kvm-amd does on a shutdown intercept; \
                         the guest console above shows what led to it)",
                    ),
                    Some(d) => write!(f, "; registers at the exit:\n{d}"),
                    None => f.write_str(" (registers unavailable)"),
                }
            }
            RunOutcome::GuestCrash(what) => write!(f, "guest crashed: {what}"),
            RunOutcome::Halted {
                after_shutdown_notice: true,
            } => write!(
                f,
                "guest halted: it began a shutdown and neither powered off nor reset within {} s",
                HALT_GRACE.as_secs()
            ),
            RunOutcome::Halted {
                after_shutdown_notice: false,
            } => f.write_str("guest halted: every vCPU halted with nothing to wake it"),
            RunOutcome::VcpuError(e) => write!(f, "vCPU error: {e}"),
        }
    }
}

/// A duplicate of a vCPU fd, kept to read registers after the vCPU's thread has ended.
#[derive(Debug)]
struct DiagnosticFd(OwnedFd);

impl DiagnosticFd {
    fn of(vcpu: u32, fd: &VcpuFd) -> Result<Self> {
        // SAFETY: dup of a valid, open fd; the result is checked before use.
        let raw = unsafe { libc::dup(fd.as_raw_fd()) };
        if raw < 0 {
            return Err(Error::DupVcpu {
                vcpu,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        Ok(DiagnosticFd(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    fn dump(&self) -> io::Result<RegisterDump> {
        let mut regs = kvm_regs::default();
        let mut sregs = kvm_sregs::default();
        let mut events = kvm_vcpu_events::default();
        // SAFETY: KVM_GET_REGS writes one kvm_regs into the buffer we own.
        if unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.0, sys::ioctls::KVM_GET_REGS(), &mut regs)
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: KVM_GET_SREGS writes one kvm_sregs into the buffer we own.
        if unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(
                &self.0,
                sys::ioctls::KVM_GET_SREGS(),
                &mut sregs,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: KVM_GET_VCPU_EVENTS writes one kvm_vcpu_events into the buffer we own.
        let events_ok = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(
                &self.0,
                sys::ioctls::KVM_GET_VCPU_EVENTS(),
                &mut events,
            )
        } >= 0;
        Ok(RegisterDump::new(regs, sregs, events_ok.then_some(events)))
    }
}

/// A built VM, ready to run.
pub struct Vmm {
    runner: VmRunner,
    end: Arc<GuestEnd>,
    serial: Arc<Mutex<SerialConsole>>,
    console: ConsoleOutput,
    diagnostics: Vec<DiagnosticFd>,
    // Kept alive for the VM's lifetime: memory, the VM fd and the irqfd.
    _memory: GuestMemoryMmap,
    _vm: VmFd,
    _serial_irq: EventFd,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm").finish_non_exhaustive()
    }
}

fn vm_ioctl(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::VmIoctl { ioctl, source }
}

fn vcpu_ioctl(vcpu: u32, ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::VcpuIoctl {
        vcpu,
        ioctl,
        source,
    }
}

/// The XSTATE permission: AMX when asked and available, otherwise the always-permitted legacy
/// set (which makes no request).
fn xstate_permission(host: &SystemHost<'_>, amx: bool) -> Result<GuestPermission> {
    if amx {
        match GuestPermission::request_feature(host, XFeature::XtileData) {
            Ok(p) => return Ok(p),
            Err(e @ (RequestError::CpuLacks { .. } | RequestError::KvmWillNotExpose { .. })) => {
                log::warn!("AMX not granted to the guest: {e}");
            }
            Err(e) => return Err(Error::XstatePermission(e)),
        }
    }
    GuestPermission::request(host, XFeatureSet::LEGACY).map_err(Error::XstatePermission)
}

fn set_lint(vcpu: u32, fd: &VcpuFd) -> Result<()> {
    let mut lapic = fd.get_lapic().map_err(vcpu_ioctl(vcpu, "KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: Vec<u8> = lapic.regs[reg..reg + 4].iter().map(|b| *b as u8).collect();
        let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let value = (value & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    fd.set_lapic(&lapic)
        .map_err(vcpu_ioctl(vcpu, "KVM_SET_LAPIC"))
}

impl Vmm {
    /// Builds the VM for `cfg`, with guest console output going to `out`.
    pub fn build(cfg: &ValidConfig, out: ConsoleOut) -> Result<Self> {
        let c = cfg.config();
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        crate::host::check_vendor_module(std::path::Path::new("/sys/module"))
            .map_err(Error::HostUnsupported)?;
        let max = kvm.get_max_vcpus();
        if c.vcpus as usize > max {
            return Err(Error::TooManyVcpusForHost {
                requested: c.vcpus,
                max,
            });
        }
        let permission = xstate_permission(&SystemHost::new(&kvm), c.amx)?;
        let vm = vm_types::create_vm(&kvm, vm_types::VmType::Default).map_err(Error::CreateVm)?;

        let mem = memory::create_guest_memory(cfg.mem_bytes())?;
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let region_desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the returned Vmm
            // keeps for as long as the VM exists.
            unsafe { vm.set_user_memory_region(region_desc) }
                .map_err(|source| Error::MemorySlot { slot, source })?;
        }
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(vm_ioctl("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(vm_ioctl("KVM_CREATE_IRQCHIP"))?;
        mask_pics(&vm)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(vm_ioctl("KVM_CREATE_PIT2"))?;

        let entry = boot::load(&mem, cfg)?;

        let end = Arc::new(GuestEnd::new());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&serial_irq, COM1_GSI)
            .map_err(vm_ioctl("KVM_IRQFD"))?;
        let (console, console_writer) = ConsoleOutput::spawn(out).map_err(Error::ConsoleOutput)?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            serial_irq.try_clone().map_err(Error::EventFd)?,
            Box::new(console_writer),
        )));
        let mut buses = Buses::new();
        buses
            .pio
            .insert(COM1_PORT, UART_REGISTERS, serial.clone())
            .map_err(Error::Bus)?;
        buses
            .pio
            .insert(
                I8042_PORT,
                I8042_PORTS,
                Arc::new(Mutex::new(I8042::new(end.clone()))),
            )
            .map_err(Error::Bus)?;
        buses
            .pio
            .insert(CMOS_PORT, CMOS_PORTS, Arc::new(Mutex::new(CmosRtc::new())))
            .map_err(Error::Bus)?;
        buses
            .pio
            .insert(
                ACPI_SLEEP_CONTROL_PORT,
                ACPI_PORTS,
                Arc::new(Mutex::new(AcpiSleepRegisters::new(end.clone()))),
            )
            .map_err(Error::Bus)?;
        buses
            .pio
            .insert(
                PVPANIC_PORT,
                1,
                Arc::new(Mutex::new(PvPanic::new(end.clone()))),
            )
            .map_err(Error::Bus)?;
        let buses = Arc::new(buses);

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::SupportedCpuid)?;
        let mut base_cpuid = permission
            .guest_cpuid(&supported)
            .map_err(Error::XstateCpuid)?;
        if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
            cpuid::advertise_tsc_deadline(&mut base_cpuid);
        }
        let host_vmx = supported
            .as_slice()
            .iter()
            .any(|e| e.function == 1 && e.ecx & CPUID_1_ECX_VMX != 0);
        let feat_ctl = if c.nested_virt && host_vmx {
            let support = KvmSupport::query(&kvm).map_err(Error::FeatureControlSupport)?;
            let resolution =
                msr_featctl::mode::resolve(&kvm, Mode::Automatic).map_err(Error::FeatureControl)?;
            log::info!("IA32_FEATURE_CONTROL for nested VMX: {resolution}");
            if resolution.mode == ResolvedMode::Emulated {
                msr_featctl::emulated::enable_emulation(&vm)
                    .map_err(Error::FeatureControlFilter)?;
            }
            Some((resolution.mode, support))
        } else {
            None
        };

        let mut vcpus = Vec::new();
        let mut diagnostics = Vec::new();
        for index in 0..c.vcpus {
            let fd = permission
                .create_vcpu(&vm, u64::from(index))
                .map_err(vcpu_ioctl(index, "KVM_CREATE_VCPU"))?;
            let topo = VcpuTopology {
                apic_id: index as u8,
                vcpus: c.vcpus as u8,
                nested_virt: c.nested_virt,
            };
            // IA32_FEATURE_CONTROL follows the CPUID this vCPU gets: natively right after
            // KVM_SET_CPUID2 (a refusal stops the VMM), or emulated with the exposed features.
            let vcpu_cpuid = cpuid::for_vcpu(&base_cpuid, topo);
            let msr: Box<dyn MsrHandler> = match &feat_ctl {
                Some((ResolvedMode::Native, support)) => {
                    let native = |source| Error::FeatureControlNative {
                        vcpu: index,
                        source,
                    };
                    let configured = ConfiguredVcpu::configure(&fd, &vcpu_cpuid, None, support)
                        .map_err(native)?;
                    msr_featctl::apply_firmware_value(&configured).map_err(native)?;
                    Box::new(NoMsrs)
                }
                Some((ResolvedMode::Emulated, support)) => {
                    fd.set_cpuid2(&vcpu_cpuid)
                        .map_err(vcpu_ioctl(index, "KVM_SET_CPUID2"))?;
                    let features = GuestCpuidFeatures::exposed(&vcpu_cpuid, 0, support).features;
                    Box::new(msr_featctl::EmulatedFeatureControl::with_firmware_value(
                        features,
                    ))
                }
                None => {
                    fd.set_cpuid2(&vcpu_cpuid)
                        .map_err(vcpu_ioctl(index, "KVM_SET_CPUID2"))?;
                    Box::new(NoMsrs)
                }
            };
            set_lint(index, &fd)?;
            fd.set_fpu(&regs::boot_fpu())
                .map_err(vcpu_ioctl(index, "KVM_SET_FPU"))?;
            let mut registers = RegisterCache::new(&vm, vm_types::VmType::Default);
            if index == 0 {
                set_boot_registers(&mut registers, &fd, entry)?;
            }
            diagnostics.push(DiagnosticFd::of(index, &fd)?);
            vcpus.push(Vcpu::new(index, fd, registers, buses.clone(), msr));
        }
        let runner = VmRunner::spawn(vcpus).map_err(Error::Runner)?;
        Ok(Vmm {
            runner,
            end,
            serial,
            console,
            diagnostics,
            _memory: mem,
            _vm: vm,
            _serial_irq: serial_irq,
        })
    }

    /// Starts feeding `input` to the guest's serial port.
    pub fn forward_console_input<R: io::Read + Send + 'static>(&self, input: R) -> Result<()> {
        crate::devices::serial::forward_input(self.serial.clone(), input)
            .map(drop)
            .map_err(Error::ConsoleInput)
    }

    /// Runs the guest until it ends, a vCPU fails, or a terminating signal arrives. After a
    /// guest ending the queued console output is written out first (unless a signal arrives
    /// meanwhile); after a signal it is not waited for.
    pub fn run(self) -> Result<RunOutcome> {
        terminal::install_termination_handlers().map_err(Error::Signals)?;
        self.runner.start().map_err(Error::Runner)?;
        let mut halted = false;
        let signal = loop {
            if self.runner.wait(POLL_INTERVAL) || self.end.get().is_some() {
                break None;
            }
            if let Some(s) = terminal::termination_signal() {
                break Some(s);
            }
            if self
                .end
                .shutdown_noticed()
                .is_some_and(|t| Instant::now().duration_since(t) >= HALT_GRACE)
            {
                halted = true;
                break None;
            }
        };
        // A vCPU waiting for room on a console that does not drain must not hold up the stop.
        self.console.stop_waiting();
        let outcome = self
            .runner
            .shutdown(SHUTDOWN_TIMEOUT)
            .map_err(Error::Runner)?;
        if signal.is_none() {
            self.console
                .drain(POLL_INTERVAL, || terminal::termination_signal().is_some());
        }
        // A device request came first: the guest's fallbacks after it (another reset
        // method, a triple fault) do not change what it asked for.
        if let Some(request) = self.end.get() {
            return Ok(match request {
                GuestRequest::PowerOff => RunOutcome::PowerOff,
                GuestRequest::Reset if self.end.shutdown_noticed().is_some() => RunOutcome::Reset,
                GuestRequest::Reset => RunOutcome::ResetWithoutShutdown,
                GuestRequest::Panic => RunOutcome::Panicked,
            });
        }
        if let Some(s) = signal {
            return Ok(RunOutcome::Signal(s));
        }
        if halted {
            return Ok(RunOutcome::Halted {
                after_shutdown_notice: true,
            });
        }
        Ok(match outcome {
            VmOutcome::Shutdown { .. } => RunOutcome::PowerOff,
            VmOutcome::Reset { .. } => RunOutcome::Reset,
            VmOutcome::TripleFault { vcpu, diagnostics } => RunOutcome::TripleFault {
                vcpu,
                // Taken by the vCPU thread at the exit; the duplicated fd (read now, after
                // the vCPU was stopped) only where that snapshot is missing.
                dump: match diagnostics.map(|d| d.registers) {
                    Some(Ok(dump)) => Some(Box::new(dump)),
                    _ => self
                        .diagnostics
                        .get(vcpu as usize)
                        .and_then(|d| d.dump().ok())
                        .map(Box::new),
                },
            },
            VmOutcome::Crash { vcpu, data } => {
                RunOutcome::GuestCrash(format!("crash event on vCPU {vcpu}, data {data:x?}"))
            }
            VmOutcome::OtherEvent { vcpu, kind, data } => RunOutcome::GuestCrash(format!(
                "unexpected system event {kind} on vCPU {vcpu}, data {data:x?}"
            )),
            VmOutcome::Halted => RunOutcome::Halted {
                after_shutdown_notice: false,
            },
            VmOutcome::Error { error, .. } => RunOutcome::VcpuError(error.to_string()),
            VmOutcome::Stopped => RunOutcome::VcpuError("stopped without a cause".into()),
        })
    }
}

/// Whether a register dump shows the x86 reset state (`CS` selector 0xf000 with base
/// 0xffff_0000, `RIP` 0xfff0) rather than a guest's state: kvm-amd INITs a vCPU on a shutdown
/// intercept before it reports `KVM_EXIT_SHUTDOWN` (`shutdown_interception` in
/// arch/x86/kvm/svm/svm.c: the VMCB is undefined after a shutdown intercept), so there the
/// faulting state is gone by the time any VMM can read it.
pub fn is_reset_state(dump: &RegisterDump) -> bool {
    dump.regs.rip == 0xfff0 && dump.sregs.cs.selector == 0xf000 && dump.sregs.cs.base == 0xffff_0000
}

/// Masks every input of both in-kernel 8259s, as firmware leaves them for an OS that uses the
/// I/O APIC. A hardware-reduced ACPI guest never programs the PICs (Linux installs
/// `null_legacy_pic`) yet keeps LINT0 in ExtINT mode on the boot CPU, so an unmasked PIC with
/// its reset vector base 0 would deliver ISA IRQ 4 (the serial port, routed to both PIC and
/// I/O APIC by KVM's default GSI routing) as exception vector 4.
fn mask_pics(vm: &VmFd) -> Result<()> {
    for chip_id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(vm_ioctl("KVM_GET_IRQCHIP"))?;
        // SAFETY: for a PIC chip id KVM_GET_IRQCHIP fills the `pic` member of the union, and
        // every bit pattern is a valid kvm_pic_state.
        let mut pic = unsafe { chip.chip.pic };
        pic.imr = 0xff;
        chip.chip.pic = pic;
        vm.set_irqchip(&chip).map_err(vm_ioctl("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// Writes the boot vCPU's entry state through sync-regs: the writes are staged in `kvm_run`
/// where KVM_CAP_SYNC_REGS offers the set (KVM applies them at the run loop's first
/// `KVM_RUN`) and applied with `KVM_SET_*` otherwise.
fn set_boot_registers(registers: &mut RegisterCache, fd: &VcpuFd, entry: EntryPoint) -> Result<()> {
    let base = *registers.sregs(fd).map_err(Error::BootRegisters)?;
    registers
        .set_sregs(&regs::boot_sregs(&base, entry))
        .map_err(Error::BootRegisters)?;
    registers
        .set_regs(&regs::boot_regs(entry))
        .map_err(Error::BootRegisters)
}

/// Whether this host's KVM can run a Linux guest with this VMM: it needs the in-kernel
/// irqchip and irqfd.
pub fn host_has_required_caps(kvm: &Kvm) -> bool {
    kvm.check_extension(Cap::Irqchip) && kvm.check_extension(Cap::Irqfd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_per_kind() {
        assert_eq!(RunOutcome::PowerOff.exit_code(), 0);
        assert_eq!(RunOutcome::Reset.exit_code(), 0);
        assert_eq!(RunOutcome::Signal(libc::SIGTERM).exit_code(), 143);
        assert_eq!(
            RunOutcome::TripleFault {
                vcpu: 0,
                dump: None
            }
            .exit_code(),
            3
        );
        assert_eq!(RunOutcome::VcpuError("x".into()).exit_code(), 4);
        for (outcome, text) in [
            (
                RunOutcome::ResetWithoutShutdown,
                "without an orderly shutdown",
            ),
            (RunOutcome::Panicked, "guest panicked (pvpanic)"),
            (
                RunOutcome::Halted {
                    after_shutdown_notice: true,
                },
                "began a shutdown",
            ),
            (
                RunOutcome::Halted {
                    after_shutdown_notice: false,
                },
                "nothing to wake it",
            ),
        ] {
            assert_eq!(outcome.exit_code(), 3);
            assert!(outcome.to_string().contains(text), "{outcome}");
        }
        assert_eq!(RunOutcome::Signal(libc::SIGUSR1).exit_code(), 138);
        assert_eq!(
            RunOutcome::Signal(libc::SIGHUP).to_string(),
            "stopped by SIGHUP (signal 1)"
        );
        assert_eq!(RunOutcome::Reset.to_string(), "guest requested reset");
        let mut reset = RegisterDump::new(
            kvm_regs {
                rip: 0xfff0,
                ..Default::default()
            },
            kvm_sregs::default(),
            None,
        );
        reset.sregs.cs.selector = 0xf000;
        reset.sregs.cs.base = 0xffff_0000;
        assert!(is_reset_state(&reset));
        let text = RunOutcome::TripleFault {
            vcpu: 0,
            dump: Some(Box::new(reset)),
        }
        .to_string();
        assert!(text.contains("no registers of the fault"), "{text}");
        reset.regs.rip = 0xffff_ffff_8100_0000;
        assert!(!is_reset_state(&reset));
        let text = RunOutcome::TripleFault {
            vcpu: 0,
            dump: Some(Box::new(reset)),
        }
        .to_string();
        assert!(text.contains("registers at the exit"), "{text}");
        assert!(RunOutcome::TripleFault {
            vcpu: 1,
            dump: None
        }
        .to_string()
        .contains("vCPU 1"));
    }
}
