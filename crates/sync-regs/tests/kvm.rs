//! KVM tests of `RegisterCache` on tiny guests, covering the kernel's sync-regs edges:
//! copy-out equals the GET ioctls, writes take effect and are never lost, the selection
//! changes between runs, the per-set ioctl fallback, masks the kernel would reject, images it
//! rejects, `immediate_exit`, protected-state VM types, an application processor waiting for
//! INIT/SIPI, and the order of mixed ioctl and sync-regs writes.

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use kvm_test_support::guest::TinyGuest;
use kvm_test_support::{ensure, ensure_eq, harness, KvmTest, Requirement, TestError, TestResult};
use sync_regs::{Error, RegKind, RegSet, RegisterCache};
use vm_memory::GuestMemoryMmap;
use vm_types::{GuestStateGuard, VcpuOp, VmType};

/// `loop: out 0x80, al ; jmp loop`.
const OUT_LOOP: [u8; 4] = [0xe6, 0x80, 0xeb, 0xfc];
const PORT: u16 = 0x80;
const CR4_PAE: u64 = 1 << 5;
const NMI_VECTOR: u8 = 2;
/// Where RIP may point at an `out` exit: at the instruction (kvm-amd on Linux 6.1 defers the
/// skip to the completion of the PIO on the next KVM_RUN) or past it (the local PVM KVM).
const RIP_AT_OUT: [u64; 2] = [0x1_0000, 0x1_0002];

/// A long-mode guest in its `out` loop: the test is its run loop, owning the vCPU, with a
/// `RegisterCache` beside it.
struct Guest {
    vcpu: VcpuFd,
    regs: RegisterCache,
    _vm: VmFd,
    _mem: GuestMemoryMmap,
}

impl Guest {
    /// One `KVM_RUN` through the cache, the exit turned into its debug text.
    fn run(&mut self) -> Result<String, Error> {
        self.regs.run(&mut self.vcpu, |exit| format!("{exit:?}"))
    }
}

fn cache(vm: &VmFd, offered: Option<RegSet>) -> Result<RegisterCache, TestError> {
    Ok(match offered {
        None => RegisterCache::new(vm, VmType::Default),
        Some(set) => RegisterCache::with_offered(GuestStateGuard::new(VmType::Default), set)?,
    })
}

fn guest(kvm: &Kvm, offered: Option<RegSet>) -> Result<Guest, TestError> {
    let TinyGuest { vm, vcpu, mem, .. } = TinyGuest::long_mode(kvm, &OUT_LOOP)?;
    Ok(Guest {
        regs: cache(&vm, offered)?,
        vcpu,
        _vm: vm,
        _mem: mem,
    })
}

/// The byte a guest wrote to `port`, or what the exit was instead.
fn out_to(port: u16, exit: VcpuExit<'_>) -> Result<u8, String> {
    match exit {
        VcpuExit::IoOut(p, [value]) if p == port => Ok(*value),
        other => Err(format!("expected out to {port:#x}, got {other:?}")),
    }
}

/// Runs to the next exit and returns the byte the guest wrote to PORT.
fn next_out(g: &mut Guest) -> Result<u8, TestError> {
    g.regs
        .run(&mut g.vcpu, |exit| out_to(PORT, exit))?
        .map_err(TestError::fail)
}

fn sync_regs_all() -> Requirement {
    Requirement::RawCapMask(
        kvm_bindings::KVM_CAP_SYNC_REGS,
        "KVM_CAP_SYNC_REGS",
        RegSet::ALL.bits(),
    )
}

/// The offered sets come from the VM's capability; the default selection is regs.
fn offered_sets_follow_the_capability(kvm: &Kvm) -> TestResult {
    let g = guest(kvm, None)?;
    let cap = g
        ._vm
        .check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_SYNC_REGS));
    ensure_eq!(
        g.regs.offered().bits(),
        u64::try_from(cap).unwrap_or(0) & RegSet::ALL.bits(),
        "offered {} but the VM reports {cap:#x}",
        g.regs.offered()
    );
    ensure_eq!(
        g.regs.selection(),
        RegSet::REGS,
        "default selection {}",
        g.regs.selection()
    );
    ensure!(
        g.regs.dirty().is_empty(),
        "fresh vCPU has dirty sets {}",
        g.regs.dirty()
    );
    ensure_eq!(
        g.regs.guard().vm_type(),
        VmType::Default,
        "guard for the wrong type"
    );
    let debug = format!("{:?}", g.regs);
    ensure!(
        debug.contains("selection: RegSet(regs)") && debug.contains("Default"),
        "debug output: {debug}"
    );
    Ok(())
}

