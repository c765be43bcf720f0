//! XSAVE state components (xfeatures) and sets of them.
//!
//! Component numbers are the bit positions in XCR0 and IA32_XSS (Intel SDM vol. 1, 13.1;
//! the kernel's `enum xfeature` in arch/x86/include/asm/fpu/types.h).

use std::fmt;

/// One XSAVE state component, by its XCR0/IA32_XSS bit number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum XFeature {
    /// x87 FPU state (XCR0 bit 0), always enabled.
    X87 = 0,
    /// SSE state: XMM registers and MXCSR (bit 1).
    Sse = 1,
    /// AVX: upper halves of YMM0-15 (bit 2).
    Avx = 2,
    /// MPX bound registers (bit 3).
    BndRegs = 3,
    /// MPX configuration and status (bit 4).
    BndCsr = 4,
    /// AVX-512 opmask registers k0-k7 (bit 5).
    Opmask = 5,
    /// AVX-512 upper halves of ZMM0-15 (bit 6).
    ZmmHi256 = 6,
    /// AVX-512 ZMM16-31 (bit 7).
    Hi16Zmm = 7,
    /// Processor Trace, a supervisor component (IA32_XSS bit 8).
    Pt = 8,
    /// Protection-key rights register PKRU (bit 9).
    Pkru = 9,
    /// ENQCMD PASID state, supervisor (bit 10).
    Pasid = 10,
    /// CET user-mode state, supervisor (bit 11).
    CetU = 11,
    /// CET supervisor-mode state, supervisor (bit 12).
    CetS = 12,
    /// Hardware duty cycling, supervisor (bit 13).
    Hdc = 13,
    /// User interrupts, supervisor (bit 14).
    Uintr = 14,
    /// Architectural LBRs, supervisor (bit 15).
    Lbr = 15,
    /// Hardware P-states, supervisor (bit 16).
    Hwp = 16,
    /// AMX tile configuration, 64 bytes (bit 17).
    XtileCfg = 17,
    /// AMX tile data, 8 KiB: the first dynamic component, gated by a permission since 5.16
    /// (bit 18).
    XtileData = 18,
    /// APX extended general-purpose registers R16-R31 (bit 19).
    Apx = 19,
}

impl XFeature {
    /// Every named component, in bit order.
    pub const ALL: [XFeature; 20] = [
        XFeature::X87,
        XFeature::Sse,
        XFeature::Avx,
        XFeature::BndRegs,
        XFeature::BndCsr,
        XFeature::Opmask,
        XFeature::ZmmHi256,
        XFeature::Hi16Zmm,
        XFeature::Pt,
        XFeature::Pkru,
        XFeature::Pasid,
        XFeature::CetU,
        XFeature::CetS,
        XFeature::Hdc,
        XFeature::Uintr,
        XFeature::Lbr,
        XFeature::Hwp,
        XFeature::XtileCfg,
        XFeature::XtileData,
        XFeature::Apx,
    ];

    /// The component with bit number `index`, if this crate names it.
    pub fn from_index(index: u32) -> Option<XFeature> {
        XFeature::ALL.get(usize::try_from(index).ok()?).copied()
    }

    /// The component's bit number.
    pub fn index(self) -> u32 {
        self as u32
    }

    /// The component's bit in XCR0 or IA32_XSS.
    pub fn mask(self) -> u64 {
        1 << (self as u32)
    }

    /// A short lower-case name, as printed by [`XFeatureSet`]'s `Display`.
    pub fn name(self) -> &'static str {
        match self {
            XFeature::X87 => "x87",
            XFeature::Sse => "sse",
            XFeature::Avx => "avx",
            XFeature::BndRegs => "bndregs",
            XFeature::BndCsr => "bndcsr",
            XFeature::Opmask => "opmask",
            XFeature::ZmmHi256 => "zmm_hi256",
            XFeature::Hi16Zmm => "hi16_zmm",
            XFeature::Pt => "pt",
            XFeature::Pkru => "pkru",
            XFeature::Pasid => "pasid",
            XFeature::CetU => "cet_u",
            XFeature::CetS => "cet_s",
            XFeature::Hdc => "hdc",
            XFeature::Uintr => "uintr",
            XFeature::Lbr => "lbr",
            XFeature::Hwp => "hwp",
            XFeature::XtileCfg => "xtilecfg",
            XFeature::XtileData => "xtiledata",
            XFeature::Apx => "apx",
        }
    }
}

