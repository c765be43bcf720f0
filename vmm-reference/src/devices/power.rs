//! The ACPI hardware-reduced sleep control and status registers (ACPI 6.4 §4.8.3.7-8), in
//! port I/O where this VMM's FADT points. A write of `SLP_EN` with `SLP_TYP` = the DSDT's S5
//! value is the guest powering off.

use std::sync::Arc;

use vcpu_runner::BusDevice;

use super::{GuestEnd, GuestRequest};
use crate::sys::{
    ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_ENABLE, ACPI_SLEEP_TYPE_MASK, ACPI_SLEEP_TYPE_SHIFT,
};

/// The two one-byte registers: control at offset 0, status at offset 1.
#[derive(Debug)]
pub struct AcpiSleepRegisters {
    end: Arc<GuestEnd>,
}

impl AcpiSleepRegisters {
    /// Registers that report a power-off to `end`.
    pub fn new(end: Arc<GuestEnd>) -> Self {
        Self { end }
    }
}

/// Whether a sleep-control write enters S5.
pub fn is_soft_off(value: u8) -> bool {
    value & ACPI_SLEEP_ENABLE != 0
        && (value >> ACPI_SLEEP_TYPE_SHIFT) & ACPI_SLEEP_TYPE_MASK == ACPI_S5_SLEEP_TYPE
}

impl BusDevice for AcpiSleepRegisters {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No wake events: status reads as zero; control is write-only.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first().copied().is_some_and(is_soft_off) {
            self.end.request(GuestRequest::PowerOff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s5_with_enable_powers_off() {
        let end = Arc::new(GuestEnd::new());
        let mut dev = AcpiSleepRegisters::new(end.clone());
        dev.write(1, &[0x80]); // clearing wake status
        dev.write(0, &[5 << 2]); // SLP_TYP without SLP_EN
        dev.write(0, &[(3 << 2) | 0x20]); // S3
        assert_eq!(end.get(), None);
        let mut d = [0xffu8];
        dev.read(1, &mut d);
        assert_eq!(d, [0]);
        dev.write(0, &[(5 << 2) | 0x20]);
        assert_eq!(end.get(), Some(GuestRequest::PowerOff));
    }
}
