//! KVM tests of vm-types: the host query, VM creation by type, refusal of every type the host
//! does not report (checked against the kernel's own answer), the VMSA-features query, the
//! guest-state guard in front of real vCPU ioctls, the typed VM handle's launch step, the
//! ioctls kvm-ioctls lacks (SREGS2) or marks unsafe (XSAVE2), and one creation test per
//! non-default type that skips with the reason where the host lacks the type.

use kvm_bindings::{
    kvm_guest_debug, kvm_msr_entry, kvm_regs, kvm_xsave, Msrs, Xsave, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP,
};
use kvm_ioctls::{Cap, Kvm, KvmNestedStateBuffer, SyncReg, VcpuExit};
use kvm_test_support::guest::CODE_ADDR;
use kvm_test_support::{
    ensure, ensure_eq, harness, KvmTest, Mode, Requirement, TestError, TestResult, TinyGuest,
};
use vm_types::host::{self, Error};
use vm_types::sys;
use vm_types::{
    create_vm, create_vm_raw, probe, sev_vmsa_features, supported_vm_types, GuardedVcpu,
    GuestStateGuard, KernelRule, LaunchPhase, ObservedVmCaps, TypedVm, VcpuError, VcpuOp, VmType,
    VmTypeSet, VmsaFeaturesQuery,
};

/// The query matches the raw capability, and DEFAULT is always in it.
fn query_matches_the_capability(kvm: &Kvm) -> TestResult {
    let raw = host::raw_capability(kvm);
    let set = supported_vm_types(kvm);
    eprintln!("KVM_CAP_VM_TYPES = {raw:#x}: {{{set}}}");
    if raw > 0 {
        ensure!(
            set.reported_by_kernel() && i64::from(set.mask()) == i64::from(raw),
            "capability {raw:#x} but set {set:?}"
        );
    } else {
        ensure_eq!(
            set,
            VmTypeSet::default_only(),
            "capability {raw} (not reported) but set {set:?}"
        );
    }
    ensure!(
        set.contains(VmType::Default),
        "host does not report DEFAULT: {set}"
    );
    Ok(())
}

/// A DEFAULT VM is created through the typed API and runs a guest (`hlt`).
fn default_vm_is_created_and_runs(kvm: &Kvm) -> TestResult {
    let vm = create_vm(kvm, VmType::Default)?;
    let caps = ObservedVmCaps::of(&vm);
    ensure!(
        caps.allows_sync_regs() == VmType::Default.allows_sync_regs()
            && caps.allows_readonly_memslots() == VmType::Default.allows_readonly_memslots(),
        "DEFAULT VM reports {caps:?}, properties say sync regs and read-only memslots allowed"
    );
    let mut guest = TinyGuest::with_vm(vm, Mode::Real, &[0xf4])?; // hlt
    guest.expect_exit(kvm_test_support::GuestExit::Hlt)?;
    Ok(())
}

/// Every raw type below 32 that the host does not report is refused with `Unsupported`,
/// naming the type and the supported set — and the kernel, asked directly, agrees (`EINVAL`).
fn unsupported_types_are_refused_specifically(kvm: &Kvm) -> TestResult {
    let supported = supported_vm_types(kvm);
    let mut refused = 0;
    for raw in 0..32u64 {
        if supported.contains_raw(raw) {
            continue;
        }
        match create_vm_raw(kvm, raw) {
            Err(
                ref e @ Error::Unsupported {
                    raw: r,
                    supported: s,
                },
            ) if r == raw && s == supported => {
                let msg = e.to_string();
                let name = VmType::try_from(raw)
                    .map(|ty| format!("{ty} ({raw})"))
                    .unwrap_or_else(|_| format!("type {raw}"));
                ensure!(msg.contains(&name), "message does not name {name}: {msg}");
                ensure!(
                    msg.contains(&format!("{{{supported}}}")),
                    "message does not name the supported set: {msg}"
                );
            }
            Err(e) => return Err(TestError::fail(format!("type {raw}: wrong error: {e}"))),
            Ok(_) => {
                return Err(TestError::fail(format!(
                    "type {raw} not reported by the host, yet a VM was created"
                )))
            }
        }
        match kvm.create_vm_with_type(raw) {
            Err(e) if e.errno() == libc::EINVAL => {}
            Err(e) => {
                return Err(TestError::fail(format!(
                    "kernel refused unreported type {raw} with {e}, expected EINVAL"
                )))
            }
            Ok(_) => {
                return Err(TestError::fail(format!(
                    "kernel accepted type {raw}, which KVM_CAP_VM_TYPES does not report"
                )))
            }
        }
        refused += 1;
    }
    ensure_eq!(
        refused + supported.len(),
        32,
        "refused {refused} types, host reports {}; together they must cover 0..32",
        supported.len()
    );
    // The typed entry point says the same for the known types the host lacks.
    for ty in supported.missing() {
        let err = create_vm(kvm, ty).err();
        ensure!(
            matches!(&err, Some(e @ Error::Unsupported { .. }) if e.vm_type() == Some(ty)),
            "create_vm({ty}) gave {err:?}"
        );
    }
    eprintln!("refused {refused} unreported types; host supports {{{supported}}}");
    Ok(())
}

