//! The host side of the console: the terminal mode while a guest runs, and the signals that
//! end the VMM.
//!
//! When stdin is a terminal it is put in a raw-ish mode (no line buffering, no echo, no
//! input translation) so that keys reach the guest as typed, but `ISIG` stays on: Ctrl-C
//! (SIGINT) and Ctrl-\ (SIGQUIT) still signal the VMM. Every signal that would end the
//! process ([`termination_signals`]) is recorded by a handler instead, so the VMM stops its
//! vCPUs and returns through `main`; [`RawTerminal`] restores the saved mode when dropped, so
//! every such exit path (return, error, unwinding panic) leaves the terminal as it was.
//! SIGKILL cannot be caught, and a fault of the VMM itself (SIGSEGV, SIGBUS, SIGILL, SIGFPE,
//! SIGABRT) is not turned into a stop: after those the terminal stays raw (`stty sane`). The
//! one fatal signal the VMM handles itself, the `SIGSYS` of a seccomp violation
//! ([`crate::seccomp`]), restores the terminal through [`restore_before_fatal_exit`].

use std::cell::UnsafeCell;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

/// The signal that asked the VMM to stop, or 0.
static TERMINATION_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The signals whose default action ends a process and that are sent to it rather than
/// raised by a fault, with their names: interrupt (Ctrl-C), terminate, hang-up (the terminal
/// went away), quit (Ctrl-\, which raw mode keeps), and the rest of signal(7)'s "Term" and
/// "Core" signals. SIGPIPE is not among them: the Rust runtime ignores it, so a closed pipe
/// is an `EPIPE` error instead.
pub const TERMINATION_SIGNALS: [(libc::c_int, &str); 14] = [
    (libc::SIGINT, "SIGINT"),
    (libc::SIGTERM, "SIGTERM"),
    (libc::SIGHUP, "SIGHUP"),
    (libc::SIGQUIT, "SIGQUIT"),
    (libc::SIGUSR1, "SIGUSR1"),
    (libc::SIGUSR2, "SIGUSR2"),
    (libc::SIGALRM, "SIGALRM"),
    (libc::SIGVTALRM, "SIGVTALRM"),
    (libc::SIGPROF, "SIGPROF"),
    (libc::SIGXCPU, "SIGXCPU"),
    (libc::SIGXFSZ, "SIGXFSZ"),
    (libc::SIGIO, "SIGIO"),
    (libc::SIGPWR, "SIGPWR"),
    (libc::SIGSTKFLT, "SIGSTKFLT"),
];

/// Every signal the VMM turns into a clean stop: [`TERMINATION_SIGNALS`] and the real-time
/// signals (default action: terminate) except vcpu-runner's kick signal. The exit status is
/// 128 + the signal, as shells report a death by signal.
pub fn termination_signals() -> Vec<libc::c_int> {
    let kick = vcpu_runner::kick::kick_signal();
    TERMINATION_SIGNALS
        .iter()
        .map(|(s, _)| *s)
        .chain(libc::SIGRTMIN()..=libc::SIGRTMAX())
        .filter(|s| *s != kick)
        .collect()
}

