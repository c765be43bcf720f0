//! Seccomp filters, one per kind of VMM thread, built with rust-vmm's `seccompiler`.
//!
//! Once the VM is built (files opened, guest memory mapped, vCPUs created, every thread
//! spawned), each thread of the VMM confines itself to the syscalls its own code makes from
//! then on ([`allowed_syscalls`]); `--no-seccomp` leaves them unconfined. A syscall outside the
//! set is not carried out: the filter returns `SECCOMP_RET_TRAP`, the kernel sends `SIGSYS`
//! to the thread, and this module's handler writes one line to stderr,
//!
//! ```text
//! vmm-reference: seccomp: thread 'vcpu0' made forbidden syscall 41 (socket); run with --no-seccomp to debug
//! ```
//!
//! restores the terminal if the VMM had put it in raw mode
//! ([`crate::terminal::restore_before_fatal_exit`]), and ends the process with
//! [`EXIT_SECCOMP_VIOLATION`] (4, the status of every VMM failure). The handler only uses
//! async-signal-safe operations: atomics, a thread-local copied at install time, a stack
//! buffer, `write(2)`, `tcsetattr` and `_exit`; every filter lets those through.
//!
//! Where the set of a thread is smaller than "whatever glibc and the Rust runtime do", the
//! difference is in the arguments: `ioctl` only with the KVM vCPU ioctls the run loop makes
//! ([`crate::sys::VCPU_THREAD_IOCTLS`]) or `TCGETS`/`TCSETS` on stdin, `mmap`/`mprotect`
//! never with `PROT_EXEC`, `tgkill` only with vcpu-runner's kick signal, `read` only from
//! stdin (except a profiled main thread's reads of `/proc/self`, opened read-only), and
//! `write` to stdout and stderr only on the threads that write nowhere else.
//!
//! ```
//! use vmm_reference::seccomp::{self, ThreadKind};
//!
//! for kind in ThreadKind::ALL {
//!     let program = seccomp::filter(kind).expect("every filter compiles");
//!     assert!(!program.is_empty());
//! }
//! ```

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::OnceLock;

use libc::{c_int, c_long, c_void};
use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

pub use crate::sys::EXIT_SECCOMP_VIOLATION;
use crate::sys::{SigsysInfo, VCPU_THREAD_IOCTLS};

/// The kinds of thread the VMM runs, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The thread that built the VM and then waits for its end, stops the vCPUs, restores
    /// the terminal and reports the outcome.
    Main,
    /// The main thread of a run with a boot profile (`--profile`): also opens files
    /// read-only and reads them, for the memory figures it takes from `/proc/self` when the
    /// run ends.
    ProfilingMain,
    /// A vCPU thread of vcpu-runner: `KVM_RUN` and the device models on the buses.
    Vcpu,
    /// The console writer: guest serial output to stdout.
    ConsoleOutput,
    /// The console reader: stdin to the UART's receive FIFO.
    ConsoleInput,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Main,
        ThreadKind::ProfilingMain,
        ThreadKind::Vcpu,
        ThreadKind::ConsoleOutput,
        ThreadKind::ConsoleInput,
    ];
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ThreadKind::Main => "main",
            ThreadKind::ProfilingMain => "profiling main",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::ConsoleOutput => "console output",
            ThreadKind::ConsoleInput => "console input",
        })
    }
}

