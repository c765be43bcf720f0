//! Several vCPUs of one VM: one thread each and one shared outcome.
//!
//! The first VM-level event wins: a shutdown, reset or crash system event, a triple fault, or
//! a vCPU's error. The vCPU that sees it records it and stops every other vCPU (stop command
//! plus kick). A `hlt` ends only its own vCPU; the VM is [`VmOutcome::Halted`] once all of
//! them have halted. [`VmRunner::shutdown`] joins every thread with one bounded wait and
//! returns the outcome; an error of the winning vCPU is carried in it, never lost.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::diagnostics::Diagnostics;
use crate::dispatch::SystemEvent;
use crate::vcpu::{self, StopReason, Vcpu, VcpuHandle, VcpuThread};

/// Errors of a VM's vCPU set.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A VM needs at least one vCPU.
    #[error("a VM runner needs at least one vCPU")]
    NoVcpus,
    /// Spawning a vCPU thread failed.
    #[error("spawning vCPU {vcpu} failed")]
    Spawn {
        /// The vCPU index.
        vcpu: u32,
        /// The cause.
        #[source]
        source: vcpu::Error,
    },
    /// Starting a vCPU failed (its thread had already ended).
    #[error("starting vCPU {vcpu} failed")]
    Start {
        /// The vCPU index.
        vcpu: u32,
        /// The cause.
        #[source]
        source: vcpu::Error,
    },
    /// Some vCPU threads did not end within the shutdown timeout; they were detached.
    #[error("vCPUs {vcpus:?} did not stop within {waited:?}")]
    JoinTimeout {
        /// The vCPUs still running.
        vcpus: Vec<u32>,
        /// How long shutdown waited.
        waited: Duration,
    },
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// How a VM run ended.
#[derive(Debug)]
pub enum VmOutcome {
    /// The guest asked to power off (`KVM_SYSTEM_EVENT_SHUTDOWN`).
    Shutdown {
        /// The vCPU that asked.
        vcpu: u32,
    },
    /// The guest asked for a reset (`KVM_SYSTEM_EVENT_RESET`).
    Reset {
        /// The vCPU that asked.
        vcpu: u32,
    },
    /// The guest reported a crash (`KVM_SYSTEM_EVENT_CRASH`).
    Crash {
        /// The vCPU that reported it.
        vcpu: u32,
        /// The event data.
        data: Vec<u64>,
    },
    /// Another system event type.
    OtherEvent {
        /// The vCPU.
        vcpu: u32,
        /// The event type.
        kind: u32,
        /// The event data.
        data: Vec<u64>,
    },
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`); a PC would reset.
    TripleFault {
        /// The vCPU.
        vcpu: u32,
        /// Its registers and counters, taken at the exit (see
        /// [`Vcpu::triple_fault_diagnostics`]); `None` only if its thread could not be
        /// joined.
        diagnostics: Option<Box<Diagnostics>>,
    },
    /// Every vCPU halted with nothing to wake it.
    Halted,
    /// The VMM stopped the VM with [`VmRunner::shutdown`] before any guest event.
    Stopped,
    /// A vCPU failed; the others were stopped.
    Error {
        /// The vCPU.
        vcpu: u32,
        /// Its error, with diagnostics.
        error: vcpu::Error,
    },
}

impl fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmOutcome::Shutdown { vcpu } => write!(f, "guest shutdown (vCPU {vcpu})"),
            VmOutcome::Reset { vcpu } => write!(f, "guest reset (vCPU {vcpu})"),
            VmOutcome::Crash { vcpu, data } => write!(f, "guest crash (vCPU {vcpu}, {data:x?})"),
            VmOutcome::OtherEvent { vcpu, kind, data } => {
                write!(f, "system event {kind} (vCPU {vcpu}, {data:x?})")
            }
            VmOutcome::TripleFault { vcpu, diagnostics } => {
                write!(f, "triple fault (vCPU {vcpu})")?;
                match diagnostics {
                    Some(d) => write!(f, "\n{d}"),
                    None => Ok(()),
                }
            }
            VmOutcome::Halted => f.write_str("all vCPUs halted"),
            VmOutcome::Stopped => f.write_str("stopped by the VMM"),
            VmOutcome::Error { vcpu, error } => write!(f, "vCPU {vcpu} failed: {error}"),
        }
    }
}

/// The first event, as recorded by the vCPU that saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FirstEvent {
    Vcpu(u32, StopReason),
    Halted,
    Stopped,
}

#[derive(Debug, Default)]
struct Progress {
    first: Option<FirstEvent>,
    exited: usize,
    halted: usize,
}

struct VmShared {
    count: usize,
    progress: Mutex<Progress>,
    changed: Condvar,
    handles: OnceLock<Vec<VcpuHandle>>,
}

impl VmShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called on a vCPU thread when its loop has ended.
    fn vcpu_exited(&self, index: u32, reason: &StopReason) {
        let stop_others = {
            let mut progress = self.lock();
            progress.exited += 1;
            let vm_level = match reason {
                StopReason::Stopped => false,
                StopReason::Halted => {
                    progress.halted += 1;
                    false
                }
                StopReason::TripleFault | StopReason::SystemEvent(_) | StopReason::Failed => true,
            };
            if vm_level && progress.first.is_none() {
                progress.first = Some(FirstEvent::Vcpu(index, reason.clone()));
                true
            } else {
                if progress.first.is_none() && progress.halted == self.count {
                    progress.first = Some(FirstEvent::Halted);
                }
                if vm_level {
                    log::warn!(
                        "vCPU {index} ended with {reason:?} after the VM's outcome was decided"
                    );
                }
                false
            }
        };
        self.changed.notify_all();
        if stop_others {
            self.stop_all();
        }
    }

    fn stop_all(&self) {
        if let Some(handles) = self.handles.get() {
            for handle in handles {
                // A vCPU that already ended has no channel: nothing to stop.
                let _ = handle.stop();
            }
        }
    }
}

/// The vCPU threads of one VM.
pub struct VmRunner {
    threads: Vec<VcpuThread>,
    shared: Arc<VmShared>,
}

impl fmt::Debug for VmRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmRunner")
            .field("threads", &self.threads)
            .field("progress", &*self.shared.lock())
            .finish()
    }
}

impl VmRunner {
    /// Spawns one thread per vCPU, all in the created state. On error the vCPUs spawned so far
    /// are stopped and detached.
    ///
    /// # Errors
    ///
    /// [`Error::NoVcpus`] for an empty list; [`Error::Spawn`] naming the vCPU that failed.
    pub fn spawn(vcpus: Vec<Vcpu>) -> Result<Self> {
        if vcpus.is_empty() {
            return Err(Error::NoVcpus);
        }
        let shared = Arc::new(VmShared {
            count: vcpus.len(),
            progress: Mutex::new(Progress::default()),
            changed: Condvar::new(),
            handles: OnceLock::new(),
        });
        let mut threads = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let index = vcpu.index();
            let observer_shared = shared.clone();
            let thread = vcpu
                .spawn_observed(Some(Box::new(move |index, reason| {
                    observer_shared.vcpu_exited(index, reason)
                })))
                .map_err(|source| Error::Spawn {
                    vcpu: index,
                    source,
                })?;
            threads.push(thread);
        }
        let handles = threads.iter().map(|t| t.handle().clone()).collect();
        let _ = shared.handles.set(handles);
        Ok(VmRunner { threads, shared })
    }

    /// Lets every vCPU run.
    ///
    /// # Errors
    ///
    /// [`Error::Start`] naming a vCPU whose thread had already ended.
    pub fn start(&self) -> Result<()> {
        for thread in &self.threads {
            let handle = thread.handle();
            handle.resume().map_err(|source| Error::Start {
                vcpu: handle.index(),
                source,
            })?;
        }
        Ok(())
    }

    /// The vCPU handles, in spawn order.
    pub fn handles(&self) -> Vec<VcpuHandle> {
        self.threads.iter().map(|t| t.handle().clone()).collect()
    }

    /// Waits up to `timeout` for the VM's outcome to be decided (a guest event, a vCPU error,
    /// or every vCPU halted). Returns whether it was.
    pub fn wait(&self, timeout: Duration) -> bool {
        let progress = self.shared.lock();
        let (progress, _) = self
            .shared
            .changed
            .wait_timeout_while(progress, timeout, |p| p.first.is_none())
            .unwrap_or_else(|p| p.into_inner());
        progress.first.is_some()
    }

    /// Stops every vCPU, joins every thread within `timeout` in total, and returns the
    /// outcome. If no guest event happened first the outcome is [`VmOutcome::Stopped`].
    ///
    /// Errors of vCPUs other than the one that decided the outcome are logged.
    ///
    /// # Errors
    ///
    /// [`Error::JoinTimeout`] naming the vCPUs that did not stop in time (they are detached).
    pub fn shutdown(mut self, timeout: Duration) -> Result<VmOutcome> {
        let deadline = Instant::now() + timeout;
        {
            let mut progress = self.shared.lock();
            if progress.first.is_none() {
                progress.first = Some(FirstEvent::Stopped);
            }
        }
        self.shared.stop_all();
        {
            let progress = self.shared.lock();
            let (progress, result) = self
                .shared
                .changed
                .wait_timeout_while(progress, timeout, |p| p.exited < self.shared.count)
                .unwrap_or_else(|p| p.into_inner());
            if result.timed_out() {
                drop(progress);
                let vcpus = self
                    .threads
                    .iter()
                    .filter(|t| !matches!(t.handle().state(), vcpu::VcpuState::Exited(_)))
                    .map(|t| t.handle().index())
                    .collect();
                // Dropping the threads detaches them; Drop never blocks.
                return Err(Error::JoinTimeout {
                    vcpus,
                    waited: timeout,
                });
            }
        }
        let first = self.shared.lock().first.clone();
        let mut failure = None;
        let mut triple_fault = None;
        for thread in self.threads.drain(..) {
            let index = thread.handle().index();
            let remaining = deadline.saturating_duration_since(Instant::now());
            match thread.join(remaining.max(Duration::from_millis(1))) {
                Ok((mut vcpu, _)) => {
                    if first == Some(FirstEvent::Vcpu(index, StopReason::TripleFault)) {
                        triple_fault = vcpu.take_triple_fault_diagnostics();
                    }
                }
                Err(error) => {
                    if first == Some(FirstEvent::Vcpu(index, StopReason::Failed)) {
                        failure = Some(VmOutcome::Error { vcpu: index, error });
                    } else {
                        log::error!("vCPU {index} failed while the VM was stopping: {error}");
                    }
                }
            }
        }
        Ok(match first {
            Some(FirstEvent::Vcpu(vcpu, reason)) => match reason {
                StopReason::TripleFault => VmOutcome::TripleFault {
                    vcpu,
                    diagnostics: triple_fault,
                },
                StopReason::SystemEvent(SystemEvent::Shutdown) => VmOutcome::Shutdown { vcpu },
                StopReason::SystemEvent(SystemEvent::Reset) => VmOutcome::Reset { vcpu },
                StopReason::SystemEvent(SystemEvent::Crash { data }) => {
                    VmOutcome::Crash { vcpu, data }
                }
                StopReason::SystemEvent(SystemEvent::Other { kind, data }) => {
                    VmOutcome::OtherEvent { vcpu, kind, data }
                }
                // The failed vCPU's join carries its error.
                StopReason::Failed => failure.unwrap_or(VmOutcome::Error {
                    vcpu,
                    error: vcpu::Error::ThreadPanicked { vcpu },
                }),
                StopReason::Halted | StopReason::Stopped => VmOutcome::Stopped,
            },
            Some(FirstEvent::Halted) => VmOutcome::Halted,
            Some(FirstEvent::Stopped) | None => VmOutcome::Stopped,
        })
    }
}

impl Drop for VmRunner {
    fn drop(&mut self) {
        // Each VcpuThread's Drop sends Stop, kicks and detaches; nothing here blocks.
        self.threads.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(count: usize) -> VmShared {
        VmShared {
            count,
            progress: Mutex::new(Progress::default()),
            changed: Condvar::new(),
            handles: OnceLock::new(),
        }
    }

    #[test]
    fn first_vm_level_event_wins() {
        let vm = shared(3);
        vm.vcpu_exited(0, &StopReason::Halted);
        assert_eq!(vm.lock().first, None);
        vm.vcpu_exited(2, &StopReason::SystemEvent(SystemEvent::Reset));
        vm.vcpu_exited(1, &StopReason::Failed);
        let progress = vm.lock();
        assert_eq!(
            progress.first,
            Some(FirstEvent::Vcpu(
                2,
                StopReason::SystemEvent(SystemEvent::Reset)
            ))
        );
        assert_eq!(progress.exited, 3);
    }

    #[test]
    fn all_halted_is_an_outcome_but_a_stop_is_not() {
        let vm = shared(2);
        vm.vcpu_exited(0, &StopReason::Halted);
        vm.vcpu_exited(1, &StopReason::Stopped);
        assert_eq!(vm.lock().first, None);
        let vm = shared(2);
        vm.vcpu_exited(0, &StopReason::Halted);
        vm.vcpu_exited(1, &StopReason::Halted);
        assert_eq!(vm.lock().first, Some(FirstEvent::Halted));
    }

    #[test]
    fn outcomes_display() {
        assert_eq!(VmOutcome::Halted.to_string(), "all vCPUs halted");
        assert_eq!(VmOutcome::Stopped.to_string(), "stopped by the VMM");
        assert_eq!(
            VmOutcome::TripleFault {
                vcpu: 1,
                diagnostics: None
            }
            .to_string(),
            "triple fault (vCPU 1)"
        );
        assert_eq!(
            VmOutcome::Shutdown { vcpu: 0 }.to_string(),
            "guest shutdown (vCPU 0)"
        );
        assert_eq!(
            VmOutcome::Reset { vcpu: 0 }.to_string(),
            "guest reset (vCPU 0)"
        );
        assert!(VmOutcome::Crash {
            vcpu: 0,
            data: vec![1]
        }
        .to_string()
        .contains("crash"));
        assert!(VmOutcome::OtherEvent {
            vcpu: 0,
            kind: 9,
            data: vec![]
        }
        .to_string()
        .contains("event 9"));
        assert!(VmOutcome::Error {
            vcpu: 2,
            error: vcpu::Error::ThreadPanicked { vcpu: 2 }
        }
        .to_string()
        .contains("vCPU 2 failed"));
        assert!(matches!(VmRunner::spawn(Vec::new()), Err(Error::NoVcpus)));
    }
}
