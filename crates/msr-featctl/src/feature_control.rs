//! The IA32_FEATURE_CONTROL value and KVM's rules for writing it.
//!
//! The rules are those of KVM's VMX code (`arch/x86/kvm/vmx/vmx.c`,
//! `is_vmx_feature_control_msr_valid` and `vmx_vcpu_after_set_cpuid`):
//!
//! * a **host-initiated** write (`KVM_SET_MSRS`) may, since Linux 6.0, set any bit of
//!   [`FeatureControl::SUPPORTED`], whatever the guest CPUID says and even when
//!   [`FeatureControl::LOCKED`] is already set. Before 6.0 it was held to the guest-valid
//!   bits, like a guest write (see [`crate::native`] for what that means for a VMM);
//! * a **guest** write (`WRMSR`) takes #GP once `LOCKED` is set, and otherwise may set only
//!   the bits valid for the guest's CPUID and MCG_CAP ([`GuestCpuidFeatures::valid_bits`]).
//!
//! The guest-valid bits follow what KVM really exposes, not what the VMM asked for:
//! [`GuestCpuidFeatures::exposed`] intersects the guest CPUID with [`KvmSupport`].
//!
//! ```
//! use msr_featctl::{FeatureControl, GuestCpuidFeatures, WriteCheck};
//!
//! let features = GuestCpuidFeatures { vmx: true, ..Default::default() };
//! let firmware = features.firmware_value();
//! assert_eq!(firmware, FeatureControl::LOCKED | FeatureControl::VMX_OUTSIDE_SMX);
//! // Locked: a guest write faults, a host write does not.
//! assert!(matches!(firmware.check_guest_write(0, &features), WriteCheck::GeneralProtection(_)));
//! assert_eq!(FeatureControl::check_host_write(0), Ok(FeatureControl::empty()));
//! ```

use std::fmt;

use kvm_bindings::CpuId;
use kvm_ioctls::{Cap, Kvm};

use crate::sys;

/// A value of IA32_FEATURE_CONTROL (MSR 0x3a) that KVM could hold: only bits of
/// [`FeatureControl::SUPPORTED`] can be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FeatureControl(u64);

impl FeatureControl {
    /// Bit 0: the MSR is locked; guest writes take #GP until reset.
    pub const LOCKED: Self = Self(sys::FEAT_CTL_LOCKED);
    /// Bit 1: VMXON is allowed inside SMX operation.
    pub const VMX_INSIDE_SMX: Self = Self(sys::FEAT_CTL_VMX_ENABLED_INSIDE_SMX);
    /// Bit 2: VMXON is allowed outside SMX operation (what a nested-VMX guest needs).
    pub const VMX_OUTSIDE_SMX: Self = Self(sys::FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX);
    /// Bit 17: SGX launch control is enabled.
    pub const SGX_LC: Self = Self(sys::FEAT_CTL_SGX_LC_ENABLED);
    /// Bit 18: SGX is enabled.
    pub const SGX_ENABLE: Self = Self(sys::FEAT_CTL_SGX_ENABLED);
    /// Bit 20: local machine-check exceptions are enabled.
    pub const LMCE: Self = Self(sys::FEAT_CTL_LMCE_ENABLED);
    /// Every bit KVM supports (`KVM_SUPPORTED_FEATURE_CONTROL`, `0x160007`).
    pub const SUPPORTED: Self = Self(sys::KVM_SUPPORTED_FEATURE_CONTROL);

