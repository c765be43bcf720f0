//! The per-thread seccomp filters, each in a child process (this test binary run again with
//! `VMMREF_SECCOMP_SCENARIO` naming what the child does): a forbidden syscall ends the child
//! with status 4 and the one-line report, after restoring a raw terminal; and each thread's
//! code runs to its end under its own filter (console writer, console reader, the main
//! thread's work after a run). No KVM is needed for those; one more test runs a tiny guest
//! on two confined vCPU threads (one halts after writing to the UART, the other spins until
//! the confined main thread kicks it to stop) and is skipped with the reason where
//! `/dev/kvm` is unusable.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::Kvm;
use kvm_test_support::guest::{TinyGuest, CODE_ADDR};
use kvm_test_support::{harness, KvmTest, TestError, TestResult};
use libtest_mimic::{Failed, Trial};
use sync_regs::RegisterCache;
use vcpu_runner::{BusDevice, Buses, NoMsrs, StopReason, Vcpu, VmRunner};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vm_types::VmType;
use vmm_reference::devices::serial::{forward_input, ConsoleOutput, SerialConsole};
use vmm_reference::profile::BootProfile;
use vmm_reference::seccomp::{self, ThreadKind, EXIT_SECCOMP_VIOLATION};
use vmm_reference::sys::{COM1_PORT, UART_REGISTERS};
use vmm_reference::terminal::RawTerminal;
use vmm_sys_util::eventfd::EventFd;

const SCENARIO: &str = "VMMREF_SECCOMP_SCENARIO";
const GUEST_TEXT: &str = "guest console line through the confined writer\n";
const INPUT_BYTES: usize = 200;
const WAIT: Duration = Duration::from_secs(10);

/// UART registers the console-input scenario programs (16550 data sheet).
const THR: u64 = 0;
const IER: u64 = 1;
const MCR: u64 = 4;
const LSR: u64 = 5;
const IER_RDI: u8 = 0x01;
const MCR_OUT2: u8 = 0x08;
const LSR_DATA_READY: u8 = 0x01;

fn kind_named(name: &str) -> ThreadKind {
    match name {
        "main" => ThreadKind::Main,
        "profiling-main" => ThreadKind::ProfilingMain,
        "vcpu" => ThreadKind::Vcpu,
        "console-out" => ThreadKind::ConsoleOutput,
        "console-in" => ThreadKind::ConsoleInput,
        other => panic!("unknown thread kind {other}"),
    }
}

/// Runs `body` on a thread named `name` confined as `kind`, and waits for it.
fn on_confined_thread(name: &str, kind: ThreadKind, body: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            seccomp::confine_current_thread(kind).expect("confine");
            body();
        })
        .expect("spawn")
        .join()
        .expect("join");
}

