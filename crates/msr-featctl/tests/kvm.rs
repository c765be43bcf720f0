//! KVM tests of IA32_FEATURE_CONTROL: tiny long-mode guests doing `RDMSR`/`WRMSR` of MSR 0x3a
//! under emulation (MSR filter + user-space MSR exits answered by `EmulatedFeatureControl`),
//! the native `KVM_SET_MSRS` path where KVM holds the MSR, and the host probe.
//!
//! Guests report through `out 0x80`: `0x01`/`0x02` are progress markers, `0x0d` comes from the
//! guest's own #GP handler (IDT vector 13), so a #GP that KVM injects is seen as the guest saw it.

use kvm_ioctls::{Cap, Kvm, MsrExitReason, VcpuExit};
use kvm_test_support::guest::{Mode as GuestMode, CODE_ADDR};
use kvm_test_support::harness::{self, vendor_module};
use kvm_test_support::{ensure, KvmTest, Requirement, TestError, TestResult, TinyGuest};
use msr_featctl::emulated::{self, MsrExitAnswer};
use msr_featctl::mode::{self, ResolutionReason, PROBE_VALUE};
use msr_featctl::native::{self, NativeOutcome};
use msr_featctl::{
    EmulatedFeatureControl, FeatureControl, GpReason, GuestCpuidFeatures, Mode, ResolvedMode,
    WriteCheck,
};

/// Where guests store what `RDMSR` returned (EAX at +0, EDX at +4).
const RESULT_ADDR: u32 = 0x9000;
/// The guest's #GP handler.
const GP_HANDLER: u64 = CODE_ADDR + 0x200;
const GP_MARKER: u8 = 0x0d;
const MAX_EXITS: usize = 64;

/// Tiny x86-64 assembler for the few instructions the guests use.
mod asm {
    /// `mov ecx, 0x3a`
    pub const ECX_FEAT_CTL: [u8; 5] = [0xb9, 0x3a, 0x00, 0x00, 0x00];
    /// `rdmsr`
    pub const RDMSR: [u8; 2] = [0x0f, 0x32];
    /// `wrmsr`
    pub const WRMSR: [u8; 2] = [0x0f, 0x30];
    /// `xor edx, edx`
    pub const EDX_ZERO: [u8; 2] = [0x31, 0xd2];
    /// `hlt`
    pub const HLT: [u8; 1] = [0xf4];

    /// `mov eax, imm32`
    pub fn mov_eax(imm: u32) -> Vec<u8> {
        let mut v = vec![0xb8];
        v.extend_from_slice(&imm.to_le_bytes());
        v
    }

    /// `or eax, imm32`
    pub fn or_eax(imm: u32) -> Vec<u8> {
        let mut v = vec![0x0d];
        v.extend_from_slice(&imm.to_le_bytes());
        v
    }

    /// `mov [addr], eax ; mov [addr + 4], edx` (ModRM/SIB absolute disp32 form)
    pub fn store_edx_eax(addr: u32) -> Vec<u8> {
        let mut v = vec![0x89, 0x04, 0x25];
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&[0x89, 0x14, 0x25]);
        v.extend_from_slice(&(addr + 4).to_le_bytes());
        v
    }

    /// `mov al, marker ; out 0x80, al`
    pub fn report(marker: u8) -> Vec<u8> {
        vec![0xb0, marker, 0xe6, 0x80]
    }

    /// `mov ecx, 0x3a ; mov eax, value ; xor edx, edx ; wrmsr`
    pub fn write_feat_ctl(value: u32) -> Vec<u8> {
        [&ECX_FEAT_CTL[..], &mov_eax(value), &EDX_ZERO, &WRMSR].concat()
    }

    /// `mov ecx, 0x3a ; rdmsr ; mov [addr], eax ; mov [addr+4], edx`
    pub fn read_feat_ctl_to(addr: u32) -> Vec<u8> {
        [&ECX_FEAT_CTL[..], &RDMSR, &store_edx_eax(addr)].concat()
    }
}

/// What the guest did, in order, as the test saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Msr(MsrExitAnswer),
    Out(u8),
}

fn vmx() -> GuestCpuidFeatures {
    GuestCpuidFeatures {
        vmx: true,
        ..Default::default()
    }
}

