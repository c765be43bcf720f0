//! Choosing how a VM gets IA32_FEATURE_CONTROL: natively through KVM, emulated in userspace,
//! or whichever this host supports, and a report of that choice for humans.

use std::fmt;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

use crate::feature_control::FeatureControl;
use crate::native::{self, NativeOutcome};

/// Errors from choosing a mode or probing the host.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the scratch VM for the native probe failed.
    #[error("KVM_CREATE_VM for the IA32_FEATURE_CONTROL probe failed")]
    CreateScratchVm(#[source] kvm_ioctls::Error),
    /// Creating the scratch vCPU for the native probe failed.
    #[error("KVM_CREATE_VCPU for the IA32_FEATURE_CONTROL probe failed")]
    CreateScratchVcpu(#[source] kvm_ioctls::Error),
    /// Reading the MSR index list failed.
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    GetMsrIndexList(#[source] kvm_ioctls::Error),
    /// The native probe's ioctls failed.
    #[error("the native IA32_FEATURE_CONTROL probe failed")]
    NativeProbe(#[source] native::Error),
    /// Emulation was asked for (or is the only way left) but KVM lacks a capability for it.
    #[error("IA32_FEATURE_CONTROL cannot be emulated: KVM lacks {missing:?}")]
    EmulationUnavailable {
        /// The first missing capability.
        missing: Cap,
        /// What the native probe found, when one ran (automatic mode).
        native: Option<NativeOutcome>,
    },
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// How the VMM wants IA32_FEATURE_CONTROL provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Through `KVM_SET_MSRS`; only kvm_intel holds the MSR.
    Native,
    /// Through MSR filters and user-space MSR exits; works on any KVM with both (Linux 5.10+).
    Emulated,
    /// Probe once: native if KVM stores and reads back the value, else emulated.
    #[default]
    Automatic,
}

/// The mode a VM ends up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedMode {
    /// KVM holds the MSR; the VMM writes it with `KVM_SET_MSRS`.
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

/// Why a mode was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolutionReason {
    /// The caller asked for this mode explicitly.
    Requested,
    /// The probe found that KVM stores the MSR.
    NativeAccepted,
    /// The probe found that KVM does not store the MSR, so emulation is used.
    NativeDeclined(NativeOutcome),
}

/// A resolved mode and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    /// The mode.
    pub mode: ResolvedMode,
    /// Why.
    pub reason: ResolutionReason,
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            ResolutionReason::Requested => write!(f, "{} (requested)", self.mode),
            ResolutionReason::NativeAccepted => {
                write!(f, "{}: KVM stores IA32_FEATURE_CONTROL itself", self.mode)
            }
            ResolutionReason::NativeDeclined(outcome) => write!(f, "{}: {outcome}", self.mode),
        }
    }
}

/// The value the probe writes: what a VMM offering nested VMX needs, `LOCKED | VMX outside
/// SMX`. Linux 6.0+ accepts it from the host whatever the scratch vCPU's CPUID is.
pub const PROBE_VALUE: FeatureControl =
    FeatureControl::LOCKED.union(FeatureControl::VMX_OUTSIDE_SMX);

/// Writes `value` with `KVM_SET_MSRS` on a vCPU of a scratch VM and reads it back, leaving
/// the VMs the VMM really runs untouched.
pub fn probe_native(kvm: &Kvm, value: FeatureControl) -> Result<NativeOutcome> {
    let vm = kvm.create_vm().map_err(Error::CreateScratchVm)?;
    let vcpu = vm.create_vcpu(0).map_err(Error::CreateScratchVcpu)?;
    native::apply_native(&vcpu, value).map_err(Error::NativeProbe)
}

fn emulation_missing(user_space_msr: bool, msr_filter: bool) -> Option<Cap> {
    if !user_space_msr {
        Some(Cap::X86UserSpaceMsr)
    } else if !msr_filter {
        Some(Cap::X86MsrFilter)
    } else {
        None
    }
}