/// The usual name of a signal in [`TERMINATION_SIGNALS`], or "a real-time signal".
pub fn signal_name(signal: libc::c_int) -> &'static str {
    TERMINATION_SIGNALS
        .iter()
        .find(|(s, _)| *s == signal)
        .map_or("a real-time signal", |(_, name)| name)
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `tcgetattr` failed.
    #[error("cannot read the terminal mode")]
    GetAttr(#[source] io::Error),
    /// `tcsetattr` failed.
    #[error("cannot set the terminal mode")]
    SetAttr(#[source] io::Error),
    /// `sigaction` failed.
    #[error("cannot install the handler for signal {signal}")]
    Sigaction {
        /// The signal.
        signal: i32,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The saved mode of the terminal in raw mode, for a signal handler that ends the process:
/// it cannot take a lock or reach the [`RawTerminal`], so the mode is copied here when raw
/// mode is entered, and published by `state`.
struct FatalRestore {
    /// [`RESTORE_EMPTY`], [`RESTORE_WRITING`] or [`RESTORE_ARMED`].
    state: AtomicU8,
    fd: AtomicI32,
    saved: UnsafeCell<MaybeUninit<libc::termios>>,
}

const RESTORE_EMPTY: u8 = 0;
const RESTORE_WRITING: u8 = 1;
const RESTORE_ARMED: u8 = 2;

// SAFETY: `saved` is written only by the thread that moved `state` from empty to writing,
// and read only after `state` was seen armed (release/acquire); it is never written while
// armed.
unsafe impl Sync for FatalRestore {}

static FATAL_RESTORE: FatalRestore = FatalRestore {
    state: AtomicU8::new(RESTORE_EMPTY),
    fd: AtomicI32::new(-1),
    saved: UnsafeCell::new(MaybeUninit::uninit()),
};

impl FatalRestore {
    /// Keeps `saved` for [`restore_before_fatal_exit`], unless another terminal holds the
    /// place.
    fn arm(&self, fd: RawFd, saved: &libc::termios) {
        if self
            .state
            .compare_exchange(
                RESTORE_EMPTY,
                RESTORE_WRITING,
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            // SAFETY: the compare-exchange above gave this thread the only right to write.
            unsafe { (*self.saved.get()).write(*saved) };
            self.fd.store(fd, Ordering::Relaxed);
            self.state.store(RESTORE_ARMED, Ordering::Release);
        }
    }

    /// Forgets the mode of `fd` (restored by its guard).
    fn disarm(&self, fd: RawFd) {
        if self.fd.load(Ordering::Relaxed) == fd {
            let _ = self.state.compare_exchange(
                RESTORE_ARMED,
                RESTORE_EMPTY,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }
}

/// Puts the terminal that a [`RawTerminal`] made raw back in its saved mode, for a signal
/// handler about to end the process. Async-signal-safe: atomics and one `tcsetattr` (an
/// `ioctl(TCSETS)`, listed as async-signal-safe in signal-safety(7)). Does nothing when no
/// terminal is in raw mode.
pub fn restore_before_fatal_exit() {
    if FATAL_RESTORE.state.load(Ordering::Acquire) == RESTORE_ARMED {
        let fd = FATAL_RESTORE.fd.load(Ordering::Relaxed);
        // SAFETY: armed means the mode was written completely (release store after the
        // write); it is not written again until the state goes back to empty. tcsetattr only
        // reads it.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, (*FATAL_RESTORE.saved.get()).as_ptr()) };
    }
}

/// A terminal in raw mode until dropped.
#[derive(Debug)]
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
    restored: bool,
}

/// Whether `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(fd) == 1 }
}

fn get_attr(fd: RawFd) -> Result<libc::termios> {
    let mut t = std::mem::MaybeUninit::<libc::termios>::zeroed();
    // SAFETY: `t` is a valid termios buffer for tcgetattr to fill.
    if unsafe { libc::tcgetattr(fd, t.as_mut_ptr()) } != 0 {
        return Err(Error::GetAttr(io::Error::last_os_error()));
    }
    // SAFETY: tcgetattr succeeded, so it initialized the struct (and zeroed is valid anyway).
    Ok(unsafe { t.assume_init() })
}

fn set_attr(fd: RawFd, t: &libc::termios) -> Result<()> {
    // SAFETY: `t` points to a valid termios; tcsetattr only reads it.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) } != 0 {
        return Err(Error::SetAttr(io::Error::last_os_error()));
    }
    Ok(())
}

/// The raw mode derived from `saved`: keeps `ISIG` so Ctrl-C still signals the VMM.
pub fn raw_mode(saved: &libc::termios) -> libc::termios {
    let mut t = *saved;
    t.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    t.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::IEXTEN);
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    t
}

impl RawTerminal {
    /// Puts `fd` in raw mode if it is a terminal; `None` if it is not.
    pub fn enter_if_tty(fd: RawFd) -> Result<Option<Self>> {
        if !is_tty(fd) {
            return Ok(None);
        }
        let saved = get_attr(fd)?;
        set_attr(fd, &raw_mode(&saved))?;
        FATAL_RESTORE.arm(fd, &saved);
        Ok(Some(RawTerminal {
            fd,
            saved,
            restored: false,
        }))
    }

    /// Restores the saved mode now.
    pub fn restore(&mut self) -> Result<()> {
        if !self.restored {
            FATAL_RESTORE.disarm(self.fd);
            set_attr(self.fd, &self.saved)?;
            self.restored = true;
        }
        Ok(())
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            log::error!("{e}");
        }
    }
}

