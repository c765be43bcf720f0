//! Per-vCPU CPUID: KVM's supported set (already limited to the XSTATE guest permission by
//! xstate-perm), with each vCPU's APIC ID and the topology "one package, one thread per core,
//! `vcpus` cores" written into the leaves a guest reads it from.
//!
//! * leaf 1: EBX\[31:24\] initial APIC ID, EBX\[23:16\] logical processors per package, EDX.HTT;
//!   ECX.HYPERVISOR set; ECX.VMX cleared unless nested virtualization is asked for;
//! * leaves 0xB and 0x1F (x2APIC topology): subleaf 0 is the SMT level (shift 0, 1 thread),
//!   subleaf 1 the core level (shift `ceil(log2(vcpus))`, `vcpus` processors), others invalid;
//!   EDX is the x2APIC ID;
//! * leaf 4 (Intel deterministic cache parameters): EAX\[31:26\] cores per package - 1;
//! * leaf 0x8000_0001: ECX.SVM cleared unless nested virtualization is asked for;
//! * leaf 0x8000_0008 (AMD): ECX\[7:0\] cores - 1, ECX\[15:12\] APIC-ID bits for the core;
//! * leaf 0x8000_001E (AMD): EAX extended APIC ID, EBX core ID with one thread per core.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use crate::sys::{
    CPUID_1_ECX_HYPERVISOR, CPUID_1_ECX_TSC_DEADLINE, CPUID_1_ECX_VMX, CPUID_1_EDX_HTT,
    CPUID_80000001_ECX_SVM, CPUID_LEVEL_TYPE_CORE, CPUID_LEVEL_TYPE_SMT,
};

/// The topology one vCPU should see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuTopology {
    /// This vCPU's APIC ID (its index: APIC IDs are dense, the BSP is 0).
    pub apic_id: u8,
    /// vCPUs in the VM, all cores of one package.
    pub vcpus: u8,
    /// Whether VMX/SVM stay visible.
    pub nested_virt: bool,
}

impl VcpuTopology {
    /// Bits of the APIC ID that number the core: `ceil(log2(vcpus))`.
    pub fn core_shift(&self) -> u32 {
        match self.vcpus {
            0 | 1 => 0,
            n => u32::BITS - u32::from(n - 1).leading_zeros(),
        }
    }
}

fn set_bits(value: u32, shift: u32, width: u32, field: u32) -> u32 {
    let mask = ((1u64 << width) - 1) as u32;
    (value & !(mask << shift)) | ((field & mask) << shift)
}

/// Patches one CPUID entry for `topo`.
pub fn patch_entry(e: &mut kvm_cpuid_entry2, topo: VcpuTopology) {
    let apic = u32::from(topo.apic_id);
    let vcpus = u32::from(topo.vcpus);
    match e.function {
        0x1 => {
            e.ebx = set_bits(e.ebx, 24, 8, apic);
            e.ebx = set_bits(e.ebx, 16, 8, vcpus);
            if topo.vcpus > 1 {
                e.edx |= CPUID_1_EDX_HTT;
            } else {
                e.edx &= !CPUID_1_EDX_HTT;
            }
            e.ecx |= CPUID_1_ECX_HYPERVISOR;
            if !topo.nested_virt {
                e.ecx &= !CPUID_1_ECX_VMX;
            }
        }
        0x4 => {
            e.eax = set_bits(e.eax, 26, 6, vcpus - 1);
        }
        0xb | 0x1f => {
            let (shift, count, level) = match e.index {
                0 => (0, 1, CPUID_LEVEL_TYPE_SMT),
                1 => (topo.core_shift(), vcpus, CPUID_LEVEL_TYPE_CORE),
                _ => (0, 0, 0),
            };
            e.eax = shift;
            e.ebx = count;
            e.ecx = (level << 8) | (e.index & 0xff);
            e.edx = apic;
        }
        0x8000_0001 if !topo.nested_virt => {
            e.ecx &= !CPUID_80000001_ECX_SVM;
        }
        0x8000_0008 => {
            e.ecx = set_bits(e.ecx, 0, 8, vcpus - 1);
            e.ecx = set_bits(e.ecx, 12, 4, topo.core_shift());
        }
        0x8000_001e => {
            e.eax = apic;
            e.ebx = apic & 0xff;
            e.ecx = 0;
        }
        _ => {}
    }
}