/// The automatic choice, from what the host offers: native if the probe was applied,
/// otherwise emulation if both capabilities are there.
fn decide(native: NativeOutcome, user_space_msr: bool, msr_filter: bool) -> Result<Resolution> {
    if let NativeOutcome::Applied(_) = native {
        return Ok(Resolution {
            mode: ResolvedMode::Native,
            reason: ResolutionReason::NativeAccepted,
        });
    }
    match emulation_missing(user_space_msr, msr_filter) {
        None => Ok(Resolution {
            mode: ResolvedMode::Emulated,
            reason: ResolutionReason::NativeDeclined(native),
        }),
        Some(missing) => Err(Error::EmulationUnavailable {
            missing,
            native: Some(native),
        }),
    }
}

fn has_emulation_caps(kvm: &Kvm) -> (bool, bool) {
    (
        kvm.check_extension(Cap::X86UserSpaceMsr),
        kvm.check_extension(Cap::X86MsrFilter),
    )
}

/// Resolves `mode` on this host. [`Mode::Native`] is taken as asked (the VMM's own
/// [`native::apply_native`] reports if KVM then declines); [`Mode::Emulated`] is checked
/// against the capabilities; [`Mode::Automatic`] probes with `value` (see [`probe_native`]).
pub fn resolve(kvm: &Kvm, mode: Mode, value: FeatureControl) -> Result<Resolution> {
    match mode {
        Mode::Native => Ok(Resolution {
            mode: ResolvedMode::Native,
            reason: ResolutionReason::Requested,
        }),
        Mode::Emulated => {
            let (user_space_msr, msr_filter) = has_emulation_caps(kvm);
            match emulation_missing(user_space_msr, msr_filter) {
                None => Ok(Resolution {
                    mode: ResolvedMode::Emulated,
                    reason: ResolutionReason::Requested,
                }),
                Some(missing) => Err(Error::EmulationUnavailable {
                    missing,
                    native: None,
                }),
            }
        }
        Mode::Automatic => {
            let native = probe_native(kvm, value)?;
            let (user_space_msr, msr_filter) = has_emulation_caps(kvm);
            decide(native, user_space_msr, msr_filter)
        }
    }
}

/// What this host offers for IA32_FEATURE_CONTROL, for the VMM to print.
#[derive(Debug)]
pub struct FeatCtlReport {
    /// The KVM vendor module found in `/sys/module`, for the reader; the decision does not
    /// depend on it.
    pub vendor_module: Option<&'static str>,
    /// Whether MSR 0x3a is in `KVM_GET_MSR_INDEX_LIST` (a KVM may list it yet not store it).
    pub in_msr_index_list: bool,
    /// The value the native probe wrote.
    pub probe_value: FeatureControl,
    /// What the native probe found.
    pub native: NativeOutcome,
    /// `KVM_CAP_X86_USER_SPACE_MSR`.
    pub user_space_msr: bool,
    /// `KVM_CAP_X86_MSR_FILTER`.
    pub msr_filter: bool,
    /// What [`Mode::Automatic`] resolves to, or why nothing works.
    pub automatic: std::result::Result<Resolution, Cap>,
}

fn vendor_module() -> Option<&'static str> {
    ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).exists())
}

