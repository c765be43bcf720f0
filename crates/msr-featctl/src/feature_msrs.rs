//! Feature MSRs: the MSRs whose values describe the vCPU model (microcode revision,
//! `IA32_ARCH_CAPABILITIES`, `IA32_PERF_CAPABILITIES`, the VMX capability MSRs ...), which
//! userspace may choose before a vCPU runs.
//!
//! * [`feature_msr_index_list`]: `KVM_GET_MSR_FEATURE_INDEX_LIST` on `/dev/kvm`, sized with
//!   KVM's answer: called with too small a count it fails with `E2BIG` and writes the count it
//!   needs (`kvm_arch_dev_ioctl`, arch/x86/kvm/x86.c).
//! * [`host_feature_msrs`]: their values from `KVM_GET_MSRS` on the `/dev/kvm` fd
//!   (`do_get_feature_msr`), one index per call, so that a processed count of 0 names the
//!   index KVM does not know ([`FeatureMsrs::unknown`]).
//! * [`VcpuFeatureMsrs`]: applies a chosen [`FeatureMsrs`] to a vCPU before its first
//!   `KVM_RUN`. KVM refuses changes to these MSRs once the vCPU has run (`do_set_msr`, commit
//!   0094f62c7eaa "KVM: x86: Disallow writes to immutable feature MSRs after KVM_RUN"), and
//!   older kernels accept them with undefined results; this type refuses them in userspace
//!   with [`Error::ChangedAfterRun`] on every kernel.
//! * [`VmxCapabilities`]: a builder for the VMX capability MSRs that can only take features
//!   away from what KVM offers, never add (KVM's `vmx_set_vmx_msr` rules, vmx/nested.c).

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;

use kvm_ioctls::{Kvm, VcpuFd};

use crate::msr_io::{Errno, MsrIo, RawMsrFd};
use crate::sys::{self, ioctls::KVM_GET_MSR_FEATURE_INDEX_LIST};

/// Errors of the feature-MSR API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `KVM_GET_MSR_FEATURE_INDEX_LIST` failed.
    #[error("KVM_GET_MSR_FEATURE_INDEX_LIST failed")]
    FeatureIndexList(#[source] Errno),
    /// `KVM_GET_MSRS` of a feature MSR on `/dev/kvm` failed with an errno.
    #[error("KVM_GET_MSRS of feature MSR {index:#x} on /dev/kvm failed")]
    GetFeatureMsr {
        /// The MSR.
        index: u32,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// `KVM_SET_MSRS` of a feature MSR on a vCPU failed with an errno.
    #[error("KVM_SET_MSRS of feature MSR {index:#x} failed")]
    SetFeatureMsr {
        /// The MSR.
        index: u32,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// KVM processed 0 entries: it refused this value for this vCPU (for a VMX MSR: wider
    /// than KVM supports, or the guest has no VMX).
    #[error("KVM refused the host write of feature MSR {index:#x} = {value:#x}")]
    HostWriteRefused {
        /// The MSR.
        index: u32,
        /// The value.
        value: u64,
    },
    /// A feature MSR would change after the vCPU's first `KVM_RUN`; nothing was written.
    #[error("feature MSR {index:#x} cannot change after the vCPU's first KVM_RUN (applied {applied:?}, requested {requested:#x})")]
    ChangedAfterRun {
        /// The MSR.
        index: u32,
        /// The value applied before the run, if any.
        applied: Option<u64>,
        /// The value requested now.
        requested: u64,
    },
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// How often the list is re-sized when the count KVM needs keeps changing between the calls.
const LIST_ATTEMPTS: usize = 4;

/// The list call with KVM's E2BIG sizing: ask with `nmsrs = 0`, read the count KVM writes
/// back, ask again with room for it.
pub(crate) fn index_list_with(
    mut call: impl FnMut(&mut u32, &mut [u32]) -> std::result::Result<(), Errno>,
) -> Result<Vec<u32>> {
    let mut indices: Vec<u32> = Vec::new();
    let mut last = Errno::new(libc::E2BIG);
    for _ in 0..LIST_ATTEMPTS {
        let mut nmsrs = indices.len() as u32;
        match call(&mut nmsrs, &mut indices) {
            Ok(()) => {
                indices.truncate(nmsrs as usize);
                return Ok(indices);
            }
            Err(e) if e.errno() == libc::E2BIG => {
                indices.resize(nmsrs as usize, 0);
                last = e;
            }
            Err(e) => return Err(Error::FeatureIndexList(e)),
        }
    }
    Err(Error::FeatureIndexList(last))
}

/// `KVM_GET_MSR_FEATURE_INDEX_LIST`: the MSRs whose host values `/dev/kvm` reports.
///
/// # Errors
///
/// [`Error::FeatureIndexList`] with the errno (`E2BIG` only if the count kept changing).
pub fn feature_msr_index_list(kvm: &Kvm) -> Result<Vec<u32>> {
    index_list_with(|nmsrs, indices| {
        // `struct kvm_msr_list`: a u32 count followed by the indices.
        let mut buf = vec![0u32; 1 + indices.len()];
        buf[0] = *nmsrs;
        // SAFETY: `buf` holds the header and room for `buf[0]` indices, which is all KVM
        // writes (it writes only the header when the count is too small); it lives until the
        // call returns.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ptr(
                kvm,
                KVM_GET_MSR_FEATURE_INDEX_LIST(),
                buf.as_mut_ptr(),
            )
        };
        *nmsrs = buf[0];
        if ret < 0 {
            return Err(Errno::last());
        }
        let n = (buf[0] as usize).min(indices.len());
        indices[..n].copy_from_slice(&buf[1..=n]);
        Ok(())
    })
}

/// A set of feature-MSR values, by index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeatureMsrs {
    values: BTreeMap<u32, u64>,
    unknown: Vec<u32>,
}

