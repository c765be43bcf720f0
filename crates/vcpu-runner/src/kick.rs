//! Kicking a vCPU thread out of `KVM_RUN`: the one audited signal primitive.
//!
//! # Design
//!
//! The kick signal ([`kick_signal`], `SIGRTMIN() + 0`) is **blocked** in every vCPU thread at
//! all times in userspace, and unblocked only inside `KVM_RUN`, through
//! `KVM_SET_SIGNAL_MASK` (Linux 2.6.20): KVM swaps the thread's signal mask for the given
//! one on entry to `KVM_RUN` and restores it on return (`kvm_sigset_activate` /
//! `kvm_sigset_deactivate`, `virt/kvm/kvm_main.c`).
//!
//! A kick is: (1) queue the command, (2) set the vCPU's `kick_pending` flag, (3)
//! `pthread_kill` the thread. The vCPU thread, before each `KVM_RUN`, takes the flag (an
//! atomic swap) and if it was set handles every queued command; after every `KVM_RUN` that
//! returns `EINTR` it consumes the pending signal with `sigtimedwait` (it is blocked, so it
//! is never delivered to the no-op handler there).
//!
//! Why no kick is lost: take any kick K and the vCPU's last flag swap before K's step (2).
//! If a later swap sees K's flag, K's command is handled before the next entry. Otherwise K's
//! signal, sent after (2), is pending on the thread when it next calls `KVM_RUN`, or arrives
//! while it is inside. A pending signal that the run mask unblocks makes
//! `recalc_sigpending` set `TIF_SIGPENDING` when the mask is swapped in, and KVM checks it
//! before entering the guest (and is woken by it from inside the guest), so `KVM_RUN`
//! returns `EINTR` without running any more guest code than it already had. The thread then
//! consumes the signal and swaps the flag, which is still set by K: K's command is handled.
//! There is no window between "check" and "enter" because the check that matters is made by
//! the kernel with the signal already pending. A signal consumed in the drain always belongs
//! to a kick whose flag was set before it was sent, so draining cannot hide a kick either.
//!
//! `kvm_run` is only touched by the vCPU thread: `immediate_exit` is set by that thread
//! itself (to complete an in-flight instruction before pausing), and the signal handler does
//! nothing, so there is no second mapping of `kvm_run` (rust-vmm/kvm issue 373).

use std::mem::MaybeUninit;
use std::sync::{Mutex, OnceLock};

use kvm_ioctls::VcpuFd;
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::sys::{KvmSignalMask, KERNEL_SIGSET_SIZE, KVM_SET_SIGNAL_MASK};

/// The offset of the kick signal from `SIGRTMIN()`.
pub const KICK_SIGNAL_OFFSET: c_int = 0;

/// Errors of the kick primitive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `sigaction` for the kick signal failed.
    #[error("registering the handler for the kick signal {signal} failed")]
    RegisterHandler {
        /// The signal.
        signal: c_int,
        /// The cause.
        #[source]
        source: errno::Error,
    },
    /// `pthread_sigmask` failed.
    #[error("pthread_sigmask on the vCPU thread failed")]
    SignalMask(#[source] errno::Error),
    /// `KVM_SET_SIGNAL_MASK` failed.
    #[error("KVM_SET_SIGNAL_MASK failed")]
    SetRunSignalMask(#[source] errno::Error),
    /// `sigtimedwait` failed while consuming a pending kick.
    #[error("consuming a pending kick signal with sigtimedwait failed")]
    ConsumeKick(#[source] errno::Error),
    /// `pthread_kill` failed.
    #[error("pthread_kill of the vCPU thread failed")]
    SendKick(#[source] errno::Error),
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn on_kick(_signal: c_int, _info: *mut siginfo_t, _context: *mut c_void) {
    // Nothing to do: the signal exists to make KVM_RUN return EINTR. It is blocked in vCPU
    // threads outside KVM_RUN, so this only runs if the signal reaches another thread.
}

/// Installs the no-op handler for the kick signal, once per process.
///
/// Without a handler a stray kick signal would terminate the process (the default action of
/// real-time signals).
///
/// # Errors
///
/// [`Error::RegisterHandler`] when `sigaction` fails.
pub fn register_kick_handler() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    let signal = kick_signal();
    REGISTERED
        .get_or_init(|| register_signal_handler(signal, on_kick).map_err(|e| e.errno()))
        .map_err(|errno| Error::RegisterHandler {
            signal,
            source: errno::Error::new(errno),
        })
}

fn sigset_of(signal: c_int) -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given; it cannot fail for a valid pointer.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: the set was initialised just above.
    let mut set = unsafe { set.assume_init() };
    // SAFETY: valid set; `signal` is a real-time signal number (validated by the handler
    // registration), so sigaddset cannot fail.
    unsafe { libc::sigaddset(&mut set, signal) };
    set
}

/// Blocks the kick signal in the calling thread and returns the mask the thread then has.
fn block_kick_in_this_thread() -> Result<libc::sigset_t> {
    let kick = sigset_of(kick_signal());
    // SAFETY: valid set; a null old-set pointer is allowed.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &kick, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(Error::SignalMask(errno::Error::new(ret)));
    }
    let mut current = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: a null new set only reads the mask into `current`, which is valid for writes.
    let ret =
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), current.as_mut_ptr()) };
    if ret != 0 {
        return Err(Error::SignalMask(errno::Error::new(ret)));
    }
    // SAFETY: pthread_sigmask succeeded and filled the set.
    Ok(unsafe { current.assume_init() })
}