/// Errors of building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// seccompiler refused the rules or could not compile them to BPF.
    #[error("cannot build the seccomp filter for a {kind} thread")]
    Compile {
        /// Whose filter.
        kind: ThreadKind,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// `sigaction(SIGSYS)` failed.
    #[error("cannot install the SIGSYS handler")]
    SigsysHandler(#[source] io::Error),
    /// `prctl(PR_SET_NO_NEW_PRIVS)` or `seccomp(SECCOMP_SET_MODE_FILTER)` failed.
    #[error("cannot install the seccomp filter for a {kind} thread")]
    Install {
        /// Whose filter.
        kind: ThreadKind,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The arguments a filter lets a syscall through with: any, or one of several alternatives,
/// each a list of `(argument index, value)` pairs that must all hold. Values are compared on
/// the argument's low 32 bits, which is all the kernel reads of an `int` file descriptor,
/// an `unsigned int` ioctl request or an `int` signal or protection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Args {
    /// Any arguments.
    Any,
    /// One of these alternatives.
    OneOf(Vec<Vec<(u8, u64)>>),
}

impl Args {
    fn merge(self, other: Args) -> Args {
        match (self, other) {
            (Args::OneOf(mut a), Args::OneOf(b)) => {
                for alternative in b {
                    if !a.contains(&alternative) {
                        a.push(alternative);
                    }
                }
                Args::OneOf(a)
            }
            _ => Args::Any,
        }
    }
}

/// `arg` equals one of `values`.
fn arg_in(arg: u8, values: impl IntoIterator<Item = u64>) -> Args {
    Args::OneOf(values.into_iter().map(|v| vec![(arg, v)]).collect())
}

const STDIN: u64 = libc::STDIN_FILENO as u64;
const STDOUT: u64 = libc::STDOUT_FILENO as u64;
const STDERR: u64 = libc::STDERR_FILENO as u64;

/// What every thread may do: wait on and wake locks, condition variables and channels
/// (`futex`, `sched_yield` in std's channel back-off), allocate and free (glibc malloc:
/// `brk`, `mmap` of reserved or read-write memory, `mprotect` to read-write when an arena
/// grows, `munmap`, `madvise`), read the clock where the vDSO falls back to the syscall, have
/// an interrupted wait restarted (`restart_syscall`), run
/// and return from the VMM's signal handlers (`rt_sigreturn`, `rt_sigprocmask` around
/// glibc's `pthread_kill`), end (`sigaltstack` and `munmap` of the Rust runtime's signal
/// stack, `exit`, `exit_group`), write to stderr (log lines, a panic message, the `SIGSYS`
/// report) and restore the terminal mode on stdin before a fatal exit (glibc's `tcsetattr`:
/// `ioctl(0, TCGETS)`, `ioctl(0, TCSETS)`, `ioctl(0, TCGETS)`).
fn common() -> Vec<(c_long, Args)> {
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    vec![
        (libc::SYS_futex, Args::Any),
        (libc::SYS_sched_yield, Args::Any),
        (libc::SYS_brk, Args::Any),
        (libc::SYS_mmap, arg_in(2, [libc::PROT_NONE as u64, rw])),
        (libc::SYS_mprotect, arg_in(2, [rw])),
        (libc::SYS_munmap, Args::Any),
        (libc::SYS_madvise, Args::Any),
        (libc::SYS_clock_gettime, Args::Any),
        (libc::SYS_rt_sigreturn, Args::Any),
        // The kernel restarts an interrupted sleep or timed futex wait through it (a
        // signal that stopped the process, or one another thread handled): found by a nested
        // boot test, SIGTERM while the console was blocked.
        (libc::SYS_restart_syscall, Args::Any),
        (libc::SYS_rt_sigprocmask, Args::Any),
        (libc::SYS_sigaltstack, Args::Any),
        (libc::SYS_exit, Args::Any),
        (libc::SYS_exit_group, Args::Any),
        (libc::SYS_write, arg_in(0, [STDERR])),
        (libc::SYS_ioctl, terminal_ioctls()),
    ]
}

/// `tcsetattr` and `tcgetattr` on stdin, which is where the VMM's raw-mode terminal is.
fn terminal_ioctls() -> Args {
    Args::OneOf(vec![
        vec![(0, STDIN), (1, libc::TCGETS)],
        vec![(0, STDIN), (1, libc::TCSETS)],
    ])
}

/// Closing a file descriptor: `close`, and the `fcntl(F_GETFD)` with which std checks,
/// in a build with debug assertions, that an `OwnedFd` it drops is open.
fn close() -> Vec<(c_long, Args)> {
    vec![
        (libc::SYS_close, Args::Any),
        (libc::SYS_fcntl, arg_in(1, [libc::F_GETFD as u64])),
    ]
}

/// Kicking a vCPU out of `KVM_RUN` (vcpu-runner's `pthread_kill` with the kick signal, which
/// glibc makes as `getpid` and `tgkill`): the main thread stops the vCPUs, and a vCPU whose
/// guest ended the VM stops the others.
fn kick() -> Vec<(c_long, Args)> {
    let signal = vcpu_runner::kick::kick_signal() as u64;
    vec![
        (libc::SYS_getpid, Args::Any),
        (libc::SYS_tgkill, arg_in(2, [signal])),
    ]
}

/// The syscalls a thread of `kind` may make once it is confined, with the arguments each may
/// take (see the module documentation for what each is for).
pub fn allowed_syscalls(kind: ThreadKind) -> BTreeMap<c_long, Args> {
    let own: Vec<(c_long, Args)> = match kind {
        // Waits for the VM's end, stops the vCPUs, drops the VM (guest memory, `kvm_run`
        // mappings, file descriptors), restores the terminal, prints the outcome and flushes
        // stdout on the way out.
        ThreadKind::Main => [
            kick(),
            close(),
            vec![(libc::SYS_write, arg_in(0, [STDOUT]))],
        ]
        .concat(),
        // `std::fs::read_to_string`: `openat(O_RDONLY | O_CLOEXEC)`, `statx` (or `fstat`)
        // and `lseek` for the size, `read`, `close`.
        ThreadKind::ProfilingMain => [
            allowed_syscalls(ThreadKind::Main).into_iter().collect(),
            vec![
                (
                    libc::SYS_openat,
                    arg_in(2, [(libc::O_RDONLY | libc::O_CLOEXEC) as u64]),
                ),
                (libc::SYS_statx, Args::Any),
                (libc::SYS_fstat, Args::Any),
                (libc::SYS_lseek, Args::Any),
                (libc::SYS_read, Args::Any),
            ],
        ]
        .concat(),
        // KVM_RUN and the register ioctls of sync-regs; the devices write to the serial
        // interrupt's eventfd and queue console output; a kick is consumed with
        // sigtimedwait; a vCPU thread left behind by a shutdown that timed out drops its
        // vCPU itself.
        ThreadKind::Vcpu => [
            kick(),
            close(),
            vec![
                (
                    libc::SYS_ioctl,
                    arg_in(1, VCPU_THREAD_IOCTLS.iter().map(|(_, nr)| *nr)),
                ),
                (libc::SYS_rt_sigtimedwait, Args::Any),
                (libc::SYS_write, Args::Any),
            ],
        ]
        .concat(),
        ThreadKind::ConsoleOutput => vec![(libc::SYS_write, arg_in(0, [STDOUT]))],
        // Reads stdin, signals the serial interrupt's eventfd, and sleeps while the receive
        // FIFO is full.
        ThreadKind::ConsoleInput => vec![
            (libc::SYS_read, arg_in(0, [STDIN])),
            (libc::SYS_write, Args::Any),
            (libc::SYS_clock_nanosleep, Args::Any),
            (libc::SYS_nanosleep, Args::Any),
        ],
    };
    let mut allowed = BTreeMap::new();
    for (nr, args) in common().into_iter().chain(own) {
        let merged = match allowed.remove(&nr) {
            Some(previous) => Args::merge(previous, args),
            None => args,
        };
        allowed.insert(nr, merged);
    }
    allowed
}

/// The BPF program for `kind`: [`allowed_syscalls`] allowed, everything else trapped.
///
/// # Errors
///
/// [`Error::Compile`] when seccompiler refuses a rule or the program is too long.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram> {
    let compile = |source| Error::Compile { kind, source };
    let mut rules = BTreeMap::new();
    for (nr, args) in allowed_syscalls(kind) {
        let chain = match args {
            Args::Any => Vec::new(),
            Args::OneOf(alternatives) => alternatives
                .into_iter()
                .map(|conditions| {
                    let conditions = conditions
                        .into_iter()
                        .map(|(arg, value)| {
                            SeccompCondition::new(
                                arg,
                                SeccompCmpArgLen::Dword,
                                SeccompCmpOp::Eq,
                                value,
                            )
                        })
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    SeccompRule::new(conditions)
                })
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(compile)?,
        };
        rules.insert(nr, chain);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(compile)?;
    BpfProgram::try_from(filter).map_err(compile)
}

/// The longest thread name Linux keeps (`TASK_COMM_LEN` 16, with the NUL).
const THREAD_NAME_LEN: usize = 15;

thread_local! {
    /// The confined thread's name for the `SIGSYS` report, NUL-padded. Const-initialized
    /// and without a destructor, so reading it in a signal handler is a plain TLS load.
    static THREAD_NAME: Cell<[u8; THREAD_NAME_LEN]> = const { Cell::new([0; THREAD_NAME_LEN]) };
}

/// Confines the calling thread to the filter of `kind` for the rest of its life: installs
/// the process's `SIGSYS` handler (once), keeps the thread's name for its report, and
/// applies the filter (`PR_SET_NO_NEW_PRIVS`, then `SECCOMP_SET_MODE_FILTER` without TSYNC:
/// only this thread, and the threads it spawns later, are affected).
///
/// # Errors
///
/// [`Error::Compile`], [`Error::SigsysHandler`] or [`Error::Install`].
pub fn confine_current_thread(kind: ThreadKind) -> Result<()> {
    let program = filter(kind)?;
    install_sigsys_handler()?;
    let mut name = [0u8; THREAD_NAME_LEN];
    let current = std::thread::current();
    let own = current.name().unwrap_or("unnamed").as_bytes();
    let len = own.len().min(THREAD_NAME_LEN);
    name[..len].copy_from_slice(&own[..len]);
    THREAD_NAME.with(|n| n.set(name));
    seccompiler::apply_filter(&program).map_err(|source| Error::Install { kind, source })
}

fn install_sigsys_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            // SAFETY: an all-zero sigaction is a valid starting value (empty mask, no flags).
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_forbidden_syscall
                as extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void)
                as usize;
            action.sa_flags = libc::SA_SIGINFO;
            // SAFETY: `action` is fully initialized and names a handler with the SA_SIGINFO
            // signature; the handler is async-signal-safe; a null old-action pointer is
            // allowed.
            if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
                return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            Ok(())
        })
        .map_err(|errno| Error::SigsysHandler(io::Error::from_raw_os_error(errno)))
}