impl FeatureMsrs {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `index`, if in the set.
    pub fn get(&self, index: u32) -> Option<u64> {
        self.values.get(&index).copied()
    }

    /// Puts `index = value` in the set.
    pub fn set(&mut self, index: u32, value: u64) -> &mut Self {
        self.values.insert(index, value);
        self
    }

    /// Takes `index` out of the set (the vCPU then keeps KVM's default).
    pub fn remove(&mut self, index: u32) -> Option<u64> {
        self.values.remove(&index)
    }

    /// The entries, by index.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.values.iter().map(|(i, v)| (*i, *v))
    }

    /// Listed indices that `/dev/kvm` did not answer for (processed count 0).
    pub fn unknown(&self) -> &[u32] {
        &self.unknown
    }
}

/// Reads each of `indices` from `io` (the system fd): a processed count of 0 marks the index
/// unknown.
pub(crate) fn values_with<M: MsrIo>(io: &M, indices: &[u32]) -> Result<FeatureMsrs> {
    let mut msrs = FeatureMsrs::new();
    for &index in indices {
        match io
            .get_msr(index)
            .map_err(|source| Error::GetFeatureMsr { index, source })?
        {
            Some(value) => {
                msrs.values.insert(index, value);
            }
            None => msrs.unknown.push(index),
        }
    }
    Ok(msrs)
}

/// The values `/dev/kvm` reports for `indices` (`KVM_GET_MSRS` on the system fd, one index
/// per call); indices it does not answer for end up in [`FeatureMsrs::unknown`].
///
/// # Errors
///
/// [`Error::GetFeatureMsr`] with the errno.
pub fn host_feature_msr_values(kvm: &Kvm, indices: &[u32]) -> Result<FeatureMsrs> {
    values_with(&RawMsrFd(kvm.as_raw_fd()), indices)
}

/// The host's feature MSRs: [`feature_msr_index_list`], each read from `/dev/kvm`.
///
/// # Errors
///
/// [`Error::FeatureIndexList`] or [`Error::GetFeatureMsr`] with the errno.
pub fn host_feature_msrs(kvm: &Kvm) -> Result<FeatureMsrs> {
    let indices = feature_msr_index_list(kvm)?;
    host_feature_msr_values(kvm, &indices)
}

