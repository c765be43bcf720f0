//! COM1: vm-superio's 16550 UART at 0x3f8. Its interrupt line is an `EventFd` registered with
//! `KVM_IRQFD` on GSI 4, so raising the IRQ never leaves the kernel's irqchip path.
//!
//! Guest output goes through a [`ConsoleOutput`]: a bounded queue that a thread of its own
//! writes to the host (stdout), so that a host console that blocks (a full pipe nobody reads)
//! holds back the guest only while the VM runs, and never the VMM's exit, and a closed one
//! (EPIPE) ends the output quietly while the guest runs on.
//!
//! Host input reaches the receive FIFO through [`forward_input`], and only while the guest's
//! driver listens: receive-data interrupt enabled, `OUT2` (the PC's interrupt gate) raised by
//! the guest, not in loopback. Linux's 8250 driver reads the receive register while it probes
//! the port (`autoconfig`, which also sets IER to 0x0f for a moment, before any `OUT2`) and
//! while it starts it (`serial8250_do_startup`: raises `OUT2`, then reads it twice), and
//! enables the receive interrupt only afterwards (from `set_termios`); input queued earlier
//! would lose a byte to each of those reads.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vcpu_runner::BusDevice;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{self, ThreadKind};

/// How long the input thread waits for the guest to drain a full receive FIFO.
const FIFO_FULL_BACKOFF: Duration = Duration::from_millis(5);
/// How much guest output may wait for the host console before the guest is held back.
const OUTPUT_QUEUE_BYTES: usize = 64 * 1024;
/// How long the writer thread lets guest output gather once the first byte woke it, so that
/// a console written byte by byte costs one write and one wake-up per batch, not per byte.
/// Short enough to be invisible in an interactive shell's echo.
const OUTPUT_COALESCE: Duration = Duration::from_millis(2);
/// UART register offsets and bits this module looks at (16550 data sheet).
const IER: u64 = 1;
const LCR: u64 = 3;
const MCR: u64 = 4;
const IER_RDI: u8 = 0x01;
const LCR_DLAB: u8 = 0x80;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;

/// Errors of starting a console thread.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The thread could not be spawned.
    #[error("cannot spawn thread '{thread}'")]
    Spawn {
        /// The thread's name.
        thread: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The thread could not confine itself with its seccomp filter.
    #[error("thread '{thread}' cannot confine itself")]
    Seccomp {
        /// The thread's name.
        thread: &'static str,
        /// Why.
        #[source]
        source: seccomp::Error,
    },
}

/// Spawns thread `name` running `body`; with `confine`, the thread first installs the seccomp
/// filter of `kind` ([`seccomp::confine_current_thread`]) and `body` runs under it. Returns
/// once the thread is confined (or has failed to be).
fn spawn_console_thread(
    name: &'static str,
    kind: ThreadKind,
    confine: bool,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, Error> {
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let handle = thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let confined = if confine {
                seccomp::confine_current_thread(kind)
            } else {
                Ok(())
            };
            let failed = confined.is_err();
            let _ = ready_tx.send(confined);
            if !failed {
                body();
            }
        })
        .map_err(|source| Error::Spawn {
            thread: name,
            source,
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(source)) => Err(Error::Seccomp {
            thread: name,
            source,
        }),
        // The thread ended without a word: only a panic does that.
        Err(_) => Err(Error::Spawn {
            thread: name,
            source: io::Error::other("the thread panicked while starting"),
        }),
    }
}

/// Raises the UART's interrupt by signalling an eventfd bound to a GSI with irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// A trigger writing to `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A writer that flushes after every write, so that guest output appears at once.
pub struct Flushing<W: Write>(pub W);

impl<W: Write> Write for Flushing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Where guest output goes.
pub type ConsoleOut = Box<dyn Write + Send>;

#[derive(Debug, Default)]
struct OutputState {
    queue: VecDeque<u8>,
    /// The writer thread holds bytes it took from the queue and has not written yet.
    writing: bool,
    /// The host console failed (EPIPE or another error): output is discarded.
    closed: bool,
    /// The VM is being stopped: writes no longer wait for room.
    stopping: bool,
}

#[derive(Debug, Default)]
struct OutputShared {
    state: Mutex<OutputState>,
    /// Signalled when bytes arrive or the VM stops (writer thread waits on it).
    data: Condvar,
    /// Signalled when room is made or output ends (vCPUs wait on it).
    room: Condvar,
    /// When the guest wrote its first byte.
    first_byte: OnceLock<Instant>,
}

