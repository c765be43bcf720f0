//! What a guest CPUID table advertises in XSTATE terms, what guest permission it needs, and
//! how to limit it to a set of components.
//!
//! KVM ties the guest permission to one place in the CPUID a VMM sets: `kvm_check_cpuid`
//! (arch/x86/kvm/cpuid.c, 5.17) takes the dynamic bits of CPUID.(0xD,0):EDX:EAX and has the
//! FPU code enable them for the vCPU (`fpu_enable_guest_xfd_features` →
//! `__xfd_enable_feature`, arch/x86/kernel/fpu/xstate.c), which fails with `EPERM` unless the
//! process holds the guest permission for each. Everything else that tells a guest an
//! XSTATE feature exists is not checked by KVM: the AMX flags of leaf 7, the tile and TMUL
//! leaves 0x1D and 0x1E, the APX flag, and the per-component subleaves of 0xD. KVM reports
//! the leaf-7 flags and leaves 0x1D/0x1E from the host's capabilities whatever the
//! permission, so a table from `KVM_GET_SUPPORTED_CPUID` can tell a guest that AMX-TILE
//! exists while its XCR0 can never hold tile state.
//!
//! [`advertised`] reads all of these; [`required_permission`] is what a table needs from the
//! guest permission; [`restrict`] clears every one of them outside an allowed set.
//!
//! ```
//! use kvm_bindings::{kvm_cpuid_entry2, CpuId};
//! use xstate_perm::{cpuid, XFeatureSet};
//!
//! // Leaf 7 says AMX-TILE; leaf 0xD.0 enables x87|sse only.
//! let entries = [
//!     kvm_cpuid_entry2 { function: 0xd, index: 0, eax: 0x3, ecx: 576, ebx: 576, ..Default::default() },
//!     kvm_cpuid_entry2 { function: 7, index: 0, edx: 1 << 24, ..Default::default() },
//! ];
//! let table = CpuId::from_entries(&entries).unwrap();
//! assert_eq!(cpuid::advertised(&table), XFeatureSet::LEGACY.union(XFeatureSet::AMX));
//! assert_eq!(cpuid::required_permission(&table), XFeatureSet::AMX);
//! let limited = cpuid::restrict(table.as_slice(), XFeatureSet::LEGACY).unwrap();
//! assert_eq!(cpuid::advertised(&CpuId::from_entries(&limited).unwrap()), XFeatureSet::LEGACY);
//! ```

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use crate::layout::{self, XsaveLayout};
use crate::sys;
use crate::xfeature::{XFeature, XFeatureSet};

