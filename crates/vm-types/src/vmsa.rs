//! The VMSA SEV features the host's KVM supports for SEV-ES and SEV-SNP guests.
//!
//! Linux 6.10 added the `/dev/kvm` device attribute `KVM_X86_SEV_VMSA_FEATURES` (group
//! `KVM_X86_GRP_SEV` = 1, attribute 0): `KVM_GET_DEVICE_ATTR` returns the mask of VMSA SEV
//! features a VMM may request in `KVM_SEV_INIT2`'s `vmsa_features` (`sev_dev_get_attr()` in
//! arch/x86/kvm/svm/sev.c). A vendor module without an SEV attribute group (kvm_intel, an
//! older or SEV-less kvm_amd, other KVM backends) answers `ENXIO`; a kernel before 5.17 takes
//! no device attributes on `/dev/kvm` at all (`KVM_CAP_SYS_ATTRIBUTES` is 0).

use std::fmt;

use kvm_bindings::kvm_device_attr;
use kvm_ioctls::Kvm;
use thiserror::Error;
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::sys;

/// A mask of VMSA SEV features (`SVM_SEV_FEAT_*`).
///
/// ```
/// use vm_types::VmsaFeatures;
///
/// let features = VmsaFeatures::from_bits(0x220);
/// assert!(features.debug_swap() && features.secure_tsc());
/// assert_eq!(features.to_string(), "0x220 (DebugSwap, SecureTSC)");
/// assert_eq!(VmsaFeatures::from_bits(0x1020).unknown_bits(), 0x1000);
/// assert_eq!(VmsaFeatures::from_bits(0).to_string(), "0x0 (none)");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VmsaFeatures(u64);

impl VmsaFeatures {
    const KNOWN: [(u64, &'static str); 2] = [
        (sys::SVM_SEV_FEAT_DEBUG_SWAP, "DebugSwap"),
        (sys::SVM_SEV_FEAT_SECURE_TSC, "SecureTSC"),
    ];

    /// The features of a raw mask.
    pub const fn from_bits(bits: u64) -> Self {
        VmsaFeatures(bits)
    }

    /// The raw mask.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// DebugSwap (bit 5): the CPU swaps debug registers for SEV-ES guests.
    pub const fn debug_swap(self) -> bool {
        self.0 & sys::SVM_SEV_FEAT_DEBUG_SWAP != 0
    }

    /// Secure TSC (bit 9): SNP guests may get a TSC the host cannot change.
    pub const fn secure_tsc(self) -> bool {
        self.0 & sys::SVM_SEV_FEAT_SECURE_TSC != 0
    }

    /// Bits this crate does not name.
    pub const fn unknown_bits(self) -> u64 {
        self.0 & !(sys::SVM_SEV_FEAT_DEBUG_SWAP | sys::SVM_SEV_FEAT_SECURE_TSC)
    }
}

impl fmt::Display for VmsaFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x} (", self.0)?;
        let mut names: Vec<String> = Self::KNOWN
            .iter()
            .filter(|(bit, _)| self.0 & bit != 0)
            .map(|(_, name)| (*name).to_string())
            .collect();
        if self.unknown_bits() != 0 {
            names.push(format!("unknown {:#x}", self.unknown_bits()));
        }
        if names.is_empty() {
            f.write_str("none)")
        } else {
            write!(f, "{})", names.join(", "))
        }
    }
}

/// What the host says about `KVM_X86_SEV_VMSA_FEATURES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmsaFeaturesQuery {
    /// KVM answered with the supported mask (possibly empty on an AMD host with SEV-ES off).
    Supported(VmsaFeatures),
    /// `ENXIO`: this KVM has no SEV attribute group, so no SEV-ES/SNP VM can be created.
    NotOffered,
    /// `KVM_CAP_SYS_ATTRIBUTES` is 0: `/dev/kvm` takes no device attributes (before 5.17).
    NoSystemAttributes,
}

impl VmsaFeaturesQuery {
    /// The features, if KVM reported any mask.
    pub const fn features(self) -> Option<VmsaFeatures> {
        match self {
            VmsaFeaturesQuery::Supported(features) => Some(features),
            VmsaFeaturesQuery::NotOffered | VmsaFeaturesQuery::NoSystemAttributes => None,
        }
    }
}