/// Values of 32 and more are refused with `OutOfRange` on every host, and the kernel agrees.
fn out_of_range_types_are_refused(kvm: &Kvm) -> TestResult {
    for raw in [32u64, 33, 64, 256, 1 << 32, u64::MAX] {
        let err = create_vm_raw(kvm, raw).err();
        ensure!(
            matches!(&err, Some(Error::OutOfRange { raw: r, .. }) if *r == raw),
            "type {raw}: expected OutOfRange, got {err:?}"
        );
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        ensure!(
            msg.contains(&raw.to_string()) && msg.contains("out of range"),
            "{msg}"
        );
    }
    for raw in [32u64, 256] {
        let kernel = kvm.create_vm_with_type(raw).map(drop);
        ensure!(
            matches!(kernel, Err(ref e) if e.errno() == libc::EINVAL),
            "kernel answered type {raw} with {kernel:?}, expected EINVAL"
        );
    }
    Ok(())
}

/// The probe agrees with the query and observes a DEFAULT VM that matches its properties.
fn probe_reports_every_type(kvm: &Kvm) -> TestResult {
    let report = probe(kvm);
    eprintln!("{report}");
    ensure_eq!(
        report.supported,
        supported_vm_types(kvm),
        "probe {:?} vs query {:?}",
        report.supported,
        supported_vm_types(kvm)
    );
    ensure_eq!(report.types.len(), VmType::ALL.len(), "{report:?}");
    for entry in &report.types {
        ensure!(
            entry.supported == report.supported.contains(entry.vm_type)
                && entry.observed.is_some() == entry.supported,
            "inconsistent entry {entry:?}"
        );
    }
    let default = report
        .types
        .iter()
        .find(|e| e.vm_type == VmType::Default)
        .and_then(|e| e.observed);
    ensure!(
        matches!(default, Some(Ok(caps)) if caps.allows_sync_regs() && caps.allows_readonly_memslots()),
        "DEFAULT VM observation {default:?}"
    );
    Ok(())
}

/// Whether the last call in `calls` succeeded.
fn got_ok(calls: &[(VcpuOp, Result<(), VcpuError>)]) -> bool {
    matches!(calls.last(), Some((_, Ok(()))))
}

