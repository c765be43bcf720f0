//! [`VcpuRegisters`]: one vCPU's regs, sregs and events, through `kvm_run` where KVM offers
//! it and through `KVM_GET_*`/`KVM_SET_*` ioctls where it does not.

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_sync_regs, kvm_vcpu_events};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_types::{GuestStateError, GuestStateGuard, VcpuOp, VmType};

use crate::dump::RegisterDump;
use crate::reg_set::{RegKind, RegSet, UnknownBits};
use crate::sys;

/// Errors from [`VcpuRegisters`].
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
    /// `KVM_RUN` refused a register image written through `kvm_run`; the write is still
    /// pending and the vCPU did not run.
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
    /// `KVM_RUN` failed for another reason (`EINTR` after `immediate_exit` or a signal).
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
}

impl Error {
    /// The errno of a failed ioctl, if this error comes from one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Ioctl { source, .. } | Error::ImageRejected { source, .. } => {
                Some(source.errno())
            }
            Error::Run(source) => Some(source.errno()),
            _ => None,
        }
    }
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// One register set's cached image. Invariant: `dirty` implies `image.is_some()`.
#[derive(Clone, Copy)]
struct Slot<T> {
    /// The set as this type believes it is (or will be once pending writes are applied);
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

    /// After `KVM_RUN`: `applied` sets reached the vCPU, the others of `pushed` are pending,
    /// and `copied_out` holds the kernel's fresh copies.
    fn after_run(&mut self, applied: RegSet, copied_out: RegSet) {
        for kind in applied.iter() {
            match kind {
                RegKind::Regs => self.regs.dirty = false,
                RegKind::Sregs => self.sregs.dirty = false,
                RegKind::Events => self.events.dirty = false,
            }
        }
        self.regs.invalidate_unless_dirty();
        self.sregs.invalidate_unless_dirty();
        self.events.invalidate_unless_dirty();
        self.copied_out = copied_out;
    }
}

/// A register set this type caches: how to move it through `kvm_run` and through ioctls.
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

/// [`VcpuRegisters::into_vcpu`] could not apply a pending write; the registers, with the
/// vCPU, come back so that the caller can correct the image or retry.
#[derive(Debug, thiserror::Error)]
#[error("handing the vCPU over failed")]
pub struct HandOffError {
    /// The registers, still owning the vCPU and the pending write.
    pub registers: VcpuRegisters,
    /// Why the write could not be applied.
    #[source]
    pub error: Error,
}

/// Register access for one vCPU, through `kvm_run` (`KVM_CAP_SYNC_REGS`, x86 since Linux
/// 4.16) for every set the capability offers and through ioctls for the others.
///
/// * **Reads** are cached: each set is copied out of `kvm_run` (or read with its `KVM_GET_*`
///   ioctl) at most once per exit, on first use, and then served from the copy.
/// * **Writes** only change the cached image and mark the set dirty; the type, not the
///   caller, tracks what is dirty, so no write can be forgotten. [`VcpuRegisters::run`]
///   copies dirty offered sets into `kvm_run` and sets their `kvm_dirty_regs` bits (the
///   kernel applies them on entry), and applies dirty non-offered sets with `KVM_SET_*`
///   first.
/// * After `KVM_RUN` returns, the kernel has stored the sets selected in `kvm_valid_regs`
///   ([`VcpuRegisters::set_selection`]) into `kvm_run`; everything else is read again with
///   an ioctl when it is next needed.
/// * A write is never lost: a set stays dirty until the kernel reports it applied (it
///   clears the set's `kvm_dirty_regs` bit only then), so an image `KVM_RUN` rejects with
///   `EINVAL` stays pending, is reported as [`Error::ImageRejected`], and is sent again once
///   corrected.
///
/// The type owns the [`VcpuFd`] so that nothing else can run the vCPU or touch `kvm_run`
/// behind its back. Register ioctls issued through [`VcpuRegisters::vcpu`] bypass the
/// cache; use them only for sets this type has no write pending for and that it will read
/// again ([`VcpuRegisters::invalidate`]).
pub struct VcpuRegisters {
    vcpu: VcpuFd,
    guard: GuestStateGuard,
    offered: RegSet,
    selection: RegSet,
    cache: Cache,
}

impl std::fmt::Debug for VcpuRegisters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRegisters")
            .field("vm_type", &self.guard.vm_type())
            .field("offered", &self.offered)
            .field("selection", &self.selection)
            .field("dirty", &self.cache.dirty())
            .field("copied_out", &self.cache.copied_out)
            .finish_non_exhaustive()
    }
}

