//! Builds a VM from a [`ValidConfig`] by composing the workspace crates, runs it, and says how
//! it ended.
//!
//! [`Vmm::build`] is a recipe of named steps, each failing with its own [`Error`] variant and
//! each needing the ones before it, except step 5, which runs beside the others:
//! 1. `open_kvm`: `/dev/kvm`, a vendor module behind it, room for the vCPUs;
//!    `xstate_permission`: the XSTATE guest permission ([`xstate_perm::GuestPermission`]),
//!    which must be settled before the first vCPU and is the proof that creates vCPUs;
//! 2. `create_vm`: the VM as a [`vm_types::TypedVm`] (default type), whose handle carries
//!    the type to every vCPU and register cache;
//! 3. guest memory (mapped first), then its KVM slots;
//! 4. `create_interrupt_controllers`: TSS, the in-kernel irqchip (PIC, I/O APIC, local
//!    APICs) and PIT;
//! 5. [`boot::load_kernel`]: kernel, command line, initramfs (linux-loader), on a thread of
//!    its own while steps 1, 2, 3 (slots), 4 and 7 run; blocks of guest RAM that the kernel
//!    image only filled with zeros go back to the host
//!    ([`GuestRam::release_zero_blocks`]);
//! 6. [`boot::write_platform_tables`]: ACPI and MP tables, boot page tables and GDT, reset
//!    vector, and the zero page or PVH start info (linux-loader's configurators);
//! 7. `Devices::attach`: devices on the port I/O bus, COM1's interrupt eventfd bound to
//!    GSI 4 with irqfd;
//! 8. `create_vcpus`: per vCPU CPUID, IA32_FEATURE_CONTROL when nested VMX is exposed,
//!    LINT0/LINT1, FPU, and the boot registers on vCPU 0 through
//!    [`sync_regs::RegisterCache::for_vm`] (the others wait for INIT/SIPI in the in-kernel
//!    LAPIC);
//! 9. [`vcpu_runner::VmRunner`] spawns one thread per vCPU; [`Vmm::run`] starts them.
//!
//! [`Vmm::run`] waits until the guest asks to power off or reset or reports a panic (through a
//! device), halts for good after announcing an orderly shutdown, a vCPU ends the VM (triple
//! fault, KVM error), or a terminating signal arrives; then it stops every vCPU.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use msr_featctl::{ConfiguredVcpu, GuestCpuidFeatures, KvmSupport, Mode, ResolvedMode};
use sync_regs::{RegisterCache, RegisterDump};
use vcpu_runner::{Buses, MsrHandler, NoMsrs, SharedDevice, Vcpu, VmOutcome, VmRunner};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vm_types::{GuardedVcpu, TypedVm, VmType};
use vmm_sys_util::eventfd::EventFd;
use xstate_perm::{GuestPermission, RequestError, SystemHost, XFeature, XFeatureSet};

use crate::config::ValidConfig;
use crate::cpuid::{self, VcpuTopology};
use crate::devices::i8042::I8042;
use crate::devices::power::AcpiSleepRegisters;
use crate::devices::pvpanic::PvPanic;
use crate::devices::rtc::CmosRtc;
use crate::devices::serial::{self, ConsoleOut, ConsoleOutput, SerialConsole};
use crate::devices::{GuestEnd, GuestRequest};
use crate::memory::GuestRam;
use crate::profile::BootProfile;
use crate::regs::{self, EntryPoint};
use crate::seccomp::{self, ThreadKind};
use crate::sys::{
    ACPI_PORTS, ACPI_SLEEP_CONTROL_PORT, APIC_LVT0, APIC_LVT1, APIC_MODE_EXTINT, APIC_MODE_NMI,
    CMOS_PORT, CMOS_PORTS, COM1_GSI, COM1_PORT, CPUID_1_ECX_VMX, I8042_PORT, I8042_PORTS,
    KVM_TSS_ADDRESS, PVPANIC_PORT, UART_REGISTERS,
};
use crate::{boot, memory, terminal};

