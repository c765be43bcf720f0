//! One vCPU: its thread, its run loop with an explicit state, and typed commands.
//!
//! A [`Vcpu`] owns its `VcpuFd` (and with it the `kvm_run` mapping) and keeps a sync-regs
//! [`RegisterCache`] beside it: the run loop stages pending register writes before each
//! `KVM_RUN` and settles the cache after it, so that diagnostics, [`ExitHook`]s and
//! [`Command::Run`] closures read registers from `kvm_run` where the host offers sync regs.
//! [`Vcpu::spawn`] moves it onto a thread of its own, which is the only thread that ever
//! calls `KVM_RUN` on it or touches `kvm_run`. Other threads hold a [`VcpuHandle`] and send [`Command`]s: pause,
//! resume, stop, or a closure to run on the vCPU thread with access to the vCPU's registers.
//! Commands that must interrupt a running guest are followed by a kick (see [`crate::kick`]).

use std::fmt;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use sync_regs::{RegisterCache, Registers};

use crate::bus::Buses;
use crate::diagnostics::{Diagnostics, InternalErrorInfo};
use crate::dispatch::{
    dispatch, ExitOutcome, ExitRecord, ExitStats, MsrHandler, SystemEvent, UnhandledExit,
};
use crate::kick::{self, KickTarget};
use crate::profile::{ExitKey, ExitProfile, ProfileSlot};

/// How many times [`Command::Pause`] re-enters KVM with `immediate_exit` to finish an
/// in-flight instruction that keeps producing exits (a string I/O instruction does, one
/// chunk per exit) before it gives up and pauses with the instruction still incomplete.
const MAX_COMPLETION_ROUNDS: usize = 64;

/// Errors of a vCPU and its thread.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Preparing the thread's signal state for kicks failed.
    #[error("preparing vCPU {vcpu}'s thread for kicks failed")]
    PrepareThread {
        /// The vCPU index.
        vcpu: u32,
        /// The cause.
        #[source]
        source: kick::Error,
    },
    /// The thread could not be spawned.
    #[error("spawning the thread of vCPU {vcpu} failed")]
    SpawnThread {
        /// The vCPU index.
        vcpu: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Staging register writes before `KVM_RUN`, settling the register cache after it, or an
    /// [`ExitHook`]'s register access failed.
    #[error("vCPU {vcpu}: register access around KVM_RUN failed")]
    Registers {
        /// The vCPU index.
        vcpu: u32,
        /// The cause.
        #[source]
        source: sync_regs::Error,
    },
    /// `KVM_RUN` failed with something other than `EINTR`/`EAGAIN`.
    #[error("KVM_RUN on vCPU {vcpu} failed")]
    Run {
        /// The vCPU index.
        vcpu: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Consuming a kick signal failed.
    #[error("consuming a kick on vCPU {vcpu} failed")]
    ConsumeKick {
        /// The vCPU index.
        vcpu: u32,
        /// The cause.
        #[source]
        source: kick::Error,
    },
    /// Sending the kick signal failed.
    #[error("kicking vCPU {vcpu} failed")]
    Kick {
        /// The vCPU index.
        vcpu: u32,
        /// The cause.
        #[source]
        source: kick::Error,
    },
    /// `KVM_EXIT_FAIL_ENTRY`: the hardware refused to enter the guest.
    #[error(
        "vCPU {vcpu}: VM entry failed, hardware reason {hardware_entry_failure_reason:#x} on host CPU {cpu}\n{diagnostics}"
    )]
    FailEntry {
        /// The vCPU index.
        vcpu: u32,
        /// `hardware_entry_failure_reason`.
        hardware_entry_failure_reason: u64,
        /// The host CPU.
        cpu: u32,
        /// Registers and counters at the failure.
        diagnostics: Box<Diagnostics>,
    },
    /// `KVM_EXIT_INTERNAL_ERROR`: KVM could not continue (often an emulation failure).
    #[error("vCPU {vcpu}: KVM internal error, {info}\n{diagnostics}")]
    InternalError {
        /// The vCPU index.
        vcpu: u32,
        /// The suberror and its data.
        info: InternalErrorInfo,
        /// Registers and counters at the failure.
        diagnostics: Box<Diagnostics>,
    },
    /// An exit this runner does not handle.
    #[error("vCPU {vcpu}: unhandled exit: {exit}\n{diagnostics}")]
    UnhandledExit {
        /// The vCPU index.
        vcpu: u32,
        /// The exit.
        exit: UnhandledExit,
        /// Registers and counters at the exit.
        diagnostics: Box<Diagnostics>,
    },
    /// The vCPU thread has exited, so it takes no more commands.
    #[error("vCPU {vcpu} has exited ({state})")]
    Exited {
        /// The vCPU index.
        vcpu: u32,
        /// Its final state.
        state: VcpuState,
    },
    /// Waiting for the vCPU thread timed out.
    #[error("vCPU {vcpu}: {operation} did not finish within {waited:?}")]
    Timeout {
        /// The vCPU index.
        vcpu: u32,
        /// What was waited for.
        operation: &'static str,
        /// How long.
        waited: Duration,
    },
    /// The vCPU thread panicked (in a device model or a command closure).
    #[error("the thread of vCPU {vcpu} panicked")]
    ThreadPanicked {
        /// The vCPU index.
        vcpu: u32,
    },
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Why a vCPU's run loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A [`Command::Stop`] (or every handle was dropped).
    Stopped,
    /// The guest executed `hlt` and there is no in-kernel irqchip to wake it.
    Halted,
    /// A triple fault (`KVM_EXIT_SHUTDOWN`); [`Vcpu::triple_fault_diagnostics`] has the
    /// registers at the exit.
    TripleFault,
    /// A `KVM_EXIT_SYSTEM_EVENT`.
    SystemEvent(SystemEvent),
    /// The run loop failed; the error is in the thread's result.
    Failed,
}

