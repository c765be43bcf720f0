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

use crate::feature_control::{FeatureControl, GuestCpuidFeatures, HostWriteError, WriteCheck};
use crate::sys::{
    KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_VALID_MASK, KVM_MSR_FILTER_MAX_BITMAP_SIZE,
    KVM_MSR_FILTER_MAX_RANGES, KVM_MSR_FILTER_RANGE_VALID_MASK, MSR_IA32_FEAT_CTL, X2APIC_MSRS,
};

/// Errors of the emulation path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM lacks a capability emulation needs.
    #[error("KVM lacks {0:?}, needed to emulate IA32_FEATURE_CONTROL")]
    MissingCapability(Cap),
    /// The exit reasons have bits outside `KVM_MSR_EXIT_REASON_VALID_MASK`; not sent.
    #[error("MSR exit reasons {bits:#x} have bits outside KVM_MSR_EXIT_REASON_VALID_MASK (0x7)")]
    InvalidExitReasons {
        /// The raw reasons asked for.
        bits: u32,
    },
    /// Emulation needs `KVM_MSR_EXIT_REASON_FILTER` among the exit reasons.
    #[error("emulating IA32_FEATURE_CONTROL needs KVM_MSR_EXIT_REASON_FILTER exits; asked for {reasons:?}")]
    FilterExitsOff {
        /// The reasons asked for.
        reasons: MsrExitReason,
    },
    /// `KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)` failed.
    #[error("KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR, {reasons:?}) failed")]
    EnableUserSpaceMsr {
        /// The exit reasons asked for.
        reasons: MsrExitReason,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The filter breaks one of KVM's rules; it was not sent.
    #[error("MSR filter refused before KVM_X86_SET_MSR_FILTER")]
    InvalidFilter(#[source] FilterError),
    /// `KVM_X86_SET_MSR_FILTER` failed.
    #[error("KVM_X86_SET_MSR_FILTER failed")]
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

/// The `KVM_ENABLE_CAP` argument for exactly `reasons`, checked against
/// `KVM_MSR_EXIT_REASON_VALID_MASK` as `kvm_vm_ioctl_enable_cap` (arch/x86/kvm/x86.c, Linux
/// 6.0) checks it.
///
/// # Errors
///
/// [`Error::InvalidExitReasons`] for bits KVM would answer with `EINVAL`.
pub fn exit_reasons_arg(reasons: MsrExitReason) -> Result<u64> {
    let bits = reasons.bits();
    if bits & !KVM_MSR_EXIT_REASON_VALID_MASK != 0 {
        return Err(Error::InvalidExitReasons { bits });
    }
    Ok(u64::from(bits))
}

/// Enables user-space MSR exits on `vm` for exactly `reasons` — any combination of
/// [`MsrExitReason::Inval`], [`MsrExitReason::Unknown`] and [`MsrExitReason::Filter`], or
/// none (which turns them off). Enabling the capability again replaces the set. Do it before
/// the vCPUs first run.
///
/// Invalid bits are refused here and never sent: KVM before 6.0 did not check them.
///
/// # Errors
///
/// [`Error::MissingCapability`], [`Error::InvalidExitReasons`], or
/// [`Error::EnableUserSpaceMsr`] with the errno.
pub fn enable_user_space_msr(vm: &VmFd, reasons: MsrExitReason) -> Result<()> {
    let arg = exit_reasons_arg(reasons)?;
    if !vm.check_extension(Cap::X86UserSpaceMsr) {
        return Err(Error::MissingCapability(Cap::X86UserSpaceMsr));
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = arg;
    vm.enable_cap(&cap)
        .map_err(|source| Error::EnableUserSpaceMsr { reasons, source })
}

/// A rule of `KVM_X86_SET_MSR_FILTER` (`kvm_vm_ioctl_set_msr_filter` and
/// `kvm_add_msr_filter`, arch/x86/kvm/x86.c, Linux 6.1) that a filter breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// More than `KVM_MSR_FILTER_MAX_RANGES` (16) ranges.
    #[error("{count} ranges, KVM takes at most 16")]
    TooManyRanges {
        /// Ranges given.
        count: usize,
    },
    /// A range with no MSRs; KVM skips it silently, which is never what was meant.
    #[error("range {range} covers no MSR")]
    EmptyRange {
        /// Position of the range.
        range: usize,
    },
    /// A range that filters neither reads nor writes (`EINVAL`).
    #[error("range {range} filters neither reads nor writes")]
    NoAccessFlags {
        /// Position of the range.
        range: usize,
    },
    /// Range flags outside `KVM_MSR_FILTER_RANGE_VALID_MASK` (`EINVAL`).
    #[error(
        "range {range} has flags {flags:#x} outside KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE"
    )]
    InvalidFlags {
        /// Position of the range.
        range: usize,
        /// The flags.
        flags: u32,
    },
    /// The bitmap KVM copies, `BITS_TO_LONGS(nmsrs) * sizeof(long)` bytes, exceeds
    /// `KVM_MSR_FILTER_MAX_BITMAP_SIZE` (0x600) (`EINVAL`).
    #[error("range {range}: {msrs} MSRs need a {bytes}-byte bitmap, KVM takes at most 1536")]
    BitmapTooLarge {
        /// Position of the range.
        range: usize,
        /// MSRs in the range.
        msrs: u32,
        /// Bitmap bytes KVM would copy.
        bytes: usize,
    },
    /// The bitmap is shorter than the `BITS_TO_LONGS(nmsrs) * sizeof(long)` bytes KVM copies
    /// from it.
    #[error("range {range}: KVM copies {needed} bitmap bytes, only {len} given")]
    BitmapTooShort {
        /// Position of the range.
        range: usize,
        /// Bytes KVM reads.
        needed: usize,
        /// Bytes given.
        len: usize,
    },
    /// `base + nmsrs` wraps past MSR 0xffffffff.
    #[error("range {range} runs past MSR 0xffffffff")]
    RangeWraps {
        /// Position of the range.
        range: usize,
    },
    /// The range covers x2APIC MSRs (0x800..=0x8ff), which `kvm_msr_allowed` never filters:
    /// that part of the range would silently have no effect.
    #[error("range {range} covers x2APIC MSRs 0x800..=0x8ff, which KVM never filters")]
    CoversX2apic {
        /// Position of the range.
        range: usize,
    },
    /// Default deny with no non-empty range (`EINVAL`: KVM would deny every MSR).
    #[error("a default-deny filter needs at least one range")]
    DenyWithoutRanges,
}

