//! KVM tests of `VcpuRegisters` on a long-mode tiny guest, covering the kernel's sync-regs
//! edges: copy-out equals the GET ioctls, writes take effect and are never lost, the
//! selection changes between runs, the per-set ioctl fallback, masks the kernel would
//! reject, images it rejects, `immediate_exit`, and protected-state VM types.

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VmFd};
use kvm_test_support::guest::TinyGuest;
use kvm_test_support::{ensure, harness, KvmTest, Requirement, TestError, TestResult};
use sync_regs::{Error, RegKind, RegSet, VcpuRegisters};
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

/// A long-mode guest in its `out` loop, its vCPU behind `VcpuRegisters`.
struct Guest {
    regs: VcpuRegisters,
    _vm: VmFd,
    _mem: GuestMemoryMmap,
}

fn guest(kvm: &Kvm, offered: Option<RegSet>) -> Result<Guest, TestError> {
    let TinyGuest { vm, vcpu, mem, .. } = TinyGuest::long_mode(kvm, &OUT_LOOP)?;
    let regs = match offered {
        None => VcpuRegisters::new(&vm, vcpu, VmType::Default),
        Some(set) => VcpuRegisters::with_offered(vcpu, GuestStateGuard::new(VmType::Default), set)?,
    };
    Ok(Guest {
        regs,
        _vm: vm,
        _mem: mem,
    })
}

