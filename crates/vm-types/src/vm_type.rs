//! The x86 KVM VM types and the properties KVM derives from each.
//!
//! Linux 6.8 made the `KVM_CREATE_VM` argument on x86 an enumerated VM type. In the review
//! that shaped the confidential-computing types (Paolo Bonzini's series "KVM: SEV: allow
//! SEV-ES VMs to use the new VM types", Linux 6.10) the maintainers chose plain enumerated
//! types with properties derived from them, rather than capability bits aliased into type
//! numbers. KVM keeps two of those properties per VM in `struct kvm_arch`:
//!
//! * `has_private_mem` — the VM can map guest_memfd-backed *private* memory;
//! * `has_protected_state` — the vCPU register state lives in hardware-protected storage
//!   (the SEV-ES/SNP VMSA, the TDX TD VMCS) that KVM itself cannot read or write.
//!
//! and derives the rest (sync regs, read-only memslots) from them. [`VmType`] mirrors both and
//! the derived rules; each method's documentation says which kernel code and release it
//! mirrors.

use std::fmt;

use thiserror::Error;

use crate::sys;

/// A raw VM type value this crate does not know.
///
/// Kernels newer than this crate may add types (the enum is `#[non_exhaustive]` for that);
/// [`crate::create_vm_raw`] can still create such a VM when the host reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("unknown KVM VM type {raw}: this crate knows types 0 (DEFAULT) to 5 (TDX)")]
pub struct UnknownVmType {
    /// The value that was given.
    pub raw: u64,
}

/// A Linux release, `major.minor`, in which a behaviour appeared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinuxVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl LinuxVersion {
    /// `major.minor`.
    pub const fn new(major: u32, minor: u32) -> Self {
        LinuxVersion { major, minor }
    }
}

impl fmt::Display for LinuxVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// An x86 KVM VM type, the argument of `KVM_CREATE_VM`
/// (arch/x86/include/uapi/asm/kvm.h, values in [`crate::sys`]).
///
/// ```
/// use vm_types::{LaunchFlow, VmType};
///
/// let ty = VmType::try_from(4u64)?;
/// assert_eq!(ty, VmType::Snp);
/// assert!(ty.has_protected_state() && ty.has_private_memory() && !ty.allows_sync_regs());
/// assert_eq!(ty.launch_flow(), Some(LaunchFlow::Snp));
/// assert_eq!(ty.introduced_in().to_string(), "6.11");
/// assert!(VmType::try_from(6u64).is_err());
/// # Ok::<(), vm_types::UnknownVmType>(())
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum VmType {
    /// `KVM_X86_DEFAULT_VM` (0): an ordinary VM. Type 0 is what `KVM_CREATE_VM` has always
    /// taken on x86; it got its name with the other types in Linux 6.8.
    Default = sys::KVM_X86_DEFAULT_VM,
    /// `KVM_X86_SW_PROTECTED_VM` (1, Linux 6.8): private memory through guest_memfd without
    /// hardware protection. The kernel documents it as a development and testing vehicle for
    /// guest_memfd only, not for real VMs (api.rst, KVM_CAP_VM_TYPES).
    SwProtected = sys::KVM_X86_SW_PROTECTED_VM,
    /// `KVM_X86_SEV_VM` (2, Linux 6.10): AMD SEV, guest memory encrypted by the CPU.
    Sev = sys::KVM_X86_SEV_VM,
    /// `KVM_X86_SEV_ES_VM` (3, Linux 6.10): AMD SEV-ES, memory and register state encrypted.
    SevEs = sys::KVM_X86_SEV_ES_VM,
    /// `KVM_X86_SNP_VM` (4, Linux 6.11): AMD SEV-SNP, SEV-ES plus integrity-protected private
    /// memory (the RMP), backed by guest_memfd.
    Snp = sys::KVM_X86_SNP_VM,
    /// `KVM_X86_TDX_VM` (5, Linux 6.16): Intel TDX trust domain.
    Tdx = sys::KVM_X86_TDX_VM,
}

