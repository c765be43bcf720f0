//! KVM tests of IA32_FEATURE_CONTROL: tiny long-mode guests doing `RDMSR`/`WRMSR` of MSR 0x3a
//! under emulation (MSR filter + user-space MSR exits answered by `EmulatedFeatureControl`),
//! the native `KVM_SET_MSRS` path where KVM holds the MSR, and the host probe.
//!
//! Guests report through `out 0x80`: `0x01`/`0x02` are progress markers, `0x0d` comes from the
//! guest's own #GP handler (IDT vector 13), so a #GP that KVM injects is seen as the guest saw it.

use kvm_ioctls::{Cap, Kvm, MsrExitReason, MsrFilterDefaultAction, MsrFilterRangeFlags, VcpuExit};
use kvm_test_support::guest::{Mode as GuestMode, CODE_ADDR};
use kvm_test_support::harness::{self, vendor_module};
use kvm_test_support::{ensure, ensure_eq, KvmTest, Requirement, TestError, TestResult, TinyGuest};
use msr_featctl::emulated::{self, FilterError, FilterRange, MsrExitAnswer, MsrFilter};
use msr_featctl::feature_msrs::{self, FeatureMsrs, VcpuFeatureMsrs, VmxCapabilities, VmxControls};
use msr_featctl::mode::{self, ProbeVerdict, Unavailable};
use msr_featctl::native::{self, ConfiguredVcpu};
use msr_featctl::{
    EmulatedFeatureControl, FeatureControl, GpReason, GuestCpuidFeatures, KvmSupport, Mode,
    ResolvedMode, WriteCheck,
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

    /// `mov ecx, imm32`
    pub fn mov_ecx(imm: u32) -> Vec<u8> {
        let mut v = vec![0xb9];
        v.extend_from_slice(&imm.to_le_bytes());
        v
    }

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
            ensure_eq!(
                reason,
                MsrExitReason::Filter,
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
    ensure_eq!(
        state.set_from_host(value.bits()),
        Ok(value),
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
    ensure_eq!(
        events,
        [Event::Msr(MsrExitAnswer::Read(value)), Event::Out(1)],
        "events {events:?}"
    );
    let seen = read_result(&guest)?;
    ensure_eq!(seen, value.bits(), "guest read {seen:#x}, host set {value}");
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
    ensure_eq!(events, expected, "events {events:?}, expected {expected:?}");
    let seen = read_result(&guest)?;
    ensure_eq!(seen, locked_vmx.bits(), "guest read back {seen:#x}");
    ensure_eq!(state.value(), locked_vmx, "state is {}", state.value());
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
    ensure_eq!(events, expected, "events {events:?}, expected {expected:?}");
    ensure_eq!(
        state.value(),
        firmware,
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
        ensure_eq!(
            events,
            expected,
            "write {value:#x}: events {events:?}, expected {expected:?}"
        );
        ensure_eq!(
            state.value(),
            FeatureControl::empty(),
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
    ensure_eq!(
        state.set_from_host(host.bits()),
        Ok(host),
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
    ensure_eq!(events, expected, "events {events:?}, expected {expected:?}");
    let seen = read_result(&guest)?;
    ensure_eq!(seen, locked.bits(), "guest read back {seen:#x}");
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
    ensure_eq!(events, [accepted(value)], "first guest: {events:?}");
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
    ensure_eq!(
        events,
        expected,
        "restored guest: {events:?}, expected {expected:?}"
    );
    let seen = read_result(&second)?;
    ensure_eq!(seen, value.bits(), "restored guest read {seen:#x}");
    Ok(())
}

/// A tiny long-mode guest with the #GP handler, in a fresh VM with no MSR setup.
fn plain_guest(kvm: &Kvm, code: &[u8]) -> Result<TinyGuest, TestError> {
    let vm = kvm.create_vm()?;
    let guest = TinyGuest::with_vm(vm, GuestMode::Long, code)?;
    guest.write(
        GP_HANDLER,
        &[asm::report(GP_MARKER), asm::HLT.to_vec()].concat(),
    )?;
    guest.set_idt_gate(13, GP_HANDLER)?;
    Ok(guest)
}

/// The probe's verdict matches the vendor module, is stable, and the report and the automatic
/// mode follow it.
fn probe_proves_what_kvm_does(kvm: &Kvm) -> TestResult {
    let verdict = mode::probe_msr(kvm)?;
    let vendor = vendor_module();
    eprintln!("vendor module {vendor:?}: {verdict}");
    match vendor {
        Some("kvm_amd") | Some("kvm_pvm") => ensure!(
            verdict != ProbeVerdict::HeldByKvm,
            "{vendor:?} reported as holding MSR 0x3a"
        ),
        Some("kvm_intel") => ensure_eq!(
            verdict,
            ProbeVerdict::HeldByKvm,
            "kvm_intel not holding MSR 0x3a: {verdict}"
        ),
        _ => {}
    }
    let again = mode::probe_msr(kvm)?;
    ensure_eq!(again, verdict, "probe gave {verdict:?}, then {again:?}");
    let report = msr_featctl::probe(kvm)?;
    eprintln!("{report}");
    ensure_eq!(
        report.verdict,
        verdict,
        "report verdict {:?}",
        report.verdict
    );
    ensure!(
        report.user_space_msr == kvm.check_extension(Cap::X86UserSpaceMsr)
            && report.msr_filter == kvm.check_extension(Cap::X86MsrFilter),
        "capabilities misreported"
    );
    let held = verdict == ProbeVerdict::HeldByKvm;
    match report.automatic {
        Ok(r) => ensure!(
            (r.mode == ResolvedMode::Native) == held && !r.requested,
            "automatic {r} with verdict {verdict:?}"
        ),
        Err(why) => ensure!(
            !held && matches!(why, Unavailable::MissingCapability(_)),
            "no mode: {why}"
        ),
    }
    ensure!(report.to_string().contains("  mode: "), "report: {report}");
    Ok(())
}

/// Explicit modes are confirmed or refused by the probe, never swapped: emulation is refused
/// where KVM holds the MSR, native where it does not.
fn resolve_never_emulates_where_kvm_holds_the_msr(kvm: &Kvm) -> TestResult {
    let verdict = mode::probe_msr(kvm)?;
    let auto = mode::resolve(kvm, Mode::Automatic)?;
    let native = mode::resolve(kvm, Mode::Native);
    let emulated = mode::resolve(kvm, Mode::Emulated);
    if verdict == ProbeVerdict::HeldByKvm {
        ensure_eq!(auto.mode, ResolvedMode::Native, "automatic {auto}");
        ensure!(
            matches!(native, Ok(r) if r.mode == ResolvedMode::Native && r.requested),
            "native: {native:?}"
        );
        ensure!(
            matches!(
                emulated,
                Err(mode::Error::Unavailable {
                    why: Unavailable::KvmHoldsTheMsr,
                    ..
                })
            ),
            "emulated where KVM holds the MSR: {emulated:?}"
        );
    } else {
        ensure_eq!(auto.mode, ResolvedMode::Emulated, "automatic {auto}");
        ensure!(
            matches!(emulated, Ok(r) if r.mode == ResolvedMode::Emulated && r.requested),
            "emulated: {emulated:?}"
        );
        ensure!(
            matches!(
                native,
                Err(mode::Error::Unavailable {
                    why: Unavailable::KvmDoesNotHoldTheMsr(v),
                    ..
                }) if v == verdict
            ),
            "native where KVM does not hold the MSR: {native:?}"
        );
    }
    Ok(())
}

/// The environment variable that turns this binary into the permission child below.
const PERM_CHILD: &str = "MSR_FEATCTL_PERM_CHILD";
const ARCH_GET_XCOMP_SUPP: libc::c_long = 0x1021;
const ARCH_REQ_XCOMP_GUEST_PERM: libc::c_long = 0x1025;
const XFEATURE_XTILEDATA: libc::c_long = 18;

/// `arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, XTILEDATA)`: 0 or the errno.
fn request_amx_guest_perm() -> i32 {
    // SAFETY: arch_prctl with an integer argument; no memory is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_GUEST_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// Runs in a fresh process (this binary re-executed with [`PERM_CHILD`] set): does `how`
/// ("probe": the crate's probe; "in-process": a vCPU in this process), then requests the AMX
/// guest permission and prints the result.
fn perm_child(how: &str) -> ! {
    let outcome = (|| -> Result<(), Box<dyn std::error::Error>> {
        let kvm = Kvm::new()?;
        match how {
            "probe" => drop(mode::probe_msr(&kvm)?),
            _ => {
                let vm = kvm.create_vm()?;
                drop(vm.create_vcpu(0)?);
            }
        }
        Ok(())
    })();
    match outcome {
        Ok(()) => {
            println!("PERM_RESULT {}", request_amx_guest_perm());
            std::process::exit(0)
        }
        Err(e) => {
            println!("PERM_ERROR {e}");
            std::process::exit(1)
        }
    }
}

fn run_perm_child(how: &str) -> Result<i32, TestError> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .env(PERM_CHILD, how)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("PERM_RESULT "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| TestError::fail(format!("{how} child: {text} {:?}", out.status)))
}

/// The probe's scratch vCPU lives in a child process, so the VMM process can still ask for
/// the AMX guest permission afterwards; a vCPU created in-process (the control) freezes it.
fn probe_leaves_the_xstate_guest_permission_alone(_kvm: &Kvm) -> TestResult {
    let mut supported = 0u64;
    // SAFETY: ARCH_GET_XCOMP_SUPP writes one u64 to the pointer, which points to `supported`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_GET_XCOMP_SUPP,
            &mut supported as *mut u64,
        )
    };
    if r != 0 || supported & (1 << XFEATURE_XTILEDATA) == 0 {
        return Err(TestError::skip(format!(
            "the CPU has no AMX tile data (ARCH_GET_XCOMP_SUPP = {supported:#x}), so there is \
             no XSTATE guest permission to freeze"
        )));
    }
    let control = run_perm_child("in-process")?;
    if control != libc::EBUSY {
        return Err(TestError::skip(format!(
            "this kernel does not freeze the XSTATE guest permission at vCPU creation \
             (request after an in-process vCPU answered {control}), nothing to protect"
        )));
    }
    let after_probe = run_perm_child("probe")?;
    ensure_eq!(
        after_probe,
        0,
        "AMX guest permission request after the probe answered errno {after_probe}"
    );
    Ok(())
}

/// Where KVM holds the MSR (kvm_intel), the firmware value for what KVM exposes is written on
/// a vCPU whose CPUID is set, read back, seen by a guest RDMSR with no filter, and KVM itself
/// faults the locked guest write. Elsewhere the test skips with the probe's verdict.
fn native_path_on_a_configured_vcpu(kvm: &Kvm) -> TestResult {
    let verdict = mode::probe_msr(kvm)?;
    if verdict != ProbeVerdict::HeldByKvm {
        return Err(TestError::skip(format!(
            "KVM does not hold IA32_FEATURE_CONTROL here (vendor module {}; the native path \
             needs kvm_intel): {verdict}",
            vendor_module().unwrap_or("none")
        )));
    }
    let code = [
        asm::read_feat_ctl_to(RESULT_ADDR),
        asm::report(1),
        asm::write_feat_ctl(FeatureControl::VMX_OUTSIDE_SMX.bits() as u32),
        asm::report(2),
        asm::HLT.to_vec(),
    ]
    .concat();
    let mut guest = plain_guest(kvm, &code)?;
    let support = KvmSupport::query(kvm)?;
    let configured = ConfiguredVcpu::configure(&guest.vcpu, &support.cpuid, None, &support)?;
    let value = native::apply_firmware_value(&configured)?;
    ensure_eq!(
        value,
        configured.features().firmware_value(),
        "applied {value}"
    );
    let read = native::read_native(&guest.vcpu)?;
    ensure_eq!(read, Some(value.bits()), "KVM_GET_MSRS reads {read:?}");
    let mut state = EmulatedFeatureControl::new(vmx()); // no filter: never consulted
    let events = run_to_hlt(&mut guest, &mut state)?;
    ensure_eq!(
        events,
        [Event::Out(1), Event::Out(GP_MARKER)],
        "native guest events {events:?}"
    );
    let seen = read_result(&guest)?;
    ensure_eq!(seen, value.bits(), "guest read {seen:#x}");
    Ok(())
}

/// The features the crate derives are what KVM exposes: a guest CPUID asking for VMX and an
/// MCG_CAP asking for LMCE get them only where `KVM_GET_SUPPORTED_CPUID` and
/// `KVM_X86_GET_MCE_CAP_SUPPORTED` offer them, and the CPUID set is the one KVM holds.
fn configured_vcpu_exposes_what_kvm_supports(kvm: &Kvm) -> TestResult {
    let support = KvmSupport::query(kvm)?;
    let offered = GuestCpuidFeatures::from_cpuid(&support.cpuid, support.mce_cap);
    let mut asked = support.cpuid.clone();
    for e in asked.as_mut_slice() {
        if e.function == 1 {
            e.ecx |= 1 << 5; // VMX
        }
    }
    let mcg_cap = kvm
        .check_extension(Cap::Mce)
        .then_some((support.mce_cap & !0xff) | msr_featctl::sys::MCG_LMCE_P | 10);
    let guest = plain_guest(kvm, &asm::HLT)?;
    let configured = ConfiguredVcpu::configure(&guest.vcpu, &asked, mcg_cap, &support)?;
    let exposure = configured.exposure();
    eprintln!("offered {offered:?}, exposure {exposure:?}");
    ensure!(
        exposure.features.vmx == offered.vmx && exposure.withheld.vmx != offered.vmx,
        "VMX: {exposure:?}"
    );
    if mcg_cap.is_some() {
        ensure!(
            exposure.features.lmce == offered.lmce && exposure.withheld.lmce != offered.lmce,
            "LMCE: {exposure:?}"
        );
    }
    let held = guest.vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?;
    let leaf1 = held.as_slice().iter().find(|e| e.function == 1);
    ensure!(
        leaf1.is_some_and(|e| e.ecx & (1 << 5) != 0),
        "KVM_GET_CPUID2 leaf 1: {leaf1:?}"
    );
    Ok(())
}

/// An MSR no KVM knows, used for UNKNOWN exits.
const MSR_NONEXISTENT: u32 = 0x474f_4f00;

/// One MSR exit as the test saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Read(MsrExitReason, u32),
    Write(MsrExitReason, u32, u64),
    Out(u8),
}

/// Runs to `hlt`, answering every MSR exit: reads get `answer`, writes are accepted.
fn run_recording(guest: &mut TinyGuest, answer: u64) -> Result<Vec<Seen>, TestError> {
    let mut seen = Vec::new();
    for _ in 0..MAX_EXITS {
        match guest.vcpu.run()? {
            VcpuExit::X86Rdmsr(e) => {
                seen.push(Seen::Read(e.reason, e.index));
                *e.data = answer;
                *e.error = 0;
            }
            VcpuExit::X86Wrmsr(e) => {
                seen.push(Seen::Write(e.reason, e.index, e.data));
                *e.error = 0;
            }
            VcpuExit::IoOut(0x80, data) if data.len() == 1 => seen.push(Seen::Out(data[0])),
            VcpuExit::Hlt => return Ok(seen),
            VcpuExit::Intr => {}
            other => {
                return Err(TestError::fail(format!(
                    "unexpected exit {other:?} after {seen:?}"
                )))
            }
        }
    }
    Err(TestError::fail(format!("no hlt: {seen:?}")))
}

/// Exit reasons are exactly the ones asked for: UNKNOWN alone leaves FILTER exits off (the
/// filtered 0x3a then faults in the guest), FILTER alone leaves an unknown MSR to fault.
fn exit_reasons_are_exactly_the_ones_asked_for(kvm: &Kvm) -> TestResult {
    let code = [
        asm::mov_ecx(MSR_NONEXISTENT),
        asm::RDMSR.to_vec(),
        asm::store_edx_eax(RESULT_ADDR),
        asm::report(1),
        asm::read_feat_ctl_to(RESULT_ADDR + 8),
        asm::report(2),
        asm::HLT.to_vec(),
    ]
    .concat();
    let answer = 0x1234_5678_9abc_def0;

    let mut guest = plain_guest(kvm, &code)?;
    emulated::enable_user_space_msr(&guest.vm, MsrExitReason::Unknown)?;
    emulated::install_filter(&guest.vm)?;
    let seen = run_recording(&mut guest, answer)?;
    let expected = [
        Seen::Read(MsrExitReason::Unknown, MSR_NONEXISTENT),
        Seen::Out(1),
        Seen::Out(GP_MARKER),
    ];
    ensure_eq!(
        seen,
        expected,
        "UNKNOWN only: {seen:?}, expected {expected:?}"
    );
    ensure_eq!(read_result(&guest)?, answer, "guest did not get the answer");

    let mut guest = plain_guest(kvm, &code)?;
    emulated::enable_user_space_msr(&guest.vm, MsrExitReason::Filter)?;
    emulated::install_filter(&guest.vm)?;
    let seen = run_recording(&mut guest, answer)?;
    ensure_eq!(
        seen,
        [Seen::Out(GP_MARKER)],
        "FILTER only, unknown MSR first: {seen:?}"
    );

    let mut guest = plain_guest(kvm, &code)?;
    emulated::enable_user_space_msr(&guest.vm, MsrExitReason::Unknown | MsrExitReason::Filter)?;
    emulated::install_filter(&guest.vm)?;
    let seen = run_recording(&mut guest, answer)?;
    let expected = [
        Seen::Read(MsrExitReason::Unknown, MSR_NONEXISTENT),
        Seen::Out(1),
        Seen::Read(MsrExitReason::Filter, 0x3a),
        Seen::Out(2),
    ];
    ensure_eq!(seen, expected, "both: {seen:?}, expected {expected:?}");
    Ok(())
}

/// READ-only and WRITE-only ranges filter only their access: the other one reaches KVM (which
/// does not know the MSR, so it exits with reason UNKNOWN).
fn read_only_and_write_only_ranges(kvm: &Kvm) -> TestResult {
    let code = [
        asm::mov_ecx(MSR_NONEXISTENT),
        asm::RDMSR.to_vec(),
        asm::report(1),
        asm::mov_ecx(MSR_NONEXISTENT),
        asm::mov_eax(0x77),
        asm::EDX_ZERO.to_vec(),
        asm::WRMSR.to_vec(),
        asm::report(2),
        asm::HLT.to_vec(),
    ]
    .concat();
    for (flags, read_reason, write_reason) in [
        (
            MsrFilterRangeFlags::WRITE,
            MsrExitReason::Unknown,
            MsrExitReason::Filter,
        ),
        (
            MsrFilterRangeFlags::READ,
            MsrExitReason::Filter,
            MsrExitReason::Unknown,
        ),
    ] {
        let mut guest = plain_guest(kvm, &code)?;
        emulated::enable_user_space_msr(&guest.vm, MsrExitReason::Unknown | MsrExitReason::Filter)?;
        let mut filter = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
        filter.push(FilterRange::deny(MSR_NONEXISTENT, 1, flags));
        filter.with_feature_control().install(&guest.vm)?;
        let seen = run_recording(&mut guest, 0)?;
        let expected = [
            Seen::Read(read_reason, MSR_NONEXISTENT),
            Seen::Out(1),
            Seen::Write(write_reason, MSR_NONEXISTENT, 0x77),
            Seen::Out(2),
        ];
        ensure_eq!(
            seen,
            expected,
            "{flags:?} range: {seen:?}, expected {expected:?}"
        );
    }
    Ok(())
}

/// A merged filter installs; filters KVM would refuse or misread are refused before the ioctl
/// with their rule.
fn filters_are_validated_before_the_ioctl(kvm: &Kvm) -> TestResult {
    let vm = kvm.create_vm()?;
    let mut own = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
    own.push(FilterRange::deny(0x10, 1, MsrFilterRangeFlags::WRITE));
    own.with_feature_control().install(&vm)?;

    let mut x2apic = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
    x2apic.push(FilterRange::deny(0x800, 0x100, MsrFilterRangeFlags::READ));
    let err = x2apic.install(&vm).expect_err("x2APIC range");
    ensure!(
        matches!(
            err,
            emulated::Error::InvalidFilter(FilterError::CoversX2apic { range: 0 })
        ),
        "{err:?}"
    );
    let err = MsrFilter::new(MsrFilterDefaultAction::DENY)
        .install(&vm)
        .expect_err("deny without ranges");
    ensure!(
        matches!(
            err,
            emulated::Error::InvalidFilter(FilterError::DenyWithoutRanges)
        ),
        "{err:?}"
    );
    Ok(())
}

/// The feature-MSR list sized from E2BIG matches kvm-ioctls' fixed-size call, every listed
/// index has a host value, and an index that is not a feature MSR is reported unknown.
fn feature_msr_list_and_host_values(kvm: &Kvm) -> TestResult {
    let list = feature_msrs::feature_msr_index_list(kvm)?;
    let reference = kvm.get_msr_feature_index_list()?;
    ensure_eq!(
        list,
        reference.as_slice(),
        "{list:x?} vs kvm-ioctls {:x?}",
        reference.as_slice()
    );
    let host = feature_msrs::host_feature_msrs(kvm)?;
    ensure!(
        host.unknown().is_empty(),
        "listed but unknown: {:x?}",
        host.unknown()
    );
    ensure_eq!(host.iter().count(), list.len(), "values for {:?}", host);
    let probe = feature_msrs::host_feature_msr_values(kvm, &[0x3a])?;
    ensure_eq!(probe.unknown(), [0x3a], "0x3a as a feature MSR: {probe:?}");
    Ok(())
}

/// Host feature-MSR values apply to a vCPU before its first run (a value KVM refuses is a
/// typed host-write refusal naming the MSR); after the run an unchanged set is accepted and a
/// changed one refused in userspace, before any ioctl.
fn feature_msrs_are_fixed_after_the_first_run(kvm: &Kvm) -> TestResult {
    let host = feature_msrs::host_feature_msrs(kvm)?;
    let mut guest = plain_guest(kvm, &asm::HLT)?;
    let support = KvmSupport::query(kvm)?;
    let configured = ConfiguredVcpu::configure(&guest.vcpu, &support.cpuid, None, &support)?;
    let mut state = VcpuFeatureMsrs::new();
    let mut accepted = FeatureMsrs::new();
    for (index, value) in host.iter() {
        let mut one = FeatureMsrs::new();
        one.set(index, value);
        match state.apply(configured.vcpu(), &one) {
            Ok(()) => {
                accepted.set(index, value);
            }
            Err(feature_msrs::Error::HostWriteRefused { index: i, value: v })
                if i == index && v == value =>
            {
                eprintln!("KVM refuses its own host value {value:#x} for feature MSR {index:#x}");
            }
            Err(other) => return Err(other.into()),
        }
    }
    let Some((index, value)) = accepted.iter().next() else {
        return Err(TestError::skip(format!(
            "KVM takes none of its feature MSRs' host values on a vCPU: {host:x?}"
        )));
    };
    ensure!(
        state.applied().eq(accepted.iter()),
        "applied {:x?}",
        state.applied().collect::<Vec<_>>()
    );
    state.first_run();
    let exit = guest.run()?;
    ensure_eq!(
        exit,
        kvm_test_support::GuestExit::Hlt,
        "guest exit {exit:?}"
    );
    state.apply(&guest.vcpu, &accepted)?;
    let mut changed = FeatureMsrs::new();
    changed.set(index, value ^ 1);
    let err = state
        .apply(&guest.vcpu, &changed)
        .expect_err("changed after run");
    ensure!(
        matches!(err, feature_msrs::Error::ChangedAfterRun { index: i, applied: Some(a), .. } if i == index && a == value),
        "{err:?}"
    );
    Ok(())
}

/// Where KVM offers the VMX capability MSRs (kvm_intel, nested=1), a narrowed set applies to a
/// vCPU with VMX and reads back.
fn vmx_capabilities_narrow_on_kvm_intel(kvm: &Kvm) -> TestResult {
    let host = feature_msrs::host_feature_msrs(kvm)?;
    let mut caps = VmxCapabilities::from_host(&host);
    let Some(procbased2) = caps.value(VmxControls::Procbased2.index()) else {
        return Err(TestError::skip(format!(
            "KVM offers no VMX capability MSRs (vendor module {}; needs kvm_intel with nested=1)",
            vendor_module().unwrap_or("none")
        )));
    };
    let allowed1 = (procbased2 >> 32) as u32;
    let drop_bit = allowed1 & allowed1.wrapping_neg(); // the lowest offered control
    caps.disallow(VmxControls::Procbased2, drop_bit)?;
    let mut set = FeatureMsrs::new();
    caps.add_to(&mut set);
    let guest = plain_guest(kvm, &asm::HLT)?;
    let support = KvmSupport::query(kvm)?;
    let configured = ConfiguredVcpu::configure(&guest.vcpu, &support.cpuid, None, &support)?;
    VcpuFeatureMsrs::new().apply(configured.vcpu(), &set)?;
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: VmxControls::Procbased2.index(),
        ..Default::default()
    }])?;
    guest.vcpu.get_msrs(&mut msrs)?;
    let read = msrs.as_slice()[0].data;
    ensure_eq!(
        read,
        caps.value(VmxControls::Procbased2.index()).unwrap_or(0),
        "PROCBASED_CTLS2 reads {read:#x}"
    );
    Ok(())
}

