//! The guest-permission request, made in line with KVM's policy, and its proof value.
//!
//! Since Linux 5.17 a dynamic XSTATE component (AMX tile data, component 18) reaches a KVM
//! guest only if the VMM process holds the *guest* permission for it, and that permission
//! is frozen when the process creates its first vCPU (`ARCH_REQ_XCOMP_GUEST_PERM` then
//! fails with `EBUSY`). There are two doors in:
//!
//! * [`GuestPermission::request_for_cpuid`], the recommended one: give it the CPUID the VMM
//!   intends to set with `KVM_SET_CPUID2`, and it asks for exactly the dynamic components
//!   that table needs ([`crate::cpuid::required_permission`]). The permission then follows
//!   the guest CPUID, and [`GuestPermission::check_cpuid`] says before `KVM_SET_CPUID2`
//!   whether KVM would refuse the table with `EPERM`, naming the component.
//! * [`GuestPermission::request`] and [`GuestPermission::request_feature`], from a set of
//!   features; [`GuestPermission::guest_cpuid`] then limits a table to what was granted.
//!
//! Both apply one policy:
//!
//! 1. Refuse bits no kernel names ([`RequestError::UnknownComponent`]) and supervisor
//!    components, which the guest permission does not cover.
//! 2. Ask only for what the CPU supports (`ARCH_GET_XCOMP_SUPP`) and what KVM will expose
//!    (`KVM_X86_XCOMP_GUEST_SUPP`), and say which of the two is missing. Where the attribute
//!    does not exist (before 5.17) stop with [`RequestError::KernelTooOld`] rather than
//!    guess.
//! 3. If the process already holds everything asked for, succeed with no request.
//! 4. Otherwise ask for each missing dynamic component. The kernel grants exactly the
//!    components its `xstate_prctl_req` table lists for the number asked
//!    (`xstate_request_perm`, arch/x86/kernel/fpu/xstate.c): for 18, tile data alone.
//!    The request goes first through the proposed `KVM_X86_XCOMP_GUEST_PERM` attribute, so
//!    that a kernel carrying it applies KVM's own check, and falls back to
//!    `arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)` where the kernel has no such attribute
//!    (`EINVAL` or `ENXIO`). [`GuestPermission::requested_via`] says which door granted it.
//!    The result is checked by reading the permission back.
//!
//! # Ordering across crates
//!
//! Creating any vCPU in the process — a scratch vCPU of a probe included — freezes the
//! guest permission, so the request has to come before every vCPU the process creates, in
//! every crate. The [`GuestPermission`] value is the proof that it did: it can only be made
//! by a request, so code that takes `&GuestPermission` (or creates vCPUs through
//! [`GuestPermission::create_vcpu`]) cannot run before it. A crate that creates vCPUs of
//! its own should take `&GuestPermission` in the function that does so.

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuFd, VmFd};

use crate::host::{self, RequestPath, XstateHost};
use crate::layout::{self, XsaveLayout};
use crate::xfeature::{XFeature, XFeatureSet};

/// Why a guest permission could not be had. Each variant says exactly which party refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request names bits this crate (and any released kernel) has no component for.
    #[error("unknown XSTATE components {unknown}")]
    UnknownComponent {
        /// The unknown bits.
        unknown: XFeatureSet,
    },
    /// Supervisor (IA32_XSS) components are not covered by the guest permission.
    #[error("{components} are supervisor components, outside the guest permission")]
    SupervisorComponent {
        /// The supervisor components asked for.
        components: XFeatureSet,
    },
    /// The CPU lacks the features, or the host kernel did not enable them in XCR0.
    #[error("the CPU lacks {missing} (host kernel supports {supported})")]
    CpuLacks {
        /// What was asked for and is missing.
        missing: XFeatureSet,
        /// `ARCH_GET_XCOMP_SUPP`.
        supported: XFeatureSet,
    },
    /// The CPU has the features but KVM will not expose them to guests.
    #[error(
        "KVM will not expose {missing} to guests (KVM_X86_XCOMP_GUEST_SUPP is {kvm_supported})"
    )]
    KvmWillNotExpose {
        /// What was asked for and KVM does not expose.
        missing: XFeatureSet,
        /// `KVM_X86_XCOMP_GUEST_SUPP`.
        kvm_supported: XFeatureSet,
    },
    /// The kernel predates the interface (Linux 5.17 for the guest permission and the KVM
    /// attribute) or the component.
    #[error("the kernel is too old: {interface} is missing (needs Linux 5.17 or later)")]
    KernelTooOld {
        /// The missing interface.
        interface: &'static str,
        /// The failed call, where one failed.
        #[source]
        source: Option<host::Error>,
    },
    /// A vCPU already exists in this process, so the guest permission is frozen.
    #[error("too late: a vCPU already exists in this process, so the guest permission for {missing} can no longer be granted")]
    TooLate {
        /// What was asked for and not yet permitted.
        missing: XFeatureSet,
        /// The `EBUSY` from the kernel.
        #[source]
        source: host::Error,
    },
    /// The kernel knows the component but has no permission to grant for it.
    #[error("the kernel has no guest permission to grant for {missing}")]
    NotRequestable {
        /// What was asked for and not permitted.
        missing: XFeatureSet,
        /// The kernel's answer, where it was asked.
        #[source]
        source: Option<host::Error>,
    },
    /// Querying the host failed.
    #[error("querying the host's XSTATE support failed")]
    Query(#[source] host::Error),
    /// The request failed in a way the kernel does not document.
    #[error("the guest permission request failed")]
    Request(#[source] host::Error),
    /// The kernel accepted the request but the permission read back lacks features.
    #[error(
        "the kernel accepted the request, but the guest permission {permitted} lacks {missing}"
    )]
    NotGranted {
        /// The permission read back.
        permitted: XFeatureSet,
        /// What it lacks.
        missing: XFeatureSet,
    },
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, RequestError>;

