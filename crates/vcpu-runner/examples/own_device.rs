//! vcpu-runner with a device of the author's own: a `BusDevice` placed on both the port I/O
//! and the MMIO bus, driven by a tiny long-mode guest on the runner's vCPU thread.
//!
//! The device ("doubler"): a write to offset 0 latches a byte, a read of offset 0 returns
//! twice the latched byte, a write to offset 1 is a result the device records. The guest
//! latches 21 through port 0x90, reads 42 back and reports it on port 0x91, then latches 42
//! through MMIO at 0x1000_0000, reads 84 back and reports it, and halts.
//!
//! `cargo run -p vcpu-runner --example own_device`

use std::error::Error;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::Kvm;
use kvm_test_support::guest::TinyGuest;
use sync_regs::RegisterCache;
use vcpu_runner::{BusDevice, Buses, NoMsrs, Vcpu, VmOutcome, VmRunner};
use vm_types::VmType;

const PORT: u64 = 0x90;
/// Guest-physical address of the device's MMIO window: mapped by the guest's page tables,
/// backed by no memory slot, so accesses exit to the VMM.
const MMIO: u64 = 0x1000_0000;

const GUEST: [u8; 22] = [
    0xb0, 21, // mov al, 21
    0xe6, 0x90, // out 0x90, al      (latch 21)
    0xe4, 0x90, // in al, 0x90       (42)
    0xe6, 0x91, // out 0x91, al      (report)
    0xbf, 0x00, 0x00, 0x00, 0x10, // mov edi, 0x10000000
    0x88, 0x07, // mov [rdi], al     (latch 42 through MMIO)
    0x8a, 0x07, // mov al, [rdi]     (84)
    0xe6, 0x91, // out 0x91, al      (report)
    0xf4, // hlt
    0x90, 0x90, // padding
];

/// The device: a latch that reads back doubled, and a report register.
#[derive(Default)]
struct Doubler {
    latched: u8,
    reports: Vec<u8>,
}

impl BusDevice for Doubler {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (0, Some(first)) = (offset, data.first_mut()) {
            *first = self.latched.wrapping_mul(2);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.first()) {
            (0, Some(&value)) => self.latched = value,
            (1, Some(&value)) => {
                println!("device: guest reported {value}");
                self.reports.push(value);
            }
            _ => {}
        }
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let kvm = Kvm::new()?;
    let TinyGuest {
        vm,
        vcpu,
        mem: _mem,
        ..
    } = TinyGuest::long_mode(&kvm, &GUEST)?;
    let device = Arc::new(Mutex::new(Doubler::default()));
    let mut buses = Buses::new();
    buses.pio.insert(PORT, 2, device.clone())?;
    buses.mmio.insert(MMIO, 1, device.clone())?;
    println!(
        "doubler on ports {PORT:#x}-{:#x} and MMIO {MMIO:#x}",
        PORT + 1
    );
    let registers = RegisterCache::new(&vm, VmType::Default);
    let vcpu = Vcpu::new(0, vcpu, registers, Arc::new(buses), Box::new(NoMsrs));
    let runner = VmRunner::spawn(vec![vcpu])?;
    runner.start()?;
    if !runner.wait(Duration::from_secs(10)) {
        return Err("the guest did not halt within 10 s".into());
    }
    let outcome = runner.shutdown(Duration::from_secs(5))?;
    let reports = device
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .reports
        .clone();
    println!("outcome: {outcome}; reports {reports:?}");
    if !matches!(outcome, VmOutcome::Halted) || reports != [42, 84] {
        return Err("expected reports [42, 84] and a halt".into());
    }
    Ok(())
}
