//! [`RegisterCache`]: one vCPU's regs, sregs and events, cached with dirty tracking, moved
//! through `kvm_run` where KVM offers it and through `KVM_GET_*`/`KVM_SET_*` ioctls where it
//! does not. The cache does not own the vCPU: the run loop that owns the `VcpuFd` lends it
//! to [`RegisterCache::stage`] before `KVM_RUN`, to [`RegisterCache::finish`] after it, and
//! to the accessors in between.

use kvm_bindings::{
    kvm_regs, kvm_sregs, kvm_sync_regs, kvm_vcpu_events, KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_types::{
    GuestStateError, GuestStateGuard, LaunchState, ProtectionConfig, TypedVm, VcpuOp, VmType,
};

use crate::dump::RegisterDump;
use crate::reg_set::{RegKind, RegSet, UnknownBits};
use crate::sys;

/// Errors from [`RegisterCache`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A copy-out selection named a set the capability does not offer on this VM.
    #[error(
        "register sets {requested} cannot be copied out through kvm_run: KVM_CAP_SYNC_REGS \
         offers only {offered} here (KVM_RUN would fail with EINVAL)"
    )]
    NotOffered {
        /// The sets that were asked for and are not offered.
        requested: RegSet,
        /// What the capability offers on this VM.
        offered: RegSet,
    },
    /// A raw copy-out mask had bits that name no register set.
    #[error("invalid copy-out mask")]
    InvalidMask(#[source] UnknownBits),
    /// Sync regs were configured for a VM type on which KVM refuses them.
    #[error("sync regs refused for sets {requested}")]
    SyncRegsRefused {
        /// The sets that were asked for.
        requested: RegSet,
        /// The guard's reason.
        #[source]
        source: GuestStateError,
    },
    /// The VM type's guest-state rule refused an ioctl before it reached KVM.
    #[error("{op} refused before reaching KVM")]
    Refused {
        /// The ioctl.
        op: VcpuOp,
        /// The guard's reason.
        #[source]
        source: GuestStateError,
    },
    /// A register ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        /// The ioctl.
        op: VcpuOp,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_MP_STATE`, asked before the first write reaches a vCPU, failed.
    #[error("KVM_GET_MP_STATE failed")]
    GetMpState(#[source] kvm_ioctls::Error),
    /// Writes are pending for a vCPU that has not left its wait for INIT/SIPI.
    ///
    /// Such a vCPU's `KVM_RUN` returns without applying `kvm_dirty_regs`
    /// (`kvm_arch_vcpu_ioctl_run` blocks in `kvm_vcpu_block` while the state is
    /// `KVM_MP_STATE_UNINITIALIZED`), and the first `KVM_RUN` after SIPI would apply them over
    /// the CS:RIP that SIPI set (`kvm_vcpu_deliver_sipi_vector`). The writes stay pending;
    /// drop them with [`RegisterCache::discard`], or opt in with
    /// [`RegisterCache::allow_writes_before_sipi`].
    #[error(
        "vCPU is waiting for INIT/SIPI (mp_state {mp_state}); writes to {pending} were not \
         staged, so that they neither vanish nor overwrite the SIPI start"
    )]
    NotRunnable {
        /// `kvm_mp_state.mp_state` (`KVM_MP_STATE_UNINITIALIZED` = 1,
        /// `KVM_MP_STATE_INIT_RECEIVED` = 2).
        mp_state: u32,
        /// The sets whose writes are pending.
        pending: RegSet,
    },
    /// `KVM_RUN`'s `sync_regs()` refused a register image written through `kvm_run`; the
    /// write is still pending.
    #[error(
        "KVM_RUN refused the {rejected} image written through kvm_run; sets {pending} are still \
         pending: correct them and run again"
    )]
    ImageRejected {
        /// The set the kernel failed to apply (it applies regs, sregs, events in that order
        /// and stops at the first failure).
        rejected: RegKind,
        /// All sets whose writes are still pending, `rejected` included.
        pending: RegSet,
        /// The errno (`EINVAL`).
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_RUN` failed for another reason (`EINTR` after `immediate_exit` or a signal,
    /// `EAGAIN` from a vCPU woken by INIT/SIPI).
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
}

impl Error {
    /// The errno of a failed ioctl, if this error comes from one.
    ///
    /// ```
    /// use sync_regs::{Error, RegSet};
    ///
    /// let run = Error::Run(kvm_ioctls::Error::new(libc::EINTR));
    /// assert_eq!(run.errno(), Some(libc::EINTR));
    /// let waiting = Error::NotRunnable { mp_state: 1, pending: RegSet::REGS };
    /// assert_eq!(waiting.errno(), None);
    /// ```
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Ioctl { source, .. } | Error::ImageRejected { source, .. } => {
                Some(source.errno())
            }
            Error::Run(source) | Error::GetMpState(source) => Some(source.errno()),
            _ => None,
        }
    }
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// One register set's cached image. Invariant: `dirty` implies `image.is_some()`.
#[derive(Clone, Copy)]
struct Slot<T> {
    /// The set as the cache believes it is (or will be once pending writes are applied);
    /// `None` when it has to be read again.
    image: Option<T>,
    /// The image holds a write that has not reached the vCPU yet.
    dirty: bool,
}

