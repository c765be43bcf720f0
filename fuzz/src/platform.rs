//! The legacy PC devices of vmm-reference on a port I/O bus laid out as the VMM lays it
//! out (`vmm::Devices::attach`), with a model of what the guest may expect from them.
//!
//! The VMM builds its buses next to a KVM VM (the UART's interrupt is bound with irqfd);
//! here they are built on their own, with the same devices at the same ports.

use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vcpu_runner::{Buses, SharedDevice};
use vmm_reference::devices::i8042::I8042;
use vmm_reference::devices::power::{is_soft_off, AcpiSleepRegisters};
use vmm_reference::devices::pvpanic::PvPanic;
use vmm_reference::devices::rtc::CmosRtc;
use vmm_reference::devices::serial::SerialConsole;
use vmm_reference::devices::{GuestEnd, GuestRequest};
use vmm_reference::sys::{
    ACPI_PORTS, ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT, CMOS_PORT, CMOS_PORTS,
    COM1_PORT, I8042_CMD_RESET, I8042_COMMAND_PORT, I8042_PORT, I8042_PORTS, PVPANIC_PANICKED,
    PVPANIC_PORT, UART_REGISTERS,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The CMOS registers the RTC computes or fixes (MC146818 clock and status registers
/// 0x00-0x0d, and the ACPI century register 0x32); every other index is RAM.
fn is_cmos_ram(index: u8) -> bool {
    !matches!(index, 0x00 | 0x02 | 0x04 | 0x06..=0x0d | 0x32)
}

/// Whether a write of `index` reaches CMOS RAM (the alarm registers 0x01, 0x03 and 0x05 are
/// read from RAM but not writable).
fn is_cmos_writable(index: u8) -> bool {
    !matches!(index, 0x00..=0x0d | 0x32)
}

/// The CMOS index register keeps 7 bits (bit 7 is the NMI mask on a PC).
const CMOS_INDEX_MASK: u8 = 0x7f;

/// A guest console that counts what reaches it.
#[derive(Clone, Default)]
struct CountingConsole(Arc<AtomicUsize>);

impl Write for CountingConsole {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.fetch_add(buf.len(), Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One device's place on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// COM1.
    Serial,
    /// The i8042's reset line.
    I8042,
    /// The CMOS RTC.
    Rtc,
    /// ACPI sleep, reset and shutdown-notice registers.
    Acpi,
    /// pvpanic.
    PvPanic,
}

impl Device {
    /// Every device.
    pub const ALL: [Device; 5] = [
        Device::Serial,
        Device::I8042,
        Device::Rtc,
        Device::Acpi,
        Device::PvPanic,
    ];

    /// First port and number of ports.
    pub fn ports(self) -> (u64, u64) {
        match self {
            Device::Serial => (COM1_PORT, UART_REGISTERS),
            Device::I8042 => (I8042_PORT, I8042_PORTS),
            Device::Rtc => (CMOS_PORT, CMOS_PORTS),
            Device::Acpi => (ACPI_SLEEP_CONTROL_PORT, ACPI_PORTS),
            Device::PvPanic => (PVPANIC_PORT, 1),
        }
    }

    /// The device whose ports hold the whole access `[port, port + len)`.
    pub fn at(port: u64, len: usize) -> Option<Device> {
        Device::ALL.into_iter().find(|d| {
            let (base, count) = d.ports();
            port >= base && port + len as u64 <= base + count
        })
    }
}

/// The devices on their bus, and what the guest did to them so far.
pub struct Platform {
    /// The buses the vCPU loop dispatches to.
    pub buses: Buses,
    serial: Arc<Mutex<SerialConsole>>,
    _serial_irq: EventFd,
    end: Arc<GuestEnd>,
    console: Arc<AtomicUsize>,
    serial_writes: usize,
    first_request: Option<GuestRequest>,
    cmos_index: u8,
    cmos_ram: [u8; 128],
}

impl Default for Platform {
    fn default() -> Self {
        Self::new()
    }
}

impl Platform {
    /// The devices at the VMM's ports; the RTC reads a fixed clock.
    pub fn new() -> Self {
        let end = Arc::new(GuestEnd::new());
        let serial_irq = EventFd::new(EFD_NONBLOCK).expect("an eventfd can be created");
        let console = CountingConsole::default();
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            serial_irq
                .try_clone()
                .expect("an eventfd can be duplicated"),
            Box::new(console.clone()),
        )));
        let mut buses = Buses::new();
        for device in Device::ALL {
            let shared: SharedDevice = match device {
                Device::Serial => serial.clone(),
                Device::I8042 => Arc::new(Mutex::new(I8042::new(end.clone()))),
                Device::Rtc => Arc::new(Mutex::new(CmosRtc::with_clock(|| 1_700_000_000))),
                Device::Acpi => Arc::new(Mutex::new(AcpiSleepRegisters::new(end.clone()))),
                Device::PvPanic => Arc::new(Mutex::new(PvPanic::new(end.clone()))),
            };
            let (port, len) = device.ports();
            buses
                .pio
                .insert(port, len, shared)
                .expect("the VMM's ports do not overlap");
        }
        Platform {
            buses,
            serial,
            _serial_irq: serial_irq,
            end,
            console: console.0,
            serial_writes: 0,
            first_request: None,
            cmos_index: 0,
            cmos_ram: [0; 128],
        }
    }

    /// Host input for the guest console, as the input thread queues it.
    pub fn console_input(&mut self, input: &[u8]) {
        let taken = self.serial.lock().unwrap().enqueue_input(input);
        assert!(taken <= input.len());
    }

    /// Records a guest write of `data` to `port` (already performed on the bus) and checks
    /// its effects.
    pub fn wrote(&mut self, port: u64, data: &[u8]) {
        let device = Device::at(port, data.len());
        let value = data.first().copied().unwrap_or(0);
        let request = match device {
            Some(Device::I8042)
                if port == u64::from(I8042_COMMAND_PORT) && value == I8042_CMD_RESET =>
            {
                Some(GuestRequest::Reset)
            }
            Some(Device::Acpi) if port == ACPI_SLEEP_CONTROL_PORT && is_soft_off(value) => {
                Some(GuestRequest::PowerOff)
            }
            Some(Device::Acpi) if port == ACPI_RESET_PORT && value == ACPI_RESET_VALUE => {
                Some(GuestRequest::Reset)
            }
            Some(Device::PvPanic) if value & PVPANIC_PANICKED != 0 => Some(GuestRequest::Panic),
            _ => None,
        };
        self.first_request = self.first_request.or(request);
        assert_eq!(
            self.end.get(),
            self.first_request,
            "after a write of {data:02x?} to {port:#x}"
        );
        match device {
            Some(Device::Serial) => self.serial_writes += 1,
            Some(Device::Rtc) if port == CMOS_PORT => self.cmos_index = value & CMOS_INDEX_MASK,
            Some(Device::Rtc) if is_cmos_writable(self.cmos_index) => {
                self.cmos_ram[usize::from(self.cmos_index)] = value;
            }
            _ => {}
        }
        // Each write to the UART sends at most one byte to the console.
        assert!(self.console.load(Ordering::Relaxed) <= self.serial_writes);
    }

    /// Checks what a guest read of `port` returned in `data`, which held `canary` in every
    /// byte before the read.
    pub fn read(&mut self, port: u64, data: &[u8], canary: u8) {
        let Some(device) = Device::at(port, data.len()) else {
            assert!(
                data.iter().all(|&b| b == 0xff),
                "unclaimed port {port:#x} read {data:02x?}"
            );
            return;
        };
        // The registers are a byte wide; the rest of a wider access reads as zero, never as
        // what an earlier exit left in kvm_run's data area.
        assert!(
            data[1..].iter().all(|&b| b != canary),
            "{device:?} left bytes of a {}-byte read of {port:#x} unwritten: {data:02x?}",
            data.len()
        );
        match device {
            Device::Rtc if port == CMOS_PORT => assert_eq!(data[0], self.cmos_index),
            Device::Rtc if is_cmos_ram(self.cmos_index) => {
                assert_eq!(data[0], self.cmos_ram[usize::from(self.cmos_index)]);
            }
            Device::PvPanic => assert_eq!(data[0], PVPANIC_PANICKED),
            Device::Acpi => assert_eq!(data[0], 0),
            _ => {}
        }
    }
}