impl fmt::Display for VmsaFeaturesQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmsaFeaturesQuery::Supported(features) => write!(f, "{features}"),
            VmsaFeaturesQuery::NotOffered => {
                f.write_str("not offered (ENXIO: this KVM has no SEV attribute group)")
            }
            VmsaFeaturesQuery::NoSystemAttributes => {
                f.write_str("not queryable (KVM_CAP_SYS_ATTRIBUTES = 0: a kernel before 5.17)")
            }
        }
    }
}

/// Errors of the VMSA-features query.
#[derive(Debug, Error)]
pub enum Error {
    /// `KVM_GET_DEVICE_ATTR` failed with something other than `ENXIO`.
    #[error(
        "KVM_GET_DEVICE_ATTR(group KVM_X86_GRP_SEV, attr KVM_X86_SEV_VMSA_FEATURES) on /dev/kvm \
         failed"
    )]
    GetDeviceAttr {
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Result of this module's operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Asks `/dev/kvm` for `KVM_X86_SEV_VMSA_FEATURES`.
///
/// # Errors
///
/// [`Error::GetDeviceAttr`] if the ioctl fails with anything but `ENXIO`.
pub fn sev_vmsa_features(kvm: &Kvm) -> Result<VmsaFeaturesQuery> {
    let sys_attributes = kvm.check_extension_raw(libc::c_ulong::from(sys::KVM_CAP_SYS_ATTRIBUTES));
    if sys_attributes <= 0 {
        return interpret(sys_attributes, Ok(0));
    }
    let mut value: u64 = 0;
    let attr = kvm_device_attr {
        flags: 0,
        group: sys::KVM_X86_GRP_SEV,
        attr: u64::from(sys::KVM_X86_SEV_VMSA_FEATURES),
        addr: &mut value as *mut u64 as u64,
    };
    // SAFETY: KVM_GET_DEVICE_ATTR reads the kvm_device_attr, which lives across the call, and
    // for the SEV group writes one u64 to `addr`, which points at a live local of that type;
    // the fd is the open /dev/kvm owned by `kvm`.
    let ret = unsafe { ioctl_with_ref(kvm, sys::KVM_GET_DEVICE_ATTR(), &attr) };
    let answer = if ret == 0 {
        Ok(value)
    } else {
        Err(kvm_ioctls::Error::last())
    };
    interpret(sys_attributes, answer)
}

/// Interprets `KVM_CHECK_EXTENSION(KVM_CAP_SYS_ATTRIBUTES)` and the answer of
/// `KVM_GET_DEVICE_ATTR` (ignored when the capability is 0).
///
/// ```
/// use vm_types::vmsa::{interpret, VmsaFeaturesQuery};
/// use vm_types::VmsaFeatures;
///
/// assert_eq!(interpret(1, Ok(0x20))?, VmsaFeaturesQuery::Supported(VmsaFeatures::from_bits(0x20)));
/// let enxio = kvm_ioctls::Error::new(libc::ENXIO);
/// assert_eq!(interpret(1, Err(enxio))?, VmsaFeaturesQuery::NotOffered);
/// assert_eq!(interpret(0, Ok(0))?, VmsaFeaturesQuery::NoSystemAttributes);
/// assert!(interpret(1, Err(kvm_ioctls::Error::new(libc::EFAULT))).is_err());
/// # Ok::<(), vm_types::vmsa::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::GetDeviceAttr`] for an errno other than `ENXIO`.
pub fn interpret(
    sys_attributes: i32,
    answer: std::result::Result<u64, kvm_ioctls::Error>,
) -> Result<VmsaFeaturesQuery> {
    if sys_attributes <= 0 {
        return Ok(VmsaFeaturesQuery::NoSystemAttributes);
    }
    match answer {
        Ok(bits) => Ok(VmsaFeaturesQuery::Supported(VmsaFeatures::from_bits(bits))),
        Err(e) if e.errno() == libc::ENXIO => Ok(VmsaFeaturesQuery::NotOffered),
        Err(source) => Err(Error::GetDeviceAttr { source }),
    }
}