impl VcpuRegisters {
    /// Register access for `vcpu` of `vm`, a VM of type `vm_type`.
    ///
    /// The offered sets are what `KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS)` reports on the VM
    /// fd (a kernel that knows protected VM types answers per VM), restricted to what the
    /// VM type allows: none on a type with protected guest state, where KVM refuses sync
    /// regs, and where the guard also refuses register ioctls (it assumes the state is
    /// already protected, which is always safe). The copy-out selection starts as the
    /// general-purpose registers if they are offered.
    pub fn new(vm: &VmFd, vcpu: VcpuFd, vm_type: VmType) -> Self {
        let guard = GuestStateGuard::new(vm_type);
        let offered = if guard.check(VcpuOp::SyncRegs).is_ok() {
            let raw = vm.check_extension_raw(libc::c_ulong::from(sys::KVM_CAP_SYNC_REGS));
            // A negative value is an error, not a mask: treat it as "nothing offered".
            RegSet::from_bits_truncate(u64::try_from(raw).unwrap_or(0))
        } else {
            RegSet::EMPTY
        };
        Self::build(vcpu, guard, offered)
    }

    /// Register access with an explicit set of offered sets, for hosts where the caller has
    /// already probed the capability or wants some sets to go through ioctls
    /// ([`RegSet::EMPTY`]: ioctls only).
    ///
    /// `offered` must be within what `KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS)` reports, or
    /// `KVM_RUN` fails with `EINVAL`. Fails if `offered` is not empty and the guard's VM
    /// type does not allow sync regs.
    pub fn with_offered(vcpu: VcpuFd, guard: GuestStateGuard, offered: RegSet) -> Result<Self> {
        if !offered.is_empty() {
            guard
                .check(VcpuOp::SyncRegs)
                .map_err(|source| Error::SyncRegsRefused {
                    requested: offered,
                    source,
                })?;
        }
        Ok(Self::build(vcpu, guard, offered))
    }

    fn build(vcpu: VcpuFd, guard: GuestStateGuard, offered: RegSet) -> Self {
        VcpuRegisters {
            vcpu,
            guard,
            offered,
            selection: offered.intersection(RegSet::REGS),
            cache: Cache::new(),
        }
    }

    /// The sets this type moves through `kvm_run`.
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
    /// costs a `KVM_GET_*` ioctl: select what the exit handlers read on most exits. Refuses
    /// sets that are not offered, before `KVM_RUN` could fail on them.
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

    /// [`VcpuRegisters::set_selection`] from a raw `KVM_SYNC_X86_*` mask, refusing bits that
    /// name no set.
    pub fn set_selection_bits(&mut self, bits: u64) -> Result<()> {
        let selection = RegSet::from_bits(bits).map_err(Error::InvalidMask)?;
        self.set_selection(selection)
    }

    /// The sets with a write that has not reached the vCPU yet.
    pub fn dirty(&self) -> RegSet {
        self.cache.dirty()
    }

    /// The guest-state rule this type applies before each register ioctl.
    pub fn guard(&self) -> &GuestStateGuard {
        &self.guard
    }

    /// The vCPU, for ioctls this type does not wrap (CPUID, MSRs, LAPIC, ...).
    pub fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    /// Forgets the cached images of `sets` that have no pending write, so that they are read
    /// again; for use after changing them with ioctls through [`VcpuRegisters::vcpu`].
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

    /// Sets `kvm_run.immediate_exit`: while it is non-zero, `KVM_RUN` applies dirty sets,
    /// stores the selected ones and returns `EINTR` without entering the guest.
    pub fn set_immediate_exit(&mut self, exit: bool) {
        self.vcpu.set_kvm_immediate_exit(u8::from(exit));
    }

    fn load<T: RegImage>(&mut self) -> Result<&mut T> {
        let from_kvm_run = self.cache.copied_out.contains(T::KIND);
        let vcpu = &mut self.vcpu;
        let guard = &self.guard;
        T::slot(&mut self.cache).get_or_try_load(|| {
            if from_kvm_run {
                // One copy of this set out of the shared page; later reads use the copy.
                return Ok(T::copy_out(vcpu.sync_regs_mut()));
            }
            guard
                .check(T::GET)
                .map_err(|source| Error::Refused { op: T::GET, source })?;
            T::get(vcpu).map_err(|source| Error::Ioctl { op: T::GET, source })
        })
    }

