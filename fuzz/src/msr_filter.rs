//! Target `msr_filter`: building a `KVM_X86_SET_MSR_FILTER` filter from ranges a VMM
//! describes, checking it against KVM's rules, asking it which accesses it allows, and the
//! emulated IA32_FEATURE_CONTROL fed guest writes.

use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRangeFlags};
use msr_featctl::emulated::{bitmap_bytes, FilterRange, MsrFilter};
use msr_featctl::sys::{
    KVM_MSR_FILTER_MAX_BITMAP_SIZE, KVM_MSR_FILTER_MAX_RANGES, MSR_IA32_FEAT_CTL, X2APIC_MSRS,
};
use msr_featctl::{
    EmulatedFeatureControl, FeatCtlSnapshot, FeatureControl, GuestCpuidFeatures, WriteCheck,
};

use crate::input::Input;

/// Range counts up to a few past KVM's limit.
const MAX_FUZZ_RANGES: u8 = KVM_MSR_FILTER_MAX_RANGES as u8 + 4;
/// Bound on `msr_count` for ranges built by `FilterRange::deny`/`allow`, which allocate
/// its bitmap: past KVM's 0x600-byte bitmap limit, far below what would exhaust memory.
const MAX_BUILT_MSRS: u32 = 0x4000;
/// Bound on bitmaps taken from the input.
const MAX_BITMAP_BYTES: u16 = 0x800;
/// Access kinds a filter decides.
const ACCESSES: [MsrFilterRangeFlags; 2] = [MsrFilterRangeFlags::READ, MsrFilterRangeFlags::WRITE];

fn base(input: &mut Input<'_>) -> u32 {
    match input.u8() % 4 {
        0 => input.u32(),
        1 => u32::from(input.u16()),
        2 => *X2APIC_MSRS.start() - 0x10 + u32::from(input.u8()),
        _ => u32::MAX - u32::from(input.u8()),
    }
}

fn range(input: &mut Input<'_>) -> FilterRange {
    let kind = input.u8() % 3;
    let base = base(input);
    let flags = MsrFilterRangeFlags::from_bits_retain(u32::from(input.u8() % 8));
    match kind {
        0 => FilterRange::deny(base, input.u32() % MAX_BUILT_MSRS, flags),
        1 => FilterRange::allow(base, input.u32() % MAX_BUILT_MSRS, flags),
        _ => {
            let msr_count = match input.u8() % 2 {
                0 => u32::from(input.u16()),
                _ => input.u32(),
            };
            let len = input.u16() % MAX_BITMAP_BYTES;
            FilterRange {
                base,
                msr_count,
                flags,
                bitmap: input.bytes(usize::from(len)).to_vec(),
            }
        }
    }
}

/// Builds, checks and queries the filter the input describes, then runs the guest writes
/// it holds through an emulated IA32_FEATURE_CONTROL.
pub fn msr_filter(data: &[u8]) {
    let mut input = Input::new(data);
    let default_action = match input.bool() {
        true => MsrFilterDefaultAction::ALLOW,
        false => MsrFilterDefaultAction::DENY,
    };
    let mut filter = MsrFilter::new(default_action);
    for _ in 0..input.u8() % MAX_FUZZ_RANGES {
        filter.push(range(&mut input));
    }
    let with_feature_control = input.bool();
    if with_feature_control {
        filter = filter.with_feature_control();
    }
    let probes: Vec<u32> = (0..input.u8() % 16).map(|_| base(&mut input)).collect();
    let valid = filter.validate().is_ok();
    if valid {
        check_rules(&filter);
    }
    check_decisions(&filter, valid && with_feature_control, &probes);
    feature_control(&mut input);
}

