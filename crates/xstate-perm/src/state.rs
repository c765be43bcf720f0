//! A vCPU's extended state: the XSAVE image, read and written with a buffer of the size KVM
//! asks for ([`XsaveState`]), and everything else a save/restore needs alongside it
//! ([`VcpuXstate`]).
//!
//! `KVM_GET_XSAVE2` (5.17) writes as many bytes as the process's guest permission makes the
//! guest FPU state, which can exceed the 4096 bytes of `struct kvm_xsave`; the buffer size
//! is `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)`. That value is stable once a vCPU exists, since
//! the permission is then frozen, so [`XsaveState::get`] takes the vCPU and queries the size
//! itself. The state is kept as plain bytes in the standard format.
//!
//! The image alone does not restore a vCPU: XCR0 decides which components the guest has
//! enabled, and for AMX the `IA32_XFD` and `IA32_XFD_ERR` MSRs (0x1c4, 0x1c5) say which
//! dynamic components are armed to fault and which one faulted last. [`VcpuXstate`] carries
//! all four, checks them against KVM's rules before any call and restores them in an order
//! KVM accepts.

use kvm_bindings::{kvm_msr_entry, kvm_xcr, kvm_xcrs, Msrs, Xsave, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::layout::XsaveLayout;
use crate::permission::GuestPermission;
use crate::sys;
use crate::xfeature::{XFeature, XFeatureSet};

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
    /// `KVM_GET_XCRS` failed.
    #[error("KVM_GET_XCRS failed")]
    GetXcrs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_XCRS` failed.
    #[error("KVM_SET_XCRS failed")]
    SetXcrs(#[source] kvm_ioctls::Error),
    /// `KVM_GET_MSRS` for `IA32_XFD` and `IA32_XFD_ERR` failed.
    #[error("KVM_GET_MSRS(IA32_XFD, IA32_XFD_ERR) failed")]
    GetMsrs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_MSRS` for `IA32_XFD` and `IA32_XFD_ERR` failed.
    #[error("KVM_SET_MSRS(IA32_XFD, IA32_XFD_ERR) failed")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// `KVM_GET_MSRS` or `KVM_SET_MSRS` stopped before an MSR: KVM processes entries in
    /// order and returns how many it handled.
    #[error("{ioctl} processed {processed} of {total} MSRs; MSR {index:#x} was refused")]
    MsrsProcessed {
        /// `KVM_GET_MSRS` or `KVM_SET_MSRS`.
        ioctl: &'static str,
        /// How many entries KVM handled.
        processed: usize,
        /// How many were passed.
        total: usize,
        /// The first entry KVM did not handle.
        index: u32,
    },
    /// `KVM_GET_CPUID2` on the target vCPU failed.
    #[error("KVM_GET_CPUID2 failed")]
    GetCpuid(#[source] kvm_ioctls::Error),
    /// The saved state breaks a rule KVM enforces (or that keeps the host from faulting);
    /// nothing was written.
    #[error("the saved extended state does not fit the target vCPU: {0}")]
    Rejected(#[source] StateRule),
}

/// A rule of KVM's that a saved extended state breaks for a target vCPU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateRule {
    /// KVM_SET_XCRS accepts only XCR0 (`__kvm_set_xcr`, arch/x86/kvm/x86.c).
    #[error("XCR{index} is not an extended control register KVM accepts (only XCR0 is)")]
    XcrIndex {
        /// The index.
        index: u32,
    },
    /// XCR0 holds components outside what the target vCPU's CPUID leaf 0xD enables (KVM's
    /// `guest_supported_xcr0`, set by `KVM_SET_CPUID2`; set the CPUID before restoring).
    #[error("XCR0 {xcr0} enables components the target vCPU's CPUID does not ({guest})")]
    Xcr0OutsideGuest {
        /// The saved XCR0.
        xcr0: XFeatureSet,
        /// What the target vCPU's CPUID enables.
        guest: XFeatureSet,
    },
    /// XCR0 is not a value any CPU accepts (`__kvm_set_xcr`: x87 always; AVX needs SSE;
    /// MPX's two components together; AVX-512's three together and with AVX; AMX's two
    /// together).
    #[error("XCR0 {xcr0} is architecturally invalid: {reason}")]
    Xcr0Invalid {
        /// The saved XCR0.
        xcr0: XFeatureSet,
        /// The rule broken.
        reason: &'static str,
    },
    /// The image holds state for components the target vCPU's CPUID does not enable.
    #[error(
        "the XSAVE image holds state for {xstate_bv}, the target vCPU's CPUID enables {guest}"
    )]
    ImageOutsideGuest {
        /// XSTATE_BV of the image.
        xstate_bv: XFeatureSet,
        /// What the target vCPU's CPUID enables.
        guest: XFeatureSet,
    },
    /// `IA32_XFD` or `IA32_XFD_ERR` has bits outside the guest's supported XCR0 ∩ tile
    /// data, which `kvm_set_msr_common` refuses (0 is always accepted).
    #[error("MSR {msr:#x} = {value:#x} has bits outside {allowed} (the dynamic components the target vCPU's CPUID enables)")]
    XfdOutsideGuest {
        /// `IA32_XFD` or `IA32_XFD_ERR`.
        msr: u32,
        /// The saved value.
        value: u64,
        /// What KVM accepts.
        allowed: XFeatureSet,
    },
    /// The image holds state for a component `IA32_XFD` disables. A CPU saves such a
    /// component as initial (its XSTATE_BV bit 0), so no real save has it; restoring it makes
    /// a kernel without the fix "x86/fpu: Clear `XSTATE_BV[i]` in guest XSAVE state whenever
    /// `XFD[i]=1`" (posted to the KVM list in December 2025) fault with #NM in the host on
    /// the next XRSTOR, and one with the fix drops it.
    #[error("the XSAVE image holds state for {components}, which IA32_XFD disables")]
    StateUnderXfd {
        /// The components in both XSTATE_BV and XFD.
        components: XFeatureSet,
    },
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Offset of XSTATE_BV in the XSAVE header (SDM vol. 1, 13.4.2).
const XSTATE_BV_OFFSET: usize = sys::XSAVE_LEGACY_REGION as usize;