/// Proof that this process holds the guest permission for a set of features, taken by the
/// code that creates vCPUs.
///
/// It can only be built by [`GuestPermission::request`] and its variants. The permission is
/// process-wide and, once a vCPU exists, frozen, so the values it carries stay true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPermission {
    permitted: XFeatureSet,
    kvm_supported: XFeatureSet,
    cpu_supported: XFeatureSet,
    requested_via: Option<RequestPath>,
}

/// What the dynamic features a permission grants cost per vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuCost {
    /// The components counted: the guest features among AMX (tile configuration and data).
    pub components: XFeatureSet,
    /// Their sizes added up.
    pub component_bytes: u32,
    /// Growth of the `KVM_GET_XSAVE2` buffer (standard format, at least 4096 bytes).
    pub xsave_buffer_bytes: u32,
    /// Growth of the guest FPU state the kernel allocates (compacted format).
    pub guest_fpstate_bytes: u32,
}

fn map_query(interface: &'static str) -> impl Fn(host::Error) -> RequestError {
    move |e| {
        if e.errno() == libc::EINVAL {
            RequestError::KernelTooOld {
                interface,
                source: Some(e),
            }
        } else {
            RequestError::Query(e)
        }
    }
}

/// The errno a kernel without the `KVM_X86_XCOMP_GUEST_PERM` attribute answers: `EINVAL`
/// where `/dev/kvm` has no `KVM_SET_DEVICE_ATTR` at all (mainline `kvm_arch_dev_ioctl`),
/// `ENXIO` where the handler exists but does not know the attribute.
fn no_attribute(e: &host::Error) -> bool {
    matches!(e.errno(), libc::EINVAL | libc::ENXIO)
}

fn classify(missing: XFeatureSet) -> impl Fn(host::Error) -> RequestError {
    move |e| match e.errno() {
        libc::EBUSY => RequestError::TooLate { missing, source: e },
        libc::EINVAL => RequestError::KernelTooOld {
            interface: "the component in ARCH_REQ_XCOMP_GUEST_PERM",
            source: Some(e),
        },
        libc::EOPNOTSUPP => RequestError::NotRequestable {
            missing,
            source: Some(e),
        },
        _ => RequestError::Request(e),
    }
}

/// Requests `component` through the KVM attribute, falling back to `arch_prctl` where the
/// kernel has no such attribute; returns the door that granted it.
fn request_component(
    host: &impl XstateHost,
    component: u32,
    missing: XFeatureSet,
) -> Result<RequestPath> {
    match host.request_guest_perm(RequestPath::KvmDeviceAttr, component) {
        Ok(()) => return Ok(RequestPath::KvmDeviceAttr),
        Err(e) if no_attribute(&e) => {}
        Err(e) => return Err(classify(missing)(e)),
    }
    host.request_guest_perm(RequestPath::ArchPrctl, component)
        .map_err(classify(missing))?;
    Ok(RequestPath::ArchPrctl)
}

fn kvm_guest_supported(host: &impl XstateHost) -> Result<XFeatureSet> {
    host.kvm_guest_supported()
        .map_err(RequestError::Query)?
        .ok_or(RequestError::KernelTooOld {
            interface: "KVM_X86_XCOMP_GUEST_SUPP",
            source: None,
        })
}

