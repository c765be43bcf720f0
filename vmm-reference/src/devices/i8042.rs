//! The i8042 keyboard controller, as far as a guest needs it to reset the machine: vm-superio's
//! `I8042Device` answers status reads and turns command 0xfe (pulse the reset line) into a
//! trigger, which here records a [`GuestRequest::Reset`]. Linux uses it with `reboot=k` and as
//! one of its default reboot methods.

use std::sync::Arc;

use vcpu_runner::BusDevice;
use vm_superio::{I8042Device, Trigger};

use super::{GuestEnd, GuestRequest};

/// The reset line: records the reset request.
#[derive(Debug)]
pub struct ResetLine(Arc<GuestEnd>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(GuestRequest::Reset);
        Ok(())
    }
}

/// Ports 0x60..=0x64.
#[derive(Debug)]
pub struct I8042 {
    inner: I8042Device<ResetLine>,
}

impl I8042 {
    /// A controller whose reset line reports to `end`.
    pub fn new(end: Arc<GuestEnd>) -> Self {
        Self {
            inner: I8042Device::new(ResetLine(end)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // A wider `in` gets zeros above the register's byte, never what an earlier exit left
        // in `kvm_run`'s data area.
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.inner.write(offset, *value) {
                log::warn!("i8042 write {value:#x} at offset {offset}: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_fe_resets() {
        let end = Arc::new(GuestEnd::new());
        let mut dev = I8042::new(end.clone());
        let mut status = [0u8];
        dev.read(4, &mut status);
        dev.write(4, &[0x20]); // read command byte: no reset
        assert_eq!(end.get(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(end.get(), Some(GuestRequest::Reset));
    }

    #[test]
    fn wide_reads_leave_no_stale_bytes() {
        // Found by the devices fuzz target: only the first byte used to be written.
        let mut dev = I8042::new(Arc::new(GuestEnd::new()));
        for offset in [0, 4] {
            let mut data = [0xa5u8; 4];
            dev.read(offset, &mut data);
            assert_eq!(&data[1..], &[0, 0, 0], "offset {offset}");
        }
    }
}