/// The wrapper's calls in front of a DEFAULT VM's vCPU (whose kernel accepts all of them),
/// with a guard of each protected-state type after launch: every call the guard refuses comes
/// back as that refusal without reaching the kernel (the registers keep their marker), and
/// every call it allows reaches the kernel.
fn guard_refuses_before_the_kernel_is_asked(kvm: &Kvm) -> TestResult {
    let vm = create_vm(kvm, VmType::Default)?;
    vm.create_irq_chip()?; // an in-kernel LAPIC, for KVM_{GET,SET}_LAPIC
    let mut vcpu = vm.create_vcpu(0)?;
    let xsave2_size = vm.check_extension_int(Cap::Xsave2);
    let marker = kvm_regs {
        rip: 0x1234,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&marker)?;
    // Values read from the kernel, written back through the wrapper where it allows it.
    let fpu = vcpu.get_fpu()?;
    let xcrs = vcpu.get_xcrs()?;
    let debug_regs = vcpu.get_debug_regs()?;
    let events = vcpu.get_vcpu_events()?;
    let mp_state = vcpu.get_mp_state()?;
    let lapic = vcpu.get_lapic()?;
    let tsc_khz = vcpu.get_tsc_khz()?;
    let legacy_xsave = vcpu.get_xsave()?;
    let mut efer_now = Msrs::from_entries(&[kvm_msr_entry {
        index: 0xc000_0080,
        ..Default::default()
    }])?;
    vcpu.get_msrs(&mut efer_now)?;
    let mut refused = 0;
    let mut passed = 0;
    for ty in VmType::ALL
        .into_iter()
        .filter(|ty| ty.has_protected_state())
    {
        let guard = GuestStateGuard::launched(ty);
        let mut guarded = GuardedVcpu::new(vcpu, guard);
        let attempt = kvm_regs {
            rip: 0xdead,
            rflags: 2,
            ..Default::default()
        };
        let mut efer = Msrs::from_entries(&[kvm_msr_entry {
            index: 0xc000_0080,
            ..Default::default()
        }])?;
        let calls: Vec<(VcpuOp, Result<(), VcpuError>)> = vec![
            (VcpuOp::SetRegs, guarded.set_regs(&attempt)),
            (VcpuOp::GetRegs, guarded.get_regs().map(drop)),
            (VcpuOp::GetSregs, guarded.get_sregs().map(drop)),
            (VcpuOp::GetFpu, guarded.get_fpu().map(drop)),
            (VcpuOp::GetXsave, guarded.get_xsave().map(drop)),
            (VcpuOp::GetXcrs, guarded.get_xcrs().map(drop)),
            (VcpuOp::GetDebugRegs, guarded.get_debug_regs().map(drop)),
            (VcpuOp::GetVcpuEvents, guarded.get_vcpu_events().map(drop)),
            (VcpuOp::GetMpState, guarded.get_mp_state().map(drop)),
            (VcpuOp::GetTscKhz, guarded.get_tsc_khz().map(drop)),
            (
                VcpuOp::SetGuestDebug,
                guarded.set_guest_debug(&kvm_guest_debug::default()),
            ),
            (VcpuOp::GetMsrs, guarded.get_msrs(&mut efer).map(drop)),
            (VcpuOp::SetMsrs, guarded.set_msrs(&efer_now).map(drop)),
            (VcpuOp::SetFpu, guarded.set_fpu(&fpu)),
            (VcpuOp::SetXcrs, guarded.set_xcrs(&xcrs)),
            (VcpuOp::SetDebugRegs, guarded.set_debug_regs(&debug_regs)),
            (VcpuOp::SetVcpuEvents, guarded.set_vcpu_events(&events)),
            (VcpuOp::SetMpState, guarded.set_mp_state(mp_state)),
            (VcpuOp::GetLapic, guarded.get_lapic().map(drop)),
            (VcpuOp::SetLapic, guarded.set_lapic(&lapic)),
            (VcpuOp::SetTscKhz, guarded.set_tsc_khz(tsc_khz)),
            (VcpuOp::GetSregs2, guarded.get_sregs2().map(drop)),
            (
                VcpuOp::SyncRegs,
                guarded.set_sync_valid_reg(SyncReg::Register),
            ),
            (
                VcpuOp::SyncRegs,
                guarded.set_sync_dirty_reg(SyncReg::SystemRegister),
            ),
        ];
        let mut calls = calls;
        if kvm.check_extension(Cap::NestedState) {
            let mut nested = KvmNestedStateBuffer::empty();
            let got = guarded.nested_state(&mut nested).map(drop);
            calls.push((VcpuOp::GetNestedState, got));
            if got_ok(&calls) {
                calls.push((VcpuOp::SetNestedState, guarded.set_nested_state(&nested)));
            }
        }
        if usize::try_from(xsave2_size).is_ok_and(|size| size <= std::mem::size_of::<kvm_xsave>()) {
            // SAFETY: this VM's KVM_CAP_XSAVE2 is at most the size of struct kvm_xsave, so the
            // kernel reads no more than `legacy_xsave` holds.
            let result = unsafe { guarded.set_xsave(&legacy_xsave) };
            calls.push((VcpuOp::SetXsave, result));
        }
        for (op, result) in calls {
            let expected = guard.check(op).and(match op {
                VcpuOp::GetMsrs | VcpuOp::SetMsrs => guard.check_msr(op, 0xc000_0080),
                _ => Ok(()),
            });
            match (expected, result) {
                (Err(want), Err(VcpuError::Refused(got))) => {
                    ensure_eq!(
                        got,
                        want,
                        "{ty}: {op} refused as {got:?}, model says {want:?}"
                    );
                    let msg = got.to_string();
                    ensure!(
                        msg.contains(op.ioctl_name())
                            && msg.contains(ty.name())
                            && msg.contains(got.rule().kernel_function()),
                        "{msg}"
                    );
                    refused += 1;
                }
                (Ok(()), Ok(())) => passed += 1,
                (expected, result) => {
                    return Err(TestError::fail(format!(
                        "{ty}: {op}: model says {expected:?}, wrapper gave {result:?}"
                    )))
                }
            }
        }
        vcpu = guarded.into_inner();
        let regs = vcpu.get_regs()?;
        ensure_eq!(
            regs.rip,
            marker.rip,
            "{ty}: rip is {:#x}, the refused KVM_SET_REGS reached the kernel",
            regs.rip
        );
        let run = vcpu.get_kvm_run();
        ensure!(
            run.kvm_valid_regs == 0 && run.kvm_dirty_regs == 0,
            "{ty}: sync-regs fields changed to {:#x}/{:#x}",
            run.kvm_valid_regs,
            run.kvm_dirty_regs
        );
        // KVM_RUN with a sync-regs field set is refused before the kernel, in every phase.
        vcpu.set_sync_valid_reg(SyncReg::Register);
        let mut guarded = GuardedVcpu::new(vcpu, GuestStateGuard::before_launch(ty));
        let run_err = guarded.run().err();
        ensure!(
            matches!(
                &run_err,
                Some(VcpuError::Refused(e)) if e.rule() == KernelRule::SyncRegs && e.vm_type() == ty
            ),
            "{ty}: KVM_RUN with sync regs gave {run_err:?}"
        );
        vcpu = guarded.into_inner();
        vcpu.clear_sync_valid_reg(SyncReg::Register);
    }
    // SEV-ES and TDX refuse registers, FPU/XSAVE, guest debug and (SEV-ES) EFER; SNP keeps
    // the FPU, events, MP state and TSC open; every type refuses sync regs.
    ensure!(
        refused > 0 && passed > 0,
        "refused {refused}, passed {passed}: both paths must run"
    );
    eprintln!("{refused} calls refused before the kernel, {passed} passed through");
    Ok(())
}

