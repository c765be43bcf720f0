//! The kernel interfaces behind the guest permission, as a small trait.
//!
//! [`XstateHost`] is what the policy in [`crate::permission`] asks; [`SystemHost`] answers
//! with `arch_prctl(2)` and device-attribute ioctls on `/dev/kvm`. A fake kernel can stand in
//! for paths a given host cannot show (a KVM that exposes AMX, a pre-5.17 kernel, the
//! proposed `KVM_X86_XCOMP_GUEST_PERM` attribute).

use std::fmt;

use kvm_bindings::kvm_device_attr;
use kvm_ioctls::Kvm;
use vmm_sys_util::errno::Error as Errno;
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::sys;
use crate::xfeature::XFeatureSet;

/// A failed kernel call, with the errno it returned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `arch_prctl(ARCH_GET_XCOMP_SUPP)` failed (`EINVAL` before Linux 5.16).
    #[error("arch_prctl(ARCH_GET_XCOMP_SUPP) failed")]
    GetCpuSupported(#[source] Errno),
    /// `arch_prctl(ARCH_GET_XCOMP_GUEST_PERM)` failed (`EINVAL` before Linux 5.17).
    #[error("arch_prctl(ARCH_GET_XCOMP_GUEST_PERM) failed")]
    GetGuestPermission(#[source] Errno),
    /// `KVM_HAS_DEVICE_ATTR` on `/dev/kvm` failed with something other than `ENXIO`.
    #[error("KVM_HAS_DEVICE_ATTR(group 0, attr {attr}) on /dev/kvm failed")]
    HasDeviceAttr {
        /// The attribute probed.
        attr: u64,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// `KVM_GET_DEVICE_ATTR` on `/dev/kvm` failed.
    #[error("KVM_GET_DEVICE_ATTR(group 0, attr {attr}) on /dev/kvm failed")]
    GetDeviceAttr {
        /// The attribute read.
        attr: u64,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// The request for a component's guest permission failed.
    #[error("requesting guest permission for component {component} through {via} failed")]
    RequestGuestPerm {
        /// The component number passed to the kernel.
        component: u32,
        /// The interface used.
        via: RequestPath,
        /// The errno.
        #[source]
        source: Errno,
    },
}

impl Error {
    /// The errno the kernel returned.
    ///
    /// ```
    /// use vmm_sys_util::errno::Error as Errno;
    /// use xstate_perm::host::Error;
    /// assert_eq!(Error::GetCpuSupported(Errno::new(libc::EINVAL)).errno(), libc::EINVAL);
    /// ```
    pub fn errno(&self) -> i32 {
        match self {
            Error::GetCpuSupported(e) | Error::GetGuestPermission(e) => e.errno(),
            Error::HasDeviceAttr { source, .. }
            | Error::GetDeviceAttr { source, .. }
            | Error::RequestGuestPerm { source, .. } => source.errno(),
        }
    }
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The interface through which the guest permission is requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestPath {
    /// `arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, component)` (Linux 5.17).
    ArchPrctl,
    /// `KVM_SET_DEVICE_ATTR` on `/dev/kvm`, attribute `KVM_X86_XCOMP_GUEST_PERM` with the
    /// component number in `addr` (see [`guest_perm_request`]): the proposed interface that
    /// lets KVM refuse what it does not support (`EOPNOTSUPP`) before the kernel grants it.
    /// No mainline kernel has it; they answer `EINVAL`.
    KvmDeviceAttr,
}

impl fmt::Display for RequestPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestPath::ArchPrctl => f.write_str("arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)"),
            RequestPath::KvmDeviceAttr => {
                f.write_str("KVM_SET_DEVICE_ATTR(KVM_X86_XCOMP_GUEST_PERM)")
            }
        }
    }
}

/// The kernel as the guest-permission policy sees it.
///
/// All permissions are per process (the thread-group leader's FPU state), not per thread.
pub trait XstateHost {
    /// The xfeatures the kernel supports for user space (`ARCH_GET_XCOMP_SUPP`, 5.16): the
    /// CPU's features that the host kernel enabled in XCR0.
    ///
    /// # Errors
    ///
    /// [`Error::GetCpuSupported`] with the errno (`EINVAL` before 5.16).
    fn cpu_supported(&self) -> Result<XFeatureSet>;

    /// The process's guest permission (`ARCH_GET_XCOMP_GUEST_PERM`, 5.17): every
    /// non-dynamic supported feature, plus the dynamic ones granted so far.
    ///
    /// # Errors
    ///
    /// [`Error::GetGuestPermission`] with the errno (`EINVAL` before 5.17).
    fn guest_permitted(&self) -> Result<XFeatureSet>;

    /// What KVM can expose to guests (`KVM_X86_XCOMP_GUEST_SUPP`, 5.17), or `None` where the
    /// kernel lacks the attribute (`KVM_CAP_SYS_ATTRIBUTES` absent, or `ENXIO`).
    ///
    /// # Errors
    ///
    /// [`Error::HasDeviceAttr`] or [`Error::GetDeviceAttr`] where the attribute ioctls fail
    /// otherwise.
    fn kvm_guest_supported(&self) -> Result<Option<XFeatureSet>>;

    /// Asks for the guest permission of `component` through `via`.
    ///
    /// The kernel (`xstate_request_perm`, arch/x86/kernel/fpu/xstate.c, 5.17) grants the
    /// components its `xstate_prctl_req` table lists for `component`, which for tile data
    /// (18) is tile data alone; it answers `EINVAL` for a component at or beyond its
    /// `XFEATURE_MAX` (and for the option itself before 5.17), `EOPNOTSUPP` for a component
    /// without an entry in that table (every non-dynamic one) or one the CPU lacks, and
    /// `EBUSY` once a vCPU exists in the process.
    ///
    /// Through [`RequestPath::KvmDeviceAttr`] a kernel with the proposed attribute answers
    /// the same, plus `EOPNOTSUPP` for a component KVM does not support; a kernel without it
    /// answers `EINVAL` (mainline: `kvm_arch_dev_ioctl` has no `KVM_SET_DEVICE_ATTR`) or
    /// `ENXIO` (an attribute the kernel's handler does not know).
    ///
    /// # Errors
    ///
    /// [`Error::RequestGuestPerm`] with the kernel's errno.
    fn request_guest_perm(&self, via: RequestPath, component: u32) -> Result<()>;
}

/// The `KVM_SET_DEVICE_ATTR` argument that asks for the guest permission of `component`
/// through the proposed `KVM_X86_XCOMP_GUEST_PERM` attribute: group 0, the component number
/// by value in `addr` (the patch's `kvm_x86_dev_set_attr` reads it with
/// `kvm_get_attr_addr`, which only casts the field).
///
/// ```
/// let attr = xstate_perm::host::guest_perm_request(18);
/// assert_eq!((attr.group, attr.attr, attr.addr), (0, 1, 18));
/// ```
pub fn guest_perm_request(component: u32) -> kvm_device_attr {
    kvm_device_attr {
        flags: 0,
        group: sys::KVM_X86_GRP_SYSTEM,
        attr: sys::KVM_X86_XCOMP_GUEST_PERM,
        addr: u64::from(component),
    }
}

/// The running kernel: `arch_prctl(2)` and `/dev/kvm` system attributes.
#[derive(Debug, Clone, Copy)]
pub struct SystemHost<'a> {
    kvm: &'a Kvm,
}

