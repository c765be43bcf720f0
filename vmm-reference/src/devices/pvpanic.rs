//! The pvpanic device at ISA port 0x505 (QEMU's `docs/specs/pvpanic.rst`), declared in the
//! DSDT as ACPI `QEMU0001`. Linux's driver (`drivers/misc/pvpanic/pvpanic-mmio.c`, which binds
//! `QEMU0001` with an I/O or memory resource) reads the port for the events the device
//! supports and, from its panic notifier, writes `PVPANIC_PANICKED` before the kernel reboots
//! or spins (`panic=N`). This device offers only that event and records it as
//! [`GuestRequest::Panic`].
//!
//! The Debian 6.1 cloud kernel builds the driver as a module (`CONFIG_PVPANIC_MMIO=m`), so a
//! guest reports panics here only once `pvpanic-mmio` is loaded.

use std::sync::Arc;

use vcpu_runner::BusDevice;

use super::{GuestEnd, GuestRequest};
use crate::sys::PVPANIC_PANICKED;

/// One port: reads give the supported events, writes report events.
#[derive(Debug)]
pub struct PvPanic {
    end: Arc<GuestEnd>,
}

impl PvPanic {
    /// A device that reports panics to `end`.
    pub fn new(end: Arc<GuestEnd>) -> Self {
        Self { end }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PVPANIC_PANICKED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PVPANIC_PANICKED != 0) {
            self.end.request(GuestRequest::Panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_and_reports_panicked_only() {
        let end = Arc::new(GuestEnd::new());
        let mut dev = PvPanic::new(end.clone());
        let mut caps = [0xffu8];
        dev.read(0, &mut caps);
        assert_eq!(caps, [PVPANIC_PANICKED]);
        dev.write(0, &[0b10]); // crash-loaded: not offered, ignored
        assert_eq!(end.get(), None);
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(end.get(), Some(GuestRequest::Panic));
    }
}