impl fmt::Display for XFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of XSAVE components: a 64-bit mask in the layout of XCR0/IA32_XSS.
///
/// Bits this crate does not name are kept (a newer CPU or kernel may report them) and are
/// printed as `bitN`.
///
/// ```
/// use xstate_perm::{XFeature, XFeatureSet};
///
/// let set: XFeatureSet = [XFeature::X87, XFeature::Sse, XFeature::Avx].into_iter().collect();
/// assert_eq!(set.bits(), 0b111);
/// assert_eq!(set.union(XFeatureSet::from_bits(1 << 40)).to_string(), "x87|sse|avx|bit40");
/// assert_eq!(set.difference(XFeatureSet::LEGACY).features().collect::<Vec<_>>(), [XFeature::Avx]);
/// assert_eq!(XFeatureSet::AMX.highest(), Some(18));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct XFeatureSet(u64);

impl XFeatureSet {
    /// No component.
    pub const EMPTY: XFeatureSet = XFeatureSet(0);
    /// x87 and SSE: the legacy region every XSAVE area starts with.
    pub const LEGACY: XFeatureSet = XFeatureSet(0b11);
    /// The components whose state buffers the kernel allocates only after a permission
    /// request: the kernel's `XFEATURE_MASK_USER_DYNAMIC`, which is tile data alone (5.16).
    pub const DYNAMIC: XFeatureSet = XFeatureSet(1 << 18);
    /// AMX: tile configuration and tile data. KVM drops tile configuration from what it
    /// exposes when tile data is not permitted, so the two count together.
    pub const AMX: XFeatureSet = XFeatureSet((1 << 17) | (1 << 18));
    /// The components that live in IA32_XSS (supervisor state) rather than XCR0.
    pub const SUPERVISOR: XFeatureSet = XFeatureSet(
        (1 << 8)
            | (1 << 10)
            | (1 << 11)
            | (1 << 12)
            | (1 << 13)
            | (1 << 14)
            | (1 << 15)
            | (1 << 16),
    );
    /// Every component this crate names.
    pub const NAMED: XFeatureSet = XFeatureSet((1 << 20) - 1);

    /// The set with mask `bits`.
    pub const fn from_bits(bits: u64) -> Self {
        XFeatureSet(bits)
    }

    /// The mask.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether `feature` is in the set.
    pub fn contains(self, feature: XFeature) -> bool {
        self.0 & feature.mask() != 0
    }

    /// Whether every member of `other` is in the set.
    pub const fn contains_all(self, other: XFeatureSet) -> bool {
        self.0 & other.0 == other.0
    }

    /// The set with `feature` added.
    pub const fn with(self, feature: XFeature) -> Self {
        XFeatureSet(self.0 | (1 << feature as u32))
    }

    /// Members of either set.
    pub const fn union(self, other: XFeatureSet) -> Self {
        XFeatureSet(self.0 | other.0)
    }

    /// Members of both sets.
    pub const fn intersection(self, other: XFeatureSet) -> Self {
        XFeatureSet(self.0 & other.0)
    }

    /// Members of `self` that are not in `other`.
    pub const fn difference(self, other: XFeatureSet) -> Self {
        XFeatureSet(self.0 & !other.0)
    }

    /// Bits of the set that this crate does not name.
    pub const fn unnamed(self) -> Self {
        self.difference(XFeatureSet::NAMED)
    }

    /// The bit numbers in the set, ascending.
    pub fn indices(self) -> impl Iterator<Item = u32> {
        (0..64).filter(move |i| self.0 & (1 << i) != 0)
    }

    /// The named components in the set, ascending.
    pub fn features(self) -> impl Iterator<Item = XFeature> {
        self.indices().filter_map(XFeature::from_index)
    }

