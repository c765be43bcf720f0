//! Choosing how a VM gets IA32_FEATURE_CONTROL — natively through KVM or emulated in userspace
//! — from a probe of what KVM does with the MSR, and a report of that choice for humans.
//!
//! The rule: **never emulate where KVM holds the MSR.** kvm_intel checks its own copy on
//! `VMXON` (`handle_vmxon`), so an emulated value there would show the guest `LOCKED | VMX`
//! while `VMXON` faults. Emulation is chosen only when the probe proves KVM does not hold it.
//!
//! The probe writes `LOCKED` (0x1) to MSR 0x3a of a scratch vCPU that has no CPUID, and reads
//! it back. `LOCKED` is the one bit every kvm_intel accepts from the host on such a vCPU:
//! `vmx_vcpu_create` starts `msr_ia32_feature_control_valid_bits` at `FEAT_CTL_LOCKED`, and
//! Linux 6.0+ takes any supported bit from the host anyway. So:
//!
//! * stored and read back → KVM holds the MSR ([`ProbeVerdict::HeldByKvm`]): native;
//! * `KVM_SET_MSRS` processed 0 entries → KVM has no such MSR (kvm_amd, kvm_pvm):
//!   [`ProbeVerdict::RefusedByKvm`], emulation;
//! * accepted but read back as 0 or not at all → KVM drops it (kvm_amd with
//!   `kvm.ignore_msrs=1`): [`ProbeVerdict::Ignored`], emulation;
//! * anything else is [`Error::ProbeInconclusive`], and nothing is chosen.
//!
//! The scratch VM and vCPU live in a forked child process. Creating a vCPU freezes the
//! process's dynamic XSTATE (AMX) guest permission (`fpu_guest_perm` is locked on first vCPU
//! creation), so a probe in the VMM's own process would make a later AMX permission request
//! fail; a child's permission is its own. The child makes only system calls and reports
//! through a pipe.

use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

use crate::msr_io::{Errno, MsrIo, RawMsrFd};
use crate::sys::ioctls::{KVM_CREATE_VCPU, KVM_CREATE_VM};
use crate::sys::MSR_IA32_FEAT_CTL;