/// One vCPU's XSAVE area in the standard format, as `KVM_GET_XSAVE2` returns it.
///
/// It serializes as its bytes; deserializing checks the length as [`XsaveState::from_bytes`]
/// does.
///
/// ```
/// use xstate_perm::XsaveState;
///
/// let mut image = vec![0u8; 4096];
/// image[512] = 0b11; // XSTATE_BV: x87 and SSE
/// let state = XsaveState::from_bytes(image).unwrap();
/// assert_eq!(state.xstate_bv().to_string(), "x87|sse");
/// assert!(XsaveState::from_bytes(vec![0; 100]).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<u8>", into = "Vec<u8>")]
pub struct XsaveState {
    bytes: Vec<u8>,
}

impl TryFrom<Vec<u8>> for XsaveState {
    type Error = Error;

    fn try_from(bytes: Vec<u8>) -> Result<Self> {
        XsaveState::from_bytes(bytes)
    }
}

impl From<XsaveState> for Vec<u8> {
    fn from(state: XsaveState) -> Self {
        state.bytes
    }
}

/// `KVM_CAP_XSAVE2` for `vm`: the buffer size for this process's vCPUs.
///
/// # Errors
///
/// [`Error::NoXsave2`] where the capability is absent (before 5.17).
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
    ///
    /// # Errors
    ///
    /// [`Error::NoXsave2`], [`Error::Allocate`] or [`Error::Get`].
    pub fn get(vm: &VmFd, vcpu: &VcpuFd) -> Result<Self> {
        let size = xsave2_size(vm)?;
        let mut buf = allocate(size)?;
        // SAFETY: `buf` holds `size` = KVM_CAP_XSAVE2 bytes, queried while `vcpu` exists.
        // KVM_GET_XSAVE2 copies `guest_fpu.uabi_size` bytes, which is the standard-format
        // size of what the process's guest permission allows (at least 4096), the same
        // value KVM_CAP_XSAVE2 reports; the permission is frozen from the first vCPU on, so
        // the two cannot diverge after this query.
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
    ///
    /// # Errors
    ///
    /// [`Error::TooSmall`] for a short image; [`Error::NoXsave2`], [`Error::Allocate`] or
    /// [`Error::Set`].
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
    ///
    /// # Errors
    ///
    /// [`Error::TooSmall`] for an image under 4096 bytes (`struct kvm_xsave`).
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

/// One extended control register and its value, as `KVM_GET_XCRS` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xcr {
    /// The register number (0 is XCR0).
    pub index: u32,
    /// Its value.
    pub value: u64,
}