/// The feature MSRs applied to one vCPU, and whether it has run.
///
/// ```
/// use msr_featctl::feature_msrs::{Error, FeatureMsrs, VcpuFeatureMsrs};
///
/// let mut chosen = FeatureMsrs::new();
/// chosen.set(0x10a, 0x0);
/// let mut vcpu_state = VcpuFeatureMsrs::new();
/// vcpu_state.first_run(); // the VMM calls this right before the vCPU's first KVM_RUN
/// assert!(vcpu_state.check_change(&chosen).is_err()); // nothing was applied before the run
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuFeatureMsrs {
    applied: BTreeMap<u32, u64>,
    has_run: bool,
}

impl VcpuFeatureMsrs {
    /// A vCPU that has not run and has nothing applied.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that the vCPU is about to enter `KVM_RUN` for the first time; from then on the
    /// feature MSRs are fixed.
    pub fn first_run(&mut self) {
        self.has_run = true;
    }

    /// Whether [`Self::first_run`] was called.
    pub fn has_run(&self) -> bool {
        self.has_run
    }

    /// The values applied so far.
    pub fn applied(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.applied.iter().map(|(i, v)| (*i, *v))
    }

    /// Checks that applying `set` now changes nothing KVM fixes at the first `KVM_RUN`.
    ///
    /// # Errors
    ///
    /// [`Error::ChangedAfterRun`] for the first MSR that would change after the first run.
    pub fn check_change(&self, set: &FeatureMsrs) -> Result<()> {
        if !self.has_run {
            return Ok(());
        }
        for (index, requested) in set.iter() {
            let applied = self.applied.get(&index).copied();
            if applied != Some(requested) {
                return Err(Error::ChangedAfterRun {
                    index,
                    applied,
                    requested,
                });
            }
        }
        Ok(())
    }

    pub(crate) fn apply_with<M: MsrIo>(&mut self, io: &M, set: &FeatureMsrs) -> Result<()> {
        self.check_change(set)?;
        if self.has_run {
            return Ok(()); // every value is already in place
        }
        for (index, value) in set.iter() {
            if !io
                .set_msr(index, value)
                .map_err(|source| Error::SetFeatureMsr { index, source })?
            {
                return Err(Error::HostWriteRefused { index, value });
            }
            self.applied.insert(index, value);
        }
        Ok(())
    }

    /// Writes every MSR of `set` to `vcpu` (one `KVM_SET_MSRS` entry each), before the
    /// vCPU's first `KVM_RUN`; after it, only a set that changes nothing is accepted (and
    /// nothing is written). For VMX capability MSRs, set the vCPU's CPUID first: KVM takes
    /// them only from a vCPU with VMX.
    ///
    /// # Errors
    ///
    /// [`Error::ChangedAfterRun`] (nothing written), [`Error::HostWriteRefused`] naming the
    /// MSR KVM refused (the ones before it are applied), [`Error::SetFeatureMsr`] with an
    /// errno.
    pub fn apply(&mut self, vcpu: &VcpuFd, set: &FeatureMsrs) -> Result<()> {
        self.apply_with(&RawMsrFd(vcpu.as_raw_fd()), set)
    }
}

/// A VMX capability MSR holding controls: allowed-0 settings (bits that must be 1) in bits
/// 31:0, allowed-1 settings (bits that may be 1) in bits 63:32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmxControls {
    /// `IA32_VMX_TRUE_PINBASED_CTLS`.
    Pinbased,
    /// `IA32_VMX_TRUE_PROCBASED_CTLS`.
    Procbased,
    /// `IA32_VMX_PROCBASED_CTLS2`.
    Procbased2,
    /// `IA32_VMX_TRUE_EXIT_CTLS`.
    Exit,
    /// `IA32_VMX_TRUE_ENTRY_CTLS`.
    Entry,
}

