//! The guest-permission request, made in line with KVM's policy, and its proof value.
//!
//! Since Linux 5.17 a dynamic XSTATE component (AMX tile data, component 18) reaches a KVM
//! guest only if the VMM process holds the *guest* permission for it, and that permission
//! is frozen when the process creates its first vCPU (`ARCH_REQ_XCOMP_GUEST_PERM` then
//! fails with `EBUSY`). [`GuestPermission::request`] asks for a set of features:
//!
//! 1. It refuses bits no kernel names ([`RequestError::UnknownComponent`]) and supervisor
//!    components, which the guest permission does not cover.
//! 2. It asks only for what the CPU supports (`ARCH_GET_XCOMP_SUPP`) and what KVM will
//!    expose (`KVM_X86_XCOMP_GUEST_SUPP`), and says which of the two is missing. Where the
//!    attribute does not exist (before 5.17) it stops with
//!    [`RequestError::KernelTooOld`] rather than guess.
//! 3. If the process already holds everything asked for, it succeeds with no request.
//! 4. Otherwise it asks for the highest missing dynamic component (the kernel grants every
//!    dynamic component up to it) through `KVM_SET_DEVICE_ATTR(KVM_X86_XCOMP_GUEST_PERM)`
//!    where the kernel offers that attribute, else through `arch_prctl`, and checks the
//!    result by reading the permission back.
//!
//! The [`GuestPermission`] it returns is the only way to reach
//! [`GuestPermission::create_vcpu`], so code that creates vCPUs through it cannot forget to
//! request first.

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