/// Runs to the next exit and returns the byte the guest wrote to PORT.
fn next_out(regs: &mut VcpuRegisters) -> Result<u8, TestError> {
    match regs.run()? {
        VcpuExit::IoOut(PORT, [value]) => Ok(*value),
        other => Err(TestError::fail(format!(
            "expected out to {PORT:#x}, got {other:?}"
        ))),
    }
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
    ensure!(
        g.regs.offered().bits() == u64::try_from(cap).unwrap_or(0) & RegSet::ALL.bits(),
        "offered {} but the VM reports {cap:#x}",
        g.regs.offered()
    );
    ensure!(
        g.regs.selection() == RegSet::REGS,
        "default selection {}",
        g.regs.selection()
    );
    ensure!(
        g.regs.dirty().is_empty(),
        "fresh vCPU has dirty sets {}",
        g.regs.dirty()
    );
    ensure!(
        g.regs.guard().vm_type() == VmType::Default,
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
    g.regs.regs_mut()?.rax = 0x1234_5678_9abc_de42;
    ensure!(
        next_out(&mut g.regs)? == 0x42,
        "guest did not see the RAX write"
    );
    let via_sync: (kvm_regs, kvm_sregs, kvm_vcpu_events) =
        (*g.regs.regs()?, *g.regs.sregs()?, *g.regs.events()?);
    let vcpu = g.regs.vcpu();
    let via_ioctl = (vcpu.get_regs()?, vcpu.get_sregs()?, vcpu.get_vcpu_events()?);
    ensure!(
        via_sync.0 == via_ioctl.0,
        "regs differ:\n{:?}\n{:?}",
        via_sync.0,
        via_ioctl.0
    );
    ensure!(
        via_sync.1 == via_ioctl.1,
        "sregs differ:\n{:?}\n{:?}",
        via_sync.1,
        via_ioctl.1
    );
    ensure!(
        via_sync.2 == via_ioctl.2,
        "events differ:\n{:?}\n{:?}",
        via_sync.2,
        via_ioctl.2
    );
    // The copy really is the kernel's: kvm_run holds the same images.
    let shared = g.regs.vcpu().sync_regs();
    ensure!(
        shared.regs == via_ioctl.0,
        "kvm_run regs differ from KVM_GET_REGS"
    );
    ensure!(
        shared.sregs == via_ioctl.1,
        "kvm_run sregs differ from KVM_GET_SREGS"
    );
    let rip = via_sync.0.rip;
    ensure!(RIP_AT_OUT.contains(&rip), "RIP at the out exit is {rip:#x}");
    let dump = g.regs.dump()?.to_string();
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
    next_out(&mut g.regs)?;
    let exit_rip = g.regs.regs()?.rip;
    ensure!(
        RIP_AT_OUT.contains(&exit_rip),
        "RIP at the out exit is {exit_rip:#x}"
    );
    for round in 0..100u32 {
        let selection = selections[round as usize % selections.len()];
        // Read-modify-write of RAX, as an emulator does; RIP is read too.
        let regs = g.regs.regs_mut()?;
        ensure!(regs.rip == exit_rip, "round {round}: RIP {:#x}", regs.rip);
        ensure!(
            regs.rax as u8 == expected,
            "round {round}: RAX {:#x}, expected low byte {expected:#x}",
            regs.rax
        );
        regs.rax = regs.rax.wrapping_add(3);
        expected = expected.wrapping_add(3);
        g.regs.set_selection(selection)?;
        ensure!(
            g.regs.dirty() == RegSet::REGS,
            "round {round}: dirty {}",
            g.regs.dirty()
        );
        let out = next_out(&mut g.regs)?;
        ensure!(
            out == expected,
            "round {round}: guest wrote {out:#x}, expected {expected:#x}"
        );
        ensure!(
            g.regs.dirty().is_empty(),
            "round {round}: still dirty {}",
            g.regs.dirty()
        );
    }
    // Whole-set writes as well: RBX survives a run in which nothing else was written.
    let mut regs = *g.regs.regs()?;
    regs.rbx = 0xb0b;
    g.regs.set_regs(&regs)?;
    next_out(&mut g.regs)?;
    ensure!(g.regs.vcpu().get_regs()?.rbx == 0xb0b, "RBX write lost");
    ensure!(g.regs.regs()?.rbx == 0xb0b, "RBX read back wrong");
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
    next_out(&mut g.regs)?;
    let sregs = *g.regs.sregs()?;
    ensure!(
        sregs == g.regs.vcpu().get_sregs()?,
        "sregs read differs from KVM_GET_SREGS"
    );
    ensure!(
        g.regs.vcpu().sync_regs().sregs == kvm_sregs::default(),
        "the kernel copied sregs out although they were never selected"
    );
    // A write through the fallback: CR2 is harmless to change.
    g.regs.sregs_mut()?.cr2 = 0xcafe_f00d;
    g.regs.regs_mut()?.rax = 7;
    ensure!(next_out(&mut g.regs)? == 7, "regs write lost");
    ensure!(
        g.regs.vcpu().get_sregs()?.cr2 == 0xcafe_f00d,
        "sregs write lost"
    );
    // An invalid image through the fallback fails at KVM_SET_SREGS, before KVM_RUN.
    g.regs.sregs_mut()?.cr4 &= !CR4_PAE;
    match g.regs.run() {
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
    g.regs.sregs_mut()?.cr4 |= CR4_PAE;
    next_out(&mut g.regs)?;
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
    ensure!(
        g.regs.selection() == RegSet::REGS,
        "selection changed to {}",
        g.regs.selection()
    );
    g.regs.regs_mut()?.rax = 0x5a;
    ensure!(
        next_out(&mut g.regs)? == 0x5a,
        "vCPU unusable after refused masks"
    );
    Ok(())
}

/// An invalid sregs image through kvm_run: KVM_RUN fails with EINVAL, the regs written in the
/// same batch are applied, sregs stay dirty and are reported; after correction the vCPU runs.
fn invalid_sregs_image_is_reported_and_kept(kvm: &Kvm) -> TestResult {
    let mut g = guest(kvm, None)?;
    g.regs.set_selection(RegSet::REGS | RegSet::SREGS)?;
    next_out(&mut g.regs)?;
    let good_cr4 = g.regs.sregs()?.cr4;
    g.regs.regs_mut()?.rax = 0x11;
    // Long mode (EFER.LME, CR0.PG) without CR4.PAE: kvm_is_valid_sregs() refuses it.
    g.regs.sregs_mut()?.cr4 &= !CR4_PAE;
    match g.regs.run() {
        Err(Error::ImageRejected {
            rejected: RegKind::Sregs,
            pending,
            source,
        }) if pending == RegSet::SREGS && source.errno() == libc::EINVAL => {}
        Err(other) => return Err(TestError::fail(format!("invalid sregs gave {other}"))),
        Ok(exit) => return Err(TestError::fail(format!("invalid sregs ran: {exit:?}"))),
    }
    ensure!(
        g.regs.dirty() == RegSet::SREGS,
        "dirty after rejection: {}",
        g.regs.dirty()
    );
    ensure!(g.regs.sregs()?.cr4 & CR4_PAE == 0, "pending image lost");
    let vcpu_sregs = g.regs.vcpu().get_sregs()?;
    ensure!(
        vcpu_sregs.cr4 == good_cr4,
        "kernel applied part of the bad image"
    );
    ensure!(
        g.regs.vcpu().get_regs()?.rax == 0x11,
        "regs of the same batch not applied"
    );
    // Running again without a correction fails the same way: nothing is silently dropped.
    ensure!(
        matches!(
            g.regs.run(),
            Err(Error::ImageRejected {
                rejected: RegKind::Sregs,
                ..
            })
        ),
        "second run with the bad image did not fail"
    );
    g.regs.sregs_mut()?.cr4 |= CR4_PAE;
    ensure!(
        next_out(&mut g.regs)? == 0x11,
        "vCPU unusable after correction"
    );
    ensure!(g.regs.dirty().is_empty(), "still dirty: {}", g.regs.dirty());
    Ok(())
}

/// An invalid events image (an injected exception with the NMI vector, which
/// kvm_vcpu_ioctl_x86_set_vcpu_events refuses) behaves the same way.
fn invalid_events_image_is_reported_and_kept(kvm: &Kvm) -> TestResult {
    let mut g = guest(kvm, None)?;
    g.regs.set_selection(RegSet::ALL)?;
    next_out(&mut g.regs)?;
    let events = g.regs.events_mut()?;
    events.exception.injected = 1;
    events.exception.nr = NMI_VECTOR;
    match g.regs.run() {
        Err(Error::ImageRejected {
            rejected: RegKind::Events,
            pending,
            ..
        }) if pending == RegSet::EVENTS => {}
        Err(other) => return Err(TestError::fail(format!("invalid events gave {other}"))),
        Ok(exit) => return Err(TestError::fail(format!("invalid events ran: {exit:?}"))),
    }
    ensure!(
        g.regs.dirty() == RegSet::EVENTS,
        "dirty after rejection: {}",
        g.regs.dirty()
    );
    ensure!(
        g.regs.vcpu().get_vcpu_events()?.exception.injected == 0,
        "kernel applied the bad events"
    );
    // Unknown flags are refused as well.
    let events = g.regs.events_mut()?;
    events.exception.injected = 0;
    events.exception.nr = 0;
    events.flags |= 1 << 31;
    ensure!(
        matches!(
            g.regs.run(),
            Err(Error::ImageRejected {
                rejected: RegKind::Events,
                ..
            })
        ),
        "unknown events flag accepted"
    );
    g.regs.events_mut()?.flags &= !(1 << 31);
    g.regs.regs_mut()?.rax = 0x22;
    ensure!(
        next_out(&mut g.regs)? == 0x22,
        "vCPU unusable after correction"
    );
    ensure!(g.regs.dirty().is_empty(), "still dirty: {}", g.regs.dirty());
    Ok(())
}

/// With immediate_exit, KVM_RUN returns EINTR without entering the guest, but still applies
/// dirty sets and stores the selected ones.
fn immediate_exit_applies_and_refreshes(kvm: &Kvm) -> TestResult {
    let mut g = guest(kvm, None)?;
    g.regs.set_selection(RegSet::REGS | RegSet::SREGS)?;
    next_out(&mut g.regs)?;
    // A change made behind the type's back, only the kernel's copy-out can report.
    let mut direct = g.regs.vcpu().get_regs()?;
    direct.rbx = 0x1234;
    g.regs.vcpu().set_regs(&direct)?;
    g.regs.sregs_mut()?.cr2 = 0xdead_0000;
    g.regs.set_immediate_exit(true);
    match g.regs.run() {
        Err(Error::Run(e)) if e.errno() == libc::EINTR => {}
        Err(other) => return Err(TestError::fail(format!("immediate exit gave {other}"))),
        Ok(exit) => return Err(TestError::fail(format!("immediate exit ran: {exit:?}"))),
    }
    g.regs.set_immediate_exit(false);
    ensure!(
        g.regs.dirty().is_empty(),
        "dirty after EINTR: {}",
        g.regs.dirty()
    );
    ensure!(
        g.regs.vcpu().get_sregs()?.cr2 == 0xdead_0000,
        "sregs not applied on EINTR"
    );
    ensure!(
        g.regs.vcpu().sync_regs().regs.rbx == 0x1234,
        "kvm_run regs not stored on EINTR"
    );
    ensure!(
        g.regs.regs()?.rbx == 0x1234,
        "read after EINTR missed the refresh"
    );
    ensure!(
        g.regs.regs()?.rip == 0x1_0002,
        "guest moved during an immediate exit"
    );
    g.regs.regs_mut()?.rax = 0x33;
    ensure!(
        next_out(&mut g.regs)? == 0x33,
        "vCPU unusable after immediate exit"
    );
    Ok(())
}

/// Protected-state VM types: the guard refuses sync regs and register ioctls before KVM is
/// asked (no protected VM can be created here, so the type is asserted on a default VM).
fn protected_state_types_refuse_sync_regs(kvm: &Kvm) -> TestResult {
    for ty in [VmType::SevEs, VmType::Snp, VmType::Tdx] {
        let TinyGuest { vm, vcpu, .. } = TinyGuest::long_mode(kvm, &OUT_LOOP)?;
        match VcpuRegisters::with_offered(vcpu, GuestStateGuard::new(ty), RegSet::REGS) {
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
        let mut regs = VcpuRegisters::new(&vm, vcpu, ty);
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
        match regs.regs() {
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
    let TinyGuest { vcpu, .. } = TinyGuest::long_mode(kvm, &OUT_LOOP)?;
    VcpuRegisters::with_offered(vcpu, GuestStateGuard::new(VmType::Sev), RegSet::ALL)?;
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
    next_out(&mut g.regs)?;
    g.regs.regs_mut()?.rax = 0x44;
    g.regs.events_mut()?;
    g.regs.flush()?;
    ensure!(
        g.regs.dirty().is_empty(),
        "dirty after flush: {}",
        g.regs.dirty()
    );
    ensure!(
        g.regs.vcpu().get_regs()?.rax == 0x44,
        "flush did not apply regs"
    );
    ensure!(
        next_out(&mut g.regs)? == 0x44,
        "guest did not see the flushed write"
    );
    // invalidate: a change through vcpu() is seen after invalidation.
    g.regs.regs()?;
    let mut direct = g.regs.vcpu().get_regs()?;
    direct.rdx = 0xd0d0;
    g.regs.vcpu().set_regs(&direct)?;
    g.regs.invalidate(RegSet::REGS);
    ensure!(
        g.regs.regs()?.rdx == 0xd0d0,
        "invalidate did not drop the cached regs"
    );
    Ok(())
}

/// A hand-off keeps pending writes: one set staged in `kvm_run` (sync regs), one applied by
/// ioctl (not offered); the next owner's raw `KVM_RUN` sees both.
fn hand_off_keeps_pending_writes(kvm: &Kvm) -> TestResult {
    for offered in [RegSet::REGS, RegSet::EMPTY] {
        let mut g = guest(kvm, Some(offered))?;
        next_out(&mut g.regs)?;
        g.regs.regs_mut()?.rax = 0x5a;
        let mut vcpu = g
            .regs
            .into_vcpu()
            .map_err(|e| TestError::fail(e.to_string()))?;
        let run = vcpu.get_kvm_run();
        ensure!(
            run.kvm_valid_regs == 0,
            "valid sets left selected: {:#x}",
            run.kvm_valid_regs
        );
        ensure!(
            run.kvm_dirty_regs == offered.bits(),
            "offered {offered}: kvm_dirty_regs {:#x}",
            run.kvm_dirty_regs
        );
        match vcpu.run()? {
            VcpuExit::IoOut(PORT, [0x5a]) => {}
            other => {
                return Err(TestError::fail(format!(
                    "offered {offered}: expected out 0x5a, got {other:?}"
                )))
            }
        }
        ensure!(
            vcpu.get_kvm_run().kvm_dirty_regs == 0,
            "kernel did not consume the staged set"
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
            "hand_off_keeps_pending_writes",
            hand_off_keeps_pending_writes,
        )
        .requires(sync_regs_all()),
    ];
    harness::main(tests)
}
