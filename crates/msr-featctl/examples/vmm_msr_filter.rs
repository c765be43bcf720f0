//! IA32_FEATURE_CONTROL in a VMM that already filters an MSR of its own, on the local
//! `/dev/kvm`, in the order the steps must happen:
//!
//! 1. decide the mode (the probe runs in a child process, so it does not freeze this
//!    process's XSTATE guest permission: a VMM using AMX requests that permission after this
//!    step and before its first vCPU);
//! 2. create the VM; enable MSR exits and install ONE filter with the VMM's own range and,
//!    when emulating, this crate's range for 0x3a (a second KVM_X86_SET_MSR_FILTER would
//!    replace the first);
//! 3. per vCPU: set CPUID through `ConfiguredVcpu`, then the native write, or an
//!    `EmulatedFeatureControl` built from the features KVM exposes;
//! 4. run: MSR exits for 0x3a go to the emulated state, the VMM's own to the VMM.
//!
//! The guest (real mode) reads MSR 0x3a and the VMM's MSR and reports the low bytes on ports
//! 0x80 and 0x81. Run: `cargo run -p msr-featctl --example vmm_msr_filter`.

use std::process::ExitCode;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, MsrExitReason, MsrFilterDefaultAction, MsrFilterRangeFlags, VcpuExit};
use msr_featctl::emulated::{self, FilterRange, MsrFilter};
use msr_featctl::{
    apply_firmware_value, mode, ConfiguredVcpu, EmulatedFeatureControl, KvmSupport, Mode,
    ResolvedMode,
};

/// The MSR this VMM answers itself: MSR_PLATFORM_INFO.
const VMM_MSR: u32 = 0xce;
const VMM_MSR_VALUE: u64 = 0x0c;
const MEM_SIZE: usize = 0x10000;
const CODE: u64 = 0x1000;

/// Real-mode guest: RDMSR 0x3a, report; RDMSR 0xce, report; HLT.
const GUEST: &[u8] = &[
    0x66, 0xb9, 0x3a, 0x00, 0x00, 0x00, // mov ecx, 0x3a
    0x0f, 0x32, // rdmsr
    0xe6, 0x80, // out 0x80, al
    0x66, 0xb9, 0xce, 0x00, 0x00, 0x00, // mov ecx, 0xce
    0x0f, 0x32, // rdmsr
    0xe6, 0x81, // out 0x81, al
    0xf4, // hlt
];

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = e.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let kvm = Kvm::new()?;

    // 1. The mode, from what KVM does with MSR 0x3a.
    let resolution = mode::resolve(&kvm, Mode::Automatic)?;
    println!("IA32_FEATURE_CONTROL: {resolution}");
    let support = KvmSupport::query(&kvm)?;

    // 2. The VM, its MSR exits and its one filter.
    let vm = kvm.create_vm()?;
    let mut filter = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
    filter.push(FilterRange::deny(VMM_MSR, 1, MsrFilterRangeFlags::READ));
    if resolution.mode == ResolvedMode::Emulated {
        filter = filter.with_feature_control();
    }
    emulated::enable_user_space_msr(&vm, MsrExitReason::Filter)?;
    filter.install(&vm)?;
    println!(
        "MSR filter: {} range(s), first at {:#x}",
        filter.ranges().len(),
        filter.ranges()[0].base
    );

    // SAFETY: an anonymous private mapping of MEM_SIZE bytes; no existing memory is touched.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: CODE + GUEST.len() is within the MEM_SIZE-byte mapping created above.
    unsafe {
        std::ptr::copy_nonoverlapping(
            GUEST.as_ptr(),
            mem.cast::<u8>().add(CODE as usize),
            GUEST.len(),
        )
    };
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem as u64,
    };
    // SAFETY: the mapping stays alive until the process exits, longer than the VM.
    unsafe { vm.set_user_memory_region(region) }?;

    // 3. The vCPU: CPUID first, then IA32_FEATURE_CONTROL.
    let mut vcpu = vm.create_vcpu(0)?;
    let configured = ConfiguredVcpu::configure(&vcpu, &support.cpuid, None, &support)?;
    let exposure = configured.exposure();
    let expected = exposure.features.firmware_value();
    let mut feat_ctl = match resolution.mode {
        ResolvedMode::Native => {
            let value = apply_firmware_value(&configured)?;
            println!("native: KVM holds {value}");
            None
        }
        ResolvedMode::Emulated => {
            let state = EmulatedFeatureControl::with_firmware_value(exposure.features);
            println!("emulated: this VMM holds {}", state.value());
            Some(state)
        }
    };
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;

    // 4. Run.
    let mut reported = Vec::new();
    loop {
        let mut exit = vcpu.run()?;
        if let Some(answer) = feat_ctl.as_mut().and_then(|s| s.handle_exit(&mut exit)) {
            println!("guest access of 0x3a answered in userspace: {answer:?}");
            continue;
        }
        match exit {
            VcpuExit::X86Rdmsr(read) if read.index == VMM_MSR => {
                println!("guest RDMSR {VMM_MSR:#x} answered by the VMM's own handler");
                *read.data = VMM_MSR_VALUE;
                *read.error = 0;
            }
            VcpuExit::IoOut(port, data) => reported.push((port, data[0])),
            VcpuExit::Hlt => break,
            other => return Err(format!("unexpected exit {other:?}").into()),
        }
    }
    println!("guest reported {reported:x?}");
    let ok = reported == [(0x80, expected.bits() as u8), (0x81, VMM_MSR_VALUE as u8)];
    println!(
        "{}: the guest saw IA32_FEATURE_CONTROL = {expected} and MSR {VMM_MSR:#x} = {VMM_MSR_VALUE:#x}",
        if ok { "ok" } else { "MISMATCH" }
    );
    Ok(ok)
}