/// The bytes KVM copies for a range of `msrs` MSRs: `BITS_TO_LONGS(nmsrs) * sizeof(long)`.
pub const fn bitmap_bytes(msrs: u32) -> usize {
    (msrs as usize).div_ceil(64) * 8
}

/// One range of an [`MsrFilter`]: which MSRs, which accesses it filters, and per MSR whether
/// that access is allowed (bit set) or denied (bit clear: with
/// [`MsrExitReason::Filter`] exits, the access exits to userspace; without, the guest takes
/// #GP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterRange {
    /// First MSR index.
    pub base: u32,
    /// Number of MSRs.
    pub msr_count: u32,
    /// `READ`, `WRITE` or both.
    pub flags: MsrFilterRangeFlags,
    /// One bit per MSR, LSB of byte 0 first; at least [`bitmap_bytes`]`(msr_count)` bytes.
    pub bitmap: Vec<u8>,
}

impl FilterRange {
    /// A range denying `flags` accesses to `msr_count` MSRs from `base`.
    pub fn deny(base: u32, msr_count: u32, flags: MsrFilterRangeFlags) -> Self {
        FilterRange {
            base,
            msr_count,
            flags,
            bitmap: vec![0; bitmap_bytes(msr_count)],
        }
    }

    /// A range allowing `flags` accesses to `msr_count` MSRs from `base` (useful under a
    /// default-deny filter).
    pub fn allow(base: u32, msr_count: u32, flags: MsrFilterRangeFlags) -> Self {
        let mut range = Self::deny(base, msr_count, flags);
        for i in 0..msr_count as usize {
            range.bitmap[i / 8] |= 1 << (i % 8);
        }
        range
    }

    /// Whether `index` is in this range.
    pub fn contains(&self, index: u32) -> bool {
        index >= self.base && u64::from(index) < u64::from(self.base) + u64::from(self.msr_count)
    }

    /// Whether this range lets `index` be accessed (`None`: not in the range). A bitmap
    /// shorter than `msr_count` bits (which [`MsrFilter::validate`] refuses) reads as zeros
    /// past its end: those MSRs are denied.
    pub fn allows(&self, index: u32) -> Option<bool> {
        self.contains(index).then(|| {
            let bit = (index - self.base) as usize;
            self.bitmap
                .get(bit / 8)
                .is_some_and(|byte| byte & (1 << (bit % 8)) != 0)
        })
    }

