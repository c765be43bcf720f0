//! Putting the vm-types guard in front of a vCPU a VMM already has.
//!
//! A VMM that creates its VM and vCPUs with kvm-ioctls wraps each vCPU in a `GuardedVcpu`,
//! with the guard for the VM's type, and uses the wrapper for vCPU state. Here the VM is a
//! DEFAULT one on the local /dev/kvm running a one-byte `hlt` guest; the example then shows
//! what the same calls give on an SEV-ES VM after its launch, where the guard answers instead
//! of the kernel.
//!
//! Run with `cargo run -p vm-types --example guard_existing_vcpu`.

use std::error::Error;
use std::ptr::NonNull;

use kvm_bindings::{kvm_guest_debug, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_types::{GuardedVcpu, GuestStateGuard, VcpuError, VcpuOp, VmType};

const MEM_SIZE: usize = 0x1000;

/// One page of anonymous memory for the guest, unmapped on drop.
struct GuestPage(NonNull<u8>);

impl GuestPage {
    fn new() -> std::io::Result<Self> {
        // SAFETY: an anonymous private mapping of MEM_SIZE bytes at an address the kernel picks;
        // no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        NonNull::new(addr.cast())
            .map(GuestPage)
            .ok_or_else(|| std::io::Error::other("mmap returned a null mapping"))
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(
            offset + bytes.len() <= MEM_SIZE,
            "write past the guest page"
        );
        // SAFETY: the range lies inside the live mapping (checked above), which nothing else
        // writes while the guest is not running.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0.as_ptr().add(offset), bytes.len())
        };
    }
}

impl Drop for GuestPage {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `new` with MEM_SIZE bytes and is unmapped once.
        unsafe { libc::munmap(self.0.as_ptr().cast(), MEM_SIZE) };
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    // What the VMM already has: a VM, its memory and a vCPU, made with kvm-ioctls.
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    let mut page = GuestPage::new()?;
    page.write(0, &[0xf4]); // hlt
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: page.0.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the region is backed by `page`, which outlives the VM (dropped after `vm`).
    unsafe { vm.set_user_memory_region(region)? };
    let vcpu = vm.create_vcpu(0)?;

    // The guard for the VM's type. This VM is DEFAULT; a VMM that created it with
    // `vm_types::TypedVm` would get guarded vCPUs from it directly.
    let mut vcpu = GuardedVcpu::new(vcpu, GuestStateGuard::launched(VmType::Default));
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = 0;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;
    vcpu.set_guest_debug(&kvm_guest_debug::default())?;
    println!(
        "DEFAULT VM: KVM_SET_SREGS, KVM_SET_REGS and KVM_SET_GUEST_DEBUG went through the guard"
    );
    match vcpu.run()? {
        VcpuExit::Hlt => println!("DEFAULT VM: the guest ran to hlt"),
        other => return Err(format!("unexpected exit {other:?}").into()),
    }

    // The same calls on an SEV-ES VM after KVM_SEV_LAUNCH_UPDATE_VMSA are refused before the
    // kernel is asked. The guard is plain data, so this needs no SEV host.
    let sev_es = GuestStateGuard::launched(VmType::SevEs);
    for op in [
        VcpuOp::SetRegs,
        VcpuOp::SetGuestDebug,
        VcpuOp::GetXsave,
        VcpuOp::GetVcpuEvents,
    ] {
        match sev_es.check(op) {
            Ok(()) => println!("SEV_ES VM after launch: {op} allowed"),
            Err(refusal) => println!("SEV_ES VM after launch: {}", VcpuError::from(refusal)),
        }
    }

    // The VMM can take its vCPU back at any time; the VM goes before its memory.
    let vcpu = vcpu.into_inner();
    drop(vcpu);
    drop(vm);
    drop(page);
    println!("done: the vCPU was handed back and the VM closed");
    Ok(())
}
