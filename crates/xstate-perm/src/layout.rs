//! The XSAVE area layout, read from CPUID leaf 0xD (Intel SDM vol. 1, 13.2 and 13.4).
//!
//! * Subleaf 0: EDX:EAX are the XCR0 bits the CPU supports; ECX is the standard-format size
//!   of all of them.
//! * Subleaf 1: EAX bit 1 says XSAVEC (compacted format) exists; EDX:ECX are the IA32_XSS
//!   bits.
//! * Subleaf `n >= 2`: EAX is component `n`'s size, EBX its offset in the standard format
//!   (0 for supervisor components, which only exist in the compacted format), ECX bit 0
//!   marks a supervisor component and ECX bit 1 one that is 64-byte aligned when compacted.
//!
//! Components 0 (x87) and 1 (SSE) live in the 512-byte legacy region at fixed offsets; a
//! 64-byte header follows it, so extended components start at byte 576.
//!
//! The leaf is read from the host CPU ([`XsaveLayout::host`]) or from what KVM reports
//! ([`XsaveLayout::from_kvm_cpuid`]); the second is what a guest sees and is the one to size
//! guest buffers with. Both are validated: a component that does not fit the area its
//! subleaf 0 announces is an error, never a panic or an overflow.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use crate::sys;
use crate::xfeature::XFeatureSet;

/// Errors from reading or using an XSAVE layout.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CPU has no XSAVE, or its maximum basic leaf is below 0xD.
    #[error("CPUID leaf 0xD is not available (no XSAVE)")]
    NoXsaveLeaf,
    /// A component announced in subleaf 0 or 1 has no size in its own subleaf.
    #[error("CPUID leaf 0xD announces component {component} but subleaf {component} is empty")]
    ComponentNotEnumerated {
        /// The component number.
        component: u32,
    },
    /// A user component's offset and size do not fit the standard-format size.
    #[error(
        "component {component} at offset {offset} with size {size} does not fit the \
         {area}-byte XSAVE area"
    )]
    ComponentOutsideArea {
        /// The component number.
        component: u32,
        /// Its standard-format offset.
        offset: u32,
        /// Its size.
        size: u32,
        /// Subleaf 0 ECX: the area size for all supported features.
        area: u32,
    },
    /// The components' sizes add up to more than 4 GiB.
    #[error("the XSAVE components add up to {bytes} bytes")]
    AreaTooLarge {
        /// The worst-case compacted size.
        bytes: u64,
    },
    /// A set asks about components this layout does not hold.
    #[error("components {missing} are not in this XSAVE layout")]
    NotInLayout {
        /// The components without a layout.
        missing: XFeatureSet,
    },
    /// `KVM_CAP_XSAVE2` disagrees with the size computed for the guest's features.
    #[error("KVM_CAP_XSAVE2 is {reported}, the layout gives {expected} bytes for {features}")]
    Xsave2SizeMismatch {
        /// What KVM returned.
        reported: i32,
        /// What the layout gives.
        expected: usize,
        /// The set the size was computed for.
        features: XFeatureSet,
    },
    /// Rebuilding the CPUID entry list failed.
    #[error("building the guest CPUID failed")]
    BuildCpuid(#[source] vmm_sys_util::fam::Error),
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Where one component lives in an XSAVE area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComponentLayout {
    /// Size in bytes.
    pub size: u32,
    /// Offset in the standard (non-compacted) format; 0 for supervisor components.
    pub offset: u32,
    /// Aligned to 64 bytes in the compacted format (CPUID.(0xD, n).ECX bit 1).
    pub align_64: bool,
    /// A supervisor (IA32_XSS) component (CPUID.(0xD, n).ECX bit 0).
    pub supervisor: bool,
}

/// The register values of one CPUID subleaf: EAX, EBX, ECX, EDX.
pub type CpuidRegs = [u32; 4];

const EAX: usize = 0;
const EBX: usize = 1;
const ECX: usize = 2;
const EDX: usize = 3;
/// Where the first extended component may start: legacy region plus header.
const EXTENDED_START: u32 = sys::XSAVE_LEGACY_REGION + sys::XSAVE_HEADER_SIZE;

/// The sizes and offsets of the XSAVE components one CPU (or one guest CPUID) enumerates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XsaveLayout {
    xcr0: XFeatureSet,
    xss: XFeatureSet,
    max_standard_size: u32,
    compacted_supported: bool,
    components: [Option<ComponentLayout>; 64],
}