fn main() {
    if let Ok(how) = std::env::var(PERM_CHILD) {
        perm_child(&how);
    }
    let emulation = |t: KvmTest| {
        t.requires(Requirement::Cap(Cap::X86UserSpaceMsr))
            .requires(Requirement::Cap(Cap::X86MsrFilter))
    };
    let features = |t: KvmTest| t.requires(Requirement::Cap(Cap::GetMsrFeatures));
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
        KvmTest::new("probe_proves_what_kvm_does", probe_proves_what_kvm_does),
        emulation(KvmTest::new(
            "resolve_never_emulates_where_kvm_holds_the_msr",
            resolve_never_emulates_where_kvm_holds_the_msr,
        )),
        KvmTest::new(
            "probe_leaves_the_xstate_guest_permission_alone",
            probe_leaves_the_xstate_guest_permission_alone,
        ),
        KvmTest::new(
            "configured_vcpu_exposes_what_kvm_supports",
            configured_vcpu_exposes_what_kvm_supports,
        ),
        KvmTest::new(
            "native_path_on_a_configured_vcpu",
            native_path_on_a_configured_vcpu,
        ),
        emulation(KvmTest::new(
            "exit_reasons_are_exactly_the_ones_asked_for",
            exit_reasons_are_exactly_the_ones_asked_for,
        )),
        emulation(KvmTest::new(
            "read_only_and_write_only_ranges",
            read_only_and_write_only_ranges,
        )),
        emulation(KvmTest::new(
            "filters_are_validated_before_the_ioctl",
            filters_are_validated_before_the_ioctl,
        )),
        features(KvmTest::new(
            "feature_msr_list_and_host_values",
            feature_msr_list_and_host_values,
        )),
        features(KvmTest::new(
            "feature_msrs_are_fixed_after_the_first_run",
            feature_msrs_are_fixed_after_the_first_run,
        )),
        features(KvmTest::new(
            "vmx_capabilities_narrow_on_kvm_intel",
            vmx_capabilities_narrow_on_kvm_intel,
        )),
    ])
}