/// A vCPU's complete extended state: the XSAVE image, the XCRs, `IA32_XFD` and
/// `IA32_XFD_ERR`. It serializes with serde, so a VMM can put it in a snapshot or a
/// migration stream.
///
/// [`VcpuXstate::restore`] writes it into a vCPU whose CPUID is already set, in the order
/// KVM accepts:
///
/// 1. the CPUID (the caller's `KVM_SET_CPUID2`, before): it sets the guest's supported XCR0,
///    which bounds XCR0 and the XFD MSRs, and for AMX it is what enlarges the guest FPU
///    state (`kvm_check_cpuid`);
/// 2. the XCRs (`KVM_SET_XCRS`);
/// 3. the XSAVE image (`KVM_SET_XSAVE`, `KVM_CAP_XSAVE2` bytes);
/// 4. `IA32_XFD_ERR` and `IA32_XFD` (`KVM_SET_MSRS`, host-initiated, so accepted whatever
///    the guest CPUID says about XFD as long as the value fits).
///
/// Before any call it checks the state against the target's CPUID and KVM's rules
/// ([`StateRule`]), so a state that does not fit fails without a partial write.
///
/// ```
/// use xstate_perm::state::{VcpuXstate, Xcr, XsaveState};
/// use xstate_perm::XFeatureSet;
///
/// let mut image = vec![0u8; 4096];
/// image[512] = 0b111; // XSTATE_BV: x87, SSE, AVX
/// let state = VcpuXstate {
///     xsave: XsaveState::from_bytes(image).unwrap(),
///     xcrs: vec![Xcr { index: 0, value: 0b111 }],
///     xfd: 0,
///     xfd_err: 0,
/// };
/// // A vCPU whose CPUID enables x87|sse|avx takes it; one with x87|sse only does not.
/// state.check(XFeatureSet::from_bits(0b111)).unwrap();
/// assert!(state.check(XFeatureSet::LEGACY).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuXstate {
    /// The XSAVE image (`KVM_GET_XSAVE2`).
    pub xsave: XsaveState,
    /// The extended control registers (`KVM_GET_XCRS`).
    pub xcrs: Vec<Xcr>,
    /// `IA32_XFD` (MSR 0x1c4).
    pub xfd: u64,
    /// `IA32_XFD_ERR` (MSR 0x1c5).
    pub xfd_err: u64,
}

fn xfd_msrs(values: [u64; 2]) -> Result<Msrs> {
    let entries = [
        kvm_msr_entry {
            index: sys::MSR_IA32_XFD_ERR,
            data: values[0],
            ..Default::default()
        },
        kvm_msr_entry {
            index: sys::MSR_IA32_XFD,
            data: values[1],
            ..Default::default()
        },
    ];
    Msrs::from_entries(&entries).map_err(|source| Error::Allocate {
        size: std::mem::size_of_val(&entries),
        source,
    })
}

fn check_processed(ioctl: &'static str, processed: usize, msrs: &Msrs) -> Result<()> {
    let entries = msrs.as_slice();
    if processed == entries.len() {
        return Ok(());
    }
    Err(Error::MsrsProcessed {
        ioctl,
        processed,
        total: entries.len(),
        index: entries.get(processed).map_or(0, |e| e.index),
    })
}