/// A long-mode guest in a VM with MSR 0x3a emulated, and a #GP handler that reports 0x0d.
fn emulated_guest(kvm: &Kvm, code: &[u8]) -> Result<TinyGuest, TestError> {
    let vm = kvm.create_vm()?;
    emulated::enable_emulation(&vm)?;
    let guest = TinyGuest::with_vm(vm, GuestMode::Long, code)?;
    guest.write(
        GP_HANDLER,
        &[asm::report(GP_MARKER), asm::HLT.to_vec()].concat(),
    )?;
    guest.set_idt_gate(13, GP_HANDLER)?;
    Ok(guest)
}

/// Runs the guest to `hlt`, answering MSR exits for 0x3a with `state`.
fn run_to_hlt(
    guest: &mut TinyGuest,
    state: &mut EmulatedFeatureControl,
) -> Result<Vec<Event>, TestError> {
    let mut events = Vec::new();
    for _ in 0..MAX_EXITS {
        let mut exit = guest.vcpu.run()?;
        let reason = match &exit {
            VcpuExit::X86Rdmsr(e) => Some((e.reason, e.index)),
            VcpuExit::X86Wrmsr(e) => Some((e.reason, e.index)),
            _ => None,
        };
        if let Some((reason, index)) = reason {
            ensure!(
                reason == MsrExitReason::Filter,
                "MSR {index:#x} exit with reason {reason:?}, expected the filter"
            );
            match state.handle_exit(&mut exit) {
                Some(answer) => events.push(Event::Msr(answer)),
                None => {
                    return Err(TestError::fail(format!(
                        "MSR exit for {index:#x}, not 0x3a"
                    )))
                }
            }
            continue;
        }
        match exit {
            VcpuExit::IoOut(0x80, data) if data.len() == 1 => events.push(Event::Out(data[0])),
            VcpuExit::Hlt => return Ok(events),
            VcpuExit::Intr => {}
            other => {
                return Err(TestError::fail(format!(
                    "unexpected exit {other:?} after {events:?}"
                )))
            }
        }
    }
    Err(TestError::fail(format!(
        "no hlt after {MAX_EXITS} exits: {events:?}"
    )))
}

fn read_result(guest: &TinyGuest) -> Result<u64, TestError> {
    let bytes = guest.read(u64::from(RESULT_ADDR), 8)?;
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes);
    Ok(u64::from_le_bytes(raw))
}

fn accepted(v: FeatureControl) -> Event {
    Event::Msr(MsrExitAnswer::Write(WriteCheck::Accepted(v)))
}

fn gp(reason: GpReason) -> Event {
    Event::Msr(MsrExitAnswer::Write(WriteCheck::GeneralProtection(reason)))
}

/// The guest's RDMSR returns the value the host set, not KVM's own (0 or absent).
fn guest_rdmsr_sees_host_set_value(kvm: &Kvm) -> TestResult {
    let features = GuestCpuidFeatures {
        vmx: true,
        lmce: true,
        ..Default::default()
    };
    let value = FeatureControl::LOCKED | FeatureControl::VMX_OUTSIDE_SMX | FeatureControl::LMCE;
    let mut state = EmulatedFeatureControl::new(features);
    ensure!(
        state.set_from_host(value.bits()) == WriteCheck::Accepted(value),
        "host write of {value} refused"
    );
    let code = [
        asm::read_feat_ctl_to(RESULT_ADDR),
        asm::report(1),
        asm::HLT.to_vec(),
    ]
    .concat();
    let mut guest = emulated_guest(kvm, &code)?;
    let events = run_to_hlt(&mut guest, &mut state)?;
    ensure!(
        events == [Event::Msr(MsrExitAnswer::Read(value)), Event::Out(1)],
        "events {events:?}"
    );
    let seen = read_result(&guest)?;
    ensure!(
        seen == value.bits(),
        "guest read {seen:#x}, host set {value}"
    );
    Ok(())
}

