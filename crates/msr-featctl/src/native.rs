//! Setting IA32_FEATURE_CONTROL through KVM itself, with `KVM_SET_MSRS`.
//!
//! Only KVM's VMX code holds this MSR: on kvm_intel a host write of any supported bit is
//! stored (Linux 6.0+), on kvm_amd the MSR does not exist, and other KVMs (kvm_pvm) may list
//! it in `KVM_GET_MSR_INDEX_LIST` yet store nothing. `KVM_SET_MSRS` reports a refused entry
//! as a short count, not as an errno, so the count is interpreted here and the value read
//! back with `KVM_GET_MSRS` before it is trusted.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use crate::feature_control::FeatureControl;
use crate::sys::MSR_IA32_FEAT_CTL;

/// Errors of the native path: the ioctls themselves failing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building the one-entry `kvm_msrs` array failed.
    #[error("building the kvm_msrs array for MSR {MSR_IA32_FEAT_CTL:#x} failed")]
    BuildMsrs(#[source] vmm_sys_util::fam::Error),
    /// `KVM_SET_MSRS` failed with an errno.
    #[error("KVM_SET_MSRS of MSR {MSR_IA32_FEAT_CTL:#x} failed")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// `KVM_GET_MSRS` failed with an errno.
    #[error("KVM_GET_MSRS of MSR {MSR_IA32_FEAT_CTL:#x} failed")]
    GetMsrs(#[source] kvm_ioctls::Error),
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// What became of a value written through `KVM_SET_MSRS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeOutcome {
    /// KVM stored the value and reads it back unchanged.
    Applied(FeatureControl),
    /// `KVM_SET_MSRS` returned 0: KVM refused the entry and wrote nothing.
    NotWritten,
    /// KVM took the entry but reads back something else, so it does not hold the MSR.
    ReadBackMismatch {
        /// The value written.
        written: FeatureControl,
        /// The value `KVM_GET_MSRS` returned (or `None` if it returned no entry).
        read: Option<u64>,
    },
}

impl std::fmt::Display for NativeOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NativeOutcome::Applied(v) => write!(f, "KVM stored {v} and reads it back"),
            NativeOutcome::NotWritten => {
                write!(f, "KVM_SET_MSRS of MSR 0x3a returned 0: KVM wrote nothing")
            }
            NativeOutcome::ReadBackMismatch {
                written,
                read: Some(read),
            } => write!(
                f,
                "KVM_SET_MSRS took {written} but KVM_GET_MSRS reads {read:#x}"
            ),
            NativeOutcome::ReadBackMismatch {
                written,
                read: None,
            } => write!(
                f,
                "KVM_SET_MSRS took {written} but KVM_GET_MSRS returned no entry"
            ),
        }
    }
}

fn one_entry(data: u64) -> Result<Msrs> {
    Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_FEAT_CTL,
        data,
        ..Default::default()
    }])
    .map_err(Error::BuildMsrs)
}

/// Reads IA32_FEATURE_CONTROL as KVM holds it, or `None` if `KVM_GET_MSRS` returned no entry.
pub fn read_native(vcpu: &VcpuFd) -> Result<Option<u64>> {
    let mut msrs = one_entry(0)?;
    let read = vcpu.get_msrs(&mut msrs).map_err(Error::GetMsrs)?;
    Ok((read == 1).then(|| msrs.as_slice()[0].data))
}

/// Writes `value` to IA32_FEATURE_CONTROL with `KVM_SET_MSRS` (a host-initiated write, so
/// LOCKED and the guest CPUID do not restrict it on Linux 6.0+), then reads it back.
///
/// An errno is an [`Error`]; KVM declining the value is an `Ok` outcome other than
/// [`NativeOutcome::Applied`], so callers can fall back to emulation.
pub fn apply_native(vcpu: &VcpuFd, value: FeatureControl) -> Result<NativeOutcome> {
    let msrs = one_entry(value.bits())?;
    let written = vcpu.set_msrs(&msrs).map_err(Error::SetMsrs)?;
    if written == 0 {
        return Ok(NativeOutcome::NotWritten);
    }
    let read = read_native(vcpu)?;
    if read == Some(value.bits()) {
        Ok(NativeOutcome::Applied(value))
    } else {
        Ok(NativeOutcome::ReadBackMismatch {
            written: value,
            read,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_display_what_happened() {
        let v = FeatureControl::LOCKED;
        assert_eq!(
            NativeOutcome::Applied(v).to_string(),
            "KVM stored 0x1 (LOCKED) and reads it back"
        );
        assert!(NativeOutcome::NotWritten.to_string().contains("returned 0"));
        assert!(NativeOutcome::ReadBackMismatch {
            written: v,
            read: Some(0)
        }
        .to_string()
        .contains("reads 0x0"));
        assert!(NativeOutcome::ReadBackMismatch {
            written: v,
            read: None
        }
        .to_string()
        .contains("no entry"));
    }

    #[test]
    fn one_entry_targets_msr_0x3a() {
        let msrs = one_entry(5).expect("one entry");
        assert_eq!(msrs.as_slice().len(), 1);
        assert_eq!(msrs.as_slice()[0].index, 0x3a);
        assert_eq!(msrs.as_slice()[0].data, 5);
    }
}
