//! Setting IA32_FEATURE_CONTROL through KVM itself, with `KVM_SET_MSRS`, where KVM holds it.
//!
//! kvm_intel keeps its own copy of the MSR (`vcpu_vmx::msr_ia32_feature_control`), and that
//! copy is what `handle_vmxon` (arch/x86/kvm/vmx/nested.c), SGX's ENCLS interception and LMCE
//! check. So on kvm_intel the VMM must write it natively; an MSR filter would let the guest
//! *read* `LOCKED | VMX` while `VMXON` still faults on KVM's copy.
//!
//! The write is only meaningful once the vCPU's CPUID is set: KVM derives the guest-valid bits
//! from it (`vmx_vcpu_after_set_cpuid`, `vmx_setup_mce`), and before Linux 6.0 a host write
//! was held to those bits. [`ConfiguredVcpu`] is the proof that this happened: it is made
//! only by [`ConfiguredVcpu::configure`], which sets CPUID (and MCG_CAP), and
//! [`apply_native`] takes nothing else.
//!
//! `KVM_SET_MSRS` reports a refused entry as a processed count of 0, not as an errno; this
//! module turns that into [`Error::HostWriteRefused`] with the reason, and reads the value
//! back with `KVM_GET_MSRS` before it reports success.

use std::fmt;
use std::os::fd::AsRawFd;

use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;

use crate::feature_control::{Exposure, FeatureControl, GuestCpuidFeatures, KvmSupport};
use crate::msr_io::{Errno, MsrIo, RawMsrFd};
use crate::sys::MSR_IA32_FEAT_CTL;

/// Errors of the native path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `KVM_SET_CPUID2` failed.
    #[error("KVM_SET_CPUID2 before setting IA32_FEATURE_CONTROL failed")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// `KVM_X86_SETUP_MCE` failed.
    #[error("KVM_X86_SETUP_MCE with MCG_CAP {mcg_cap:#x} failed")]
    SetupMce {
        /// The MCG_CAP given.
        mcg_cap: u64,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// `KVM_SET_MSRS` failed with an errno.
    #[error("KVM_SET_MSRS of MSR {MSR_IA32_FEAT_CTL:#x} failed")]
    SetMsrs(#[source] Errno),
    /// `KVM_GET_MSRS` failed with an errno.
    #[error("KVM_GET_MSRS of MSR {MSR_IA32_FEAT_CTL:#x} failed")]
    GetMsrs(#[source] Errno),
    /// KVM processed 0 entries: it refused the host write. Not a guest #GP.
    #[error("KVM refused the host write of IA32_FEATURE_CONTROL = {value}: {refusal}")]
    HostWriteRefused {
        /// The value written.
        value: FeatureControl,
        /// Why, as far as the guest features tell.
        refusal: HostWriteRefusal,
    },
    /// KVM took the write but reads back something else: it does not hold the MSR.
    #[error("KVM_SET_MSRS took IA32_FEATURE_CONTROL = {written} but KVM_GET_MSRS reads {read:?}")]
    ReadBackMismatch {
        /// The value written.
        written: FeatureControl,
        /// The value read (`None`: KVM_GET_MSRS processed 0 entries).
        read: Option<u64>,
    },
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Why kvm_intel refused a host write of IA32_FEATURE_CONTROL.
///
/// Since Linux 6.0 `is_vmx_feature_control_msr_valid` accepts every supported bit from the
/// host, so a refusal of a supported value means a kernel before 6.0, where
/// `vmx_feature_control_msr_valid` held host writes to the guest-valid bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostWriteRefusal {
    /// The value has VMX bits but the guest CPUID has no VMX (a kernel before 6.0 then refuses
    /// them from the host too).
    GuestCpuidLacksVmx,
    /// The guest CPUID has VMX, but KVM does not offer it: kvm_intel runs with `nested=0`, so
    /// `nested_vmx_allowed` is false and the VMX bits are not valid (kernel before 6.0).
    NestedDisabled,
    /// Bits other than VMX (SGX, SGX launch control, LMCE) that the guest's CPUID or MCG_CAP
    /// does not give it; a kernel before 6.0 refuses them from the host.
    KernelTooOld {
        /// The bits outside the guest-valid bits.
        bits: FeatureControl,
    },
    /// Every bit was valid for the guest, yet KVM refused: this KVM does not implement the
    /// MSR with kvm_intel's semantics (kvm_amd, PVM).
    NotHeldByKvm,
}

impl fmt::Display for HostWriteRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostWriteRefusal::GuestCpuidLacksVmx => f.write_str(
                "the guest CPUID has no VMX, and this kernel (before Linux 6.0) holds host writes to the guest-valid bits",
            ),
            HostWriteRefusal::NestedDisabled => f.write_str(
                "the guest CPUID has VMX but KVM does not offer it (kvm_intel nested=0); this kernel (before Linux 6.0) then refuses the VMX bits",
            ),
            HostWriteRefusal::KernelTooOld { bits } => write!(
                f,
                "kernel before Linux 6.0: host writes are held to the guest-valid bits, and {bits} are not valid for this guest"
            ),
            HostWriteRefusal::NotHeldByKvm => f.write_str(
                "every bit is valid for the guest: this KVM does not hold IA32_FEATURE_CONTROL",
            ),
        }
    }
}