impl GuestPermission {
    /// Obtains the guest permission for `wanted`; see the [module docs](self) for the
    /// policy. Asking again for what is already permitted makes no request.
    ///
    /// # Errors
    ///
    /// [`RequestError`], whose variant says which party refused: the request itself
    /// (`UnknownComponent`, `SupervisorComponent`), the CPU (`CpuLacks`), KVM
    /// (`KvmWillNotExpose`), the kernel's age (`KernelTooOld`), the freeze after the first
    /// vCPU (`TooLate`), a component with nothing to grant (`NotRequestable`), or a failed
    /// call (`Query`, `Request`, `NotGranted`).
    pub fn request(host: &impl XstateHost, wanted: XFeatureSet) -> Result<Self> {
        let unknown = wanted.unnamed();
        if !unknown.is_empty() {
            return Err(RequestError::UnknownComponent { unknown });
        }
        let supervisor = wanted.intersection(XFeatureSet::SUPERVISOR);
        if !supervisor.is_empty() {
            return Err(RequestError::SupervisorComponent {
                components: supervisor,
            });
        }
        let cpu_supported = host
            .cpu_supported()
            .map_err(map_query("ARCH_GET_XCOMP_SUPP"))?;
        let missing = wanted.difference(cpu_supported);
        if !missing.is_empty() {
            return Err(RequestError::CpuLacks {
                missing,
                supported: cpu_supported,
            });
        }
        let kvm_supported = kvm_guest_supported(host)?;
        let missing = wanted.difference(kvm_supported);
        if !missing.is_empty() {
            return Err(RequestError::KvmWillNotExpose {
                missing,
                kvm_supported,
            });
        }
        let permitted = host
            .guest_permitted()
            .map_err(map_query("ARCH_GET_XCOMP_GUEST_PERM"))?;
        let missing = wanted.difference(permitted);
        let mut permission = GuestPermission {
            permitted,
            kvm_supported,
            cpu_supported,
            requested_via: None,
        };
        if missing.is_empty() {
            return Ok(permission);
        }
        // Non-dynamic features are permitted from the start; one that is supported and not
        // permitted is something the kernel will not grant.
        if !missing.difference(XFeatureSet::DYNAMIC).is_empty() {
            return Err(RequestError::NotRequestable {
                missing,
                source: None,
            });
        }
        let mut via = None;
        for component in missing.indices() {
            via = Some(request_component(host, component, missing)?);
        }
        let permitted = host
            .guest_permitted()
            .map_err(map_query("ARCH_GET_XCOMP_GUEST_PERM"))?;
        let missing = wanted.difference(permitted);
        if !missing.is_empty() {
            return Err(RequestError::NotGranted { permitted, missing });
        }
        permission.permitted = permitted;
        permission.requested_via = via;
        Ok(permission)
    }

    /// The CPUID-first door: obtains the guest permission the CPUID table `cpuid` needs —
    /// the one the VMM intends to give its vCPUs with `KVM_SET_CPUID2` — under the policy
    /// of [`Self::request`]. What is requested is
    /// [`crate::cpuid::required_permission`]: the dynamic components of leaf 0xD subleaf
    /// 0, and AMX where leaf 7 (or leaf 0x1D/0x1E) advertises it. A table without AMX makes
    /// no request.
    ///
    /// Follow it with [`Self::check_cpuid`] on the final table before `KVM_SET_CPUID2`.
    ///
    /// # Errors
    ///
    /// As [`Self::request`]: where the table asks for AMX the host cannot give, the error
    /// says whether the CPU or KVM lacks it.
    pub fn request_for_cpuid(host: &impl XstateHost, cpuid: &CpuId) -> Result<Self> {
        Self::request(host, crate::cpuid::required_permission(cpuid))
    }

    /// [`Self::request`] for one feature and what it needs alongside (tile configuration
    /// with tile data, as KVM exposes them only together).
    ///
    /// # Errors
    ///
    /// As [`Self::request`].
    pub fn request_feature(host: &impl XstateHost, feature: XFeature) -> Result<Self> {
        let wanted = XFeatureSet::from(feature);
        let wanted = if wanted.intersection(XFeatureSet::AMX).is_empty() {
            wanted
        } else {
            wanted.union(XFeatureSet::AMX)
        };
        Self::request(host, wanted)
    }

    /// [`Self::request`] for every user feature both the CPU and KVM support: the largest
    /// guest permission that complies with KVM's policy.
    ///
    /// # Errors
    ///
    /// As [`Self::request`].
    pub fn request_kvm_supported(host: &impl XstateHost) -> Result<Self> {
        let cpu = host
            .cpu_supported()
            .map_err(map_query("ARCH_GET_XCOMP_SUPP"))?;
        let kvm = kvm_guest_supported(host)?;
        let wanted = cpu
            .intersection(kvm)
            .intersection(XFeatureSet::NAMED)
            .difference(XFeatureSet::SUPERVISOR);
        Self::request(host, wanted)
    }

    /// The process's guest permission (`ARCH_GET_XCOMP_GUEST_PERM`) after the request.
    pub fn permitted(&self) -> XFeatureSet {
        self.permitted
    }

    /// `KVM_X86_XCOMP_GUEST_SUPP`: what KVM can expose to guests.
    pub fn kvm_supported(&self) -> XFeatureSet {
        self.kvm_supported
    }

    /// `ARCH_GET_XCOMP_SUPP`: what the CPU and host kernel support.
    pub fn cpu_supported(&self) -> XFeatureSet {
        self.cpu_supported
    }

    /// The door that granted the permission: [`RequestPath::KvmDeviceAttr`] on a kernel
    /// with the proposed attribute, [`RequestPath::ArchPrctl`] elsewhere; `None` when it was
    /// already held and no request was made.
    pub fn requested_via(&self) -> Option<RequestPath> {
        self.requested_via
    }