/// The state of a vCPU's run loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuState {
    /// The thread is ready; the guest has not run yet.
    Created,
    /// The guest is running (or about to).
    Running,
    /// The guest is stopped at an instruction boundary, waiting for a command.
    Paused,
    /// The run loop has ended.
    Exited(StopReason),
}

impl fmt::Display for VcpuState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VcpuState::Created => f.write_str("created"),
            VcpuState::Running => f.write_str("running"),
            VcpuState::Paused => f.write_str("paused"),
            VcpuState::Exited(reason) => write!(f, "exited: {reason:?}"),
        }
    }
}

/// What a [`Command::Run`] closure gets: the vCPU, on its own thread, between two `KVM_RUN`s
/// and with no instruction in flight.
pub struct VcpuContext<'a> {
    vcpu: &'a mut Vcpu,
}

impl VcpuContext<'_> {
    /// The vCPU index.
    pub fn index(&self) -> u32 {
        self.vcpu.index
    }

    /// The vCPU file descriptor, for ioctls other than the register sets (register ioctls
    /// through it bypass the register cache: use [`VcpuContext::registers`]).
    pub fn fd(&self) -> &VcpuFd {
        &self.vcpu.fd
    }

    /// The vCPU's registers through its cache: read from `kvm_run` where the last exit
    /// copied them out, written back by the run loop's next `KVM_RUN`.
    pub fn registers(&mut self) -> Registers<'_> {
        self.vcpu.registers.with(&self.vcpu.fd)
    }

    /// The exit counters so far.
    pub fn stats(&self) -> ExitStats {
        self.vcpu.stats
    }

    /// The vCPU's MSR handler.
    pub fn msr_handler(&mut self) -> &mut dyn MsrHandler {
        &mut *self.vcpu.msr
    }
}

