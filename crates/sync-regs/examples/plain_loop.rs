//! sync-regs in a plain kvm-ioctls run loop: the loop owns the `VcpuFd`, stages register
//! writes before each `KVM_RUN` and settles the cache after it, and handles each exit with
//! the registers at hand.
//!
//! The guest (long mode, from kvm-test-support) loops on `out 0x80, al` until AL is 5, then
//! halts; at each `out` the loop reads RIP and RAX from the `kvm_run` copy and writes
//! RAX + 1 back through `kvm_dirty_regs`, so the guest counts 0, 1, 2, 3, 4.
//!
//! `cargo run -p sync-regs --example plain_loop`

use std::error::Error;

use kvm_ioctls::{Kvm, VcpuExit};
use kvm_test_support::guest::TinyGuest;
use sync_regs::{RegSet, RegisterCache};
use vm_types::VmType;

const GUEST: [u8; 7] = [
    0xe6, 0x80, // 0: out 0x80, al
    0x3c, 0x05, // 2: cmp al, 5
    0x75, 0xfa, // 4: jne 0
    0xf4, // 6: hlt
];

/// What the loop keeps of an exit once the vCPU is free again.
enum Exit {
    Out { port: u16, value: u8 },
    Halt,
}

fn main() -> Result<(), Box<dyn Error>> {
    let kvm = Kvm::new()?;
    let TinyGuest {
        vm,
        mut vcpu,
        mem: _mem,
        ..
    } = TinyGuest::long_mode(&kvm, &GUEST)?;
    let mut regs = RegisterCache::new(&vm, VmType::Default);
    println!(
        "KVM_CAP_SYNC_REGS offers {}; copying out {}",
        regs.offered(),
        regs.offered().intersection(RegSet::REGS)
    );
    let mut seen = Vec::new();
    loop {
        // Before KVM_RUN: pending writes go to the vCPU (kvm_run + kvm_dirty_regs here).
        regs.stage(&mut vcpu)?;
        // The exit borrows the vCPU: answer it and keep an owned summary.
        let ran = vcpu.run().map(|exit| match exit {
            VcpuExit::IoOut(port, data) => Ok(Exit::Out {
                port,
                value: data[0],
            }),
            VcpuExit::Hlt => Ok(Exit::Halt),
            other => Err(format!("unexpected exit {other:?}")),
        });
        // After KVM_RUN: what the kernel applied (kvm_dirty_regs) and copied out.
        regs.finish(&mut vcpu, &ran)?;
        match ran?? {
            Exit::Out { port, value } => {
                let r = regs.regs_mut(&vcpu)?;
                println!(
                    "out {port:#x} <- {value}: rip {:#x}, rax {:#x}; writing rax {:#x}",
                    r.rip,
                    r.rax,
                    r.rax + 1
                );
                r.rax += 1;
                seen.push(value);
            }
            Exit::Halt => break,
        }
    }
    if seen != [0, 1, 2, 3, 4] {
        return Err(format!("guest wrote {seen:?}, expected [0, 1, 2, 3, 4]").into());
    }
    let dump = regs.dump(&vcpu)?;
    println!(
        "halted after {} exits; registers at the halt:\n{dump}",
        seen.len() + 1
    );
    Ok(())
}