/// A VM handle told it is SEV-ES (the host cannot create one; KVM has no ioctl to read the
/// type back, so the handle trusts what it is told): its vCPU takes register setup and guest
/// debug before `mark_launched`, which reach the kernel, and refuses them after it, for
/// vCPUs created before and after the launch.
fn typed_vm_protects_from_the_launch_step(kvm: &Kvm) -> TestResult {
    let vm = TypedVm::assume_type(create_vm(kvm, VmType::Default)?, VmType::SevEs);
    let vcpu = vm.guard_vcpu(settled(kvm)?.create_vcpu(vm.fd(), 0)?);
    let setup = kvm_regs {
        rip: 0x4321,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&setup)?;
    ensure_eq!(
        vcpu.get_regs()?.rip,
        setup.rip,
        "pre-launch KVM_SET_REGS did not reach the kernel"
    );
    let sregs = vcpu.get_sregs()?;
    vcpu.set_sregs(&sregs)?;
    vcpu.set_guest_debug(&kvm_guest_debug::default())?;
    ensure!(!vm.is_launched(), "launched before mark_launched");
    vm.mark_launched();
    ensure!(
        vm.is_launched() && vcpu.guard().phase() == LaunchPhase::Launched,
        "the vCPU did not see the launch"
    );
    let attempt = kvm_regs {
        rip: 0xbad,
        rflags: 2,
        ..Default::default()
    };
    for (op, result) in [
        (VcpuOp::SetRegs, vcpu.set_regs(&attempt)),
        (VcpuOp::GetRegs, vcpu.get_regs().map(drop)),
        (
            VcpuOp::SetGuestDebug,
            vcpu.set_guest_debug(&kvm_guest_debug::default()),
        ),
        (VcpuOp::GetXsave, vcpu.get_xsave().map(drop)),
    ] {
        ensure!(
            matches!(&result, Err(VcpuError::Refused(e)) if e.op() == op && e.vm_type() == VmType::SevEs),
            "{op} after launch gave {result:?}"
        );
    }
    let late = vm.guard_vcpu(settled(kvm)?.create_vcpu(vm.fd(), 1)?);
    ensure!(
        matches!(late.get_regs(), Err(VcpuError::Refused(_))),
        "a vCPU created after launch is not protected"
    );
    let raw = vcpu.into_inner();
    ensure_eq!(
        raw.get_regs()?.rip,
        setup.rip,
        "a refused KVM_SET_REGS reached the kernel"
    );
    // A DEFAULT VM's launch changes nothing.
    let plain = TypedVm::create(kvm, VmType::Default)?;
    let vcpu = plain.guard_vcpu(settled(kvm)?.create_vcpu(plain.fd(), 0)?);
    plain.mark_launched();
    vcpu.set_regs(&setup)?;
    ensure!(
        plain.guard().check(VcpuOp::SetGuestDebug).is_ok(),
        "DEFAULT refuses guest debug"
    );
    Ok(())
}