/// Reads served from the kvm_run copies equal what the GET ioctls return.
fn reads_equal_get_ioctls(kvm: &Kvm) -> TestResult {
    let mut g = guest(kvm, None)?;
    g.regs.set_selection(RegSet::ALL)?;
    g.regs.regs_mut(&g.vcpu)?.rax = 0x1234_5678_9abc_de42;
    ensure_eq!(next_out(&mut g)?, 0x42, "guest did not see the RAX write");
    let via_sync: (kvm_regs, kvm_sregs, kvm_vcpu_events) = (
        *g.regs.regs(&g.vcpu)?,
        *g.regs.sregs(&g.vcpu)?,
        *g.regs.events(&g.vcpu)?,
    );
    let vcpu = &g.vcpu;
    let via_ioctl = (vcpu.get_regs()?, vcpu.get_sregs()?, vcpu.get_vcpu_events()?);
    ensure_eq!(
        via_sync.0,
        via_ioctl.0,
        "regs differ:\n{:?}\n{:?}",
        via_sync.0,
        via_ioctl.0
    );
    ensure_eq!(
        via_sync.1,
        via_ioctl.1,
        "sregs differ:\n{:?}\n{:?}",
        via_sync.1,
        via_ioctl.1
    );
    ensure_eq!(
        via_sync.2,
        via_ioctl.2,
        "events differ:\n{:?}\n{:?}",
        via_sync.2,
        via_ioctl.2
    );
    // The copy really is the kernel's: kvm_run holds the same images.
    let shared = g.vcpu.sync_regs();
    ensure_eq!(
        shared.regs,
        via_ioctl.0,
        "kvm_run regs differ from KVM_GET_REGS"
    );
    ensure_eq!(
        shared.sregs,
        via_ioctl.1,
        "kvm_run sregs differ from KVM_GET_SREGS"
    );
    let rip = via_sync.0.rip;
    ensure!(RIP_AT_OUT.contains(&rip), "RIP at the out exit is {rip:#x}");
    let dump = g.regs.dump(&g.vcpu)?.to_string();
    ensure!(
        dump.contains("RAX=123456789abcde42") && dump.contains(&format!("RIP={rip:016x}")),
        "dump lacks RAX/RIP:\n{dump}"
    );
    Ok(())
}

/// A write through kvm_run takes effect in the guest, and no write is lost over many runs
/// while the copy-out selection changes between them.
fn writes_take_effect_across_selection_changes(kvm: &Kvm) -> TestResult {
    let mut g = guest(kvm, None)?;
    let selections = [
        RegSet::EMPTY,
        RegSet::REGS,
        RegSet::SREGS,
        RegSet::ALL,
        RegSet::REGS | RegSet::EVENTS,
    ];
    let mut expected = 0u8;
    next_out(&mut g)?;
    let exit_rip = g.regs.regs(&g.vcpu)?.rip;
    ensure!(
        RIP_AT_OUT.contains(&exit_rip),
        "RIP at the out exit is {exit_rip:#x}"
    );
    for round in 0..100u32 {
        let selection = selections[round as usize % selections.len()];
        // Read-modify-write of RAX, as an emulator does; RIP is read too.
        let regs = g.regs.regs_mut(&g.vcpu)?;
        ensure_eq!(regs.rip, exit_rip, "round {round}: RIP {:#x}", regs.rip);
        ensure_eq!(
            regs.rax as u8,
            expected,
            "round {round}: RAX {:#x}, expected low byte {expected:#x}",
            regs.rax
        );
        regs.rax = regs.rax.wrapping_add(3);
        expected = expected.wrapping_add(3);
        g.regs.set_selection(selection)?;
        ensure_eq!(
            g.regs.dirty(),
            RegSet::REGS,
            "round {round}: dirty {}",
            g.regs.dirty()
        );
        let out = next_out(&mut g)?;
        ensure_eq!(
            out,
            expected,
            "round {round}: guest wrote {out:#x}, expected {expected:#x}"
        );
        ensure!(
            g.regs.dirty().is_empty(),
            "round {round}: still dirty {}",
            g.regs.dirty()
        );
    }
    // Whole-set writes as well: RBX survives a run in which nothing else was written.
    let mut regs = *g.regs.regs(&g.vcpu)?;
    regs.rbx = 0xb0b;
    g.regs.set_regs(&regs)?;
    next_out(&mut g)?;
    ensure_eq!(g.vcpu.get_regs()?.rbx, 0xb0b, "RBX write lost");
    ensure_eq!(g.regs.regs(&g.vcpu)?.rbx, 0xb0b, "RBX read back wrong");
    Ok(())
}