/// A closure run on the vCPU thread.
pub type VcpuClosure = Box<dyn FnOnce(&mut VcpuContext<'_>) + Send>;

/// A command for a vCPU thread.
pub enum Command {
    /// Stop the guest at an instruction boundary (after completing an in-flight I/O, MMIO or
    /// MSR instruction) and wait.
    Pause,
    /// Run the guest (from created or paused).
    Resume,
    /// End the run loop.
    Stop,
    /// Run a closure on the vCPU thread; a running guest is interrupted for it and continues
    /// afterwards.
    Run(VcpuClosure),
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Pause => "Pause",
            Command::Resume => "Resume",
            Command::Stop => "Stop",
            Command::Run(_) => "Run(..)",
        })
    }
}

/// Called on the vCPU thread once its run loop has ended.
pub(crate) type ExitObserver = Box<dyn FnOnce(u32, &StopReason) + Send>;

/// State shared between a vCPU thread and its handles.
struct Shared {
    index: u32,
    state: Mutex<VcpuState>,
    changed: Condvar,
    kick_pending: AtomicBool,
    target: OnceLock<KickTarget>,
}

impl Shared {
    fn set_state(&self, state: VcpuState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
        self.changed.notify_all();
    }

    fn state(&self) -> VcpuState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until `done` holds for the state, up to `timeout`.
    fn wait_for(
        &self,
        operation: &'static str,
        timeout: Duration,
        done: impl Fn(&VcpuState) -> bool,
    ) -> Result<VcpuState> {
        let guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, result) = self
            .changed
            .wait_timeout_while(guard, timeout, |s| !done(s))
            .unwrap_or_else(|p| p.into_inner());
        if result.timed_out() {
            return Err(Error::Timeout {
                vcpu: self.index,
                operation,
                waited: timeout,
            });
        }
        Ok(guard.clone())
    }

    fn kick(&self) -> Result<()> {
        self.kick_pending.store(true, Ordering::Release);
        // A created, paused or exited vCPU is not in KVM_RUN and cannot get there without
        // first publishing `Running` under this lock and then taking the flag stored above,
        // so the signal is only needed while it runs. Skipping it keeps real-time signals
        // from piling up in the queue while a paused vCPU takes many commands.
        if !matches!(self.state(), VcpuState::Running) {
            return Ok(());
        }
        match self.target.get() {
            Some(target) => target.kick().map_err(|source| Error::Kick {
                vcpu: self.index,
                source,
            }),
            None => Ok(()),
        }
    }
}

/// Code the run loop calls on the vCPU thread after every dispatched exit, with the exit and
/// the registers at that exit together (read from `kvm_run` where the host offers sync regs;
/// writes reach the vCPU at the next `KVM_RUN`).
pub trait ExitHook: Send {
    /// Called after `exit` was dispatched with `outcome`. Not called for an interrupted
    /// `KVM_RUN` (`EINTR`, `EAGAIN`), which has no exit.
    ///
    /// # Errors
    ///
    /// A register access that failed; the run loop ends with [`Error::Registers`].
    fn after_exit(
        &mut self,
        exit: &ExitRecord,
        outcome: &ExitOutcome,
        registers: &mut Registers<'_>,
    ) -> sync_regs::Result<()>;
}

/// A vCPU: its file descriptor and register cache, the buses and MSR handler it dispatches
/// to, and its counters.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    registers: RegisterCache,
    buses: Arc<Buses>,
    msr: Box<dyn MsrHandler>,
    hook: Option<Box<dyn ExitHook>>,
    stats: ExitStats,
    /// The exit profile being collected, and where it goes when the run loop ends.
    profile: Option<(ExitProfile, ProfileSlot)>,
    /// The last exit left an instruction that KVM completes on the next `KVM_RUN`.
    in_flight: bool,
    /// What the registers were at a triple fault, taken at the exit.
    triple_fault: Option<Box<Diagnostics>>,
}