/// KVM_SET_GUEST_DEBUG on a plain VM goes through the guard and takes effect: single-stepping
/// a `nop; nop; hlt` guest stops with KVM_EXIT_DEBUG after the first `nop`, and with debugging
/// switched off again the guest runs to `hlt`.
fn set_guest_debug_through_the_guard(kvm: &Kvm) -> TestResult {
    let vm = create_vm(kvm, VmType::Default)?;
    let guest = TinyGuest::with_vm(vm, Mode::Real, &[0x90, 0x90, 0xf4])?; // nop ; nop ; hlt
    let TinyGuest { vm, vcpu, mem, .. } = guest;
    let mut vcpu = GuardedVcpu::new(vcpu, GuestStateGuard::launched(VmType::Default));
    let step = kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP,
        ..Default::default()
    };
    vcpu.set_guest_debug(&step)?;
    match vcpu.run()? {
        VcpuExit::Debug(arch) => {
            ensure!(
                arch.exception == 1 && arch.pc == CODE_ADDR + 1,
                "single step stopped with exception {} at {:#x}, expected #DB at {:#x}",
                arch.exception,
                arch.pc,
                CODE_ADDR + 1
            );
        }
        other => {
            return Err(TestError::fail(format!(
                "expected KVM_EXIT_DEBUG, got {other:?}"
            )))
        }
    }
    vcpu.set_guest_debug(&kvm_guest_debug::default())?;
    match vcpu.run()? {
        VcpuExit::Hlt => {}
        other => {
            return Err(TestError::fail(format!(
                "expected HLT after debug off, got {other:?}"
            )))
        }
    }
    drop((vm, mem));
    Ok(())
}

/// KVM_GET_SREGS2/KVM_SET_SREGS2 through the guard agree with KVM_GET_SREGS, and a value set
/// through SREGS2 is what KVM_GET_SREGS then reads.
fn sregs2_through_the_guard(kvm: &Kvm) -> TestResult {
    let vm = TypedVm::create(kvm, VmType::Default)?;
    let vcpu = vm.guard_vcpu(settled(kvm)?.create_vcpu(vm.fd(), 0)?);
    let sregs = vcpu.get_sregs()?;
    let mut sregs2 = vcpu.get_sregs2()?;
    ensure_eq!(
        (sregs2.cr0, sregs2.cr3, sregs2.cr4, sregs2.efer, sregs2.cs),
        (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, sregs.cs),
        "KVM_GET_SREGS2 {sregs2:?} disagrees with KVM_GET_SREGS {sregs:?}"
    );
    sregs2.cr2 = 0x1234_5000;
    vcpu.set_sregs2(&sregs2)?;
    let cr2 = vcpu.get_sregs()?.cr2;
    ensure_eq!(cr2, 0x1234_5000, "cr2 is {cr2:#x} after KVM_SET_SREGS2");
    Ok(())
}

