//! sync-regs under vcpu-runner: the runner's vCPU thread owns the `VcpuFd` and keeps a
//! `RegisterCache` beside it; an exit hook gets each exit and the registers at it together,
//! reads them from the `kvm_run` copy and writes back without an ioctl.
//!
//! The guest (long mode, from kvm-test-support) loops on `out 0x80, al` until AL is 5, then
//! halts; the hook writes RAX + 1 at each `out`, so the guest counts 0 to 4.
//!
//! `cargo run -p sync-regs --example runner_registers`

use std::error::Error;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::Kvm;
use kvm_test_support::guest::TinyGuest;
use sync_regs::{RegisterCache, Registers};
use vcpu_runner::{
    BusDevice, Buses, ExitHook, ExitOutcome, ExitRecord, NoMsrs, Vcpu, VmOutcome, VmRunner,
};
use vm_types::VmType;

const GUEST: [u8; 7] = [
    0xe6, 0x80, // 0: out 0x80, al
    0x3c, 0x05, // 2: cmp al, 5
    0x75, 0xfa, // 4: jne 0
    0xf4, // 6: hlt
];

/// The port the guest writes: it keeps what it was given.
struct Recorder(Arc<Mutex<Vec<u8>>>);

impl BusDevice for Recorder {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(data);
    }
}

/// At each `out 0x80`: read RIP and RAX, write RAX + 1.
struct Counter;

impl ExitHook for Counter {
    fn after_exit(
        &mut self,
        exit: &ExitRecord,
        outcome: &ExitOutcome,
        registers: &mut Registers<'_>,
    ) -> sync_regs::Result<()> {
        match exit {
            ExitRecord::PortWrite { port, data } => {
                let r = registers.regs_mut()?;
                println!(
                    "out {port:#x} <- {data:02x?}: rip {:#x}, rax {:#x}; writing rax {:#x}",
                    r.rip,
                    r.rax,
                    r.rax + 1
                );
                r.rax += 1;
            }
            _ => {
                let rip = registers.regs()?.rip;
                println!(
                    "{outcome:?} at rip {rip:#x} (writes pending: {})",
                    registers.dirty()
                );
            }
        }
        Ok(())
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
    let registers = RegisterCache::new(&vm, VmType::Default);
    println!("KVM_CAP_SYNC_REGS offers {}", registers.offered());
    let written = Arc::new(Mutex::new(Vec::new()));
    let mut buses = Buses::new();
    buses
        .pio
        .insert(0x80, 1, Arc::new(Mutex::new(Recorder(written.clone()))))?;
    let vcpu = Vcpu::new(0, vcpu, registers, Arc::new(buses), Box::new(NoMsrs))
        .with_exit_hook(Box::new(Counter));
    let runner = VmRunner::spawn(vec![vcpu])?;
    runner.start()?;
    if !runner.wait(Duration::from_secs(10)) {
        return Err("the guest did not halt within 10 s".into());
    }
    let outcome = runner.shutdown(Duration::from_secs(5))?;
    let written = written.lock().unwrap_or_else(|p| p.into_inner()).clone();
    println!("outcome: {outcome}; the guest wrote {written:?}");
    if !matches!(outcome, VmOutcome::Halted) || written != [0, 1, 2, 3, 4] {
        return Err("expected the guest to write 0 to 4 and halt".into());
    }
    Ok(())
}