impl<'a> SystemHost<'a> {
    /// The running kernel, with `kvm` as the `/dev/kvm` handle for the attribute ioctls.
    pub fn new(kvm: &'a Kvm) -> Self {
        SystemHost { kvm }
    }

    fn arch_prctl_get(option: libc::c_int) -> std::result::Result<u64, Errno> {
        let mut value: u64 = 0;
        // SAFETY: the ARCH_GET_XCOMP_* options write one u64 through the pointer, which
        // points at a live local of that type.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                option,
                &mut value as *mut u64 as libc::c_ulong,
            )
        };
        if ret < 0 {
            Err(Errno::last())
        } else {
            Ok(value)
        }
    }

    fn has_attr(&self, attr: u64) -> Result<bool> {
        let query = kvm_device_attr {
            flags: 0,
            group: sys::KVM_X86_GRP_SYSTEM,
            attr,
            addr: 0,
        };
        // SAFETY: KVM_HAS_DEVICE_ATTR reads the kvm_device_attr, which lives across the call,
        // and writes nothing; the fd is the open /dev/kvm owned by `self.kvm`.
        let ret = unsafe { ioctl_with_ref(self.kvm, sys::KVM_HAS_DEVICE_ATTR(), &query) };
        if ret == 0 {
            return Ok(true);
        }
        let source = Errno::last();
        if source.errno() == libc::ENXIO {
            Ok(false)
        } else {
            Err(Error::HasDeviceAttr { attr, source })
        }
    }

    fn get_attr(&self, attr: u64) -> Result<u64> {
        let mut value: u64 = 0;
        let query = kvm_device_attr {
            flags: 0,
            group: sys::KVM_X86_GRP_SYSTEM,
            attr,
            addr: &mut value as *mut u64 as u64,
        };
        // SAFETY: KVM_GET_DEVICE_ATTR for the x86 system group writes one u64 to `addr`,
        // which points at a live local of that type.
        let ret = unsafe { ioctl_with_ref(self.kvm, sys::KVM_GET_DEVICE_ATTR(), &query) };
        if ret == 0 {
            Ok(value)
        } else {
            Err(Error::GetDeviceAttr {
                attr,
                source: Errno::last(),
            })
        }
    }
}