impl<T> Slot<T> {
    const UNKNOWN: Slot<T> = Slot {
        image: None,
        dirty: false,
    };

    fn get_or_try_load(&mut self, load: impl FnOnce() -> Result<T>) -> Result<&mut T> {
        let image = match self.image.take() {
            Some(image) => image,
            None => load()?,
        };
        Ok(self.image.insert(image))
    }

    /// Forgets a clean image (the vCPU ran, so it may be stale); keeps a pending write.
    fn invalidate_unless_dirty(&mut self) {
        if !self.dirty {
            self.image = None;
        }
    }

    fn discard(&mut self) {
        *self = Slot::UNKNOWN;
    }
}

struct Cache {
    regs: Slot<kvm_regs>,
    sregs: Slot<kvm_sregs>,
    events: Slot<kvm_vcpu_events>,
    /// The sets whose `kvm_run` copy equals the vCPU state: what the kernel stored on the
    /// last return from `KVM_RUN`.
    copied_out: RegSet,
}

impl Cache {
    const fn new() -> Self {
        Cache {
            regs: Slot::UNKNOWN,
            sregs: Slot::UNKNOWN,
            events: Slot::UNKNOWN,
            copied_out: RegSet::EMPTY,
        }
    }

    fn dirty(&self) -> RegSet {
        let mut set = RegSet::EMPTY;
        if self.regs.dirty {
            set = set.with(RegKind::Regs);
        }
        if self.sregs.dirty {
            set = set.with(RegKind::Sregs);
        }
        if self.events.dirty {
            set = set.with(RegKind::Events);
        }
        set
    }

    fn mark_applied(&mut self, applied: RegSet) {
        for kind in applied.iter() {
            match kind {
                RegKind::Regs => self.regs.dirty = false,
                RegKind::Sregs => self.sregs.dirty = false,
                RegKind::Events => self.events.dirty = false,
            }
        }
    }

    /// After `KVM_RUN`: `applied` sets reached the vCPU, and `copied_out` holds the kernel's
    /// fresh copies; every clean image may be stale.
    fn after_run(&mut self, applied: RegSet, copied_out: RegSet) {
        self.mark_applied(applied);
        self.regs.invalidate_unless_dirty();
        self.sregs.invalidate_unless_dirty();
        self.events.invalidate_unless_dirty();
        self.copied_out = copied_out;
    }
}

/// A register set the cache holds: how to move it through `kvm_run` and through ioctls.
trait RegImage: Copy {
    const KIND: RegKind;
    const GET: VcpuOp;
    const SET: VcpuOp;
    fn slot(cache: &mut Cache) -> &mut Slot<Self>;
    fn copy_out(sync: &kvm_sync_regs) -> Self;
    fn copy_in(&self, sync: &mut kvm_sync_regs);
    fn get(vcpu: &VcpuFd) -> std::result::Result<Self, kvm_ioctls::Error>;
    fn set(&self, vcpu: &VcpuFd) -> std::result::Result<(), kvm_ioctls::Error>;
}

impl RegImage for kvm_regs {
    const KIND: RegKind = RegKind::Regs;
    const GET: VcpuOp = VcpuOp::GetRegs;
    const SET: VcpuOp = VcpuOp::SetRegs;
    fn slot(cache: &mut Cache) -> &mut Slot<Self> {
        &mut cache.regs
    }
    fn copy_out(sync: &kvm_sync_regs) -> Self {
        sync.regs
    }
    fn copy_in(&self, sync: &mut kvm_sync_regs) {
        sync.regs = *self;
    }
    fn get(vcpu: &VcpuFd) -> std::result::Result<Self, kvm_ioctls::Error> {
        vcpu.get_regs()
    }
    fn set(&self, vcpu: &VcpuFd) -> std::result::Result<(), kvm_ioctls::Error> {
        vcpu.set_regs(self)
    }
}

impl RegImage for kvm_sregs {
    const KIND: RegKind = RegKind::Sregs;
    const GET: VcpuOp = VcpuOp::GetSregs;
    const SET: VcpuOp = VcpuOp::SetSregs;
    fn slot(cache: &mut Cache) -> &mut Slot<Self> {
        &mut cache.sregs
    }
    fn copy_out(sync: &kvm_sync_regs) -> Self {
        sync.sregs
    }
    fn copy_in(&self, sync: &mut kvm_sync_regs) {
        sync.sregs = *self;
    }
    fn get(vcpu: &VcpuFd) -> std::result::Result<Self, kvm_ioctls::Error> {
        vcpu.get_sregs()
    }
    fn set(&self, vcpu: &VcpuFd) -> std::result::Result<(), kvm_ioctls::Error> {
        vcpu.set_sregs(self)
    }
}