impl VmxControls {
    /// The MSR index. KVM accepts only the TRUE variants (and PROCBASED_CTLS2); it derives
    /// the others.
    pub fn index(self) -> u32 {
        match self {
            VmxControls::Pinbased => sys::MSR_IA32_VMX_TRUE_PINBASED_CTLS,
            VmxControls::Procbased => sys::MSR_IA32_VMX_TRUE_PROCBASED_CTLS,
            VmxControls::Procbased2 => sys::MSR_IA32_VMX_PROCBASED_CTLS2,
            VmxControls::Exit => sys::MSR_IA32_VMX_TRUE_EXIT_CTLS,
            VmxControls::Entry => sys::MSR_IA32_VMX_TRUE_ENTRY_CTLS,
        }
    }
}

/// A refused [`VmxCapabilities`] step; the builder is left unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VmxCapError {
    /// KVM does not report this MSR (kvm_intel without `nested=1`, or not VMX at all).
    #[error("KVM offers no VMX capability MSR {index:#x}")]
    NotOffered {
        /// The MSR.
        index: u32,
    },
    /// Clearing controls that must stay 1: the allowed-0 settings would exceed the allowed-1
    /// settings.
    #[error("MSR {index:#x}: controls {bits:#x} must be 1 and cannot be removed")]
    MustBeOne {
        /// The MSR.
        index: u32,
        /// The controls.
        bits: u32,
    },
    /// Requiring controls that may not be 1.
    #[error("MSR {index:#x}: controls {bits:#x} are not allowed to be 1")]
    NotAllowed {
        /// The MSR.
        index: u32,
        /// The controls.
        bits: u32,
    },
}

/// The VMX capability MSRs for a guest, built from what KVM offers by taking features away.
///
/// Every step can only narrow: allowed-1 settings shrink ([`Self::disallow`]), allowed-0
/// settings grow within allowed-1 ([`Self::require`]), EPT/VPID and VMFUNC capabilities keep
/// a subset ([`Self::keep_ept_vpid`], [`Self::keep_vmfunc`]). That is what
/// `vmx_restore_control_msr`, `vmx_restore_vmx_ept_vpid_cap` and the VMFUNC case of
/// `vmx_set_vmx_msr` accept (arch/x86/kvm/vmx/nested.c); a widened value would be refused.
///
/// ```
/// use msr_featctl::feature_msrs::{FeatureMsrs, VmxCapabilities, VmxControls, VmxCapError};
///
/// let mut host = FeatureMsrs::new();
/// // allowed-1 = 0xff, allowed-0 = 0x16
/// host.set(VmxControls::Procbased.index(), (0xff << 32) | 0x16);
/// let mut caps = VmxCapabilities::from_host(&host);
/// caps.disallow(VmxControls::Procbased, 0x80)?;
/// assert_eq!(caps.value(VmxControls::Procbased.index()), Some((0x7f << 32) | 0x16));
/// assert_eq!(
///     caps.disallow(VmxControls::Procbased, 0x02),
///     Err(VmxCapError::MustBeOne { index: 0x48e, bits: 0x02 })
/// );
/// # Ok::<(), VmxCapError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmxCapabilities {
    host: BTreeMap<u32, u64>,
    chosen: BTreeMap<u32, u64>,
}

impl VmxCapabilities {
    /// Starts from the VMX capability MSRs in `host` (from [`host_feature_msrs`]).
    pub fn from_host(host: &FeatureMsrs) -> Self {
        let host: BTreeMap<u32, u64> = host
            .iter()
            .filter(|(i, _)| sys::VMX_CAPABILITY_MSRS.contains(i))
            .collect();
        VmxCapabilities {
            chosen: host.clone(),
            host,
        }
    }

    /// The current value of `index`.
    pub fn value(&self, index: u32) -> Option<u64> {
        self.chosen.get(&index).copied()
    }

    fn current(&self, index: u32) -> std::result::Result<u64, VmxCapError> {
        self.value(index).ok_or(VmxCapError::NotOffered { index })
    }

