//! `vmm-reference probe`: what this host's KVM offers each workspace crate, from each crate's
//! own probe, as text or JSON.

use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;
use xstate_perm::{SystemHost, XsaveLayout, XstateHost};

/// Errors of the probe.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// msr-featctl's probe failed.
    #[error("IA32_FEATURE_CONTROL probe failed")]
    FeatCtl(#[source] msr_featctl::mode::Error),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// One VM type in the JSON report.
#[derive(Debug, Serialize)]
pub struct VmTypeJson {
    /// Constant name.
    pub name: &'static str,
    /// Raw value.
    pub raw: u32,
    /// Reported by `KVM_CAP_VM_TYPES`.
    pub supported: bool,
    /// Guest state is protected from the VMM.
    pub protected_state: bool,
    /// Private memory through guest_memfd.
    pub private_memory: bool,
    /// Sync regs allowed by type.
    pub allows_sync_regs: bool,
    /// Read-only memslots allowed by type.
    pub allows_readonly_memslots: bool,
    /// VM-level `KVM_CAP_SYNC_REGS` of a created VM of this type, when one was created.
    pub observed_sync_regs: Option<i32>,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct ProbeReport {
    /// KVM vendor module in /sys/module.
    pub vendor_module: Option<&'static str>,
    /// `KVM_GET_API_VERSION`.
    pub api_version: i32,
    /// `KVM_CAP_MAX_VCPUS`.
    pub max_vcpus: usize,
    /// Raw `KVM_CAP_SYNC_REGS`.
    pub sync_regs_mask: i32,
    /// The sets named by it (sync-regs' names).
    pub sync_regs_sets: String,
    /// Raw `KVM_CAP_VM_TYPES`.
    pub vm_types_capability: i32,
    /// Every known VM type.
    pub vm_types: Vec<VmTypeJson>,
    /// `ARCH_GET_XCOMP_SUPP`.
    pub xstate_cpu_supported: Option<u64>,
    /// `KVM_X86_XCOMP_GUEST_SUPP`.
    pub xstate_kvm_supported: Option<u64>,
    /// `ARCH_GET_XCOMP_GUEST_PERM`.
    pub xstate_guest_permitted: Option<u64>,
    /// `KVM_CAP_XSAVE2` (bytes of the `KVM_GET_XSAVE2` buffer).
    pub xsave2_size: i32,
    /// The largest standard-format XSAVE size from KVM's CPUID leaf 0xD.
    pub xsave_max_standard_size: Option<u32>,
    /// The IA32_FEATURE_CONTROL mode msr-featctl chooses (native or emulated) and why.
    pub feature_control: String,
    /// `KVM_CAP_X86_USER_SPACE_MSR`.
    pub user_space_msr: bool,
    /// `KVM_CAP_X86_MSR_FILTER`.
    pub msr_filter: bool,
    /// Human-readable sections from each crate's report.
    #[serde(skip)]
    text: Vec<(String, String)>,
}

/// Probes the host.
pub fn probe() -> Result<ProbeReport> {
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    let sync_regs_mask = kvm.check_extension_int(Cap::SyncRegs);
    let sync_regs_sets = match sync_regs::RegSet::from_bits(sync_regs_mask.max(0) as u64) {
        Ok(set) => set.to_string(),
        Err(unknown) => format!("{unknown}"),
    };
    let vm_report = vm_types::probe(&kvm);
    let vm_types = vm_report
        .types
        .iter()
        .map(|e| VmTypeJson {
            name: e.vm_type.constant_name(),
            raw: e.vm_type.raw(),
            supported: e.supported,
            protected_state: e.vm_type.has_protected_state(),
            private_memory: e.vm_type.has_private_memory(),
            allows_sync_regs: e.vm_type.allows_sync_regs(),
            allows_readonly_memslots: e.vm_type.allows_readonly_memslots(),
            observed_sync_regs: e
                .observed
                .as_ref()
                .and_then(|o| o.as_ref().ok())
                .map(|o| o.sync_regs),
        })
        .collect();
    let host = SystemHost::new(&kvm);
    let cpu = host.cpu_supported().ok();
    let kvm_supp = host.kvm_guest_supported().ok().flatten();
    let permitted = host.guest_permitted().ok();
    let layout = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .ok()
        .and_then(|c| XsaveLayout::from_kvm_cpuid(&c).ok());
    let feat = msr_featctl::probe(&kvm).map_err(Error::FeatCtl)?;
    let vendor_module = feat.vendor_module;
    let xsave2_size = kvm.check_extension_int(Cap::Xsave2);
    let show = |s: Option<xstate_perm::XFeatureSet>| {
        s.map_or_else(|| "unavailable".to_string(), |s| s.to_string())
    };
    let text = vec![
        (
            "sync-regs".to_string(),
            format!("KVM_CAP_SYNC_REGS = {sync_regs_mask:#x}: {sync_regs_sets}"),
        ),
        ("vm-types".to_string(), vm_report.to_string()),
        (
            "xstate-perm".to_string(),
            format!(
                "CPU supported:   {}\nKVM supported:   {}\nguest permitted: {}\nKVM_CAP_XSAVE2:  {} bytes\nmax standard XSAVE size: {}",
                show(cpu),
                show(kvm_supp),
                show(permitted),
                xsave2_size,
                layout.as_ref().map_or_else(|| "unknown".into(), |l| format!("{} bytes", l.max_standard_size()))
            ),
        ),
        ("msr-featctl".to_string(), feat.to_string()),
    ];
    Ok(ProbeReport {
        vendor_module,
        api_version: kvm.get_api_version(),
        max_vcpus: kvm.get_max_vcpus(),
        sync_regs_mask,
        sync_regs_sets,
        vm_types_capability: vm_report.capability,
        vm_types,
        xstate_cpu_supported: cpu.map(|s| s.bits()),
        xstate_kvm_supported: kvm_supp.map(|s| s.bits()),
        xstate_guest_permitted: permitted.map(|s| s.bits()),
        xsave2_size,
        xsave_max_standard_size: layout.map(|l| l.max_standard_size()),
        feature_control: feat
            .automatic
            .as_ref()
            .map_or_else(|why| format!("unavailable: {why}"), |r| r.to_string()),
        user_space_msr: feat.user_space_msr,
        msr_filter: feat.msr_filter,
        text,
    })
}

impl std::fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "KVM API {} on {}, up to {} vCPUs",
            self.api_version,
            self.vendor_module.unwrap_or("an unknown vendor module"),
            self.max_vcpus
        )?;
        for (name, body) in &self.text {
            writeln!(f, "\n== {name}")?;
            writeln!(f, "{}", body.trim_end())?;
        }
        write!(
            f,
            "\n== MSR filters\nKVM_CAP_X86_USER_SPACE_MSR: {}\nKVM_CAP_X86_MSR_FILTER: {}",
            self.user_space_msr, self.msr_filter
        )
    }
}