/// Errors from probing the host or choosing a mode.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the pipe for the probe's child process failed.
    #[error("pipe2 for the IA32_FEATURE_CONTROL probe failed")]
    ProbePipe(#[source] Errno),
    /// Forking the probe's child process failed.
    #[error("fork for the IA32_FEATURE_CONTROL probe failed")]
    ProbeFork(#[source] Errno),
    /// Reading the child's report failed.
    #[error("reading the IA32_FEATURE_CONTROL probe's report failed")]
    ProbeRead(#[source] Errno),
    /// Waiting for the child failed.
    #[error("waitpid for the IA32_FEATURE_CONTROL probe failed")]
    ProbeWait(#[source] Errno),
    /// The child ended without a full report (killed, or crashed).
    #[error("the IA32_FEATURE_CONTROL probe's child process sent {got} of {expected} bytes and ended with wait status {status:#x}")]
    ProbeChildLost {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
        /// The raw wait status.
        status: i32,
    },
    /// `KVM_CREATE_VM` for the scratch VM failed.
    #[error("KVM_CREATE_VM for the IA32_FEATURE_CONTROL probe failed")]
    CreateScratchVm(#[source] Errno),
    /// `KVM_CREATE_VCPU` for the scratch vCPU failed.
    #[error("KVM_CREATE_VCPU for the IA32_FEATURE_CONTROL probe failed")]
    CreateScratchVcpu(#[source] Errno),
    /// `KVM_SET_MSRS` on the scratch vCPU failed with an errno.
    #[error("KVM_SET_MSRS of MSR 0x3a on the probe's scratch vCPU failed")]
    ProbeSetMsrs(#[source] Errno),
    /// `KVM_GET_MSRS` on the scratch vCPU failed with an errno.
    #[error("KVM_GET_MSRS of MSR 0x3a on the probe's scratch vCPU failed")]
    ProbeGetMsrs(#[source] Errno),
    /// KVM took the probe's write of `LOCKED` and reads back another non-zero value: neither
    /// kvm_intel's semantics nor an ignored MSR.
    #[error("IA32_FEATURE_CONTROL probe inconclusive: KVM took 0x1 and reads back {read:#x}")]
    ProbeInconclusive {
        /// What KVM_GET_MSRS returned.
        read: u64,
    },
    /// Reading the MSR index list failed.
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    GetMsrIndexList(#[source] kvm_ioctls::Error),
    /// The mode cannot be used on this host.
    #[error("IA32_FEATURE_CONTROL mode {mode:?} unavailable: {why}")]
    Unavailable {
        /// The mode asked for.
        mode: Mode,
        /// Why.
        why: Unavailable,
    },
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Why a mode cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Emulation asked for where KVM holds the MSR: the guest would read the emulated value
    /// while `VMXON` checks KVM's copy.
    KvmHoldsTheMsr,
    /// Native asked for where KVM does not hold the MSR.
    KvmDoesNotHoldTheMsr(ProbeVerdict),
    /// Emulation needed but KVM lacks a capability for it.
    MissingCapability(Cap),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::KvmHoldsTheMsr => f.write_str(
                "KVM holds IA32_FEATURE_CONTROL itself (kvm_intel) and checks its own copy on VMXON; emulating it would hide that copy",
            ),
            Unavailable::KvmDoesNotHoldTheMsr(verdict) => {
                write!(f, "KVM does not hold IA32_FEATURE_CONTROL: {verdict}")
            }
            Unavailable::MissingCapability(cap) => write!(
                f,
                "KVM does not hold IA32_FEATURE_CONTROL and lacks {cap:?} to emulate it"
            ),
        }
    }
}

/// How the VMM wants IA32_FEATURE_CONTROL provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Through `KVM_SET_MSRS` ([`crate::native`]); only where KVM holds the MSR.
    Native,
    /// Through MSR filters and user-space MSR exits ([`crate::emulated`]); only where KVM
    /// does not hold the MSR.
    Emulated,
    /// Whichever of the two the probe shows is right.
    #[default]
    Automatic,
}

/// The mode a VM ends up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedMode {
    /// KVM holds the MSR; the VMM writes it with `KVM_SET_MSRS` after `KVM_SET_CPUID2`.
    Native,
    /// The VMM holds the MSR and answers guest accesses.
    Emulated,
}

impl fmt::Display for ResolvedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResolvedMode::Native => "native",
            ResolvedMode::Emulated => "emulated",
        })
    }
}

/// What the probe found KVM doing with MSR 0x3a.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeVerdict {
    /// KVM stored `LOCKED` and reads it back: kvm_intel's semantics.
    HeldByKvm,
    /// `KVM_SET_MSRS` processed 0 entries: KVM has no such MSR (kvm_amd, kvm_pvm).
    RefusedByKvm,
    /// KVM took the write but reads 0 (`Some(0)`) or processes no read (`None`): it drops
    /// the value (kvm_amd with `kvm.ignore_msrs=1`).
    Ignored {
        /// What `KVM_GET_MSRS` returned.
        read: Option<u64>,
    },
}

impl fmt::Display for ProbeVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeVerdict::HeldByKvm => {
                f.write_str("KVM stored 0x1 (LOCKED) on a scratch vCPU and reads it back")
            }
            ProbeVerdict::RefusedByKvm => f.write_str(
                "KVM_SET_MSRS of 0x1 (LOCKED) on a scratch vCPU processed 0 entries, which kvm_intel never does",
            ),
            ProbeVerdict::Ignored { read: Some(read) } => write!(
                f,
                "KVM took 0x1 (LOCKED) on a scratch vCPU but reads back {read:#x}"
            ),
            ProbeVerdict::Ignored { read: None } => f.write_str(
                "KVM took 0x1 (LOCKED) on a scratch vCPU but KVM_GET_MSRS returns no entry",
            ),
        }
    }
}

/// The value the probe writes: `LOCKED`, valid from the host on every kvm_intel vCPU.
pub const PROBE_VALUE: u64 = crate::sys::FEAT_CTL_LOCKED;