impl RegImage for kvm_vcpu_events {
    const KIND: RegKind = RegKind::Events;
    const GET: VcpuOp = VcpuOp::GetVcpuEvents;
    const SET: VcpuOp = VcpuOp::SetVcpuEvents;
    fn slot(cache: &mut Cache) -> &mut Slot<Self> {
        &mut cache.events
    }
    fn copy_out(sync: &kvm_sync_regs) -> Self {
        sync.events
    }
    fn copy_in(&self, sync: &mut kvm_sync_regs) {
        sync.events = *self;
    }
    fn get(vcpu: &VcpuFd) -> std::result::Result<Self, kvm_ioctls::Error> {
        vcpu.get_vcpu_events()
    }
    fn set(&self, vcpu: &VcpuFd) -> std::result::Result<(), kvm_ioctls::Error> {
        vcpu.set_vcpu_events(self)
    }
}

/// Whether staging writes needs the vCPU's MP state first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    /// Not known yet: ask `KVM_GET_MP_STATE` before the first write is staged.
    Unknown,
    /// Seen runnable (it has left the wait for INIT/SIPI), or the caller opted in.
    Runnable,
}

/// How the sets dirty at `stage` are split between ioctls and `kvm_run`, so that together
/// they reach the vCPU in the kernel's order (regs, sregs, events; `sync_regs()` in
/// arch/x86/kvm/x86.c).
///
/// Every dirty set up to and including the last one that cannot go through `kvm_run` is
/// applied by ioctl, in order; the dirty sets after it go through `kvm_run`, which the
/// kernel applies later (at `KVM_RUN`). So no later set is applied before an earlier one:
/// `__set_regs()` clears a pending exception, and must not run after the events that
/// carry it.
fn split_by_order(dirty: RegSet, offered: RegSet) -> (RegSet, RegSet) {
    let last_ioctl = dirty.difference(offered).iter().last();
    let mut by_ioctl = RegSet::EMPTY;
    if let Some(last) = last_ioctl {
        for kind in dirty.iter() {
            by_ioctl = by_ioctl.with(kind);
            if kind == last {
                break;
            }
        }
    }
    (by_ioctl, dirty.difference(by_ioctl))
}

/// Register access for one vCPU, through `kvm_run` (`KVM_CAP_SYNC_REGS`, x86 since Linux
/// 4.16) for every set the capability offers and through ioctls for the others, without
/// owning the vCPU.
///
/// The run loop that owns the [`VcpuFd`] drives it (or calls [`RegisterCache::run`], which
/// does the three steps):
///
/// 1. [`RegisterCache::stage`] before `KVM_RUN`: dirty sets go to the vCPU, in the kernel's
///    order — by ioctl where they must, into `kvm_run` with their `kvm_dirty_regs` bits
///    otherwise — and `kvm_valid_regs` is set to the copy-out selection.
/// 2. `KVM_RUN` (the loop's own `VcpuFd::run`), and whatever the loop does with the exit.
/// 3. [`RegisterCache::finish`] once the exit is no longer borrowed: a staged set is applied
///    only if the kernel cleared its `kvm_dirty_regs` bit, on every return path, and the
///    selected sets are now served from `kvm_run`.
///
/// Between `finish` and the next `stage`, exit handlers read and write registers with the
/// accessors, which take the vCPU by shared reference:
///
/// * **Reads** are cached: each set is copied out of `kvm_run` (or read with its `KVM_GET_*`
///   ioctl) at most once per exit, on first use, and then served from the copy.
/// * **Writes** only change the cached image and mark the set dirty; the cache, not the
///   caller, tracks what is dirty, so no write is forgotten, and a write stays pending until
///   the kernel reports it applied.
pub struct RegisterCache {
    guard: GuestStateGuard,
    /// For a cache of a [`TypedVm`]: the VM's launch state and per-VM choices, from which the
    /// guard is taken at each check, so that pre-launch set-up works and post-launch access is
    /// refused.
    launch: Option<(LaunchState, ProtectionConfig)>,
    offered: RegSet,
    selection: RegSet,
    cache: Cache,
    /// The sets copied into `kvm_run` with their `kvm_dirty_regs` bits by the last `stage`.
    staged: RegSet,
    readiness: Readiness,
}

impl std::fmt::Debug for RegisterCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterCache")
            .field("vm_type", &self.guard.vm_type())
            .field("offered", &self.offered)
            .field("selection", &self.selection)
            .field("dirty", &self.cache.dirty())
            .field("copied_out", &self.cache.copied_out)
            .finish_non_exhaustive()
    }
}

impl RegisterCache {
    /// A register cache for the vCPUs of `vm`, a VM of type `vm_type`.
    ///
    /// The offered sets are what `KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS)` reports on the VM
    /// fd, restricted to what the VM type allows: none on a type with protected guest
    /// state, where KVM refuses sync regs, and where the guard also refuses register ioctls.
    /// The copy-out selection starts as the general-purpose registers if they are offered.
    pub fn new(vm: &VmFd, vm_type: VmType) -> Self {
        let guard = GuestStateGuard::new(vm_type);
        Self::build(guard, Self::probe_offered(vm, guard))
    }

    /// A register cache for the vCPUs of `vm`, whose handle carries its type and launch
    /// state: register ioctls are checked against the VM's protection as it is at each call
    /// (allowed before an SEV-ES or SNP VM's launch, refused after it), and sync regs are
    /// offered as in [`RegisterCache::new`].
    pub fn for_vm(vm: &TypedVm) -> Self {
        // Sync regs are refused on every protected-state type, before launch too.
        let offered = Self::probe_offered(vm.fd(), GuestStateGuard::new(vm.vm_type()));
        let mut cache = Self::build(vm.guard(), offered);
        cache.launch = Some((vm.launch_state(), vm.config()));
        cache
    }