/// The firmware launch protocol a VM type needs before its vCPUs can run.
///
/// The commands are `KVM_MEMORY_ENCRYPT_OP` sub-commands, in the order a VMM issues them
/// (Documentation/virt/kvm/x86/amd-memory-encryption.rst and intel-tdx.rst).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LaunchFlow {
    /// SEV launch: measured, encrypted memory; register state stays with KVM.
    Sev,
    /// SEV-ES launch: as SEV, plus `LAUNCH_UPDATE_VMSA`, which encrypts each vCPU's state.
    SevEs,
    /// SEV-SNP launch: pages are added to the guest's RMP-protected private memory.
    Snp,
    /// TDX: the TD is built page by page through the TDX module, then finalized.
    Tdx,
}

impl LaunchFlow {
    /// The `KVM_MEMORY_ENCRYPT_OP` sub-commands of this flow, in order.
    ///
    /// The SEV types with a `KVM_CREATE_VM` type start with `KVM_SEV_INIT2` (Linux 6.10; the
    /// older `KVM_SEV_INIT`/`KVM_SEV_ES_INIT` only work on `KVM_X86_DEFAULT_VM`). The names
    /// follow the kernel documentation named on [`LaunchFlow`].
    pub fn commands(self) -> &'static [&'static str] {
        match self {
            LaunchFlow::Sev => &[
                "KVM_SEV_INIT2",
                "KVM_SEV_LAUNCH_START",
                "KVM_SEV_LAUNCH_UPDATE_DATA",
                "KVM_SEV_LAUNCH_MEASURE",
                "KVM_SEV_LAUNCH_FINISH",
            ],
            LaunchFlow::SevEs => &[
                "KVM_SEV_INIT2",
                "KVM_SEV_LAUNCH_START",
                "KVM_SEV_LAUNCH_UPDATE_DATA",
                "KVM_SEV_LAUNCH_UPDATE_VMSA",
                "KVM_SEV_LAUNCH_MEASURE",
                "KVM_SEV_LAUNCH_FINISH",
            ],
            LaunchFlow::Snp => &[
                "KVM_SEV_INIT2",
                "KVM_SEV_SNP_LAUNCH_START",
                "KVM_SEV_SNP_LAUNCH_UPDATE",
                "KVM_SEV_SNP_LAUNCH_FINISH",
            ],
            LaunchFlow::Tdx => &[
                "KVM_TDX_INIT_VM",
                "KVM_TDX_INIT_VCPU",
                "KVM_TDX_INIT_MEM_REGION",
                "KVM_TDX_FINALIZE_VM",
            ],
        }
    }
}

impl fmt::Display for LaunchFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LaunchFlow::Sev => "SEV launch",
            LaunchFlow::SevEs => "SEV-ES launch",
            LaunchFlow::Snp => "SEV-SNP launch",
            LaunchFlow::Tdx => "TDX init",
        })
    }
}

impl VmType {
    /// Every type this crate knows, in raw-value order.
    pub const ALL: [VmType; 6] = [
        VmType::Default,
        VmType::SwProtected,
        VmType::Sev,
        VmType::SevEs,
        VmType::Snp,
        VmType::Tdx,
    ];

