//! A report of the host's VM types and what each implies, for a VMM to print.
//!
//! Besides the static properties, the report creates one VM of each supported type and asks
//! it, on its own fd, for `KVM_CAP_SYNC_REGS` and `KVM_CAP_READONLY_MEM`: kernels that know
//! the per-type rules answer 0 there for types that forbid them, so the report shows what
//! this host's kernel actually enforces next to what this crate derives from the type. It
//! also asks `/dev/kvm` for the VMSA SEV features (`KVM_X86_SEV_VMSA_FEATURES`, see
//! [`crate::vmsa`]).

use std::fmt;

use kvm_ioctls::{Kvm, VmFd};

use crate::host::{self, raw_capability, VmTypeSet};
use crate::sys;
use crate::vmsa::{self, VmsaFeaturesQuery};
use crate::VmType;

/// What a VM's own fd reports for the capabilities that depend on the VM type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedVmCaps {
    /// VM-level `KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS)`: the sync-regs fields (0 = none).
    pub sync_regs: i32,
    /// VM-level `KVM_CHECK_EXTENSION(KVM_CAP_READONLY_MEM)`: non-zero if read-only memslots
    /// are allowed.
    pub readonly_mem: i32,
}

impl ObservedVmCaps {
    /// Asks `vm` for the type-dependent capabilities.
    pub fn of(vm: &VmFd) -> Self {
        ObservedVmCaps {
            sync_regs: vm.check_extension_raw(libc::c_ulong::from(sys::KVM_CAP_SYNC_REGS)),
            readonly_mem: vm.check_extension_raw(libc::c_ulong::from(sys::KVM_CAP_READONLY_MEM)),
        }
    }

    /// Whether the kernel reports sync regs as usable on this VM.
    pub fn allows_sync_regs(&self) -> bool {
        self.sync_regs > 0
    }

    /// Whether the kernel reports read-only memslots as usable on this VM.
    pub fn allows_readonly_memslots(&self) -> bool {
        self.readonly_mem > 0
    }
}

/// One VM type in a [`VmTypeReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmTypeEntry {
    /// The type.
    pub vm_type: VmType,
    /// Whether the host reports it.
    pub supported: bool,
    /// For a supported type, what a freshly created VM of it reported, or why it could not
    /// be created.
    pub observed: Option<Result<ObservedVmCaps, kvm_ioctls::Error>>,
}

/// The host's VM types with their properties; `Display` prints a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmTypeReport {
    /// The raw `KVM_CAP_VM_TYPES` value.
    pub capability: i32,
    /// The supported set derived from it.
    pub supported: VmTypeSet,
    /// Every type this crate knows, supported or not.
    pub types: Vec<VmTypeEntry>,
    /// The answer to `KVM_X86_SEV_VMSA_FEATURES`, or the error of the query.
    pub vmsa_features: Result<VmsaFeaturesQuery, kvm_ioctls::Error>,
}