/// Runs the probe's write and read on `io` and classifies what KVM did.
pub(crate) fn probe_with<M: MsrIo>(io: &M) -> Result<ProbeVerdict> {
    if !io
        .set_msr(MSR_IA32_FEAT_CTL, PROBE_VALUE)
        .map_err(Error::ProbeSetMsrs)?
    {
        return Ok(ProbeVerdict::RefusedByKvm);
    }
    match io.get_msr(MSR_IA32_FEAT_CTL).map_err(Error::ProbeGetMsrs)? {
        Some(PROBE_VALUE) => Ok(ProbeVerdict::HeldByKvm),
        read @ (Some(0) | None) => Ok(ProbeVerdict::Ignored { read }),
        Some(read) => Err(Error::ProbeInconclusive { read }),
    }
}

/// What the child process reports, as plain integers (written to the pipe byte for byte).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ChildReport {
    /// 0 if the scratch VM and vCPU exist, else 1 (VM) or 2 (vCPU).
    stage: i32,
    /// The errno of the failed stage, of KVM_SET_MSRS (set_state 2) or KVM_GET_MSRS
    /// (get_state 2).
    errno: i32,
    /// 0: refused, 1: processed, 2: errno.
    set_state: i32,
    /// 0: no entry, 1: value, 2: errno.
    get_state: i32,
    value: u64,
}

const REPORT_SIZE: usize = std::mem::size_of::<ChildReport>();

/// The scratch VM, vCPU and MSR accesses, with system calls only (this runs in the child).
fn child_probe(kvm_fd: RawFd) -> ChildReport {
    let mut report = ChildReport::default();
    // SAFETY: KVM_CREATE_VM takes an integer (machine type 0) and returns a new fd; no memory
    // is passed.
    let vm = unsafe { libc::ioctl(kvm_fd, KVM_CREATE_VM(), 0 as libc::c_ulong) };
    if vm < 0 {
        report.stage = 1;
        report.errno = Errno::last().errno();
        return report;
    }
    // SAFETY: KVM_CREATE_VCPU takes an integer (vCPU id 0) and returns a new fd.
    let vcpu = unsafe { libc::ioctl(vm, KVM_CREATE_VCPU(), 0 as libc::c_ulong) };
    if vcpu < 0 {
        report.stage = 2;
        report.errno = Errno::last().errno();
        return report;
    }
    let io = RawMsrFd(vcpu);
    match io.set_msr(MSR_IA32_FEAT_CTL, PROBE_VALUE) {
        Ok(done) => report.set_state = i32::from(done),
        Err(e) => {
            report.set_state = 2;
            report.errno = e.errno();
            return report;
        }
    }
    if report.set_state == 1 {
        match io.get_msr(MSR_IA32_FEAT_CTL) {
            Ok(Some(v)) => {
                report.get_state = 1;
                report.value = v;
            }
            Ok(None) => report.get_state = 0,
            Err(e) => {
                report.get_state = 2;
                report.errno = e.errno();
            }
        }
    }
    report
}

/// Replays a child's report as an [`MsrIo`], so that the classification is the one
/// [`probe_with`] makes.
struct Replay(ChildReport);

impl MsrIo for Replay {
    fn set_msr(&self, _index: u32, _data: u64) -> std::result::Result<bool, Errno> {
        match self.0.set_state {
            2 => Err(Errno::new(self.0.errno)),
            s => Ok(s == 1),
        }
    }

    fn get_msr(&self, _index: u32) -> std::result::Result<Option<u64>, Errno> {
        match self.0.get_state {
            2 => Err(Errno::new(self.0.errno)),
            1 => Ok(Some(self.0.value)),
            _ => Ok(None),
        }
    }
}

fn verdict_of(report: ChildReport) -> Result<ProbeVerdict> {
    match report.stage {
        1 => Err(Error::CreateScratchVm(Errno::new(report.errno))),
        2 => Err(Error::CreateScratchVcpu(Errno::new(report.errno))),
        _ => probe_with(&Replay(report)),
    }
}

/// Closes `fd`, ignoring the result: used only on fds this module opened.
fn close(fd: RawFd) {
    // SAFETY: `fd` was returned by pipe2 in this module and is closed exactly once.
    unsafe { libc::close(fd) };
}