/// What a filter that passed `validate()` promises: KVM's rules hold.
fn check_rules(filter: &MsrFilter) {
    let ranges = filter.ranges();
    assert!(ranges.len() <= KVM_MSR_FILTER_MAX_RANGES as usize);
    assert!(!ranges.is_empty() || filter.default_action() == MsrFilterDefaultAction::ALLOW);
    for r in ranges {
        assert!(r.msr_count > 0);
        assert!(!r.flags.is_empty() && MsrFilterRangeFlags::all().contains(r.flags));
        let bytes = bitmap_bytes(r.msr_count);
        assert!(bytes <= KVM_MSR_FILTER_MAX_BITMAP_SIZE as usize && r.bitmap.len() >= bytes);
        let last = u64::from(r.base) + u64::from(r.msr_count) - 1;
        assert!(last <= u64::from(u32::MAX));
        assert!(last < u64::from(*X2APIC_MSRS.start()) || r.base > *X2APIC_MSRS.end());
    }
}

/// Each access is decided as `kvm_msr_allowed` (arch/x86/kvm/x86.c) decides it, with a bitmap
/// shorter than its range (which `validate()` refuses) reading as zeros past its end; the
/// range boundaries, x2APIC MSRs, 0x3a and the input's probes are asked.
fn check_decisions(filter: &MsrFilter, with_feature_control: bool, probes: &[u32]) {
    let ranges = filter.ranges();
    let mut indices = probes.to_vec();
    for r in ranges {
        let end = r.base.wrapping_add(r.msr_count);
        indices.extend([r.base.wrapping_sub(1), r.base, end.wrapping_sub(1), end]);
    }
    indices.extend([MSR_IA32_FEAT_CTL, *X2APIC_MSRS.start(), *X2APIC_MSRS.end()]);
    for index in indices {
        for access in ACCESSES {
            let expected = if X2APIC_MSRS.contains(&index) {
                true
            } else {
                ranges
                    .iter()
                    .filter(|r| r.flags.contains(access))
                    .find(|r| r.contains(index))
                    .map(|r| {
                        let bit = (index - r.base) as usize;
                        r.bitmap
                            .get(bit / 8)
                            .is_some_and(|b| b & (1 << (bit % 8)) != 0)
                    })
                    .unwrap_or(filter.default_action() == MsrFilterDefaultAction::ALLOW)
            };
            assert_eq!(
                filter.allows(index, access),
                expected,
                "MSR {index:#x} {access:?}"
            );
        }
    }
    if with_feature_control {
        for access in ACCESSES {
            assert!(!filter.allows(MSR_IA32_FEAT_CTL, access));
        }
    }
}

/// Guest writes of IA32_FEATURE_CONTROL: a refused write leaves the value alone, an
/// accepted one sets only bits valid for the guest and never lands on a locked value; a
/// snapshot restores the same state.
fn feature_control(input: &mut Input<'_>) {
    let bits = input.u8();
    let features = GuestCpuidFeatures {
        vmx: bits & 1 != 0,
        smx: bits & 2 != 0,
        sgx: bits & 4 != 0,
        sgx_lc: bits & 8 != 0,
        lmce: bits & 16 != 0,
    };
    let valid = features.valid_bits();
    assert!(valid.contains(features.firmware_value()));
    let mut msr = match bits & 32 {
        0 => EmulatedFeatureControl::new(features),
        _ => EmulatedFeatureControl::with_firmware_value(features),
    };
    while !input.is_empty() {
        let value = match input.u8() % 2 {
            0 => input.u64(),
            _ => input.u64() & FeatureControl::SUPPORTED.bits(),
        };
        let before = msr.value();
        match msr.handle_wrmsr(value) {
            WriteCheck::Accepted(v) => {
                assert!(!before.is_locked());
                assert_eq!(v.bits(), value);
                assert!(valid.contains(v));
            }
            WriteCheck::GeneralProtection(_) => assert_eq!(msr.value(), before),
        }
        assert_eq!(msr.handle_rdmsr(), msr.value().bits());
        let restored = EmulatedFeatureControl::restore(features, msr.snapshot()).unwrap();
        assert_eq!(restored, msr);
        let raw = FeatCtlSnapshot { value };
        let from_raw = EmulatedFeatureControl::restore(features, raw);
        assert_eq!(from_raw.is_ok(), FeatureControl::from_bits(value).is_some());
    }
}