/// Explains a refused host write of `value` to a vCPU with `exposure`.
pub(crate) fn diagnose(value: FeatureControl, exposure: &Exposure) -> HostWriteRefusal {
    let invalid = value.difference(exposure.features.valid_bits());
    let vmx_bits = FeatureControl::VMX_INSIDE_SMX | FeatureControl::VMX_OUTSIDE_SMX;
    if invalid == FeatureControl::empty() {
        HostWriteRefusal::NotHeldByKvm
    } else if invalid.difference(vmx_bits) != invalid {
        if exposure.withheld.vmx {
            HostWriteRefusal::NestedDisabled
        } else {
            HostWriteRefusal::GuestCpuidLacksVmx
        }
    } else {
        HostWriteRefusal::KernelTooOld { bits: invalid }
    }
}

/// A vCPU whose CPUID (and MCG_CAP) KVM has, with the features KVM will expose to it: the
/// only thing [`apply_native`] accepts.
#[derive(Debug)]
pub struct ConfiguredVcpu<'a> {
    vcpu: &'a VcpuFd,
    exposure: Exposure,
}

impl<'a> ConfiguredVcpu<'a> {
    /// Sets `cpuid` on `vcpu` (`KVM_SET_CPUID2`) and, when `mcg_cap` is given,
    /// `KVM_X86_SETUP_MCE`; records what KVM will expose ([`GuestCpuidFeatures::exposed`]).
    ///
    /// Capability bits of `mcg_cap` that KVM does not support are dropped before
    /// `KVM_X86_SETUP_MCE`, which would refuse them with `EINVAL`
    /// (`kvm_vcpu_ioctl_x86_setup_mce` accepts only `supported_mce_cap`, the bank count in
    /// bits 7:0 and bits 23:16); they appear in [`Exposure::withheld`].
    ///
    /// # Errors
    ///
    /// [`Error::SetCpuid`] or [`Error::SetupMce`] with the errno.
    pub fn configure(
        vcpu: &'a VcpuFd,
        cpuid: &CpuId,
        mcg_cap: Option<u64>,
        support: &KvmSupport,
    ) -> Result<Self> {
        vcpu.set_cpuid2(cpuid).map_err(Error::SetCpuid)?;
        if let Some(asked) = mcg_cap {
            let mcg_cap = asked & (support.mce_cap | 0xff | 0x00ff_0000);
            // SAFETY: KVM_X86_SETUP_MCE reads one u64 through the pointer, which points to
            // `mcg_cap`, alive for the call; `vcpu` is a vCPU fd.
            let ret = unsafe {
                vmm_sys_util::ioctl::ioctl_with_ref(
                    vcpu,
                    crate::sys::ioctls::KVM_X86_SETUP_MCE(),
                    &mcg_cap,
                )
            };
            if ret < 0 {
                return Err(Error::SetupMce {
                    mcg_cap,
                    source: Errno::last(),
                });
            }
        }
        let exposure = GuestCpuidFeatures::exposed(cpuid, mcg_cap.unwrap_or(0), support);
        Ok(ConfiguredVcpu { vcpu, exposure })
    }