    const NAMED: [(Self, &'static str); 6] = [
        (Self::LOCKED, "LOCKED"),
        (Self::VMX_INSIDE_SMX, "VMX_INSIDE_SMX"),
        (Self::VMX_OUTSIDE_SMX, "VMX_OUTSIDE_SMX"),
        (Self::SGX_LC, "SGX_LC"),
        (Self::SGX_ENABLE, "SGX_ENABLE"),
        (Self::LMCE, "LMCE"),
    ];

    /// The value with no bit set: what KVM holds for a new vCPU.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// The value with these bits, or `None` if any bit is outside [`Self::SUPPORTED`].
    pub const fn from_bits(bits: u64) -> Option<Self> {
        if bits & !sys::KVM_SUPPORTED_FEATURE_CONTROL == 0 {
            Some(Self(bits))
        } else {
            None
        }
    }

    /// The raw MSR value.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether every bit of `other` is set in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether [`Self::LOCKED`] is set.
    pub const fn is_locked(self) -> bool {
        self.contains(Self::LOCKED)
    }

    /// The bits of both values.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// The bits of `self` that are not in `other`.
    pub const fn difference(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    /// Checks a host-initiated write (`KVM_SET_MSRS`) of `value` with KVM's rules since Linux
    /// 6.0 (`is_vmx_feature_control_msr_valid`): any supported bit is accepted, regardless of
    /// guest CPUID and of [`Self::LOCKED`].
    ///
    /// # Errors
    ///
    /// [`HostWriteError::UnsupportedBits`] when `value` has a bit outside [`Self::SUPPORTED`].
    /// KVM answers such a write by processing 0 entries of `KVM_SET_MSRS`; no guest is
    /// involved, so this is not a #GP ([`WriteCheck`] is for guest writes only).
    pub const fn check_host_write(value: u64) -> Result<Self, HostWriteError> {
        match Self::from_bits(value) {
            Some(accepted) => Ok(accepted),
            None => Err(HostWriteError::UnsupportedBits {
                bits: value & !sys::KVM_SUPPORTED_FEATURE_CONTROL,
            }),
        }
    }

    /// Checks a guest `WRMSR` of `value` to a vCPU that holds `self`, whose CPUID and MCG_CAP
    /// are `features`: #GP if `self` is locked, or if `value` sets a bit outside the
    /// guest-valid bits.
    pub fn check_guest_write(self, value: u64, features: &GuestCpuidFeatures) -> WriteCheck {
        if self.is_locked() {
            return WriteCheck::GeneralProtection(GpReason::Locked { current: self });
        }
        let unsupported = value & !Self::SUPPORTED.0;
        if unsupported != 0 {
            return WriteCheck::GeneralProtection(GpReason::UnsupportedBits { bits: unsupported });
        }
        let invalid = Self(value).difference(features.valid_bits());
        if invalid != Self::empty() {
            return WriteCheck::GeneralProtection(GpReason::NotValidForGuest { bits: invalid });
        }
        WriteCheck::Accepted(Self(value))
    }
}

impl std::ops::BitOr for FeatureControl {
    type Output = Self;

    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

impl fmt::Display for FeatureControl {
    /// `0x5 (LOCKED | VMX_OUTSIDE_SMX)`, or `0x0 (none)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x} (", self.0)?;
        let mut first = true;
        for (bit, name) in Self::NAMED {
            if self.contains(bit) {
                if !first {
                    write!(f, " | ")?;
                }
                write!(f, "{name}")?;
                first = false;
            }
        }
        if first {
            write!(f, "none")?;
        }
        write!(f, ")")
    }
}

/// Why a write of IA32_FEATURE_CONTROL is refused; for a guest write, the #GP it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpReason {
    /// The MSR is locked: a guest may not write it until reset.
    Locked {
        /// The value the vCPU holds.
        current: FeatureControl,
    },
    /// The value sets bits KVM does not support at all (outside `0x160007`).
    UnsupportedBits {
        /// The offending bits.
        bits: u64,
    },
    /// The value sets supported bits that the guest's CPUID or MCG_CAP does not allow.
    NotValidForGuest {
        /// The offending bits.
        bits: FeatureControl,
    },
}

impl fmt::Display for GpReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpReason::Locked { current } => write!(f, "IA32_FEATURE_CONTROL is locked ({current})"),
            GpReason::UnsupportedBits { bits } => {
                write!(f, "bits {bits:#x} are reserved in IA32_FEATURE_CONTROL")
            }
            GpReason::NotValidForGuest { bits } => {
                write!(f, "bits {bits} are not valid for the guest's CPUID/MCG_CAP")
            }
        }
    }
}