fn entry(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

fn any_register(e: &kvm_cpuid_entry2) -> bool {
    e.eax | e.ebx | e.ecx | e.edx != 0
}

/// The XCR0 components CPUID.(0xD,0):EDX:EAX enables; empty where the table has no such
/// entry.
pub fn xcr0_enumerated(entries: &[kvm_cpuid_entry2]) -> XFeatureSet {
    entry(entries, sys::CPUID_LEAF_XSTATE, 0).map_or(XFeatureSet::EMPTY, |e| {
        XFeatureSet::from_bits(u64::from(e.eax) | (u64::from(e.edx) << 32))
    })
}

/// Whether any leaf other than 0xD tells the guest AMX exists: the AMX flags of leaf 7
/// (AMX-BF16, AMX-TILE, AMX-INT8 in subleaf 0; AMX-FP16, AMX-COMPLEX in subleaf 1) or a
/// non-zero register in leaves 0x1D and 0x1E.
fn advertises_amx(entries: &[kvm_cpuid_entry2]) -> bool {
    entries.iter().any(|e| match (e.function, e.index) {
        (sys::CPUID_LEAF_FEATURES, 0) => e.edx & sys::CPUID_7_0_EDX_AMX != 0,
        (sys::CPUID_LEAF_FEATURES, 1) => {
            e.eax & sys::CPUID_7_1_EAX_AMX != 0 || e.edx & sys::CPUID_7_1_EDX_AMX != 0
        }
        (sys::CPUID_LEAF_TILE_INFO | sys::CPUID_LEAF_TMUL_INFO, _) => any_register(e),
        _ => false,
    })
}

fn advertises_apx(entries: &[kvm_cpuid_entry2]) -> bool {
    entry(entries, sys::CPUID_LEAF_FEATURES, 1).is_some_and(|e| e.edx & sys::CPUID_7_1_EDX_APX != 0)
}

/// Every XCR0 component the table tells a guest about: leaf 0xD subleaf 0, the user
/// components that have a subleaf of their own, AMX (tile configuration and data) where a
/// leaf-7 AMX flag or leaf 0x1D/0x1E says so, and APX where leaf 7.1 says so.
pub fn advertised(cpuid: &CpuId) -> XFeatureSet {
    advertised_in(cpuid.as_slice())
}

fn advertised_in(entries: &[kvm_cpuid_entry2]) -> XFeatureSet {
    let mut set = xcr0_enumerated(entries);
    for e in entries {
        let user_subleaf = e.function == sys::CPUID_LEAF_XSTATE
            && (2..64).contains(&e.index)
            && e.eax != 0
            && e.ecx & 1 == 0;
        if user_subleaf {
            set = set.union(XFeatureSet::from_bits(1 << e.index));
        }
    }
    if advertises_amx(entries) {
        set = set.union(XFeatureSet::AMX);
    }
    if advertises_apx(entries) {
        set = set.with(XFeature::Apx);
    }
    set
}

/// The guest permission a table needs: its dynamic components (tile data, from leaf 0xD
/// subleaf 0, the AMX flags of leaf 7 or leaves 0x1D/0x1E), with tile configuration added
/// to tile data since an XCR0 holds the two only together. Empty for a table without AMX.
pub fn required_permission(cpuid: &CpuId) -> XFeatureSet {
    let advertised = advertised(cpuid);
    if advertised.intersection(XFeatureSet::AMX).is_empty() {
        advertised.intersection(XFeatureSet::DYNAMIC)
    } else {
        advertised
            .intersection(XFeatureSet::DYNAMIC)
            .union(XFeatureSet::AMX)
    }
}

/// `allowed` as a set a guest XCR0 can hold: AMX counts only as a pair.
fn usable(allowed: XFeatureSet) -> XFeatureSet {
    let allowed = allowed.union(XFeatureSet::LEGACY);
    if allowed.contains_all(XFeatureSet::AMX) {
        allowed
    } else {
        allowed.difference(XFeatureSet::AMX)
    }
}

/// `entries` with every advertisement of an XCR0 component outside `allowed` (plus x87 and
/// SSE, which every XCR0 has) cleared:
///
/// * leaf 0xD subleaf 0: EDX:EAX keep only allowed bits; EBX and ECX become the
///   standard-format size of that set (KVM recomputes EBX from the guest's XCR0 at run time);
/// * leaf 0xD subleaf 1: unchanged (it lists IA32_XSS components, which the guest
///   permission does not cover);
/// * leaf 0xD subleaf `n` of a user component outside the set: removed;
/// * without both AMX components allowed: the leaf-7 AMX flags cleared and leaves 0x1D and
///   0x1E zeroed;
/// * without APX allowed: the APX flag of leaf 7.1 cleared.
///
/// Flags of the static components (AVX, AVX-512, MPX, PKU) are left alone: every guest
/// permission holds them, and a VMM that offers a guest less builds its leaves 1 and 7 so.
///
/// # Errors
///
/// [`layout::Error`] where leaf 0xD is missing or malformed.
pub fn restrict(
    entries: &[kvm_cpuid_entry2],
    allowed: XFeatureSet,
) -> layout::Result<Vec<kvm_cpuid_entry2>> {
    let layout = XsaveLayout::from_cpuid_entries(entries)?;
    let allowed = usable(allowed);
    let xcr0 = layout.xcr0_supported().intersection(allowed);
    let size = layout.standard_size(xcr0)?;
    let amx = allowed.contains_all(XFeatureSet::AMX);
    let apx = allowed.contains(XFeature::Apx);
    Ok(entries
        .iter()
        .filter_map(|e| {
            let mut e = *e;
            match (e.function, e.index) {
                (sys::CPUID_LEAF_XSTATE, 0) => {
                    e.eax = xcr0.bits() as u32;
                    e.edx = (xcr0.bits() >> 32) as u32;
                    e.ebx = size;
                    e.ecx = size;
                }
                (sys::CPUID_LEAF_XSTATE, n @ 2..64) => {
                    let supervisor = e.ecx & 1 != 0;
                    if !supervisor && !allowed.contains_all(XFeatureSet::from_bits(1 << n)) {
                        return None;
                    }
                }
                (sys::CPUID_LEAF_FEATURES, 0) if !amx => e.edx &= !sys::CPUID_7_0_EDX_AMX,
                (sys::CPUID_LEAF_FEATURES, 1) => {
                    if !amx {
                        e.eax &= !sys::CPUID_7_1_EAX_AMX;
                        e.edx &= !sys::CPUID_7_1_EDX_AMX;
                    }
                    if !apx {
                        e.edx &= !sys::CPUID_7_1_EDX_APX;
                    }
                }
                (sys::CPUID_LEAF_TILE_INFO | sys::CPUID_LEAF_TMUL_INFO, _) if !amx => {
                    (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
                }
                _ => {}
            }
            Some(e)
        })
        .collect())
}

/// Why a CPUID table does not fit a guest permission.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// `KVM_SET_CPUID2` would fail with `EPERM`: CPUID.(0xD,0) enables dynamic components
    /// the process holds no guest permission for.
    #[error(
        "KVM_SET_CPUID2 would fail with EPERM: CPUID leaf 0xD.0 enables {}, for which this \
         process holds no guest permission (it holds {permitted}; request it before the \
         first vCPU is created)",
        numbered(*.missing)
    )]
    WouldBeRefused {
        /// The dynamic components without permission.
        missing: XFeatureSet,
        /// The process's guest permission.
        permitted: XFeatureSet,
    },
    /// The table tells the guest about components its XCR0 can never hold here (KVM accepts
    /// such a table; the guest is misled).
    #[error(
        "the CPUID advertises {}, which guests of this process cannot enable (they can \
         enable {usable})",
        numbered(*.unusable)
    )]
    AdvertisesUnusable {
        /// The components advertised and not usable.
        unusable: XFeatureSet,
        /// What the guests can enable.
        usable: XFeatureSet,
    },
}

