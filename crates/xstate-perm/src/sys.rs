//! Raw kernel constants and hand-declared ioctls, each with the header it comes from.
//!
//! Values kvm-bindings carries are taken from it; the rest are declared here once.

use kvm_bindings::kvm_device_attr;

// arch/x86/include/uapi/asm/prctl.h. The first three came with Linux 5.16 (commit
// db8268df0983, "x86/arch_prctl: Add controls for dynamic XSTATE components"); the two
// guest variants with Linux 5.17 ("x86/fpu: Extend fpu_xstate_prctl() with guest
// permissions").

/// `arch_prctl` option: the xfeatures the kernel supports for user space (5.16).
pub const ARCH_GET_XCOMP_SUPP: libc::c_int = 0x1021;
/// `arch_prctl` option: the process's permitted xfeatures for its own threads (5.16).
pub const ARCH_GET_XCOMP_PERM: libc::c_int = 0x1022;
/// `arch_prctl` option: request permission for a dynamic component for own threads (5.16).
pub const ARCH_REQ_XCOMP_PERM: libc::c_int = 0x1023;
/// `arch_prctl` option: the process's permitted xfeatures for KVM guests (5.17).
pub const ARCH_GET_XCOMP_GUEST_PERM: libc::c_int = 0x1024;
/// `arch_prctl` option: request permission for a dynamic component for guests (5.17).
pub const ARCH_REQ_XCOMP_GUEST_PERM: libc::c_int = 0x1025;

// include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h.

/// The KVM ioctl type (`KVMIO`).
pub const KVMIO: u32 = kvm_bindings::KVMIO;
/// `KVM_CHECK_EXTENSION` value: size of the buffer `KVM_GET_XSAVE2` fills (5.17, "kvm: x86:
/// Add support for getting/setting expanded xstate buffer").
pub const KVM_CAP_XSAVE2: u32 = kvm_bindings::KVM_CAP_XSAVE2;
/// `KVM_CHECK_EXTENSION` value: `KVM_{HAS,GET}_DEVICE_ATTR` work on the `/dev/kvm` fd (5.17,
/// commit dd6e63122018, "KVM: x86: add system attribute to retrieve full set of supported
/// xsave states").
pub const KVM_CAP_SYS_ATTRIBUTES: u32 = kvm_bindings::KVM_CAP_SYS_ATTRIBUTES;
/// Device-attribute group of the x86 system attributes on `/dev/kvm` (5.17, dd6e63122018).
pub const KVM_X86_GRP_SYSTEM: u32 = 0;
/// System attribute: the xfeatures KVM can expose to guests, a `u64` mask (5.17, dd6e63122018).
pub const KVM_X86_XCOMP_GUEST_SUPP: u64 = kvm_bindings::KVM_X86_XCOMP_GUEST_SUPP as u64;
/// System attribute proposed on the KVM list ("KVM: x86: Add a new system attribute for
/// dynamic XSTATE component", Chang S. Bae, August 2022) so that VMMs request the guest
/// permission through `KVM_SET_DEVICE_ATTR` on `/dev/kvm`. The component number is
/// `kvm_device_attr.addr` itself, not memory it points to. Never merged: mainline kernels
/// answer `KVM_SET_DEVICE_ATTR` on `/dev/kvm` with `EINVAL` (no such ioctl there) and
/// `KVM_HAS_DEVICE_ATTR` for it with `ENXIO`, which the patch does not change either.
pub const KVM_X86_XCOMP_GUEST_PERM: u64 = 1;

/// Size of `struct kvm_xsave`, the floor of `KVM_CAP_XSAVE2` and of every XSAVE buffer.
pub const KVM_XSAVE_LEGACY_SIZE: usize = std::mem::size_of::<kvm_bindings::kvm_xsave>();