impl XstateHost for SystemHost<'_> {
    fn cpu_supported(&self) -> Result<XFeatureSet> {
        Self::arch_prctl_get(sys::ARCH_GET_XCOMP_SUPP)
            .map(XFeatureSet::from_bits)
            .map_err(Error::GetCpuSupported)
    }

    fn guest_permitted(&self) -> Result<XFeatureSet> {
        Self::arch_prctl_get(sys::ARCH_GET_XCOMP_GUEST_PERM)
            .map(XFeatureSet::from_bits)
            .map_err(Error::GetGuestPermission)
    }

    fn kvm_guest_supported(&self) -> Result<Option<XFeatureSet>> {
        let cap = libc::c_ulong::from(sys::KVM_CAP_SYS_ATTRIBUTES);
        if self.kvm.check_extension_raw(cap) <= 0 {
            return Ok(None);
        }
        if !self.has_attr(sys::KVM_X86_XCOMP_GUEST_SUPP)? {
            return Ok(None);
        }
        self.get_attr(sys::KVM_X86_XCOMP_GUEST_SUPP)
            .map(|bits| Some(XFeatureSet::from_bits(bits)))
    }

    fn request_guest_perm(&self, via: RequestPath, component: u32) -> Result<()> {
        let ret = match via {
            RequestPath::ArchPrctl => {
                // SAFETY: ARCH_REQ_XCOMP_GUEST_PERM takes the component number by value and
                // touches no user memory.
                let ret = unsafe {
                    libc::syscall(
                        libc::SYS_arch_prctl,
                        sys::ARCH_REQ_XCOMP_GUEST_PERM,
                        libc::c_ulong::from(component),
                    )
                };
                if ret < 0 {
                    -1
                } else {
                    0
                }
            }
            RequestPath::KvmDeviceAttr => {
                let request = guest_perm_request(component);
                // SAFETY: KVM_SET_DEVICE_ATTR reads the kvm_device_attr, a live local; for
                // this attribute `addr` carries the component number and is not
                // dereferenced, and a kernel without the attribute fails the call without
                // touching memory. The fd is the open /dev/kvm owned by `self.kvm`.
                unsafe { ioctl_with_ref(self.kvm, sys::KVM_SET_DEVICE_ATTR(), &request) }
            }
        };
        if ret < 0 {
            Err(Error::RequestGuestPerm {
                component,
                via,
                source: Errno::last(),
            })
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_kept_for_every_variant() {
        let e = |n| Errno::new(n);
        let all = [
            Error::GetCpuSupported(e(1)),
            Error::GetGuestPermission(e(2)),
            Error::HasDeviceAttr {
                attr: 1,
                source: e(3),
            },
            Error::GetDeviceAttr {
                attr: 0,
                source: e(4),
            },
            Error::RequestGuestPerm {
                component: 18,
                via: RequestPath::KvmDeviceAttr,
                source: e(5),
            },
        ];
        let errnos: Vec<i32> = all.iter().map(Error::errno).collect();
        assert_eq!(errnos, vec![1, 2, 3, 4, 5]);
        assert_eq!(
            all[4].to_string(),
            "requesting guest permission for component 18 through \
             KVM_SET_DEVICE_ATTR(KVM_X86_XCOMP_GUEST_PERM) failed"
        );
        assert_eq!(
            RequestPath::ArchPrctl.to_string(),
            "arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)"
        );
    }
}
