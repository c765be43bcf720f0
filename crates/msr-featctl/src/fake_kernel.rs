//! A small model of the kernel functions this crate relies on, for the paths no host here can
//! run (kvm_intel above all). Each behaviour names the kernel function and release it follows;
//! the model is written from those functions, independently of the crate's own rules, so the
//! tests compare the crate against the kernel and not against itself.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use crate::feature_control::{Exposure, GuestCpuidFeatures, KvmSupport};
use crate::msr_io::{Errno, MsrIo};
use crate::sys;

const LOCKED: u64 = 1 << 0;
const VMX_INSIDE_SMX: u64 = 1 << 1;
const VMX_OUTSIDE_SMX: u64 = 1 << 2;
const SGX_LC: u64 = 1 << 17;
const SGX_ENABLED: u64 = 1 << 18;
const LMCE: u64 = 1 << 20;
/// `KVM_SUPPORTED_FEATURE_CONTROL`, arch/x86/kvm/vmx/vmx.c, Linux 6.1.
const KVM_SUPPORTED_FEATURE_CONTROL: u64 =
    LOCKED | VMX_INSIDE_SMX | VMX_OUTSIDE_SMX | SGX_LC | SGX_ENABLED | LMCE;

/// Which kvm_intel release's IA32_FEATURE_CONTROL rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VmxRelease {
    /// `vmx_feature_control_msr_valid` (Linux 5.15): host and guest writes both held to
    /// `msr_ia32_feature_control_valid_bits`.
    Linux5_15,
    /// `is_vmx_feature_control_msr_valid` (Linux 6.1): host writes may set any bit of
    /// `KVM_SUPPORTED_FEATURE_CONTROL`.
    Linux6_1,
}

/// The vendor module behind `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// kvm_intel with its `nested` parameter.
    Vmx { release: VmxRelease, nested: bool },
    /// kvm_amd, Linux 6.1, `ignore_msrs=0`: `svm_set_msr`/`svm_get_msr` fall through to
    /// `kvm_set_msr_common`/`kvm_get_msr_common`, which have no case for 0x3a, and
    /// `kvm_msr_ignored_check` refuses the access.
    Svm6_1,
    /// kvm_amd, Linux 6.1, with `kvm.ignore_msrs=1`: `kvm_msr_ignored_check` lets the unknown
    /// MSR be written (nothing stored) and read as 0.
    SvmIgnoreMsrs6_1,
    /// The local kvm_pvm as measured: KVM_SET_MSRS of 0x3a processes 0 entries, KVM_GET_MSRS
    /// reads 0.
    PvmMeasured,
}

impl Kernel {
    fn nested_vmx(self) -> bool {
        matches!(self, Kernel::Vmx { nested: true, .. })
    }

    /// What `KVM_GET_SUPPORTED_CPUID` and `KVM_X86_GET_MCE_CAP_SUPPORTED` report:
    /// `vmx_set_cpu_caps` sets VMX only with `nested` (Linux 5.15, 6.1); `vmx_hardware_setup`
    /// adds `MCG_LMCE_P` to the supported MCE capabilities (Linux 5.15, 6.1).
    pub(crate) fn supported(self) -> KvmSupport {
        let vmx = self.nested_vmx();
        let lmce = matches!(self, Kernel::Vmx { .. });
        KvmSupport {
            cpuid: GuestCpu {
                vmx,
                sgx: false,
                sgx_lc: false,
            }
            .cpuid(),
            mce_cap: 0x0a | if lmce { sys::MCG_LMCE_P } else { 0 },
        }
    }

    /// The exposure the crate computes for `guest` on this kernel (MCG_CAP without LMCE).
    pub(crate) fn exposure(self, guest: GuestCpu) -> Exposure {
        GuestCpuidFeatures::exposed(&guest.cpuid(), 0, &self.supported())
    }
}

/// The guest CPUID bits that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct GuestCpu {
    pub(crate) vmx: bool,
    pub(crate) sgx: bool,
    pub(crate) sgx_lc: bool,
}

impl GuestCpu {
    pub(crate) fn with_vmx() -> Self {
        GuestCpu {
            vmx: true,
            ..Default::default()
        }
    }

    /// Leaves 1 and 7.0 with these bits.
    pub(crate) fn cpuid(self) -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: if self.vmx { 1 << 5 } else { 0 },
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: if self.sgx { 1 << 2 } else { 0 },
                ecx: if self.sgx_lc { 1 << 30 } else { 0 },
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).expect("two entries fit")
    }
}

/// One vCPU of the modelled kernel.
#[derive(Debug)]
pub(crate) struct FakeVcpu {
    kernel: Kernel,
    guest: Cell<GuestCpu>,
    feat_ctl: Cell<u64>,
    valid_bits: Cell<u64>,
    writes: Cell<usize>,
    has_run: Cell<bool>,
    /// Feature MSRs this vCPU holds, with the host (KVM-supported) values they start from.
    features: RefCell<BTreeMap<u32, u64>>,
    host_features: BTreeMap<u32, u64>,
}