    fn check(&self, range: usize) -> std::result::Result<(), FilterError> {
        if self.msr_count == 0 {
            return Err(FilterError::EmptyRange { range });
        }
        let flags = self.flags.bits();
        if flags & !KVM_MSR_FILTER_RANGE_VALID_MASK != 0 {
            return Err(FilterError::InvalidFlags { range, flags });
        }
        if flags == 0 {
            return Err(FilterError::NoAccessFlags { range });
        }
        let bytes = bitmap_bytes(self.msr_count);
        if bytes > KVM_MSR_FILTER_MAX_BITMAP_SIZE as usize {
            return Err(FilterError::BitmapTooLarge {
                range,
                msrs: self.msr_count,
                bytes,
            });
        }
        if self.bitmap.len() < bytes {
            return Err(FilterError::BitmapTooShort {
                range,
                needed: bytes,
                len: self.bitmap.len(),
            });
        }
        let end = u64::from(self.base) + u64::from(self.msr_count) - 1;
        if end > u64::from(u32::MAX) {
            return Err(FilterError::RangeWraps { range });
        }
        if u64::from(self.base) <= u64::from(*X2APIC_MSRS.end())
            && end >= u64::from(*X2APIC_MSRS.start())
        {
            return Err(FilterError::CoversX2apic { range });
        }
        Ok(())
    }
}

/// The range that sends guest reads and writes of MSR 0x3a to userspace.
pub fn feature_control_range() -> FilterRange {
    FilterRange::deny(
        MSR_IA32_FEAT_CTL,
        1,
        MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
    )
}

/// A whole `KVM_X86_SET_MSR_FILTER` filter, checked against KVM's rules before it is sent.
///
/// KVM replaces a VM's filter with each call, so a VMM that filters MSRs of its own builds one
/// `MsrFilter` with its ranges and adds this crate's with
/// [`MsrFilter::with_feature_control`]. Where ranges overlap, the first range that contains
/// the MSR and filters the access decides (`kvm_msr_allowed`).
///
/// ```
/// use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRangeFlags};
/// use msr_featctl::emulated::{FilterError, FilterRange, MsrFilter};
///
/// // The VMM's own filter: writes of MSR 0x10 (TSC) exit to userspace.
/// let mut filter = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
/// filter.push(FilterRange::deny(0x10, 1, MsrFilterRangeFlags::WRITE));
/// let filter = filter.with_feature_control();
/// assert_eq!(filter.validate(), Ok(()));
/// assert_eq!(filter.ranges()[0].base, 0x3a);
/// assert_eq!(filter.ranges()[1].allows(0x10), Some(false));
///
/// // x2APIC MSRs are never filtered by KVM: refused before the ioctl.
/// let mut bad = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
/// bad.push(FilterRange::deny(0x800, 4, MsrFilterRangeFlags::READ));
/// assert_eq!(bad.validate(), Err(FilterError::CoversX2apic { range: 0 }));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsrFilter {
    default_action: MsrFilterDefaultAction,
    ranges: Vec<FilterRange>,
}

impl MsrFilter {
    /// An empty filter with this default for MSRs no range covers.
    pub fn new(default_action: MsrFilterDefaultAction) -> Self {
        MsrFilter {
            default_action,
            ranges: Vec::new(),
        }
    }

    /// Appends a range.
    pub fn push(&mut self, range: FilterRange) -> &mut Self {
        self.ranges.push(range);
        self
    }

    /// Puts [`feature_control_range`] first, so that it decides for MSR 0x3a whatever the
    /// VMM's own ranges say.
    pub fn with_feature_control(mut self) -> Self {
        self.ranges.insert(0, feature_control_range());
        self
    }

    /// The default action.
    pub fn default_action(&self) -> MsrFilterDefaultAction {
        self.default_action
    }

    /// The ranges, in the order KVM checks them.
    pub fn ranges(&self) -> &[FilterRange] {
        &self.ranges
    }

    /// Whether a guest access of `index` of kind `access` (READ or WRITE) is allowed, as
    /// `kvm_msr_allowed` (arch/x86/kvm/x86.c, Linux 6.1) decides it.
    pub fn allows(&self, index: u32, access: MsrFilterRangeFlags) -> bool {
        if X2APIC_MSRS.contains(&index) {
            return true;
        }
        self.ranges
            .iter()
            .filter(|r| r.flags.contains(access))
            .find_map(|r| r.allows(index))
            .unwrap_or(self.default_action == MsrFilterDefaultAction::ALLOW)
    }