// _IOW(KVMIO, 0xe1..0xe3, struct kvm_device_attr), include/uapi/linux/kvm.h (3.x, device
// control API; GET and HAS accepted on /dev/kvm on x86 since 5.17).
mod ioctls {
    use super::{kvm_device_attr, KVMIO};
    use vmm_sys_util::ioctl_iow_nr;

    ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
    ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
    ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, KVMIO, 0xe3, kvm_device_attr);
}
pub(crate) use ioctls::{KVM_GET_DEVICE_ATTR, KVM_HAS_DEVICE_ATTR, KVM_SET_DEVICE_ATTR};

// arch/x86/include/asm/msr-index.h (5.17, "x86/msr-index: Add MSRs for XFD").
/// `IA32_XFD`: extended feature disable; a set bit makes the first use of that dynamic
/// component raise #NM.
pub const MSR_IA32_XFD: u32 = 0x1c4;
/// `IA32_XFD_ERR`: the components whose use raised the last XFD #NM.
pub const MSR_IA32_XFD_ERR: u32 = 0x1c5;
/// `XCR0`, the only extended control register KVM_SET_XCRS accepts.
pub const XCR_XFEATURE_ENABLED_MASK: u32 = 0;

// Offsets of the legacy XSAVE area and header: Intel SDM vol. 1, 13.4.
/// Size of the legacy region (x87 and SSE state) at the start of every XSAVE area.
pub const XSAVE_LEGACY_REGION: u32 = 512;
/// Size of the XSAVE header, which follows the legacy region.
pub const XSAVE_HEADER_SIZE: u32 = 64;
/// Offset and size of the x87 state (component 0) within the legacy region.
pub const XSAVE_X87: (u32, u32) = (0, 160);
/// Offset and size of the SSE state (component 1: MXCSR and XMM0-15) in the legacy region.
pub const XSAVE_SSE: (u32, u32) = (160, 256);

// CPUID (Intel SDM vol. 2A, CPUID; Intel ISE reference for AMX-FP16, AMX-COMPLEX and APX).
/// CPUID leaf that enumerates the XSAVE features and layout.
pub const CPUID_LEAF_XSTATE: u32 = 0xd;
/// Structured extended feature flags (subleaf 0 and 1).
pub const CPUID_LEAF_FEATURES: u32 = 0x7;
/// Tile information: palettes, tile sizes (AMX).
pub const CPUID_LEAF_TILE_INFO: u32 = 0x1d;
/// TMUL information: maximum rows and columns (AMX).
pub const CPUID_LEAF_TMUL_INFO: u32 = 0x1e;
/// CPUID.(7,0):EDX bits of AMX: AMX-BF16 (22), AMX-TILE (24), AMX-INT8 (25).
pub const CPUID_7_0_EDX_AMX: u32 = (1 << 22) | (1 << 24) | (1 << 25);
/// CPUID.(7,1):EAX bit of AMX-FP16 (21).
pub const CPUID_7_1_EAX_AMX: u32 = 1 << 21;
/// CPUID.(7,1):EDX bit of AMX-COMPLEX (8).
pub const CPUID_7_1_EDX_AMX: u32 = 1 << 8;
/// CPUID.(7,1):EDX bit of APX_F (21), whose state is component 19.
pub const CPUID_7_1_EDX_APX: u32 = 1 << 21;
/// CPUID.(0xD,1):EAX bit of XFD support (4).
pub const CPUID_D_1_EAX_XFD: u32 = 1 << 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_attr_ioctl_numbers_match_the_kernel_encoding() {
        // _IOW(0xae, nr, 24 bytes) = (1 << 30) | (24 << 16) | (0xae << 8) | nr.
        assert_eq!(KVM_SET_DEVICE_ATTR(), 0x4018_aee1);
        assert_eq!(KVM_GET_DEVICE_ATTR(), 0x4018_aee2);
        assert_eq!(KVM_HAS_DEVICE_ATTR(), 0x4018_aee3);
    }
}