/// An unlocked MSR takes a guest write of valid bits; the guest then reads it back. Once the
/// guest itself has set LOCKED, its next write takes #GP in its own handler.
fn guest_wrmsr_accepted_until_locked(kvm: &Kvm) -> TestResult {
    let locked_vmx = FeatureControl::LOCKED | FeatureControl::VMX_OUTSIDE_SMX;
    let code = [
        asm::write_feat_ctl(FeatureControl::VMX_OUTSIDE_SMX.bits() as u32),
        asm::report(1),
        asm::write_feat_ctl(locked_vmx.bits() as u32),
        asm::read_feat_ctl_to(RESULT_ADDR),
        asm::report(2),
        asm::write_feat_ctl(FeatureControl::VMX_OUTSIDE_SMX.bits() as u32),
        asm::report(3), // not reached: the write above faults
        asm::HLT.to_vec(),
    ]
    .concat();
    let mut guest = emulated_guest(kvm, &code)?;
    let mut state = EmulatedFeatureControl::new(vmx());
    let events = run_to_hlt(&mut guest, &mut state)?;
    let expected = [
        accepted(FeatureControl::VMX_OUTSIDE_SMX),
        Event::Out(1),
        accepted(locked_vmx),
        Event::Msr(MsrExitAnswer::Read(locked_vmx)),
        Event::Out(2),
        gp(GpReason::Locked {
            current: locked_vmx,
        }),
        Event::Out(GP_MARKER),
    ];
    ensure!(
        events == expected,
        "events {events:?}, expected {expected:?}"
    );
    let seen = read_result(&guest)?;
    ensure!(seen == locked_vmx.bits(), "guest read back {seen:#x}");
    ensure!(state.value() == locked_vmx, "state is {}", state.value());
    Ok(())
}

/// With the firmware value in place (locked), the guest's first write faults and the value
/// stays.
fn guest_wrmsr_of_firmware_locked_value_faults(kvm: &Kvm) -> TestResult {
    let mut state = EmulatedFeatureControl::with_firmware_value(vmx());
    let firmware = state.value();
    let code = [
        asm::write_feat_ctl((firmware | FeatureControl::VMX_INSIDE_SMX).bits() as u32),
        asm::report(1),
        asm::HLT.to_vec(),
    ]
    .concat();
    let mut guest = emulated_guest(kvm, &code)?;
    let events = run_to_hlt(&mut guest, &mut state)?;
    let expected = [
        gp(GpReason::Locked { current: firmware }),
        Event::Out(GP_MARKER),
    ];
    ensure!(
        events == expected,
        "events {events:?}, expected {expected:?}"
    );
    ensure!(
        state.value() == firmware,
        "state changed to {}",
        state.value()
    );
    Ok(())
}

/// Writes of bits the guest CPUID does not allow, or reserved bits, take #GP while unlocked.
fn guest_wrmsr_of_invalid_bits_faults(kvm: &Kvm) -> TestResult {
    let cases = [
        (
            (FeatureControl::VMX_OUTSIDE_SMX | FeatureControl::SGX_ENABLE).bits() as u32,
            GpReason::NotValidForGuest {
                bits: FeatureControl::SGX_ENABLE,
            },
        ),
        (
            (FeatureControl::VMX_OUTSIDE_SMX | FeatureControl::LMCE).bits() as u32,
            GpReason::NotValidForGuest {
                bits: FeatureControl::LMCE,
            },
        ),
        (1 << 3, GpReason::UnsupportedBits { bits: 1 << 3 }),
    ];
    for (value, reason) in cases {
        let code = [
            asm::write_feat_ctl(value),
            asm::report(1),
            asm::HLT.to_vec(),
        ]
        .concat();
        let mut guest = emulated_guest(kvm, &code)?;
        let mut state = EmulatedFeatureControl::new(vmx());
        let events = run_to_hlt(&mut guest, &mut state)?;
        let expected = [gp(reason), Event::Out(GP_MARKER)];
        ensure!(
            events == expected,
            "write {value:#x}: events {events:?}, expected {expected:?}"
        );
        ensure!(
            state.value() == FeatureControl::empty(),
            "write {value:#x} changed the state to {}",
            state.value()
        );
    }
    Ok(())
}

/// The host sets both VMX bits (VMX inside SMX although the guest has no SMX); the guest reads
/// it, ORs in LOCKED and writes it back without a fault.
fn guest_read_modify_write_of_host_value(kvm: &Kvm) -> TestResult {
    let host = FeatureControl::VMX_INSIDE_SMX | FeatureControl::VMX_OUTSIDE_SMX;
    let locked = host | FeatureControl::LOCKED;
    let mut state = EmulatedFeatureControl::new(vmx());
    ensure!(
        state.set_from_host(host.bits()) == WriteCheck::Accepted(host),
        "host write refused"
    );
    let code = [
        asm::ECX_FEAT_CTL.to_vec(),
        asm::RDMSR.to_vec(),
        asm::or_eax(FeatureControl::LOCKED.bits() as u32),
        asm::WRMSR.to_vec(),
        asm::report(1),
        asm::read_feat_ctl_to(RESULT_ADDR),
        asm::HLT.to_vec(),
    ]
    .concat();
    let mut guest = emulated_guest(kvm, &code)?;
    let events = run_to_hlt(&mut guest, &mut state)?;
    let expected = [
        Event::Msr(MsrExitAnswer::Read(host)),
        accepted(locked),
        Event::Out(1),
        Event::Msr(MsrExitAnswer::Read(locked)),
    ];
    ensure!(
        events == expected,
        "events {events:?}, expected {expected:?}"
    );
    let seen = read_result(&guest)?;
    ensure!(seen == locked.bits(), "guest read back {seen:#x}");
    Ok(())
}

