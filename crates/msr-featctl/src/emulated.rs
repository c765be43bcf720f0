//! IA32_FEATURE_CONTROL emulated in userspace, on any KVM with MSR filters.
//!
//! With `KVM_CAP_X86_USER_SPACE_MSR` enabled for `KVM_MSR_EXIT_REASON_FILTER` (Linux 5.10)
//! and a `KVM_X86_SET_MSR_FILTER` range that denies MSR 0x3a, every guest `RDMSR`/`WRMSR` of
//! it leaves `KVM_RUN` as `KVM_EXIT_X86_RDMSR`/`KVM_EXIT_X86_WRMSR`. The VMM answers in
//! `kvm_run.msr`: `data` for a read, and `error = 1` to make KVM inject #GP on the next
//! `KVM_RUN`. [`EmulatedFeatureControl`] is the per-vCPU state that gives those answers
//! with KVM's VMX semantics (see [`crate::feature_control`]).
//!
//! Host-initiated `KVM_GET_MSRS`/`KVM_SET_MSRS` are not filtered, so they still reach KVM's
//! own (possibly absent) MSR; with emulation the VMM's copy here is the truth, and it is what
//! [`EmulatedFeatureControl::snapshot`] saves.

use kvm_bindings::kvm_enable_cap;
use kvm_ioctls::{
    Cap, MsrExitReason, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuExit, VmFd,
};

use crate::feature_control::{FeatureControl, GuestCpuidFeatures, WriteCheck};
use crate::sys::{KVM_CAP_X86_USER_SPACE_MSR, MSR_IA32_FEAT_CTL};