    fn modify<T: RegImage>(&mut self) -> Result<&mut T> {
        self.check_writable::<T>()?;
        let image = *self.load::<T>()?;
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
        self.guard
            .check(T::SET)
            .map_err(|source| Error::Refused { op: T::SET, source })
    }

    /// The general-purpose registers, RIP and RFLAGS.
    pub fn regs(&mut self) -> Result<&kvm_regs> {
        self.load::<kvm_regs>().map(|r| &*r)
    }

    /// The general-purpose registers for modification; marks them dirty.
    pub fn regs_mut(&mut self) -> Result<&mut kvm_regs> {
        self.modify::<kvm_regs>()
    }

    /// Replaces the general-purpose registers; they reach the vCPU on the next run.
    pub fn set_regs(&mut self, regs: &kvm_regs) -> Result<()> {
        self.store(regs)
    }

    /// The special registers.
    pub fn sregs(&mut self) -> Result<&kvm_sregs> {
        self.load::<kvm_sregs>().map(|r| &*r)
    }

    /// The special registers for modification; marks them dirty.
    pub fn sregs_mut(&mut self) -> Result<&mut kvm_sregs> {
        self.modify::<kvm_sregs>()
    }

    /// Replaces the special registers; they reach the vCPU on the next run.
    pub fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<()> {
        self.store(sregs)
    }

    /// The vCPU events.
    pub fn events(&mut self) -> Result<&kvm_vcpu_events> {
        self.load::<kvm_vcpu_events>().map(|e| &*e)
    }

    /// The vCPU events for modification; marks them dirty.
    pub fn events_mut(&mut self) -> Result<&mut kvm_vcpu_events> {
        self.modify::<kvm_vcpu_events>()
    }

    /// Replaces the vCPU events; they reach the vCPU on the next run.
    pub fn set_events(&mut self, events: &kvm_vcpu_events) -> Result<()> {
        self.store(events)
    }

    /// All registers and the events, for diagnostics.
    pub fn dump(&mut self) -> Result<RegisterDump> {
        let regs = *self.regs()?;
        let sregs = *self.sregs()?;
        let events = *self.events()?;
        Ok(RegisterDump::new(regs, sregs, Some(events)))
    }

    fn flush_one_with_ioctl<T: RegImage>(&mut self) -> Result<()> {
        let slot = T::slot(&mut self.cache);
        if let (true, Some(image)) = (slot.dirty, slot.image) {
            self.guard
                .check(T::SET)
                .map_err(|source| Error::Refused { op: T::SET, source })?;
            image
                .set(&self.vcpu)
                .map_err(|source| Error::Ioctl { op: T::SET, source })?;
            T::slot(&mut self.cache).dirty = false;
        }
        Ok(())
    }

    /// Applies every pending write now with `KVM_SET_*` ioctls (regs, sregs, events, in the
    /// kernel's order), for callers that need the vCPU state current outside `KVM_RUN` (a
    /// snapshot, `KVM_GET_NESTED_STATE`, handing the vCPU to other code). A set whose ioctl
    /// fails stays dirty.
    pub fn flush(&mut self) -> Result<()> {
        self.flush_one_with_ioctl::<kvm_regs>()?;
        self.flush_one_with_ioctl::<kvm_sregs>()?;
        self.flush_one_with_ioctl::<kvm_vcpu_events>()
    }

    fn push_one<T: RegImage>(&mut self) -> RegSet {
        let slot = T::slot(&mut self.cache);
        match (slot.dirty, slot.image) {
            (true, Some(image)) if self.offered.contains(T::KIND) => {
                image.copy_in(self.vcpu.sync_regs_mut());
                RegSet::of(T::KIND)
            }
            _ => RegSet::EMPTY,
        }
    }

    /// Before `KVM_RUN`: dirty non-offered sets through ioctls, dirty offered sets into
    /// `kvm_run`, and the masks. Returns the sets pushed through `kvm_run`.
    fn prepare_run(&mut self) -> Result<RegSet> {
        if !self.offered.contains(RegKind::Regs) {
            self.flush_one_with_ioctl::<kvm_regs>()?;
        }
        if !self.offered.contains(RegKind::Sregs) {
            self.flush_one_with_ioctl::<kvm_sregs>()?;
        }
        if !self.offered.contains(RegKind::Events) {
            self.flush_one_with_ioctl::<kvm_vcpu_events>()?;
        }
        let pushed = self
            .push_one::<kvm_regs>()
            .union(self.push_one::<kvm_sregs>())
            .union(self.push_one::<kvm_vcpu_events>());
        let run = self.vcpu.get_kvm_run();
        run.kvm_valid_regs = self.selection.bits();
        run.kvm_dirty_regs = pushed.bits();
        Ok(pushed)
    }