    /// The raw `KVM_CREATE_VM` argument.
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// The kernel's name for the type, e.g. `KVM_X86_SEV_ES_VM`.
    pub const fn constant_name(self) -> &'static str {
        match self {
            VmType::Default => "KVM_X86_DEFAULT_VM",
            VmType::SwProtected => "KVM_X86_SW_PROTECTED_VM",
            VmType::Sev => "KVM_X86_SEV_VM",
            VmType::SevEs => "KVM_X86_SEV_ES_VM",
            VmType::Snp => "KVM_X86_SNP_VM",
            VmType::Tdx => "KVM_X86_TDX_VM",
        }
    }

    /// The short name used by [`Display`](fmt::Display): `DEFAULT`, `SW_PROTECTED`, `SEV`,
    /// `SEV_ES`, `SNP`, `TDX` (the kernel constant without `KVM_X86_` and `_VM`).
    pub const fn name(self) -> &'static str {
        match self {
            VmType::Default => "DEFAULT",
            VmType::SwProtected => "SW_PROTECTED",
            VmType::Sev => "SEV",
            VmType::SevEs => "SEV_ES",
            VmType::Snp => "SNP",
            VmType::Tdx => "TDX",
        }
    }

    /// The Linux release whose `KVM_CREATE_VM` first accepts this type value.
    ///
    /// `Default` is 6.8, the release that introduced named types and `KVM_CAP_VM_TYPES`;
    /// type 0 itself has always been accepted.
    pub const fn introduced_in(self) -> LinuxVersion {
        match self {
            VmType::Default | VmType::SwProtected => LinuxVersion::new(6, 8),
            VmType::Sev | VmType::SevEs => LinuxVersion::new(6, 10),
            VmType::Snp => LinuxVersion::new(6, 11),
            VmType::Tdx => LinuxVersion::new(6, 16),
        }
    }

    /// Whether the VM has *private memory*: guest_memfd-backed memory that userspace cannot
    /// map, selected per page with `KVM_SET_MEMORY_ATTRIBUTES`.
    ///
    /// Mirrors `kvm->arch.has_private_mem`: set for `SW_PROTECTED` in `kvm_arch_init_vm()`
    /// (arch/x86/kvm/x86.c, Linux 6.8), for `SNP` in `svm_vm_init()` (arch/x86/kvm/svm/svm.c,
    /// Linux 6.11) and for `TDX` in `tdx_vm_init()` (arch/x86/kvm/vmx/tdx.c, Linux 6.16).
    ///
    /// `SEV` and `SEV_ES` are *not* private-memory types in this sense: their memory is
    /// encrypted by the CPU (see [`VmType::has_encrypted_memory`]) but is ordinary,
    /// userspace-mapped memory to KVM.
    pub const fn has_private_memory(self) -> bool {
        matches!(self, VmType::SwProtected | VmType::Snp | VmType::Tdx)
    }

    /// Whether the CPU encrypts the guest's memory: every hardware confidential-computing type
    /// (SEV, SEV-ES, SEV-SNP, TDX). `SW_PROTECTED` only hides memory in software. This is a
    /// hardware fact, not a KVM field; it is here because it differs from
    /// [`VmType::has_private_memory`] for SEV and SEV-ES.
    pub const fn has_encrypted_memory(self) -> bool {
        matches!(
            self,
            VmType::Sev | VmType::SevEs | VmType::Snp | VmType::Tdx
        )
    }

    /// Whether the vCPU register state is protected from the host (SEV-ES, SEV-SNP, TDX).
    ///
    /// Mirrors `kvm->arch.has_protected_state`, added by "KVM: x86: add fields to struct
    /// kvm_arch for CoCo features" (Linux 6.10) and set in `svm_vm_init()` for `SEV_ES`
    /// (6.10) and `SNP` (6.11) and in `tdx_vm_init()` for `TDX` (6.16). On such VMs KVM
    /// fails `KVM_{GET,SET}_{REGS,SREGS,SREGS2,XCRS,DEBUGREGS}` with `EINVAL` once the
    /// vCPU's state has been protected, and `KVM_{GET,SET}_{FPU,XSAVE}`/`KVM_GET_XSAVE2` once
    /// its FPU state is confidential; [`crate::GuestStateGuard`] applies these and the other
    /// checks of [`crate::KernelRule`] in userspace. Plain `SEV` encrypts memory only: KVM
    /// still reads and writes its register state.
    pub const fn has_protected_state(self) -> bool {
        matches!(self, VmType::SevEs | VmType::Snp | VmType::Tdx)
    }

    /// Whether `KVM_CAP_SYNC_REGS` (register state copied through `kvm_run`) may be used.
    ///
    /// Mirrors `kvm_sync_valid_fields()` in arch/x86/kvm/x86.c from "KVM: x86: block
    /// KVM_CAP_SYNC_REGS if guest state is protected" (commit 74c1807f6c4f, Linux 6.15, also
    /// in stable releases): on a VM with
    /// protected state the VM-level `KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS)` returns 0 and
    /// `KVM_RUN` fails with `EINVAL` if `kvm_valid_regs` or `kvm_dirty_regs` is non-zero —
    /// regardless of whether the launch has finished. Older kernels accepted the request and
    /// silently could not honour it.
    pub const fn allows_sync_regs(self) -> bool {
        !self.has_protected_state()
    }

    /// Whether memslots may be created with `KVM_MEM_READONLY`.
    ///
    /// Mirrors `kvm_arch_has_readonly_mem(kvm)`, defined in arch/x86/include/asm/kvm_host.h
    /// as `!(kvm)->arch.has_protected_state` by "KVM: x86: Disallow read-only memslots for
    /// SEV-ES and SEV-SNP (and TDX)" (Linux 6.11). The VM-level
    /// `KVM_CHECK_EXTENSION(KVM_CAP_READONLY_MEM)` then reports 0 for these types. The rule
    /// follows protected *state*, not private memory: `SW_PROTECTED` and `SEV` VMs may have
    /// read-only memslots, though not guest_memfd-backed ones.
    pub const fn allows_readonly_memslots(self) -> bool {
        !self.has_protected_state()
    }

    /// Whether the VM needs a firmware launch flow before its vCPUs can run: SEV, SEV-ES,
    /// SEV-SNP (Linux 6.10/6.11; `svm_vm_init()` sets `need_init` for every non-default,
    /// non-`SW_PROTECTED` type, so `KVM_SEV_INIT2` must come first) and TDX (Linux 6.16,
    /// `KVM_TDX_INIT_VM`). See [`VmType::launch_flow`] for the commands.
    pub const fn needs_firmware_launch(self) -> bool {
        self.launch_flow().is_some()
    }

    /// The launch flow this type needs, if any.
    pub const fn launch_flow(self) -> Option<LaunchFlow> {
        match self {
            VmType::Default | VmType::SwProtected => None,
            VmType::Sev => Some(LaunchFlow::Sev),
            VmType::SevEs => Some(LaunchFlow::SevEs),
            VmType::Snp => Some(LaunchFlow::Snp),
            VmType::Tdx => Some(LaunchFlow::Tdx),
        }
    }
}