/// What a child does; returns only where the scenario expects the child to live on.
fn child(scenario: &str) {
    // As the binary does: log lines go to stderr from whichever thread logs.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let parts: Vec<&str> = scenario.split(':').collect();
    match parts.as_slice() {
        // A thread of `kind` named `name` opens a socket: trapped.
        ["socket", kind, name] => on_confined_thread(name, kind_named(kind), || {
            // SAFETY: socket(2) with constant arguments; the filter traps it.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            eprintln!("socket was allowed: {fd}");
        }),
        // Each thread kind waits on a condition variable with a timeout (a futex wait with
        // an absolute deadline) while the parent stops and continues the process: the kernel
        // resumes the wait through restart_syscall, which every filter allows.
        ["restarted-wait", kind] => on_confined_thread("waiter", kind_named(kind), || {
            let pair = (Mutex::new(false), std::sync::Condvar::new());
            let guard = pair.0.lock().expect("lock");
            eprintln!("waiting");
            let (_guard, timeout) = pair
                .1
                .wait_timeout_while(guard, Duration::from_millis(1500), |done| !*done)
                .expect("wait");
            eprintln!("wait ended (timed out: {})", timeout.timed_out());
        }),
        // A vCPU thread makes an ioctl that is not one of its KVM ioctls: trapped.
        ["fionread-on-vcpu"] => on_confined_thread("vcpu1", ThreadKind::Vcpu, || {
            let mut pending: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int into `pending`; the filter traps it.
            let rc = unsafe { libc::ioctl(0, libc::FIONREAD, &mut pending) };
            eprintln!("FIONREAD was allowed: {rc}");
        }),
        // The console writer maps executable memory: trapped by the argument check.
        ["exec-mmap"] => on_confined_thread("console-out", ThreadKind::ConsoleOutput, || {
            // SAFETY: an anonymous mapping that nothing uses; the filter traps it.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            eprintln!("PROT_EXEC mapping was allowed: {p:?}");
        }),
        // Stdin is a terminal: raw mode, then a forbidden syscall; the handler restores it.
        ["raw-terminal"] => {
            let terminal = RawTerminal::enter_if_tty(libc::STDIN_FILENO)
                .expect("raw mode")
                .expect("stdin is a terminal");
            on_confined_thread("vcpu0", ThreadKind::Vcpu, || {
                // SAFETY: an all-zero utsname is a valid buffer for uname to fill.
                let mut u: libc::utsname = unsafe { std::mem::zeroed() };
                // SAFETY: `u` is a valid utsname buffer.
                let rc = unsafe { libc::uname(&mut u) };
                eprintln!("uname was allowed: {rc}");
            });
            drop(terminal);
        }
        // Guest output through the confined console writer to stdout, drained; then the
        // child exits normally.
        ["console-out"] => {
            let (console, mut writer) =
                ConsoleOutput::spawn(Box::new(io::stdout()), true).expect("spawn");
            for _ in 0..2000 {
                writer.write_all(GUEST_TEXT.as_bytes()).expect("queue");
            }
            assert!(console.drain(Duration::from_millis(5), || false));
        }
        // The same with a stdout whose reader went away: the writer gets EPIPE, and its
        // thread ends under its filter.
        ["console-out-epipe"] => {
            let (console, mut writer) =
                ConsoleOutput::spawn(Box::new(io::stdout()), true).expect("spawn");
            writer.write_all(GUEST_TEXT.as_bytes()).expect("queue");
            assert!(console.drain(Duration::from_millis(5), || false));
            // Room for the thread to return and exit (a trap there ends the child with 4).
            std::thread::sleep(Duration::from_millis(300));
            eprintln!("writer thread gone");
        }
        // Stdin to a listening UART through the confined reader, to end of input.
        ["console-in"] => {
            let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            let serial = Arc::new(Mutex::new(SerialConsole::new(
                irq.try_clone().expect("eventfd clone"),
                Box::new(io::sink()),
            )));
            {
                let mut s = serial.lock().expect("lock");
                s.write(IER, &[IER_RDI]);
                s.write(MCR, &[MCR_OUT2]);
            }
            let reader = forward_input(serial.clone(), io::stdin(), true).expect("spawn");
            let mut got = Vec::new();
            while got.len() < INPUT_BYTES {
                let mut s = serial.lock().expect("lock");
                let mut lsr = [0u8];
                s.read(LSR, &mut lsr);
                if lsr[0] & LSR_DATA_READY != 0 {
                    let mut d = [0u8];
                    s.read(THR, &mut d);
                    got.push(d[0]);
                } else {
                    drop(s);
                    // Slower than the reader: its FIFO fills and it backs off.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            reader.join().expect("reader thread");
            assert!(irq.read().expect("irq count") >= 1);
            println!("{}", String::from_utf8_lossy(&got));
        }
        // The main thread's work after a run, confined: join a thread, free a large
        // allocation, close an eventfd, restore the terminal when stdin is one, report on
        // stderr and stdout, exit.
        ["main"] => {
            let terminal = RawTerminal::enter_if_tty(libc::STDIN_FILENO).expect("raw mode");
            let worker = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(50)));
            let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            seccomp::confine_current_thread(ThreadKind::Main).expect("confine");
            let big = vec![7u8; 64 << 20];
            assert_eq!(big[big.len() - 1], 7);
            drop(big);
            drop(irq);
            worker.join().expect("join");
            log::warn!("a log line from the confined main thread");
            if let Some(mut t) = terminal {
                t.restore().expect("restore the terminal");
                println!("terminal restored");
            }
            eprintln!("\nvmm-reference: guest powered off");
            println!("main done");
        }
        // A profiled run's end on its main thread: the boot profile reads /proc/self/smaps
        // and /proc/self/status, then is printed.
        ["profiling-main"] => {
            let profile = BootProfile::new(std::time::Instant::now());
            let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)])
                .expect("guest memory");
            seccomp::confine_current_thread(ThreadKind::ProfilingMain).expect("confine");
            profile.finish(None, &memory);
            match profile.memory() {
                Some(Ok(_)) => println!("memory split taken"),
                Some(Err(e)) => panic!("{e}"),
                None => panic!("no memory split"),
            }
            eprint!("{profile}");
        }
        ["vcpu-guest"] => vcpu_guest(),
        other => panic!("unknown scenario {other:?}"),
    }
}