impl fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .field("stats", &self.stats)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    /// A vCPU with index `index` (for messages and VM outcomes) that dispatches port I/O and
    /// MMIO to `buses` and user-space MSR exits to `msr`.
    ///
    /// `registers` is the vCPU's register cache (`RegisterCache::new(&vm, vm_type)`); writes
    /// already pending in it (boot registers, say) reach the vCPU at its first `KVM_RUN`,
    /// through `kvm_run` where the host offers sync regs. The run loop refuses them with
    /// [`Error::Registers`] (`sync_regs::Error::NotRunnable`) if the vCPU is an application
    /// processor still waiting for INIT/SIPI.
    pub fn new(
        index: u32,
        fd: VcpuFd,
        registers: RegisterCache,
        buses: Arc<Buses>,
        msr: Box<dyn MsrHandler>,
    ) -> Self {
        Vcpu {
            index,
            fd,
            registers,
            buses,
            msr,
            hook: None,
            stats: ExitStats::default(),
            profile: None,
            in_flight: false,
            triple_fault: None,
        }
    }

    /// Installs `hook`, called after every dispatched exit with the registers at it.
    #[must_use]
    pub fn with_exit_hook(mut self, hook: Box<dyn ExitHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Collects an [`ExitProfile`] on the vCPU thread: every exit by kind and address, with
    /// counts and times. The profile is written into `slot` when the run loop ends, however it
    /// ends (so after [`VmRunner::shutdown`](crate::VmRunner::shutdown) or
    /// [`VcpuThread::join`] the slot holds it).
    #[must_use]
    pub fn with_profile(mut self, slot: ProfileSlot) -> Self {
        self.profile = Some((ExitProfile::default(), slot));
        self
    }

    /// The registers through the vCPU's cache (before the vCPU is spawned, or after it was
    /// joined).
    pub fn registers(&mut self) -> Registers<'_> {
        self.registers.with(&self.fd)
    }

    /// The registers and counters taken at the `KVM_EXIT_SHUTDOWN` that ended the run loop,
    /// before anything else could touch the vCPU. On kvm-amd the kernel has already INITed
    /// the vCPU when it reports the exit (`shutdown_interception` in arch/x86/kvm/svm/svm.c:
    /// the VMCB is undefined after a shutdown intercept), so the dump shows the reset state
    /// there.
    pub fn triple_fault_diagnostics(&self) -> Option<&Diagnostics> {
        self.triple_fault.as_deref()
    }

    pub(crate) fn take_triple_fault_diagnostics(&mut self) -> Option<Box<Diagnostics>> {
        self.triple_fault.take()
    }

    /// The vCPU index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The vCPU file descriptor, for set-up ioctls other than the register sets (CPUID,
    /// MSRs, LAPIC); registers go through [`Vcpu::registers`], so that the cache sees them.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The exit counters.
    pub fn stats(&self) -> ExitStats {
        self.stats
    }

    /// Moves the vCPU onto a new thread named `vcpu<index>`, in state [`VcpuState::Created`]:
    /// the guest runs after [`VcpuHandle::resume`].
    ///
    /// # Errors
    ///
    /// [`Error::SpawnThread`], [`Error::PrepareThread`] (the kick signal state), or
    /// [`Error::ThreadPanicked`].
    pub fn spawn(self) -> Result<VcpuThread> {
        self.spawn_observed(None)
    }

    pub(crate) fn spawn_observed(self, observer: Option<ExitObserver>) -> Result<VcpuThread> {
        let index = self.index;
        let shared = Arc::new(Shared {
            index,
            state: Mutex::new(VcpuState::Created),
            changed: Condvar::new(),
            kick_pending: AtomicBool::new(false),
            target: OnceLock::new(),
        });
        let (commands_tx, commands_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread_shared = shared.clone();
        let join = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let mut vcpu = self;
                if let Err(source) = kick::prepare_vcpu_thread(&vcpu.fd) {
                    let _ = ready_tx.send(Err(source));
                    return (vcpu, Ok(StopReason::Stopped));
                }
                let _ = ready_tx.send(Ok(()));
                let result = vcpu.run_loop(&commands_rx, &thread_shared);
                vcpu.publish_profile();
                let reason = match &result {
                    Ok(reason) => reason.clone(),
                    Err(e) => {
                        log::error!("{e}");
                        StopReason::Failed
                    }
                };
                thread_shared.set_state(VcpuState::Exited(reason.clone()));
                if let Some(observer) = observer {
                    observer(index, &reason);
                }
                (vcpu, result)
            })
            .map_err(|source| Error::SpawnThread {
                vcpu: index,
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                let _ = join.join();
                return Err(Error::PrepareThread {
                    vcpu: index,
                    source,
                });
            }
            Err(_) => {
                let _ = join.join();
                return Err(Error::ThreadPanicked { vcpu: index });
            }
        }
        let _ = shared
            .target
            .set(KickTarget::new(join.as_pthread_t() as libc::pthread_t));
        Ok(VcpuThread {
            handle: VcpuHandle {
                shared,
                commands: commands_tx,
            },
            join: Some(join),
        })
    }

    /// Hands the profile collected so far to its slot (a poisoned slot is taken over: the
    /// profile is plain data).
    fn publish_profile(&mut self) {
        if let Some((profile, slot)) = &self.profile {
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            *slot = Some(profile.clone());
        }
    }

    /// The run loop. Runs on the vCPU thread until a stop reason or an error.
    fn run_loop(&mut self, commands: &Receiver<Command>, shared: &Shared) -> Result<StopReason> {
        let mut state = VcpuState::Created;
        loop {
            match state {
                VcpuState::Created | VcpuState::Paused => {
                    // Every handle gone: nobody can resume or stop this vCPU any more.
                    let Ok(command) = commands.recv() else {
                        return Ok(StopReason::Stopped);
                    };
                    if let Some(stop) = self.handle_command(command, &mut state, shared)? {
                        return Ok(stop);
                    }
                }
                VcpuState::Running => {
                    if shared.kick_pending.swap(false, Ordering::AcqRel) {
                        loop {
                            match commands.try_recv() {
                                Ok(command) => {
                                    if let Some(stop) =
                                        self.handle_command(command, &mut state, shared)?
                                    {
                                        return Ok(stop);
                                    }
                                }
                                Err(TryRecvError::Empty) => break,
                                Err(TryRecvError::Disconnected) => return Ok(StopReason::Stopped),
                            }
                        }
                        continue;
                    }
                    if let Some(stop) = self.run_once()? {
                        return Ok(stop);
                    }
                }
                VcpuState::Exited(reason) => return Ok(reason),
            }
        }
    }

    fn handle_command(
        &mut self,
        command: Command,
        state: &mut VcpuState,
        shared: &Shared,
    ) -> Result<Option<StopReason>> {
        match command {
            Command::Pause => {
                if matches!(state, VcpuState::Running | VcpuState::Created) {
                    if let Some(stop) = self.complete_in_flight()? {
                        return Ok(Some(stop));
                    }
                    *state = VcpuState::Paused;
                    shared.set_state(state.clone());
                }
            }
            Command::Resume => {
                if matches!(state, VcpuState::Paused | VcpuState::Created) {
                    *state = VcpuState::Running;
                    shared.set_state(state.clone());
                }
            }
            Command::Stop => return Ok(Some(StopReason::Stopped)),
            Command::Run(closure) => {
                if let Some(stop) = self.complete_in_flight()? {
                    return Ok(Some(stop));
                }
                closure(&mut VcpuContext { vcpu: self });
            }
        }
        Ok(None)
    }

    /// `KVM_RUN` once, through the register cache, and dispatches its exit; an interrupted
    /// run (`EINTR`, `EAGAIN`) is [`ExitOutcome::Interrupted`]. Records whether the exit left
    /// an instruction in flight, then gives the exit hook the exit and the registers.
    fn enter(&mut self) -> Result<ExitOutcome> {
        let (buses, msr, stats) = (&self.buses, &mut self.msr, &mut self.stats);
        let record = self.hook.is_some();
        let entered = self.profile.as_mut().map(|(profile, _)| {
            let now = Instant::now();
            profile.entering(now);
            now
        });
        let ran = self.registers.run(&mut self.fd, |mut exit| {
            let profiled = entered.map(|entered| (ExitKey::of(&exit), entered.elapsed()));
            let returned = entered.map(|_| Instant::now());
            let in_flight = ExitOutcome::leaves_instruction_in_flight(&exit);
            let outcome = dispatch(&mut exit, buses, &mut **msr, stats);
            let record = record.then(|| ExitRecord::of(&exit));
            (in_flight, outcome, record, profiled.zip(returned))
        });
        let index = self.index;
        match ran {
            Ok((in_flight, outcome, record, profiled)) => {
                self.in_flight = in_flight;
                if let (Some(hook), Some(record)) = (self.hook.as_mut(), record) {
                    hook.after_exit(&record, &outcome, &mut self.registers.with(&self.fd))
                        .map_err(|source| Error::Registers {
                            vcpu: index,
                            source,
                        })?;
                }
                if let (Some((profile, _)), Some(((key, in_run), returned))) =
                    (self.profile.as_mut(), profiled)
                {
                    profile.record(key, in_run, returned.elapsed());
                }
                Ok(outcome)
            }
            Err(sync_regs::Error::Run(e))
                if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN =>
            {
                self.in_flight = false;
                if let (Some((profile, _)), Some(entered)) = (self.profile.as_mut(), entered) {
                    profile.record(ExitKey::Interrupted, entered.elapsed(), Duration::ZERO);
                }
                Ok(ExitOutcome::Interrupted)
            }
            Err(sync_regs::Error::Run(source)) => Err(Error::Run {
                vcpu: index,
                source,
            }),
            Err(source) => Err(Error::Registers {
                vcpu: index,
                source,
            }),
        }
    }

    fn diagnostics(&mut self) -> Box<Diagnostics> {
        Box::new(Diagnostics::collect(
            &mut self.registers,
            &self.fd,
            self.stats,
        ))
    }

    /// One `KVM_RUN` and the dispatch of its exit.
    fn run_once(&mut self) -> Result<Option<StopReason>> {
        let outcome = self.enter()?;
        if outcome == ExitOutcome::Interrupted {
            self.stats.interrupts += 1;
        }
        self.after_exit(outcome)
    }

    /// Re-enters KVM with `immediate_exit` set, so that it completes an instruction whose
    /// exit was just handled (the data of an `in` or MMIO read lands in the guest, RIP moves
    /// on) and returns `EINTR` before running another one (api.rst, "KVM_RUN",
    /// `immediate_exit`, Linux 4.11).
    fn complete_in_flight(&mut self) -> Result<Option<StopReason>> {
        let mut rounds = 0;
        while self.in_flight && rounds < MAX_COMPLETION_ROUNDS {
            rounds += 1;
            self.fd.set_kvm_immediate_exit(1);
            let outcome = self.enter();
            self.fd.set_kvm_immediate_exit(0);
            if let Some(stop) = self.after_exit(outcome?)? {
                return Ok(Some(stop));
            }
        }
        if self.in_flight {
            log::warn!(
                "vCPU {}: instruction still in flight after {MAX_COMPLETION_ROUNDS} completion rounds",
                self.index
            );
        }
        Ok(None)
    }

    /// Turns a dispatched exit into what the loop does next.
    fn after_exit(&mut self, outcome: ExitOutcome) -> Result<Option<StopReason>> {
        match outcome {
            ExitOutcome::Continue => Ok(None),
            ExitOutcome::Interrupted => {
                kick::consume_pending_kicks().map_err(|source| Error::ConsumeKick {
                    vcpu: self.index,
                    source,
                })?;
                Ok(None)
            }
            ExitOutcome::Halted => Ok(Some(StopReason::Halted)),
            ExitOutcome::TripleFault => {
                self.triple_fault = Some(self.diagnostics());
                Ok(Some(StopReason::TripleFault))
            }
            ExitOutcome::SystemEvent(event) => Ok(Some(StopReason::SystemEvent(event))),
            ExitOutcome::FailEntry {
                hardware_entry_failure_reason,
                cpu,
            } => Err(Error::FailEntry {
                vcpu: self.index,
                hardware_entry_failure_reason,
                cpu,
                diagnostics: self.diagnostics(),
            }),
            ExitOutcome::InternalError => {
                let info = InternalErrorInfo::from_run(self.fd.get_kvm_run()).unwrap_or(
                    InternalErrorInfo {
                        suberror: 0,
                        data: Vec::new(),
                    },
                );
                Err(Error::InternalError {
                    vcpu: self.index,
                    info,
                    diagnostics: self.diagnostics(),
                })
            }
            ExitOutcome::Unhandled(exit) => Err(Error::UnhandledExit {
                vcpu: self.index,
                exit,
                diagnostics: self.diagnostics(),
            }),
        }
    }
}

