//! xstate-perm in front of vCPU creation, CPUID first: the guest permission follows the
//! CPUID the VMM means to give its vCPUs.
//!
//! 1. Build the CPUID the guest should see (here: what KVM supports).
//! 2. Before any vCPU exists in the process, request the guest permission that table needs.
//!    Where the host cannot give it (no AMX on the CPU, or KVM will not expose it), fall back
//!    to what is always permitted and say why.
//! 3. Make the table honest for the permission held, and check it before `KVM_SET_CPUID2`.
//! 4. Create vCPUs through the permission (the proof that step 2 came first).
//! 5. Save a vCPU's extended state and restore it into another one, as a snapshot would.
//!
//! Runs on any x86-64 host with `/dev/kvm`, with or without AMX, and exits 0 when every step
//! succeeded: `cargo run -p xstate-perm --example cpuid_first`.

use std::error::Error;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use xstate_perm::{cpuid, GuestPermission, RequestError, SystemHost, VcpuXstate, XFeatureSet};

fn main() -> Result<(), Box<dyn Error>> {
    let kvm = Kvm::new()?;
    let host = SystemHost::new(&kvm);

    // 1. The CPUID the VMM intends to set. A real VMM edits this table (topology, brand,
    //    features it hides); the permission follows whatever it ends up advertising.
    let intended = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    println!(
        "intended CPUID advertises {}; guest permission it needs: {}",
        cpuid::advertised(&intended),
        cpuid::required_permission(&intended)
    );

    // 2. The request, before the first vCPU of this process.
    let permission = match GuestPermission::request_for_cpuid(&host, &intended) {
        Ok(permission) => permission,
        Err(e @ (RequestError::CpuLacks { .. } | RequestError::KvmWillNotExpose { .. })) => {
            println!("not granted, the guest goes without it: {e}");
            GuestPermission::request(&host, XFeatureSet::LEGACY)?
        }
        Err(e) => return Err(e.into()),
    };
    match permission.requested_via() {
        Some(door) => println!("granted through {door}"),
        None => println!("nothing to request: the process already holds what is needed"),
    }
    println!(
        "guests of this process can use {}",
        permission.guest_features()
    );

    // 3. Nothing in the table may advertise more than the permission gives; the check is
    //    what KVM_SET_CPUID2 would otherwise answer with a bare EPERM.
    let guest_cpuid = permission.guest_cpuid(&intended)?;
    permission.check_cpuid(&guest_cpuid)?;
    println!("guest CPUID advertises {}", cpuid::advertised(&guest_cpuid));

    // 4. vCPUs through the proof.
    let vm = kvm.create_vm()?;
    let vcpu = permission.create_vcpu(&vm, 0)?;
    vcpu.set_cpuid2(&guest_cpuid)?;

    // 5. Extended state out of one vCPU and into another.
    let state = VcpuXstate::save(&vm, &vcpu)?;
    let other = permission.create_vcpu(&vm, 1)?;
    other.set_cpuid2(&guest_cpuid)?;
    state.restore(&permission, &vm, &other)?;
    println!(
        "moved {} bytes of XSAVE state, XCR0 {}, XFD {:#x} into vCPU 1",
        state.xsave.as_bytes().len(),
        state.xcr0().unwrap_or_default(),
        state.xfd
    );
    Ok(())
}