/// KVM_GET_XSAVE2/KVM_SET_XSAVE with a KVM_CAP_XSAVE2-sized buffer through the guard: the
/// legacy region matches KVM_GET_XSAVE, and writing it back is accepted.
fn xsave2_through_the_guard(kvm: &Kvm) -> TestResult {
    let vm = TypedVm::create(kvm, VmType::Default)?;
    let size = vm.fd().check_extension_int(Cap::Xsave2);
    let size =
        usize::try_from(size).map_err(|_| TestError::fail(format!("KVM_CAP_XSAVE2 = {size}")))?;
    let vcpu = vm.guard_vcpu(settled(kvm)?.create_vcpu(vm.fd(), 0)?);
    let legacy = vcpu.get_xsave()?;
    let entry = std::mem::size_of::<u32>();
    let fam = size
        .saturating_sub(std::mem::size_of::<kvm_xsave>())
        .div_ceil(entry);
    let mut xsave = Xsave::new(fam)?;
    // SAFETY: the buffer holds size_of::<kvm_xsave>() plus `fam` u32 entries, at least the
    // KVM_CAP_XSAVE2 size this VM reports.
    unsafe { vcpu.get_xsave2(&mut xsave)? };
    let region = xsave.as_fam_struct_ref().xsave.region;
    ensure_eq!(
        region[..128],
        legacy.region[..128],
        "KVM_GET_XSAVE2 and KVM_GET_XSAVE disagree on the legacy region"
    );
    // SAFETY: as above; the buffer is the one KVM_GET_XSAVE2 just filled.
    unsafe { vcpu.set_xsave2(&xsave)? };
    eprintln!("KVM_CAP_XSAVE2 = {size} bytes");
    Ok(())
}

/// The VMSA-features query agrees with the host: a KVM without an SEV attribute group
/// (kvm_intel, kvm_pvm, kvm_amd before 6.10) cannot create SEV-family VMs, and a reported
/// feature needs the type that uses it.
fn vmsa_features_agree_with_the_host(kvm: &Kvm) -> TestResult {
    let answer = sev_vmsa_features(kvm)?;
    let supported = supported_vm_types(kvm);
    let module = kvm_test_support::harness::vendor_module();
    eprintln!(
        "KVM_X86_SEV_VMSA_FEATURES: {answer} (vendor module {module:?}, types {{{supported}}})"
    );
    ensure_eq!(
        probe(kvm).vmsa_features.as_ref().ok(),
        Some(&answer),
        "probe and query disagree"
    );
    match answer {
        VmsaFeaturesQuery::Supported(features) => {
            ensure_eq!(
                module,
                Some("kvm_amd"),
                "VMSA features {features} reported by {module:?}; only kvm_amd has the SEV group"
            );
            ensure!(
                !features.debug_swap()
                    || supported.contains(VmType::SevEs)
                    || !supported.reported_by_kernel(),
                "DebugSwap reported without SEV_ES in {{{supported}}}"
            );
            ensure!(
                !features.secure_tsc() || supported.contains(VmType::Snp),
                "Secure TSC reported without SNP in {{{supported}}}"
            );
        }
        VmsaFeaturesQuery::NotOffered | VmsaFeaturesQuery::NoSystemAttributes => {
            for ty in [VmType::Sev, VmType::SevEs, VmType::Snp] {
                ensure!(
                    !supported.contains(ty),
                    "{ty} supported, but the VMSA-features query says {answer}"
                );
            }
        }
    }
    Ok(())
}

/// With a DEFAULT guard the wrapper passes every call through: registers written through it
/// reach the kernel, and sync regs requested through it come back from `KVM_RUN`.
fn default_guard_passes_calls_through(kvm: &Kvm) -> TestResult {
    let vm = create_vm(kvm, VmType::Default)?;
    let guest = TinyGuest::with_vm(vm, Mode::Real, &[0x90, 0xf4])?; // nop ; hlt
    let TinyGuest { vm, vcpu, mem, .. } = guest;
    let mut guarded = GuardedVcpu::new(vcpu, GuestStateGuard::launched(VmType::Default));
    let mut regs = guarded.get_regs()?;
    regs.rip = 1; // skip the nop
    guarded.set_regs(&regs)?;
    guarded.get_sregs()?;
    guarded.get_fpu()?;
    guarded.get_debug_regs()?;
    guarded.set_sync_valid_reg(SyncReg::Register)?;
    match guarded.run()? {
        VcpuExit::Hlt => {}
        other => return Err(TestError::fail(format!("expected HLT, got {other:?}"))),
    }
    let synced = guarded.vcpu().sync_regs().regs.rip;
    ensure_eq!(
        synced,
        2,
        "rip from sync regs is {synced:#x}, expected 2 (after hlt at 1)"
    );
    drop((vm, mem));
    Ok(())
}

