//! Target `devices`: a guest's port accesses to the VMM's devices, in any order, through the
//! bus the vCPU loop dispatches to. Each operation is one byte of kind, a device and an
//! offset (possibly past its last port), an access size of 1, 2, 4 or 8 bytes, and the
//! written bytes; host console input is mixed in.

use crate::input::Input;
use crate::platform::{Device, Platform};

/// What a read buffer holds before the read (kvm_run's data area holds earlier bytes).
pub const CANARY: u8 = 0xa5;

/// Runs the guest accesses the input describes.
pub fn devices(data: &[u8]) {
    let mut input = Input::new(data);
    let mut platform = Platform::new();
    while !input.is_empty() {
        let kind = input.u8();
        let port = match kind >> 5 {
            7 => u64::from(input.u16()),
            n => {
                let (base, len) = Device::ALL[usize::from(n) % Device::ALL.len()].ports();
                base + u64::from(input.u8()) % (len + 1)
            }
        };
        match kind % 4 {
            0 => {
                let len = usize::from(input.u8() % 32);
                platform.console_input(input.bytes(len));
            }
            1 => {
                let mut buf = vec![CANARY; input.access_size()];
                platform.buses.pio.read(port, &mut buf);
                platform.read(port, &buf, CANARY);
            }
            _ => {
                let size = input.access_size();
                let mut buf = input.bytes(size).to_vec();
                buf.resize(size, 0);
                platform.buses.pio.write(port, &buf);
                platform.wrote(port, &buf);
            }
        }
    }
}