impl XsaveLayout {
    /// Parses leaf 0xD from `subleaf`, which returns the registers of a subleaf or `None`
    /// where the source has no such subleaf.
    ///
    /// ```
    /// use xstate_perm::XsaveLayout;
    ///
    /// // x87, SSE and AVX (256 bytes at offset 576); 832 bytes in the standard format.
    /// let layout = XsaveLayout::from_subleaves(|n| match n {
    ///     0 => Some([0b111, 832, 832, 0]),
    ///     2 => Some([256, 576, 0, 0]),
    ///     _ => None,
    /// })
    /// .unwrap();
    /// assert_eq!(layout.xcr0_supported().to_string(), "x87|sse|avx");
    /// assert_eq!(layout.component(2).unwrap().offset, 576);
    /// assert_eq!(layout.xsave2_size(layout.xcr0_supported()).unwrap(), 4096);
    /// // A component that does not fit the area subleaf 0 announces is an error.
    /// assert!(XsaveLayout::from_subleaves(|n| match n {
    ///     0 => Some([0b111, 832, 800, 0]),
    ///     2 => Some([256, 576, 0, 0]),
    ///     _ => None,
    /// })
    /// .is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::NoXsaveLeaf`] without subleaf 0; [`Error::ComponentNotEnumerated`] for an
    /// announced component without a size; [`Error::ComponentOutsideArea`] for a user
    /// component outside the standard-format area; [`Error::AreaTooLarge`] where the sizes
    /// add up past 4 GiB.
    pub fn from_subleaves(mut subleaf: impl FnMut(u32) -> Option<CpuidRegs>) -> Result<Self> {
        let main = subleaf(0).ok_or(Error::NoXsaveLeaf)?;
        let xcr0 = XFeatureSet::from_bits(u64::from(main[EAX]) | (u64::from(main[EDX]) << 32));
        let max_standard_size = main[ECX];
        let (xss, compacted_supported) = match subleaf(1) {
            Some(regs) => (
                XFeatureSet::from_bits(u64::from(regs[ECX]) | (u64::from(regs[EDX]) << 32)),
                regs[EAX] & (1 << 1) != 0,
            ),
            None => (XFeatureSet::EMPTY, false),
        };

        let mut components = [None; 64];
        components[0] = Some(legacy(sys::XSAVE_X87));
        components[1] = Some(legacy(sys::XSAVE_SSE));
        for component in xcr0.union(xss).indices().filter(|&i| i >= 2) {
            let regs = subleaf(component)
                .filter(|r| r[EAX] != 0)
                .ok_or(Error::ComponentNotEnumerated { component })?;
            let layout = ComponentLayout {
                size: regs[EAX],
                offset: regs[EBX],
                align_64: regs[ECX] & (1 << 1) != 0,
                supervisor: regs[ECX] & 1 != 0,
            };
            if !layout.supervisor {
                let fits = layout.offset >= EXTENDED_START
                    && layout
                        .offset
                        .checked_add(layout.size)
                        .is_some_and(|end| end <= max_standard_size);
                if !fits {
                    return Err(Error::ComponentOutsideArea {
                        component,
                        offset: layout.offset,
                        size: layout.size,
                        area: max_standard_size,
                    });
                }
            }
            components[component as usize] = Some(layout);
        }
        // Every compacted area is at most the sum of all sizes plus 63 bytes of padding per
        // component; bounding that here keeps the u32 arithmetic below overflow-free.
        let worst_compacted: u64 = components
            .iter()
            .flatten()
            .map(|c: &ComponentLayout| u64::from(c.size) + 63)
            .sum::<u64>()
            + u64::from(EXTENDED_START);
        if worst_compacted > u64::from(u32::MAX) {
            return Err(Error::AreaTooLarge {
                bytes: worst_compacted,
            });
        }
        Ok(XsaveLayout {
            xcr0,
            xss,
            max_standard_size,
            compacted_supported,
            components,
        })
    }