/// The result of checking a write of IA32_FEATURE_CONTROL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteCheck {
    /// The write is allowed; the MSR takes this value.
    Accepted(FeatureControl),
    /// The write is refused (for a guest: #GP is injected) and the MSR keeps its value.
    GeneralProtection(GpReason),
}

/// A host-initiated write (the VMM's own, or `KVM_SET_MSRS`) that cannot be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostWriteError {
    /// The value has bits KVM never supports in IA32_FEATURE_CONTROL.
    #[error("host write of IA32_FEATURE_CONTROL refused: bits {bits:#x} are outside the supported mask 0x160007")]
    UnsupportedBits {
        /// The offending bits.
        bits: u64,
    },
}

/// The guest features that decide which IA32_FEATURE_CONTROL bits a guest may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestCpuidFeatures {
    /// CPUID.1:ECX.VMX (bit 5).
    pub vmx: bool,
    /// CPUID.1:ECX.SMX (bit 6); only used for the firmware-style value, KVM never emulates SMX.
    pub smx: bool,
    /// CPUID.(EAX=7,ECX=0):EBX.SGX (bit 2).
    pub sgx: bool,
    /// CPUID.(EAX=7,ECX=0):ECX.SGX_LC (bit 30).
    pub sgx_lc: bool,
    /// IA32_MCG_CAP.MCG_LMCE_P (bit 27) of the MCG_CAP given to `KVM_X86_SETUP_MCE`.
    pub lmce: bool,
}

impl GuestCpuidFeatures {
    /// Reads the features from the CPUID the VMM gives the vCPU (`KVM_SET_CPUID2`) and the
    /// MCG_CAP it gives `KVM_X86_SETUP_MCE` (0 if it does not set up MCE). Missing leaves
    /// count as "feature absent".
    pub fn from_cpuid(cpuid: &CpuId, mcg_cap: u64) -> Self {
        let leaf = |function: u32, index: u32| {
            cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == function && e.index == index)
        };
        let leaf1_ecx = leaf(1, 0).map_or(0, |e| e.ecx);
        let (leaf7_ebx, leaf7_ecx) = leaf(7, 0).map_or((0, 0), |e| (e.ebx, e.ecx));
        GuestCpuidFeatures {
            vmx: leaf1_ecx & sys::CPUID_1_ECX_VMX != 0,
            smx: leaf1_ecx & sys::CPUID_1_ECX_SMX != 0,
            sgx: leaf7_ebx & sys::CPUID_7_0_EBX_SGX != 0,
            sgx_lc: leaf7_ecx & sys::CPUID_7_0_ECX_SGX_LC != 0,
            lmce: mcg_cap & sys::MCG_LMCE_P != 0,
        }
    }

    /// The features KVM will really give a guest whose CPUID is `guest_cpuid` and whose
    /// MCG_CAP (for `KVM_X86_SETUP_MCE`) is `mcg_cap`: each feature the guest asks for *and*
    /// KVM supports ([`KvmSupport`]). KVM offers VMX in `KVM_GET_SUPPORTED_CPUID` only with
    /// nested virtualization enabled (`vmx_set_cpu_caps`, kvm_intel `nested=1`), and
    /// `MCG_LMCE_P` in `KVM_X86_GET_MCE_CAP_SUPPORTED` only on VMX.
    pub fn exposed(guest_cpuid: &CpuId, mcg_cap: u64, support: &KvmSupport) -> Exposure {
        let asked = Self::from_cpuid(guest_cpuid, mcg_cap);
        let offered = Self::from_cpuid(&support.cpuid, support.mce_cap);
        let both = |a: bool, b: bool| a && b;
        let features = GuestCpuidFeatures {
            vmx: both(asked.vmx, offered.vmx),
            smx: both(asked.smx, offered.smx),
            sgx: both(asked.sgx, offered.sgx),
            sgx_lc: both(asked.sgx_lc, offered.sgx_lc),
            lmce: both(asked.lmce, offered.lmce),
        };
        let withheld = GuestCpuidFeatures {
            vmx: asked.vmx && !offered.vmx,
            smx: asked.smx && !offered.smx,
            sgx: asked.sgx && !offered.sgx,
            sgx_lc: asked.sgx_lc && !offered.sgx_lc,
            lmce: asked.lmce && !offered.lmce,
        };
        Exposure { features, withheld }
    }

    /// The bits a guest may write, derived as KVM derives `msr_ia32_feature_control_valid_bits`:
    /// `LOCKED` always (set at vCPU creation); both VMX bits when the guest has VMX (KVM does
    /// not emulate SMX but keeps "VMX inside SMX" writable so that a guest read-modify-write of
    /// a host-set value does not fault); `SGX_ENABLE` with SGX; `SGX_LC` with SGX_LC (on its
    /// own, as `vmx_vcpu_after_set_cpuid` does); `LMCE` with MCG_LMCE_P (`vmx_setup_mce`).
    pub fn valid_bits(&self) -> FeatureControl {
        let mut valid = FeatureControl::LOCKED;
        if self.vmx {
            valid = valid | FeatureControl::VMX_INSIDE_SMX | FeatureControl::VMX_OUTSIDE_SMX;
        }
        if self.sgx {
            valid = valid | FeatureControl::SGX_ENABLE;
        }
        if self.sgx_lc {
            valid = valid | FeatureControl::SGX_LC;
        }
        if self.lmce {
            valid = valid | FeatureControl::LMCE;
        }
        valid
    }

    /// The value firmware writes before handing over to the OS: `LOCKED`, VMX outside SMX with
    /// VMX (and inside SMX only when the guest also has SMX), SGX and SGX launch control where
    /// the guest has them, and LMCE where MCG_CAP offers it. Always a subset of
    /// [`Self::valid_bits`], so a guest read-modify-write of it does not fault.
    pub fn firmware_value(&self) -> FeatureControl {
        let mut value = FeatureControl::LOCKED;
        if self.vmx {
            value = value | FeatureControl::VMX_OUTSIDE_SMX;
            if self.smx {
                value = value | FeatureControl::VMX_INSIDE_SMX;
            }
        }
        if self.sgx {
            value = value | FeatureControl::SGX_ENABLE;
        }
        if self.sgx_lc {
            value = value | FeatureControl::SGX_LC;
        }
        if self.lmce {
            value = value | FeatureControl::LMCE;
        }
        value
    }
}

