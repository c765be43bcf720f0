//! The three register sets KVM can copy through `kvm_run`, and sets of them.

use std::fmt;

use kvm_ioctls::SyncReg;

use crate::sys;

/// One register set of the x86 vCPU state that `KVM_CAP_SYNC_REGS` can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegKind {
    /// General-purpose registers, RIP and RFLAGS (`struct kvm_regs`, `KVM_GET_REGS`).
    Regs,
    /// Segment, control and descriptor-table registers, EFER and APIC base
    /// (`struct kvm_sregs`, `KVM_GET_SREGS`).
    Sregs,
    /// Pending and injected exceptions, interrupts, NMIs and SMIs
    /// (`struct kvm_vcpu_events`, `KVM_GET_VCPU_EVENTS`).
    Events,
}

impl RegKind {
    /// All kinds, in the order the kernel applies dirty sets (`sync_regs()` in
    /// arch/x86/kvm/x86.c: regs, then sregs, then events).
    pub const ALL: [RegKind; 3] = [RegKind::Regs, RegKind::Sregs, RegKind::Events];

    /// The `KVM_SYNC_X86_*` bit of this set.
    pub const fn bit(self) -> u64 {
        match self {
            RegKind::Regs => sys::KVM_SYNC_X86_REGS,
            RegKind::Sregs => sys::KVM_SYNC_X86_SREGS,
            RegKind::Events => sys::KVM_SYNC_X86_EVENTS,
        }
    }

    /// The short name used in messages: `regs`, `sregs` or `events`.
    pub const fn name(self) -> &'static str {
        match self {
            RegKind::Regs => "regs",
            RegKind::Sregs => "sregs",
            RegKind::Events => "events",
        }
    }

    /// The kvm-ioctls name of this set.
    pub const fn sync_reg(self) -> SyncReg {
        match self {
            RegKind::Regs => SyncReg::Register,
            RegKind::Sregs => SyncReg::SystemRegister,
            RegKind::Events => SyncReg::VcpuEvents,
        }
    }
}

impl fmt::Display for RegKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bits that name no register set this crate knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "register-set mask {bits:#x} has bits {unknown:#x} outside KVM_SYNC_X86_VALID_FIELDS \
     ({valid:#x}); KVM_RUN would fail with EINVAL",
    valid = sys::KVM_SYNC_X86_VALID_FIELDS
)]
pub struct UnknownBits {
    /// The whole mask that was given.
    pub bits: u64,
    /// The bits of it that are not a known set.
    pub unknown: u64,
}

/// A set of [`RegKind`]s: the value of `kvm_valid_regs`, `kvm_dirty_regs` or of the
/// `KVM_CAP_SYNC_REGS` capability.
///
/// It can only hold the bits of `KVM_SYNC_X86_VALID_FIELDS`: [`RegSet::from_bits`] refuses
/// any other bit, so a mask that would make `KVM_RUN` fail with `EINVAL` cannot be built.
///
/// ```
/// use sync_regs::{RegKind, RegSet};
///
/// let set = RegSet::REGS | RegSet::EVENTS;
/// assert!(set.contains(RegKind::Events) && !set.contains(RegKind::Sregs));
/// assert_eq!(set.to_string(), "regs|events");
/// assert_eq!(set.iter().collect::<Vec<_>>(), [RegKind::Regs, RegKind::Events]);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RegSet(u8);

impl RegSet {
    /// No set.
    pub const EMPTY: RegSet = RegSet(0);
    /// General-purpose registers only.
    pub const REGS: RegSet = RegSet(sys::KVM_SYNC_X86_REGS as u8);
    /// Special registers only.
    pub const SREGS: RegSet = RegSet(sys::KVM_SYNC_X86_SREGS as u8);
    /// vCPU events only.
    pub const EVENTS: RegSet = RegSet(sys::KVM_SYNC_X86_EVENTS as u8);
    /// Every set the x86 ABI defines (`KVM_SYNC_X86_VALID_FIELDS`).
    pub const ALL: RegSet = RegSet(sys::KVM_SYNC_X86_VALID_FIELDS as u8);

    /// The set named by a raw `KVM_SYNC_X86_*` mask, refusing unknown bits.
    ///
    /// ```
    /// use sync_regs::RegSet;
    ///
    /// assert_eq!(RegSet::from_bits(0x3)?, RegSet::REGS | RegSet::SREGS);
    /// let bad = RegSet::from_bits(0x9).unwrap_err();
    /// assert_eq!(bad.unknown, 0x8);
    /// # Ok::<(), sync_regs::UnknownBits>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`UnknownBits`] when `bits` has a bit outside `KVM_SYNC_X86_VALID_FIELDS`.
    pub fn from_bits(bits: u64) -> Result<RegSet, UnknownBits> {
        let unknown = bits & !sys::KVM_SYNC_X86_VALID_FIELDS;
        if unknown != 0 {
            return Err(UnknownBits { bits, unknown });
        }
        Ok(RegSet::from_bits_truncate(bits))
    }