/// Queries the host: `KVM_CAP_VM_TYPES`, for each supported type a VM created and asked for
/// its type-dependent capabilities, then closed again, and the VMSA SEV features.
pub fn probe(kvm: &Kvm) -> VmTypeReport {
    let capability = raw_capability(kvm);
    let supported = VmTypeSet::from_capability(capability);
    let types = VmType::ALL
        .into_iter()
        .map(|vm_type| {
            let is_supported = supported.contains(vm_type);
            let observed = is_supported.then(|| {
                host::create_vm_raw_with(kvm, u64::from(vm_type), supported)
                    .map(|vm| ObservedVmCaps::of(&vm))
                    .map_err(|e| match e {
                        host::Error::CreateVm { source, .. } => source,
                        // The type was checked as supported just above.
                        _ => kvm_ioctls::Error::new(libc::EINVAL),
                    })
            });
            VmTypeEntry {
                vm_type,
                supported: is_supported,
                observed,
            }
        })
        .collect();
    let vmsa_features = vmsa::sev_vmsa_features(kvm).map_err(|e| match e {
        vmsa::Error::GetDeviceAttr { source } => source,
    });
    VmTypeReport {
        capability,
        supported,
        types,
        vmsa_features,
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl fmt::Display for VmTypeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.supported.reported_by_kernel() {
            writeln!(
                f,
                "KVM_CAP_VM_TYPES = {:#x}: supported VM types {{{}}}",
                self.capability, self.supported
            )?;
        } else {
            writeln!(
                f,
                "KVM_CAP_VM_TYPES not reported (value {}): a kernel before Linux 6.8, DEFAULT only",
                self.capability
            )?;
        }
        writeln!(
            f,
            "{:<13} {:>3} {:>5} {:>9} {:>7} {:>9} {:>9} {:>9} {:>11}  launch",
            "type",
            "raw",
            "since",
            "supported",
            "private",
            "encrypted",
            "protected",
            "sync-regs",
            "ro-memslots"
        )?;
        for entry in &self.types {
            let ty = entry.vm_type;
            writeln!(
                f,
                "{:<13} {:>3} {:>5} {:>9} {:>7} {:>9} {:>9} {:>9} {:>11}  {}",
                ty.name(),
                ty.raw(),
                ty.introduced_in().to_string(),
                yes_no(entry.supported),
                yes_no(ty.has_private_memory()),
                yes_no(ty.has_encrypted_memory()),
                yes_no(ty.has_protected_state()),
                yes_no(ty.allows_sync_regs()),
                yes_no(ty.allows_readonly_memslots()),
                ty.launch_flow()
                    .map_or_else(|| "none".to_string(), |flow| flow.to_string()),
            )?;
        }
        for entry in &self.types {
            match &entry.observed {
                Some(Ok(caps)) => writeln!(
                    f,
                    "{} VM as created here: KVM_CAP_SYNC_REGS = {:#x}, KVM_CAP_READONLY_MEM = {}",
                    entry.vm_type, caps.sync_regs, caps.readonly_mem
                )?,
                Some(Err(e)) => writeln!(
                    f,
                    "{} VM could not be created although reported: {e}",
                    entry.vm_type
                )?,
                None => {}
            }
        }
        for raw in self.supported.unknown_types() {
            writeln!(f, "type {raw} is reported but unknown to this crate")?;
        }
        match &self.vmsa_features {
            Ok(answer) => writeln!(f, "KVM_X86_SEV_VMSA_FEATURES: {answer}")?,
            Err(e) => writeln!(f, "KVM_X86_SEV_VMSA_FEATURES: query failed: {e}")?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(
        capability: i32,
        observed: Option<Result<ObservedVmCaps, kvm_ioctls::Error>>,
        vmsa_features: Result<VmsaFeaturesQuery, kvm_ioctls::Error>,
    ) -> VmTypeReport {
        let supported = VmTypeSet::from_capability(capability);
        VmTypeReport {
            capability,
            supported,
            types: VmType::ALL
                .into_iter()
                .map(|vm_type| VmTypeEntry {
                    vm_type,
                    supported: supported.contains(vm_type),
                    observed: if vm_type == VmType::Default {
                        observed
                    } else {
                        None
                    },
                })
                .collect(),
            vmsa_features,
        }
    }

    #[test]
    fn display_shows_every_type_and_its_properties() {
        let text = report(
            0x81,
            Some(Ok(ObservedVmCaps {
                sync_regs: 7,
                readonly_mem: 1,
            })),
            Ok(VmsaFeaturesQuery::Supported(
                crate::VmsaFeatures::from_bits(0x20),
            )),
        )
        .to_string();
        assert!(
            text.starts_with("KVM_CAP_VM_TYPES = 0x81: supported VM types {DEFAULT, type 7}"),
            "{text}"
        );
        for ty in VmType::ALL {
            assert!(
                text.lines().any(|l| l.starts_with(ty.name())),
                "{ty} missing:\n{text}"
            );
        }
        let tdx = text
            .lines()
            .find(|l| l.starts_with("TDX"))
            .expect("TDX row");
        assert!(tdx.ends_with("TDX init"), "{tdx}");
        let default = text
            .lines()
            .find(|l| l.starts_with("DEFAULT "))
            .expect("DEFAULT row");
        assert!(default.ends_with("none"), "{default}");
        assert!(
            text.contains(
                "DEFAULT VM as created here: KVM_CAP_SYNC_REGS = 0x7, KVM_CAP_READONLY_MEM = 1"
            ),
            "{text}"
        );
        assert!(text.contains("type 7 is reported but unknown"), "{text}");
        assert!(
            text.ends_with("KVM_X86_SEV_VMSA_FEATURES: 0x20 (DebugSwap)\n"),
            "{text}"
        );
    }

    #[test]
    fn display_for_a_kernel_without_the_capability() {
        let text = report(
            0,
            Some(Err(kvm_ioctls::Error::new(libc::ENOMEM))),
            Ok(VmsaFeaturesQuery::NoSystemAttributes),
        )
        .to_string();
        assert!(text.starts_with("KVM_CAP_VM_TYPES not reported"), "{text}");
        assert!(text.contains("DEFAULT VM could not be created"), "{text}");
        assert!(
            text.contains("KVM_X86_SEV_VMSA_FEATURES: not queryable"),
            "{text}"
        );
        let text = report(1, None, Err(kvm_ioctls::Error::new(libc::EFAULT))).to_string();
        assert!(
            text.contains("KVM_X86_SEV_VMSA_FEATURES: query failed"),
            "{text}"
        );
        let text = report(1, None, Ok(VmsaFeaturesQuery::NotOffered)).to_string();
        assert!(text.contains("not offered (ENXIO"), "{text}");
    }

    #[test]
    fn observed_caps_predicates() {
        let caps = ObservedVmCaps {
            sync_regs: 0,
            readonly_mem: 1,
        };
        assert!(!caps.allows_sync_regs());
        assert!(caps.allows_readonly_memslots());
    }
}