impl FakeVcpu {
    /// `vmx_vcpu_create` (Linux 5.15, 6.1): `msr_ia32_feature_control_valid_bits =
    /// FEAT_CTL_LOCKED`, the MSR 0; no CPUID yet.
    pub(crate) fn created(kernel: Kernel) -> Self {
        FakeVcpu {
            kernel,
            guest: Cell::new(GuestCpu::default()),
            feat_ctl: Cell::new(0),
            valid_bits: Cell::new(LOCKED),
            writes: Cell::new(0),
            has_run: Cell::new(false),
            features: RefCell::new(BTreeMap::new()),
            host_features: BTreeMap::new(),
        }
    }

    /// A vCPU after KVM_SET_CPUID2 and KVM_X86_SETUP_MCE.
    pub(crate) fn configured(kernel: Kernel, guest: GuestCpu, mcg_cap: u64) -> Self {
        let vcpu = Self::created(kernel);
        vcpu.set_cpuid(guest);
        vcpu.setup_mce(mcg_cap);
        vcpu
    }

    /// The same vCPU, also holding feature MSRs initialised to `host` values (as
    /// `kvm_vcpu_reset`/`vmx_vcpu_create` copy KVM's defaults).
    pub(crate) fn with_feature_msrs(mut self, host: BTreeMap<u32, u64>) -> Self {
        *self.features.borrow_mut() = host.clone();
        self.host_features = host;
        self
    }

    /// `vmx_vcpu_after_set_cpuid` (Linux 5.15, 6.1): the VMX bits are valid iff
    /// `nested_vmx_allowed` (module `nested` and guest CPUID VMX); SGX_ENABLED with guest SGX
    /// and SGX_LC with guest SGX_LC.
    pub(crate) fn set_cpuid(&self, guest: GuestCpu) {
        self.guest.set(guest);
        let mut valid =
            self.valid_bits.get() & !(VMX_INSIDE_SMX | VMX_OUTSIDE_SMX | SGX_ENABLED | SGX_LC);
        if self.kernel.nested_vmx() && guest.vmx {
            valid |= VMX_INSIDE_SMX | VMX_OUTSIDE_SMX;
        }
        if guest.sgx {
            valid |= SGX_ENABLED;
        }
        if guest.sgx_lc {
            valid |= SGX_LC;
        }
        self.valid_bits.set(valid);
    }

    /// `vmx_setup_mce` (Linux 5.15, 6.1): LMCE valid iff MCG_CAP has `MCG_LMCE_P`.
    pub(crate) fn setup_mce(&self, mcg_cap: u64) {
        let valid = self.valid_bits.get() & !LMCE;
        let lmce = if mcg_cap & sys::MCG_LMCE_P != 0 {
            LMCE
        } else {
            0
        };
        self.valid_bits.set(valid | lmce);
    }

    /// The first KVM_RUN.
    pub(crate) fn run(&self) {
        self.has_run.set(true);
    }

    /// How many KVM_SET_MSRS calls reached the model.
    pub(crate) fn writes(&self) -> usize {
        self.writes.get()
    }

    /// The value of a feature MSR as the vCPU holds it.
    pub(crate) fn feature(&self, index: u32) -> Option<u64> {
        self.features.borrow().get(&index).copied()
    }

    /// A guest `VMXON`, as `handle_vmxon` (arch/x86/kvm/vmx/nested.c, Linux 5.15, 6.1)
    /// checks it: #UD without `nested_vmx_allowed`, #GP unless KVM's own copy of
    /// IA32_FEATURE_CONTROL has LOCKED and VMX outside SMX.
    pub(crate) fn guest_vmxon(&self) -> Result<(), &'static str> {
        if !matches!(self.kernel, Kernel::Vmx { .. })
            || !self.kernel.nested_vmx()
            || !self.guest.get().vmx
        {
            return Err("#UD");
        }
        let needed = LOCKED | VMX_OUTSIDE_SMX;
        if self.feat_ctl.get() & needed != needed {
            return Err("#GP");
        }
        Ok(())
    }

    /// `vmx_set_msr(MSR_IA32_FEAT_CTL)`, host-initiated.
    fn set_feat_ctl(&self, release: VmxRelease, data: u64) -> bool {
        let valid = match release {
            VmxRelease::Linux5_15 => self.valid_bits.get(),
            VmxRelease::Linux6_1 => KVM_SUPPORTED_FEATURE_CONTROL,
        };
        if data & !valid != 0 {
            return false;
        }
        self.feat_ctl.set(data);
        true
    }

    /// `vmx_set_vmx_msr` (arch/x86/kvm/vmx/nested.c, Linux 6.1) for a host write.
    fn set_vmx_msr(&self, index: u32, data: u64) -> bool {
        let Some(&supported) = self.host_features.get(&index) else {
            return false;
        };
        let subset =
            |superset: u64, subset: u64, mask: u64| (superset | subset) & mask == superset & mask;
        let ok = match index {
            // vmx_restore_control_msr: allowed-1 (high) only shrinks, must-be-1 (low) only grows.
            sys::MSR_IA32_VMX_TRUE_PINBASED_CTLS
            | sys::MSR_IA32_VMX_TRUE_PROCBASED_CTLS
            | sys::MSR_IA32_VMX_TRUE_EXIT_CTLS
            | sys::MSR_IA32_VMX_TRUE_ENTRY_CTLS
            | sys::MSR_IA32_VMX_PROCBASED_CTLS2 => {
                subset(supported, data, 0xffff_ffff_0000_0000)
                    && subset(data, supported, 0x0000_0000_ffff_ffff)
            }
            // The non-TRUE controls are generated from the TRUE ones, the FIXED1 MSRs from
            // CPUID: "we do not support restoring them directly" (-EINVAL).
            sys::MSR_IA32_VMX_PINBASED_CTLS
            | sys::MSR_IA32_VMX_PROCBASED_CTLS
            | sys::MSR_IA32_VMX_EXIT_CTLS
            | sys::MSR_IA32_VMX_ENTRY_CTLS
            | sys::MSR_IA32_VMX_CR0_FIXED1
            | sys::MSR_IA32_VMX_CR4_FIXED1 => false,
            // vmx_restore_vmx_ept_vpid_cap and the VMFUNC case: a subset of KVM's value.
            sys::MSR_IA32_VMX_EPT_VPID_CAP | sys::MSR_IA32_VMX_VMFUNC => {
                subset(supported, data, u64::MAX)
            }
            _ => data == supported,
        };
        if ok {
            self.features.borrow_mut().insert(index, data);
        }
        ok
    }
}

