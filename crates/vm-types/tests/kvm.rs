//! KVM tests of vm-types: the host query, VM creation by type, refusal of every type the host
//! does not report (checked against the kernel's own answer), the guest-state guard in front
//! of real vCPU ioctls, and one creation test per non-default type that skips with the reason
//! where the host lacks the type.

use kvm_bindings::kvm_regs;
use kvm_ioctls::{Kvm, SyncReg, VcpuExit};
use kvm_test_support::{ensure, harness, KvmTest, Mode, TestError, TestResult, TinyGuest};
use vm_types::host::{self, Error};
use vm_types::{
    create_vm, create_vm_raw, probe, supported_vm_types, GuardedVcpu, GuestStateError,
    GuestStateGuard, ObservedVmCaps, VcpuError, VcpuOp, VmType, VmTypeSet,
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
        ensure!(
            set == VmTypeSet::default_only(),
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
    ensure!(
        refused + supported.len() == 32,
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
    ensure!(
        report.supported == supported_vm_types(kvm),
        "probe {:?} vs query {:?}",
        report.supported,
        supported_vm_types(kvm)
    );
    ensure!(report.types.len() == VmType::ALL.len(), "{report:?}");
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

/// For every protected-state type, a guard of that type in front of a real vCPU refuses each
/// register ioctl and sync regs before the kernel is asked: the vCPU here belongs to a
/// DEFAULT VM, whose kernel would have accepted the calls, and its registers stay untouched.
fn guard_refuses_before_the_kernel_is_asked(kvm: &Kvm) -> TestResult {
    let vm = create_vm(kvm, VmType::Default)?;
    let mut vcpu = vm.create_vcpu(0)?;
    let marker = kvm_regs {
        rip: 0x1234,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&marker)?;
    let mut checked = 0;
    for ty in VmType::ALL
        .into_iter()
        .filter(|ty| ty.has_protected_state())
    {
        let mut guarded = GuardedVcpu::new(vcpu, GuestStateGuard::new(ty));
        let attempt = kvm_regs {
            rip: 0xdead,
            rflags: 2,
            ..Default::default()
        };
        let refusals: Vec<(VcpuOp, Option<VcpuError>)> = vec![
            (VcpuOp::SetRegs, guarded.set_regs(&attempt).err()),
            (VcpuOp::GetRegs, guarded.get_regs().err()),
            (VcpuOp::GetSregs, guarded.get_sregs().err()),
            (VcpuOp::GetFpu, guarded.get_fpu().err()),
            (VcpuOp::GetXsave, guarded.get_xsave().err()),
            (VcpuOp::GetXcrs, guarded.get_xcrs().err()),
            (VcpuOp::GetDebugRegs, guarded.get_debug_regs().err()),
            (
                VcpuOp::SyncRegs,
                guarded.set_sync_valid_reg(SyncReg::Register).err(),
            ),
            (
                VcpuOp::SyncRegs,
                guarded.set_sync_dirty_reg(SyncReg::SystemRegister).err(),
            ),
        ];
        for (op, err) in refusals {
            match err {
                Some(VcpuError::Refused(refusal)) => {
                    ensure!(
                        refusal.op() == op && refusal.vm_type() == ty,
                        "{ty}: {op} refused as {refusal:?}"
                    );
                    let msg = refusal.to_string();
                    ensure!(
                        msg.contains(op.ioctl_name()) && msg.contains(ty.name()),
                        "{msg}"
                    );
                }
                other => {
                    return Err(TestError::fail(format!(
                        "{ty}: {op} was not refused by the guard: {other:?}"
                    )))
                }
            }
            checked += 1;
        }
        vcpu = guarded.into_inner();
        let regs = vcpu.get_regs()?;
        ensure!(
            regs.rip == marker.rip,
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
        // KVM_RUN with a sync-regs field set is refused before the kernel, too.
        vcpu.set_sync_valid_reg(SyncReg::Register);
        let mut guarded = GuardedVcpu::new(vcpu, GuestStateGuard::before_launch(ty));
        let run_err = guarded.run().err();
        ensure!(
            matches!(
                run_err,
                Some(VcpuError::Refused(GuestStateError::SyncRegsNotAllowed { vm_type, .. })) if vm_type == ty
            ),
            "{ty}: KVM_RUN with sync regs gave {run_err:?}"
        );
        vcpu = guarded.into_inner();
        vcpu.clear_sync_valid_reg(SyncReg::Register);
    }
    ensure!(
        checked == 27,
        "checked {checked} refusals, expected 3 types x 9"
    );
    Ok(())
}

/// With a DEFAULT guard the wrapper passes every call through: registers written through it
/// reach the kernel, and sync regs requested through it come back from `KVM_RUN`.
fn default_guard_passes_calls_through(kvm: &Kvm) -> TestResult {
    let vm = create_vm(kvm, VmType::Default)?;
    let guest = TinyGuest::with_vm(vm, Mode::Real, &[0x90, 0xf4])?; // nop ; hlt
    let TinyGuest { vm, vcpu, mem, .. } = guest;
    let mut guarded = GuardedVcpu::new(vcpu, GuestStateGuard::new(VmType::Default));
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
    ensure!(
        synced == 2,
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