/// Sets outside the offered mask: regs and events through kvm_run, sregs through
/// KVM_GET/SET_SREGS, with an invalid sregs image refused by the ioctl before KVM_RUN.
fn fallback_for_a_set_not_offered(kvm: &Kvm) -> TestResult {
    let offered = RegSet::REGS | RegSet::EVENTS;
    let mut g = guest(kvm, Some(offered))?;
    match g.regs.set_selection(RegSet::ALL) {
        Err(Error::NotOffered { requested, .. }) if requested == RegSet::SREGS => {}
        other => return Err(TestError::fail(format!("selecting sregs gave {other:?}"))),
    }
    g.regs.set_selection(offered)?;
    next_out(&mut g)?;
    let sregs = *g.regs.sregs(&g.vcpu)?;
    ensure_eq!(
        sregs,
        g.vcpu.get_sregs()?,
        "sregs read differs from KVM_GET_SREGS"
    );
    ensure_eq!(
        g.vcpu.sync_regs().sregs,
        kvm_sregs::default(),
        "the kernel copied sregs out although they were never selected"
    );
    // A write through the fallback: CR2 is harmless to change.
    g.regs.sregs_mut(&g.vcpu)?.cr2 = 0xcafe_f00d;
    g.regs.regs_mut(&g.vcpu)?.rax = 7;
    ensure_eq!(next_out(&mut g)?, 7, "regs write lost");
    ensure_eq!(g.vcpu.get_sregs()?.cr2, 0xcafe_f00d, "sregs write lost");
    // An invalid image through the fallback fails at KVM_SET_SREGS, before KVM_RUN.
    g.regs.sregs_mut(&g.vcpu)?.cr4 &= !CR4_PAE;
    match g.run() {
        Err(Error::Ioctl {
            op: VcpuOp::SetSregs,
            source,
        }) if source.errno() == libc::EINVAL => {}
        Err(other) => return Err(TestError::fail(format!("invalid sregs gave {other}"))),
        Ok(exit) => return Err(TestError::fail(format!("invalid sregs ran: {exit:?}"))),
    }
    ensure!(
        g.regs.dirty().contains(RegKind::Sregs),
        "rejected sregs write dropped"
    );
    g.regs.sregs_mut(&g.vcpu)?.cr4 |= CR4_PAE;
    next_out(&mut g)?;
    ensure!(g.regs.dirty().is_empty(), "still dirty: {}", g.regs.dirty());
    Ok(())
}

/// Masks KVM_RUN would reject are refused by the API before KVM_RUN; the raw kernel check
/// is shown to be real, and the vCPU keeps running with its previous selection.
fn masks_outside_the_supported_set_are_refused(kvm: &Kvm) -> TestResult {
    // The kernel rule: a kvm_valid_regs bit outside KVM_SYNC_X86_VALID_FIELDS fails KVM_RUN.
    let mut raw = TinyGuest::long_mode(kvm, &OUT_LOOP)?;
    raw.vcpu.get_kvm_run().kvm_valid_regs = 1 << 3;
    match raw.vcpu.run() {
        Err(e) if e.errno() == libc::EINVAL => {}
        other => return Err(TestError::fail(format!("raw bad mask gave {other:?}"))),
    }

    let mut g = guest(kvm, Some(RegSet::REGS))?;
    match g.regs.set_selection_bits(0x9) {
        Err(Error::InvalidMask(bad)) if bad.unknown == 0x8 => {}
        other => return Err(TestError::fail(format!("mask 0x9 gave {other:?}"))),
    }
    match g.regs.set_selection(RegSet::REGS | RegSet::SREGS) {
        Err(e @ Error::NotOffered { .. }) => {
            let text = e.to_string();
            ensure!(
                text.contains("sregs") && text.contains("EINVAL"),
                "unclear: {text}"
            );
        }
        other => return Err(TestError::fail(format!("sregs selection gave {other:?}"))),
    }
    ensure_eq!(
        g.regs.selection(),
        RegSet::REGS,
        "selection changed to {}",
        g.regs.selection()
    );
    g.regs.regs_mut(&g.vcpu)?.rax = 0x5a;
    ensure_eq!(next_out(&mut g)?, 0x5a, "vCPU unusable after refused masks");
    Ok(())
}