    /// What KVM exposes to this vCPU, and what it withholds.
    pub fn exposure(&self) -> Exposure {
        self.exposure
    }

    /// The exposed features (what KVM's guest-valid bits follow).
    pub fn features(&self) -> GuestCpuidFeatures {
        self.exposure.features
    }

    /// The vCPU.
    pub fn vcpu(&self) -> &'a VcpuFd {
        self.vcpu
    }
}

/// Writes `value` with `io`, then reads it back; `exposure` explains a refusal.
pub(crate) fn apply_with<M: MsrIo>(
    io: &M,
    exposure: &Exposure,
    value: FeatureControl,
) -> Result<FeatureControl> {
    if !io
        .set_msr(MSR_IA32_FEAT_CTL, value.bits())
        .map_err(Error::SetMsrs)?
    {
        return Err(Error::HostWriteRefused {
            value,
            refusal: diagnose(value, exposure),
        });
    }
    let read = io.get_msr(MSR_IA32_FEAT_CTL).map_err(Error::GetMsrs)?;
    if read == Some(value.bits()) {
        Ok(value)
    } else {
        Err(Error::ReadBackMismatch {
            written: value,
            read,
        })
    }
}

/// Writes `value` to IA32_FEATURE_CONTROL of a configured vCPU with `KVM_SET_MSRS` and reads
/// it back. Call it before the vCPU first runs, as firmware would.
///
/// # Errors
///
/// [`Error::HostWriteRefused`] when KVM processed 0 entries, with the reason
/// ([`HostWriteRefusal`]); [`Error::ReadBackMismatch`] when KVM does not store it; an errno
/// otherwise.
pub fn apply_native(vcpu: &ConfiguredVcpu<'_>, value: FeatureControl) -> Result<FeatureControl> {
    apply_with(&RawMsrFd(vcpu.vcpu.as_raw_fd()), &vcpu.exposure, value)
}

/// [`apply_native`] of the firmware-style value for the exposed features
/// ([`GuestCpuidFeatures::firmware_value`]).
///
/// # Errors
///
/// As [`apply_native`].
pub fn apply_firmware_value(vcpu: &ConfiguredVcpu<'_>) -> Result<FeatureControl> {
    apply_native(vcpu, vcpu.features().firmware_value())
}