/// Probes what KVM does with MSR 0x3a, on a scratch VM in a child process (see the module
/// documentation for why a child, and how the answer is read).
///
/// # Errors
///
/// [`Error::ProbePipe`], [`Error::ProbeFork`], [`Error::ProbeRead`], [`Error::ProbeWait`] or
/// [`Error::ProbeChildLost`] when the child process cannot be run;
/// [`Error::CreateScratchVm`], [`Error::CreateScratchVcpu`], [`Error::ProbeSetMsrs`],
/// [`Error::ProbeGetMsrs`] with the child's errno; [`Error::ProbeInconclusive`] when KVM
/// reads back a value that fits no known behaviour.
pub fn probe_msr(kvm: &Kvm) -> Result<ProbeVerdict> {
    let kvm_fd = kvm.as_raw_fd();
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the two-element array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(Error::ProbePipe(Errno::last()));
    }
    let (read_end, write_end) = (fds[0], fds[1]);
    // SAFETY: the child runs only `child_probe` (ioctls on stack data), `write` and `_exit`,
    // all system calls, so it takes no lock another thread of the parent may have held at the
    // fork; it never returns into the caller's code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = Errno::last();
        close(read_end);
        close(write_end);
        return Err(Error::ProbeFork(e));
    }
    if pid == 0 {
        let report = child_probe(kvm_fd);
        // SAFETY: writes REPORT_SIZE bytes from `report`, a repr(C) value of exactly that
        // size that lives until the call returns; then ends the child without running any of
        // the parent's exit handlers or destructors.
        unsafe {
            libc::write(
                write_end,
                (&report as *const ChildReport).cast(),
                REPORT_SIZE,
            );
            libc::_exit(0)
        }
    }
    close(write_end);
    let mut report = ChildReport::default();
    let mut got = 0usize;
    let read_result = loop {
        if got == REPORT_SIZE {
            break Ok(());
        }
        // SAFETY: reads at most the remaining bytes of `report` (a plain-integer repr(C)
        // value, valid for any bytes) at offset `got` < REPORT_SIZE.
        let n = unsafe {
            libc::read(
                read_end,
                (&mut report as *mut ChildReport)
                    .cast::<u8>()
                    .add(got)
                    .cast(),
                REPORT_SIZE - got,
            )
        };
        match n {
            0 => break Ok(()),
            n if n > 0 => got += n as usize,
            _ => {
                let e = Errno::last();
                if e.errno() != libc::EINTR {
                    break Err(e);
                }
            }
        }
    };
    close(read_end);
    let mut status = 0;
    loop {
        // SAFETY: waits for the child forked above and writes its status to `status`.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = Errno::last();
        if e.errno() != libc::EINTR {
            return Err(Error::ProbeWait(e));
        }
    }
    read_result.map_err(Error::ProbeRead)?;
    if got != REPORT_SIZE {
        return Err(Error::ProbeChildLost {
            got,
            expected: REPORT_SIZE,
            status,
        });
    }
    verdict_of(report)
}

/// A resolved mode and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    /// The mode.
    pub mode: ResolvedMode,
    /// What the probe found, which the mode follows.
    pub verdict: ProbeVerdict,
    /// Whether the mode was asked for explicitly (and confirmed by the probe).
    pub requested: bool,
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = if self.requested {
            "requested, confirmed"
        } else {
            "chosen"
        };
        write!(f, "{} ({how}): {}", self.mode, self.verdict)
    }
}

/// The decision from a probe verdict and the emulation capabilities.
pub(crate) fn decide(
    mode: Mode,
    verdict: ProbeVerdict,
    user_space_msr: bool,
    msr_filter: bool,
) -> std::result::Result<Resolution, Unavailable> {
    let held = verdict == ProbeVerdict::HeldByKvm;
    let requested = mode != Mode::Automatic;
    match (mode, held) {
        (Mode::Native | Mode::Automatic, true) => Ok(Resolution {
            mode: ResolvedMode::Native,
            verdict,
            requested,
        }),
        (Mode::Emulated, true) => Err(Unavailable::KvmHoldsTheMsr),
        (Mode::Native, false) => Err(Unavailable::KvmDoesNotHoldTheMsr(verdict)),
        (Mode::Emulated | Mode::Automatic, false) => {
            if !user_space_msr {
                Err(Unavailable::MissingCapability(Cap::X86UserSpaceMsr))
            } else if !msr_filter {
                Err(Unavailable::MissingCapability(Cap::X86MsrFilter))
            } else {
                Ok(Resolution {
                    mode: ResolvedMode::Emulated,
                    verdict,
                    requested,
                })
            }
        }
    }
}