extern "C" fn record_signal(signal: libc::c_int) {
    TERMINATION_SIGNAL.store(signal, Ordering::SeqCst);
}

/// Makes every signal of [`termination_signals`] record itself for [`termination_signal`]
/// instead of killing the process, so the VMM can stop its vCPUs and restore the terminal.
pub fn install_termination_handlers() -> Result<()> {
    for signal in termination_signals() {
        // SAFETY: an all-zero sigaction is a valid starting value (empty mask, no flags).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = record_signal as extern "C" fn(libc::c_int) as usize;
        // SAFETY: `action` is fully initialized; the handler only stores to an atomic, which
        // is async-signal-safe; a null old-action pointer is allowed.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(Error::Sigaction {
                signal,
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// The terminating signal received since the handlers were installed, if any.
pub fn termination_signal() -> Option<i32> {
    match TERMINATION_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_mode_keeps_signals() {
        // SAFETY: an all-zero termios is a valid value to derive from.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        t.c_lflag = libc::ISIG | libc::ICANON | libc::ECHO;
        t.c_iflag = libc::ICRNL;
        let r = raw_mode(&t);
        assert_eq!(r.c_lflag, libc::ISIG);
        assert_eq!(r.c_iflag, 0);
        assert_eq!(r.c_cc[libc::VMIN], 1);
    }

    #[test]
    fn not_a_tty_is_left_alone() {
        let (r, _w) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsRawFd;
        assert!(RawTerminal::enter_if_tty(r.as_raw_fd()).unwrap().is_none());
        assert!(matches!(get_attr(r.as_raw_fd()), Err(Error::GetAttr(_))));
    }

    #[test]
    fn handlers_record_the_signal() {
        install_termination_handlers().unwrap();
        let signals = termination_signals();
        assert!(!signals.contains(&vcpu_runner::kick::kick_signal()));
        assert!(signals.contains(&libc::SIGRTMAX()));
        for signal in signals {
            // SAFETY: raise sends a signal to this thread; the handler installed above only
            // stores to an atomic.
            assert_eq!(unsafe { libc::raise(signal) }, 0);
            assert_eq!(termination_signal(), Some(signal));
            TERMINATION_SIGNAL.store(0, Ordering::SeqCst);
        }
        assert_eq!(signal_name(libc::SIGQUIT), "SIGQUIT");
        assert_eq!(signal_name(libc::SIGRTMAX()), "a real-time signal");
    }

    /// The raw mode is undone on drop: a pseudo-terminal's mode is back as it was.
    #[test]
    fn drop_restores_the_terminal() {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two fds into the integers; the name, termios and winsize
        // pointers may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", io::Error::last_os_error());
        let before = get_attr(slave).unwrap();
        let raw = RawTerminal::enter_if_tty(slave).unwrap().unwrap();
        assert_eq!(get_attr(slave).unwrap().c_lflag & libc::ICANON, 0);
        drop(raw);
        let after = get_attr(slave).unwrap();
        assert_eq!(
            (after.c_lflag, after.c_iflag),
            (before.c_lflag, before.c_iflag)
        );
        for fd in [master, slave] {
            // SAFETY: the fds came from openpty and are closed once.
            unsafe { libc::close(fd) };
        }
    }
}