/// An invalid sregs image through kvm_run: KVM_RUN fails with EINVAL, the regs written in the
/// same batch are applied, sregs stay dirty and are reported; after correction the vCPU runs.
fn invalid_sregs_image_is_reported_and_kept(kvm: &Kvm) -> TestResult {
    let mut g = guest(kvm, None)?;
    g.regs.set_selection(RegSet::REGS | RegSet::SREGS)?;
    next_out(&mut g)?;
    let good_cr4 = g.regs.sregs(&g.vcpu)?.cr4;
    g.regs.regs_mut(&g.vcpu)?.rax = 0x11;
    // Long mode (EFER.LME, CR0.PG) without CR4.PAE: kvm_is_valid_sregs() refuses it.
    g.regs.sregs_mut(&g.vcpu)?.cr4 &= !CR4_PAE;
    match g.run() {
        Err(Error::ImageRejected {
            rejected: RegKind::Sregs,
            pending,
            source,
        }) if pending == RegSet::SREGS && source.errno() == libc::EINVAL => {}
        Err(other) => return Err(TestError::fail(format!("invalid sregs gave {other}"))),
        Ok(exit) => return Err(TestError::fail(format!("invalid sregs ran: {exit:?}"))),
    }
    ensure_eq!(
        g.regs.dirty(),
        RegSet::SREGS,
        "dirty after rejection: {}",
        g.regs.dirty()
    );
    ensure_eq!(
        g.regs.sregs(&g.vcpu)?.cr4 & CR4_PAE,
        0,
        "pending image lost"
    );
    let vcpu_sregs = g.vcpu.get_sregs()?;
    ensure_eq!(
        vcpu_sregs.cr4,
        good_cr4,
        "kernel applied part of the bad image"
    );
    ensure_eq!(
        g.vcpu.get_regs()?.rax,
        0x11,
        "regs of the same batch not applied"
    );
    // Running again without a correction fails the same way: nothing is silently dropped.
    ensure!(
        matches!(
            g.run(),
            Err(Error::ImageRejected {
                rejected: RegKind::Sregs,
                ..
            })
        ),
        "second run with the bad image did not fail"
    );
    g.regs.sregs_mut(&g.vcpu)?.cr4 |= CR4_PAE;
    ensure_eq!(next_out(&mut g)?, 0x11, "vCPU unusable after correction");
    ensure!(g.regs.dirty().is_empty(), "still dirty: {}", g.regs.dirty());
    Ok(())
}

/// An invalid events image (an injected exception with the NMI vector, which
/// kvm_vcpu_ioctl_x86_set_vcpu_events refuses) behaves the same way.
fn invalid_events_image_is_reported_and_kept(kvm: &Kvm) -> TestResult {
    let mut g = guest(kvm, None)?;
    g.regs.set_selection(RegSet::ALL)?;
    next_out(&mut g)?;
    let events = g.regs.events_mut(&g.vcpu)?;
    events.exception.injected = 1;
    events.exception.nr = NMI_VECTOR;
    match g.run() {
        Err(Error::ImageRejected {
            rejected: RegKind::Events,
            pending,
            ..
        }) if pending == RegSet::EVENTS => {}
        Err(other) => return Err(TestError::fail(format!("invalid events gave {other}"))),
        Ok(exit) => return Err(TestError::fail(format!("invalid events ran: {exit:?}"))),
    }
    ensure_eq!(
        g.regs.dirty(),
        RegSet::EVENTS,
        "dirty after rejection: {}",
        g.regs.dirty()
    );
    ensure_eq!(
        g.vcpu.get_vcpu_events()?.exception.injected,
        0,
        "kernel applied the bad events"
    );
    // Unknown flags are refused as well.
    let events = g.regs.events_mut(&g.vcpu)?;
    events.exception.injected = 0;
    events.exception.nr = 0;
    events.flags |= 1 << 31;
    ensure!(
        matches!(
            g.run(),
            Err(Error::ImageRejected {
                rejected: RegKind::Events,
                ..
            })
        ),
        "unknown events flag accepted"
    );
    g.regs.events_mut(&g.vcpu)?.flags &= !(1 << 31);
    g.regs.regs_mut(&g.vcpu)?.rax = 0x22;
    ensure_eq!(next_out(&mut g)?, 0x22, "vCPU unusable after correction");
    ensure!(g.regs.dirty().is_empty(), "still dirty: {}", g.regs.dirty());
    Ok(())
}

/// With immediate_exit, KVM_RUN returns EINTR without entering the guest, but still applies
/// dirty sets and stores the selected ones.
fn immediate_exit_applies_and_refreshes(kvm: &Kvm) -> TestResult {
    let mut g = guest(kvm, None)?;
    g.regs.set_selection(RegSet::REGS | RegSet::SREGS)?;
    next_out(&mut g)?;
    // A change made behind the type's back, only the kernel's copy-out can report.
    let mut direct = g.vcpu.get_regs()?;
    direct.rbx = 0x1234;
    g.vcpu.set_regs(&direct)?;
    g.regs.sregs_mut(&g.vcpu)?.cr2 = 0xdead_0000;
    g.vcpu.set_kvm_immediate_exit(1);
    match g.run() {
        Err(Error::Run(e)) if e.errno() == libc::EINTR => {}
        Err(other) => return Err(TestError::fail(format!("immediate exit gave {other}"))),
        Ok(exit) => return Err(TestError::fail(format!("immediate exit ran: {exit:?}"))),
    }
    g.vcpu.set_kvm_immediate_exit(0);
    ensure!(
        g.regs.dirty().is_empty(),
        "dirty after EINTR: {}",
        g.regs.dirty()
    );
    ensure_eq!(
        g.vcpu.get_sregs()?.cr2,
        0xdead_0000,
        "sregs not applied on EINTR"
    );
    ensure_eq!(
        g.vcpu.sync_regs().regs.rbx,
        0x1234,
        "kvm_run regs not stored on EINTR"
    );
    ensure_eq!(
        g.regs.regs(&g.vcpu)?.rbx,
        0x1234,
        "read after EINTR missed the refresh"
    );
    ensure_eq!(
        g.regs.regs(&g.vcpu)?.rip,
        0x1_0002,
        "guest moved during an immediate exit"
    );
    g.regs.regs_mut(&g.vcpu)?.rax = 0x33;
    ensure_eq!(
        next_out(&mut g)?,
        0x33,
        "vCPU unusable after immediate exit"
    );
    Ok(())
}