fn has_emulation_caps(kvm: &Kvm) -> (bool, bool) {
    (
        kvm.check_extension(Cap::X86UserSpaceMsr),
        kvm.check_extension(Cap::X86MsrFilter),
    )
}

/// Resolves `mode` on this host from [`probe_msr`]. An explicit mode is confirmed, never
/// silently replaced.
///
/// # Errors
///
/// [`Error::Unavailable`] when the mode cannot be used here (emulation where KVM holds the
/// MSR, native where it does not, emulation without the capabilities); the probe's errors.
pub fn resolve(kvm: &Kvm, mode: Mode) -> Result<Resolution> {
    let verdict = probe_msr(kvm)?;
    let (user_space_msr, msr_filter) = has_emulation_caps(kvm);
    decide(mode, verdict, user_space_msr, msr_filter)
        .map_err(|why| Error::Unavailable { mode, why })
}

/// What this host offers for IA32_FEATURE_CONTROL, for the VMM to print.
#[derive(Debug)]
pub struct FeatCtlReport {
    /// The KVM vendor module found in `/sys/module`, for the reader; the decision does not
    /// depend on it.
    pub vendor_module: Option<&'static str>,
    /// Whether MSR 0x3a is in `KVM_GET_MSR_INDEX_LIST` (a KVM may list it yet not hold it).
    pub in_msr_index_list: bool,
    /// What the probe found.
    pub verdict: ProbeVerdict,
    /// `KVM_CAP_X86_USER_SPACE_MSR`.
    pub user_space_msr: bool,
    /// `KVM_CAP_X86_MSR_FILTER`.
    pub msr_filter: bool,
    /// What [`Mode::Automatic`] resolves to, or why nothing works.
    pub automatic: std::result::Result<Resolution, Unavailable>,
}

fn vendor_module() -> Option<&'static str> {
    ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).exists())
}

