//! Target `xsave_layout`: a CPUID table (as KVM or a VMM hands it over) read by xstate-perm:
//! the XSAVE layout of leaf 0xD, the features the table advertises, the guest table
//! restricted to a permission, and an XSAVE image read through the layout.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use xstate_perm::cpuid::{self, advertised, required_permission, restrict};
use xstate_perm::sys::{
    CPUID_LEAF_FEATURES, CPUID_LEAF_TILE_INFO, CPUID_LEAF_TMUL_INFO, CPUID_LEAF_XSTATE,
    KVM_XSAVE_LEGACY_SIZE, XSAVE_HEADER_SIZE, XSAVE_LEGACY_REGION,
};
use xstate_perm::{XFeatureSet, XsaveLayout, XsaveState};

use crate::input::Input;

/// Where the first extended component may start.
const EXTENDED_START: u32 = XSAVE_LEGACY_REGION + XSAVE_HEADER_SIZE;
/// Leaves the input picks from: mostly leaf 0xD, and the others xstate-perm reads.
const LEAVES: [u32; 8] = [
    CPUID_LEAF_XSTATE,
    CPUID_LEAF_XSTATE,
    CPUID_LEAF_XSTATE,
    CPUID_LEAF_XSTATE,
    CPUID_LEAF_FEATURES,
    CPUID_LEAF_TILE_INFO,
    CPUID_LEAF_TMUL_INFO,
    1,
];

/// `allowed` as a set a guest XCR0 can hold: x87 and SSE always, AMX only as a pair
/// (what [`xstate_perm::GuestPermission`] lets guests enable).
fn usable(allowed: XFeatureSet) -> XFeatureSet {
    let allowed = allowed.union(XFeatureSet::LEGACY);
    if allowed.contains_all(XFeatureSet::AMX) {
        allowed
    } else {
        allowed.difference(XFeatureSet::AMX)
    }
}

fn entries(input: &mut Input<'_>) -> Vec<kvm_cpuid_entry2> {
    let count = usize::from(input.u8()) % (KVM_MAX_CPUID_ENTRIES + 1);
    (0..count)
        .map(|_| {
            let function = input.pick(&LEAVES);
            kvm_cpuid_entry2 {
                function,
                index: u32::from(input.u8() % 64),
                flags: 0,
                eax: input.u32(),
                ebx: input.u32(),
                ecx: input.u32(),
                edx: input.u32(),
                ..Default::default()
            }
        })
        .collect()
}

/// Reads the CPUID table and XSAVE image the input describes.
pub fn xsave_layout(data: &[u8]) {
    let mut input = Input::new(data);
    let allowed = XFeatureSet::from_bits(input.u64());
    let entries = entries(&mut input);
    let table = CpuId::from_entries(&entries).expect("at most KVM_MAX_CPUID_ENTRIES entries");
    let required = required_permission(&table);
    assert!(XFeatureSet::DYNAMIC
        .union(XFeatureSet::AMX)
        .contains_all(required));
    let _ = advertised(&table);

    let layout = XsaveLayout::from_cpuid_entries(&entries);
    let restricted = restrict(&entries, allowed);
    assert_eq!(layout.is_ok(), restricted.is_ok());
    let (Ok(layout), Ok(restricted)) = (layout, restricted) else {
        return;
    };
    check_layout(&layout, allowed);

    // The restricted table advertises nothing a guest holding `allowed` cannot enable.
    let usable = usable(allowed);
    let restricted_table = CpuId::from_entries(&restricted).unwrap();
    assert!(layout
        .xcr0_supported()
        .contains_all(cpuid::xcr0_enumerated(&restricted)));
    if let Err(e) = cpuid::check(&restricted_table, usable, usable) {
        panic!("restrict() to {usable} left {e}");
    }

    let mut image = input.rest().to_vec();
    if image.len() < KVM_XSAVE_LEGACY_SIZE {
        assert!(XsaveState::from_bytes(image.clone()).is_err());
        image.resize(KVM_XSAVE_LEGACY_SIZE, 0);
    }
    let len = image.len();
    let state = XsaveState::from_bytes(image).unwrap();
    let _ = state.xstate_bv();
    for index in 0..64 {
        let expected = layout
            .component(index)
            .filter(|c| !c.supervisor && c.offset as usize + c.size as usize <= len)
            .map(|c| c.size as usize);
        assert_eq!(state.component(&layout, index).map(<[u8]>::len), expected);
    }
}

/// What a layout that parsed promises.
fn check_layout(layout: &XsaveLayout, allowed: XFeatureSet) {
    let enumerated = layout.enumerated();
    assert!(enumerated.contains_all(
        layout
            .xcr0_supported()
            .union(layout.xss_supported())
            .union(XFeatureSet::LEGACY)
    ));
    for index in enumerated.indices().filter(|&i| i >= 2) {
        let c = layout.component(index).unwrap();
        if !c.supervisor {
            assert!(c.offset >= EXTENDED_START);
            assert!(
                u64::from(c.offset) + u64::from(c.size) <= u64::from(layout.max_standard_size())
            );
        }
    }
    let xcr0 = layout.xcr0_supported();
    let standard = layout.standard_size(xcr0).unwrap();
    assert!(
        standard >= EXTENDED_START && standard <= layout.max_standard_size().max(EXTENDED_START)
    );
    let size = layout.xsave2_size(xcr0).unwrap();
    assert!(size >= KVM_XSAVE_LEGACY_SIZE && size >= standard as usize);
    if let Ok(reported) = i32::try_from(size) {
        assert_eq!(layout.check_xsave2(reported, xcr0).unwrap(), size);
        assert!(layout.check_xsave2(reported.wrapping_add(1), xcr0).is_err());
    }
    for set in [
        xcr0,
        xcr0.union(layout.xss_supported()),
        allowed.intersection(enumerated),
    ] {
        let offsets = layout.compacted_offsets(set).unwrap();
        let mut next = EXTENDED_START;
        for &(index, offset) in &offsets {
            let c = layout.component(index).unwrap();
            assert!(
                offset >= next,
                "component {index} at {offset} overlaps the one before"
            );
            assert!(!c.align_64 || offset % 64 == 0);
            next = offset + c.size;
        }
        assert_eq!(layout.compacted_size(set).unwrap(), next);
    }
    let outside = XFeatureSet::from_bits(!enumerated.bits());
    if !outside.is_empty() {
        assert!(layout.standard_size(outside).is_err());
        assert!(layout.compacted_size(outside).is_err());
    }
}