/// Errors of the emulation path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM lacks a capability emulation needs.
    #[error("KVM lacks {0:?}, needed to emulate IA32_FEATURE_CONTROL")]
    MissingCapability(Cap),
    /// `KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)` failed.
    #[error("KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR, {reasons:?}) failed")]
    EnableUserSpaceMsr {
        /// The exit reasons asked for.
        reasons: MsrExitReason,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_X86_SET_MSR_FILTER` failed.
    #[error("KVM_X86_SET_MSR_FILTER for MSR {MSR_IA32_FEAT_CTL:#x} failed")]
    SetMsrFilter(#[source] kvm_ioctls::Error),
    /// A snapshot holds bits KVM does not support, so it cannot be restored.
    #[error("snapshot value {value:#x} has bits outside the supported mask 0x160007")]
    RestoreUnsupportedBits {
        /// The value in the snapshot.
        value: u64,
    },
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The filter bitmap for the one-MSR range: bit 0 clear denies the access, which with
/// user-space MSR exits for [`MsrExitReason::Filter`] means "exit to the VMM".
static DENY_ONE_MSR: [u8; 1] = [0];

/// The MSR filter range that sends guest reads and writes of MSR 0x3a to userspace.
///
/// `KVM_X86_SET_MSR_FILTER` replaces the whole filter of a VM: a VMM that filters other MSRs
/// too passes this range together with its own in one call.
pub fn filter_range() -> MsrFilterRange<'static> {
    MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base: MSR_IA32_FEAT_CTL,
        msr_count: 1,
        bitmap: &DENY_ONE_MSR,
    }
}

/// Enables user-space MSR exits on `vm` for `reasons` plus [`MsrExitReason::Filter`].
///
/// Enabling the capability again replaces the set of reasons, so a VMM that wants other
/// reasons passes them here. Must be done before the vCPUs first run.
pub fn enable_user_space_msr(vm: &VmFd, reasons: MsrExitReason) -> Result<()> {
    if !vm.check_extension(Cap::X86UserSpaceMsr) {
        return Err(Error::MissingCapability(Cap::X86UserSpaceMsr));
    }
    let reasons = reasons | MsrExitReason::Filter;
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(reasons.bits());
    vm.enable_cap(&cap)
        .map_err(|source| Error::EnableUserSpaceMsr { reasons, source })
}

/// Installs an MSR filter on `vm` that allows every MSR except 0x3a, whose reads and writes
/// exit to userspace (once [`enable_user_space_msr`] is on; without it KVM injects #GP).
pub fn install_filter(vm: &VmFd) -> Result<()> {
    if !vm.check_extension(Cap::X86MsrFilter) {
        return Err(Error::MissingCapability(Cap::X86MsrFilter));
    }
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[filter_range()])
        .map_err(Error::SetMsrFilter)
}

/// [`enable_user_space_msr`] for filter exits only, then [`install_filter`]: everything a VM
/// needs for its vCPUs to use [`EmulatedFeatureControl`].
pub fn enable_emulation(vm: &VmFd) -> Result<()> {
    enable_user_space_msr(vm, MsrExitReason::empty())?;
    install_filter(vm)
}

/// What [`EmulatedFeatureControl::handle_exit`] answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsrExitAnswer {
    /// A guest `RDMSR`, given this value.
    Read(FeatureControl),
    /// A guest `WRMSR`, accepted or refused with #GP.
    Write(WriteCheck),
}

/// The saved state of one vCPU's emulated IA32_FEATURE_CONTROL.
///
/// One `u64`: the lock state is bit 0 of the value ([`FeatCtlSnapshot::is_locked`]), so the
/// two cannot disagree. Plain data so that any snapshot format can carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FeatCtlSnapshot {
    /// The MSR value.
    pub value: u64,
}

impl FeatCtlSnapshot {
    /// Whether the saved value is locked against guest writes.
    pub fn is_locked(&self) -> bool {
        self.value & FeatureControl::LOCKED.bits() != 0
    }
}

/// One vCPU's IA32_FEATURE_CONTROL, emulated with KVM's VMX semantics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulatedFeatureControl {
    value: FeatureControl,
    features: GuestCpuidFeatures,
}

impl EmulatedFeatureControl {
    /// The state of a new vCPU with these guest features: the value is 0, as in KVM.
    pub fn new(features: GuestCpuidFeatures) -> Self {
        EmulatedFeatureControl {
            value: FeatureControl::empty(),
            features,
        }
    }

    /// The state after firmware has run: [`GuestCpuidFeatures::firmware_value`], locked.
    pub fn with_firmware_value(features: GuestCpuidFeatures) -> Self {
        EmulatedFeatureControl {
            value: features.firmware_value(),
            features,
        }
    }

    /// The value the guest sees.
    pub fn value(&self) -> FeatureControl {
        self.value
    }

    /// The guest features the write checks use.
    pub fn features(&self) -> GuestCpuidFeatures {
        self.features
    }

    /// Updates the guest features, as KVM does on `KVM_SET_CPUID2` or `KVM_X86_SETUP_MCE`.
    /// The value is kept: KVM does not clear bits that stop being valid.
    pub fn set_features(&mut self, features: GuestCpuidFeatures) {
        self.features = features;
    }

    /// A host-initiated write (the VMM's counterpart of `KVM_SET_MSRS`): any supported bit,
    /// whatever the lock and the guest CPUID.
    pub fn set_from_host(&mut self, value: u64) -> WriteCheck {
        let check = FeatureControl::check_host_write(value);
        if let WriteCheck::Accepted(v) = check {
            self.value = v;
        }
        check
    }

    /// The answer to a guest `RDMSR` of 0x3a.
    pub fn handle_rdmsr(&self) -> u64 {
        self.value.bits()
    }

    /// A guest `WRMSR` of 0x3a: stores the value if KVM's guest rules allow it, otherwise
    /// leaves the state alone and says why the guest must take #GP.
    pub fn handle_wrmsr(&mut self, value: u64) -> WriteCheck {
        let check = self.value.check_guest_write(value, &self.features);
        if let WriteCheck::Accepted(v) = check {
            self.value = v;
        }
        check
    }

    /// Answers a `KVM_EXIT_X86_RDMSR`/`KVM_EXIT_X86_WRMSR` for MSR 0x3a in place: fills
    /// `msr.data` for a read and sets `msr.error` to 1 for a refused write (KVM then injects
    /// #GP on the next `KVM_RUN`). Any other exit, or an MSR exit for another index, is left
    /// untouched and `None` is returned, so a runner can route it elsewhere.
    pub fn handle_exit(&mut self, exit: &mut VcpuExit<'_>) -> Option<MsrExitAnswer> {
        match exit {
            VcpuExit::X86Rdmsr(read) if read.index == MSR_IA32_FEAT_CTL => {
                *read.data = self.handle_rdmsr();
                *read.error = 0;
                Some(MsrExitAnswer::Read(self.value))
            }
            VcpuExit::X86Wrmsr(write) if write.index == MSR_IA32_FEAT_CTL => {
                let check = self.handle_wrmsr(write.data);
                *write.error = match check {
                    WriteCheck::Accepted(_) => 0,
                    WriteCheck::GeneralProtection(_) => 1,
                };
                Some(MsrExitAnswer::Write(check))
            }
            _ => None,
        }
    }

    /// The state to save (for snapshot or migration).
    pub fn snapshot(&self) -> FeatCtlSnapshot {
        FeatCtlSnapshot {
            value: self.value.bits(),
        }
    }

    /// Rebuilds a vCPU's state from a snapshot, as a host-initiated write would: any supported
    /// value, locked or not, is restored; other bits are refused.
    pub fn restore(features: GuestCpuidFeatures, snapshot: FeatCtlSnapshot) -> Result<Self> {
        let value =
            FeatureControl::from_bits(snapshot.value).ok_or(Error::RestoreUnsupportedBits {
                value: snapshot.value,
            })?;
        Ok(EmulatedFeatureControl { value, features })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feature_control::GpReason;
    use kvm_ioctls::{ReadMsrExit, WriteMsrExit};
    use proptest::prelude::*;

    fn vmx() -> GuestCpuidFeatures {
        GuestCpuidFeatures {
            vmx: true,
            ..Default::default()
        }
    }

    #[test]
    fn filter_range_denies_reads_and_writes_of_0x3a_only() {
        let range = filter_range();
        assert_eq!(range.base, 0x3a);
        assert_eq!(range.msr_count, 1);
        assert_eq!(
            range.flags,
            MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE
        );
        assert_eq!(range.bitmap, &[0]);
    }

    #[test]
    fn new_state_reads_zero_and_firmware_state_is_locked() {
        assert_eq!(EmulatedFeatureControl::new(vmx()).handle_rdmsr(), 0);
        let fw = EmulatedFeatureControl::with_firmware_value(vmx());
        assert_eq!(fw.handle_rdmsr(), 0x5);
        assert!(fw.value().is_locked());
        assert_eq!(fw.features(), vmx());
    }

    #[test]
    fn rdmsr_exit_gets_the_value() {
        let mut state = EmulatedFeatureControl::with_firmware_value(vmx());
        let (mut error, mut data) = (1u8, 0u64);
        let mut exit = VcpuExit::X86Rdmsr(ReadMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index: 0x3a,
            data: &mut data,
        });
        assert_eq!(
            state.handle_exit(&mut exit),
            Some(MsrExitAnswer::Read(state.value()))
        );
        assert_eq!((error, data), (0, 0x5));
    }

    #[test]
    fn wrmsr_exit_sets_error_only_on_refusal() {
        let mut state = EmulatedFeatureControl::new(vmx());
        let mut error = 1u8;
        let mut exit = VcpuExit::X86Wrmsr(WriteMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index: 0x3a,
            data: 0x5,
        });
        assert_eq!(
            state.handle_exit(&mut exit),
            Some(MsrExitAnswer::Write(WriteCheck::Accepted(
                FeatureControl::LOCKED | FeatureControl::VMX_OUTSIDE_SMX
            )))
        );
        assert_eq!(error, 0);

        let mut exit = VcpuExit::X86Wrmsr(WriteMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index: 0x3a,
            data: 0x1,
        });
        let answer = state.handle_exit(&mut exit);
        assert_eq!(
            answer,
            Some(MsrExitAnswer::Write(WriteCheck::GeneralProtection(
                GpReason::Locked {
                    current: FeatureControl::LOCKED | FeatureControl::VMX_OUTSIDE_SMX
                }
            )))
        );
        assert_eq!(error, 1);
        assert_eq!(state.handle_rdmsr(), 0x5);
    }

    #[test]
    fn other_exits_are_left_alone() {
        let mut state = EmulatedFeatureControl::new(vmx());
        let (mut error, mut data) = (7u8, 9u64);
        let mut exit = VcpuExit::X86Rdmsr(ReadMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index: 0x10,
            data: &mut data,
        });
        assert_eq!(state.handle_exit(&mut exit), None);
        assert_eq!((error, data), (7, 9));
        let mut exit = VcpuExit::X86Wrmsr(WriteMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index: 0x3b,
            data: 0,
        });
        assert_eq!(state.handle_exit(&mut exit), None);
        assert_eq!(state.handle_exit(&mut VcpuExit::Hlt), None);
    }

    #[test]
    fn host_write_overrides_lock_and_cpuid() {
        let mut state = EmulatedFeatureControl::with_firmware_value(GuestCpuidFeatures::default());
        assert_eq!(
            state.set_from_host(0x16_0007),
            WriteCheck::Accepted(FeatureControl::SUPPORTED)
        );
        assert_eq!(state.handle_rdmsr(), 0x16_0007);
        assert!(matches!(
            state.set_from_host(1 << 3),
            WriteCheck::GeneralProtection(GpReason::UnsupportedBits { bits: 8 })
        ));
        assert_eq!(state.handle_rdmsr(), 0x16_0007);
    }

    #[test]
    fn features_change_keeps_the_value() {
        let mut state = EmulatedFeatureControl::new(vmx());
        assert!(matches!(state.handle_wrmsr(0x4), WriteCheck::Accepted(_)));
        state.set_features(GuestCpuidFeatures::default());
        assert_eq!(state.handle_rdmsr(), 0x4);
        assert!(matches!(
            state.handle_wrmsr(0x4),
            WriteCheck::GeneralProtection(GpReason::NotValidForGuest { .. })
        ));
    }

    #[test]
    fn restore_refuses_unsupported_bits() {
        let err = EmulatedFeatureControl::restore(vmx(), FeatCtlSnapshot { value: 1 << 40 })
            .expect_err("bit 40 is reserved");
        assert!(matches!(err, Error::RestoreUnsupportedBits { value } if value == 1 << 40));
        assert!(err.to_string().contains("0x10000000000"));
    }

    #[test]
    fn errors_name_the_operation() {
        let e = Error::MissingCapability(Cap::X86MsrFilter);
        assert!(e.to_string().contains("X86MsrFilter"));
        let e = Error::SetMsrFilter(kvm_ioctls::Error::new(libc::EINVAL));
        assert!(std::error::Error::source(&e).is_some());
        let e = Error::EnableUserSpaceMsr {
            reasons: MsrExitReason::Filter,
            source: kvm_ioctls::Error::new(libc::EINVAL),
        };
        assert!(e.to_string().contains("KVM_CAP_X86_USER_SPACE_MSR"));
    }

    proptest! {
        #[test]
        fn snapshot_round_trips(value in 0u64..=0x16_0007, vmx_on in any::<bool>()) {
            let features = GuestCpuidFeatures { vmx: vmx_on, ..Default::default() };
            let mut state = EmulatedFeatureControl::new(features);
            let value = value & 0x16_0007;
            prop_assert_eq!(state.set_from_host(value), WriteCheck::Accepted(FeatureControl::from_bits(value).unwrap()));
            let snap = state.snapshot();
            prop_assert_eq!(snap.is_locked(), value & 1 != 0);
            let restored = EmulatedFeatureControl::restore(features, snap).unwrap();
            prop_assert_eq!(restored, state);
        }

        #[test]
        fn refused_guest_writes_change_nothing(start in 0u64..=0x16_0007, value in any::<u64>()) {
            let mut state = EmulatedFeatureControl::new(vmx());
            state.set_from_host(start & 0x16_0007);
            let before = state.clone();
            if let WriteCheck::GeneralProtection(_) = state.handle_wrmsr(value) {
                prop_assert_eq!(state, before);
            } else {
                prop_assert_eq!(state.handle_rdmsr(), value);
            }
        }
    }
}