    fn probe_offered(vm: &VmFd, guard: GuestStateGuard) -> RegSet {
        if guard.check(VcpuOp::SyncRegs).is_ok() {
            let raw = vm.check_extension_raw(libc::c_ulong::from(sys::KVM_CAP_SYNC_REGS));
            // A negative value is an error, not a mask: treat it as "nothing offered".
            RegSet::from_bits_truncate(u64::try_from(raw).unwrap_or(0))
        } else {
            RegSet::EMPTY
        }
    }

    /// A register cache with an explicit set of offered sets, for callers that have already
    /// probed the capability or want some sets to go through ioctls ([`RegSet::EMPTY`]:
    /// ioctls only).
    ///
    /// `offered` must be within what `KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS)` reports, or
    /// `KVM_RUN` fails with `EINVAL`.
    ///
    /// ```
    /// use sync_regs::{RegSet, RegisterCache};
    /// use vm_types::{GuestStateGuard, VmType};
    ///
    /// let cache =
    ///     RegisterCache::with_offered(GuestStateGuard::new(VmType::Default), RegSet::REGS)?;
    /// assert_eq!(cache.selection(), RegSet::REGS);
    /// assert!(cache.dirty().is_empty());
    /// // SEV-ES protects guest state: KVM refuses sync regs for it.
    /// let refused =
    ///     RegisterCache::with_offered(GuestStateGuard::new(VmType::SevEs), RegSet::REGS);
    /// assert!(refused.is_err());
    /// # Ok::<(), sync_regs::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::SyncRegsRefused`] if `offered` is not empty and the guard's VM type does not
    /// allow sync regs.
    pub fn with_offered(guard: GuestStateGuard, offered: RegSet) -> Result<Self> {
        if !offered.is_empty() {
            guard
                .check(VcpuOp::SyncRegs)
                .map_err(|source| Error::SyncRegsRefused {
                    requested: offered,
                    source,
                })?;
        }
        Ok(Self::build(guard, offered))
    }

    fn build(guard: GuestStateGuard, offered: RegSet) -> Self {
        RegisterCache {
            guard,
            launch: None,
            offered,
            selection: offered.intersection(RegSet::REGS),
            cache: Cache::new(),
            staged: RegSet::EMPTY,
            readiness: Readiness::Unknown,
        }
    }

    /// The sets this cache moves through `kvm_run`.
    pub fn offered(&self) -> RegSet {
        self.offered
    }

    /// The sets the kernel copies into `kvm_run` on every return from `KVM_RUN`.
    pub fn selection(&self) -> RegSet {
        self.selection
    }

    /// Chooses the sets copied out on the next and later returns from `KVM_RUN`.
    ///
    /// Each selected set costs a copy in the kernel on every exit whether it is read or not
    /// (`store_regs()`; sregs is the expensive one), while a set read without being selected
    /// costs a `KVM_GET_*` ioctl: select what the exit handlers read on most exits.
    ///
    /// # Errors
    ///
    /// [`Error::NotOffered`] for sets that are not offered, before `KVM_RUN` could fail on
    /// them; the selection is then unchanged.
    pub fn set_selection(&mut self, selection: RegSet) -> Result<()> {
        let missing = selection.difference(self.offered);
        if !missing.is_empty() {
            return Err(Error::NotOffered {
                requested: missing,
                offered: self.offered,
            });
        }
        self.selection = selection;
        Ok(())
    }

    /// [`RegisterCache::set_selection`] from a raw `KVM_SYNC_X86_*` mask.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidMask`] for bits that name no set, and the errors of
    /// [`RegisterCache::set_selection`].
    pub fn set_selection_bits(&mut self, bits: u64) -> Result<()> {
        let selection = RegSet::from_bits(bits).map_err(Error::InvalidMask)?;
        self.set_selection(selection)
    }

    /// The sets with a write that has not reached the vCPU yet.
    pub fn dirty(&self) -> RegSet {
        self.cache.dirty()
    }

    /// The guest-state rule this cache applies before each register ioctl, as it is now (for
    /// a cache made by [`RegisterCache::for_vm`], it follows the VM's launch).
    pub fn guard(&self) -> GuestStateGuard {
        match &self.launch {
            Some((launch, config)) => {
                GuestStateGuard::at(self.guard.vm_type(), launch.phase(), *config)
            }
            None => self.guard,
        }
    }

    /// Forgets the cached images of `sets` that have no pending write, so that they are read
    /// again; for use after changing them with ioctls behind the cache's back.
    pub fn invalidate(&mut self, sets: RegSet) {
        for kind in sets.iter() {
            match kind {
                RegKind::Regs => self.cache.regs.invalidate_unless_dirty(),
                RegKind::Sregs => self.cache.sregs.invalidate_unless_dirty(),
                RegKind::Events => self.cache.events.invalidate_unless_dirty(),
            }
            // The kvm_run copy is as stale as the cache.
            self.cache.copied_out = self.cache.copied_out.without(kind);
        }
    }