/// The rules `__kvm_set_xcr` (arch/x86/kvm/x86.c, 5.17 to 6.18) applies to an XCR0 value,
/// apart from the bound by the guest's CPUID.
fn xcr0_architectural(xcr0: XFeatureSet) -> std::result::Result<(), &'static str> {
    let has = |f: XFeature| xcr0.contains(f);
    let avx512 = XFeatureSet::from_bits(0b1110_0000);
    let mpx = XFeatureSet::from_bits(0b1_1000);
    if !has(XFeature::X87) {
        return Err("x87 (bit 0) must be set");
    }
    if has(XFeature::Avx) && !has(XFeature::Sse) {
        return Err("AVX needs SSE");
    }
    if !xcr0.intersection(mpx).is_empty() && !xcr0.contains_all(mpx) {
        return Err("MPX's bndregs and bndcsr go together");
    }
    let partial_avx512 = !xcr0.intersection(avx512).is_empty() && !xcr0.contains_all(avx512);
    if partial_avx512 || (!xcr0.intersection(avx512).is_empty() && !has(XFeature::Avx)) {
        return Err("AVX-512's opmask, zmm_hi256 and hi16_zmm go together, with AVX");
    }
    if !xcr0.intersection(XFeatureSet::AMX).is_empty() && !xcr0.contains_all(XFeatureSet::AMX) {
        return Err("AMX's xtilecfg and xtiledata go together");
    }
    Ok(())
}

impl VcpuXstate {
    /// Reads `vcpu`'s extended state (`vm` is the VM that owns it): `KVM_GET_XSAVE2`,
    /// `KVM_GET_XCRS` and `KVM_GET_MSRS` for `IA32_XFD` and `IA32_XFD_ERR`, which KVM answers
    /// to the host on every x86-64 kernel since 5.17, XFD-capable CPU or not.
    ///
    /// # Errors
    ///
    /// The failed ioctl's variant of [`Error`]; [`Error::MsrsProcessed`] where KVM read fewer
    /// than both MSRs.
    pub fn save(vm: &VmFd, vcpu: &VcpuFd) -> Result<Self> {
        let xsave = XsaveState::get(vm, vcpu)?;
        let raw = vcpu.get_xcrs().map_err(Error::GetXcrs)?;
        let count = (raw.nr_xcrs as usize).min(raw.xcrs.len());
        let xcrs = raw.xcrs[..count]
            .iter()
            .map(|x| Xcr {
                index: x.xcr,
                value: x.value,
            })
            .collect();
        let mut msrs = xfd_msrs([0, 0])?;
        let read = vcpu.get_msrs(&mut msrs).map_err(Error::GetMsrs)?;
        check_processed("KVM_GET_MSRS", read, &msrs)?;
        let value = |index| {
            msrs.as_slice()
                .iter()
                .find(|e| e.index == index)
                .map_or(0, |e| e.data)
        };
        Ok(VcpuXstate {
            xsave,
            xcrs,
            xfd: value(sys::MSR_IA32_XFD),
            xfd_err: value(sys::MSR_IA32_XFD_ERR),
        })
    }

    /// XCR0, where the state has it.
    pub fn xcr0(&self) -> Option<XFeatureSet> {
        self.xcrs
            .iter()
            .find(|x| x.index == sys::XCR_XFEATURE_ENABLED_MASK)
            .map(|x| XFeatureSet::from_bits(x.value))
    }