/// A line built on the stack, for a signal handler: no allocation.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_decimal(&mut self, value: i64) {
        if value < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = value.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The report line for a forbidden `syscall` made by thread `name` (NUL-padded).
fn report(name: &[u8], syscall: i64) -> Line {
    let mut line = Line {
        buf: [0; 192],
        len: 0,
    };
    let name_len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    line.push(b"\nvmm-reference: seccomp: thread '");
    line.push(if name_len == 0 {
        b"unnamed"
    } else {
        &name[..name_len]
    });
    line.push(b"' made forbidden syscall ");
    line.push_decimal(syscall);
    if let Some(known) = syscall_name(syscall) {
        line.push(b" (");
        line.push(known.as_bytes());
        line.push(b")");
    }
    line.push(b"; run with --no-seccomp to debug\n");
    line
}

extern "C" fn on_forbidden_syscall(_signal: c_int, info: *mut libc::siginfo_t, _: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo_t (128 bytes) to an SA_SIGINFO handler; for a
    // SIGSYS its head has the layout of SigsysInfo, which is smaller.
    let syscall = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let name = THREAD_NAME
        .try_with(Cell::get)
        .unwrap_or([0; THREAD_NAME_LEN]);
    let line = report(&name, i64::from(syscall));
    // SAFETY: write(2) from a valid buffer of `line.len` bytes; async-signal-safe. Its result
    // is of no use: the process ends either way.
    unsafe { libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len) };
    crate::terminal::restore_before_fatal_exit();
    // SAFETY: _exit ends the process at once, without running anything of this one; it is
    // async-signal-safe.
    unsafe { libc::_exit(EXIT_SECCOMP_VIOLATION) };
}