/// A guest locks a value; the state is saved, restored into a fresh state for a new vCPU in
/// a new VM, and that guest sees the same value and still takes #GP on write.
fn save_restore_keeps_value_and_lock(kvm: &Kvm) -> TestResult {
    let features = GuestCpuidFeatures {
        vmx: true,
        lmce: true,
        ..Default::default()
    };
    let value = FeatureControl::LOCKED | FeatureControl::VMX_OUTSIDE_SMX | FeatureControl::LMCE;
    let code = [asm::write_feat_ctl(value.bits() as u32), asm::HLT.to_vec()].concat();
    let mut first = emulated_guest(kvm, &code)?;
    let mut state = EmulatedFeatureControl::new(features);
    let events = run_to_hlt(&mut first, &mut state)?;
    ensure!(events == [accepted(value)], "first guest: {events:?}");
    let snapshot = state.snapshot();
    drop(first);
    ensure!(snapshot.is_locked(), "snapshot {snapshot:?} not locked");

    let mut restored = EmulatedFeatureControl::restore(features, snapshot)?;
    let code = [
        asm::read_feat_ctl_to(RESULT_ADDR),
        asm::report(1),
        asm::write_feat_ctl(FeatureControl::VMX_OUTSIDE_SMX.bits() as u32),
        asm::report(2),
        asm::HLT.to_vec(),
    ]
    .concat();
    let mut second = emulated_guest(kvm, &code)?;
    let events = run_to_hlt(&mut second, &mut restored)?;
    let expected = [
        Event::Msr(MsrExitAnswer::Read(value)),
        Event::Out(1),
        gp(GpReason::Locked { current: value }),
        Event::Out(GP_MARKER),
    ];
    ensure!(
        events == expected,
        "restored guest: {events:?}, expected {expected:?}"
    );
    let seen = read_result(&second)?;
    ensure!(seen == value.bits(), "restored guest read {seen:#x}");
    Ok(())
}

/// Where KVM stores the MSR (kvm_intel, Linux 6.0+), a host write of the firmware value is
/// read back and seen by a guest RDMSR with no filter, and KVM itself faults the locked write.
/// Elsewhere the test skips with what KVM did.
fn native_path_where_kvm_accepts_the_write(kvm: &Kvm) -> TestResult {
    let code = [
        asm::read_feat_ctl_to(RESULT_ADDR),
        asm::report(1),
        asm::write_feat_ctl(FeatureControl::VMX_OUTSIDE_SMX.bits() as u32),
        asm::report(2),
        asm::HLT.to_vec(),
    ]
    .concat();
    let vm = kvm.create_vm()?;
    let mut guest = TinyGuest::with_vm(vm, GuestMode::Long, &code)?;
    guest.write(
        GP_HANDLER,
        &[asm::report(GP_MARKER), asm::HLT.to_vec()].concat(),
    )?;
    guest.set_idt_gate(13, GP_HANDLER)?;
    let outcome = native::apply_native(&guest.vcpu, PROBE_VALUE)?;
    let vendor = vendor_module().unwrap_or("none");
    match outcome {
        NativeOutcome::Applied(v) => ensure!(v == PROBE_VALUE, "applied {v}"),
        declined => {
            return Err(TestError::skip(format!(
                "KVM does not hold IA32_FEATURE_CONTROL here (vendor module {vendor}, needs \
                 kvm_intel): {declined}"
            )))
        }
    }
    let read = native::read_native(&guest.vcpu)?;
    ensure!(
        read == Some(PROBE_VALUE.bits()),
        "KVM_GET_MSRS reads {read:?}"
    );
    let mut state = EmulatedFeatureControl::new(vmx()); // no filter: never consulted
    let events = run_to_hlt(&mut guest, &mut state)?;
    ensure!(
        events == [Event::Out(1), Event::Out(GP_MARKER)],
        "native guest events {events:?}"
    );
    let seen = read_result(&guest)?;
    ensure!(seen == PROBE_VALUE.bits(), "guest read {seen:#x}");
    Ok(())
}