/// The kernel `sigset_t` image of `mask` without the kick signal: bit `n - 1` is signal `n`.
fn run_mask(mask: &libc::sigset_t) -> KvmSignalMask {
    let kick = kick_signal();
    let mut bits = 0u64;
    for signal in 1..=(KERNEL_SIGSET_SIZE as c_int * 8) {
        // SAFETY: valid set and a signal number in the kernel's range.
        let member = unsafe { libc::sigismember(mask, signal) };
        if member == 1 && signal != kick {
            bits |= 1 << (signal - 1);
        }
    }
    KvmSignalMask {
        len: KERNEL_SIGSET_SIZE as u32,
        sigset: bits.to_le_bytes(),
    }
}

/// Makes the calling thread a vCPU thread for `fd`: blocks the kick signal here, and tells KVM
/// to run the guest with the same mask minus the kick signal.
///
/// Must be called on the thread that will call `KVM_RUN` on `fd`, before the first kick can
/// be sent to it.
///
/// # Errors
///
/// [`Error::RegisterHandler`], [`Error::SignalMask`] (`pthread_sigmask`) or
/// [`Error::SetRunSignalMask`] (`KVM_SET_SIGNAL_MASK`).
pub fn prepare_vcpu_thread(fd: &VcpuFd) -> Result<()> {
    register_kick_handler()?;
    let mask = block_kick_in_this_thread()?;
    let run_mask = run_mask(&mask);
    // SAFETY: KVM_SET_SIGNAL_MASK reads a `struct kvm_signal_mask` head and `len` (8) bytes
    // of set after it; `KvmSignalMask` is exactly that, and lives across the call.
    let ret = unsafe { ioctl_with_ref(fd, KVM_SET_SIGNAL_MASK(), &run_mask) };
    if ret != 0 {
        return Err(Error::SetRunSignalMask(errno::Error::last()));
    }
    Ok(())
}

/// Consumes every pending instance of the kick signal on the calling (vCPU) thread, so that
/// the next `KVM_RUN` does not return `EINTR` for a kick already acted on.
///
/// # Errors
///
/// [`Error::ConsumeKick`] when `sigtimedwait` fails with anything but `EAGAIN`/`EINTR`.
pub fn consume_pending_kicks() -> Result<()> {
    let kick = sigset_of(kick_signal());
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        // SAFETY: valid set and timeout; a null siginfo pointer is allowed.
        let ret = unsafe { libc::sigtimedwait(&kick, std::ptr::null_mut(), &zero) };
        if ret < 0 {
            let err = errno::Error::last();
            return match err.errno() {
                libc::EAGAIN => Ok(()),
                libc::EINTR => continue,
                _ => Err(Error::ConsumeKick(err)),
            };
        }
        // A real-time signal can be queued more than once: keep consuming.
    }
}

/// A vCPU thread that can be kicked, until it is retired.
///
/// The `pthread_t` is only used while the thread has not been joined or detached: the owner
/// of the `JoinHandle` retires the target (under the lock) before joining or dropping it.
#[derive(Debug)]
pub(crate) struct KickTarget {
    thread: Mutex<Option<libc::pthread_t>>,
}

impl KickTarget {
    pub(crate) fn new(thread: libc::pthread_t) -> Self {
        KickTarget {
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Sends the kick signal, unless the thread was retired.
    pub(crate) fn kick(&self) -> Result<()> {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        let Some(thread) = *thread else {
            return Ok(());
        };
        // SAFETY: the thread has not been joined or detached (retire() takes this lock
        // first), so the handle is valid; the kick signal is a valid real-time signal.
        let ret = unsafe { libc::pthread_kill(thread, kick_signal()) };
        match ret {
            0 => Ok(()),
            // The thread has finished but was not joined yet: nothing to interrupt.
            libc::ESRCH => Ok(()),
            e => Err(Error::SendKick(errno::Error::new(e))),
        }
    }

    /// Forgets the thread; later kicks do nothing.
    pub(crate) fn retire(&self) {
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn run_mask_drops_only_the_kick_signal() {
        let mut mask = sigset_of(kick_signal());
        // SAFETY: valid set and signal.
        unsafe { libc::sigaddset(&mut mask, libc::SIGUSR1) };
        let run = run_mask(&mask);
        assert_eq!(run.len, 8);
        let bits = u64::from_le_bytes(run.sigset);
        assert_eq!(bits, 1 << (libc::SIGUSR1 - 1));
    }

    #[test]
    fn a_kick_to_a_blocked_thread_stays_pending_until_consumed() {
        register_kick_handler().unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let handle = std::thread::spawn(move || {
            block_kick_in_this_thread().unwrap();
            ready_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            let mut pending = MaybeUninit::<libc::sigset_t>::uninit();
            // SAFETY: valid pointer for the pending set.
            assert_eq!(unsafe { libc::sigpending(pending.as_mut_ptr()) }, 0);
            // SAFETY: sigpending filled the set.
            let pending = unsafe { pending.assume_init() };
            // SAFETY: valid set and signal.
            let was_pending = unsafe { libc::sigismember(&pending, kick_signal()) } == 1;
            consume_pending_kicks().unwrap();
            // Nothing left: a second consume returns at once.
            consume_pending_kicks().unwrap();
            was_pending
        });
        ready_rx.recv().unwrap();
        let target = KickTarget::new(handle.as_pthread_t() as libc::pthread_t);
        target.kick().unwrap();
        target.kick().unwrap();
        std::thread::sleep(Duration::from_millis(10));
        go_tx.send(()).unwrap();
        assert!(handle.join().unwrap(), "the kick was not pending");
        target.retire();
        // Retired: a kick is a no-op rather than a use of a dead pthread_t.
        target.kick().unwrap();
    }
}