    /// The layout of the CPU this code runs on (`CPUID` instruction).
    ///
    /// # Errors
    ///
    /// [`Error::NoXsaveLeaf`] on a CPU without XSAVE; otherwise as [`Self::from_subleaves`].
    pub fn host() -> Result<Self> {
        use core::arch::x86_64::__cpuid_count;
        // CPUID.1:ECX bit 26 is XSAVE; leaf 0 EAX is the maximum basic leaf.
        let max_leaf = __cpuid_count(0, 0).eax;
        let has_xsave =
            max_leaf >= sys::CPUID_LEAF_XSTATE && __cpuid_count(1, 0).ecx & (1 << 26) != 0;
        if !has_xsave {
            return Err(Error::NoXsaveLeaf);
        }
        Self::from_subleaves(|n| {
            let r = __cpuid_count(sys::CPUID_LEAF_XSTATE, n);
            Some([r.eax, r.ebx, r.ecx, r.edx])
        })
    }

    /// The layout in a CPUID table from KVM (`KVM_GET_SUPPORTED_CPUID`, `KVM_GET_CPUID2`) or
    /// one built for a guest.
    ///
    /// # Errors
    ///
    /// As [`Self::from_subleaves`]; [`Error::NoXsaveLeaf`] where the table has no leaf 0xD.
    pub fn from_kvm_cpuid(cpuid: &CpuId) -> Result<Self> {
        Self::from_cpuid_entries(cpuid.as_slice())
    }

    /// The layout in a list of CPUID entries.
    ///
    /// # Errors
    ///
    /// As [`Self::from_kvm_cpuid`].
    pub fn from_cpuid_entries(entries: &[kvm_cpuid_entry2]) -> Result<Self> {
        Self::from_subleaves(|n| {
            entries
                .iter()
                .find(|e| e.function == sys::CPUID_LEAF_XSTATE && e.index == n)
                .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
        })
    }

    /// The XCR0 (user) components the CPUID enumerates.
    pub fn xcr0_supported(&self) -> XFeatureSet {
        self.xcr0
    }

    /// The IA32_XSS (supervisor) components the CPUID enumerates.
    pub fn xss_supported(&self) -> XFeatureSet {
        self.xss
    }

    /// Subleaf 0 ECX: the standard-format size for every supported XCR0 component.
    pub fn max_standard_size(&self) -> u32 {
        self.max_standard_size
    }

    /// Whether the compacted format (XSAVEC) exists.
    pub fn compacted_supported(&self) -> bool {
        self.compacted_supported
    }

    /// The layout of component `index`, if enumerated.
    pub fn component(&self, index: u32) -> Option<ComponentLayout> {
        self.components.get(index as usize).copied().flatten()
    }

    /// The components with a layout.
    pub fn enumerated(&self) -> XFeatureSet {
        XFeatureSet::from_bits(
            (0u32..64)
                .filter(|&i| self.components[i as usize].is_some())
                .fold(0, |m, i| m | (1 << i)),
        )
    }