/// The name of a syscall a VMM thread might plausibly stray into, for the report; `None` for
/// the rest (the report then gives only the number, see `ausyscall` or syscalls(2)).
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    const NAMES: [(c_long, &str); 44] = [
        (libc::SYS_read, "read"),
        (libc::SYS_write, "write"),
        (libc::SYS_open, "open"),
        (libc::SYS_close, "close"),
        (libc::SYS_stat, "stat"),
        (libc::SYS_fstat, "fstat"),
        (libc::SYS_lseek, "lseek"),
        (libc::SYS_mmap, "mmap"),
        (libc::SYS_mprotect, "mprotect"),
        (libc::SYS_munmap, "munmap"),
        (libc::SYS_brk, "brk"),
        (libc::SYS_rt_sigaction, "rt_sigaction"),
        (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
        (libc::SYS_ioctl, "ioctl"),
        (libc::SYS_pread64, "pread64"),
        (libc::SYS_writev, "writev"),
        (libc::SYS_access, "access"),
        (libc::SYS_pipe, "pipe"),
        (libc::SYS_madvise, "madvise"),
        (libc::SYS_dup, "dup"),
        (libc::SYS_nanosleep, "nanosleep"),
        (libc::SYS_getpid, "getpid"),
        (libc::SYS_socket, "socket"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_sendto, "sendto"),
        (libc::SYS_recvfrom, "recvfrom"),
        (libc::SYS_clone, "clone"),
        (libc::SYS_fork, "fork"),
        (libc::SYS_vfork, "vfork"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_kill, "kill"),
        (libc::SYS_uname, "uname"),
        (libc::SYS_fcntl, "fcntl"),
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_prctl, "prctl"),
        (libc::SYS_gettid, "gettid"),
        (libc::SYS_tgkill, "tgkill"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_statx, "statx"),
        (libc::SYS_getrandom, "getrandom"),
        (libc::SYS_eventfd2, "eventfd2"),
        (libc::SYS_epoll_wait, "epoll_wait"),
        (libc::SYS_clone3, "clone3"),
        (libc::SYS_seccomp, "seccomp"),
    ];
    NAMES.iter().find(|(n, _)| *n == nr).map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_traps_by_default() {
        for kind in ThreadKind::ALL {
            let program = filter(kind).unwrap();
            // seccompiler's program ends with the mismatch action: SECCOMP_RET_TRAP.
            let last = program.last().unwrap();
            assert_eq!(last.k, libc::SECCOMP_RET_TRAP, "{kind}");
            assert!(
                program.len() < 4096,
                "{kind}: {} instructions",
                program.len()
            );
        }
    }

    #[test]
    fn every_thread_can_report_and_exit() {
        for kind in ThreadKind::ALL {
            let allowed = allowed_syscalls(kind);
            for nr in [
                libc::SYS_write,
                libc::SYS_exit_group,
                libc::SYS_ioctl,
                libc::SYS_rt_sigreturn,
                libc::SYS_futex,
            ] {
                assert!(allowed.contains_key(&nr), "{kind}: {nr}");
            }
            // The report goes to stderr and the terminal restore is TCSETS on stdin.
            match &allowed[&libc::SYS_write] {
                Args::Any => {}
                Args::OneOf(alternatives) => {
                    assert!(alternatives.contains(&vec![(0, STDERR)]), "{kind}")
                }
            }
            let Args::OneOf(ioctls) = &allowed[&libc::SYS_ioctl] else {
                panic!("{kind}: ioctl unrestricted");
            };
            for request in [libc::TCGETS, libc::TCSETS] {
                assert!(ioctls.contains(&vec![(0, STDIN), (1, request)]), "{kind}");
            }
            let opens = usize::from(kind == ThreadKind::ProfilingMain);
            assert_eq!(
                allowed.get(&libc::SYS_openat).map_or(0, |_| 1),
                opens,
                "{kind}"
            );
            for forbidden in [
                libc::SYS_socket,
                libc::SYS_open,
                libc::SYS_execve,
                libc::SYS_clone,
                libc::SYS_clone3,
            ] {
                assert!(!allowed.contains_key(&forbidden), "{kind}: {forbidden}");
            }
        }
    }

    #[test]
    fn vcpu_threads_get_only_their_kvm_ioctls() {
        let allowed = allowed_syscalls(ThreadKind::Vcpu);
        let Args::OneOf(ioctls) = &allowed[&libc::SYS_ioctl] else {
            panic!("ioctl unrestricted");
        };
        let requests: Vec<u64> = ioctls
            .iter()
            .filter(|a| a.len() == 1)
            .map(|a| a[0].1)
            .collect();
        // The numbers of include/uapi/linux/kvm.h on x86_64.
        assert_eq!(
            requests,
            vec![
                0xae80,
                0x8090_ae81,
                0x4090_ae82,
                0x8138_ae83,
                0x4138_ae84,
                0x8004_ae98,
                0x8040_ae9f,
                0x4040_aea0
            ]
        );
        assert_eq!(VCPU_THREAD_IOCTLS[0].0, "KVM_RUN");
        // No KVM ioctl on the other threads.
        for kind in [
            ThreadKind::Main,
            ThreadKind::ProfilingMain,
            ThreadKind::ConsoleOutput,
            ThreadKind::ConsoleInput,
        ] {
            assert_eq!(
                allowed_syscalls(kind)[&libc::SYS_ioctl],
                terminal_ioctls(),
                "{kind}"
            );
        }
        let Args::OneOf(kicks) = &allowed[&libc::SYS_tgkill] else {
            panic!("tgkill unrestricted");
        };
        assert_eq!(
            kicks,
            &vec![vec![(2, vcpu_runner::kick::kick_signal() as u64)]]
        );
    }

    #[test]
    fn memory_is_never_made_executable() {
        for kind in ThreadKind::ALL {
            let allowed = allowed_syscalls(kind);
            for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
                let Args::OneOf(alternatives) = &allowed[&nr] else {
                    panic!("{kind}: {nr} unrestricted");
                };
                for a in alternatives {
                    assert_eq!(a.len(), 1);
                    assert_eq!(a[0].0, 2);
                    assert_eq!(a[0].1 & libc::PROT_EXEC as u64, 0, "{kind}: {nr}");
                }
            }
        }
    }

    #[test]
    fn report_line() {
        let mut name = [0u8; THREAD_NAME_LEN];
        name[..5].copy_from_slice(b"vcpu0");
        let line = report(&name, libc::SYS_socket);
        assert_eq!(
            std::str::from_utf8(&line.buf[..line.len]).unwrap(),
            "\nvmm-reference: seccomp: thread 'vcpu0' made forbidden syscall 41 (socket); \
             run with --no-seccomp to debug\n"
        );
        let line = report(&[0; THREAD_NAME_LEN], 1000);
        assert_eq!(
            std::str::from_utf8(&line.buf[..line.len]).unwrap(),
            "\nvmm-reference: seccomp: thread 'unnamed' made forbidden syscall 1000; \
             run with --no-seccomp to debug\n"
        );
        assert_eq!(syscall_name(libc::SYS_openat), Some("openat"));
        assert_eq!(syscall_name(-1), None);
    }

    #[test]
    fn merging_keeps_every_alternative_and_any_wins() {
        let a = arg_in(0, [1]).merge(arg_in(0, [2, 1]));
        assert_eq!(a, Args::OneOf(vec![vec![(0, 1)], vec![(0, 2)]]));
        assert_eq!(a.merge(Args::Any), Args::Any);
        let Args::OneOf(writes) = &allowed_syscalls(ThreadKind::Main)[&libc::SYS_write] else {
            panic!("write unrestricted on the main thread");
        };
        assert_eq!(writes, &vec![vec![(0, STDERR)], vec![(0, STDOUT)]]);
    }
}
