//! One-entry `KVM_GET_MSRS`/`KVM_SET_MSRS`, on a vCPU fd or on the `/dev/kvm` fd.
//!
//! Both ioctls return how many entries KVM processed and stop at the first entry it refuses
//! (`msr_io` in arch/x86/kvm/x86.c), so with one entry the answer is "done" or "refused",
//! never a partial result. The array lives on the stack: the probe runs this in a forked child
//! process, where only system calls are safe to make.

use std::os::fd::{AsRawFd, RawFd};

use kvm_bindings::kvm_msr_entry;

use crate::sys::ioctls::{KVM_GET_MSRS, KVM_SET_MSRS};

/// An errno from one of the ioctls.
pub(crate) type Errno = vmm_sys_util::errno::Error;

/// What the crate needs from KVM's MSR ioctls, so that the logic above can be run against a
/// model of the kernel in unit tests.
pub(crate) trait MsrIo {
    /// `KVM_SET_MSRS` of one entry: `Ok(true)` if KVM processed it, `Ok(false)` if it
    /// returned 0 (refused), `Err` for an errno.
    fn set_msr(&self, index: u32, data: u64) -> Result<bool, Errno>;
    /// `KVM_GET_MSRS` of one entry: `Ok(Some(value))` if processed, `Ok(None)` if KVM returned
    /// 0 (on the system fd: an index that is not a feature MSR).
    fn get_msr(&self, index: u32) -> Result<Option<u64>, Errno>;
}

/// `struct kvm_msrs` with room for exactly one entry.
#[repr(C)]
struct OneMsr {
    nmsrs: u32,
    pad: u32,
    entry: kvm_msr_entry,
}

impl OneMsr {
    fn new(index: u32, data: u64) -> Self {
        OneMsr {
            nmsrs: 1,
            pad: 0,
            entry: kvm_msr_entry {
                index,
                reserved: 0,
                data,
            },
        }
    }
}

/// A raw fd that accepts `KVM_GET_MSRS`/`KVM_SET_MSRS`: a vCPU or the `/dev/kvm` system fd.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawMsrFd(pub(crate) RawFd);

impl AsRawFd for RawMsrFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

fn processed(ret: i32) -> Result<bool, Errno> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret == 1)
    }
}

impl MsrIo for RawMsrFd {
    fn set_msr(&self, index: u32, data: u64) -> Result<bool, Errno> {
        let msrs = OneMsr::new(index, data);
        // SAFETY: `msrs` is a `kvm_msrs` header followed by the one entry `nmsrs` announces,
        // laid out as the kernel expects (repr(C)); KVM only reads it for KVM_SET_MSRS.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(self, KVM_SET_MSRS(), &msrs) };
        processed(ret)
    }

    fn get_msr(&self, index: u32) -> Result<Option<u64>, Errno> {
        let mut msrs = OneMsr::new(index, 0);
        // SAFETY: as above; KVM writes at most `nmsrs` (one) entries back into `msrs`, which
        // lives until the call returns.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(self, KVM_GET_MSRS(), &mut msrs) };
        Ok(processed(ret)?.then_some(msrs.entry.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_msr_is_laid_out_as_kvm_msrs_with_one_entry() {
        // KVM reads an 8-byte header, then `nmsrs` 16-byte entries right after it.
        assert_eq!(std::mem::offset_of!(OneMsr, entry), 8);
        assert_eq!(std::mem::size_of::<OneMsr>(), 8 + 16);
        let m = OneMsr::new(0x3a, 5);
        assert_eq!((m.nmsrs, m.entry.index, m.entry.data), (1, 0x3a, 5));
    }

    #[test]
    fn a_bad_fd_is_an_errno_not_a_refusal() {
        let fd = RawMsrFd(-1);
        let err = fd.set_msr(0x3a, 1).expect_err("EBADF");
        assert_eq!(err.errno(), libc::EBADF);
        let err = fd.get_msr(0x3a).expect_err("EBADF");
        assert_eq!(err.errno(), libc::EBADF);
    }
}