    /// Drops the pending writes of `sets` (and their images): they will never reach the
    /// vCPU. For a write [`Error::NotRunnable`] refused, or one the caller no longer wants.
    pub fn discard(&mut self, sets: RegSet) {
        for kind in sets.iter() {
            match kind {
                RegKind::Regs => self.cache.regs.discard(),
                RegKind::Sregs => self.cache.sregs.discard(),
                RegKind::Events => self.cache.events.discard(),
            }
            self.cache.copied_out = self.cache.copied_out.without(kind);
        }
    }

    /// Stages writes even while the vCPU waits for INIT/SIPI, skipping the
    /// `KVM_GET_MP_STATE` check of [`RegisterCache::stage`].
    ///
    /// For a VMM that means it: a write staged in `kvm_run` for a vCPU in
    /// `KVM_MP_STATE_UNINITIALIZED` stays pending through every `KVM_RUN` that returns from
    /// the wait (`EINTR`, `EAGAIN`) and is applied by the first one after SIPI, over the
    /// CS:RIP SIPI set; a write applied by ioctl before INIT is reset by INIT
    /// (`kvm_vcpu_reset`).
    pub fn allow_writes_before_sipi(&mut self) {
        self.readiness = Readiness::Runnable;
    }

    fn load<T: RegImage>(&mut self, vcpu: &VcpuFd) -> Result<&mut T> {
        let from_kvm_run = self.cache.copied_out.contains(T::KIND);
        let guard = self.guard();
        T::slot(&mut self.cache).get_or_try_load(|| {
            if from_kvm_run {
                // One copy of this set out of the shared page; later reads use the copy.
                return Ok(T::copy_out(&vcpu.sync_regs()));
            }
            guard
                .check(T::GET)
                .map_err(|source| Error::Refused { op: T::GET, source })?;
            T::get(vcpu).map_err(|source| Error::Ioctl { op: T::GET, source })
        })
    }

    fn modify<T: RegImage>(&mut self, vcpu: &VcpuFd) -> Result<&mut T> {
        self.check_writable::<T>()?;
        let image = *self.load::<T>(vcpu)?;
        let slot = T::slot(&mut self.cache);
        slot.dirty = true;
        Ok(slot.image.insert(image))
    }

    fn store<T: RegImage>(&mut self, image: &T) -> Result<()> {
        self.check_writable::<T>()?;
        let slot = T::slot(&mut self.cache);
        slot.image = Some(*image);
        slot.dirty = true;
        Ok(())
    }

    /// Refuses, at write time, a write that could only be applied with an ioctl the guard
    /// refuses (offered sets go through sync regs, which the constructor already checked).
    fn check_writable<T: RegImage>(&self) -> Result<()> {
        if self.offered.contains(T::KIND) {
            return Ok(());
        }
        self.guard()
            .check(T::SET)
            .map_err(|source| Error::Refused { op: T::SET, source })
    }

    /// The general-purpose registers, RIP and RFLAGS.
    ///
    /// # Errors
    ///
    /// [`Error::Refused`] or [`Error::Ioctl`] when the set is not in `kvm_run` and
    /// `KVM_GET_REGS` is refused or fails.
    pub fn regs(&mut self, vcpu: &VcpuFd) -> Result<&kvm_regs> {
        self.load::<kvm_regs>(vcpu).map(|r| &*r)
    }