/// The report agrees with direct ioctls, and the automatic choice follows the native probe.
fn probe_report_matches_the_host(kvm: &Kvm) -> TestResult {
    let report = msr_featctl::probe(kvm)?;
    eprintln!("{report}");
    ensure!(
        report.user_space_msr == kvm.check_extension(Cap::X86UserSpaceMsr),
        "user-space MSR capability misreported"
    );
    ensure!(
        report.msr_filter == kvm.check_extension(Cap::X86MsrFilter),
        "MSR filter capability misreported"
    );
    let again = mode::probe_native(kvm, PROBE_VALUE)?;
    ensure!(
        again == report.native,
        "probe gave {:?}, then {again:?}",
        report.native
    );
    let native_applied = matches!(report.native, NativeOutcome::Applied(_));
    match report.automatic {
        Ok(r) => ensure!(
            (r.mode == ResolvedMode::Native) == native_applied,
            "automatic {r} with native outcome {:?}",
            report.native
        ),
        Err(missing) => ensure!(
            !native_applied,
            "no mode although native applied (missing {missing:?})"
        ),
    }
    // Neither AMD nor PVM holds the MSR: the probe must not claim they do.
    if matches!(report.vendor_module, Some("kvm_amd") | Some("kvm_pvm")) {
        ensure!(
            !native_applied,
            "{:?} reported as storing MSR 0x3a",
            report.vendor_module
        );
    }
    let text = report.to_string();
    ensure!(text.contains("automatic mode:"), "report text: {text}");
    Ok(())
}

/// `resolve` honours explicit modes and agrees with the probe in automatic mode.
fn resolve_modes(kvm: &Kvm) -> TestResult {
    let native = mode::resolve(kvm, Mode::Native, PROBE_VALUE)?;
    ensure!(
        native.mode == ResolvedMode::Native && native.reason == ResolutionReason::Requested,
        "native resolved to {native}"
    );
    let emulated = mode::resolve(kvm, Mode::Emulated, PROBE_VALUE)?;
    ensure!(
        emulated.mode == ResolvedMode::Emulated && emulated.reason == ResolutionReason::Requested,
        "emulated resolved to {emulated}"
    );
    let auto = mode::resolve(kvm, Mode::Automatic, PROBE_VALUE)?;
    let probed = mode::probe_native(kvm, PROBE_VALUE)?;
    match (auto.reason, probed) {
        (ResolutionReason::NativeAccepted, NativeOutcome::Applied(_)) => {}
        (ResolutionReason::NativeDeclined(seen), declined) if seen == declined => {}
        other => {
            return Err(TestError::fail(format!(
                "automatic {auto} vs probe: {other:?}"
            )))
        }
    }
    Ok(())
}

fn main() {
    let emulation = |t: KvmTest| {
        t.requires(Requirement::Cap(Cap::X86UserSpaceMsr))
            .requires(Requirement::Cap(Cap::X86MsrFilter))
    };
    harness::main(vec![
        emulation(KvmTest::new(
            "emulated_guest_rdmsr_sees_host_set_value",
            guest_rdmsr_sees_host_set_value,
        )),
        emulation(KvmTest::new(
            "emulated_guest_wrmsr_accepted_until_locked",
            guest_wrmsr_accepted_until_locked,
        )),
        emulation(KvmTest::new(
            "emulated_guest_wrmsr_of_firmware_locked_value_faults",
            guest_wrmsr_of_firmware_locked_value_faults,
        )),
        emulation(KvmTest::new(
            "emulated_guest_wrmsr_of_invalid_bits_faults",
            guest_wrmsr_of_invalid_bits_faults,
        )),
        emulation(KvmTest::new(
            "emulated_guest_read_modify_write_of_host_value",
            guest_read_modify_write_of_host_value,
        )),
        emulation(KvmTest::new(
            "emulated_save_restore_keeps_value_and_lock",
            save_restore_keeps_value_and_lock,
        )),
        KvmTest::new(
            "native_path_where_kvm_accepts_the_write",
            native_path_where_kvm_accepts_the_write,
        ),
        KvmTest::new(
            "probe_report_matches_the_host",
            probe_report_matches_the_host,
        ),
        emulation(KvmTest::new("resolve_modes", resolve_modes)),
    ])
}