impl OutputShared {
    fn lock(&self) -> MutexGuard<'_, OutputState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The host side of the guest console output: the queue and its writer thread.
#[derive(Debug, Clone)]
pub struct ConsoleOutput(Arc<OutputShared>);

/// The guest side: a writer for the UART that queues bytes for the writer thread.
#[derive(Debug)]
pub struct QueuedWriter(Arc<OutputShared>);

impl Write for QueuedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.first_byte.get().is_none() && !buf.is_empty() {
            let _ = self.0.first_byte.set(Instant::now());
        }
        let mut st = self.0.lock();
        loop {
            if st.closed {
                return Ok(buf.len());
            }
            if st.stopping || st.queue.len() < OUTPUT_QUEUE_BYTES {
                // Only an idle writer thread needs waking: a busy one looks at the queue
                // again before it waits. A guest console writes byte by byte, so this spares
                // the vCPU a wake-up (and the host a context switch) per byte.
                let idle = st.queue.is_empty() && !st.writing;
                st.queue.extend(buf);
                if idle {
                    self.0.data.notify_one();
                }
                return Ok(buf.len());
            }
            st = self.0.room.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ConsoleOutput {
    /// Starts the writer thread `console-out` for `out`; the returned writer is what the
    /// UART writes to. With `confine`, the thread runs under the console-output seccomp
    /// filter, which lets it write only to stdout and stderr: `out` must be one of those.
    ///
    /// # Errors
    ///
    /// [`Error::Spawn`], or [`Error::Seccomp`] when the thread cannot install its filter.
    pub fn spawn(mut out: ConsoleOut, confine: bool) -> Result<(Self, QueuedWriter), Error> {
        let shared = Arc::new(OutputShared::default());
        let thread_shared = shared.clone();
        spawn_console_thread(
            "console-out",
            ThreadKind::ConsoleOutput,
            confine,
            move || {
                let shared = thread_shared;
                loop {
                    let bytes: Vec<u8> = {
                        let mut st = shared.lock();
                        while st.queue.is_empty() {
                            st = shared.data.wait(st).unwrap_or_else(|p| p.into_inner());
                        }
                        st.writing = true;
                        if !st.stopping && st.queue.len() < OUTPUT_QUEUE_BYTES / 2 {
                            // Let the bytes that follow gather (`writing` keeps the vCPUs
                            // from waking this thread meanwhile): one write per batch.
                            st = shared
                                .data
                                .wait_timeout(st, OUTPUT_COALESCE)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                        st.queue.drain(..).collect()
                    };
                    shared.room.notify_all();
                    let result = out.write_all(&bytes).and_then(|()| out.flush());
                    let mut st = shared.lock();
                    st.writing = false;
                    shared.room.notify_all();
                    if let Err(e) = result {
                        // EPIPE (a reader that went away, `| head`) or another error: the
                        // guest keeps running, its output goes nowhere from here on.
                        log::info!("console output ended ({e}); guest output is discarded");
                        st.closed = true;
                        st.queue.clear();
                        shared.room.notify_all();
                        return;
                    }
                }
            },
        )?;
        Ok((ConsoleOutput(shared.clone()), QueuedWriter(shared)))
    }

    /// When the guest wrote its first console byte, if it did.
    pub fn first_byte(&self) -> Option<Instant> {
        self.0.first_byte.get().copied()
    }

    /// Lets every pending and later write through without waiting for room, so that no vCPU
    /// stays blocked on a console that does not drain while the VM is being stopped.
    pub fn stop_waiting(&self) {
        self.0.lock().stopping = true;
        self.0.room.notify_all();
    }

    /// Waits until everything queued was written (or the console closed), or `give_up` says
    /// to stop waiting (checked every `poll`). Returns whether it all went out.
    pub fn drain(&self, poll: Duration, give_up: impl Fn() -> bool) -> bool {
        let mut st = self.0.lock();
        loop {
            if st.closed || (st.queue.is_empty() && !st.writing) {
                return true;
            }
            if give_up() {
                return false;
            }
            st = self
                .0
                .room
                .wait_timeout(st, poll)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The UART as a bus device.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, NoEvents, Flushing<ConsoleOut>>,
    /// The guest's last writes to IER, LCR and MCR.
    ier: u8,
    lcr: u8,
    mcr: u8,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").finish_non_exhaustive()
    }
}

impl SerialConsole {
    /// A UART interrupting through `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger::new(irq), Flushing(out)),
            ier: 0,
            lcr: 0,
            mcr: 0,
        }
    }

    /// Whether the guest's driver listens: the receive-data interrupt is enabled, the guest
    /// raised `OUT2` and the port is not in loopback (only the guest's own writes count).
    pub fn guest_listens(&self) -> bool {
        self.ier & IER_RDI != 0 && self.mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2
    }

    /// Queues as much of `input` as the receive FIFO takes; returns how much it took. Takes
    /// nothing while the guest does not listen ([`Self::guest_listens`]).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        if !self.guest_listens() {
            return 0;
        }
        let n = input.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&input[..n]) {
            Ok(taken) => taken,
            Err(e) => {
                log::warn!("serial input dropped: {e:?}");
                n
            }
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(value) = data.first().copied() {
            match offset {
                IER if self.lcr & LCR_DLAB == 0 => self.ier = value,
                LCR => self.lcr = value,
                MCR => self.mcr = value,
                _ => {}
            }
        }
        if let (Some(value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(offset, *value) {
                log::warn!("serial write at offset {offset}: {e:?}");
            }
        }
    }
}

/// Feeds `input` to the UART's receive FIFO on a thread of its own, `serial-input`, waiting
/// while the FIFO is full. Ends at end of input or on a read error. With `confine`, the thread
/// runs under the console-input seccomp filter, which lets it read only stdin: `input` must
/// read from it.
///
/// # Errors
///
/// [`Error::Spawn`], or [`Error::Seccomp`] when the thread cannot install its filter.
pub fn forward_input<R: Read + Send + 'static>(
    serial: Arc<Mutex<SerialConsole>>,
    mut input: R,
    confine: bool,
) -> Result<JoinHandle<()>, Error> {
    spawn_console_thread(
        "serial-input",
        ThreadKind::ConsoleInput,
        confine,
        move || {
            let mut buf = [0u8; 64];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::debug!("console input ended: {e}");
                        return;
                    }
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let taken = serial
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .enqueue_input(rest);
                    rest = &rest[taken..];
                    if !rest.is_empty() {
                        thread::sleep(FIFO_FULL_BACKOFF);
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const THR: u64 = 0;
    const LSR: u64 = 5;

    #[test]
    fn output_and_input() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            irq.try_clone().unwrap(),
            Box::new(out.clone()),
        )));
        {
            let mut s = serial.lock().unwrap();
            s.write(IER, &[0x01]); // receive-data interrupt on
            for b in b"hi" {
                s.write(THR, &[*b]);
            }
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        let input: &'static [u8] = &[b'x'; 100]; // more than the 64-byte FIFO
        serial.lock().unwrap().write(IER, &[0]); // the guest stops listening
        let t = forward_input(serial.clone(), input, false).unwrap();
        thread::sleep(Duration::from_millis(30));
        let mut lsr = [0u8];
        serial.lock().unwrap().read(LSR, &mut lsr);
        assert_eq!(
            lsr[0] & 1,
            0,
            "input reached a UART whose driver does not listen"
        );
        serial.lock().unwrap().write(IER, &[0x01]); // receive interrupt without OUT2
        thread::sleep(Duration::from_millis(30));
        serial.lock().unwrap().read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 1, 0, "input reached a UART without OUT2");
        serial.lock().unwrap().write(MCR, &[MCR_OUT2 | MCR_LOOP]);
        thread::sleep(Duration::from_millis(30));
        serial.lock().unwrap().read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 1, 0, "input reached a UART in loopback");
        serial.lock().unwrap().write(MCR, &[MCR_OUT2]); // and listens
        let mut got = Vec::new();
        while got.len() < 100 {
            let mut s = serial.lock().unwrap();
            let mut lsr = [0u8];
            s.read(LSR, &mut lsr);
            if lsr[0] & 1 != 0 {
                let mut d = [0u8];
                s.read(THR, &mut d);
                got.push(d[0]);
            } else {
                drop(s);
                thread::sleep(Duration::from_millis(1));
            }
        }
        t.join().unwrap();
        assert_eq!(got, vec![b'x'; 100]);
        assert!(irq.read().unwrap() >= 1);
    }
}