/// `18 (xtiledata)`, joined with `, `.
fn numbered(set: XFeatureSet) -> String {
    set.indices()
        .map(|i| match XFeature::from_index(i) {
            Some(f) => format!("component {i} ({f})"),
            None => format!("component {i}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks `cpuid` against a process's guest permission `permitted` and the set its guests
/// can enable, `usable` (see [`crate::GuestPermission::check_cpuid`]).
///
/// # Errors
///
/// [`CpuidError::WouldBeRefused`] first, naming the dynamic components of leaf 0xD.0
/// without permission; then [`CpuidError::AdvertisesUnusable`] for any other advertisement
/// outside `usable`.
pub fn check(cpuid: &CpuId, permitted: XFeatureSet, usable: XFeatureSet) -> Result<(), CpuidError> {
    let entries = cpuid.as_slice();
    let missing = xcr0_enumerated(entries)
        .intersection(XFeatureSet::DYNAMIC)
        .difference(permitted);
    if !missing.is_empty() {
        return Err(CpuidError::WouldBeRefused { missing, permitted });
    }
    let unusable = advertised_in(entries).difference(usable.union(XFeatureSet::LEGACY));
    if !unusable.is_empty() {
        return Err(CpuidError::AdvertisesUnusable { unusable, usable });
    }
    Ok(())
}

/// `entries` as a `CpuId`.
pub(crate) fn to_cpuid(entries: &[kvm_cpuid_entry2]) -> layout::Result<CpuId> {
    CpuId::from_entries(entries).map_err(layout::Error::BuildCpuid)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::layout::tests::spr_cpuid;
    use proptest::prelude::*;

    fn set(bits: u64) -> XFeatureSet {
        XFeatureSet::from_bits(bits)
    }

    /// `spr_cpuid()` with the AMX and APX leaves a Sapphire Rapids-class host reports.
    pub(crate) fn spr_full() -> Vec<kvm_cpuid_entry2> {
        let mut entries = spr_cpuid().as_slice().to_vec();
        entries.push(kvm_cpuid_entry2 {
            function: 7,
            index: 0,
            ebx: 0xf1bf_07ab,
            edx: sys::CPUID_7_0_EDX_AMX | (1 << 26),
            ..Default::default()
        });
        entries.push(kvm_cpuid_entry2 {
            function: 7,
            index: 1,
            eax: sys::CPUID_7_1_EAX_AMX | (1 << 5),
            edx: sys::CPUID_7_1_EDX_AMX,
            ..Default::default()
        });
        entries.push(kvm_cpuid_entry2 {
            function: 0x1d,
            index: 1,
            eax: 0x0400_2000,
            ebx: 0x0008_0040,
            ecx: 0x10,
            ..Default::default()
        });
        entries.push(kvm_cpuid_entry2 {
            function: 0x1e,
            index: 0,
            ebx: 0x4010,
            ..Default::default()
        });
        entries
    }

    #[test]
    fn advertised_reads_every_place() {
        let table = CpuId::from_entries(&spr_full()).unwrap();
        assert_eq!(advertised(&table), set(0x602e7));
        assert_eq!(required_permission(&table), XFeatureSet::AMX);
        // Leaf 0xD without AMX, but leaf 0x1E alone still says AMX exists.
        let only_tmul: Vec<_> = restrict(&spr_full(), set(0x2e7))
            .unwrap()
            .into_iter()
            .map(|mut e| {
                if e.function == 0x1e {
                    e.ebx = 0x4010;
                }
                e
            })
            .collect();
        let table = CpuId::from_entries(&only_tmul).unwrap();
        assert_eq!(advertised(&table), set(0x602e7));
        assert_eq!(required_permission(&table), XFeatureSet::AMX);
        // A table without AMX needs nothing.
        let plain = CpuId::from_entries(&restrict(&spr_full(), set(0x2e7)).unwrap()).unwrap();
        assert_eq!(advertised(&plain), set(0x2e7));
        assert_eq!(required_permission(&plain), XFeatureSet::EMPTY);
    }

    #[test]
    fn restrict_clears_amx_everywhere_and_keeps_the_rest() {
        let full = spr_full();
        let out = restrict(&full, set(0x2e7)).unwrap();
        assert_eq!(out.len(), full.len() - 2, "subleaves 17 and 18 removed");
        let find = |f, i| {
            out.iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap()
        };
        assert_eq!(find(7, 0).edx, 1 << 26);
        assert_eq!(find(7, 0).ebx, 0xf1bf_07ab);
        assert_eq!((find(7, 1).eax, find(7, 1).edx), (1 << 5, 0));
        assert!(!any_register(find(0x1d, 1)) && !any_register(find(0x1e, 0)));
        let d0 = find(0xd, 0);
        assert_eq!((d0.eax, d0.edx, d0.ebx, d0.ecx), (0x2e7, 0, 2696, 2696));
        assert_eq!(find(0xd, 1).ecx, 0x1800);
        // Everything allowed: nothing changes but subleaf 0's EBX, which becomes the size of
        // everything (KVM sets it from the guest's XCR0 at run time anyway).
        let all = restrict(&full, set(0x602e7)).unwrap();
        let not_d0 = |v: &[kvm_cpuid_entry2]| -> Vec<kvm_cpuid_entry2> {
            v.iter()
                .filter(|e| (e.function, e.index) != (0xd, 0))
                .copied()
                .collect()
        };
        assert_eq!(not_d0(&all), not_d0(&full));
        assert_eq!(xcr0_enumerated(&all), set(0x602e7));
        // Tile data without tile configuration is no usable set: AMX goes.
        let out = restrict(&full, set(0x402e7)).unwrap();
        assert_eq!(xcr0_enumerated(&out), set(0x2e7));
    }

    #[test]
    fn check_names_the_component_kvm_refuses() {
        let table = CpuId::from_entries(&spr_full()).unwrap();
        let err = check(&table, set(0x202e7), set(0x2e7)).unwrap_err();
        assert!(
            matches!(err, CpuidError::WouldBeRefused { missing, .. } if missing == set(1 << 18))
        );
        assert!(
            err.to_string()
                .contains("EPERM: CPUID leaf 0xD.0 enables component 18 (xtiledata)"),
            "{err}"
        );
        // Leaf 0xD trimmed, leaf 7 left as KVM_GET_SUPPORTED_CPUID reports it.
        let mut entries = restrict(&spr_full(), set(0x2e7)).unwrap();
        for e in &mut entries {
            if (e.function, e.index) == (7, 0) {
                e.edx |= sys::CPUID_7_0_EDX_AMX;
            }
        }
        let table = CpuId::from_entries(&entries).unwrap();
        let err = check(&table, set(0x202e7), set(0x2e7)).unwrap_err();
        assert!(
            matches!(err, CpuidError::AdvertisesUnusable { unusable, .. } if unusable == XFeatureSet::AMX)
        );
        assert!(err
            .to_string()
            .contains("component 17 (xtilecfg), component 18 (xtiledata)"));
        let fixed = CpuId::from_entries(&restrict(&entries, set(0x2e7)).unwrap()).unwrap();
        check(&fixed, set(0x202e7), set(0x2e7)).unwrap();
        check(
            &CpuId::from_entries(&spr_full()).unwrap(),
            set(0x602e7),
            set(0x602e7),
        )
        .unwrap();
    }

    /// A CPUID table shaped like what a VMM might hand over: leaf 0xD with a random subset of
    /// the SPR components (and sometimes subleaves it does not announce), random leaf-7 AMX
    /// and APX flags, and leaves 0x1D/0x1E present or not, zero or not.
    fn arb_table() -> impl Strategy<Value = Vec<kvm_cpuid_entry2>> {
        (
            any::<u64>(),
            any::<bool>(),
            any::<[u32; 3]>(),
            any::<(bool, u32, bool, u32)>(),
        )
            .prop_map(|(mask, extra_subleaves, flags, (tile, t, tmul, m))| {
                let base = spr_full();
                let announced = set(0x602e7)
                    .intersection(set(mask))
                    .union(XFeatureSet::LEGACY);
                let announced = if announced.contains(XFeature::XtileData) {
                    announced.with(XFeature::XtileCfg)
                } else {
                    announced
                };
                let mut entries: Vec<_> = base
                    .into_iter()
                    .filter(|e| {
                        !matches!(e.function, 7 | 0x1d | 0x1e)
                            && (e.function != 0xd
                                || e.index < 2
                                || extra_subleaves
                                || e.ecx & 1 != 0
                                || announced.bits() & (1 << e.index) != 0)
                    })
                    .collect();
                for e in &mut entries {
                    if (e.function, e.index) == (0xd, 0) {
                        e.eax = announced.bits() as u32;
                    }
                }
                entries.push(kvm_cpuid_entry2 {
                    function: 7,
                    index: 0,
                    edx: flags[0],
                    ..Default::default()
                });
                entries.push(kvm_cpuid_entry2 {
                    function: 7,
                    index: 1,
                    eax: flags[1],
                    edx: flags[2],
                    ..Default::default()
                });
                if tile {
                    entries.push(kvm_cpuid_entry2 {
                        function: 0x1d,
                        index: 1,
                        eax: t,
                        ..Default::default()
                    });
                }
                if tmul {
                    entries.push(kvm_cpuid_entry2 {
                        function: 0x1e,
                        ebx: m,
                        ..Default::default()
                    });
                }
                entries
            })
    }

    proptest! {
        #[test]
        fn nothing_advertised_lies_outside_the_permission(
            entries in arb_table(),
            dynamic in any::<bool>(),
            allowed in any::<u64>(),
        ) {
            // A guest permission: the static components plus, or not, tile data; and any
            // narrower set a VMM may choose.
            let permission = if dynamic { set(0x602e7) } else { set(0x202e7) };
            for allowed in [crate::permission::kvm_filtered_xcr0(set(0x602e7), permission), set(allowed)] {
                let out = restrict(&entries, allowed).unwrap();
                let table = CpuId::from_entries(&out).unwrap();
                let shown = advertised(&table);
                prop_assert!(
                    usable(allowed).contains_all(shown),
                    "advertised {} outside {}", shown, allowed
                );
                if permission.contains_all(usable(allowed).intersection(XFeatureSet::DYNAMIC)) {
                    prop_assert!(check(&table, permission, usable(allowed)).is_ok());
                }
                // Only XSTATE advertisements change.
                let other = |v: &[kvm_cpuid_entry2]| -> Vec<kvm_cpuid_entry2> {
                    v.iter().filter(|e| !matches!(e.function, 7 | 0xd | 0x1d | 0x1e)).copied().collect()
                };
                prop_assert_eq!(other(&out), other(&entries));
                // What remains is what the layout says, and restricting twice changes nothing.
                prop_assert_eq!(restrict(&out, allowed).unwrap(), out.clone());
                let layout = XsaveLayout::from_cpuid_entries(&out).unwrap();
                prop_assert_eq!(layout.xcr0_supported(), xcr0_enumerated(&out));
            }
        }
    }
}
