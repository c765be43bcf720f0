//! KVM tests of the kit itself: that its guests start where and how it says.

use kvm_test_support::guest::{TinyGuest, CODE_ADDR, STACK_TOP};
use kvm_test_support::{ensure, ensure_eq, harness, GuestExit, KvmTest, TestResult};

/// Real mode: the vCPU starts at CODE_ADDR (CS base) with the stack the kit promises.
fn real_mode_entry_state(kvm: &kvm_ioctls::Kvm) -> TestResult {
    // hlt
    let mut guest = TinyGuest::real_mode(kvm, &[0xf4])?;
    guest.expect_exit(GuestExit::Hlt)?;
    let regs = guest.vcpu.get_regs()?;
    ensure_eq!(regs.rip, 1, "ip after hlt is {:#x}", regs.rip);
    ensure_eq!(regs.rsp, STACK_TOP, "rsp is {:#x}", regs.rsp);
    let sregs = guest.vcpu.get_sregs()?;
    ensure_eq!(
        sregs.cr0 & 1,
        0,
        "CR0.PE set in real mode: {:#x}",
        sregs.cr0
    );
    ensure_eq!(sregs.cs.base, CODE_ADDR, "CS base is {:#x}", sregs.cs.base);
    Ok(())
}

/// Long mode: paging is on, a 64-bit immediate survives, and a store lands in guest memory
/// through the identity map; an access past the end of memory becomes an MMIO exit.
fn long_mode_paging_and_mmio(kvm: &kvm_ioctls::Kvm) -> TestResult {
    let code = [
        0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22,
        0x11, // mov rax, 0x1122334455667788
        0x48, 0xa3, 0x00, 0x90, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // mov [0x9000], rax
        0x48, 0xa3, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, // mov [0x10000000], rax
        0xf4, // hlt
    ];
    let mut guest = TinyGuest::long_mode(kvm, &code)?;
    guest.expect_exit(GuestExit::MmioWrite {
        addr: 0x1000_0000,
        data: 0x1122_3344_5566_7788u64.to_le_bytes().to_vec(),
    })?;
    guest.expect_exit(GuestExit::Hlt)?;
    let stored = guest.read(0x9000, 8)?;
    ensure_eq!(
        stored,
        0x1122_3344_5566_7788u64.to_le_bytes(),
        "guest store through the identity map left {stored:02x?}"
    );
    let sregs = guest.vcpu.get_sregs()?;
    ensure!(
        sregs.efer & (1 << 10) != 0,
        "EFER.LMA clear: {:#x}",
        sregs.efer
    );
    Ok(())
}

/// Long mode: an exception is delivered through the kit's IDT to a guest handler.
fn long_mode_exception_reaches_guest_handler(kvm: &kvm_ioctls::Kvm) -> TestResult {
    const HANDLER: u64 = CODE_ADDR + 0x100;
    // ud2 raises #UD (vector 6).
    let mut guest = TinyGuest::long_mode(kvm, &[0x0f, 0x0b])?;
    // handler: mov al, 6 ; out 0x80, al ; hlt
    guest.write(HANDLER, &[0xb0, 0x06, 0xe6, 0x80, 0xf4])?;
    guest.set_idt_gate(6, HANDLER)?;
    guest.expect_exit(GuestExit::IoOut {
        port: 0x80,
        data: vec![6],
    })?;
    guest.expect_exit(GuestExit::Hlt)?;
    Ok(())
}

fn main() {
    harness::main(vec![
        KvmTest::new("real_mode_entry_state", real_mode_entry_state),
        KvmTest::new("long_mode_paging_and_mmio", long_mode_paging_and_mmio),
        KvmTest::new(
            "long_mode_exception_reaches_guest_handler",
            long_mode_exception_reaches_guest_handler,
        ),
    ])
}