/// Reads IA32_FEATURE_CONTROL as KVM holds it, or `None` if `KVM_GET_MSRS` processed 0
/// entries.
///
/// # Errors
///
/// [`Error::GetMsrs`] with the errno.
pub fn read_native(vcpu: &VcpuFd) -> Result<Option<u64>> {
    RawMsrFd(vcpu.as_raw_fd())
        .get_msr(MSR_IA32_FEAT_CTL)
        .map_err(Error::GetMsrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_kernel::{FakeVcpu, GuestCpu, Kernel, VmxRelease};

    fn exposure_of(kernel: Kernel, guest: GuestCpu) -> Exposure {
        kernel.exposure(guest)
    }

    #[test]
    fn vmx_6_1_accepts_the_firmware_value_and_vmxon_succeeds() {
        // models vmx_set_msr/is_vmx_feature_control_msr_valid and handle_vmxon, Linux 6.1
        let kernel = Kernel::Vmx {
            release: VmxRelease::Linux6_1,
            nested: true,
        };
        let guest = GuestCpu::with_vmx();
        let vcpu = FakeVcpu::configured(kernel, guest, 0);
        let exposure = exposure_of(kernel, guest);
        let value = exposure.features.firmware_value();
        assert_eq!(apply_with(&vcpu, &exposure, value).expect("applied"), value);
        assert_eq!(vcpu.guest_vmxon(), Ok(()));
    }

    #[test]
    fn vmx_5_15_refusals_are_typed_with_their_cause() {
        // models vmx_set_msr/vmx_feature_control_msr_valid and vmx_vcpu_after_set_cpuid,
        // Linux 5.15: host writes are held to the guest-valid bits
        let vmx_value = FeatureControl::LOCKED | FeatureControl::VMX_OUTSIDE_SMX;
        let old = |nested| Kernel::Vmx {
            release: VmxRelease::Linux5_15,
            nested,
        };

        let no_vmx = GuestCpu::default();
        let vcpu = FakeVcpu::configured(old(true), no_vmx, 0);
        let err = apply_with(&vcpu, &old(true).exposure(no_vmx), vmx_value).expect_err("refused");
        assert!(matches!(
            err,
            Error::HostWriteRefused {
                refusal: HostWriteRefusal::GuestCpuidLacksVmx,
                ..
            }
        ));

        let vmx = GuestCpu::with_vmx();
        let vcpu = FakeVcpu::configured(old(false), vmx, 0);
        let err = apply_with(&vcpu, &old(false).exposure(vmx), vmx_value).expect_err("refused");
        assert!(matches!(
            err,
            Error::HostWriteRefused {
                refusal: HostWriteRefusal::NestedDisabled,
                ..
            }
        ));
        assert!(err.to_string().contains("nested=0"), "{err}");
        assert_eq!(vcpu.guest_vmxon(), Err("#UD"));

        let lmce = vmx_value | FeatureControl::LMCE;
        let vcpu = FakeVcpu::configured(old(true), vmx, 0);
        let err = apply_with(&vcpu, &old(true).exposure(vmx), lmce).expect_err("refused");
        assert!(matches!(
            err,
            Error::HostWriteRefused {
                refusal: HostWriteRefusal::KernelTooOld { bits },
                ..
            } if bits == FeatureControl::LMCE
        ));

        // With VMX in the CPUID and nested=1, the same 5.15 kernel takes it.
        let vcpu = FakeVcpu::configured(old(true), vmx, 0);
        assert_eq!(
            apply_with(&vcpu, &old(true).exposure(vmx), vmx_value).expect("applied"),
            vmx_value
        );
        assert_eq!(vcpu.guest_vmxon(), Ok(()));
    }

    #[test]
    fn kvm_without_vmx_semantics_is_a_typed_refusal() {
        // models svm_set_msr -> kvm_set_msr_common (no case for 0x3a), Linux 6.1
        let guest = GuestCpu::with_vmx();
        let vcpu = FakeVcpu::configured(Kernel::Svm6_1, guest, 0);
        let exposure = Kernel::Svm6_1.exposure(guest);
        let err =
            apply_with(&vcpu, &exposure, FeatureControl::LOCKED).expect_err("no such MSR on SVM");
        assert!(matches!(
            err,
            Error::HostWriteRefused {
                refusal: HostWriteRefusal::NotHeldByKvm,
                ..
            }
        ));
        // The same, as measured on the local PVM KVM: KVM_SET_MSRS processes 0 entries.
        let vcpu = FakeVcpu::configured(Kernel::PvmMeasured, guest, 0);
        assert!(matches!(
            apply_with(&vcpu, &exposure, FeatureControl::LOCKED),
            Err(Error::HostWriteRefused { .. })
        ));
    }

    #[test]
    fn a_stored_but_different_value_is_a_mismatch() {
        let vcpu = FakeVcpu::configured(Kernel::SvmIgnoreMsrs6_1, GuestCpu::default(), 0);
        let err = apply_with(&vcpu, &Exposure::default(), FeatureControl::LOCKED)
            .expect_err("reads back 0");
        assert!(matches!(err, Error::ReadBackMismatch { read: Some(0), .. }));
    }

    #[test]
    fn diagnosis_prefers_vmx_causes() {
        let withheld = Exposure {
            features: GuestCpuidFeatures::default(),
            withheld: GuestCpuidFeatures {
                vmx: true,
                ..Default::default()
            },
        };
        let v = FeatureControl::LOCKED | FeatureControl::VMX_OUTSIDE_SMX | FeatureControl::LMCE;
        assert_eq!(diagnose(v, &withheld), HostWriteRefusal::NestedDisabled);
        assert_eq!(
            diagnose(v, &Exposure::default()),
            HostWriteRefusal::GuestCpuidLacksVmx
        );
        assert_eq!(
            diagnose(FeatureControl::LOCKED, &Exposure::default()),
            HostWriteRefusal::NotHeldByKvm
        );
    }
}