/// A cloneable handle for sending commands to a vCPU thread from any thread.
#[derive(Clone)]
pub struct VcpuHandle {
    shared: Arc<Shared>,
    commands: Sender<Command>,
}

impl fmt::Debug for VcpuHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuHandle")
            .field("index", &self.shared.index)
            .field("state", &self.shared.state())
            .finish()
    }
}

impl VcpuHandle {
    /// The vCPU index.
    pub fn index(&self) -> u32 {
        self.shared.index
    }

    /// The current state.
    pub fn state(&self) -> VcpuState {
        self.shared.state()
    }

    /// Sends a command and kicks the vCPU so that a running guest sees it promptly.
    ///
    /// # Errors
    ///
    /// [`Error::Exited`] when the run loop has ended; [`Error::Kick`] when the signal fails.
    pub fn send(&self, command: Command) -> Result<()> {
        self.commands.send(command).map_err(|_| Error::Exited {
            vcpu: self.shared.index,
            state: self.shared.state(),
        })?;
        self.shared.kick()
    }

    /// Pauses the vCPU and waits until it is paused (with any in-flight I/O instruction
    /// completed), up to `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Exited`] when the run loop ended instead; [`Error::Timeout`]; the errors of
    /// [`VcpuHandle::send`].
    pub fn pause(&self, timeout: Duration) -> Result<()> {
        self.send(Command::Pause)?;
        match self.shared.wait_for("pause", timeout, |s| {
            matches!(s, VcpuState::Paused | VcpuState::Exited(_))
        })? {
            VcpuState::Paused => Ok(()),
            state => Err(Error::Exited {
                vcpu: self.shared.index,
                state,
            }),
        }
    }