#[cfg(test)]
mod output_tests {
    use super::*;
    use std::time::Instant;

    /// Whether the gate let writes through (`Some(true)`), fails them, or is still shut.
    type GateOpen = Arc<(Mutex<Option<bool>>, Condvar)>;

    /// A writer that blocks until released, then fails or succeeds.
    struct Gate {
        open: GateOpen,
        got: Arc<Mutex<Vec<u8>>>,
    }
    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (m, c) = &*self.open;
            let mut g = m.lock().unwrap();
            while g.is_none() {
                g = c.wait(g).unwrap();
            }
            if *g == Some(false) {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn gate() -> (Gate, GateOpen, Arc<Mutex<Vec<u8>>>) {
        let open = Arc::new((Mutex::new(None), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        (
            Gate {
                open: open.clone(),
                got: got.clone(),
            },
            open,
            got,
        )
    }

    /// Counts the writes it gets and keeps their bytes.
    struct Counting(Arc<Mutex<(usize, Vec<u8>)>>);
    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut g = self.0.lock().unwrap();
            g.0 += 1;
            g.1.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_one_by_one_reach_the_console_in_batches() {
        let seen = Arc::new(Mutex::new((0, Vec::new())));
        let (console, mut w) =
            ConsoleOutput::spawn(Box::new(Counting(seen.clone())), false).unwrap();
        let text: Vec<u8> = (0..400u32).map(|i| b'a' + (i % 26) as u8).collect();
        let start = Instant::now();
        for b in &text {
            w.write_all(std::slice::from_ref(b)).unwrap();
            // As a guest console does: each byte a while after the last (an exit per byte).
            thread::sleep(Duration::from_micros(100));
        }
        let took = start.elapsed();
        assert!(console.drain(Duration::from_millis(10), || false));
        let (writes, bytes) = seen.lock().unwrap().clone();
        assert_eq!(bytes, text);
        // Every batch but the first gathers for OUTPUT_COALESCE after the byte that woke the
        // thread, so the writes are bounded by the time the loop took, not by the bytes.
        let bound = 2 + (took.as_secs_f64() / OUTPUT_COALESCE.as_secs_f64()).ceil() as usize;
        assert!(
            writes <= bound.min(text.len() / 4),
            "{writes} writes for {} bytes in {took:?}",
            text.len()
        );
    }

    fn release(open: &(Mutex<Option<bool>>, Condvar), ok: bool) {
        *open.0.lock().unwrap() = Some(ok);
        open.1.notify_all();
    }

    #[test]
    fn blocked_console_holds_the_guest_until_stop_and_drain_gives_up() {
        let (g, open, _got) = gate();
        let (out, mut w) = ConsoleOutput::spawn(Box::new(g), false).unwrap();
        let writer = thread::spawn(move || {
            for _ in 0..4 {
                w.write_all(&[b'x'; OUTPUT_QUEUE_BYTES]).unwrap();
            }
        });
        thread::sleep(Duration::from_millis(50));
        assert!(
            !writer.is_finished(),
            "a full queue must hold the guest back"
        );
        out.stop_waiting();
        writer.join().unwrap();
        let t = Instant::now();
        assert!(!out.drain(Duration::from_millis(5), || t.elapsed()
            > Duration::from_millis(30)));
        release(&open, true);
    }

    #[test]
    fn everything_arrives_then_drain_returns() {
        let (g, open, got) = gate();
        let (out, mut w) = ConsoleOutput::spawn(Box::new(g), false).unwrap();
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        release(&open, true);
        assert!(out.drain(Duration::from_millis(5), || false));
        assert_eq!(&*got.lock().unwrap(), b"hello world");
    }

    #[test]
    fn broken_pipe_discards_quietly() {
        let (g, open, got) = gate();
        let (out, mut w) = ConsoleOutput::spawn(Box::new(g), false).unwrap();
        w.write_all(b"lost").unwrap();
        release(&open, false);
        assert!(out.drain(Duration::from_millis(5), || false));
        for _ in 0..10 {
            w.write_all(&[b'y'; OUTPUT_QUEUE_BYTES]).unwrap(); // never blocks, never fails
        }
        assert!(got.lock().unwrap().is_empty());
    }
}
