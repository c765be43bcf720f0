//! A vCPU's XSAVE state, read and written with a buffer of the size KVM asks for.
//!
//! `KVM_GET_XSAVE2` (5.17) writes as many bytes as the process's guest permission makes the
//! guest FPU state, which can exceed the 4096 bytes of `struct kvm_xsave`; the buffer size
//! is `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)`. That value is stable once a vCPU exists, since
//! the permission is then frozen, so [`XsaveState::get`] takes the vCPU and queries the size
//! itself. The state is kept as plain bytes in the standard format.

use kvm_bindings::Xsave;
use kvm_ioctls::{Cap, VcpuFd, VmFd};

use crate::layout::XsaveLayout;
use crate::sys;
use crate::xfeature::XFeatureSet;

/// Errors from reading or writing XSAVE state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `KVM_CAP_XSAVE2` is absent (kernels before 5.17) or not a valid size.
    #[error("KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) returned {0}, not a buffer size")]
    NoXsave2(i32),
    /// The byte image is smaller than the buffer KVM needs.
    #[error("XSAVE image of {len} bytes, KVM needs {needed}")]
    TooSmall {
        /// The image's size.
        len: usize,
        /// `KVM_CAP_XSAVE2`.
        needed: usize,
    },
    /// Allocating the `kvm_xsave` buffer failed.
    #[error("allocating a {size}-byte kvm_xsave buffer failed")]
    Allocate {
        /// The size.
        size: usize,
        /// The cause.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// `KVM_GET_XSAVE2` failed.
    #[error("KVM_GET_XSAVE2 failed")]
    Get(#[source] kvm_ioctls::Error),
    /// `KVM_SET_XSAVE` failed.
    #[error("KVM_SET_XSAVE failed")]
    Set(#[source] kvm_ioctls::Error),
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Offset of XSTATE_BV in the XSAVE header (SDM vol. 1, 13.4.2).
const XSTATE_BV_OFFSET: usize = sys::XSAVE_LEGACY_REGION as usize;

/// One vCPU's XSAVE area in the standard format, as `KVM_GET_XSAVE2` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XsaveState {
    bytes: Vec<u8>,
}

/// `KVM_CAP_XSAVE2` for `vm`: the buffer size for this process's vCPUs.
pub fn xsave2_size(vm: &VmFd) -> Result<usize> {
    let size = vm.check_extension_int(Cap::Xsave2);
    match usize::try_from(size) {
        Ok(s) if s >= sys::KVM_XSAVE_LEGACY_SIZE => Ok(s),
        _ => Err(Error::NoXsave2(size)),
    }
}

fn allocate(size: usize) -> Result<Xsave> {
    let extra = (size - sys::KVM_XSAVE_LEGACY_SIZE).div_ceil(std::mem::size_of::<u32>());
    Xsave::new(extra).map_err(|source| Error::Allocate { size, source })
}

impl XsaveState {
    /// Reads `vcpu`'s XSAVE state with a buffer of `KVM_CAP_XSAVE2` bytes (queried on `vm`,
    /// the VM that owns `vcpu`).
    pub fn get(vm: &VmFd, vcpu: &VcpuFd) -> Result<Self> {
        let size = xsave2_size(vm)?;
        let mut buf = allocate(size)?;
        // SAFETY: `buf` holds `size` = KVM_CAP_XSAVE2 bytes, queried while `vcpu` exists; the
        // process's guest permission, which sets how much KVM_GET_XSAVE2 writes, is frozen
        // from the first vCPU on, so KVM writes no more than that.
        unsafe { vcpu.get_xsave2(&mut buf) }.map_err(Error::Get)?;
        let xsave = &buf.as_fam_struct_ref().xsave;
        let mut bytes: Vec<u8> = xsave
            .region
            .iter()
            .chain(buf.as_slice())
            .flat_map(|word| word.to_le_bytes())
            .collect();
        bytes.truncate(size);
        Ok(XsaveState { bytes })
    }

    /// Writes the state into `vcpu` (of `vm`); the image must be at least `KVM_CAP_XSAVE2`
    /// bytes, since that is how much KVM reads.
    pub fn set(&self, vm: &VmFd, vcpu: &VcpuFd) -> Result<()> {
        let needed = xsave2_size(vm)?;
        if self.bytes.len() < needed {
            return Err(Error::TooSmall {
                len: self.bytes.len(),
                needed,
            });
        }
        let mut buf = allocate(self.bytes.len())?;
        let mut words = self.bytes.chunks(4).map(|chunk| {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            u32::from_le_bytes(word)
        });
        // SAFETY: `as_mut_fam_struct` is unsafe only because it allows changing the length
        // field; only the fixed-size region is written here.
        let region = unsafe { &mut buf.as_mut_fam_struct().xsave.region };
        for (dst, src) in region.iter_mut().zip(&mut words) {
            *dst = src;
        }
        for (dst, src) in buf.as_mut_slice().iter_mut().zip(&mut words) {
            *dst = src;
        }
        // SAFETY: `buf` holds at least KVM_CAP_XSAVE2 bytes (checked above), which is as much
        // as KVM_SET_XSAVE reads for this process's frozen guest permission.
        unsafe { vcpu.set_xsave2(&buf) }.map_err(Error::Set)
    }

    /// A state from a byte image in the standard format (e.g. a snapshot).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        if bytes.len() < sys::KVM_XSAVE_LEGACY_SIZE {
            return Err(Error::TooSmall {
                len: bytes.len(),
                needed: sys::KVM_XSAVE_LEGACY_SIZE,
            });
        }
        Ok(XsaveState { bytes })
    }

    /// The byte image.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The byte image, writable.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// XSTATE_BV from the header: the components whose state is not in its initial
    /// configuration.
    pub fn xstate_bv(&self) -> XFeatureSet {
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.bytes[XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8]);
        XFeatureSet::from_bits(u64::from_le_bytes(word))
    }

    fn range(&self, layout: &XsaveLayout, component: u32) -> Option<std::ops::Range<usize>> {
        let c = layout.component(component).filter(|c| !c.supervisor)?;
        let start = c.offset as usize;
        let end = start.checked_add(c.size as usize)?;
        (end <= self.bytes.len()).then_some(start..end)
    }

    /// The bytes of user component `component`, at its standard-format offset in `layout`;
    /// `None` where the layout lacks it or the image is too small to hold it.
    pub fn component(&self, layout: &XsaveLayout, component: u32) -> Option<&[u8]> {
        let range = self.range(layout, component)?;
        Some(&self.bytes[range])
    }

    /// The bytes of user component `component`, writable.
    pub fn component_mut(&mut self, layout: &XsaveLayout, component: u32) -> Option<&mut [u8]> {
        let range = self.range(layout, component)?;
        Some(&mut self.bytes[range])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::tests::spr;

    #[test]
    fn images_are_checked_and_sliced_by_the_layout() {
        assert!(matches!(
            XsaveState::from_bytes(vec![0; 100]),
            Err(Error::TooSmall {
                len: 100,
                needed: 4096
            })
        ));
        let mut image = vec![0u8; 4096];
        image[512] = 0x07;
        let mut state = XsaveState::from_bytes(image).unwrap();
        assert_eq!(state.xstate_bv().bits(), 7);
        let layout = spr();
        assert_eq!(state.component(&layout, 2).unwrap().len(), 256);
        state.component_mut(&layout, 9).unwrap()[0] = 0x55;
        assert_eq!(state.as_bytes()[2688], 0x55);
        state.as_bytes_mut()[2689] = 0x66;
        assert_eq!(state.component(&layout, 9).unwrap()[..2], [0x55, 0x66]);
        // Tile data ends past a 4096-byte image; supervisor and absent components have none.
        assert!(state.component(&layout, 18).is_none());
        assert!(state.component(&layout, 11).is_none());
        assert!(state.component(&layout, 3).is_none());
    }

    #[test]
    fn allocation_rounds_up_to_whole_words() {
        let buf = allocate(4096 + 5).unwrap();
        assert_eq!(buf.as_slice().len(), 2);
        let buf = allocate(11008).unwrap();
        assert_eq!(buf.as_slice().len(), (11008 - 4096) / 4);
    }
}