    /// The known sets of a raw mask, ignoring the other bits (for capability values, where a
    /// newer kernel may offer sets this crate does not know).
    pub const fn from_bits_truncate(bits: u64) -> RegSet {
        RegSet((bits & sys::KVM_SYNC_X86_VALID_FIELDS) as u8)
    }

    /// The raw `KVM_SYNC_X86_*` mask.
    pub const fn bits(self) -> u64 {
        self.0 as u64
    }

    /// The set holding only `kind`.
    pub const fn of(kind: RegKind) -> RegSet {
        RegSet(kind.bit() as u8)
    }

    /// Whether `kind` is in the set.
    pub const fn contains(self, kind: RegKind) -> bool {
        self.0 as u64 & kind.bit() != 0
    }

    /// Whether every set of `other` is in this one.
    pub const fn contains_all(self, other: RegSet) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The sets in either.
    #[must_use]
    pub const fn union(self, other: RegSet) -> RegSet {
        RegSet(self.0 | other.0)
    }

    /// The sets in both.
    #[must_use]
    pub const fn intersection(self, other: RegSet) -> RegSet {
        RegSet(self.0 & other.0)
    }

    /// The sets of this one that are not in `other`.
    #[must_use]
    pub const fn difference(self, other: RegSet) -> RegSet {
        RegSet(self.0 & !other.0)
    }

    /// This set with `kind` added.
    #[must_use]
    pub const fn with(self, kind: RegKind) -> RegSet {
        RegSet(self.0 | kind.bit() as u8)
    }

    /// This set with `kind` removed.
    #[must_use]
    pub const fn without(self, kind: RegKind) -> RegSet {
        RegSet(self.0 & !(kind.bit() as u8))
    }

    /// The kinds in the set, in the kernel's apply order.
    pub fn iter(self) -> impl Iterator<Item = RegKind> {
        RegKind::ALL.into_iter().filter(move |k| self.contains(*k))
    }
}

impl From<RegKind> for RegSet {
    fn from(kind: RegKind) -> Self {
        RegSet::of(kind)
    }
}

impl std::ops::BitOr for RegSet {
    type Output = RegSet;
    fn bitor(self, rhs: RegSet) -> RegSet {
        self.union(rhs)
    }
}

impl fmt::Display for RegSet {
    /// `regs|sregs`, or `none` for the empty set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        for (i, kind) in self.iter().enumerate() {
            if i > 0 {
                f.write_str("|")?;
            }
            f.write_str(kind.name())?;
        }
        Ok(())
    }
}

impl fmt::Debug for RegSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegSet({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_and_display() {
        assert_eq!(RegSet::EMPTY.to_string(), "none");
        assert_eq!(RegSet::ALL.to_string(), "regs|sregs|events");
        assert_eq!((RegSet::REGS | RegSet::EVENTS).to_string(), "regs|events");
        assert_eq!(format!("{:?}", RegSet::SREGS), "RegSet(sregs)");
        assert_eq!(RegKind::Events.to_string(), "events");
    }

    #[test]
    fn unknown_bits_are_refused_with_the_offending_bits() {
        let err = RegSet::from_bits(0x9).unwrap_err();
        assert_eq!(
            err,
            UnknownBits {
                bits: 0x9,
                unknown: 0x8
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("0x8") && msg.contains("EINVAL"), "{msg}");
        assert_eq!(RegSet::from_bits_truncate(0xff), RegSet::ALL);
    }

    #[test]
    fn kinds_map_to_kvm_ioctls_sync_regs() {
        for kind in RegKind::ALL {
            assert_eq!(kind.sync_reg() as u64, kind.bit());
            assert_eq!(RegSet::from(kind).bits(), kind.bit());
        }
    }

    proptest! {
        #[test]
        fn from_bits_accepts_exactly_the_valid_fields(bits in any::<u64>()) {
            let parsed = RegSet::from_bits(bits);
            prop_assert_eq!(parsed.is_ok(), bits & !sys::KVM_SYNC_X86_VALID_FIELDS == 0);
            if let Ok(set) = parsed {
                prop_assert_eq!(set.bits(), bits);
            }
        }

        #[test]
        fn set_algebra_matches_bit_algebra(a in 0u64..8, b in 0u64..8) {
            let (x, y) = (RegSet::from_bits_truncate(a), RegSet::from_bits_truncate(b));
            prop_assert_eq!(x.union(y).bits(), a | b);
            prop_assert_eq!(x.intersection(y).bits(), a & b);
            prop_assert_eq!(x.difference(y).bits(), a & !b);
            prop_assert_eq!(x.contains_all(y), a & b == b);
            let rebuilt = x.iter().fold(RegSet::EMPTY, RegSet::with);
            prop_assert_eq!(rebuilt, x);
            for kind in RegKind::ALL {
                prop_assert!(!x.without(kind).contains(kind));
                prop_assert!(x.with(kind).contains(kind));
            }
        }
    }
}