    /// The XCR0 features guests of this process can be given: KVM's supported set filtered
    /// by the permission, with tile configuration dropped unless tile data is permitted,
    /// as KVM computes it (`kvm_get_filtered_xcr0`, 5.17).
    pub fn guest_features(&self) -> XFeatureSet {
        kvm_filtered_xcr0(self.kvm_supported, self.permitted)
    }

    /// Checks a CPUID table against this permission before it is given to
    /// `KVM_SET_CPUID2`.
    ///
    /// # Errors
    ///
    /// [`CpuidError::WouldBeRefused`](crate::cpuid::CpuidError::WouldBeRefused), naming the
    /// component, where leaf 0xD subleaf 0 enables a dynamic component the process holds no
    /// permission for: KVM would answer `EPERM` (`kvm_check_cpuid`, arch/x86/kvm/cpuid.c,
    /// 5.17). [`CpuidError::AdvertisesUnusable`](crate::cpuid::CpuidError::AdvertisesUnusable)
    /// where the table tells the guest about components outside [`Self::guest_features`]
    /// (KVM accepts it, the guest is misled); [`Self::guest_cpuid`] removes those.
    pub fn check_cpuid(&self, cpuid: &CpuId) -> std::result::Result<(), crate::cpuid::CpuidError> {
        crate::cpuid::check(cpuid, self.permitted, self.guest_features())
    }

    /// What the dynamic features granted to guests cost per vCPU, from `layout` (read from
    /// `KVM_GET_SUPPORTED_CPUID` or the host CPU). Zero where guests get no AMX.
    ///
    /// # Errors
    ///
    /// [`layout::Error::NotInLayout`] where `layout` lacks a component guests can be given.
    pub fn cost(&self, layout: &XsaveLayout) -> layout::Result<VcpuCost> {
        let guest = self.guest_features();
        let components = guest.intersection(XFeatureSet::AMX);
        let without = guest.difference(components);
        let component_bytes = components
            .indices()
            .filter_map(|i| layout.component(i))
            .map(|c| c.size)
            .sum();
        let buffer = |set| layout.xsave2_size(set).map(|s| s as u32);
        Ok(VcpuCost {
            components,
            component_bytes,
            xsave_buffer_bytes: buffer(guest)? - buffer(without)?,
            guest_fpstate_bytes: layout.compacted_size(guest)? - layout.compacted_size(without)?,
        })
    }

    /// The `KVM_CAP_XSAVE2` size this permission implies, from `layout`.
    ///
    /// # Errors
    ///
    /// [`layout::Error::NotInLayout`] where `layout` lacks a component guests can be given.
    pub fn xsave2_size(&self, layout: &XsaveLayout) -> layout::Result<usize> {
        layout.xsave2_size(self.guest_features())
    }

    /// `supported` with every XSTATE advertisement outside [`Self::guest_features`]
    /// cleared; see [`layout::guest_cpuid`].
    ///
    /// # Errors
    ///
    /// [`layout::Error`] where leaf 0xD is missing or malformed.
    pub fn guest_cpuid(&self, supported: &CpuId) -> layout::Result<CpuId> {
        layout::guest_cpuid(supported, self.guest_features())
    }

    /// Creates vCPU `id` in `vm`. Taking the proof here is what orders the request before
    /// the first vCPU, after which the kernel freezes the permission.
    ///
    /// # Errors
    ///
    /// The `KVM_CREATE_VCPU` error.
    pub fn create_vcpu(
        &self,
        vm: &VmFd,
        id: u64,
    ) -> std::result::Result<VcpuFd, kvm_ioctls::Error> {
        vm.create_vcpu(id)
    }
}