    fn check_known(&self, set: XFeatureSet) -> Result<()> {
        let missing = set.difference(self.enumerated());
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::NotInLayout { missing })
        }
    }

    /// The standard-format size of an area holding `set`: the end of its last user
    /// component, at least the legacy region and header (576 bytes). Supervisor components
    /// have no standard-format place and are ignored.
    ///
    /// # Errors
    ///
    /// [`Error::NotInLayout`] where `set` holds components this layout lacks.
    pub fn standard_size(&self, set: XFeatureSet) -> Result<u32> {
        self.check_known(set)?;
        let end = set
            .indices()
            .filter_map(|i| self.component(i))
            .filter(|c| !c.supervisor)
            .map(|c| c.offset + c.size)
            .max()
            .unwrap_or(0);
        Ok(end.max(EXTENDED_START))
    }

    /// The offset of each extended component (`n >= 2`) of `set` in the compacted format:
    /// in ascending component order from byte 576, each rounded up to 64 bytes where its
    /// alignment bit is set (SDM vol. 1, 13.4.3).
    ///
    /// # Errors
    ///
    /// [`Error::NotInLayout`] where `set` holds components this layout lacks.
    pub fn compacted_offsets(&self, set: XFeatureSet) -> Result<Vec<(u32, u32)>> {
        self.check_known(set)?;
        let mut offsets = Vec::new();
        let mut next = EXTENDED_START;
        for index in set.indices().filter(|&i| i >= 2) {
            // check_known guarantees every member has a layout.
            let Some(component) = self.component(index) else {
                continue;
            };
            if component.align_64 {
                next = next.next_multiple_of(64);
            }
            offsets.push((index, next));
            next += component.size;
        }
        Ok(offsets)
    }

    /// The compacted-format size of an area holding `set` (what XSAVEC/XSAVES write, and
    /// what the kernel allocates for a guest FPU).
    ///
    /// # Errors
    ///
    /// [`Error::NotInLayout`] where `set` holds components this layout lacks.
    pub fn compacted_size(&self, set: XFeatureSet) -> Result<u32> {
        let offsets = self.compacted_offsets(set)?;
        Ok(match offsets.last() {
            Some(&(index, offset)) => {
                offset + self.component(index).map_or(0, |component| component.size)
            }
            None => EXTENDED_START,
        })
    }

    /// The buffer size `KVM_GET_XSAVE2` needs for guests allowed `guest_features`: the
    /// standard-format size, at least `sizeof(struct kvm_xsave)` (4096), as KVM computes
    /// `KVM_CAP_XSAVE2` (5.17).
    ///
    /// # Errors
    ///
    /// [`Error::NotInLayout`] where `guest_features` holds components this layout lacks.
    pub fn xsave2_size(&self, guest_features: XFeatureSet) -> Result<usize> {
        let size = self.standard_size(guest_features)? as usize;
        Ok(size.max(sys::KVM_XSAVE_LEGACY_SIZE))
    }

    /// Checks the `KVM_CAP_XSAVE2` value `reported` against [`Self::xsave2_size`] and returns
    /// the size.
    ///
    /// # Errors
    ///
    /// [`Error::Xsave2SizeMismatch`] where the two differ; [`Error::NotInLayout`] as
    /// [`Self::xsave2_size`].
    pub fn check_xsave2(&self, reported: i32, guest_features: XFeatureSet) -> Result<usize> {
        let expected = self.xsave2_size(guest_features)?;
        if usize::try_from(reported).ok() == Some(expected) {
            Ok(expected)
        } else {
            Err(Error::Xsave2SizeMismatch {
                reported,
                expected,
                features: guest_features,
            })
        }
    }
}

fn legacy((offset, size): (u32, u32)) -> ComponentLayout {
    ComponentLayout {
        size,
        offset,
        align_64: false,
        supervisor: false,
    }
}

