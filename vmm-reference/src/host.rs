//! Whether this host's KVM can run a stock Linux guest at all.
//!
//! KVM's vendor module decides it. `kvm_intel` (VMX) and `kvm_amd` (SVM) run one with
//! hardware virtualization. `kvm_pvm` (pagetable-based virtual machine) runs guest ring 0
//! without VMX or SVM: small purpose-built guests work, but a stock kernel only a PVM-enabled
//! guest kernel would boot soon stops in emulation failures or crawls, with nothing on the
//! console, so the VMM refuses before it starts the guest instead of hanging silently.

use std::path::Path;

/// The vendor modules that run a stock Linux guest.
pub const HARDWARE_MODULES: [&str; 2] = ["kvm_intel", "kvm_amd"];
/// Vendor modules known to be loaded for `/dev/kvm` that cannot.
pub const SOFTWARE_MODULES: [&str; 1] = ["kvm_pvm"];

/// Why this host's KVM cannot run the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    /// A vendor module without hardware virtualization backs `/dev/kvm`.
    #[error(
        "this host's /dev/kvm is backed by {module}, which cannot run a stock Linux kernel \
         (it has no VMX/SVM; the guest would stop or crawl with no output); boot needs kvm_intel \
         or kvm_amd, e.g. inside the nested test host (`cargo xtask nested`)"
    )]
    SoftwareKvm {
        /// The module, e.g. `kvm_pvm`.
        module: &'static str,
    },
    /// No vendor module is loaded at all.
    #[error("no KVM vendor module (kvm_intel or kvm_amd) is loaded on this host")]
    NoVendorModule,
}

/// Checks the vendor modules present under `sys_module` (`/sys/module` on a live host).
///
/// # Errors
///
/// [`Unsupported`] when neither `kvm_intel` nor `kvm_amd` is loaded.
pub fn check_vendor_module(sys_module: &Path) -> Result<&'static str, Unsupported> {
    if let Some(m) = HARDWARE_MODULES
        .iter()
        .find(|m| sys_module.join(m).exists())
    {
        return Ok(m);
    }
    match SOFTWARE_MODULES
        .iter()
        .find(|m| sys_module.join(m).exists())
    {
        Some(module) => Err(Unsupported::SoftwareKvm { module }),
        None => Err(Unsupported::NoVendorModule),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_module_decides() {
        let root = std::env::temp_dir().join(format!("vmmref-host-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("kvm")).unwrap();
        assert_eq!(check_vendor_module(&root), Err(Unsupported::NoVendorModule));
        std::fs::create_dir_all(root.join("kvm_pvm")).unwrap();
        let e = check_vendor_module(&root).unwrap_err();
        assert_eq!(e, Unsupported::SoftwareKvm { module: "kvm_pvm" });
        assert!(e.to_string().contains("backed by kvm_pvm"));
        std::fs::create_dir_all(root.join("kvm_amd")).unwrap();
        assert_eq!(check_vendor_module(&root), Ok("kvm_amd"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