    /// Checks every rule KVM enforces, plus the ones whose breach KVM would silently accept
    /// (empty ranges, x2APIC ranges, short bitmaps that KVM would read past).
    ///
    /// # Errors
    ///
    /// The first [`FilterError`] found.
    pub fn validate(&self) -> std::result::Result<(), FilterError> {
        if self.ranges.len() > KVM_MSR_FILTER_MAX_RANGES as usize {
            return Err(FilterError::TooManyRanges {
                count: self.ranges.len(),
            });
        }
        for (i, range) in self.ranges.iter().enumerate() {
            range.check(i)?;
        }
        if self.ranges.is_empty() && self.default_action == MsrFilterDefaultAction::DENY {
            return Err(FilterError::DenyWithoutRanges);
        }
        Ok(())
    }

    /// Validates the filter and installs it on `vm` with `KVM_X86_SET_MSR_FILTER`, replacing
    /// any filter the VM had.
    ///
    /// # Errors
    ///
    /// [`Error::MissingCapability`], [`Error::InvalidFilter`], or [`Error::SetMsrFilter`]
    /// with the errno.
    pub fn install(&self, vm: &VmFd) -> Result<()> {
        self.validate().map_err(Error::InvalidFilter)?;
        if !vm.check_extension(Cap::X86MsrFilter) {
            return Err(Error::MissingCapability(Cap::X86MsrFilter));
        }
        let ranges: Vec<MsrFilterRange<'_>> = self
            .ranges
            .iter()
            .map(|r| MsrFilterRange {
                flags: r.flags,
                base: r.base,
                msr_count: r.msr_count,
                bitmap: &r.bitmap,
            })
            .collect();
        vm.set_msr_filter(self.default_action, &ranges)
            .map_err(Error::SetMsrFilter)
    }
}

/// Installs a filter on `vm` that allows every MSR except 0x3a, whose reads and writes exit to
/// userspace (once [`MsrExitReason::Filter`] exits are on; without them KVM injects #GP).
///
/// # Errors
///
/// As [`MsrFilter::install`].
pub fn install_filter(vm: &VmFd) -> Result<()> {
    MsrFilter::new(MsrFilterDefaultAction::ALLOW)
        .with_feature_control()
        .install(vm)
}

/// Enables `reasons` exits, which must include [`MsrExitReason::Filter`], then
/// [`install_filter`]: what a VM needs for its vCPUs to use [`EmulatedFeatureControl`].
/// Use it only where [`crate::mode::resolve`] chose emulation.
///
/// # Errors
///
/// [`Error::FilterExitsOff`] when `reasons` lacks `Filter`, else as
/// [`enable_user_space_msr`] and [`MsrFilter::install`].
pub fn enable_emulation_with(vm: &VmFd, reasons: MsrExitReason) -> Result<()> {
    if !reasons.contains(MsrExitReason::Filter) {
        return Err(Error::FilterExitsOff { reasons });
    }
    enable_user_space_msr(vm, reasons)?;
    install_filter(vm)
}