    /// Removes `bits` from the allowed-1 settings of `msr`: the guest hypervisor may no
    /// longer set these controls.
    ///
    /// # Errors
    ///
    /// [`VmxCapError::NotOffered`], or [`VmxCapError::MustBeOne`] for controls in the
    /// allowed-0 settings.
    pub fn disallow(
        &mut self,
        msr: VmxControls,
        bits: u32,
    ) -> std::result::Result<&mut Self, VmxCapError> {
        let index = msr.index();
        let value = self.current(index)?;
        let must = value as u32;
        if must & bits != 0 {
            return Err(VmxCapError::MustBeOne {
                index,
                bits: must & bits,
            });
        }
        let allowed1 = ((value >> 32) as u32) & !bits;
        self.chosen
            .insert(index, (u64::from(allowed1) << 32) | u64::from(must));
        Ok(self)
    }

    /// Adds `bits` to the allowed-0 settings of `msr`: the guest hypervisor must set these
    /// controls.
    ///
    /// # Errors
    ///
    /// [`VmxCapError::NotOffered`], or [`VmxCapError::NotAllowed`] for controls outside the
    /// allowed-1 settings.
    pub fn require(
        &mut self,
        msr: VmxControls,
        bits: u32,
    ) -> std::result::Result<&mut Self, VmxCapError> {
        let index = msr.index();
        let value = self.current(index)?;
        let allowed1 = (value >> 32) as u32;
        if bits & !allowed1 != 0 {
            return Err(VmxCapError::NotAllowed {
                index,
                bits: bits & !allowed1,
            });
        }
        self.chosen.insert(index, value | u64::from(bits));
        Ok(self)
    }

    /// Keeps only `mask` of `IA32_VMX_EPT_VPID_CAP`.
    ///
    /// # Errors
    ///
    /// [`VmxCapError::NotOffered`].
    pub fn keep_ept_vpid(&mut self, mask: u64) -> std::result::Result<&mut Self, VmxCapError> {
        self.keep(sys::MSR_IA32_VMX_EPT_VPID_CAP, mask)
    }

    /// Keeps only `mask` of `IA32_VMX_VMFUNC`.
    ///
    /// # Errors
    ///
    /// [`VmxCapError::NotOffered`].
    pub fn keep_vmfunc(&mut self, mask: u64) -> std::result::Result<&mut Self, VmxCapError> {
        self.keep(sys::MSR_IA32_VMX_VMFUNC, mask)
    }

    fn keep(&mut self, index: u32, mask: u64) -> std::result::Result<&mut Self, VmxCapError> {
        let value = self.current(index)?;
        self.chosen.insert(index, value & mask);
        Ok(self)
    }

