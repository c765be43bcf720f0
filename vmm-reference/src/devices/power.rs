//! The ACPI registers of this VMM's hardware-reduced platform, four bytes of port I/O where
//! the FADT and DSDT point:
//!
//! | offset | register | guest write that counts |
//! |---|---|---|
//! | 0 | sleep control (ACPI 6.4 §4.8.3.7) | `SLP_EN` with `SLP_TYP` = the DSDT's S5: power off |
//! | 1 | sleep status (§4.8.3.8) | none; reads as zero |
//! | 2 | reset register (FADT `RESET_REG`, §4.8.3.6) | `RESET_VALUE`: reset |
//! | 3 | shutdown notice (the DSDT's `\_TTS` method writes its argument here) | any: the guest began an orderly restart, halt or power-off |

use std::sync::Arc;

use vcpu_runner::BusDevice;

use super::{GuestEnd, GuestRequest};
use crate::sys::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SHUTDOWN_NOTICE_PORT,
    ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_ENABLE, ACPI_SLEEP_TYPE_MASK, ACPI_SLEEP_TYPE_SHIFT,
};

/// Offset of the reset register from the sleep control register.
const RESET_OFFSET: u64 = ACPI_RESET_PORT - ACPI_SLEEP_CONTROL_PORT;
/// Offset of the shutdown-notice register from the sleep control register.
const NOTICE_OFFSET: u64 = ACPI_SHUTDOWN_NOTICE_PORT - ACPI_SLEEP_CONTROL_PORT;

/// The sleep control, sleep status, reset and shutdown-notice registers.
#[derive(Debug)]
pub struct AcpiSleepRegisters {
    end: Arc<GuestEnd>,
}

impl AcpiSleepRegisters {
    /// Registers that report a power-off, a reset and a shutdown notice to `end`.
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
        // No wake events: status reads as zero; control, reset and notice are write-only.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(value) = data.first().copied() else {
            return;
        };
        match offset {
            0 if is_soft_off(value) => self.end.request(GuestRequest::PowerOff),
            RESET_OFFSET if value == ACPI_RESET_VALUE => self.end.request(GuestRequest::Reset),
            NOTICE_OFFSET => self.end.notice_shutdown(),
            _ => {}
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

    #[test]
    fn reset_register_needs_the_fadt_value() {
        let end = Arc::new(GuestEnd::new());
        let mut dev = AcpiSleepRegisters::new(end.clone());
        dev.write(RESET_OFFSET, &[ACPI_RESET_VALUE ^ 1]);
        assert_eq!(end.get(), None);
        dev.write(RESET_OFFSET, &[ACPI_RESET_VALUE]);
        assert_eq!(end.get(), Some(GuestRequest::Reset));
    }

    #[test]
    fn tts_write_is_a_shutdown_notice_not_a_request() {
        let end = Arc::new(GuestEnd::new());
        let mut dev = AcpiSleepRegisters::new(end.clone());
        dev.write(NOTICE_OFFSET, &[5]);
        assert!(end.shutdown_noticed().is_some());
        assert_eq!(end.get(), None);
    }
}