/// [`enable_emulation_with`] for filter exits only.
///
/// # Errors
///
/// As [`enable_emulation_with`].
pub fn enable_emulation(vm: &VmFd) -> Result<()> {
    enable_emulation_with(vm, MsrExitReason::Filter)
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
    ///
    /// # Errors
    ///
    /// [`HostWriteError::UnsupportedBits`] for bits outside `0x160007`; the state is kept.
    pub fn set_from_host(
        &mut self,
        value: u64,
    ) -> std::result::Result<FeatureControl, HostWriteError> {
        let v = FeatureControl::check_host_write(value)?;
        self.value = v;
        Ok(v)
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
    ///
    /// # Errors
    ///
    /// [`Error::RestoreUnsupportedBits`] for bits outside `0x160007`.
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

    #[test]
    fn short_bitmap_denies_past_its_end_instead_of_panicking() {
        // Found by the msr_filter fuzz target: `allows` indexed past a short public bitmap.
        let range = FilterRange {
            base: 0x100,
            msr_count: 64,
            flags: MsrFilterRangeFlags::READ,
            bitmap: vec![0xff],
        };
        assert_eq!(range.allows(0x107), Some(true));
        assert_eq!(range.allows(0x108), Some(false));
        assert_eq!(range.allows(0x13f), Some(false));
        assert_eq!(range.allows(0x140), None);
    }

    fn vmx() -> GuestCpuidFeatures {
        GuestCpuidFeatures {
            vmx: true,
            ..Default::default()
        }
    }

    #[test]
    fn feature_control_range_denies_reads_and_writes_of_0x3a_only() {
        let range = feature_control_range();
        assert_eq!((range.base, range.msr_count), (0x3a, 1));
        assert_eq!(
            range.flags,
            MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE
        );
        // KVM copies BITS_TO_LONGS(1) * 8 bytes, not 1.
        assert_eq!(range.bitmap.len(), 8);
        assert_eq!(range.allows(0x3a), Some(false));
        assert_eq!(range.allows(0x3b), None);
    }

    #[test]
    fn exit_reasons_any_combination_but_no_invalid_bits() {
        // KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR) with invalid bits is never sent to a
        // kernel in tests: on the nested kvm-amd host it hung the test host. The check is
        // tested here against KVM_MSR_EXIT_REASON_VALID_MASK as kvm_vm_ioctl_enable_cap
        // (Linux 6.0) applies it.
        for bits in 0..8u32 {
            let reasons = MsrExitReason::from_bits_retain(bits);
            assert_eq!(exit_reasons_arg(reasons).expect("valid"), u64::from(bits));
        }
        for bit in 3..32 {
            let reasons = MsrExitReason::from_bits_retain(1 << bit) | MsrExitReason::Filter;
            assert!(matches!(
                exit_reasons_arg(reasons),
                Err(Error::InvalidExitReasons { bits }) if bits == (1 << bit) | 4
            ));
        }
    }

    /// `kvm_vm_ioctl_set_msr_filter` + `kvm_add_msr_filter` (arch/x86/kvm/x86.c, Linux 6.1):
    /// `Err` where the kernel answers EINVAL, `Ok` where it installs the filter. Written from
    /// the kernel functions, to check [`MsrFilter::validate`] against.
    fn kernel_accepts(filter: &MsrFilter) -> bool {
        if filter.ranges().len() > 16 {
            return false; // the uapi struct has 16 slots
        }
        let mut empty = true;
        for r in filter.ranges() {
            if r.msr_count == 0 {
                continue;
            }
            empty = false;
            if r.flags.bits() & !3 != 0 || r.flags.bits() == 0 {
                return false;
            }
            let size = (r.msr_count as usize).div_ceil(64) * 8;
            if size == 0 || size > 0x600 {
                return false;
            }
        }
        !(empty && filter.default_action() == MsrFilterDefaultAction::DENY)
    }

    #[test]
    fn validation_refuses_what_kvm_refuses() {
        // models kvm_vm_ioctl_set_msr_filter/kvm_add_msr_filter, Linux 6.1
        let rw = MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE;
        let cases: Vec<(MsrFilter, Option<FilterError>)> = vec![
            (MsrFilter::new(MsrFilterDefaultAction::ALLOW), None),
            (
                MsrFilter::new(MsrFilterDefaultAction::DENY),
                Some(FilterError::DenyWithoutRanges),
            ),
            (
                {
                    let mut f = MsrFilter::new(MsrFilterDefaultAction::DENY);
                    f.push(FilterRange::allow(0, 0x800, rw));
                    f
                },
                None,
            ),
            (
                {
                    let mut f = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
                    f.push(FilterRange::deny(0, 0x3001, rw));
                    f
                },
                Some(FilterError::BitmapTooLarge {
                    range: 0,
                    msrs: 0x3001,
                    bytes: 0x608,
                }),
            ),
            (
                {
                    let mut f = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
                    f.push(FilterRange::deny(0x10, 1, MsrFilterRangeFlags::empty()));
                    f
                },
                Some(FilterError::NoAccessFlags { range: 0 }),
            ),
            (
                {
                    let mut f = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
                    f.push(FilterRange::deny(
                        0x10,
                        1,
                        MsrFilterRangeFlags::from_bits_retain(4 | 1),
                    ));
                    f
                },
                Some(FilterError::InvalidFlags { range: 0, flags: 5 }),
            ),
            (
                {
                    let mut f = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
                    for i in 0..17 {
                        f.push(FilterRange::deny(0x10 + i, 1, rw));
                    }
                    f
                },
                Some(FilterError::TooManyRanges { count: 17 }),
            ),
        ];
        for (filter, expected) in cases {
            let ours = filter.validate();
            assert_eq!(ours.err(), expected, "{filter:?}");
            assert_eq!(ours.is_ok(), kernel_accepts(&filter), "{filter:?}");
        }
    }

    #[test]
    fn validation_also_refuses_what_kvm_would_silently_misread() {
        let rw = MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE;
        let mut f = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
        f.push(FilterRange::deny(0x10, 0, rw));
        assert_eq!(f.validate(), Err(FilterError::EmptyRange { range: 0 }));

        let mut short = FilterRange::deny(0x10, 65, rw);
        short.bitmap.truncate(9);
        let mut f = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
        f.push(short);
        assert_eq!(
            f.validate(),
            Err(FilterError::BitmapTooShort {
                range: 0,
                needed: 16,
                len: 9
            })
        );

        let mut f = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
        f.push(FilterRange::deny(0x7ff, 2, rw));
        assert_eq!(f.validate(), Err(FilterError::CoversX2apic { range: 0 }));
        let mut f = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
        f.push(FilterRange::deny(0x900, 2, rw));
        assert_eq!(f.validate(), Ok(()));

        let mut f = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
        f.push(FilterRange::deny(u32::MAX, 2, rw));
        assert_eq!(f.validate(), Err(FilterError::RangeWraps { range: 0 }));
    }

    #[test]
    fn merged_filter_routes_0x3a_and_keeps_the_vmm_ranges() {
        // models kvm_msr_allowed, Linux 6.1: the first range with the access flag decides
        let mut f = MsrFilter::new(MsrFilterDefaultAction::ALLOW);
        // The VMM allows reads of 0x00..0x40 explicitly, denies writes of 0x10.
        f.push(FilterRange::allow(0, 0x40, MsrFilterRangeFlags::READ));
        f.push(FilterRange::deny(0x10, 1, MsrFilterRangeFlags::WRITE));
        let f = f.with_feature_control();
        assert_eq!(f.validate(), Ok(()));
        assert!(!f.allows(0x3a, MsrFilterRangeFlags::READ));
        assert!(!f.allows(0x3a, MsrFilterRangeFlags::WRITE));
        assert!(f.allows(0x10, MsrFilterRangeFlags::READ));
        assert!(!f.allows(0x10, MsrFilterRangeFlags::WRITE));
        assert!(f.allows(0x11, MsrFilterRangeFlags::WRITE));
        let mut deny = MsrFilter::new(MsrFilterDefaultAction::DENY);
        deny.push(FilterRange::allow(0x10, 1, MsrFilterRangeFlags::READ));
        assert!(deny.allows(0x10, MsrFilterRangeFlags::READ));
        assert!(!deny.allows(0x10, MsrFilterRangeFlags::WRITE));
        assert!(
            deny.allows(0x830, MsrFilterRangeFlags::WRITE),
            "x2APIC is never filtered"
        );
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
            Ok(FeatureControl::SUPPORTED)
        );
        assert_eq!(state.handle_rdmsr(), 0x16_0007);
        assert!(matches!(
            state.set_from_host(1 << 3),
            Err(HostWriteError::UnsupportedBits { bits: 8 })
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

    proptest! {
        #[test]
        fn snapshot_round_trips(value in 0u64..=0x16_0007, vmx_on in any::<bool>()) {
            let features = GuestCpuidFeatures { vmx: vmx_on, ..Default::default() };
            let mut state = EmulatedFeatureControl::new(features);
            let value = value & 0x16_0007;
            prop_assert_eq!(state.set_from_host(value), Ok(FeatureControl::from_bits(value).unwrap()));
            let snap = state.snapshot();
            prop_assert_eq!(snap.is_locked(), value & 1 != 0);
            let restored = EmulatedFeatureControl::restore(features, snap).unwrap();
            prop_assert_eq!(restored, state);
        }

        #[test]
        fn refused_guest_writes_change_nothing(start in 0u64..=0x16_0007, value in any::<u64>()) {
            let mut state = EmulatedFeatureControl::new(vmx());
            state.set_from_host(start & 0x16_0007).expect("supported");
            let before = state.clone();
            if let WriteCheck::GeneralProtection(_) = state.handle_wrmsr(value) {
                prop_assert_eq!(state, before);
            } else {
                prop_assert_eq!(state.handle_rdmsr(), value);
            }
        }
    }
}