    /// Checks the state against the rules KVM applies when it is written into a vCPU whose
    /// CPUID leaf 0xD enables `guest` (KVM's `guest_supported_xcr0`); pure, no call.
    ///
    /// # Errors
    ///
    /// The first [`StateRule`] broken.
    pub fn check(&self, guest: XFeatureSet) -> std::result::Result<(), StateRule> {
        let guest = guest.union(XFeature::X87.into());
        for xcr in &self.xcrs {
            if xcr.index != sys::XCR_XFEATURE_ENABLED_MASK {
                return Err(StateRule::XcrIndex { index: xcr.index });
            }
            let xcr0 = XFeatureSet::from_bits(xcr.value);
            xcr0_architectural(xcr0).map_err(|reason| StateRule::Xcr0Invalid { xcr0, reason })?;
            if !guest.contains_all(xcr0) {
                return Err(StateRule::Xcr0OutsideGuest { xcr0, guest });
            }
        }
        let xstate_bv = self.xsave.xstate_bv();
        if !guest.union(XFeatureSet::LEGACY).contains_all(xstate_bv) {
            return Err(StateRule::ImageOutsideGuest { xstate_bv, guest });
        }
        let allowed = guest.intersection(XFeatureSet::DYNAMIC);
        for (msr, value) in [
            (sys::MSR_IA32_XFD, self.xfd),
            (sys::MSR_IA32_XFD_ERR, self.xfd_err),
        ] {
            if !allowed.contains_all(XFeatureSet::from_bits(value)) {
                return Err(StateRule::XfdOutsideGuest {
                    msr,
                    value,
                    allowed,
                });
            }
        }
        let components = xstate_bv.intersection(XFeatureSet::from_bits(self.xfd));
        if !components.is_empty() {
            return Err(StateRule::StateUnderXfd { components });
        }
        Ok(())
    }

    /// Writes the state into `vcpu` of `vm`, whose CPUID must already be set; see the type's
    /// docs for the order. `permission` is the proof the process settled its guest
    /// permission (the target's KVM-supported XCR0 comes from it).
    ///
    /// # Errors
    ///
    /// [`Error::GetCpuid`] where the target's CPUID cannot be read; [`Error::Rejected`]
    /// with the [`StateRule`] broken, before anything is written; the failed ioctl's variant
    /// otherwise, and [`Error::MsrsProcessed`] where KVM set fewer than both MSRs.
    pub fn restore(&self, permission: &GuestPermission, vm: &VmFd, vcpu: &VcpuFd) -> Result<()> {
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::GetCpuid)?;
        let guest = crate::cpuid::xcr0_enumerated(cpuid.as_slice())
            .intersection(permission.kvm_supported());
        self.check(guest).map_err(Error::Rejected)?;
        let needed = xsave2_size(vm)?;
        if self.xsave.as_bytes().len() < needed {
            return Err(Error::TooSmall {
                len: self.xsave.as_bytes().len(),
                needed,
            });
        }

        let mut raw = kvm_xcrs::default();
        for (slot, xcr) in raw.xcrs.iter_mut().zip(&self.xcrs) {
            *slot = kvm_xcr {
                xcr: xcr.index,
                reserved: 0,
                value: xcr.value,
            };
        }
        raw.nr_xcrs = self.xcrs.len().min(raw.xcrs.len()) as u32;
        vcpu.set_xcrs(&raw).map_err(Error::SetXcrs)?;
        self.xsave.set(vm, vcpu)?;
        let msrs = xfd_msrs([self.xfd_err, self.xfd])?;
        let written = vcpu.set_msrs(&msrs).map_err(Error::SetMsrs)?;
        check_processed("KVM_SET_MSRS", written, &msrs)
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

    fn state(xstate_bv: u64, xcr0: u64, xfd: u64, xfd_err: u64) -> VcpuXstate {
        let mut image = vec![0u8; 4096];
        image[512..520].copy_from_slice(&xstate_bv.to_le_bytes());
        VcpuXstate {
            xsave: XsaveState::from_bytes(image).unwrap(),
            xcrs: vec![Xcr {
                index: 0,
                value: xcr0,
            }],
            xfd,
            xfd_err,
        }
    }

    fn set(bits: u64) -> XFeatureSet {
        XFeatureSet::from_bits(bits)
    }