/// Protected-state VM types: the guard refuses sync regs and register ioctls before KVM is
/// asked (no protected VM can be created here, so the type is asserted on a default VM).
fn protected_state_types_refuse_sync_regs(kvm: &Kvm) -> TestResult {
    for ty in [VmType::SevEs, VmType::Snp, VmType::Tdx] {
        let TinyGuest { vm, .. } = TinyGuest::long_mode(kvm, &OUT_LOOP)?;
        match RegisterCache::with_offered(GuestStateGuard::new(ty), RegSet::REGS) {
            Err(e @ Error::SyncRegsRefused { .. }) => {
                ensure!(e.errno().is_none(), "{ty:?}: refusal claims an errno");
            }
            other => {
                return Err(TestError::fail(format!(
                    "{ty:?}: with_offered gave {other:?}"
                )))
            }
        }
        let vcpu = vm.create_vcpu(1)?;
        let mut regs = RegisterCache::new(&vm, ty);
        ensure!(
            regs.offered().is_empty(),
            "{ty:?}: offered {}",
            regs.offered()
        );
        ensure!(
            regs.selection().is_empty(),
            "{ty:?}: selection {}",
            regs.selection()
        );
        match regs.regs(&vcpu) {
            Err(Error::Refused {
                op: VcpuOp::GetRegs,
                ..
            }) => {}
            other => return Err(TestError::fail(format!("{ty:?}: regs() gave {other:?}"))),
        }
        match regs.set_sregs(&kvm_sregs::default()) {
            Err(Error::Refused {
                op: VcpuOp::SetSregs,
                ..
            }) => {}
            other => return Err(TestError::fail(format!("{ty:?}: set_sregs gave {other:?}"))),
        }
        ensure!(
            regs.dirty().is_empty(),
            "{ty:?}: refused write marked dirty"
        );
    }
    // Plain SEV encrypts memory only: sync regs stay allowed.
    RegisterCache::with_offered(GuestStateGuard::new(VmType::Sev), RegSet::ALL)?;
    Ok(())
}

/// A cache made from a typed VM handle follows the VM's launch: on a VM the guard takes for
/// SEV-ES (a DEFAULT VM told its type, since no host here has SEV-ES), register set-up before
/// launch reaches the kernel, and after `mark_launched` every register ioctl is refused
/// before the kernel is asked (`kvm_arch_vcpu_ioctl_get_regs` and its siblings refuse once
/// `guest_state_protected` is set by `__sev_launch_update_vmsa`, Linux 6.10+).
fn typed_vm_cache_follows_the_launch(kvm: &Kvm) -> TestResult {
    let TinyGuest { vm, .. } = TinyGuest::long_mode(kvm, &OUT_LOOP)?;
    let vm = vm_types::TypedVm::assume_type(vm, VmType::SevEs);
    let permission = xstate_perm::GuestPermission::request(
        &xstate_perm::SystemHost::new(kvm),
        xstate_perm::XFeatureSet::LEGACY,
    )
    .map_err(|e| TestError::fail(format!("settling the XSTATE permission: {e}")))?;
    let vcpu = permission.create_vcpu(vm.fd(), 1)?;
    let mut regs = RegisterCache::for_vm(&vm);
    ensure!(regs.offered().is_empty(), "offered {}", regs.offered());
    regs.regs_mut(&vcpu)?.rax = 0x5e5;
    regs.flush(&vcpu)?;
    ensure_eq!(
        vcpu.get_regs()?.rax,
        0x5e5,
        "pre-launch write through the cache"
    );
    vm.mark_launched();
    match regs.set_regs(&kvm_regs::default()) {
        Err(Error::Refused {
            op: VcpuOp::SetRegs,
            ..
        }) => {}
        other => {
            return Err(TestError::fail(format!(
                "set_regs after launch gave {other:?}"
            )))
        }
    }
    regs.invalidate(RegSet::REGS);
    match regs.regs(&vcpu) {
        Err(Error::Refused {
            op: VcpuOp::GetRegs,
            ..
        }) => {}
        other => {
            return Err(TestError::fail(format!(
                "regs() after launch gave {other:?}"
            )))
        }
    }
    ensure!(regs.dirty().is_empty(), "a refused write is pending");
    Ok(())
}

