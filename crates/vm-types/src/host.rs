//! What VM types the host's KVM accepts, and creating a VM of a given type.
//!
//! `KVM_CAP_VM_TYPES` (Linux 6.8) is asked on `/dev/kvm`; its value is a bitmask in which bit
//! `n` means `KVM_CREATE_VM` accepts type `n`. A kernel that predates the capability answers
//! 0, as it does for every capability it does not know; such a kernel accepts only type 0
//! (`kvm_arch_init_vm()` refused any non-zero type on x86 before 6.8). So 0 means DEFAULT only.
//!
//! `KVM_CREATE_VM` itself answers an unsupported type with a bare `EINVAL`. [`create_vm`]
//! consults the capability first and returns an error that names the type and what the host
//! supports instead; only a type the host reports as supported reaches the kernel.

use std::fmt;

use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;

use crate::sys;
use crate::VmType;

/// A set of VM types, as reported by `KVM_CAP_VM_TYPES`.
///
/// The set keeps the raw bitmask, so types newer than this crate survive: [`VmTypeSet::iter`]
/// yields the known ones, [`VmTypeSet::unknown_types`] the raw numbers of the others.
///
/// ```
/// use vm_types::{VmType, VmTypeSet};
///
/// let set = VmTypeSet::from_capability(0b10_0001); // DEFAULT and TDX
/// assert!(set.contains(VmType::Tdx) && !set.contains(VmType::SevEs));
/// assert_eq!(set.to_string(), "DEFAULT, TDX");
/// assert_eq!(VmTypeSet::from_capability(0), VmTypeSet::default_only());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VmTypeSet {
    mask: u32,
    reported: bool,
}

impl VmTypeSet {
    /// DEFAULT only, the answer for a kernel without `KVM_CAP_VM_TYPES` (before Linux 6.8).
    pub const fn default_only() -> Self {
        VmTypeSet {
            mask: 1 << VmType::Default.raw(),
            reported: false,
        }
    }

    /// A set given by its bitmask, as a kernel with `KVM_CAP_VM_TYPES` reports it.
    pub const fn from_mask(mask: u32) -> Self {
        VmTypeSet {
            mask,
            reported: true,
        }
    }

    /// Interprets the return value of `KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)`.
    ///
    /// Zero (capability unknown to the kernel) means DEFAULT only. A negative value — the
    /// ioctl itself failed, which `/dev/kvm` does not do for this request — is treated the
    /// same way, because type 0 is the one type every KVM accepts.
    pub fn from_capability(value: i32) -> Self {
        match u32::try_from(value) {
            Ok(mask) if mask != 0 => VmTypeSet::from_mask(mask),
            _ => VmTypeSet::default_only(),
        }
    }

    /// The raw bitmask.
    pub const fn mask(&self) -> u32 {
        self.mask
    }

    /// Whether the set came from `KVM_CAP_VM_TYPES`, as opposed to the DEFAULT-only answer
    /// for a kernel that does not report the capability.
    pub const fn reported_by_kernel(&self) -> bool {
        self.reported
    }

    /// Whether the set holds `ty`.
    pub const fn contains(&self, ty: VmType) -> bool {
        self.mask & (1 << ty.raw()) != 0
    }

    /// Whether the set holds the raw type value `raw`; always false from 32 on, which the
    /// capability cannot describe and KVM refuses.
    pub const fn contains_raw(&self, raw: u64) -> bool {
        raw < sys::VM_TYPE_BITS as u64 && self.mask & (1 << raw) != 0
    }

    /// The known types in the set, in raw-value order.
    pub fn iter(&self) -> impl Iterator<Item = VmType> + '_ {
        VmType::ALL.into_iter().filter(|ty| self.contains(*ty))
    }

    /// Raw numbers of the types in the set that this crate does not know.
    pub fn unknown_types(&self) -> impl Iterator<Item = u32> + '_ {
        (0..sys::VM_TYPE_BITS)
            .filter(|raw| self.mask & (1 << raw) != 0 && VmType::try_from(*raw).is_err())
    }

    /// Number of types in the set, known or not.
    pub const fn len(&self) -> usize {
        self.mask.count_ones() as usize
    }

    /// Whether the set is empty (no kernel reports that, but a mask can say it).
    pub const fn is_empty(&self) -> bool {
        self.mask == 0
    }

    /// The known types this crate knows that are *not* in the set.
    pub fn missing(&self) -> impl Iterator<Item = VmType> + '_ {
        VmType::ALL.into_iter().filter(|ty| !self.contains(*ty))
    }

    fn describe(&self) -> String {
        if self.reported {
            format!("{{{self}}} (KVM_CAP_VM_TYPES = {:#x})", self.mask)
        } else {
            format!("{{{self}}} (KVM_CAP_VM_TYPES not reported: a kernel before Linux 6.8)")
        }
    }
}