    /// Models `__kvm_set_xcr` (XCR0), `kvm_set_msr_common` for `MSR_IA32_XFD` and
    /// `MSR_IA32_XFD_ERR` (`kvm_guest_supported_xfd`), arch/x86/kvm/x86.c, 5.17 to 6.18, and
    /// the XSTATE_BV/XFD rule of "x86/fpu: Clear XSTATE_BV[i] in guest XSAVE state whenever
    /// XFD[i]=1" (December 2025).
    #[test]
    fn restore_rules_follow_kvm() {
        let amx_guest = set(0x602e7);
        // A consistent AMX state: tile data in use, XFD clear.
        state(0x60003, 0x602e7, 0, 0).check(amx_guest).unwrap();
        // XFD armed for tile data with tile data initial: fine; XFD_ERR may name it.
        state(0x20003, 0x602e7, 1 << 18, 1 << 18)
            .check(amx_guest)
            .unwrap();
        // Armed XFD with tile state in the image: refused.
        assert_eq!(
            state(0x60003, 0x602e7, 1 << 18, 0).check(amx_guest),
            Err(StateRule::StateUnderXfd {
                components: set(1 << 18)
            })
        );
        // XFD beyond the guest's supported XCR0 ∩ tile data (kvm_guest_supported_xfd).
        let no_amx = set(0x2e7);
        assert!(matches!(
            state(0x3, 0x2e7, 1 << 18, 0).check(no_amx),
            Err(StateRule::XfdOutsideGuest { msr: 0x1c4, .. })
        ));
        assert!(matches!(
            state(0x3, 0x602e7, 0, 1 << 17).check(amx_guest),
            Err(StateRule::XfdOutsideGuest { msr: 0x1c5, .. })
        ));
        // XCR0 beyond the target's CPUID, or architecturally invalid.
        assert!(matches!(
            state(0x3, 0x602e7, 0, 0).check(no_amx),
            Err(StateRule::Xcr0OutsideGuest { .. })
        ));
        for (xcr0, reason) in [
            (0x2, "x87"),
            (0x5, "AVX needs SSE"),
            (0x23, "AVX-512"),
            (0xe3, "AVX-512"),
            (0xb, "MPX"),
            (0x40003, "AMX"),
        ] {
            let err = state(0x3, xcr0, 0, 0).check(set(0xfffff)).unwrap_err();
            assert!(
                matches!(err, StateRule::Xcr0Invalid { reason: r, .. } if r.contains(reason)),
                "{xcr0:#x}: {err}"
            );
        }
        let mut other = state(0x3, 0x3, 0, 0);
        other.xcrs.push(Xcr { index: 1, value: 0 });
        assert_eq!(other.check(no_amx), Err(StateRule::XcrIndex { index: 1 }));
        // Image state outside the target's CPUID.
        assert!(matches!(
            state(0x7, 0x3, 0, 0).check(XFeatureSet::LEGACY),
            Err(StateRule::ImageOutsideGuest { .. })
        ));
        assert_eq!(state(0x7, 0x7, 0, 0).xcr0(), Some(set(0x7)));
    }

    #[test]
    fn serde_round_trip_checks_the_image() {
        let saved = state(0x60003, 0x602e7, 0, 1 << 18);
        let json = serde_json::to_string(&saved).unwrap();
        let back: VcpuXstate = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["xsave"] = serde_json::json!([0, 1, 2]);
        assert!(serde_json::from_value::<VcpuXstate>(value).is_err());
    }

    #[test]
    fn msr_counts_are_verified() {
        let msrs = xfd_msrs([1, 2]).unwrap();
        assert_eq!(
            msrs.as_slice().iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![0x1c5, 0x1c4]
        );
        check_processed("KVM_SET_MSRS", 2, &msrs).unwrap();
        assert!(matches!(
            check_processed("KVM_SET_MSRS", 1, &msrs),
            Err(Error::MsrsProcessed {
                processed: 1,
                total: 2,
                index: 0x1c4,
                ..
            })
        ));
    }
}