    /// The general-purpose registers for modification; marks them dirty.
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::regs`], and [`Error::Refused`] when the set could only be written
    /// with an ioctl the VM type refuses.
    pub fn regs_mut(&mut self, vcpu: &VcpuFd) -> Result<&mut kvm_regs> {
        self.modify::<kvm_regs>(vcpu)
    }

    /// Replaces the general-purpose registers; they reach the vCPU at the next `stage`.
    ///
    /// # Errors
    ///
    /// [`Error::Refused`] when the set could only be written with an ioctl the VM type
    /// refuses.
    pub fn set_regs(&mut self, regs: &kvm_regs) -> Result<()> {
        self.store(regs)
    }

    /// The special registers.
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::regs`], for `KVM_GET_SREGS`.
    pub fn sregs(&mut self, vcpu: &VcpuFd) -> Result<&kvm_sregs> {
        self.load::<kvm_sregs>(vcpu).map(|r| &*r)
    }

    /// The special registers for modification; marks them dirty.
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::regs_mut`].
    pub fn sregs_mut(&mut self, vcpu: &VcpuFd) -> Result<&mut kvm_sregs> {
        self.modify::<kvm_sregs>(vcpu)
    }

    /// Replaces the special registers; they reach the vCPU at the next `stage`.
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::set_regs`].
    pub fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<()> {
        self.store(sregs)
    }

    /// The vCPU events.
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::regs`], for `KVM_GET_VCPU_EVENTS`.
    pub fn events(&mut self, vcpu: &VcpuFd) -> Result<&kvm_vcpu_events> {
        self.load::<kvm_vcpu_events>(vcpu).map(|e| &*e)
    }

    /// The vCPU events for modification; marks them dirty.
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::regs_mut`].
    pub fn events_mut(&mut self, vcpu: &VcpuFd) -> Result<&mut kvm_vcpu_events> {
        self.modify::<kvm_vcpu_events>(vcpu)
    }

    /// Replaces the vCPU events; they reach the vCPU at the next `stage`.
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::set_regs`].
    pub fn set_events(&mut self, events: &kvm_vcpu_events) -> Result<()> {
        self.store(events)
    }

    /// All registers and the events, for diagnostics; the events are left out if only
    /// they cannot be read.
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::regs`], for regs and sregs.
    pub fn dump(&mut self, vcpu: &VcpuFd) -> Result<RegisterDump> {
        let regs = *self.regs(vcpu)?;
        let sregs = *self.sregs(vcpu)?;
        let events = self.events(vcpu).ok().copied();
        Ok(RegisterDump::new(regs, sregs, events))
    }

    fn apply_with_ioctl<T: RegImage>(&mut self, vcpu: &VcpuFd) -> Result<()> {
        let slot = T::slot(&mut self.cache);
        if let (true, Some(image)) = (slot.dirty, slot.image) {
            self.guard()
                .check(T::SET)
                .map_err(|source| Error::Refused { op: T::SET, source })?;
            image
                .set(vcpu)
                .map_err(|source| Error::Ioctl { op: T::SET, source })?;
            T::slot(&mut self.cache).dirty = false;
        }
        Ok(())
    }

    fn apply_kind_with_ioctl(&mut self, kind: RegKind, vcpu: &VcpuFd) -> Result<()> {
        match kind {
            RegKind::Regs => self.apply_with_ioctl::<kvm_regs>(vcpu),
            RegKind::Sregs => self.apply_with_ioctl::<kvm_sregs>(vcpu),
            RegKind::Events => self.apply_with_ioctl::<kvm_vcpu_events>(vcpu),
        }
    }

    /// Applies every pending write now with `KVM_SET_*` ioctls (regs, sregs, events, in the
    /// kernel's order), for callers that need the vCPU state current outside `KVM_RUN` (a
    /// snapshot, `KVM_GET_NESTED_STATE`).
    ///
    /// # Errors
    ///
    /// [`Error::Refused`] or [`Error::Ioctl`] for the first set whose ioctl is refused or
    /// fails; it and the sets after it stay dirty.
    pub fn flush(&mut self, vcpu: &VcpuFd) -> Result<()> {
        for kind in RegKind::ALL {
            self.apply_kind_with_ioctl(kind, vcpu)?;
        }
        Ok(())
    }

    fn copy_in<T: RegImage>(&mut self, sync: &mut kvm_sync_regs) {
        if let Some(image) = T::slot(&mut self.cache).image {
            image.copy_in(sync);
        }
    }

    /// Refuses pending writes to a vCPU that still waits for INIT/SIPI, asking
    /// `KVM_GET_MP_STATE` until the vCPU is first seen runnable.
    fn check_runnable(&mut self, vcpu: &VcpuFd, pending: RegSet) -> Result<()> {
        if pending.is_empty() || self.readiness == Readiness::Runnable {
            return Ok(());
        }
        let mp_state = vcpu.get_mp_state().map_err(Error::GetMpState)?.mp_state;
        match mp_state {
            KVM_MP_STATE_UNINITIALIZED
            | KVM_MP_STATE_INIT_RECEIVED
            | KVM_MP_STATE_SIPI_RECEIVED => Err(Error::NotRunnable { mp_state, pending }),
            _ => {
                self.readiness = Readiness::Runnable;
                Ok(())
            }
        }
    }

    /// Before `KVM_RUN`: sends every pending write towards the vCPU, in the kernel's order
    /// (regs, sregs, events), and selects the sets copied out at the exit.
    ///
    /// Dirty sets `kvm_run` can carry are copied into it with their `kvm_dirty_regs` bits
    /// (the kernel's `sync_regs()` applies them on entry); a dirty set it cannot carry is
    /// applied now with `KVM_SET_*`, and so is every dirty set before it in the kernel's
    /// order, so that no set reaches the vCPU after a later one. `kvm_valid_regs` is set to
    /// the selection. Until the vCPU is first seen runnable, a stage with writes pending
    /// asks `KVM_GET_MP_STATE` first.
    ///
    /// # Errors
    ///
    /// [`Error::NotRunnable`] while the vCPU waits for INIT/SIPI (nothing is staged, the
    /// writes stay pending); [`Error::GetMpState`]; [`Error::Refused`] or [`Error::Ioctl`]
    /// for a set applied by ioctl (it and the later sets stay pending).
    pub fn stage(&mut self, vcpu: &mut VcpuFd) -> Result<()> {
        let dirty = self.cache.dirty();
        self.check_runnable(vcpu, dirty)?;
        let (by_ioctl, through_kvm_run) = split_by_order(dirty, self.offered);
        for kind in by_ioctl.iter() {
            self.apply_kind_with_ioctl(kind, vcpu)?;
        }
        if !through_kvm_run.is_empty() {
            let sync = vcpu.sync_regs_mut();
            for kind in through_kvm_run.iter() {
                match kind {
                    RegKind::Regs => self.copy_in::<kvm_regs>(sync),
                    RegKind::Sregs => self.copy_in::<kvm_sregs>(sync),
                    RegKind::Events => self.copy_in::<kvm_vcpu_events>(sync),
                }
            }
        }
        let run = vcpu.get_kvm_run();
        run.kvm_valid_regs = self.selection.bits();
        run.kvm_dirty_regs = through_kvm_run.bits();
        self.staged = through_kvm_run;
        Ok(())
    }

    /// After `KVM_RUN`, with its result (the exit already handled, or mapped to a value that
    /// does not borrow the vCPU): settles what the kernel applied and what it copied out.
    ///
    /// A staged set counts as applied only if the kernel cleared its `kvm_dirty_regs` bit,
    /// on every return path: `kvm_arch_vcpu_ioctl_run` returns `EINTR` (`immediate_exit`)
    /// or `EAGAIN` (woken by INIT/SIPI) without calling `sync_regs()` for a vCPU in
    /// `KVM_MP_STATE_UNINITIALIZED`, and `sync_regs()` clears each bit only once that set
    /// is applied. Sets not applied stay dirty and are staged again. The selected sets are
    /// then read from `kvm_run`: the function's common exit calls `store_regs()` on every
    /// path that entered it, including `EINTR`, `EAGAIN` and `EINVAL`; after any other errno
    /// they are read again with ioctls.
    ///
    /// # Errors
    ///
    /// [`Error::ImageRejected`] when `KVM_RUN` failed with `EINVAL` and the kernel refused a
    /// staged image: `sync_regs()` applied the staged sets before it and stopped there.
    /// When none of the staged sets was applied, the `EINVAL` may have come before
    /// `sync_regs()` ran; the first staged set is then tried with its `KVM_SET_*` ioctl,
    /// which validates it the same way: refused, it is named; accepted, it is applied and
    /// this returns `Ok` (the `EINVAL` was not about the image, and the caller has it).
    pub fn finish<T>(
        &mut self,
        vcpu: &mut VcpuFd,
        ran: &std::result::Result<T, kvm_ioctls::Error>,
    ) -> Result<()> {
        let run = vcpu.get_kvm_run();
        let pending = self
            .staged
            .intersection(RegSet::from_bits_truncate(run.kvm_dirty_regs));
        // The cache keeps what is still pending; the next stage writes the bits again.
        run.kvm_dirty_regs = 0;
        let errno = ran.as_ref().err().map(|e| e.errno());
        let copied_out = match errno {
            None | Some(libc::EINTR | libc::EAGAIN | libc::EINVAL) => self.selection,
            Some(_) => RegSet::EMPTY,
        };
        let staged = std::mem::replace(&mut self.staged, RegSet::EMPTY);
        self.cache.after_run(staged.difference(pending), copied_out);
        let (Some(libc::EINVAL), Some(first)) = (errno, pending.iter().next()) else {
            return Ok(());
        };
        let source = kvm_ioctls::Error::new(libc::EINVAL);
        if pending != staged {
            // sync_regs() ran: it applied the staged sets before `first` and refused it.
            return Err(Error::ImageRejected {
                rejected: first,
                pending,
                source,
            });
        }
        match self.apply_kind_with_ioctl(first, vcpu) {
            Ok(()) => Ok(()),
            Err(Error::Ioctl { source, .. }) if source.errno() == libc::EINVAL => {
                Err(Error::ImageRejected {
                    rejected: first,
                    pending,
                    source,
                })
            }
            Err(other) => Err(other),
        }
    }

    /// One `KVM_RUN` of `vcpu` with this cache: [`RegisterCache::stage`], `KVM_RUN`,
    /// `on_exit` with the exit (to answer it and turn it into a value that does not borrow
    /// the vCPU), then [`RegisterCache::finish`]. The returned value and the registers can
    /// then be used together.
    ///
    /// # Errors
    ///
    /// The errors of [`RegisterCache::stage`] (the vCPU did not run) and
    /// [`RegisterCache::finish`]; [`Error::Run`] with the errno of a failed `KVM_RUN`
    /// otherwise (`EINTR`, `EAGAIN`, ...), after `finish` has settled the cache.
    pub fn run<T>(
        &mut self,
        vcpu: &mut VcpuFd,
        on_exit: impl FnOnce(VcpuExit<'_>) -> T,
    ) -> Result<T> {
        self.stage(vcpu)?;
        let ran = vcpu.run().map(on_exit);
        self.finish(vcpu, &ran)?;
        ran.map_err(Error::Run)
    }
}