impl MsrIo for FakeVcpu {
    /// `msr_io` → `do_set_msr` → `kvm_set_msr_ignored_check` → the vendor `set_msr`.
    fn set_msr(&self, index: u32, data: u64) -> Result<bool, Errno> {
        self.writes.set(self.writes.get() + 1);
        if index == sys::MSR_IA32_FEAT_CTL {
            return Ok(match self.kernel {
                Kernel::Vmx { release, .. } => self.set_feat_ctl(release, data),
                Kernel::Svm6_1 | Kernel::PvmMeasured => false,
                Kernel::SvmIgnoreMsrs6_1 => true,
            });
        }
        let Some(current) = self.feature(index) else {
            return Ok(false);
        };
        // do_set_msr since commit 0094f62c7eaa ("KVM: x86: Disallow writes to immutable
        // feature MSRs after KVM_RUN"): after KVM_RUN only a write of the same value passes.
        if self.has_run.get() && data != current {
            return Ok(false);
        }
        if sys::VMX_CAPABILITY_MSRS.contains(&index) {
            // vmx_set_msr: the VMX MSRs need nested_vmx_allowed.
            if !(self.kernel.nested_vmx() && self.guest.get().vmx) {
                return Ok(false);
            }
            return Ok(self.set_vmx_msr(index, data));
        }
        self.features.borrow_mut().insert(index, data);
        Ok(true)
    }

    /// `msr_io` → `do_get_msr` → the vendor `get_msr`.
    fn get_msr(&self, index: u32) -> Result<Option<u64>, Errno> {
        if index == sys::MSR_IA32_FEAT_CTL {
            return Ok(match self.kernel {
                Kernel::Vmx { .. } => Some(self.feat_ctl.get()),
                Kernel::Svm6_1 => None,
                Kernel::SvmIgnoreMsrs6_1 | Kernel::PvmMeasured => Some(0),
            });
        }
        Ok(self.feature(index))
    }
}

/// The `/dev/kvm` system fd's feature-MSR ioctls.
#[derive(Debug, Clone)]
pub(crate) struct FakeSystem {
    /// `msr_based_features` with the values `kvm_get_msr_feature` returns.
    pub(crate) features: BTreeMap<u32, u64>,
}

impl FakeSystem {
    /// `KVM_GET_MSR_FEATURE_INDEX_LIST` in `kvm_arch_dev_ioctl` (arch/x86/kvm/x86.c, Linux
    /// 6.1): copies the caller's `nmsrs`, writes back the real count, fails with E2BIG when
    /// the caller's count is smaller, otherwise copies the indices.
    pub(crate) fn feature_index_list(
        &self,
        nmsrs: &mut u32,
        indices: &mut [u32],
    ) -> Result<(), Errno> {
        let n = *nmsrs;
        let count = self.features.len() as u32;
        *nmsrs = count;
        if n < count {
            return Err(Errno::new(libc::E2BIG));
        }
        for (slot, index) in indices.iter_mut().zip(self.features.keys()) {
            *slot = *index;
        }
        Ok(())
    }
}

impl MsrIo for FakeSystem {
    /// The system fd has no KVM_SET_MSRS (`kvm_arch_dev_ioctl`, Linux 6.1): -EINVAL.
    fn set_msr(&self, _index: u32, _data: u64) -> Result<bool, Errno> {
        Err(Errno::new(libc::EINVAL))
    }

    /// `KVM_GET_MSRS` on the system fd: `msr_io(NULL, ..., do_get_feature_msr)` with
    /// `kvm_get_msr_feature` (Linux 6.1); an index that is not a feature MSR fails, so 0
    /// entries are processed.
    fn get_msr(&self, index: u32) -> Result<Option<u64>, Errno> {
        Ok(self.features.get(&index).copied())
    }
}