/// Creates a VM of a non-default type where the host reports it; skips with the reason
/// otherwise. Checks what the VM reports against the type's properties where the kernel that
/// introduced the type already enforced them.
fn create_typed_vm(kvm: &Kvm, ty: VmType, needs: &str) -> TestResult {
    let supported = supported_vm_types(kvm);
    if !supported.contains(ty) {
        return Err(TestError::skip(format!(
            "host does not support VM type {ty} ({}): KVM_CAP_VM_TYPES reports {{{supported}}}{}; \
             {ty} needs Linux {} and {needs}",
            ty.raw(),
            if supported.reported_by_kernel() {
                ""
            } else {
                " (capability not reported: kernel before 6.8)"
            },
            ty.introduced_in()
        )));
    }
    let vm = create_vm(kvm, ty)?;
    let caps = ObservedVmCaps::of(&vm);
    eprintln!("{ty} VM created: {caps:?}");
    if !ty.has_protected_state() {
        ensure!(
            caps.allows_sync_regs() && caps.allows_readonly_memslots(),
            "{ty} VM reports {caps:?}; the type allows sync regs and read-only memslots"
        );
    }
    if ty == VmType::Tdx {
        // TDX (6.16) arrived after both per-type rules; the VM must report them.
        ensure!(
            !caps.allows_sync_regs() && !caps.allows_readonly_memslots(),
            "TDX VM reports {caps:?}; KVM forbids sync regs and read-only memslots there"
        );
    }
    Ok(())
}

/// xstate-perm's proof that the process's XSTATE guest permission is settled, which
/// creates every vCPU these tests guard: they give guests no dynamic features.
fn settled(kvm: &Kvm) -> Result<xstate_perm::GuestPermission, TestError> {
    xstate_perm::GuestPermission::request(
        &xstate_perm::SystemHost::new(kvm),
        xstate_perm::XFeatureSet::LEGACY,
    )
    .map_err(|e| TestError::fail(format!("settling the XSTATE permission: {e}")))
}

fn main() {
    let typed = |ty: VmType, needs: &'static str| {
        KvmTest::new(
            format!("create_{}_vm", ty.name().to_lowercase()),
            move |kvm| create_typed_vm(kvm, ty, needs),
        )
    };
    harness::main(vec![
        KvmTest::new("query_matches_the_capability", query_matches_the_capability),
        KvmTest::new(
            "default_vm_is_created_and_runs",
            default_vm_is_created_and_runs,
        ),
        KvmTest::new(
            "unsupported_types_are_refused_specifically",
            unsupported_types_are_refused_specifically,
        ),
        KvmTest::new(
            "out_of_range_types_are_refused",
            out_of_range_types_are_refused,
        ),
        KvmTest::new("probe_reports_every_type", probe_reports_every_type),
        KvmTest::new(
            "guard_refuses_before_the_kernel_is_asked",
            guard_refuses_before_the_kernel_is_asked,
        ),
        KvmTest::new(
            "default_guard_passes_calls_through",
            default_guard_passes_calls_through,
        ),
        KvmTest::new(
            "typed_vm_protects_from_the_launch_step",
            typed_vm_protects_from_the_launch_step,
        ),
        KvmTest::new(
            "set_guest_debug_through_the_guard",
            set_guest_debug_through_the_guard,
        ),
        KvmTest::new("sregs2_through_the_guard", sregs2_through_the_guard)
            .requires(Requirement::RawCap(sys::KVM_CAP_SREGS2, "KVM_CAP_SREGS2")),
        KvmTest::new("xsave2_through_the_guard", xsave2_through_the_guard)
            .requires(Requirement::Cap(Cap::Xsave2)),
        KvmTest::new(
            "vmsa_features_agree_with_the_host",
            vmsa_features_agree_with_the_host,
        ),
        typed(
            VmType::SwProtected,
            "CONFIG_KVM_SW_PROTECTED_VM (a development-only type)",
        ),
        typed(VmType::Sev, "an AMD host with SEV enabled in kvm_amd"),
        typed(VmType::SevEs, "an AMD host with SEV-ES enabled in kvm_amd"),
        typed(VmType::Snp, "an AMD host with SEV-SNP enabled in kvm_amd"),
        typed(VmType::Tdx, "an Intel host with TDX enabled in kvm_intel"),
    ])
}