/// A [`RegisterCache`] with the vCPU lent to it, for exit handlers: the registers of one
/// exit, read from `kvm_run` or by ioctl, written back at the loop's next `stage`.
pub struct Registers<'a> {
    cache: &'a mut RegisterCache,
    vcpu: &'a VcpuFd,
}

impl std::fmt::Debug for Registers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Registers").field(&*self.cache).finish()
    }
}

impl RegisterCache {
    /// The registers of `vcpu` through this cache, for code that gets both together.
    pub fn with<'a>(&'a mut self, vcpu: &'a VcpuFd) -> Registers<'a> {
        Registers { cache: self, vcpu }
    }
}

impl Registers<'_> {
    /// The cache behind this view.
    pub fn cache(&mut self) -> &mut RegisterCache {
        self.cache
    }

    /// The sets with a write that has not reached the vCPU yet.
    pub fn dirty(&self) -> RegSet {
        self.cache.dirty()
    }

    /// [`RegisterCache::regs`].
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::regs`].
    pub fn regs(&mut self) -> Result<&kvm_regs> {
        self.cache.regs(self.vcpu)
    }

    /// [`RegisterCache::regs_mut`].
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::regs_mut`].
    pub fn regs_mut(&mut self) -> Result<&mut kvm_regs> {
        self.cache.regs_mut(self.vcpu)
    }

    /// [`RegisterCache::set_regs`].
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::set_regs`].
    pub fn set_regs(&mut self, regs: &kvm_regs) -> Result<()> {
        self.cache.set_regs(regs)
    }

    /// [`RegisterCache::sregs`].
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::sregs`].
    pub fn sregs(&mut self) -> Result<&kvm_sregs> {
        self.cache.sregs(self.vcpu)
    }

    /// [`RegisterCache::sregs_mut`].
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::sregs_mut`].
    pub fn sregs_mut(&mut self) -> Result<&mut kvm_sregs> {
        self.cache.sregs_mut(self.vcpu)
    }

    /// [`RegisterCache::events`].
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::events`].
    pub fn events(&mut self) -> Result<&kvm_vcpu_events> {
        self.cache.events(self.vcpu)
    }

    /// [`RegisterCache::events_mut`].
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::events_mut`].
    pub fn events_mut(&mut self) -> Result<&mut kvm_vcpu_events> {
        self.cache.events_mut(self.vcpu)
    }

    /// [`RegisterCache::dump`].
    ///
    /// # Errors
    ///
    /// As [`RegisterCache::dump`].
    pub fn dump(&mut self) -> Result<RegisterDump> {
        self.cache.dump(self.vcpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn split_keeps_the_kernel_order() {
        // Events cannot go through kvm_run: regs must reach the vCPU before them, by ioctl.
        let (ioctl, kvm_run) = split_by_order(RegSet::REGS | RegSet::EVENTS, RegSet::REGS);
        assert_eq!(
            (ioctl, kvm_run),
            (RegSet::REGS | RegSet::EVENTS, RegSet::EMPTY)
        );
        // Regs cannot: they go first by ioctl, events follow through kvm_run.
        let (ioctl, kvm_run) = split_by_order(RegSet::REGS | RegSet::EVENTS, RegSet::EVENTS);
        assert_eq!((ioctl, kvm_run), (RegSet::REGS, RegSet::EVENTS));
        // Sregs cannot: regs and sregs by ioctl, events through kvm_run.
        let (ioctl, kvm_run) = split_by_order(RegSet::ALL, RegSet::REGS | RegSet::EVENTS);
        assert_eq!(
            (ioctl, kvm_run),
            (RegSet::REGS | RegSet::SREGS, RegSet::EVENTS)
        );
        assert_eq!(
            split_by_order(RegSet::ALL, RegSet::ALL),
            (RegSet::EMPTY, RegSet::ALL)
        );
    }

    proptest! {
        #[test]
        fn split_never_applies_a_set_after_a_later_one(dirty in 0u64..8, offered in 0u64..8) {
            let (dirty, offered) =
                (RegSet::from_bits_truncate(dirty), RegSet::from_bits_truncate(offered));
            let (ioctl, kvm_run) = split_by_order(dirty, offered);
            // A partition of the dirty sets, and kvm_run only carries offered ones.
            prop_assert_eq!(ioctl.union(kvm_run), dirty);
            prop_assert!(ioctl.intersection(kvm_run).is_empty());
            prop_assert!(offered.contains_all(kvm_run));
            // Ioctls happen before KVM_RUN: every ioctl set precedes every kvm_run set.
            for a in ioctl.iter() {
                for b in kvm_run.iter() {
                    prop_assert!(RegKind::ALL.iter().position(|k| *k == a)
                        < RegKind::ALL.iter().position(|k| *k == b));
                }
            }
        }
    }

    #[test]
    fn writes_without_a_vcpu_are_tracked() {
        let mut cache =
            RegisterCache::with_offered(GuestStateGuard::new(VmType::Default), RegSet::ALL)
                .unwrap();
        cache
            .set_regs(&kvm_regs {
                rax: 1,
                ..Default::default()
            })
            .unwrap();
        cache.set_events(&kvm_vcpu_events::default()).unwrap();
        assert_eq!(cache.dirty(), RegSet::REGS | RegSet::EVENTS);
        cache.discard(RegSet::REGS);
        assert_eq!(cache.dirty(), RegSet::EVENTS);
        // A write to a set that would need a refused ioctl is refused at write time.
        let mut protected =
            RegisterCache::with_offered(GuestStateGuard::new(VmType::Snp), RegSet::EMPTY).unwrap();
        assert!(matches!(
            protected.set_sregs(&kvm_sregs::default()),
            Err(Error::Refused {
                op: VcpuOp::SetSregs,
                ..
            })
        ));
        assert!(protected.dirty().is_empty());
        assert!(format!("{cache:?}").contains("dirty: RegSet(events)"));
    }
}
