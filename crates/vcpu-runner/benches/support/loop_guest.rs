//! The guest and the two measured loops shared by the `loop_overhead` bench and the
//! `loop_overhead_report` example: a long-mode guest that does `EXITS` port writes and halts,
//! run once with bare `KVM_RUN` calls (the floor) and once through the runner's thread, run
//! loop, dispatch and bus.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit};
use kvm_test_support::guest::{TinyGuest, CODE_ADDR, STACK_TOP};
use sync_regs::{RegSet, RegisterCache};
use vcpu_runner::{BusDevice, Buses, NoMsrs, StopReason, Vcpu};
use vm_types::VmType;

/// Port writes per batch.
pub const EXITS: u32 = 5_000;

/// The guest: `EXITS` times `out 0x80, al`, then `hlt`.
fn code() -> Vec<u8> {
    let mut code = vec![0xb9]; // mov ecx, EXITS
    code.extend_from_slice(&EXITS.to_le_bytes());
    code.extend_from_slice(&[
        0xe6, 0x80, // 5: out 0x80, al
        0xff, 0xc9, // 7: dec ecx
        0x75, 0xfa, // 9: jnz 5
        0xf4, // 11: hlt
    ]);
    code
}

/// A port that ignores what is written to it.
struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

fn rewind(fd: &kvm_ioctls::VcpuFd) {
    let mut regs = fd.get_regs().expect("KVM_GET_REGS");
    regs.rip = CODE_ADDR;
    regs.rsp = STACK_TOP;
    regs.rflags = 0x2;
    fd.set_regs(&regs).expect("KVM_SET_REGS");
}

/// Bare `KVM_RUN`: the floor.
pub struct RawLoop {
    guest: TinyGuest,
}

impl RawLoop {
    /// A fresh guest.
    pub fn new(kvm: &Kvm) -> Self {
        RawLoop {
            guest: TinyGuest::long_mode(kvm, &code()).expect("tiny guest"),
        }
    }

    /// Runs one batch and returns its wall time.
    pub fn batch(&mut self) -> Duration {
        rewind(&self.guest.vcpu);
        let start = Instant::now();
        let mut outs = 0;
        loop {
            match self.guest.vcpu.run() {
                Ok(VcpuExit::IoOut(..)) => outs += 1,
                Ok(VcpuExit::Hlt) => break,
                Ok(VcpuExit::Intr) => {}
                Err(e) if e.errno() == libc::EINTR => {}
                other => panic!("unexpected exit {other:?}"),
            }
        }
        let elapsed = start.elapsed();
        assert_eq!(outs, EXITS);
        elapsed
    }
}

/// The runner: vCPU thread, run loop, dispatch, bus.
pub struct RunnerLoop {
    _guest_memory: TinyGuestParts,
    vcpu: Option<Vcpu>,
}

/// What must outlive the vCPU: the VM and guest memory.
struct TinyGuestParts {
    _vm: kvm_ioctls::VmFd,
    _mem: vm_memory::GuestMemoryMmap,
}

impl RunnerLoop {
    /// A fresh guest and a vCPU with the port on its bus.
    pub fn new(kvm: &Kvm) -> Self {
        let TinyGuest { vm, vcpu, mem, .. } =
            TinyGuest::long_mode(kvm, &code()).expect("tiny guest");
        // No copy-out: like the raw loop, nothing reads registers at these exits. (With
        // `RegSet::REGS` selected, each exit also pays the kernel's `store_regs()` copy.)
        let mut registers = RegisterCache::new(&vm, VmType::Default);
        registers
            .set_selection(RegSet::EMPTY)
            .expect("the empty selection is always offered");
        let mut buses = Buses::new();
        buses
            .pio
            .insert(0x80, 1, Arc::new(Mutex::new(Sink)))
            .expect("bus insert");
        RunnerLoop {
            _guest_memory: TinyGuestParts { _vm: vm, _mem: mem },
            vcpu: Some(Vcpu::new(
                0,
                vcpu,
                registers,
                Arc::new(buses),
                Box::new(NoMsrs),
            )),
        }
    }

    /// Runs one batch on a vCPU thread and returns its wall time, from resume to halt.
    pub fn batch(&mut self) -> Duration {
        let mut vcpu = self.vcpu.take().expect("vCPU present between batches");
        let mut registers = vcpu.registers();
        let regs = registers.regs_mut().expect("registers");
        regs.rip = CODE_ADDR;
        regs.rsp = STACK_TOP;
        regs.rflags = 0x2;
        let before = vcpu.stats().pio_writes;
        let thread = vcpu.spawn().expect("spawn");
        let start = Instant::now();
        thread.handle().resume().expect("resume");
        let reason = thread
            .handle()
            .wait_exited(Duration::from_secs(60))
            .expect("halt");
        let elapsed = start.elapsed();
        assert_eq!(reason, StopReason::Halted);
        let (vcpu, _) = thread.join(Duration::from_secs(5)).expect("join");
        assert_eq!(vcpu.stats().pio_writes - before, u64::from(EXITS));
        self.vcpu = Some(vcpu);
        elapsed
    }
}