/// What this KVM can give guests: `KVM_GET_SUPPORTED_CPUID` and
/// `KVM_X86_GET_MCE_CAP_SUPPORTED`, queried once per host.
#[derive(Debug, Clone, PartialEq)]
pub struct KvmSupport {
    /// `KVM_GET_SUPPORTED_CPUID`.
    pub cpuid: CpuId,
    /// `KVM_X86_GET_MCE_CAP_SUPPORTED` (0 where KVM has no `KVM_CAP_MCE`).
    pub mce_cap: u64,
}

/// Errors of [`KvmSupport::query`].
#[derive(Debug, thiserror::Error)]
pub enum SupportError {
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    /// `KVM_X86_GET_MCE_CAP_SUPPORTED` failed although KVM has `KVM_CAP_MCE`.
    #[error("KVM_X86_GET_MCE_CAP_SUPPORTED failed")]
    GetMceCapSupported(#[source] vmm_sys_util::errno::Error),
}

impl KvmSupport {
    /// Queries `kvm` for what it can give guests.
    ///
    /// # Errors
    ///
    /// [`SupportError`] naming the ioctl that failed.
    pub fn query(kvm: &Kvm) -> Result<Self, SupportError> {
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(SupportError::GetSupportedCpuid)?;
        let mce_cap = if kvm.check_extension(Cap::Mce) {
            let mut cap = 0u64;
            // SAFETY: KVM_X86_GET_MCE_CAP_SUPPORTED writes one u64 to the pointer, which
            // points to `cap`, alive for the call; `kvm` is the /dev/kvm system fd.
            let ret = unsafe {
                vmm_sys_util::ioctl::ioctl_with_mut_ref(
                    kvm,
                    sys::ioctls::KVM_X86_GET_MCE_CAP_SUPPORTED(),
                    &mut cap,
                )
            };
            if ret < 0 {
                return Err(SupportError::GetMceCapSupported(
                    vmm_sys_util::errno::Error::last(),
                ));
            }
            cap
        } else {
            0
        };
        Ok(KvmSupport { cpuid, mce_cap })
    }
}

/// The IA32_FEATURE_CONTROL-relevant features KVM gives a guest, and those the guest's CPUID
/// or MCG_CAP asked for but KVM withholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Exposure {
    /// Asked for and supported: what KVM's valid bits will follow.
    pub features: GuestCpuidFeatures,
    /// Asked for but not supported (VMX here means kvm_intel runs with `nested=0`, or the
    /// vendor module has no VMX at all).
    pub withheld: GuestCpuidFeatures,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;
    use proptest::prelude::*;