/// `supported` (from `KVM_GET_SUPPORTED_CPUID`, or a table a VMM built) with every
/// advertisement of an XCR0 component outside `allowed` cleared: leaf 0xD, the AMX flags of
/// leaf 7, leaves 0x1D and 0x1E, and the APX flag; see [`crate::cpuid::restrict`] for the
/// rules.
///
/// KVM's own leaf 0xD already reflects the process's guest permission when it was read
/// after the request (5.17), but its leaf 7 and leaves 0x1D/0x1E do not; this also serves
/// tables read earlier and VMMs that offer guests less than they are permitted.
///
/// # Errors
///
/// [`Error`] where leaf 0xD is missing or malformed, or the table cannot be rebuilt.
pub fn guest_cpuid(supported: &CpuId, allowed: XFeatureSet) -> Result<CpuId> {
    let entries = crate::cpuid::restrict(supported.as_slice(), allowed)?;
    crate::cpuid::to_cpuid(&entries)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::xfeature::XFeature;
    use proptest::prelude::*;

    /// Leaf 0xD of a Sapphire Rapids-like CPU with AMX: the sizes and offsets the SDM gives.
    pub(crate) fn spr_subleaves(n: u32) -> Option<CpuidRegs> {
        Some(match n {
            0 => [0x602e7, 0xa88, 0x2b00, 0],
            1 => [0x1f, 0x2b00, 0x1800, 0], // XSAVEOPT|XSAVEC|XGETBV1|XSAVES|XFD; XSS: CET_U|CET_S
            2 => [256, 576, 0, 0],
            5 => [64, 1088, 0, 0],
            6 => [512, 1152, 0, 0],
            7 => [1024, 1664, 0, 0],
            9 => [8, 2688, 0, 0],
            11 => [16, 0, 1, 0],
            12 => [24, 0, 1, 0],
            17 => [64, 2752, 2, 0],
            18 => [8192, 2816, 6, 0],
            _ => [0; 4],
        })
    }

    pub(crate) fn spr() -> XsaveLayout {
        XsaveLayout::from_subleaves(spr_subleaves).unwrap()
    }

    fn set(bits: u64) -> XFeatureSet {
        XFeatureSet::from_bits(bits)
    }

    #[test]
    fn parses_sizes_offsets_and_flags() {
        let l = spr();
        assert_eq!(l.xcr0_supported(), set(0x602e7));
        assert_eq!(l.xss_supported(), set(0x1800));
        assert!(l.compacted_supported());
        assert_eq!(l.max_standard_size(), 0x2b00);
        assert_eq!(
            l.component(18),
            Some(ComponentLayout {
                size: 8192,
                offset: 2816,
                align_64: true,
                supervisor: false
            })
        );
        assert!(l.component(12).unwrap().supervisor);
        assert_eq!(l.component(3), None);
        assert_eq!(l.component(200), None);
        assert_eq!(l.component(0).unwrap().size, 160);
        assert_eq!(l.component(1).unwrap().offset, 160);
    }

    #[test]
    fn standard_sizes() {
        let l = spr();
        // x87..avx512 + pkru, as KVM exposes on this project's build machine.
        assert_eq!(l.standard_size(set(0x2e7)).unwrap(), 2696);
        assert_eq!(l.standard_size(set(0x602e7)).unwrap(), 11008);
        assert_eq!(
            l.standard_size(set(0x602e7)).unwrap(),
            l.max_standard_size()
        );
        assert_eq!(l.standard_size(XFeatureSet::LEGACY).unwrap(), 576);
        // Supervisor components have no standard-format place.
        assert_eq!(l.standard_size(set(0x1803)).unwrap(), 576);
        assert!(matches!(
            l.standard_size(set(1 << 3)),
            Err(Error::NotInLayout { missing }) if missing == set(1 << 3)
        ));
    }

    #[test]
    fn compacted_offsets_pack_and_align() {
        let l = spr();
        let offsets = l.compacted_offsets(set(0x60007)).unwrap();
        // avx at 576 (256 bytes) → 832; tilecfg aligned to 832 (already); tiledata aligned
        // from 896 to 896.
        assert_eq!(offsets, vec![(2, 576), (17, 832), (18, 896)]);
        assert_eq!(l.compacted_size(set(0x60007)).unwrap(), 896 + 8192);
        // pkru (8 bytes, unaligned) then tilecfg: 576+8=584 rounds up to 640.
        let offsets = l.compacted_offsets(set(0x20203)).unwrap();
        assert_eq!(offsets, vec![(9, 576), (17, 640)]);
        assert_eq!(l.compacted_size(XFeatureSet::LEGACY).unwrap(), 576);
        assert_eq!(l.compacted_size(set(0x1803)).unwrap(), 576 + 16 + 24);
    }

    #[test]
    fn xsave2_size_has_the_kvm_floor_and_mismatches_are_errors() {
        let l = spr();
        assert_eq!(l.xsave2_size(set(0x2e7)).unwrap(), 4096);
        assert_eq!(l.xsave2_size(set(0x602e7)).unwrap(), 11008);
        assert_eq!(l.check_xsave2(4096, set(0x2e7)).unwrap(), 4096);
        let err = l.check_xsave2(4096, set(0x602e7)).unwrap_err();
        assert!(matches!(
            err,
            Error::Xsave2SizeMismatch {
                reported: 4096,
                expected: 11008,
                ..
            }
        ));
        assert!(l.check_xsave2(-22, set(0x2e7)).is_err());
    }

    #[test]
    fn rejects_missing_and_malformed_subleaves() {
        assert!(matches!(
            XsaveLayout::from_subleaves(|_| None),
            Err(Error::NoXsaveLeaf)
        ));
        let no_tiledata = |n| {
            if n == 18 {
                Some([0; 4])
            } else {
                spr_subleaves(n)
            }
        };
        assert!(matches!(
            XsaveLayout::from_subleaves(no_tiledata),
            Err(Error::ComponentNotEnumerated { component: 18 })
        ));
        let overflow = |n| {
            if n == 18 {
                Some([u32::MAX, 2816, 0, 0])
            } else {
                spr_subleaves(n)
            }
        };
        assert!(matches!(
            XsaveLayout::from_subleaves(overflow),
            Err(Error::ComponentOutsideArea { component: 18, .. })
        ));
        let inside_header = |n| {
            if n == 2 {
                Some([256, 512, 0, 0])
            } else {
                spr_subleaves(n)
            }
        };
        assert!(XsaveLayout::from_subleaves(inside_header).is_err());
        // Without subleaf 1: no XSS, no compacted format.
        let only_xcr0 = |n| if n == 1 { None } else { spr_subleaves(n) };
        let l = XsaveLayout::from_subleaves(only_xcr0).unwrap();
        assert_eq!(l.xss_supported(), XFeatureSet::EMPTY);
        assert!(!l.compacted_supported());
    }

    pub(crate) fn spr_cpuid() -> CpuId {
        let mut entries: Vec<kvm_cpuid_entry2> = (0..19)
            .filter_map(|n| {
                let r = spr_subleaves(n)?;
                (n < 2 || r[EAX] != 0).then_some(kvm_cpuid_entry2 {
                    function: 0xd,
                    index: n,
                    flags: 1,
                    eax: r[0],
                    ebx: r[1],
                    ecx: r[2],
                    edx: r[3],
                    ..Default::default()
                })
            })
            .collect();
        entries.push(kvm_cpuid_entry2 {
            function: 1,
            eax: 0x806f8,
            ..Default::default()
        });
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn kvm_cpuid_parses_like_the_subleaves() {
        let l = XsaveLayout::from_kvm_cpuid(&spr_cpuid()).unwrap();
        assert_eq!(l, spr());
    }

    #[test]
    fn guest_cpuid_drops_unpermitted_dynamic_components() {
        let cpuid = spr_cpuid();
        let guest = guest_cpuid(&cpuid, set(0x2e7)).unwrap();
        let find = |i| {
            guest
                .as_slice()
                .iter()
                .find(|e| e.function == 0xd && e.index == i)
                .copied()
        };
        let sub0 = find(0).unwrap();
        assert_eq!(
            (sub0.eax, sub0.edx, sub0.ebx, sub0.ecx),
            (0x2e7, 0, 2696, 2696)
        );
        assert_eq!(find(1).unwrap().ecx, 0x1800);
        assert!(find(17).is_none() && find(18).is_none());
        assert!(find(9).is_some() && find(11).is_some());
        assert!(guest.as_slice().iter().any(|e| e.function == 1));
        let layout = XsaveLayout::from_kvm_cpuid(&guest).unwrap();
        assert_eq!(layout.xcr0_supported(), set(0x2e7));

        let all = guest_cpuid(&cpuid, set(0x602e7)).unwrap();
        assert_eq!(all.as_slice().len(), cpuid.as_slice().len());
        let sub0 = all
            .as_slice()
            .iter()
            .find(|e| e.function == 0xd && e.index == 0)
            .unwrap();
        assert_eq!(sub0.ebx, 11008);
        // x87 and SSE are never dropped.
        let legacy = guest_cpuid(&cpuid, XFeatureSet::EMPTY).unwrap();
        let layout = XsaveLayout::from_kvm_cpuid(&legacy).unwrap();
        assert_eq!(layout.xcr0_supported(), XFeatureSet::LEGACY);
        assert!(XsaveLayout::from_kvm_cpuid(&CpuId::new(0).unwrap()).is_err());
    }

    /// A random but well-formed layout: user components packed in ascending order the way
    /// the standard format places them, with random sizes and alignment bits.
    fn arb_layout() -> impl Strategy<Value = XsaveLayout> {
        proptest::collection::vec((any::<bool>(), 1u32..4096, any::<bool>()), 62).prop_map(|spec| {
            let mut regs = vec![[0u32; 4]; 64];
            let mut xcr0 = 0b11u64;
            let mut next = EXTENDED_START;
            for (i, (present, size, align)) in spec.into_iter().enumerate() {
                let n = i + 2;
                if present {
                    if align {
                        next = next.next_multiple_of(64);
                    }
                    regs[n] = [size, next, u32::from(align) << 1, 0];
                    next += size;
                    xcr0 |= 1 << n;
                }
            }
            regs[0] = [xcr0 as u32, next, next, (xcr0 >> 32) as u32];
            regs[1] = [0b10, 0, 0, 0];
            XsaveLayout::from_subleaves(|n| regs.get(n as usize).copied()).unwrap()
        })
    }

    proptest! {
        #[test]
        fn compacted_layout_is_packed_aligned_and_disjoint(l in arb_layout(), mask in any::<u64>()) {
            let s = l.xcr0_supported().intersection(set(mask));
            let offsets = l.compacted_offsets(s).unwrap();
            let mut end = EXTENDED_START;
            for &(i, off) in &offsets {
                let c = l.component(i).unwrap();
                prop_assert!(off >= end, "component {} overlaps", i);
                prop_assert!(off - end < 64, "gap before {} too large", i);
                if c.align_64 {
                    prop_assert_eq!(off % 64, 0);
                } else {
                    prop_assert_eq!(off, end);
                }
                end = off + c.size;
            }
            prop_assert_eq!(l.compacted_size(s).unwrap(), end);
            // Compacting never needs more room than the standard format.
            prop_assert!(l.compacted_size(s).unwrap() <= l.standard_size(s).unwrap());
        }

        #[test]
        fn sizes_grow_with_the_set(l in arb_layout(), a in any::<u64>(), b in any::<u64>()) {
            let small = l.xcr0_supported().intersection(set(a));
            let big = small.union(l.xcr0_supported().intersection(set(b)));
            prop_assert!(l.standard_size(small).unwrap() <= l.standard_size(big).unwrap());
            prop_assert!(l.compacted_size(small).unwrap() <= l.compacted_size(big).unwrap());
            prop_assert!(l.standard_size(big).unwrap() <= l.max_standard_size().max(576));
            prop_assert!(l.xsave2_size(small).unwrap() >= 4096);
        }

        #[test]
        fn parsing_arbitrary_subleaves_never_panics(regs in proptest::collection::vec(any::<[u32; 4]>(), 64)) {
            if let Ok(l) = XsaveLayout::from_subleaves(|n| regs.get(n as usize).copied()) {
                let all = l.enumerated();
                let _ = l.standard_size(all).unwrap();
                let _ = l.compacted_size(all);
                prop_assert!(all.contains(XFeature::X87));
            }
        }
    }
}
