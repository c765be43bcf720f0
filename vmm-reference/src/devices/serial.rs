//! COM1: vm-superio's 16550 UART at 0x3f8. Its interrupt line is an `EventFd` registered with
//! `KVM_IRQFD` on GSI 4, so raising the IRQ never leaves the kernel's irqchip path; guest output
//! goes to a writer that is flushed after every byte the guest sends, and host input reaches the
//! receive FIFO through [`forward_input`].

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vcpu_runner::BusDevice;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// How long the input thread waits for the guest to drain a full receive FIFO.
const FIFO_FULL_BACKOFF: Duration = Duration::from_millis(5);

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

/// The UART as a bus device.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, NoEvents, Flushing<ConsoleOut>>,
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
        }
    }

    /// Queues as much of `input` as the receive FIFO takes; returns how much it took.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
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
        if let (Some(value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(offset, *value) {
                log::warn!("serial write at offset {offset}: {e:?}");
            }
        }
    }
}

/// Feeds `input` to the UART's receive FIFO on a thread of its own, waiting while the FIFO is
/// full. Ends at end of input or on a read error.
pub fn forward_input<R: Read + Send + 'static>(
    serial: Arc<Mutex<SerialConsole>>,
    mut input: R,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("serial-input".into())
        .spawn(move || {
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
        })
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
    const IER: u64 = 1;
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
        let t = forward_input(serial.clone(), input).unwrap();
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