impl<'a> IntoIterator for &'a VmTypeSet {
    type Item = VmType;
    type IntoIter = Box<dyn Iterator<Item = VmType> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl fmt::Display for VmTypeSet {
    /// The members, comma-separated: `DEFAULT, SW_PROTECTED, type 7`; `none` when empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            let s = if first { "" } else { ", " };
            first = false;
            f.write_str(s)
        };
        for ty in self.iter() {
            sep(f)?;
            write!(f, "{ty}")?;
        }
        for raw in self.unknown_types() {
            sep(f)?;
            write!(f, "type {raw}")?;
        }
        Ok(())
    }
}

/// A raw VM type value, named if this crate knows it: `SEV_ES (3)`, `type 7`.
struct RawName(u64);

impl fmt::Display for RawName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match VmType::try_from(self.0) {
            Ok(ty) => write!(f, "{ty} ({})", self.0),
            Err(_) => write!(f, "type {}", self.0),
        }
    }
}

/// Errors of VM creation by type.
#[derive(Debug, Error)]
pub enum Error {
    /// The host does not report the type in `KVM_CAP_VM_TYPES`; the kernel was not asked.
    #[error(
        "KVM_CREATE_VM: VM type {} is not supported by this host, which supports {}",
        RawName(*raw), supported.describe()
    )]
    Unsupported {
        /// The raw type value that was asked for.
        raw: u64,
        /// What the host supports instead.
        supported: VmTypeSet,
    },
    /// The value is 32 or more: no kernel can report or accept it; the kernel was not asked.
    #[error(
        "KVM_CREATE_VM: VM type {raw} is out of range (KVM_CAP_VM_TYPES describes types 0 to 31 \
         and KVM refuses anything larger); this host supports {}",
        supported.describe()
    )]
    OutOfRange {
        /// The raw type value that was asked for.
        raw: u64,
        /// What the host supports instead.
        supported: VmTypeSet,
    },
    /// The host reports the type as supported, but `KVM_CREATE_VM` failed.
    #[error("KVM_CREATE_VM of VM type {} failed although the host reports the type as supported", RawName(*raw))]
    CreateVm {
        /// The raw type value.
        raw: u64,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl Error {
    /// The raw type value the failed request was for.
    pub fn raw_type(&self) -> u64 {
        match self {
            Error::Unsupported { raw, .. }
            | Error::OutOfRange { raw, .. }
            | Error::CreateVm { raw, .. } => *raw,
        }
    }

    /// The type the failed request was for, if this crate knows it.
    pub fn vm_type(&self) -> Option<VmType> {
        VmType::try_from(self.raw_type()).ok()
    }
}

/// Result of this module's operations.
pub type Result<T> = std::result::Result<T, Error>;

/// The VM types the host's KVM accepts, from `KVM_CAP_VM_TYPES` (DEFAULT only on a kernel
/// before Linux 6.8, which does not know the capability).
pub fn supported_vm_types(kvm: &Kvm) -> VmTypeSet {
    VmTypeSet::from_capability(raw_capability(kvm))
}

/// The raw value of `KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)` on `/dev/kvm`.
pub fn raw_capability(kvm: &Kvm) -> i32 {
    kvm.check_extension_raw(libc::c_ulong::from(sys::KVM_CAP_VM_TYPES))
}

/// Creates a VM of type `ty`, or says precisely why the host cannot.
///
/// A type the host does not report is refused with [`Error::Unsupported`] (naming the type
/// and the supported set) before the kernel is asked. [`crate::TypedVm::create`] does the same
/// and keeps the type with the VM.
///
/// # Errors
///
/// [`Error::Unsupported`] for a type the host does not report, [`Error::CreateVm`] if
/// `KVM_CREATE_VM` fails.
pub fn create_vm(kvm: &Kvm, ty: VmType) -> Result<VmFd> {
    create_vm_raw(kvm, u64::from(ty))
}

/// Creates a VM from a raw type value, for types newer than this crate and for values taken
/// from a user.
///
/// Values of 32 and more give [`Error::OutOfRange`], values the host does not report give
/// [`Error::Unsupported`]; neither reaches the kernel. A value the host reports is passed to
/// `KVM_CREATE_VM` even if this crate does not know it.
///
/// # Errors
///
/// [`Error::OutOfRange`], [`Error::Unsupported`] or [`Error::CreateVm`].
pub fn create_vm_raw(kvm: &Kvm, raw: u64) -> Result<VmFd> {
    create_vm_raw_with(kvm, raw, supported_vm_types(kvm))
}

/// [`create_vm_raw`] with a supported set that the caller already queried.
///
/// # Errors
///
/// As [`create_vm_raw`].
pub fn create_vm_raw_with(kvm: &Kvm, raw: u64, supported: VmTypeSet) -> Result<VmFd> {
    check_supported(raw, supported)?;
    kvm.create_vm_with_type(raw)
        .map_err(|source| Error::CreateVm { raw, source })
}

/// The userspace half of [`create_vm_raw_with`]: whether `raw` is worth asking the kernel for.
///
/// # Errors
///
/// [`Error::OutOfRange`] for 32 and more, [`Error::Unsupported`] for a value not in
/// `supported`.
pub fn check_supported(raw: u64, supported: VmTypeSet) -> Result<()> {
    if raw >= u64::from(sys::VM_TYPE_BITS) {
        Err(Error::OutOfRange { raw, supported })
    } else if !supported.contains_raw(raw) {
        Err(Error::Unsupported { raw, supported })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::error::Error as _;

    #[test]
    fn capability_zero_or_negative_means_default_only() {
        for value in [0, -1, i32::MIN] {
            let set = VmTypeSet::from_capability(value);
            assert_eq!(set, VmTypeSet::default_only());
            assert!(!set.reported_by_kernel());
            assert_eq!(set.iter().collect::<Vec<_>>(), vec![VmType::Default]);
            assert_eq!(set.to_string(), "DEFAULT");
        }
    }

    #[test]
    fn capability_one_is_reported_default() {
        let set = VmTypeSet::from_capability(1);
        assert!(set.reported_by_kernel());
        assert!(set.contains(VmType::Default));
        assert_eq!(set.len(), 1);
        assert_eq!(set.missing().collect::<Vec<_>>(), VmType::ALL[1..].to_vec());
    }

    #[test]
    fn display_lists_known_then_unknown() {
        let set = VmTypeSet::from_mask(0b1000_0101);
        assert_eq!(set.to_string(), "DEFAULT, SEV, type 7");
        assert_eq!(set.unknown_types().collect::<Vec<_>>(), vec![7]);
        assert_eq!(VmTypeSet::from_mask(0).to_string(), "none");
        assert!(VmTypeSet::from_mask(0).is_empty());
        let all = VmTypeSet::from_mask(0x3f);
        assert_eq!(
            all.to_string(),
            "DEFAULT, SW_PROTECTED, SEV, SEV_ES, SNP, TDX"
        );
        assert_eq!((&all).into_iter().count(), 6);
    }

    #[test]
    fn unsupported_error_names_type_and_supported_set() {
        let supported = VmTypeSet::from_mask(1);
        let err = check_supported(u64::from(VmType::SevEs), supported).unwrap_err();
        assert!(matches!(err, Error::Unsupported { raw: 3, .. }));
        assert_eq!(err.vm_type(), Some(VmType::SevEs));
        let msg = err.to_string();
        assert!(msg.contains("SEV_ES (3)"), "{msg}");
        assert!(msg.contains("{DEFAULT}"), "{msg}");
        assert!(msg.contains("KVM_CAP_VM_TYPES = 0x1"), "{msg}");

        let msg = check_supported(2, VmTypeSet::default_only())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("SEV (2)"), "{msg}");
        assert!(msg.contains("before Linux 6.8"), "{msg}");

        let err = check_supported(9, supported).unwrap_err();
        assert_eq!(err.vm_type(), None);
        assert!(err.to_string().contains("type 9"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_refused_even_with_a_full_mask() {
        for raw in [32u64, 33, 256, u64::from(u32::MAX), u64::MAX] {
            let err = check_supported(raw, VmTypeSet::from_mask(u32::MAX)).unwrap_err();
            assert!(matches!(err, Error::OutOfRange { .. }), "{raw}: {err}");
            assert_eq!(err.raw_type(), raw);
            assert!(err.to_string().contains(&raw.to_string()), "{err}");
            assert!(err.source().is_none());
        }
    }

    #[test]
    fn create_vm_error_keeps_the_errno() {
        let err = Error::CreateVm {
            raw: 2,
            source: kvm_ioctls::Error::new(libc::EBUSY),
        };
        assert!(err.to_string().contains("SEV (2)"), "{err}");
        let source = err.source().expect("source kept");
        assert_eq!(
            source
                .downcast_ref::<kvm_ioctls::Error>()
                .map(|e| e.errno()),
            Some(libc::EBUSY)
        );
    }

    proptest! {
        #[test]
        fn set_membership_matches_the_mask(mask in any::<u32>()) {
            let set = VmTypeSet::from_mask(mask);
            for raw in 0..64u64 {
                prop_assert_eq!(set.contains_raw(raw), raw < 32 && mask & (1 << raw) != 0);
            }
            for ty in VmType::ALL {
                prop_assert_eq!(set.contains(ty), set.contains_raw(u64::from(ty)));
            }
            let known = set.iter().count();
            let unknown = set.unknown_types().count();
            prop_assert_eq!(known + unknown, set.len());
            prop_assert_eq!(known + set.missing().count(), VmType::ALL.len());
            let shown = set.to_string();
            for ty in set.iter() {
                prop_assert!(shown.split(", ").any(|s| s == ty.name()), "{}", shown);
            }
        }

        #[test]
        fn check_supported_agrees_with_the_set(mask in any::<u32>(), raw in 0u64..300) {
            let set = VmTypeSet::from_mask(mask);
            match check_supported(raw, set) {
                Ok(()) => prop_assert!(set.contains_raw(raw)),
                Err(Error::OutOfRange { .. }) => prop_assert!(raw >= 32),
                Err(Error::Unsupported { .. }) => {
                    prop_assert!(raw < 32 && !set.contains_raw(raw))
                }
                Err(e) => prop_assert!(false, "unexpected {}", e),
            }
        }
    }
}