/// Without sync regs at all (offered: none) every access goes through ioctls and behaves the
/// same; `flush` applies pending writes without running.
fn ioctls_only_and_flush(kvm: &Kvm) -> TestResult {
    let mut g = guest(kvm, Some(RegSet::EMPTY))?;
    ensure!(
        g.regs.selection().is_empty(),
        "selection {}",
        g.regs.selection()
    );
    next_out(&mut g)?;
    g.regs.regs_mut(&g.vcpu)?.rax = 0x44;
    g.regs.events_mut(&g.vcpu)?;
    g.regs.flush(&g.vcpu)?;
    ensure!(
        g.regs.dirty().is_empty(),
        "dirty after flush: {}",
        g.regs.dirty()
    );
    ensure_eq!(g.vcpu.get_regs()?.rax, 0x44, "flush did not apply regs");
    ensure_eq!(
        next_out(&mut g)?,
        0x44,
        "guest did not see the flushed write"
    );
    // invalidate: a change through vcpu() is seen after invalidation.
    g.regs.regs(&g.vcpu)?;
    let mut direct = g.vcpu.get_regs()?;
    direct.rdx = 0xd0d0;
    g.vcpu.set_regs(&direct)?;
    g.regs.invalidate(RegSet::REGS);
    ensure_eq!(
        g.regs.regs(&g.vcpu)?.rdx,
        0xd0d0,
        "invalidate did not drop the cached regs"
    );
    Ok(())
}

/// Where the tests map the local APIC page (PDPT entry 3, a page directory of their own).
const APIC_PD_ADDR: u64 = 0x9000;
/// The xAPIC registers' guest-physical base (IA32_APIC_BASE after reset).
const APIC_BASE: u64 = 0xfee0_0000;
/// The SIPI vector: the AP starts in real mode at `vector << 12`.
const SIPI_VECTOR: u8 = 0x20;
const AP_CODE_ADDR: u64 = (SIPI_VECTOR as u64) << 12;
const AP_PORT: u16 = 0x81;

/// The BSP: enables its local APIC, sends INIT then SIPI (vector `SIPI_VECTOR`) to APIC ID 1
/// through the xAPIC ICR, reports with `out 0x80` and halts.
fn bsp_sends_init_sipi() -> Vec<u8> {
    let mut code = vec![0xbf]; // mov edi, APIC_BASE (zero-extended into rdi)
    code.extend_from_slice(&(APIC_BASE as u32).to_le_bytes());
    // mov dword [rdi + disp32], imm32
    let mut store = |offset: u32, value: u32| {
        code.extend_from_slice(&[0xc7, 0x87]);
        code.extend_from_slice(&offset.to_le_bytes());
        code.extend_from_slice(&value.to_le_bytes());
    };
    store(0xf0, 0x1ff); // SVR: APIC software-enabled, spurious vector 0xff
    store(0x310, 1 << 24); // ICR high: destination APIC ID 1
    store(0x300, 0x4500); // ICR low: INIT, level assert
    store(0x310, 1 << 24);
    store(0x300, 0x4600 | u32::from(SIPI_VECTOR)); // start-up IPI
    code.extend_from_slice(&[
        0xe6, 0x80, // out 0x80, al
        0xf4, // hlt
    ]);
    code
}

/// The AP, in real mode at CS = SIPI_VECTOR << 8, IP 0: `out 0x81, al` twice, `hlt`.
const AP_CODE: [u8; 5] = [0xe6, 0x81, 0xe6, 0x81, 0xf4];