/// Sets CPUID.1:ECX.TSC_DEADLINE in `cpuid`.
///
/// KVM emulates the TSC-deadline timer mode of its in-kernel local APIC wherever
/// `KVM_CAP_TSC_DEADLINE_TIMER` is reported, but `KVM_GET_SUPPORTED_CPUID` only includes the
/// bit since Linux 6.14 (commit 9be4ec35d668); before that it is the VMM's to set. Without
/// it a guest falls back to the one-shot timer mode, whose extra reprogramming exits are
/// costly, most of all in a nested host.
pub fn advertise_tsc_deadline(cpuid: &mut CpuId) {
    for e in cpuid
        .as_mut_slice()
        .iter_mut()
        .filter(|e| e.function == 0x1)
    {
        e.ecx |= CPUID_1_ECX_TSC_DEADLINE;
    }
}

/// `base` patched for `topo`.
pub fn for_vcpu(base: &CpuId, topo: VcpuTopology) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        patch_entry(e, topo);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0x0000_0800,
            ecx: 0xffff_ffff,
            edx: 0,
            ..Default::default()
        }
    }

    fn base() -> CpuId {
        CpuId::from_entries(&[
            entry(0x1, 0),
            entry(0x4, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x8000_0001, 0),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ])
        .unwrap()
    }

    #[test]
    fn tsc_deadline_is_set_in_leaf_1_only() {
        let mut cpuid = base();
        let before: Vec<_> = cpuid.as_slice().to_vec();
        advertise_tsc_deadline(&mut cpuid);
        for (old, new) in before.iter().zip(cpuid.as_slice()) {
            if old.function == 0x1 {
                assert_eq!(new.ecx, old.ecx | CPUID_1_ECX_TSC_DEADLINE);
            } else {
                assert_eq!(new.ecx, old.ecx);
            }
        }
        assert!(cpuid.as_slice().iter().any(|e| e.function == 0x1));
    }

    #[test]
    fn core_shift_values() {
        let t = |vcpus| VcpuTopology {
            apic_id: 0,
            vcpus,
            nested_virt: false,
        };
        assert_eq!(
            [1, 2, 3, 4, 5, 32].map(|n| t(n).core_shift()),
            [0, 1, 2, 2, 3, 5]
        );
    }

    proptest! {
        #[test]
        fn topology_leaves(vcpus in 1u8..=32, pick in 0u8..32, nested in any::<bool>()) {
            let apic_id = pick % vcpus;
            let topo = VcpuTopology { apic_id, vcpus, nested_virt: nested };
            let c = for_vcpu(&base(), topo);
            let e = c.as_slice();
            prop_assert_eq!(e[0].ebx >> 24, u32::from(apic_id));
            prop_assert_eq!((e[0].ebx >> 16) & 0xff, u32::from(vcpus));
            prop_assert_eq!(e[0].ebx & 0xffff, 0x0800); // CLFLUSH size kept
            prop_assert_eq!(e[0].edx & CPUID_1_EDX_HTT != 0, vcpus > 1);
            prop_assert_eq!(e[0].ecx & CPUID_1_ECX_VMX != 0, nested);
            prop_assert_eq!(e[1].eax >> 26, u32::from(vcpus) - 1);
            prop_assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (0, 1, CPUID_LEVEL_TYPE_SMT));
            prop_assert_eq!(e[3].ebx, u32::from(vcpus));
            prop_assert!(u32::from(vcpus - 1) >> e[3].eax == 0);
            prop_assert_eq!((e[4].ebx, e[4].ecx), (0, 2));
            for leaf in &e[2..5] {
                prop_assert_eq!(leaf.edx, u32::from(apic_id));
            }
            prop_assert_eq!(e[5].ecx & CPUID_80000001_ECX_SVM != 0, nested);
            prop_assert_eq!(e[6].ecx & 0xff, u32::from(vcpus) - 1);
            prop_assert_eq!(e[7].eax, u32::from(apic_id));
        }
    }
}