/// Probes the host once and reports which mode [`Mode::Automatic`] gives and why.
///
/// # Errors
///
/// [`Error::GetMsrIndexList`], or the errors of [`probe_msr`].
pub fn probe(kvm: &Kvm) -> Result<FeatCtlReport> {
    let in_msr_index_list = kvm
        .get_msr_index_list()
        .map_err(Error::GetMsrIndexList)?
        .as_slice()
        .contains(&MSR_IA32_FEAT_CTL);
    let verdict = probe_msr(kvm)?;
    let (user_space_msr, msr_filter) = has_emulation_caps(kvm);
    Ok(FeatCtlReport {
        vendor_module: vendor_module(),
        in_msr_index_list,
        verdict,
        user_space_msr,
        msr_filter,
        automatic: decide(Mode::Automatic, verdict, user_space_msr, msr_filter),
    })
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl fmt::Display for FeatCtlReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "IA32_FEATURE_CONTROL (MSR 0x3a):")?;
        writeln!(
            f,
            "  KVM vendor module: {}",
            self.vendor_module.unwrap_or("unknown")
        )?;
        writeln!(
            f,
            "  listed in KVM_GET_MSR_INDEX_LIST: {}",
            yes_no(self.in_msr_index_list)
        )?;
        writeln!(f, "  probe (child process): {}", self.verdict)?;
        writeln!(
            f,
            "  KVM_CAP_X86_USER_SPACE_MSR: {}, KVM_CAP_X86_MSR_FILTER: {}",
            yes_no(self.user_space_msr),
            yes_no(self.msr_filter)
        )?;
        match &self.automatic {
            Ok(resolution) => write!(f, "  mode: {resolution}"),
            Err(why) => write!(f, "  mode: unavailable: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_kernel::{FakeVcpu, GuestCpu, Kernel, VmxRelease};
    use crate::feature_control::FeatureControl;
    use crate::native;

    const VMX_5_15: Kernel = Kernel::Vmx {
        release: VmxRelease::Linux5_15,
        nested: true,
    };
    const VMX_6_1: Kernel = Kernel::Vmx {
        release: VmxRelease::Linux6_1,
        nested: true,
    };

    #[test]
    fn probe_classifies_each_vendor_module() {
        // models vmx_vcpu_create + vmx_set_msr/vmx_get_msr (Linux 5.15 and 6.1),
        // svm_set_msr -> kvm_set_msr_common (Linux 6.1, ignore_msrs=0 and =1), and the
        // measured kvm_pvm
        for kernel in [
            VMX_5_15,
            VMX_6_1,
            Kernel::Vmx {
                release: VmxRelease::Linux5_15,
                nested: false,
            },
        ] {
            let scratch = FakeVcpu::created(kernel);
            assert_eq!(
                probe_with(&scratch).expect("verdict"),
                ProbeVerdict::HeldByKvm,
                "{kernel:?}"
            );
        }
        let verdict = probe_with(&FakeVcpu::created(Kernel::Svm6_1)).expect("verdict");
        assert_eq!(verdict, ProbeVerdict::RefusedByKvm);
        let verdict = probe_with(&FakeVcpu::created(Kernel::PvmMeasured)).expect("verdict");
        assert_eq!(verdict, ProbeVerdict::RefusedByKvm);
        let verdict = probe_with(&FakeVcpu::created(Kernel::SvmIgnoreMsrs6_1)).expect("verdict");
        assert_eq!(verdict, ProbeVerdict::Ignored { read: Some(0) });
    }

    #[test]
    fn former_defect_a_refused_scratch_write_no_longer_leads_to_emulation_on_vmx() {
        // models vmx_set_msr/vmx_feature_control_msr_valid and handle_vmxon, Linux 5.15.
        // The former probe wrote LOCKED | VMX_OUTSIDE_SMX on a scratch vCPU without CPUID:
        // Linux 5.15 refuses it (VMX is not valid before KVM_SET_CPUID2) ...
        let scratch = FakeVcpu::created(VMX_5_15);
        assert_eq!(scratch.set_msr(MSR_IA32_FEAT_CTL, 0x5).ok(), Some(false));
        // ... so the crate emulated the MSR, KVM's copy stayed 0, and VMXON faulted:
        let emulated = FakeVcpu::configured(VMX_5_15, GuestCpu::with_vmx(), 0);
        assert_eq!(emulated.guest_vmxon(), Err("#GP"));

        // Now: the probe finds KVM holding the MSR, emulation is refused even when asked
        // for, and the write on the configured vCPU makes VMXON work.
        let verdict = probe_with(&FakeVcpu::created(VMX_5_15)).expect("verdict");
        let auto = decide(Mode::Automatic, verdict, true, true).expect("a mode");
        assert_eq!(auto.mode, ResolvedMode::Native);
        assert_eq!(
            decide(Mode::Emulated, verdict, true, true),
            Err(Unavailable::KvmHoldsTheMsr)
        );
        let vcpu = FakeVcpu::configured(VMX_5_15, GuestCpu::with_vmx(), 0);
        let exposure = VMX_5_15.exposure(GuestCpu::with_vmx());
        let value = exposure.features.firmware_value();
        assert_eq!(
            native::apply_with(&vcpu, &exposure, value).expect("applied"),
            value
        );
        assert_eq!(vcpu.guest_vmxon(), Ok(()));

        // And where even that write is refused (nested=0), the result is a typed error.
        let off = Kernel::Vmx {
            release: VmxRelease::Linux5_15,
            nested: false,
        };
        let verdict = probe_with(&FakeVcpu::created(off)).expect("verdict");
        assert_eq!(
            decide(Mode::Automatic, verdict, true, true).map(|r| r.mode),
            Ok(ResolvedMode::Native)
        );
        let vcpu = FakeVcpu::configured(off, GuestCpu::with_vmx(), 0);
        let err = native::apply_with(
            &vcpu,
            &off.exposure(GuestCpu::with_vmx()),
            FeatureControl::LOCKED | FeatureControl::VMX_OUTSIDE_SMX,
        )
        .expect_err("refused");
        assert!(matches!(
            err,
            native::Error::HostWriteRefused {
                refusal: native::HostWriteRefusal::NestedDisabled,
                ..
            }
        ));
    }

    #[test]
    fn decisions_for_every_mode_and_verdict() {
        let refused = ProbeVerdict::RefusedByKvm;
        let held = ProbeVerdict::HeldByKvm;
        let r = decide(Mode::Automatic, refused, true, true).expect("emulated");
        assert_eq!((r.mode, r.requested), (ResolvedMode::Emulated, false));
        let r = decide(Mode::Emulated, refused, true, true).expect("emulated");
        assert_eq!((r.mode, r.requested), (ResolvedMode::Emulated, true));
        let r = decide(Mode::Native, held, false, false).expect("native");
        assert_eq!((r.mode, r.requested), (ResolvedMode::Native, true));
        assert_eq!(
            decide(Mode::Native, refused, true, true),
            Err(Unavailable::KvmDoesNotHoldTheMsr(refused))
        );
        assert_eq!(
            decide(Mode::Automatic, refused, false, true),
            Err(Unavailable::MissingCapability(Cap::X86UserSpaceMsr))
        );
        assert_eq!(
            decide(Mode::Automatic, refused, true, false),
            Err(Unavailable::MissingCapability(Cap::X86MsrFilter))
        );
    }

    #[test]
    fn inconclusive_reads_choose_nothing() {
        struct Odd;
        impl MsrIo for Odd {
            fn set_msr(&self, _: u32, _: u64) -> std::result::Result<bool, Errno> {
                Ok(true)
            }
            fn get_msr(&self, _: u32) -> std::result::Result<Option<u64>, Errno> {
                Ok(Some(0x5))
            }
        }
        assert!(matches!(
            probe_with(&Odd),
            Err(Error::ProbeInconclusive { read: 5 })
        ));
    }

    #[test]
    fn child_reports_replay_into_the_same_verdicts() {
        let ok = |set_state, get_state, value| ChildReport {
            stage: 0,
            errno: 0,
            set_state,
            get_state,
            value,
        };
        assert_eq!(verdict_of(ok(1, 1, 1)).ok(), Some(ProbeVerdict::HeldByKvm));
        assert_eq!(
            verdict_of(ok(0, 0, 0)).ok(),
            Some(ProbeVerdict::RefusedByKvm)
        );
        assert_eq!(
            verdict_of(ok(1, 0, 0)).ok(),
            Some(ProbeVerdict::Ignored { read: None })
        );
        let failed = ChildReport {
            stage: 2,
            errno: libc::ENOMEM,
            ..ChildReport::default()
        };
        assert!(
            matches!(verdict_of(failed), Err(Error::CreateScratchVcpu(e)) if e.errno() == libc::ENOMEM)
        );
        let set_errno = ChildReport {
            set_state: 2,
            errno: libc::EFAULT,
            ..ChildReport::default()
        };
        assert!(matches!(verdict_of(set_errno), Err(Error::ProbeSetMsrs(_))));
    }

    #[test]
    fn report_says_mode_and_why() {
        let report = FeatCtlReport {
            vendor_module: Some("kvm_pvm"),
            in_msr_index_list: true,
            verdict: ProbeVerdict::RefusedByKvm,
            user_space_msr: true,
            msr_filter: true,
            automatic: decide(Mode::Automatic, ProbeVerdict::RefusedByKvm, true, true),
        };
        let text = report.to_string();
        assert!(text.contains("KVM vendor module: kvm_pvm"), "{text}");
        assert!(
            text.contains("mode: emulated (chosen): KVM_SET_MSRS of 0x1 (LOCKED) on a scratch vCPU processed 0 entries"),
            "{text}"
        );
        let report = FeatCtlReport {
            msr_filter: false,
            automatic: decide(Mode::Automatic, ProbeVerdict::RefusedByKvm, true, false),
            ..report
        };
        assert!(report.to_string().contains(
            "mode: unavailable: KVM does not hold IA32_FEATURE_CONTROL and lacks X86MsrFilter"
        ));
    }
}