/// A write to an application processor that waits for INIT/SIPI is refused with a typed
/// error and stays pending (not lost), and is never staged over the SIPI start. On the raw
/// path, where the VMM opts in, the kernel leaves it pending: `kvm_arch_vcpu_ioctl_run`
/// returns EINTR for an `immediate_exit` run of a vCPU in `KVM_MP_STATE_UNINITIALIZED`
/// without calling `sync_regs()`, so `kvm_dirty_regs` still holds the set. After INIT/SIPI
/// from the BSP the AP starts at the SIPI vector (`kvm_vcpu_deliver_sipi_vector`), and a
/// write at its first exit is applied.
fn ap_write_before_sipi_is_kept_and_sipi_start_wins(kvm: &Kvm) -> TestResult {
    let vm = kvm.create_vm()?;
    vm.create_irq_chip()?;
    let mut bsp = TinyGuest::build(
        vm,
        kvm_test_support::guest::Mode::Long,
        2 << 20,
        &bsp_sends_init_sipi(),
    )?;
    // Map the APIC page for the BSP: PDPT[3] -> a page directory whose 2 MiB entry 503
    // covers 0xfee00000 (present, writable, large page).
    bsp.write(0x4000 + 3 * 8, &(APIC_PD_ADDR | 0x3).to_le_bytes())?;
    let pde = ((APIC_BASE - (3 << 30)) >> 21) * 8;
    bsp.write(APIC_PD_ADDR + pde, &(APIC_BASE | 0x83).to_le_bytes())?;
    bsp.write(AP_CODE_ADDR, &AP_CODE)?;
    let mut ap = bsp.vm.create_vcpu(1)?;
    let before = ap.get_mp_state()?.mp_state;
    if before != kvm_bindings::KVM_MP_STATE_UNINITIALIZED {
        return Err(TestError::skip(format!(
            "this KVM does not hold an AP in wait-for-SIPI (KVM_GET_MP_STATE = {before} after \
             KVM_CREATE_VCPU with an in-kernel irqchip)"
        )));
    }
    let mut regs = RegisterCache::new(&bsp.vm, VmType::Default);
    let original = ap.get_regs()?;
    regs.regs_mut(&ap)?.rax = 0x5a;
    match regs.stage(&mut ap) {
        Err(Error::NotRunnable { mp_state, pending })
            if mp_state == kvm_bindings::KVM_MP_STATE_UNINITIALIZED && pending == RegSet::REGS => {}
        other => return Err(TestError::fail(format!("stage before SIPI gave {other:?}"))),
    }
    ensure_eq!(
        regs.dirty(),
        RegSet::REGS,
        "refused write lost: dirty {}",
        regs.dirty()
    );
    ensure_eq!(regs.regs(&ap)?.rax, 0x5a, "refused write's image lost");
    ensure_eq!(
        ap.get_kvm_run().kvm_dirty_regs,
        0,
        "refused write was staged"
    );
    ensure_eq!(ap.get_regs()?, original, "refused write reached the vCPU");

    // Opted in, the write is staged; an immediate_exit run returns EINTR without sync_regs().
    regs.allow_writes_before_sipi();
    ap.set_kvm_immediate_exit(1);
    match regs.run(&mut ap, |exit| format!("{exit:?}")) {
        Err(Error::Run(e)) if e.errno() == libc::EINTR => {}
        other => {
            return Err(TestError::fail(format!(
                "immediate exit before SIPI gave {other:?}"
            )))
        }
    }
    ap.set_kvm_immediate_exit(0);
    ensure_eq!(
        regs.dirty(),
        RegSet::REGS,
        "write reported applied although the kernel did not apply it: dirty {}",
        regs.dirty()
    );
    ensure_eq!(
        ap.get_regs()?.rax,
        original.rax,
        "KVM_GET_REGS changed before SIPI"
    );
    // The VMM drops the write rather than have it overwrite the SIPI start.
    regs.discard(RegSet::REGS);

    match bsp.run()? {
        kvm_test_support::guest::GuestExit::IoOut { port: 0x80, .. } => {}
        other => {
            return Err(TestError::fail(format!(
                "BSP: expected out 0x80, got {other:?}"
            )))
        }
    }
    // The AP's KVM_RUN takes INIT and SIPI (EAGAIN), then runs from the SIPI vector.
    let mut first = None;
    for _ in 0..100 {
        match regs.run(&mut ap, |exit| out_to(AP_PORT, exit)) {
            Err(Error::Run(e)) if matches!(e.errno(), libc::EAGAIN | libc::EINTR) => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            other => {
                first = Some(other?);
                break;
            }
        }
    }
    let Some(first) = first else {
        return Err(TestError::fail("AP never left its wait for SIPI"));
    };
    first.map_err(TestError::fail)?;
    let cs = regs.sregs(&ap)?.cs;
    ensure!(
        cs.selector == u16::from(SIPI_VECTOR) << 8 && cs.base == AP_CODE_ADDR,
        "AP not at its SIPI start: CS {:#x} base {:#x}",
        cs.selector,
        cs.base
    );
    let rip = regs.regs(&ap)?.rip;
    ensure!(rip == 0 || rip == 2, "AP RIP {rip:#x} at its first out");
    // After SIPI a write at an exit reaches the AP.
    regs.regs_mut(&ap)?.rax = 0x77;
    let second = regs
        .run(&mut ap, |exit| out_to(AP_PORT, exit))?
        .map_err(TestError::fail)?;
    ensure_eq!(
        second,
        0x77,
        "AP wrote {second:#x} after the write, expected 0x77"
    );
    Ok(())
}

/// `#UD`, the exception the tests queue.
const UD_VECTOR: u8 = 6;
const HANDLER_ADDR: u64 = 0x1_0100;
const HANDLER_PORT: u16 = 0x82;
/// The `#UD` handler: `mov al, 0xee ; out 0x82, al ; hlt`.
const UD_HANDLER: [u8; 5] = [0xb0, 0xee, 0xe6, 0x82, 0xf4];