    /// Hands the vCPU to its next owner (a run loop that issues `KVM_RUN` itself) without
    /// losing a pending write.
    ///
    /// Dirty sets that sync regs carry are copied into `kvm_run` and their `kvm_dirty_regs`
    /// bits set, so the kernel applies them at the new owner's first `KVM_RUN` with no
    /// ioctl; the other dirty sets are applied now with `KVM_SET_*`. `kvm_valid_regs` is
    /// cleared so that the new owner pays for no copy-out it did not ask for. The new owner
    /// must leave `kvm_dirty_regs` alone until that first `KVM_RUN`.
    ///
    /// On failure the registers come back with the error, still owning the vCPU.
    pub fn into_vcpu(mut self) -> std::result::Result<VcpuFd, Box<HandOffError>> {
        for kind in [RegKind::Regs, RegKind::Sregs, RegKind::Events] {
            if self.offered.contains(kind) {
                continue;
            }
            let flushed = match kind {
                RegKind::Regs => self.flush_one_with_ioctl::<kvm_regs>(),
                RegKind::Sregs => self.flush_one_with_ioctl::<kvm_sregs>(),
                RegKind::Events => self.flush_one_with_ioctl::<kvm_vcpu_events>(),
            };
            if let Err(error) = flushed {
                return Err(Box::new(HandOffError {
                    registers: self,
                    error,
                }));
            }
        }
        let staged = self
            .push_one::<kvm_regs>()
            .union(self.push_one::<kvm_sregs>())
            .union(self.push_one::<kvm_vcpu_events>());
        let run = self.vcpu.get_kvm_run();
        run.kvm_valid_regs = 0;
        run.kvm_dirty_regs = staged.bits();
        Ok(self.vcpu)
    }

    /// Flushes pending writes, runs the vCPU to its next exit and returns the exit.
    ///
    /// After it returns, reads see the state at the exit: selected sets are copied out of
    /// `kvm_run` on first use, others read with ioctls. On `Err`, sets the kernel applied
    /// are no longer dirty and the others still are: [`Error::ImageRejected`] names an image
    /// the kernel refused (`EINVAL`), and [`Error::Run`] carries other errnos, for example
    /// `EINTR` after [`VcpuRegisters::set_immediate_exit`], with which the kernel still
    /// applies dirty sets and stores the selected ones (arch/x86/kvm/x86.c,
    /// `kvm_arch_vcpu_ioctl_run`: `sync_regs()` runs before the `immediate_exit` check and
    /// `store_regs()` at its common exit).
    pub fn run(&mut self) -> Result<VcpuExit<'_>> {
        let pushed = self.prepare_run()?;
        let selection = self.selection;
        let vcpu: *mut VcpuFd = &mut self.vcpu;
        // SAFETY: one KVM_RUN ioctl, through a reborrow of `self.vcpu` made with a raw
        // pointer only so that the borrow checker accepts using `self.vcpu` again on the
        // error path (NLL rejects a conditionally returned borrow). The pointer comes from a
        // live `&mut self.vcpu`; on `Ok` the returned exit keeps `self` mutably borrowed for
        // its lifetime, and on `Err` the errno holds no borrow, so the two never alias.
        match unsafe { &mut *vcpu }.run() {
            Ok(exit) => {
                // KVM_RUN succeeded, so `sync_regs()` applied every pushed set.
                self.cache.after_run(pushed, selection);
                Ok(exit)
            }
            Err(source) => Err(self.after_failed_run(pushed, selection, source)),
        }
    }

    fn after_failed_run(
        &mut self,
        pushed: RegSet,
        selection: RegSet,
        source: kvm_ioctls::Error,
    ) -> Error {
        let run = self.vcpu.get_kvm_run();
        let pending = pushed.intersection(RegSet::from_bits_truncate(run.kvm_dirty_regs));
        run.kvm_dirty_regs = 0;
        // EINTR and EINVAL come from kvm_arch_vcpu_ioctl_run, whose common exit stores the
        // selected sets; for any other errno, read again with ioctls rather than trust them.
        let copied_out = match source.errno() {
            libc::EINTR | libc::EINVAL => selection,
            _ => RegSet::EMPTY,
        };
        self.cache.after_run(pushed.difference(pending), copied_out);
        match pending.iter().next() {
            Some(rejected) if source.errno() == libc::EINVAL => Error::ImageRejected {
                rejected,
                pending,
                source,
            },
            _ => Error::Run(source),
        }
    }
}