/// Two vCPUs of a tiny long-mode guest on confined threads, with the UART on the bus and its
/// output through the confined console writer; the main thread is confined too. vCPU 0
/// enables the UART's transmit interrupt (an eventfd write) and writes "ok\n", then halts;
/// vCPU 1 spins until the main thread stops it (a kick: `tgkill`, `KVM_RUN` interrupted,
/// `rt_sigtimedwait`). Every thread then ends under its filter.
fn vcpu_guest() {
    let code = [
        0x66, 0xba, 0xf9, 0x03, // mov dx, 0x3f9 (IER)
        0xb0, 0x02, // mov al, 2 (transmit holding register empty interrupt)
        0xee, // out dx, al
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8 (THR)
        0xb0, b'o', 0xee, // mov al, 'o' ; out dx, al
        0xb0, b'k', 0xee, // mov al, 'k' ; out dx, al
        0xb0, b'\n', 0xee, // mov al, '\n' ; out dx, al
        0xf4, // hlt
    ];
    let spin_at = CODE_ADDR + 0x100;
    let kvm = Kvm::new().expect("/dev/kvm");
    let guest = TinyGuest::long_mode(&kvm, &code).expect("tiny guest");
    let TinyGuest { vm, vcpu, mem, .. } = guest;
    mem.write_slice(&[0xeb, 0xfe], GuestAddress(spin_at)) // jmp $
        .expect("spin code");
    let spinner = vm.create_vcpu(1).expect("vCPU 1");
    spinner
        .set_sregs(&vcpu.get_sregs().expect("sregs"))
        .expect("vCPU 1 sregs");
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rip = spin_at;
    regs.rsp -= 0x800;
    spinner.set_regs(&regs).expect("vCPU 1 regs");

    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let (console, writer) = ConsoleOutput::spawn(Box::new(io::stdout()), true).expect("spawn");
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        irq.try_clone().expect("eventfd clone"),
        Box::new(writer),
    )));
    let mut buses = Buses::new();
    buses
        .pio
        .insert(COM1_PORT, UART_REGISTERS, serial)
        .expect("COM1 on the bus");
    let buses = Arc::new(buses);
    let vcpus = vec![
        Vcpu::new(
            0,
            vcpu,
            RegisterCache::new(&vm, VmType::Default),
            buses.clone(),
            Box::new(NoMsrs),
        ),
        Vcpu::new(
            1,
            spinner,
            RegisterCache::new(&vm, VmType::Default),
            buses,
            Box::new(NoMsrs),
        ),
    ];
    let runner = VmRunner::spawn(vcpus).expect("vCPU threads");
    let handles = runner.handles();
    for handle in &handles {
        handle
            .run_on_vcpu(|_| seccomp::confine_current_thread(ThreadKind::Vcpu), WAIT)
            .expect("closure on the vCPU thread")
            .expect("confine the vCPU thread");
    }
    // The VMM's main thread never reads the eventfd (KVM does, through irqfd): a thread
    // started before the main thread is confined reads it for the check.
    let (go, wait_for_go) = std::sync::mpsc::channel::<()>();
    let irq_count = std::thread::spawn(move || {
        let _ = wait_for_go.recv();
        irq.read()
    });
    seccomp::confine_current_thread(ThreadKind::Main).expect("confine the main thread");
    runner.start().expect("start");
    let halted = handles[0].wait_exited(WAIT).expect("vCPU 0 ends");
    assert_eq!(halted, StopReason::Halted);
    let outcome = runner.shutdown(WAIT).expect("shutdown");
    assert!(console.drain(Duration::from_millis(5), || false));
    go.send(()).expect("irq reader");
    let raised = irq_count.join().expect("irq reader").expect("irq count");
    assert!(raised >= 1, "no interrupt raised");
    println!("outcome: {outcome}");
    drop(vm);
    drop(mem);
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl From<std::process::Output> for Output {
    fn from(out: std::process::Output) -> Self {
        Output {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

fn spawn_child(scenario: &str, stdin: Stdio) -> io::Result<std::process::Child> {
    Command::new(std::env::current_exe()?)
        .env(SCENARIO, scenario)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

fn run_child(scenario: &str, stdin: Stdio) -> Result<Output, Failed> {
    let out = spawn_child(scenario, stdin)
        .and_then(|c| c.wait_with_output())
        .map_err(|e| format!("child {scenario}: {e}"))?;
    Ok(out.into())
}

fn expect_report(out: &Output, thread: &str, syscall: &str) -> Result<(), Failed> {
    let line = format!(
        "vmm-reference: seccomp: thread '{thread}' made forbidden syscall {syscall}; \
         run with --no-seccomp to debug"
    );
    if out.status.code() != Some(EXIT_SECCOMP_VIOLATION) {
        return Err(format!(
            "status {:?}, expected {EXIT_SECCOMP_VIOLATION}; stderr:\n{}",
            out.status, out.stderr
        )
        .into());
    }
    if !out.stderr.lines().any(|l| l == line) {
        return Err(format!("no line {line:?} in stderr:\n{}", out.stderr).into());
    }
    if out.stderr.contains("was allowed") {
        return Err(format!("the syscall went through:\n{}", out.stderr).into());
    }
    Ok(())
}

fn expect_success(out: &Output) -> Result<(), Failed> {
    if !out.status.success() {
        return Err(format!("status {:?}; stderr:\n{}", out.status, out.stderr).into());
    }
    Ok(())
}

/// A pseudo-terminal: (master, slave).
fn pty() -> Result<(OwnedFd, OwnedFd), Failed> {
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
    if rc != 0 {
        return Err(format!("openpty: {}", io::Error::last_os_error()).into());
    }
    // SAFETY: both fds were just opened by openpty and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) })
}

fn local_flags(fd: &OwnedFd) -> Result<libc::tcflag_t, Failed> {
    // SAFETY: an all-zero termios is a valid buffer for tcgetattr to fill.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open terminal and `t` a valid buffer.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) } != 0 {
        return Err(format!("tcgetattr: {}", io::Error::last_os_error()).into());
    }
    Ok(t.c_lflag)
}

fn tests() -> Vec<Trial> {
    let mut trials = Vec::new();
    for (kind, name) in [
        ("main", "main"),
        ("profiling-main", "main"),
        ("vcpu", "vcpu0"),
        ("console-out", "console-out"),
        ("console-in", "serial-input"),
    ] {
        trials.push(Trial::test(
            format!("forbidden_socket_on_{kind}_thread_ends_with_the_report"),
            move || {
                let out = run_child(&format!("socket:{kind}:{name}"), Stdio::null())?;
                expect_report(&out, name, "41 (socket)")
            },
        ));
    }
    trials.push(Trial::test(
        "vcpu_thread_ioctl_other_than_its_kvm_ioctls_is_forbidden",
        || {
            let out = run_child("fionread-on-vcpu", Stdio::null())?;
            expect_report(&out, "vcpu1", "16 (ioctl)")
        },
    ));
    trials.push(Trial::test("executable_mapping_is_forbidden", || {
        let out = run_child("exec-mmap", Stdio::null())?;
        expect_report(&out, "console-out", "9 (mmap)")
    }));
    trials.push(Trial::test(
        "forbidden_syscall_restores_the_raw_terminal",
        || {
            let (_master, slave) = pty()?;
            let before = local_flags(&slave)?;
            if before & libc::ICANON == 0 {
                return Err("a new pty should start in canonical mode".into());
            }
            let stdin = Stdio::from(slave.try_clone().map_err(|e| e.to_string())?);
            let out = run_child("raw-terminal", stdin)?;
            expect_report(&out, "vcpu0", "63 (uname)")?;
            let after = local_flags(&slave)?;
            if after != before {
                return Err(
                    format!("terminal left with c_lflag {after:#x}, was {before:#x}").into(),
                );
            }
            Ok(())
        },
    ));
    trials.push(Trial::test("console_writer_runs_under_its_filter", || {
        let out = run_child("console-out", Stdio::null())?;
        expect_success(&out)?;
        let expected = GUEST_TEXT.repeat(2000);
        if out.stdout != expected {
            return Err(format!(
                "stdout has {} bytes, expected {}",
                out.stdout.len(),
                expected.len()
            )
            .into());
        }
        Ok(())
    }));
    trials.push(Trial::test(
        "console_writer_ends_under_its_filter_after_epipe",
        || {
            let mut child =
                spawn_child("console-out-epipe", Stdio::null()).map_err(|e| e.to_string())?;
            drop(child.stdout.take());
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                e.read_to_string(&mut stderr).map_err(|e| e.to_string())?;
            }
            let status = child.wait().map_err(|e| e.to_string())?;
            let out = Output {
                status,
                stdout: String::new(),
                stderr,
            };
            expect_success(&out)?;
            if !out.stderr.contains("writer thread gone") {
                return Err(format!("child did not finish:\n{}", out.stderr).into());
            }
            Ok(())
        },
    ));
    for kind in ["main", "vcpu", "console-out", "console-in"] {
        trials.push(Trial::test(
            format!("a_stopped_and_continued_wait_restarts_under_the_{kind}_filter"),
            move || {
                let child = spawn_child(&format!("restarted-wait:{kind}"), Stdio::null())
                    .map_err(|e| e.to_string())?;
                // Let it reach the wait, then stop and continue it in the middle.
                std::thread::sleep(Duration::from_millis(500));
                let pid = child.id() as libc::pid_t;
                // SAFETY: kill(2) on our own child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                std::thread::sleep(Duration::from_millis(200));
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                let out = child.wait_with_output().map_err(|e| e.to_string())?;
                let out = Output::from(out);
                expect_success(&out)?;
                if !out.stderr.contains("wait ended") {
                    return Err(format!("the wait never ended:\n{}", out.stderr).into());
                }
                Ok(())
            },
        ));
    }
    trials.push(Trial::test("console_reader_runs_under_its_filter", || {
        let mut child = spawn_child("console-in", Stdio::piped()).map_err(|e| e.to_string())?;
        let input: Vec<u8> = (0..INPUT_BYTES).map(|i| b'a' + (i % 26) as u8).collect();
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&input).map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let out = Output::from(out);
        expect_success(&out)?;
        if out.stdout.trim_end() != String::from_utf8_lossy(&input) {
            return Err(format!("the UART got {:?}", out.stdout).into());
        }
        Ok(())
    }));
    trials.push(Trial::test(
        "main_thread_ends_a_run_under_its_filter",
        || {
            let out = run_child("main", Stdio::null())?;
            expect_success(&out)?;
            if out.stdout != "main done\n"
                || !out.stderr.contains("guest powered off")
                || !out
                    .stderr
                    .contains("a log line from the confined main thread")
            {
                return Err(format!("stdout {:?}, stderr {:?}", out.stdout, out.stderr).into());
            }
            Ok(())
        },
    ));
    trials.push(Trial::test(
        "main_thread_restores_the_terminal_under_its_filter",
        || {
            let (_master, slave) = pty()?;
            let before = local_flags(&slave)?;
            let stdin = Stdio::from(slave.try_clone().map_err(|e| e.to_string())?);
            let out = run_child("main", stdin)?;
            expect_success(&out)?;
            if out.stdout != "terminal restored\nmain done\n" {
                return Err(format!("stdout {:?}, stderr {:?}", out.stdout, out.stderr).into());
            }
            let after = local_flags(&slave)?;
            if after != before {
                return Err(
                    format!("terminal left with c_lflag {after:#x}, was {before:#x}").into(),
                );
            }
            Ok(())
        },
    ));
    trials.push(Trial::test(
        "profiled_main_thread_reads_its_memory_figures_under_its_filter",
        || {
            let out = run_child("profiling-main", Stdio::null())?;
            expect_success(&out)?;
            if out.stdout != "memory split taken\n" {
                return Err(format!("stdout {:?}, stderr {:?}", out.stdout, out.stderr).into());
            }
            Ok(())
        },
    ));
    trials.extend(harness::trials(vec![KvmTest::new(
        "vcpu_threads_run_a_guest_under_their_filter",
        vcpu_threads_run_a_guest,
    )]));
    trials
}

fn vcpu_threads_run_a_guest(_kvm: &Kvm) -> TestResult {
    let out = run_child("vcpu-guest", Stdio::null())
        .map_err(|e| TestError::fail(e.message().map_or("child failed".into(), str::to_owned)))?;
    if !out.status.success() || !out.stdout.starts_with("ok\nout") {
        return Err(TestError::fail(format!(
            "status {:?}, stdout {:?}, stderr:\n{}",
            out.status, out.stdout, out.stderr
        )));
    }
    Ok(())
}

fn main() {
    if let Ok(scenario) = std::env::var(SCENARIO) {
        child(&scenario);
        return;
    }
    harness::run(tests());
}