/// A pending exception set through events survives a regs write made for the same entry,
/// whether events go through `kvm_run` or by ioctl: `__set_regs()` clears
/// `vcpu->arch.exception.pending`, so regs must reach the vCPU before events, as the kernel's
/// own `sync_regs()` orders them (regs, sregs, events). With events by ioctl and regs
/// through `kvm_run`, a cache that applied the ioctl first would lose the exception.
fn pending_exception_survives_a_regs_write(kvm: &Kvm) -> TestResult {
    for offered in [RegSet::REGS, RegSet::ALL, RegSet::EMPTY] {
        let vm = kvm.create_vm()?;
        vm.enable_cap(&kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_EXCEPTION_PAYLOAD,
            args: [1, 0, 0, 0],
            ..Default::default()
        })?;
        let tiny = TinyGuest::with_vm(vm, kvm_test_support::guest::Mode::Long, &OUT_LOOP)?;
        tiny.write(HANDLER_ADDR, &UD_HANDLER)?;
        tiny.set_idt_gate(UD_VECTOR, HANDLER_ADDR)?;
        let TinyGuest { vm, vcpu, mem, .. } = tiny;
        let mut g = Guest {
            regs: cache(&vm, Some(offered))?,
            vcpu,
            _vm: vm,
            _mem: mem,
        };
        next_out(&mut g)?;
        g.regs.regs_mut(&g.vcpu)?.rax = 0x11;
        let events = g.regs.events_mut(&g.vcpu)?;
        events.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_PAYLOAD;
        events.exception.pending = 1;
        events.exception.injected = 0;
        events.exception.nr = UD_VECTOR;
        events.exception.has_error_code = 0;
        events.exception_has_payload = 0;
        let port = g
            .regs
            .run(&mut g.vcpu, |exit| match exit {
                VcpuExit::IoOut(port, _) => Ok(port),
                other => Err(format!("{other:?}")),
            })?
            .map_err(TestError::fail)?;
        ensure_eq!(
            port,
            HANDLER_PORT,
            "offered {offered}: the guest wrote port {port:#x}: the queued #UD was lost"
        );
        ensure!(
            g.regs.dirty().is_empty(),
            "offered {offered}: still dirty {}",
            g.regs.dirty()
        );
    }
    Ok(())
}

fn main() {
    let tests = vec![
        KvmTest::new(
            "offered_sets_follow_the_capability",
            offered_sets_follow_the_capability,
        )
        .requires(Requirement::Cap(Cap::SyncRegs)),
        KvmTest::new("reads_equal_get_ioctls", reads_equal_get_ioctls).requires(sync_regs_all()),
        KvmTest::new(
            "writes_take_effect_across_selection_changes",
            writes_take_effect_across_selection_changes,
        )
        .requires(sync_regs_all()),
        KvmTest::new(
            "fallback_for_a_set_not_offered",
            fallback_for_a_set_not_offered,
        )
        .requires(sync_regs_all()),
        KvmTest::new(
            "masks_outside_the_supported_set_are_refused",
            masks_outside_the_supported_set_are_refused,
        )
        .requires(Requirement::Cap(Cap::SyncRegs)),
        KvmTest::new(
            "invalid_sregs_image_is_reported_and_kept",
            invalid_sregs_image_is_reported_and_kept,
        )
        .requires(sync_regs_all()),
        KvmTest::new(
            "invalid_events_image_is_reported_and_kept",
            invalid_events_image_is_reported_and_kept,
        )
        .requires(sync_regs_all()),
        KvmTest::new(
            "immediate_exit_applies_and_refreshes",
            immediate_exit_applies_and_refreshes,
        )
        .requires(sync_regs_all()),
        KvmTest::new(
            "protected_state_types_refuse_sync_regs",
            protected_state_types_refuse_sync_regs,
        ),
        KvmTest::new("ioctls_only_and_flush", ioctls_only_and_flush),
        KvmTest::new(
            "typed_vm_cache_follows_the_launch",
            typed_vm_cache_follows_the_launch,
        ),
        KvmTest::new(
            "ap_write_before_sipi_is_kept_and_sipi_start_wins",
            ap_write_before_sipi_is_kept_and_sipi_start_wins,
        )
        .requires(Requirement::Cap(Cap::Irqchip))
        .requires(sync_regs_all()),
        KvmTest::new(
            "pending_exception_survives_a_regs_write",
            pending_exception_survives_a_regs_write,
        )
        .requires(Requirement::RawCap(
            kvm_bindings::KVM_CAP_EXCEPTION_PAYLOAD,
            "KVM_CAP_EXCEPTION_PAYLOAD",
        ))
        .requires(sync_regs_all()),
    ];
    harness::main(tests)
}
