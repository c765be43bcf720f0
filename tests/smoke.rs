//! Smoke tests of the KVM tiers: a VM, a tiny guest that writes a byte to the serial port's
//! I/O address and halts, in real mode and in 64-bit long mode; and, inside the nested test
//! host, proof that the run was on the KVM vendor module the host promised.

use kvm_test_support::harness::{self, vendor_module};
use kvm_test_support::{ensure, ensure_eq, GuestExit, KvmTest, TestError, TestResult, TinyGuest};

const COM1: u16 = 0x3f8;

/// Real mode: `mov al, 0x41 ; mov dx, 0x3f8 ; out dx, al ; hlt`.
fn real_mode_out_then_hlt(kvm: &kvm_ioctls::Kvm) -> TestResult {
    let code = [0xb0, 0x41, 0xba, 0xf8, 0x03, 0xee, 0xf4];
    let mut guest = TinyGuest::real_mode(kvm, &code)?;
    guest.expect_exit(GuestExit::IoOut {
        port: COM1,
        data: vec![0x41],
    })?;
    guest.expect_exit(GuestExit::Hlt)?;
    Ok(())
}

/// Long mode: `mov al, 0x4c ; mov dx, 0x3f8 ; out dx, al ; hlt`, with paging on.
fn long_mode_out_then_hlt(kvm: &kvm_ioctls::Kvm) -> TestResult {
    let code = [0xb0, 0x4c, 0x66, 0xba, 0xf8, 0x03, 0xee, 0xf4];
    let mut guest = TinyGuest::long_mode(kvm, &code)?;
    guest.expect_exit(GuestExit::IoOut {
        port: COM1,
        data: vec![0x4c],
    })?;
    guest.expect_exit(GuestExit::Hlt)?;
    let sregs = guest.vcpu.get_sregs()?;
    ensure!(
        sregs.cs.l == 1 && sregs.cr0 & (1 << 31) != 0,
        "guest did not run in 64-bit mode with paging: cs.l={} cr0={:#x}",
        sregs.cs.l,
        sregs.cr0
    );
    Ok(())
}

/// Inside the nested host the image's init sets `NESTED_KVM_VENDOR` after loading the module;
/// this test proves the vendor module is really there and is what `/dev/kvm` runs on.
fn nested_host_runs_the_promised_vendor_module(_kvm: &kvm_ioctls::Kvm) -> TestResult {
    let Ok(promised) = std::env::var("NESTED_KVM_VENDOR") else {
        return Err(TestError::skip(
            "not inside the nested test host (NESTED_KVM_VENDOR unset)",
        ));
    };
    let found = vendor_module();
    ensure_eq!(
        found,
        Some(promised.as_str()),
        "nested host promised {promised}, /sys/module shows {found:?}"
    );
    Ok(())
}

fn main() {
    harness::main(vec![
        KvmTest::new("real_mode_out_then_hlt", real_mode_out_then_hlt),
        KvmTest::new("long_mode_out_then_hlt", long_mode_out_then_hlt),
        KvmTest::new(
            "nested_host_runs_the_promised_vendor_module",
            nested_host_runs_the_promised_vendor_module,
        ),
    ])
}