impl GuestPermission {
    /// Obtains the guest permission for `wanted`; see the [module docs](self) for the
    /// policy. Asking again for what is already permitted makes no request.
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
        let kvm_supported = host
            .kvm_guest_supported()
            .map_err(RequestError::Query)?
            .ok_or(RequestError::KernelTooOld {
                interface: "KVM_X86_XCOMP_GUEST_SUPP",
                source: None,
            })?;
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
        let component = match missing.difference(XFeatureSet::DYNAMIC).is_empty() {
            true => missing.highest(),
            false => None,
        };
        let Some(component) = component else {
            return Err(RequestError::NotRequestable {
                missing,
                source: None,
            });
        };
        let via = if host
            .kvm_offers_guest_perm_attr()
            .map_err(RequestError::Query)?
        {
            RequestPath::KvmDeviceAttr
        } else {
            RequestPath::ArchPrctl
        };
        host.request_guest_perm(via, component)
            .map_err(|e| match e.errno() {
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
            })?;
        let permitted = host
            .guest_permitted()
            .map_err(map_query("ARCH_GET_XCOMP_GUEST_PERM"))?;
        let missing = wanted.difference(permitted);
        if !missing.is_empty() {
            return Err(RequestError::NotGranted { permitted, missing });
        }
        permission.permitted = permitted;
        permission.requested_via = Some(via);
        Ok(permission)
    }

    /// [`Self::request`] for one feature and what it needs alongside (tile configuration
    /// with tile data, as KVM exposes them only together).
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
    pub fn request_kvm_supported(host: &impl XstateHost) -> Result<Self> {
        let cpu = host
            .cpu_supported()
            .map_err(map_query("ARCH_GET_XCOMP_SUPP"))?;
        let kvm = host
            .kvm_guest_supported()
            .map_err(RequestError::Query)?
            .ok_or(RequestError::KernelTooOld {
                interface: "KVM_X86_XCOMP_GUEST_SUPP",
                source: None,
            })?;
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

    /// How the permission was requested; `None` when it was already held.
    pub fn requested_via(&self) -> Option<RequestPath> {
        self.requested_via
    }

    /// The XCR0 features guests of this process can be given: KVM's supported set filtered
    /// by the permission, with tile configuration dropped unless tile data is permitted,
    /// as KVM computes it (`kvm_get_filtered_xcr0`, 5.17).
    pub fn guest_features(&self) -> XFeatureSet {
        kvm_filtered_xcr0(self.kvm_supported, self.permitted)
    }

    /// What the dynamic features granted to guests cost per vCPU, from `layout` (read from
    /// `KVM_GET_SUPPORTED_CPUID` or the host CPU). Zero where guests get no AMX.
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
    pub fn xsave2_size(&self, layout: &XsaveLayout) -> layout::Result<usize> {
        layout.xsave2_size(self.guest_features())
    }

    /// `supported` with CPUID leaf 0xD limited to [`Self::guest_features`]; see
    /// [`layout::guest_cpuid`].
    pub fn guest_cpuid(&self, supported: &CpuId) -> layout::Result<CpuId> {
        layout::guest_cpuid(supported, self.guest_features())
    }

    /// Creates vCPU `id` in `vm`. Taking the proof here is what orders the request before
    /// the first vCPU, after which the kernel freezes the permission.
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

    /// A kernel with a configurable answer to each call, recording the requests it gets.
    pub(crate) struct FakeHost {
        pub cpu: std::result::Result<u64, i32>,
        pub perm: Cell<u64>,
        pub perm_errno: Option<i32>,
        pub kvm: std::result::Result<Option<u64>, i32>,
        pub perm_attr: bool,
        /// Errno for the next request; `None` grants it (the kernel's behaviour).
        pub request_errno: Option<i32>,
        /// Whether a granted request really changes the permission.
        pub grant: bool,
        pub requests: RefCell<Vec<(RequestPath, u32)>>,
    }

    impl FakeHost {
        /// A kernel with AMX on the CPU and in KVM, nothing granted yet.
        pub(crate) fn amx() -> Self {
            FakeHost {
                cpu: Ok(SPR_CPU),
                perm: Cell::new(DEFAULT_PERM),
                perm_errno: None,
                kvm: Ok(Some(SPR_CPU)),
                perm_attr: false,
                request_errno: None,
                grant: true,
                requests: RefCell::new(Vec::new()),
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
        fn kvm_offers_guest_perm_attr(&self) -> host::Result<bool> {
            Ok(self.perm_attr)
        }
        fn request_guest_perm(&self, via: RequestPath, component: u32) -> host::Result<()> {
            self.requests.borrow_mut().push((via, component));
            if let Some(e) = self.request_errno {
                return Err(host::Error::RequestGuestPerm {
                    component,
                    via,
                    source: Errno::new(e),
                });
            }
            if self.grant {
                // The kernel grants every dynamic component up to `component`.
                let upto = (1u64 << (component + 1)) - 1;
                let dynamic = XFeatureSet::DYNAMIC.bits() & upto & self.cpu.unwrap_or(0);
                self.perm.set(self.perm.get() | dynamic);
            }
            Ok(())
        }
    }

    fn amx() -> XFeatureSet {
        XFeatureSet::AMX
    }

    #[test]
    fn grants_amx_through_arch_prctl_and_reports_the_cost() {
        let host = FakeHost::amx();
        let perm = GuestPermission::request_feature(&host, XFeature::XtileData).unwrap();
        assert_eq!(*host.requests.borrow(), vec![(RequestPath::ArchPrctl, 18)]);
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
        assert_eq!(host.requests.borrow().len(), 1);
        assert_eq!(again.requested_via(), None);
        // Static features are permitted from the start: no request at all.
        let host = FakeHost::amx();
        let perm = GuestPermission::request(&host, XFeatureSet::from_bits(0x2e7)).unwrap();
        assert!(host.requests.borrow().is_empty());
        assert_eq!(perm.cost(&spr()).unwrap().component_bytes, 0);
    }

    #[test]
    fn uses_the_kvm_attribute_where_the_kernel_offers_it() {
        let host = FakeHost {
            perm_attr: true,
            ..FakeHost::amx()
        };
        let perm = GuestPermission::request(&host, amx()).unwrap();
        assert_eq!(perm.requested_via(), Some(RequestPath::KvmDeviceAttr));
        assert_eq!(
            *host.requests.borrow(),
            vec![(RequestPath::KvmDeviceAttr, 18)]
        );
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
        // EINVAL for the request itself: the kernel's XFEATURE_MAX is below the component.
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
        let busy = case(libc::EBUSY);
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