impl From<VmType> for u32 {
    fn from(ty: VmType) -> u32 {
        ty.raw()
    }
}

impl From<VmType> for u64 {
    fn from(ty: VmType) -> u64 {
        u64::from(ty.raw())
    }
}

impl TryFrom<u64> for VmType {
    type Error = UnknownVmType;

    fn try_from(raw: u64) -> Result<Self, UnknownVmType> {
        VmType::ALL
            .into_iter()
            .find(|ty| u64::from(ty.raw()) == raw)
            .ok_or(UnknownVmType { raw })
    }
}

impl TryFrom<u32> for VmType {
    type Error = UnknownVmType;

    fn try_from(raw: u32) -> Result<Self, UnknownVmType> {
        VmType::try_from(u64::from(raw))
    }
}

impl fmt::Display for VmType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn raw_values_match_the_uapi_header() {
        let expected = [
            (VmType::Default, 0),
            (VmType::SwProtected, 1),
            (VmType::Sev, 2),
            (VmType::SevEs, 3),
            (VmType::Snp, 4),
            (VmType::Tdx, 5),
        ];
        for (ty, raw) in expected {
            assert_eq!(ty.raw(), raw, "{ty}");
            assert_eq!(VmType::try_from(raw), Ok(ty));
            assert_eq!(u32::from(ty), raw);
            assert_eq!(u64::from(ty), u64::from(raw));
        }
        assert_eq!(VmType::ALL.len(), expected.len());
    }

    #[test]
    fn property_table() {
        // (type, private memory, encrypted memory, protected state, launch flow)
        let table = [
            (VmType::Default, false, false, false, None),
            (VmType::SwProtected, true, false, false, None),
            (VmType::Sev, false, true, false, Some(LaunchFlow::Sev)),
            (VmType::SevEs, false, true, true, Some(LaunchFlow::SevEs)),
            (VmType::Snp, true, true, true, Some(LaunchFlow::Snp)),
            (VmType::Tdx, true, true, true, Some(LaunchFlow::Tdx)),
        ];
        for (ty, private, encrypted, protected, flow) in table {
            assert_eq!(ty.has_private_memory(), private, "{ty} private memory");
            assert_eq!(
                ty.has_encrypted_memory(),
                encrypted,
                "{ty} encrypted memory"
            );
            assert_eq!(ty.has_protected_state(), protected, "{ty} protected state");
            assert_eq!(ty.allows_sync_regs(), !protected, "{ty} sync regs");
            assert_eq!(
                ty.allows_readonly_memslots(),
                !protected,
                "{ty} read-only slots"
            );
            assert_eq!(ty.launch_flow(), flow, "{ty} launch flow");
            assert_eq!(
                ty.needs_firmware_launch(),
                flow.is_some(),
                "{ty} needs launch"
            );
        }
    }

    #[test]
    fn names_and_versions() {
        assert_eq!(VmType::SevEs.to_string(), "SEV_ES");
        assert_eq!(VmType::SevEs.constant_name(), "KVM_X86_SEV_ES_VM");
        assert_eq!(VmType::Default.introduced_in().to_string(), "6.8");
        assert_eq!(VmType::SwProtected.introduced_in().to_string(), "6.8");
        assert_eq!(VmType::Sev.introduced_in().to_string(), "6.10");
        assert_eq!(VmType::SevEs.introduced_in().to_string(), "6.10");
        assert_eq!(VmType::Snp.introduced_in().to_string(), "6.11");
        assert_eq!(VmType::Tdx.introduced_in().to_string(), "6.16");
        for ty in VmType::ALL {
            assert_eq!(format!("KVM_X86_{}_VM", ty.name()), ty.constant_name());
        }
    }

    #[test]
    fn launch_flows_name_their_commands() {
        assert_eq!(LaunchFlow::Sev.commands()[0], "KVM_SEV_INIT2");
        assert!(LaunchFlow::SevEs
            .commands()
            .contains(&"KVM_SEV_LAUNCH_UPDATE_VMSA"));
        assert!(!LaunchFlow::Sev
            .commands()
            .contains(&"KVM_SEV_LAUNCH_UPDATE_VMSA"));
        assert_eq!(LaunchFlow::Tdx.commands()[0], "KVM_TDX_INIT_VM");
        assert_eq!(LaunchFlow::Snp.to_string(), "SEV-SNP launch");
        assert_eq!(LaunchFlow::Tdx.to_string(), "TDX init");
        assert_eq!(LaunchFlow::Sev.to_string(), "SEV launch");
        assert_eq!(LaunchFlow::SevEs.to_string(), "SEV-ES launch");
    }

    #[test]
    fn unknown_values_are_refused_with_the_value() {
        for raw in [6u64, 31, 32, 256, u64::from(u32::MAX), u64::MAX] {
            let err = VmType::try_from(raw).unwrap_err();
            assert_eq!(err.raw, raw);
            assert!(err.to_string().contains(&raw.to_string()), "{err}");
        }
    }

    proptest! {
        #[test]
        fn conversion_round_trips(raw in any::<u64>()) {
            match VmType::try_from(raw) {
                Ok(ty) => prop_assert_eq!(u64::from(ty), raw),
                Err(e) => {
                    prop_assert!(raw > 5);
                    prop_assert_eq!(e.raw, raw);
                }
            }
        }

        #[test]
        fn u32_and_u64_conversions_agree(raw in any::<u32>()) {
            prop_assert_eq!(VmType::try_from(raw), VmType::try_from(u64::from(raw)));
        }

        #[test]
        fn properties_are_consistent(index in 0usize..VmType::ALL.len()) {
            let ty = VmType::ALL[index];
            // Protected state is only reachable through a firmware launch.
            prop_assert!(!ty.has_protected_state() || ty.needs_firmware_launch());
            // Private memory is either the software type or a hardware one.
            prop_assert!(!ty.has_private_memory()
                || ty == VmType::SwProtected
                || ty.has_encrypted_memory());
            // Hardware encryption always comes with a launch flow.
            prop_assert_eq!(ty.has_encrypted_memory(), ty.needs_firmware_launch());
            prop_assert!(ty.introduced_in() >= LinuxVersion::new(6, 8));
        }
    }
}