    /// Lets a created or paused vCPU run. Does not wait: a later command is handled after it.
    ///
    /// # Errors
    ///
    /// [`Error::Exited`] when the run loop has ended.
    pub fn resume(&self) -> Result<()> {
        // A paused thread waits on the channel, so no kick is needed.
        self.commands
            .send(Command::Resume)
            .map_err(|_| Error::Exited {
                vcpu: self.shared.index,
                state: self.shared.state(),
            })
    }

    /// Asks the run loop to end. Does not wait; see [`VcpuThread::join`].
    ///
    /// # Errors
    ///
    /// As [`VcpuHandle::send`].
    pub fn stop(&self) -> Result<()> {
        self.send(Command::Stop)
    }

    /// Runs `f` on the vCPU thread (interrupting a running guest) and returns its result,
    /// waiting up to `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when `f` has not returned within `timeout`; [`Error::Exited`] when
    /// the run loop ended before running it; the errors of [`VcpuHandle::send`].
    pub fn run_on_vcpu<R, F>(&self, f: F, timeout: Duration) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut VcpuContext<'_>) -> R + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Command::Run(Box::new(move |ctx| {
            let _ = tx.send(f(ctx));
        })))?;
        rx.recv_timeout(timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => Error::Timeout {
                vcpu: self.shared.index,
                operation: "a closure on the vCPU thread",
                waited: timeout,
            },
            mpsc::RecvTimeoutError::Disconnected => Error::Exited {
                vcpu: self.shared.index,
                state: self.shared.state(),
            },
        })
    }

    /// Waits until the run loop has ended on its own (or by a command), up to `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`].
    pub fn wait_exited(&self, timeout: Duration) -> Result<StopReason> {
        match self
            .shared
            .wait_for("exit", timeout, |s| matches!(s, VcpuState::Exited(_)))?
        {
            VcpuState::Exited(reason) => Ok(reason),
            state => Err(Error::Exited {
                vcpu: self.shared.index,
                state,
            }),
        }
    }
}

