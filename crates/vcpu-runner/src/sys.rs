//! Raw kernel definitions that kvm-bindings and kvm-ioctls do not expose.
//!
//! Everything here comes from `include/uapi/linux/kvm.h` (Linux 6.18) unless noted.

use std::os::raw::c_ulong;

use vmm_sys_util::ioctl::{ioctl_expr, _IOC_WRITE};

/// `KVMIO`, the ioctl type of every KVM ioctl.
pub const KVMIO: u32 = 0xAE;

/// The size in bytes of the kernel's `sigset_t` on x86_64 (`_NSIG / 8` = 64 / 8,
/// `arch/x86/include/uapi/asm/signal.h`). `KVM_SET_SIGNAL_MASK` refuses any other length
/// with `EINVAL` (`virt/kvm/kvm_main.c`, `kvm_vcpu_ioctl`).
pub const KERNEL_SIGSET_SIZE: usize = 8;

/// `struct kvm_signal_mask` with its flexible `sigset[]` sized for x86_64.
///
/// The header declares `__u32 len; __u8 sigset[0];`; the ioctl number encodes only the
/// 4-byte head, and the kernel reads `len` bytes of mask after it.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KvmSignalMask {
    /// Length of `sigset` in bytes; must be [`KERNEL_SIGSET_SIZE`].
    pub len: u32,
    /// The kernel `sigset_t`: bit `n - 1` is signal `n`, little-endian.
    pub sigset: [u8; KERNEL_SIGSET_SIZE],
}

/// `#define KVM_SET_SIGNAL_MASK _IOW(KVMIO, 0x8b, struct kvm_signal_mask)` (Linux 2.6.20).
///
/// The size field is that of the header's struct, whose flexible array adds nothing: the
/// 4-byte `len`.
#[allow(non_snake_case)]
pub const fn KVM_SET_SIGNAL_MASK() -> c_ulong {
    ioctl_expr(_IOC_WRITE, KVMIO, 0x8b, std::mem::size_of::<u32>() as u32)
}

/// `KVM_EXIT_INTERNAL_ERROR` data holds at most this many `u64`s (`data[16]` in the
/// `internal` member of `struct kvm_run`, Linux 5.15 and later; older kernels fill fewer).
pub const KVM_INTERNAL_ERROR_MAX_DATA: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_signal_mask_number_matches_the_header() {
        // _IOW(0xAE, 0x8b, 4 bytes): dir 1 << 30, size 4 << 16, type 0xAE << 8, nr 0x8b.
        assert_eq!(KVM_SET_SIGNAL_MASK(), 0x4004_ae8b);
        assert_eq!(std::mem::size_of::<KvmSignalMask>(), 4 + KERNEL_SIGSET_SIZE);
        assert_eq!(KVMIO, kvm_bindings::KVMIO);
    }
}
