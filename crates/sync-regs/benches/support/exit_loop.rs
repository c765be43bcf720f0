//! The guest exit loop that `benches/exit_cost.rs` and `examples/exit_cost_report.rs`
//! measure: a long-mode guest doing `out` in a loop, and per-exit handlers that read RIP and
//! RAX and write RAX, as an instruction emulator would, in each access style.

use std::error::Error;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_regs;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use kvm_test_support::guest::TinyGuest;
use sync_regs::{RegSet, RegisterCache};
use vm_memory::GuestMemoryMmap;
use vm_types::VmType;

/// The guest: `loop: out 0x80, al ; jmp loop`.
pub const GUEST: [u8; 4] = [
    0xe6, 0x80, // out 0x80, al
    0xeb, 0xfc, // jmp -4 (back to the out)
];

/// The port the guest writes to.
pub const PORT: u16 = 0x80;

/// One way of handling each exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// (a) KVM_RUN alone, no register access: the floor.
    RunOnly,
    /// (b) KVM_GET_REGS + KVM_SET_REGS per exit.
    RegsIoctls,
    /// (b') KVM_GET/SET_REGS + KVM_GET/SET_SREGS per exit.
    RegsSregsIoctls,
    /// (b'') KVM_GET/SET_REGS + KVM_GET_SREGS per exit (sregs read, not written).
    RegsIoctlsSregsRead,
    /// (c) sync regs through a `RegisterCache`, regs and sregs copied out on every exit,
    /// RIP/RAX/CS read from the copy, RAX written back through kvm_dirty_regs.
    SyncRegsAndSregs,
    /// (c_regs) the same with only regs copied out, and CS not read.
    SyncRegsOnly,
}

impl Variant {
    /// Every variant, in report order.
    pub const ALL: [Variant; 6] = [
        Variant::RunOnly,
        Variant::RegsIoctls,
        Variant::RegsSregsIoctls,
        Variant::RegsIoctlsSregsRead,
        Variant::SyncRegsAndSregs,
        Variant::SyncRegsOnly,
    ];

    /// Short label used in reports and bench ids.
    pub fn label(self) -> &'static str {
        match self {
            Variant::RunOnly => "a_run_only",
            Variant::RegsIoctls => "b_get_set_regs",
            Variant::RegsSregsIoctls => "b'_get_set_regs_sregs",
            Variant::RegsIoctlsSregsRead => "b''_get_set_regs_get_sregs",
            Variant::SyncRegsAndSregs => "c_sync_regs+sregs",
            Variant::SyncRegsOnly => "c_regs_sync_regs_only",
        }
    }
}

type Res<T> = Result<T, Box<dyn Error>>;

enum Access {
    Raw(VcpuFd),
    Sync(VcpuFd, Box<RegisterCache>),
}

/// A guest in its exit loop, handled in one [`Variant`].
pub struct ExitLoop {
    variant: Variant,
    access: Access,
    /// The value the guest is expected to write next (for the variants that write RAX).
    expect: u8,
    // Dropped after the vCPU: the VM, then the memory it maps.
    _vm: VmFd,
    _mem: GuestMemoryMmap,
}

fn check_out(exit: VcpuExit<'_>, expect: Option<u8>) -> Res<()> {
    match exit {
        VcpuExit::IoOut(PORT, data) => match expect {
            Some(value) if data.first() != Some(&value) => {
                Err(format!("guest wrote {data:02x?}, expected {value:#04x}").into())
            }
            _ => Ok(()),
        },
        other => Err(format!("unexpected exit {other:?}").into()),
    }
}

impl ExitLoop {
    /// A fresh guest handled in `variant`.
    pub fn new(kvm: &Kvm, variant: Variant) -> Res<Self> {
        let TinyGuest { vm, vcpu, mem, .. } = TinyGuest::long_mode(kvm, &GUEST)?;
        let access = match variant {
            Variant::RunOnly
            | Variant::RegsIoctls
            | Variant::RegsSregsIoctls
            | Variant::RegsIoctlsSregsRead => Access::Raw(vcpu),
            Variant::SyncRegsAndSregs | Variant::SyncRegsOnly => {
                let mut regs = RegisterCache::new(&vm, VmType::Default);
                let selection = if variant == Variant::SyncRegsAndSregs {
                    RegSet::REGS | RegSet::SREGS
                } else {
                    RegSet::REGS
                };
                regs.set_selection(selection)?;
                Access::Sync(vcpu, Box::new(regs))
            }
        };
        let mut exit_loop = ExitLoop {
            variant,
            access,
            expect: 0,
            _vm: vm,
            _mem: mem,
        };
        // The first exit: the guest is now in its loop.
        exit_loop.step()?;
        Ok(exit_loop)
    }

    fn bump(regs: &mut kvm_regs, expect: &mut u8) {
        std::hint::black_box(regs.rip);
        regs.rax = regs.rax.wrapping_add(1);
        *expect = regs.rax as u8;
    }

    /// Handles one exit and runs to the next one.
    pub fn step(&mut self) -> Res<()> {
        let expect = self.expect;
        match (&mut self.access, self.variant) {
            (Access::Raw(vcpu), Variant::RunOnly) => check_out(vcpu.run()?, None),
            (Access::Raw(vcpu), Variant::RegsIoctls) => {
                let mut regs = vcpu.get_regs()?;
                Self::bump(&mut regs, &mut self.expect);
                vcpu.set_regs(&regs)?;
                check_out(vcpu.run()?, Some(self.expect))
            }
            (Access::Raw(vcpu), Variant::RegsSregsIoctls) => {
                let mut regs = vcpu.get_regs()?;
                let sregs = vcpu.get_sregs()?;
                std::hint::black_box(sregs.cs.l);
                Self::bump(&mut regs, &mut self.expect);
                vcpu.set_regs(&regs)?;
                vcpu.set_sregs(&sregs)?;
                check_out(vcpu.run()?, Some(self.expect))
            }
            (Access::Raw(vcpu), Variant::RegsIoctlsSregsRead) => {
                let mut regs = vcpu.get_regs()?;
                let sregs = vcpu.get_sregs()?;
                std::hint::black_box(sregs.cs.l);
                Self::bump(&mut regs, &mut self.expect);
                vcpu.set_regs(&regs)?;
                check_out(vcpu.run()?, Some(self.expect))
            }
            (Access::Sync(vcpu, regs), variant) => {
                if variant == Variant::SyncRegsAndSregs {
                    std::hint::black_box(regs.sregs(vcpu)?.cs.l);
                }
                Self::bump(regs.regs_mut(vcpu)?, &mut self.expect);
                let expect = self.expect;
                regs.run(vcpu, |exit| check_out(exit, Some(expect)))?
            }
            (Access::Raw(_), _) => Err(format!("variant {:?} on a raw vCPU", self.variant).into()),
        }
        .map_err(|e| {
            format!(
                "{} after expecting {expect:#04x}: {e}",
                self.variant.label()
            )
            .into()
        })
    }

    /// Handles `exits` exits and returns the time they took.
    pub fn measure(&mut self, exits: u64) -> Res<Duration> {
        let start = Instant::now();
        for _ in 0..exits {
            self.step()?;
        }
        Ok(start.elapsed())
    }
}