/// A running vCPU thread: its handle and the right to join it.
///
/// Dropping it stops the run loop and detaches the thread without waiting; use
/// [`VcpuThread::join`] for a clean, bounded shutdown.
pub struct VcpuThread {
    handle: VcpuHandle,
    join: Option<JoinHandle<(Vcpu, Result<StopReason>)>>,
}

impl fmt::Debug for VcpuThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuThread")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl VcpuThread {
    /// A handle for commands.
    pub fn handle(&self) -> &VcpuHandle {
        &self.handle
    }

    /// Stops the run loop, waits up to `timeout` for it to end and joins the thread. Returns
    /// the vCPU (for reuse) and why its loop ended, or the error it ended with.
    ///
    /// On timeout the thread is left to finish on its own (detached) and an error is returned.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`]; the error the run loop ended with; [`Error::ThreadPanicked`].
    pub fn join(mut self, timeout: Duration) -> Result<(Vcpu, StopReason)> {
        let index = self.handle.index();
        if !matches!(self.handle.state(), VcpuState::Exited(_)) {
            // The loop may end by itself between the check and the send: that is fine.
            let _ = self.handle.stop();
        }
        self.handle.wait_exited(timeout)?;
        self.retire();
        let Some(join) = self.join.take() else {
            return Err(Error::ThreadPanicked { vcpu: index });
        };
        match join.join() {
            Ok((vcpu, Ok(reason))) => Ok((vcpu, reason)),
            Ok((_, Err(e))) => Err(e),
            Err(_) => Err(Error::ThreadPanicked { vcpu: index }),
        }
    }

    fn retire(&self) {
        if let Some(target) = self.handle.shared.target.get() {
            target.retire();
        }
    }
}