    /// The highest bit number in the set.
    pub fn highest(self) -> Option<u32> {
        if self.0 == 0 {
            None
        } else {
            Some(63 - self.0.leading_zeros())
        }
    }
}

impl From<XFeature> for XFeatureSet {
    fn from(feature: XFeature) -> Self {
        XFeatureSet(feature.mask())
    }
}

impl FromIterator<XFeature> for XFeatureSet {
    fn from_iter<I: IntoIterator<Item = XFeature>>(iter: I) -> Self {
        iter.into_iter()
            .fold(XFeatureSet::EMPTY, |set, feature| set.with(feature))
    }
}

impl fmt::Display for XFeatureSet {
    /// Names joined with `|` in bit order (`x87|sse|avx`), `bitN` for unnamed bits and
    /// `none` for the empty set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        for (n, index) in self.indices().enumerate() {
            if n > 0 {
                f.write_str("|")?;
            }
            match XFeature::from_index(index) {
                Some(feature) => f.write_str(feature.name())?,
                None => write!(f, "bit{index}")?,
            }
        }
        Ok(())
    }
}

impl fmt::LowerHex for XFeatureSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn indices_round_trip_through_the_enum() {
        for (i, feature) in XFeature::ALL.iter().enumerate() {
            assert_eq!(feature.index() as usize, i);
            assert_eq!(XFeature::from_index(i as u32), Some(*feature));
            assert_eq!(feature.to_string(), feature.name());
        }
        assert_eq!(XFeature::from_index(20), None);
        assert_eq!(XFeature::from_index(u32::MAX), None);
    }

    #[test]
    fn display_names_the_members() {
        // What this machine's kernel reports as ARCH_GET_XCOMP_SUPP.
        let set = XFeatureSet::from_bits(0x602e7);
        assert_eq!(
            set.to_string(),
            "x87|sse|avx|opmask|zmm_hi256|hi16_zmm|pkru|xtilecfg|xtiledata"
        );
        assert_eq!(XFeatureSet::EMPTY.to_string(), "none");
        assert_eq!(
            XFeatureSet::from_bits((1 << 63) | 1).to_string(),
            "x87|bit63"
        );
        assert_eq!(format!("{:#x}", set), "0x602e7");
    }

    #[test]
    fn constants_agree_with_the_enum() {
        assert_eq!(
            XFeatureSet::AMX,
            [XFeature::XtileCfg, XFeature::XtileData]
                .into_iter()
                .collect()
        );
        assert_eq!(XFeatureSet::DYNAMIC, XFeature::XtileData.into());
        assert_eq!(
            XFeatureSet::SUPERVISOR.features().collect::<Vec<_>>(),
            vec![
                XFeature::Pt,
                XFeature::Pasid,
                XFeature::CetU,
                XFeature::CetS,
                XFeature::Hdc,
                XFeature::Uintr,
                XFeature::Lbr,
                XFeature::Hwp
            ]
        );
        assert_eq!(XFeatureSet::NAMED.features().count(), XFeature::ALL.len());
        assert_eq!(XFeatureSet::EMPTY.highest(), None);
        assert_eq!(XFeatureSet::from_bits(0x602e7).highest(), Some(18));
    }

    proptest! {
        #[test]
        fn set_algebra_matches_the_mask(a in any::<u64>(), b in any::<u64>()) {
            let (sa, sb) = (XFeatureSet::from_bits(a), XFeatureSet::from_bits(b));
            prop_assert_eq!(sa.union(sb).bits(), a | b);
            prop_assert_eq!(sa.intersection(sb).bits(), a & b);
            prop_assert_eq!(sa.difference(sb).bits(), a & !b);
            prop_assert!(sa.union(sb).contains_all(sa));
            prop_assert_eq!(sa.indices().count() as u32, a.count_ones());
            let rebuilt = sa.indices().fold(0u64, |m, i| m | (1 << i));
            prop_assert_eq!(rebuilt, a);
            prop_assert_eq!(sa.unnamed().union(sa.features().collect()), sa);
            prop_assert_eq!(sa.to_string().split('|').count(), a.count_ones().max(1) as usize);
        }
    }
}