/// What KVM lets guests of a process use: `kvm_supported`, limited by the guest permission
/// where KVM supports a dynamic feature, and without tile configuration unless tile data
/// remains.
pub fn kvm_filtered_xcr0(kvm_supported: XFeatureSet, permitted: XFeatureSet) -> XFeatureSet {
    let mut xcr0 = kvm_supported;
    if !xcr0.intersection(XFeatureSet::DYNAMIC).is_empty() {
        xcr0 = xcr0.intersection(permitted);
        if !xcr0.contains(XFeature::XtileData) {
            xcr0 = xcr0.difference(XFeature::XtileCfg.into());
        }
    }
    xcr0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::layout::tests::spr;
    use std::cell::{Cell, RefCell};
    use vmm_sys_util::errno::Error as Errno;

    const SPR_CPU: u64 = 0x602e7;
    const DEFAULT_PERM: u64 = 0x202e7;

    /// Which kernel the fake models for `KVM_SET_DEVICE_ATTR` on `/dev/kvm`.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub(crate) enum AttrKernel {
        /// Mainline (5.17 on): `kvm_arch_dev_ioctl` (arch/x86/kvm/x86.c) has no
        /// `KVM_SET_DEVICE_ATTR` case and answers `EINVAL`.
        Mainline,
        /// The RFC "KVM: x86: Add a new system attribute for dynamic XSTATE component"
        /// (Chang S. Bae, August 2022, on 6.0-rc): `kvm_x86_dev_set_attr` takes the
        /// component number from `addr` by value, answers `ENXIO` for another group or
        /// attribute, `EOPNOTSUPP` for a component outside KVM's `supported_xcr0`, and
        /// otherwise calls `xstate_request_perm(idx, true)`.
        Rfc,
        /// A kernel with the RFC's `kvm_x86_dev_set_attr` handler but not attribute 1: its
        /// `default:` case, `ENXIO`.
        RfcWithoutPermAttr,
    }

    /// XFEATURE_MAX of the kernel modelled (arch/x86/include/asm/fpu/types.h, 6.16 with
    /// APX as component 19).
    const XFEATURE_MAX: u64 = 20;

    /// A fake kernel that answers the guest-permission calls as the kernel functions named
    /// on each field and method do, with knobs for the queries, recording every request.
    pub(crate) struct FakeHost {
        pub cpu: std::result::Result<u64, i32>,
        pub perm: Cell<u64>,
        pub perm_errno: Option<i32>,
        pub kvm: std::result::Result<Option<u64>, i32>,
        pub attr_kernel: AttrKernel,
        /// Set once the process created a vCPU: `FPU_GUEST_PERM_LOCKED`.
        pub locked: Cell<bool>,
        /// Errno forced for the next `arch_prctl` request, for answers the model does not
        /// produce itself.
        pub request_errno: Option<i32>,
        /// Whether a granted request really changes the permission.
        pub grant: bool,
        pub requests: RefCell<Vec<(RequestPath, u32)>>,
    }

    impl FakeHost {
        /// A 6.x kernel with AMX on the CPU and in KVM, nothing granted yet.
        pub(crate) fn amx() -> Self {
            FakeHost {
                cpu: Ok(SPR_CPU),
                perm: Cell::new(DEFAULT_PERM),
                perm_errno: None,
                kvm: Ok(Some(SPR_CPU)),
                attr_kernel: AttrKernel::Mainline,
                locked: Cell::new(false),
                request_errno: None,
                grant: true,
                requests: RefCell::new(Vec::new()),
            }
        }

        /// `xstate_request_perm(idx, guest = true)`, arch/x86/kernel/fpu/xstate.c (5.17 to
        /// 6.18): `EINVAL` at or beyond XFEATURE_MAX; `EOPNOTSUPP` without an entry in
        /// `xstate_prctl_req` (tile data is the only one) or for a CPU without it; 0 when
        /// already permitted; `EBUSY` once locked; otherwise the entry's mask is added.
        fn xstate_request_perm(&self, idx: u64) -> std::result::Result<(), i32> {
            if idx >= XFEATURE_MAX {
                return Err(libc::EINVAL);
            }
            let requested = if idx == 18 { 1u64 << 18 } else { 0 };
            if requested == 0 || self.cpu.unwrap_or(0) & requested != requested {
                return Err(libc::EOPNOTSUPP);
            }
            if self.perm.get() & requested == requested {
                return Ok(());
            }
            if self.locked.get() {
                return Err(libc::EBUSY);
            }
            if self.grant {
                self.perm.set(self.perm.get() | requested);
            }
            Ok(())
        }

        fn set_device_attr(
            &self,
            attr: kvm_bindings::kvm_device_attr,
        ) -> std::result::Result<(), i32> {
            match self.attr_kernel {
                AttrKernel::Mainline => Err(libc::EINVAL),
                AttrKernel::RfcWithoutPermAttr => Err(libc::ENXIO),
                AttrKernel::Rfc => {
                    let idx = attr.addr;
                    if attr.group != 0 || attr.attr != 1 {
                        return Err(libc::ENXIO);
                    }
                    let kvm = self.kvm.ok().flatten().unwrap_or(0);
                    if idx >= 64 || kvm & (1 << idx) == 0 {
                        return Err(libc::EOPNOTSUPP);
                    }
                    self.xstate_request_perm(idx)
                }
            }
        }
    }

    impl XstateHost for FakeHost {
        fn cpu_supported(&self) -> host::Result<XFeatureSet> {
            self.cpu
                .map(XFeatureSet::from_bits)
                .map_err(|e| host::Error::GetCpuSupported(Errno::new(e)))
        }
        fn guest_permitted(&self) -> host::Result<XFeatureSet> {
            match self.perm_errno {
                Some(e) => Err(host::Error::GetGuestPermission(Errno::new(e))),
                None => Ok(XFeatureSet::from_bits(self.perm.get())),
            }
        }
        fn kvm_guest_supported(&self) -> host::Result<Option<XFeatureSet>> {
            self.kvm
                .map(|v| v.map(XFeatureSet::from_bits))
                .map_err(|e| host::Error::GetDeviceAttr {
                    attr: 0,
                    source: Errno::new(e),
                })
        }
        fn request_guest_perm(&self, via: RequestPath, component: u32) -> host::Result<()> {
            self.requests.borrow_mut().push((via, component));
            let result = match via {
                RequestPath::KvmDeviceAttr => {
                    self.set_device_attr(host::guest_perm_request(component))
                }
                RequestPath::ArchPrctl => match self.request_errno {
                    Some(e) => Err(e),
                    None => self.xstate_request_perm(u64::from(component)),
                },
            };
            result.map_err(|e| host::Error::RequestGuestPerm {
                component,
                via,
                source: Errno::new(e),
            })
        }
    }

    fn amx() -> XFeatureSet {
        XFeatureSet::AMX
    }

    #[test]
    fn grants_amx_through_arch_prctl_and_reports_the_cost() {
        let host = FakeHost::amx();
        let perm = GuestPermission::request_feature(&host, XFeature::XtileData).unwrap();
        // Mainline: the attribute door answers EINVAL, arch_prctl grants.
        assert_eq!(
            *host.requests.borrow(),
            vec![
                (RequestPath::KvmDeviceAttr, 18),
                (RequestPath::ArchPrctl, 18)
            ]
        );
        assert_eq!(perm.permitted().bits(), SPR_CPU);
        assert_eq!(perm.requested_via(), Some(RequestPath::ArchPrctl));
        assert_eq!(perm.guest_features().bits(), SPR_CPU);
        assert_eq!(perm.kvm_supported().bits(), SPR_CPU);
        assert_eq!(perm.cpu_supported().bits(), SPR_CPU);
        let cost = perm.cost(&spr()).unwrap();
        assert_eq!(
            cost,
            VcpuCost {
                components: amx(),
                component_bytes: 8192 + 64,
                // 11008 - max(4096, 2696)
                xsave_buffer_bytes: 11008 - 4096,
                // Compacted: pkru ends at 2440; tilecfg is aligned up to 2496 and tile
                // data to 2560, ending at 10752.
                guest_fpstate_bytes: 10752 - 2440,
            }
        );
        assert_eq!(perm.xsave2_size(&spr()).unwrap(), 11008);
    }

    #[test]
    fn asking_again_makes_no_request() {
        let host = FakeHost::amx();
        GuestPermission::request(&host, amx()).unwrap();
        let again = GuestPermission::request(&host, amx()).unwrap();
        assert_eq!(host.requests.borrow().len(), 2);
        assert_eq!(again.requested_via(), None);
        // Static features are permitted from the start: no request at all.
        let host = FakeHost::amx();
        let perm = GuestPermission::request(&host, XFeatureSet::from_bits(0x2e7)).unwrap();
        assert!(host.requests.borrow().is_empty());
        assert_eq!(perm.cost(&spr()).unwrap().component_bytes, 0);
    }

    #[test]
    fn the_rfc_attribute_grants_where_the_kernel_has_it() {
        let host = FakeHost {
            attr_kernel: AttrKernel::Rfc,
            ..FakeHost::amx()
        };
        let perm = GuestPermission::request(&host, amx()).unwrap();
        assert_eq!(perm.requested_via(), Some(RequestPath::KvmDeviceAttr));
        assert_eq!(
            *host.requests.borrow(),
            vec![(RequestPath::KvmDeviceAttr, 18)]
        );
        assert_eq!(perm.permitted().bits(), SPR_CPU);
    }

    #[test]
    fn an_unknown_attribute_falls_back_to_arch_prctl() {
        let host = FakeHost {
            attr_kernel: AttrKernel::RfcWithoutPermAttr,
            ..FakeHost::amx()
        };
        let perm = GuestPermission::request(&host, amx()).unwrap();
        assert_eq!(perm.requested_via(), Some(RequestPath::ArchPrctl));
        assert_eq!(
            *host.requests.borrow(),
            vec![
                (RequestPath::KvmDeviceAttr, 18),
                (RequestPath::ArchPrctl, 18)
            ]
        );
    }

    #[test]
    fn the_rfc_attribute_reports_the_kernels_refusals() {
        // After the first vCPU: EBUSY from xstate_request_perm, through the attribute; no
        // fallback, and the error is the typed too-late one.
        let host = FakeHost {
            attr_kernel: AttrKernel::Rfc,
            ..FakeHost::amx()
        };
        host.locked.set(true);
        let err = GuestPermission::request(&host, amx()).unwrap_err();
        assert!(
            matches!(err, RequestError::TooLate { ref source, .. }
                if source.errno() == libc::EBUSY
                && matches!(source, host::Error::RequestGuestPerm { via: RequestPath::KvmDeviceAttr, .. })),
            "{err:?}"
        );
        assert_eq!(host.requests.borrow().len(), 1);
        // A component KVM does not support: EOPNOTSUPP from the attribute itself (reached
        // only by a caller that skips the policy's own check).
        let host = FakeHost {
            attr_kernel: AttrKernel::Rfc,
            kvm: Ok(Some(0x2e7)),
            ..FakeHost::amx()
        };
        let e = host
            .request_guest_perm(RequestPath::KvmDeviceAttr, 18)
            .unwrap_err();
        assert_eq!(e.errno(), libc::EOPNOTSUPP);
        assert_eq!(host.perm.get(), DEFAULT_PERM);
        // A component beyond XFEATURE_MAX that KVM claims: EINVAL, the same as arch_prctl.
        let host = FakeHost {
            attr_kernel: AttrKernel::Rfc,
            kvm: Ok(Some(SPR_CPU | (1 << 21))),
            ..FakeHost::amx()
        };
        let e = host
            .request_guest_perm(RequestPath::KvmDeviceAttr, 21)
            .unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
    }

    #[test]
    fn the_attribute_abi_passes_the_component_by_value() {
        // The RFC reads `addr` as the number; a pointer there would be a huge component,
        // which the fake kernel (like the RFC) refuses.
        let attr = host::guest_perm_request(18);
        assert_eq!(attr.addr, 18);
        let host = FakeHost {
            attr_kernel: AttrKernel::Rfc,
            ..FakeHost::amx()
        };
        let value = 18u64;
        let by_pointer = kvm_bindings::kvm_device_attr {
            addr: &value as *const u64 as u64,
            ..attr
        };
        assert_eq!(host.set_device_attr(by_pointer), Err(libc::EOPNOTSUPP));
        assert_eq!(host.set_device_attr(attr), Ok(()));
        let other_group = kvm_bindings::kvm_device_attr { group: 1, ..attr };
        assert_eq!(host.set_device_attr(other_group), Err(libc::ENXIO));
    }

    #[test]
    fn the_cpuid_first_door_requests_what_the_table_needs() {
        let table = CpuId::from_entries(&crate::cpuid::tests::spr_full()).unwrap();
        let host = FakeHost::amx();
        let perm = GuestPermission::request_for_cpuid(&host, &table).unwrap();
        assert_eq!(perm.requested_via(), Some(RequestPath::ArchPrctl));
        assert!(perm.permitted().contains(XFeature::XtileData));
        perm.check_cpuid(&table).unwrap();
        // Without AMX in the table: no request, and the AMX table is then refused by name.
        let host = FakeHost::amx();
        let plain = perm.guest_cpuid(&table).unwrap();
        let plain = layout::guest_cpuid(&plain, XFeatureSet::from_bits(0x2e7)).unwrap();
        let perm = GuestPermission::request_for_cpuid(&host, &plain).unwrap();
        assert_eq!(perm.requested_via(), None);
        assert!(host.requests.borrow().is_empty());
        let err = perm.check_cpuid(&table).unwrap_err();
        assert!(
            err.to_string().contains("component 18 (xtiledata)"),
            "{err}"
        );
        // The same reasons as the feature door: KVM without AMX.
        let host = FakeHost {
            kvm: Ok(Some(0x2e7)),
            ..FakeHost::amx()
        };
        assert!(matches!(
            GuestPermission::request_for_cpuid(&host, &table),
            Err(RequestError::KvmWillNotExpose { missing, .. }) if missing == amx()
        ));
        assert!(host.requests.borrow().is_empty());
    }

    #[test]
    fn kvm_without_amx_is_refused_without_a_request() {
        // This project's build machine: AMX on the CPU, not in KVM.
        let host = FakeHost {
            kvm: Ok(Some(0x2e7)),
            ..FakeHost::amx()
        };
        let err = GuestPermission::request_feature(&host, XFeature::XtileData).unwrap_err();
        assert!(
            matches!(err, RequestError::KvmWillNotExpose { missing, kvm_supported }
                if missing == amx() && kvm_supported.bits() == 0x2e7),
            "{err:?}"
        );
        assert!(host.requests.borrow().is_empty());
        assert_eq!(host.perm.get(), DEFAULT_PERM);
        let all = GuestPermission::request_kvm_supported(&host).unwrap();
        assert_eq!(all.guest_features().bits(), 0x2e7);
        assert_eq!(all.cost(&spr()).unwrap().components, XFeatureSet::EMPTY);
        assert!(host.requests.borrow().is_empty());
    }

    #[test]
    fn cpu_without_amx_is_refused_first() {
        let host = FakeHost {
            cpu: Ok(0x2e7),
            kvm: Ok(Some(0x2e7)),
            perm: Cell::new(0x2e7),
            ..FakeHost::amx()
        };
        let err = GuestPermission::request(&host, amx()).unwrap_err();
        assert!(matches!(err, RequestError::CpuLacks { missing, .. } if missing == amx()));
        assert!(err
            .to_string()
            .starts_with("the CPU lacks xtilecfg|xtiledata"));
        assert!(host.requests.borrow().is_empty());
    }

    #[test]
    fn old_kernels_are_named() {
        let pre_516 = FakeHost {
            cpu: Err(libc::EINVAL),
            ..FakeHost::amx()
        };
        let err = GuestPermission::request(&pre_516, amx()).unwrap_err();
        assert!(matches!(
            err,
            RequestError::KernelTooOld {
                interface: "ARCH_GET_XCOMP_SUPP",
                source: Some(_)
            }
        ));
        let no_attr = FakeHost {
            kvm: Ok(None),
            ..FakeHost::amx()
        };
        let err = GuestPermission::request(&no_attr, amx()).unwrap_err();
        assert!(matches!(
            err,
            RequestError::KernelTooOld {
                interface: "KVM_X86_XCOMP_GUEST_SUPP",
                source: None
            }
        ));
        assert!(GuestPermission::request_kvm_supported(&no_attr).is_err());
        let no_guest_perm = FakeHost {
            perm_errno: Some(libc::EINVAL),
            ..FakeHost::amx()
        };
        let err = GuestPermission::request(&no_guest_perm, amx()).unwrap_err();
        assert!(matches!(
            err,
            RequestError::KernelTooOld {
                interface: "ARCH_GET_XCOMP_GUEST_PERM",
                ..
            }
        ));
        // EINVAL for the request itself (after the attribute door's EINVAL): the kernel's
        // XFEATURE_MAX is below the component.
        let old_enum = FakeHost {
            request_errno: Some(libc::EINVAL),
            ..FakeHost::amx()
        };
        let err = GuestPermission::request(&old_enum, amx()).unwrap_err();
        assert!(
            matches!(err, RequestError::KernelTooOld { source: Some(ref e), .. } if e.errno() == libc::EINVAL)
        );
    }

    #[test]
    fn kernel_refusals_are_classified() {
        let case = |errno| {
            let host = FakeHost {
                request_errno: Some(errno),
                ..FakeHost::amx()
            };
            GuestPermission::request(&host, amx()).unwrap_err()
        };
        let locked = FakeHost::amx();
        locked.locked.set(true);
        let busy = GuestPermission::request(&locked, amx()).unwrap_err();
        assert!(
            matches!(busy, RequestError::TooLate { missing, .. } if missing == XFeatureSet::DYNAMIC)
        );
        assert!(busy
            .to_string()
            .starts_with("too late: a vCPU already exists"));
        assert!(matches!(
            case(libc::EOPNOTSUPP),
            RequestError::NotRequestable {
                source: Some(_),
                ..
            }
        ));
        assert!(matches!(case(libc::EPERM), RequestError::Request(_)));
        let silent = FakeHost {
            grant: false,
            ..FakeHost::amx()
        };
        assert!(matches!(
            GuestPermission::request(&silent, amx()),
            Err(RequestError::NotGranted { missing, .. }) if missing == XFeatureSet::DYNAMIC
        ));
    }

    #[test]
    fn malformed_requests_make_no_call() {
        let host = FakeHost::amx();
        assert!(matches!(
            GuestPermission::request(&host, XFeatureSet::from_bits(1 << 40)),
            Err(RequestError::UnknownComponent { unknown }) if unknown.bits() == 1 << 40
        ));
        assert!(matches!(
            GuestPermission::request_feature(&host, XFeature::CetU),
            Err(RequestError::SupervisorComponent { .. })
        ));
        // A supported static feature missing from the permission cannot be requested.
        let odd = FakeHost {
            perm: Cell::new(0x3),
            ..FakeHost::amx()
        };
        assert!(matches!(
            GuestPermission::request_feature(&odd, XFeature::Avx),
            Err(RequestError::NotRequestable { source: None, .. })
        ));
        assert!(host.requests.borrow().is_empty() && odd.requests.borrow().is_empty());
        let failing = FakeHost {
            kvm: Err(libc::EFAULT),
            ..FakeHost::amx()
        };
        assert!(matches!(
            GuestPermission::request(&failing, amx()),
            Err(RequestError::Query(_))
        ));
        let failing = FakeHost {
            cpu: Err(libc::EFAULT),
            ..FakeHost::amx()
        };
        assert!(matches!(
            GuestPermission::request_kvm_supported(&failing),
            Err(RequestError::Query(_))
        ));
    }

    #[test]
    fn filtered_xcr0_follows_kvm() {
        let f =
            |k, p| kvm_filtered_xcr0(XFeatureSet::from_bits(k), XFeatureSet::from_bits(p)).bits();
        assert_eq!(f(0x602e7, 0x202e7), 0x2e7);
        assert_eq!(f(0x602e7, 0x602e7), 0x602e7);
        assert_eq!(f(0x2e7, 0x602e7), 0x2e7);
        assert_eq!(f(0x2e7, 0x3), 0x2e7);
    }

    #[test]
    fn guest_cpuid_follows_the_permission() {
        let host = FakeHost {
            kvm: Ok(Some(0x2e7)),
            ..FakeHost::amx()
        };
        let perm = GuestPermission::request(&host, XFeatureSet::LEGACY).unwrap();
        let cpuid = crate::layout::tests::spr_cpuid();
        let guest = perm.guest_cpuid(&cpuid).unwrap();
        assert_eq!(
            XsaveLayout::from_kvm_cpuid(&guest)
                .unwrap()
                .xcr0_supported()
                .bits(),
            0x2e7
        );
    }
}