/// Probes the host once and reports which mode [`Mode::Automatic`] gives and why.
pub fn probe(kvm: &Kvm) -> Result<FeatCtlReport> {
    let in_msr_index_list = kvm
        .get_msr_index_list()
        .map_err(Error::GetMsrIndexList)?
        .as_slice()
        .contains(&crate::sys::MSR_IA32_FEAT_CTL);
    let native = probe_native(kvm, PROBE_VALUE)?;
    let (user_space_msr, msr_filter) = has_emulation_caps(kvm);
    let automatic = match decide(native, user_space_msr, msr_filter) {
        Ok(resolution) => Ok(resolution),
        Err(Error::EmulationUnavailable { missing, .. }) => Err(missing),
        Err(other) => return Err(other),
    };
    Ok(FeatCtlReport {
        vendor_module: vendor_module(),
        in_msr_index_list,
        probe_value: PROBE_VALUE,
        native,
        user_space_msr,
        msr_filter,
        automatic,
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
        writeln!(
            f,
            "  native probe, KVM_SET_MSRS of {}: {}",
            self.probe_value, self.native
        )?;
        writeln!(
            f,
            "  KVM_CAP_X86_USER_SPACE_MSR: {}, KVM_CAP_X86_MSR_FILTER: {}",
            yes_no(self.user_space_msr),
            yes_no(self.msr_filter)
        )?;
        match &self.automatic {
            Ok(resolution) => write!(f, "  automatic mode: {resolution}"),
            Err(missing) => write!(
                f,
                "  automatic mode: unavailable: KVM does not store the MSR and lacks {missing:?}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_probe_means_native() {
        let r = decide(NativeOutcome::Applied(PROBE_VALUE), false, false).expect("native");
        assert_eq!(r.mode, ResolvedMode::Native);
        assert_eq!(r.reason, ResolutionReason::NativeAccepted);
        assert!(r.to_string().starts_with("native: KVM stores"));
    }

    #[test]
    fn declined_probe_falls_back_to_emulation() {
        for native in [
            NativeOutcome::NotWritten,
            NativeOutcome::ReadBackMismatch {
                written: PROBE_VALUE,
                read: Some(0),
            },
        ] {
            let r = decide(native, true, true).expect("emulated");
            assert_eq!(r.mode, ResolvedMode::Emulated);
            assert_eq!(r.reason, ResolutionReason::NativeDeclined(native));
        }
        let r = decide(NativeOutcome::NotWritten, true, true).expect("emulated");
        assert_eq!(
            r.to_string(),
            "emulated: KVM_SET_MSRS of MSR 0x3a returned 0: KVM wrote nothing"
        );
    }

    #[test]
    fn nothing_works_without_the_capabilities() {
        let e = decide(NativeOutcome::NotWritten, false, true).expect_err("no user msr");
        assert!(matches!(
            e,
            Error::EmulationUnavailable {
                missing: Cap::X86UserSpaceMsr,
                native: Some(NativeOutcome::NotWritten)
            }
        ));
        let e = decide(NativeOutcome::NotWritten, true, false).expect_err("no filter");
        assert!(matches!(
            e,
            Error::EmulationUnavailable {
                missing: Cap::X86MsrFilter,
                ..
            }
        ));
        assert!(e.to_string().contains("X86MsrFilter"));
    }

    #[test]
    fn report_display_says_mode_and_why() {
        let report = FeatCtlReport {
            vendor_module: Some("kvm_pvm"),
            in_msr_index_list: true,
            probe_value: PROBE_VALUE,
            native: NativeOutcome::NotWritten,
            user_space_msr: true,
            msr_filter: false,
            automatic: Err(Cap::X86MsrFilter),
        };
        let text = report.to_string();
        assert!(text.contains("KVM vendor module: kvm_pvm"), "{text}");
        assert!(
            text.contains("KVM_SET_MSRS of 0x5 (LOCKED | VMX_OUTSIDE_SMX)"),
            "{text}"
        );
        assert!(text.contains("KVM_CAP_X86_MSR_FILTER: no"), "{text}");
        assert!(text.contains("unavailable"), "{text}");
        let report = FeatCtlReport {
            vendor_module: None,
            msr_filter: true,
            automatic: Ok(Resolution {
                mode: ResolvedMode::Emulated,
                reason: ResolutionReason::Requested,
            }),
            ..report
        };
        let text = report.to_string();
        assert!(text.contains("unknown"), "{text}");
        assert!(
            text.contains("automatic mode: emulated (requested)"),
            "{text}"
        );
    }

    #[test]
    fn default_mode_is_automatic() {
        assert_eq!(Mode::default(), Mode::Automatic);
    }
}