/// How often the main thread looks for a device request or a signal while the VM runs.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How long a vCPU thread may take to install its seccomp filter.
const CONFINE_TIMEOUT: Duration = Duration::from_secs(5);
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
    #[error("cannot place the device at port {port:#x} on the I/O bus")]
    Bus {
        /// The device's first port.
        port: u64,
        /// Why.
        #[source]
        source: vcpu_runner::bus::Error,
    },
    /// Setting the boot vCPU's entry registers failed.
    #[error("vCPU 0: setting the boot registers failed")]
    BootRegisters(#[source] sync_regs::Error),
    /// Creating a vCPU or setting its state through vm-types' guard failed.
    #[error("cannot set up vCPU {vcpu}")]
    VcpuState {
        /// The vCPU.
        vcpu: u32,
        /// Why.
        #[source]
        source: vm_types::VcpuError,
    },
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
    /// The console output thread could not start.
    #[error("cannot start the console output thread")]
    ConsoleOutput(#[source] serial::Error),
    /// The thread that loads the kernel could not start.
    #[error("cannot start the kernel loader thread")]
    LoaderThread(#[source] io::Error),
    /// The console input thread could not start.
    #[error("cannot start the console input thread")]
    ConsoleInput(#[source] serial::Error),
    /// A thread could not install its seccomp filter.
    #[error("cannot confine thread '{thread}' with its seccomp filter")]
    Seccomp {
        /// The thread's name.
        thread: String,
        /// Why.
        #[source]
        source: seccomp::Error,
    },
    /// A vCPU thread did not run the closure that confines it.
    #[error("cannot reach the thread of vCPU {vcpu} to confine it")]
    ConfineVcpu {
        /// The vCPU.
        vcpu: u32,
        /// Why.
        #[source]
        source: vcpu_runner::vcpu::Error,
    },
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

/// A built VM, ready to run.
pub struct Vmm {
    runner: VmRunner,
    devices: Devices,
    /// Confine every thread with its seccomp filter ([`crate::seccomp`]).
    seccomp: bool,
    profile: Option<BootProfile>,
    // Fields drop in declaration order: the vCPU threads (with their fds) first, then the
    // VM, and only then the guest memory its slots point at, so that unmapping it does not
    // make KVM invalidate the mappings of a VM that is still alive.
    _vm: TypedVm,
    /// Guest memory, mapped for the VM's lifetime.
    memory: GuestRam,
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

fn vcpu_state(vcpu: u32) -> impl FnOnce(vm_types::VcpuError) -> Error {
    move |source| Error::VcpuState { vcpu, source }
}

impl Vmm {
    /// Builds the VM for `cfg`, with guest console output going to `out`, in the order each
    /// step needs the previous ones: KVM and the XSTATE permission → the VM → guest memory →
    /// the in-kernel interrupt controllers and timer → the kernel → the platform tables and
    /// boot parameters → the devices → the vCPUs, spawned on their threads (started by
    /// [`Vmm::run`]).
    ///
    /// # Errors
    ///
    /// [`Error`] naming the step that failed; [`Error::is_input_error`] tells the user's
    /// input from a KVM or VMM failure.
    pub fn build(cfg: &ValidConfig, out: ConsoleOut) -> Result<Self> {
        Self::build_inner(cfg, out, None)
    }

    /// [`Vmm::build`], collecting a boot profile into `profile`: the time each step ended here,
    /// each vCPU's exits (vcpu-runner's exit profile), and, when [`Vmm::run`] ends, the first
    /// console byte and the memory split. Print `profile` after the run.
    ///
    /// # Errors
    ///
    /// As [`Vmm::build`].
    pub fn build_profiled(
        cfg: &ValidConfig,
        out: ConsoleOut,
        profile: &BootProfile,
    ) -> Result<Self> {
        Self::build_inner(cfg, out, Some(profile))
    }

    fn build_inner(
        cfg: &ValidConfig,
        out: ConsoleOut,
        profile: Option<&BootProfile>,
    ) -> Result<Self> {
        let step = |name| {
            if let Some(p) = profile {
                p.step_done(name);
            }
        };
        let c = cfg.config();
        let mem =
            memory::create_guest_memory(cfg.mem_bytes(), c.huge_pages).map_err(Error::Memory)?;
        step("create_memory");
        // The kernel and initramfs are read into guest memory on a thread of their own while
        // this one asks KVM for the VM and its devices: neither needs the other until the
        // platform tables, and in a nested host each takes a good part of the start.
        let (kernel, vm, devices, kvm, permission) = std::thread::scope(|scope| {
            let loader = std::thread::Builder::new()
                .name("kernel loader".into())
                .spawn_scoped(scope, || {
                    let began = Instant::now();
                    let kernel = load_kernel(&mem, cfg);
                    if let Some(p) = profile {
                        p.parallel_step_done("load_kernel, initramfs", began);
                    }
                    kernel
                })
                .map_err(Error::LoaderThread)?;
            let built = (|| -> Result<_> {
                let kvm = open_kvm(c.vcpus)?;
                let permission = xstate_permission(&SystemHost::new(&kvm), c.amx)?;
                step("open_kvm, xstate permission");
                let vm = create_vm(&kvm)?;
                step("create_vm");
                add_memory_slots(&vm, &mem)?;
                step("memory slots");
                create_interrupt_controllers(&vm)?;
                step("interrupt controllers");
                let devices = Devices::attach(&vm, out, c.seccomp)?;
                step("devices");
                Ok((vm, devices, kvm, permission))
            })();
            // The loader ends on its own (it only reads files into memory); an error here
            // waits for it, then wins.
            let kernel = loader
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            let (vm, devices, kvm, permission) = built?;
            Ok::<_, Error>((kernel?, vm, devices, kvm, permission))
        })?;
        let entry = boot::write_platform_tables(mem.memory(), cfg, &kernel)?;
        step("platform tables");
        let mut vcpus = create_vcpus(&kvm, &vm, &permission, cfg, entry, &devices.buses)?;
        if let Some(p) = profile {
            vcpus = vcpus
                .into_iter()
                .map(|v| v.with_profile(p.vcpu_slot()))
                .collect();
        }
        step("create_vcpus");
        let runner = VmRunner::spawn(vcpus).map_err(Error::Runner)?;
        step("vCPU threads");
        Ok(Vmm {
            runner,
            devices,
            seccomp: c.seccomp,
            memory: mem,
            profile: profile.cloned(),
            _vm: vm,
        })
    }
}

/// Opens `/dev/kvm` and checks that this host can run the guest: a vendor module
/// (`kvm_intel`/`kvm_amd`) behind it and room for `vcpus` vCPUs.
fn open_kvm(vcpus: u32) -> Result<Kvm> {
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    crate::host::check_vendor_module(std::path::Path::new("/sys/module"))
        .map_err(Error::HostUnsupported)?;
    let max = kvm.get_max_vcpus();
    if vcpus as usize > max {
        return Err(Error::TooManyVcpusForHost {
            requested: vcpus,
            max,
        });
    }
    Ok(kvm)
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

/// `KVM_CREATE_VM` of the default type, through vm-types' handle that carries the type to
/// every vCPU and register cache made from it.
fn create_vm(kvm: &Kvm) -> Result<TypedVm> {
    TypedVm::create(kvm, VmType::Default).map_err(Error::CreateVm)
}

/// One KVM memory slot per region of `mem`.
fn add_memory_slots(vm: &TypedVm, mem: &GuestRam) -> Result<()> {
    for (slot, region) in mem.memory().iter().enumerate() {
        let slot = slot as u32;
        let region_desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the returned Vmm keeps
        // for as long as the VM exists.
        unsafe { vm.fd().set_user_memory_region(region_desc) }
            .map_err(|source| Error::MemorySlot { slot, source })?;
    }
    Ok(())
}

/// The kernel, command line and initramfs in guest memory ([`boot::load_kernel`]), with the
/// blocks of guest RAM that the kernel image only filled with zeros given back to the host.
fn load_kernel(mem: &GuestRam, cfg: &ValidConfig) -> Result<boot::LoadedKernel> {
    let kernel = boot::load_kernel(mem.memory(), cfg)?;
    let (start, end) = kernel.image_range();
    mem.release_zero_blocks(start, end.0.saturating_sub(start.0))
        .map_err(Error::Memory)?;
    Ok(kernel)
}

/// The TSS region VMX needs, the in-kernel irqchip (PICs, I/O APIC, local APICs) with both
/// PICs masked, and the in-kernel PIT.
fn create_interrupt_controllers(vm: &TypedVm) -> Result<()> {
    let vm = vm.fd();
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(vm_ioctl("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(vm_ioctl("KVM_CREATE_IRQCHIP"))?;
    mask_pics(vm)?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(vm_ioctl("KVM_CREATE_PIT2"))
}

/// The devices on the port I/O bus, and what the VMM keeps of them while the VM runs.
struct Devices {
    buses: Arc<Buses>,
    end: Arc<GuestEnd>,
    serial: Arc<Mutex<SerialConsole>>,
    console: ConsoleOutput,
    // Bound to COM1's GSI with irqfd for the VM's lifetime.
    _serial_irq: EventFd,
}

impl Devices {
    /// Puts every device at its legacy ISA port (fixed by the PC platform, or named in this
    /// VMM's ACPI tables): COM1 with its interrupt eventfd bound to GSI 4 through irqfd and
    /// its output going to `out` (from a thread confined by seccomp when `confine` is set),
    /// the i8042, the CMOS RTC, the ACPI sleep/reset/notice registers and pvpanic.
    fn attach(vm: &TypedVm, out: ConsoleOut, confine: bool) -> Result<Self> {
        let end = Arc::new(GuestEnd::new());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.fd()
            .register_irqfd(&serial_irq, COM1_GSI)
            .map_err(vm_ioctl("KVM_IRQFD"))?;
        let (console, console_writer) =
            ConsoleOutput::spawn(out, confine).map_err(Error::ConsoleOutput)?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            serial_irq.try_clone().map_err(Error::EventFd)?,
            Box::new(console_writer),
        )));
        let mut buses = Buses::new();
        let pio: [(u64, u64, SharedDevice); 5] = [
            (COM1_PORT, UART_REGISTERS, serial.clone()),
            (
                I8042_PORT,
                I8042_PORTS,
                Arc::new(Mutex::new(I8042::new(end.clone()))),
            ),
            (CMOS_PORT, CMOS_PORTS, Arc::new(Mutex::new(CmosRtc::new()))),
            (
                ACPI_SLEEP_CONTROL_PORT,
                ACPI_PORTS,
                Arc::new(Mutex::new(AcpiSleepRegisters::new(end.clone()))),
            ),
            (
                PVPANIC_PORT,
                1,
                Arc::new(Mutex::new(PvPanic::new(end.clone()))),
            ),
        ];
        for (port, len, device) in pio {
            buses
                .pio
                .insert(port, len, device)
                .map_err(|source| Error::Bus { port, source })?;
        }
        Ok(Devices {
            buses: Arc::new(buses),
            end,
            serial,
            console,
            _serial_irq: serial_irq,
        })
    }
}

/// How IA32_FEATURE_CONTROL reaches the vCPUs when nested VMX is exposed.
type FeatureControl = Option<(ResolvedMode, KvmSupport)>;

/// The vCPUs, each configured and ready for its thread; vCPU 0 with the boot registers for
/// `entry`, the others waiting for INIT/SIPI in the in-kernel LAPIC.
fn create_vcpus(
    kvm: &Kvm,
    vm: &TypedVm,
    permission: &GuestPermission,
    cfg: &ValidConfig,
    entry: EntryPoint,
    buses: &Arc<Buses>,
) -> Result<Vec<Vcpu>> {
    let c = cfg.config();
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::SupportedCpuid)?;
    let mut base_cpuid = permission
        .guest_cpuid(&supported)
        .map_err(Error::XstateCpuid)?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        cpuid::advertise_tsc_deadline(&mut base_cpuid);
    }
    let host_vmx = supported
        .as_slice()
        .iter()
        .any(|e| e.function == 1 && e.ecx & CPUID_1_ECX_VMX != 0);
    let feat_ctl = if c.nested_virt && host_vmx {
        feature_control(kvm, vm)?
    } else {
        None
    };
    (0..c.vcpus)
        .map(|index| {
            let topo = VcpuTopology {
                apic_id: index as u8,
                vcpus: c.vcpus as u8,
                nested_virt: c.nested_virt,
            };
            let vcpu_cpuid = cpuid::for_vcpu(&base_cpuid, topo);
            let boot_entry = (index == 0).then_some(entry);
            create_vcpu(vm, permission, index, &vcpu_cpuid, &feat_ctl, boot_entry)
                .map(|(fd, registers, msr)| Vcpu::new(index, fd, registers, buses.clone(), msr))
        })
        .collect()
}

/// Decides how to provide IA32_FEATURE_CONTROL for nested VMX (msr-featctl), and installs
/// the MSR filter when it is emulated.
fn feature_control(kvm: &Kvm, vm: &TypedVm) -> Result<FeatureControl> {
    let support = KvmSupport::query(kvm).map_err(Error::FeatureControlSupport)?;
    let resolution =
        msr_featctl::mode::resolve(kvm, Mode::Automatic).map_err(Error::FeatureControl)?;
    log::info!("IA32_FEATURE_CONTROL for nested VMX: {resolution}");
    if resolution.mode == ResolvedMode::Emulated {
        msr_featctl::emulated::enable_emulation(vm.fd()).map_err(Error::FeatureControlFilter)?;
    }
    Ok(Some((resolution.mode, support)))
}

/// One vCPU: created through the XSTATE permission's proof, its CPUID (and
/// IA32_FEATURE_CONTROL, which follows that CPUID: natively right after `KVM_SET_CPUID2`, or
/// emulated with the exposed features), LINT0/LINT1, FPU, and for the boot vCPU the entry
/// registers through sync-regs.
fn create_vcpu(
    vm: &TypedVm,
    permission: &GuestPermission,
    index: u32,
    vcpu_cpuid: &CpuId,
    feat_ctl: &FeatureControl,
    boot_entry: Option<EntryPoint>,
) -> Result<(VcpuFd, RegisterCache, Box<dyn MsrHandler>)> {
    let id = u64::from(index);
    let vcpu = permission
        .create_vcpu(vm.fd(), id)
        .map_err(|source| vcpu_state(index)(vm_types::VcpuError::CreateVcpu { id, source }))?;
    let vcpu = vm.guard_vcpu(vcpu);
    let msr: Box<dyn MsrHandler> = match feat_ctl {
        Some((ResolvedMode::Native, support)) => {
            let native = |source| Error::FeatureControlNative {
                vcpu: index,
                source,
            };
            let configured = ConfiguredVcpu::configure(vcpu.vcpu(), vcpu_cpuid, None, support)
                .map_err(native)?;
            msr_featctl::apply_firmware_value(&configured).map_err(native)?;
            Box::new(NoMsrs)
        }
        Some((ResolvedMode::Emulated, support)) => {
            vcpu.vcpu()
                .set_cpuid2(vcpu_cpuid)
                .map_err(vcpu_ioctl(index, "KVM_SET_CPUID2"))?;
            let features = GuestCpuidFeatures::exposed(vcpu_cpuid, 0, support).features;
            Box::new(msr_featctl::EmulatedFeatureControl::with_firmware_value(
                features,
            ))
        }
        None => {
            vcpu.vcpu()
                .set_cpuid2(vcpu_cpuid)
                .map_err(vcpu_ioctl(index, "KVM_SET_CPUID2"))?;
            Box::new(NoMsrs)
        }
    };
    set_lint(index, &vcpu)?;
    vcpu.set_fpu(&regs::boot_fpu()).map_err(vcpu_state(index))?;
    let mut registers = RegisterCache::for_vm(vm);
    let fd = vcpu.into_inner();
    if let Some(entry) = boot_entry {
        set_boot_registers(&mut registers, &fd, entry)?;
    }
    Ok((fd, registers, msr))
}

/// LINT0 in ExtINT and LINT1 in NMI mode, as firmware leaves the local APIC for an OS.
fn set_lint(index: u32, vcpu: &GuardedVcpu) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(vcpu_state(index))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: Vec<u8> = lapic.regs[reg..reg + 4].iter().map(|b| *b as u8).collect();
        let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let value = (value & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(vcpu_state(index))
}

impl Vmm {
    /// Starts feeding `input` to the guest's serial port. With seccomp on (the default) the
    /// input thread may read only stdin, so `input` must read from it.
    ///
    /// # Errors
    ///
    /// [`Error::ConsoleInput`]: the thread could not be spawned or confined.
    pub fn forward_console_input<R: io::Read + Send + 'static>(&self, input: R) -> Result<()> {
        serial::forward_input(self.devices.serial.clone(), input, self.seccomp)
            .map(drop)
            .map_err(Error::ConsoleInput)
    }

    /// Confines every vCPU thread (through a closure it runs before its guest starts) and
    /// then the calling thread with their seccomp filters; the console threads confined
    /// themselves when they started. A profiled run's main thread reads files when the run
    /// ends, and gets the filter that allows it.
    fn confine_threads(&self) -> Result<()> {
        for handle in self.runner.handles() {
            let vcpu = handle.index();
            handle
                .run_on_vcpu(
                    |_| seccomp::confine_current_thread(ThreadKind::Vcpu),
                    CONFINE_TIMEOUT,
                )
                .map_err(|source| Error::ConfineVcpu { vcpu, source })?
                .map_err(|source| Error::Seccomp {
                    thread: format!("vcpu{vcpu}"),
                    source,
                })?;
        }
        let main = if self.profile.is_some() {
            ThreadKind::ProfilingMain
        } else {
            ThreadKind::Main
        };
        seccomp::confine_current_thread(main).map_err(|source| Error::Seccomp {
            thread: std::thread::current().name().unwrap_or("main").to_owned(),
            source,
        })
    }

    /// Runs the guest until it ends, a vCPU fails, or a terminating signal arrives. After a
    /// guest ending the queued console output is written out first (unless a signal arrives
    /// meanwhile); after a signal it is not waited for.
    pub fn run(self) -> Result<RunOutcome> {
        terminal::install_termination_handlers().map_err(Error::Signals)?;
        if self.seccomp {
            self.confine_threads()?;
        }
        self.runner.start().map_err(Error::Runner)?;
        let mut halted = false;
        let signal = loop {
            if self.runner.wait(POLL_INTERVAL) || self.devices.end.get().is_some() {
                break None;
            }
            if let Some(s) = terminal::termination_signal() {
                break Some(s);
            }
            if self
                .devices
                .end
                .shutdown_noticed()
                .is_some_and(|t| Instant::now().duration_since(t) >= HALT_GRACE)
            {
                halted = true;
                break None;
            }
        };
        // A vCPU waiting for room on a console that does not drain must not hold up the stop.
        self.devices.console.stop_waiting();
        let outcome = self
            .runner
            .shutdown(SHUTDOWN_TIMEOUT)
            .map_err(Error::Runner)?;
        if signal.is_none() {
            self.devices
                .console
                .drain(POLL_INTERVAL, || terminal::termination_signal().is_some());
        }
        if let Some(profile) = &self.profile {
            profile.finish(self.devices.console.first_byte(), self.memory.memory());
        }
        // A device request came first: the guest's fallbacks after it (another reset
        // method, a triple fault) do not change what it asked for.
        if let Some(request) = self.devices.end.get() {
            return Ok(match request {
                GuestRequest::PowerOff => RunOutcome::PowerOff,
                GuestRequest::Reset if self.devices.end.shutdown_noticed().is_some() => {
                    RunOutcome::Reset
                }
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
                // Taken by the vCPU thread at the exit (vcpu-runner), through its register
                // cache.
                dump: diagnostics.and_then(|d| d.registers.ok()).map(Box::new),
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
    use kvm_bindings::{kvm_regs, kvm_sregs};

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