    /// Puts every MSR changed from KVM's value into `set`, for [`VcpuFeatureMsrs::apply`].
    /// Unchanged MSRs are left out: the vCPU already has KVM's value, and KVM refuses a
    /// direct write of some of them (the non-TRUE controls, CR0/CR4_FIXED1).
    pub fn add_to(&self, set: &mut FeatureMsrs) {
        for (index, value) in &self.chosen {
            if self.host.get(index) != Some(value) {
                set.set(*index, *value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_kernel::{FakeSystem, FakeVcpu, GuestCpu, Kernel, VmxRelease};
    use proptest::prelude::*;

    const VMX: Kernel = Kernel::Vmx {
        release: VmxRelease::Linux6_1,
        nested: true,
    };

    fn system() -> FakeSystem {
        FakeSystem {
            features: [
                (0x8b, 0x1234),
                (0x10a, 0x0c),
                (sys::MSR_IA32_VMX_BASIC, 0x00da_0400_0000_0012),
                (
                    sys::MSR_IA32_VMX_TRUE_PROCBASED_CTLS,
                    (0xfff9_fffe << 32) | 0x0401_e172,
                ),
                (sys::MSR_IA32_VMX_PROCBASED_CTLS2, 0x0057_cfff << 32),
                (sys::MSR_IA32_VMX_EPT_VPID_CAP, 0x0f01_0633_4141),
                (sys::MSR_IA32_VMX_VMFUNC, 0x1),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn list_is_sized_from_the_e2big_answer() {
        // models KVM_GET_MSR_FEATURE_INDEX_LIST in kvm_arch_dev_ioctl, Linux 6.1
        let sys = system();
        let mut calls = 0;
        let list = index_list_with(|n, buf| {
            calls += 1;
            sys.feature_index_list(n, buf)
        })
        .expect("list");
        assert_eq!(list, sys.features.keys().copied().collect::<Vec<_>>());
        assert_eq!(calls, 2, "one E2BIG sizing call, one real call");
        let empty = FakeSystem {
            features: BTreeMap::new(),
        };
        assert_eq!(
            index_list_with(|n, buf| empty.feature_index_list(n, buf)).expect("empty"),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn list_errors_keep_the_errno() {
        let err = index_list_with(|_, _| Err(Errno::new(libc::EFAULT))).expect_err("EFAULT");
        assert!(matches!(err, Error::FeatureIndexList(e) if e.errno() == libc::EFAULT));
        // A count that grows on every call gives up with E2BIG instead of looping forever.
        let mut grow = 0;
        let err = index_list_with(|n, _| {
            grow += 10;
            *n = grow;
            Err(Errno::new(libc::E2BIG))
        })
        .expect_err("never settles");
        assert!(matches!(err, Error::FeatureIndexList(e) if e.errno() == libc::E2BIG));
    }

    #[test]
    fn host_values_mark_unknown_indices() {
        // models KVM_GET_MSRS on /dev/kvm: msr_io + do_get_feature_msr, Linux 6.1
        let sys = system();
        let msrs = values_with(&sys, &[0x10a, 0x3a, 0x8b]).expect("values");
        assert_eq!(msrs.get(0x10a), Some(0x0c));
        assert_eq!(msrs.get(0x8b), Some(0x1234));
        assert_eq!(msrs.unknown(), &[0x3a]);
        assert!(matches!(
            values_with(&FakeSystem { features: BTreeMap::new() }, &[1]),
            Ok(m) if m.unknown() == [1]
        ));
    }

    #[test]
    fn apply_before_run_then_refuse_changes_after_it() {
        // models do_set_msr after commit 0094f62c7eaa (immutable feature MSRs after KVM_RUN)
        let sys = system();
        let vcpu = FakeVcpu::configured(VMX, GuestCpu::with_vmx(), 0)
            .with_feature_msrs(sys.features.clone());
        let mut chosen = FeatureMsrs::new();
        chosen.set(0x10a, 0x08);
        let mut state = VcpuFeatureMsrs::new();
        state.apply_with(&vcpu, &chosen).expect("applied");
        assert_eq!(vcpu.feature(0x10a), Some(0x08));

        vcpu.run();
        state.first_run();
        let writes = vcpu.writes();
        state
            .apply_with(&vcpu, &chosen)
            .expect("same values are fine");
        let mut changed = chosen.clone();
        changed.set(0x10a, 0x0c);
        let err = state
            .apply_with(&vcpu, &changed)
            .expect_err("changed after run");
        assert!(matches!(
            err,
            Error::ChangedAfterRun {
                index: 0x10a,
                applied: Some(0x08),
                requested: 0x0c
            }
        ));
        assert_eq!(vcpu.writes(), writes, "nothing reached KVM after the run");
        // The kernel would have refused it too.
        assert_eq!(vcpu.set_msr(0x10a, 0x0c).ok(), Some(false));
    }

    #[test]
    fn vmx_restrictions_are_accepted_by_vmx_set_vmx_msr() {
        // models vmx_set_msr + vmx_set_vmx_msr/vmx_restore_control_msr, Linux 6.1
        let sys = system();
        let host =
            values_with(&sys, &sys.features.keys().copied().collect::<Vec<_>>()).expect("values");
        let mut caps = VmxCapabilities::from_host(&host);
        caps.disallow(VmxControls::Procbased2, 1 << 1)
            .expect("EPT off")
            .require(VmxControls::Procbased, 1 << 7)
            .expect("HLT exiting required")
            .keep_ept_vpid(0)
            .expect("no EPT caps")
            .keep_vmfunc(0)
            .expect("no VMFUNC");
        assert_eq!(
            caps.disallow(VmxControls::Pinbased, 1),
            Err(VmxCapError::NotOffered { index: 0x48d })
        );
        let mut set = FeatureMsrs::new();
        caps.add_to(&mut set);
        assert!(
            set.get(sys::MSR_IA32_VMX_BASIC).is_none(),
            "unchanged MSRs are left out"
        );
        let vcpu = FakeVcpu::configured(VMX, GuestCpu::with_vmx(), 0)
            .with_feature_msrs(sys.features.clone());
        VcpuFeatureMsrs::new()
            .apply_with(&vcpu, &set)
            .expect("KVM takes a narrowed model");
        assert_eq!(
            vcpu.feature(sys::MSR_IA32_VMX_PROCBASED_CTLS2),
            Some(0x0057_cffd << 32)
        );

        // A widened value, as a hand-built set could carry, is refused by the kernel.
        let mut wide = FeatureMsrs::new();
        wide.set(sys::MSR_IA32_VMX_VMFUNC, 0x3);
        let vcpu = FakeVcpu::configured(VMX, GuestCpu::with_vmx(), 0)
            .with_feature_msrs(sys.features.clone());
        assert!(matches!(
            VcpuFeatureMsrs::new().apply_with(&vcpu, &wide),
            Err(Error::HostWriteRefused {
                index: 0x491,
                value: 3
            })
        ));
        // And without VMX in the guest CPUID, none is taken (vmx_set_msr: nested_vmx_allowed).
        let vcpu = FakeVcpu::configured(VMX, GuestCpu::default(), 0)
            .with_feature_msrs(sys.features.clone());
        assert!(matches!(
            VcpuFeatureMsrs::new().apply_with(&vcpu, &set),
            Err(Error::HostWriteRefused { .. })
        ));
    }

    proptest! {
        #[test]
        fn any_sequence_of_steps_only_narrows(
            host_high in any::<u32>(),
            host_low_seed in any::<u32>(),
            steps in proptest::collection::vec((any::<bool>(), any::<u32>()), 0..8),
        ) {
            // models vmx_restore_control_msr, Linux 6.1
            let host_low = host_low_seed & host_high;
            let host_value = (u64::from(host_high) << 32) | u64::from(host_low);
            let index = VmxControls::Exit.index();
            let sys = FakeSystem { features: [(index, host_value)].into_iter().collect() };
            let mut host = FeatureMsrs::new();
            host.set(index, host_value);
            let mut caps = VmxCapabilities::from_host(&host);
            for (require, bits) in steps {
                let before = caps.clone();
                let r = if require {
                    caps.require(VmxControls::Exit, bits).map(|_| ())
                } else {
                    caps.disallow(VmxControls::Exit, bits).map(|_| ())
                };
                if r.is_err() {
                    prop_assert_eq!(&caps, &before);
                }
            }
            let value = caps.value(index).expect("offered");
            let (low, high) = (value as u32, (value >> 32) as u32);
            prop_assert_eq!(high & !host_high, 0, "allowed-1 never grows");
            prop_assert_eq!(host_low & !low, 0, "allowed-0 never shrinks");
            prop_assert_eq!(low & !high, 0, "must-be-1 within may-be-1");
            let mut set = FeatureMsrs::new();
            caps.add_to(&mut set);
            let vcpu = FakeVcpu::configured(VMX, GuestCpu::with_vmx(), 0)
                .with_feature_msrs(sys.features.clone());
            prop_assert!(VcpuFeatureMsrs::new().apply_with(&vcpu, &set).is_ok());
        }
    }
}