impl Drop for VcpuThread {
    fn drop(&mut self) {
        if self.join.is_some() {
            let _ = self.handle.stop();
            self.retire();
            // Dropping the JoinHandle detaches the thread; it ends at its next command check.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_commands_display() {
        assert_eq!(VcpuState::Created.to_string(), "created");
        assert_eq!(VcpuState::Running.to_string(), "running");
        assert_eq!(VcpuState::Paused.to_string(), "paused");
        assert_eq!(
            VcpuState::Exited(StopReason::Halted).to_string(),
            "exited: Halted"
        );
        assert_eq!(format!("{:?}", Command::Pause), "Pause");
        assert_eq!(format!("{:?}", Command::Resume), "Resume");
        assert_eq!(format!("{:?}", Command::Stop), "Stop");
        assert_eq!(format!("{:?}", Command::Run(Box::new(|_| {}))), "Run(..)");
    }

    #[test]
    fn waiting_for_a_state_times_out_with_a_typed_error() {
        let shared = Shared {
            index: 3,
            state: Mutex::new(VcpuState::Running),
            changed: Condvar::new(),
            kick_pending: AtomicBool::new(false),
            target: OnceLock::new(),
        };
        let err = shared
            .wait_for("pause", Duration::from_millis(5), |s| {
                *s == VcpuState::Paused
            })
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Timeout {
                vcpu: 3,
                operation: "pause",
                ..
            }
        ));
        // No thread to signal yet: a kick only records itself.
        shared.kick().unwrap();
        assert!(shared.kick_pending.swap(false, Ordering::AcqRel));
        // Not running: recorded, no signal needed.
        shared.set_state(VcpuState::Paused);
        shared.kick().unwrap();
        assert!(shared.kick_pending.load(Ordering::Acquire));
    }
}