    fn features(vmx: bool, smx: bool, sgx: bool, sgx_lc: bool, lmce: bool) -> GuestCpuidFeatures {
        GuestCpuidFeatures {
            vmx,
            smx,
            sgx,
            sgx_lc,
            lmce,
        }
    }

    fn any_features() -> impl Strategy<Value = GuestCpuidFeatures> {
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(a, b, c, d, e)| features(a, b, c, d, e))
    }

    #[test]
    fn named_bits_cover_the_supported_mask() {
        let all = FeatureControl::NAMED
            .iter()
            .fold(FeatureControl::empty(), |acc, (bit, _)| acc | *bit);
        assert_eq!(all, FeatureControl::SUPPORTED);
    }

    #[test]
    fn display_names_the_bits() {
        assert_eq!(FeatureControl::empty().to_string(), "0x0 (none)");
        assert_eq!(
            (FeatureControl::LOCKED | FeatureControl::VMX_OUTSIDE_SMX).to_string(),
            "0x5 (LOCKED | VMX_OUTSIDE_SMX)"
        );
        assert_eq!(
            FeatureControl::SUPPORTED.to_string(),
            "0x160007 (LOCKED | VMX_INSIDE_SMX | VMX_OUTSIDE_SMX | SGX_LC | SGX_ENABLE | LMCE)"
        );
    }

    #[test]
    fn gp_reasons_display() {
        let locked = GpReason::Locked {
            current: FeatureControl::LOCKED,
        };
        assert_eq!(
            locked.to_string(),
            "IA32_FEATURE_CONTROL is locked (0x1 (LOCKED))"
        );
        assert_eq!(
            GpReason::UnsupportedBits { bits: 8 }.to_string(),
            "bits 0x8 are reserved in IA32_FEATURE_CONTROL"
        );
        let invalid = GpReason::NotValidForGuest {
            bits: FeatureControl::SGX_ENABLE,
        };
        assert!(invalid.to_string().contains("SGX_ENABLE"));
    }

    #[test]
    fn no_features_leaves_only_locked_valid() {
        let f = GuestCpuidFeatures::default();
        assert_eq!(f.valid_bits(), FeatureControl::LOCKED);
        assert_eq!(f.firmware_value(), FeatureControl::LOCKED);
    }

    #[test]
    fn each_feature_enables_its_bits() {
        let cases = [
            (
                features(true, false, false, false, false),
                FeatureControl::VMX_INSIDE_SMX | FeatureControl::VMX_OUTSIDE_SMX,
            ),
            (
                features(false, false, true, false, false),
                FeatureControl::SGX_ENABLE,
            ),
            (
                features(false, false, false, true, false),
                FeatureControl::SGX_LC,
            ),
            (
                features(false, false, false, false, true),
                FeatureControl::LMCE,
            ),
            // SMX alone enables nothing: KVM keys both VMX bits on VMX only.
            (
                features(false, true, false, false, false),
                FeatureControl::empty(),
            ),
        ];
        for (f, extra) in cases {
            assert_eq!(f.valid_bits(), FeatureControl::LOCKED | extra, "{f:?}");
        }
    }

    #[test]
    fn firmware_sets_vmx_inside_smx_only_with_smx() {
        let vmx = features(true, false, false, false, false);
        assert_eq!(
            vmx.firmware_value(),
            FeatureControl::LOCKED | FeatureControl::VMX_OUTSIDE_SMX
        );
        let vmx_smx = features(true, true, false, false, false);
        assert_eq!(
            vmx_smx.firmware_value(),
            FeatureControl::LOCKED
                | FeatureControl::VMX_OUTSIDE_SMX
                | FeatureControl::VMX_INSIDE_SMX
        );
        let all = features(true, true, true, true, true);
        assert_eq!(all.firmware_value(), FeatureControl::SUPPORTED);
    }

    #[test]
    fn guest_write_to_locked_msr_faults_even_with_the_same_value() {
        let current = FeatureControl::LOCKED | FeatureControl::VMX_OUTSIDE_SMX;
        let f = features(true, false, false, false, false);
        assert_eq!(
            current.check_guest_write(current.bits(), &f),
            WriteCheck::GeneralProtection(GpReason::Locked { current })
        );
    }

    #[test]
    fn guest_write_of_reserved_bit_is_unsupported() {
        let f = features(true, true, true, true, true);
        assert_eq!(
            FeatureControl::empty().check_guest_write(1 << 3, &f),
            WriteCheck::GeneralProtection(GpReason::UnsupportedBits { bits: 1 << 3 })
        );
    }

    #[test]
    fn guest_write_of_bit_missing_from_cpuid_is_invalid() {
        let f = features(true, false, false, false, false);
        assert_eq!(
            FeatureControl::empty().check_guest_write(
                (FeatureControl::VMX_OUTSIDE_SMX | FeatureControl::SGX_ENABLE).bits(),
                &f
            ),
            WriteCheck::GeneralProtection(GpReason::NotValidForGuest {
                bits: FeatureControl::SGX_ENABLE
            })
        );
    }

    #[test]
    fn guest_read_modify_write_of_host_vmx_inside_smx_is_accepted() {
        let f = features(true, false, false, false, false);
        let host = FeatureControl::VMX_INSIDE_SMX | FeatureControl::VMX_OUTSIDE_SMX;
        assert_eq!(FeatureControl::check_host_write(host.bits()), Ok(host));
        let rmw = host | FeatureControl::LOCKED;
        assert_eq!(
            host.check_guest_write(rmw.bits(), &f),
            WriteCheck::Accepted(rmw)
        );
    }

    #[test]
    fn from_cpuid_reads_the_documented_bits() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                index: 0,
                ecx: sys::CPUID_1_ECX_VMX | sys::CPUID_1_ECX_SMX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                ebx: sys::CPUID_7_0_EBX_SGX,
                ecx: sys::CPUID_7_0_ECX_SGX_LC,
                ..Default::default()
            },
            // Subleaf 1 of leaf 7 must not be mistaken for subleaf 0.
            kvm_cpuid_entry2 {
                function: 7,
                index: 1,
                ebx: 0,
                ecx: 0,
                ..Default::default()
            },
        ];
        let cpuid = CpuId::from_entries(&entries).expect("small CpuId");
        assert_eq!(
            GuestCpuidFeatures::from_cpuid(&cpuid, sys::MCG_LMCE_P),
            features(true, true, true, true, true)
        );
        assert_eq!(
            GuestCpuidFeatures::from_cpuid(&cpuid, !sys::MCG_LMCE_P),
            features(true, true, true, true, false)
        );
        let empty = CpuId::new(0).expect("empty CpuId");
        assert_eq!(
            GuestCpuidFeatures::from_cpuid(&empty, 0),
            GuestCpuidFeatures::default()
        );
    }

    #[test]
    fn exposure_is_what_the_guest_asks_and_kvm_offers() {
        // KVM_GET_SUPPORTED_CPUID without VMX is kvm_intel with nested=0 (vmx_set_cpu_caps)
        // or a KVM without VMX at all.
        let leaf1 = |ecx| kvm_cpuid_entry2 {
            function: 1,
            ecx,
            ..Default::default()
        };
        let guest = CpuId::from_entries(&[leaf1(sys::CPUID_1_ECX_VMX)]).expect("cpuid");
        let no_vmx = KvmSupport {
            cpuid: CpuId::from_entries(&[leaf1(0)]).expect("cpuid"),
            mce_cap: 0,
        };
        let e = GuestCpuidFeatures::exposed(&guest, sys::MCG_LMCE_P, &no_vmx);
        assert_eq!(e.features, GuestCpuidFeatures::default());
        assert_eq!(e.features.valid_bits(), FeatureControl::LOCKED);
        assert_eq!(e.withheld, features(true, false, false, false, true));

        let vmx = KvmSupport {
            cpuid: CpuId::from_entries(&[leaf1(sys::CPUID_1_ECX_VMX)]).expect("cpuid"),
            mce_cap: sys::MCG_LMCE_P,
        };
        let e = GuestCpuidFeatures::exposed(&guest, sys::MCG_LMCE_P, &vmx);
        assert_eq!(e.features, features(true, false, false, false, true));
        assert_eq!(e.withheld, GuestCpuidFeatures::default());
        // Offered but not asked for: not exposed either.
        let e = GuestCpuidFeatures::exposed(&CpuId::new(0).expect("empty"), 0, &vmx);
        assert_eq!(e, Exposure::default());
    }

    proptest! {
        #[test]
        fn host_write_accepts_exactly_the_supported_mask(value in any::<u64>()) {
            let check = FeatureControl::check_host_write(value);
            if value & !0x16_0007 == 0 {
                prop_assert_eq!(check, Ok(FeatureControl(value)));
            } else {
                prop_assert_eq!(
                    check,
                    Err(HostWriteError::UnsupportedBits { bits: value & !0x16_0007 })
                );
            }
        }

        #[test]
        fn host_write_ignores_lock_and_cpuid(value in 0u64..=0x16_0007) {
            // A host write carries no vCPU state: accepted iff supported, even over LOCKED.
            let value = value & 0x16_0007;
            prop_assert_eq!(FeatureControl::check_host_write(value), Ok(FeatureControl(value)));
        }

        #[test]
        fn guest_write_rules(current in 0u64..=0x16_0007, value in any::<u64>(), f in any_features()) {
            let current = FeatureControl(current & 0x16_0007);
            let valid = f.valid_bits().bits();
            let check = current.check_guest_write(value, &f);
            if current.is_locked() {
                prop_assert_eq!(check, WriteCheck::GeneralProtection(GpReason::Locked { current }));
            } else if value & !valid == 0 {
                prop_assert_eq!(check, WriteCheck::Accepted(FeatureControl(value)));
            } else {
                let refused = matches!(check, WriteCheck::GeneralProtection(
                    GpReason::UnsupportedBits { .. } | GpReason::NotValidForGuest { .. }));
                prop_assert!(refused, "{:?}", check);
            }
        }

        #[test]
        fn guest_valid_bits_are_supported_and_include_locked(f in any_features()) {
            let valid = f.valid_bits();
            prop_assert!(FeatureControl::SUPPORTED.contains(valid));
            prop_assert!(valid.contains(FeatureControl::LOCKED));
            // VMX bits come and go together.
            prop_assert_eq!(valid.contains(FeatureControl::VMX_INSIDE_SMX), f.vmx);
            prop_assert_eq!(valid.contains(FeatureControl::VMX_OUTSIDE_SMX), f.vmx);
        }

        #[test]
        fn firmware_value_survives_a_guest_rewrite_before_lock(f in any_features()) {
            // Firmware value without LOCKED, written by the guest itself, must be accepted:
            // it is always within the guest-valid bits.
            let fw = f.firmware_value();
            prop_assert!(fw.is_locked());
            prop_assert!(f.valid_bits().contains(fw));
            prop_assert_eq!(
                FeatureControl::empty().check_guest_write(fw.bits(), &f),
                WriteCheck::Accepted(fw)
            );
        }

        #[test]
        fn from_bits_round_trips_only_supported(value in any::<u64>()) {
            match FeatureControl::from_bits(value) {
                Some(fc) => prop_assert_eq!(fc.bits(), value),
                None => prop_assert!(value & !0x16_0007 != 0),
            }
        }
    }
}
