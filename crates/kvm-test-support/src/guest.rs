//! A kit for tiny test guests: memory, one vCPU in real or long mode, code, and exits.
//!
//! Layout of guest physical memory (all below 64 KiB, so any memory size works):
//!
//! | GPA       | what                                                     |
//! |-----------|----------------------------------------------------------|
//! | `0x0500`  | GDT: null, 64-bit code (`0x08`), data (`0x10`)            |
//! | `0x1000`  | IDT, 256 long-mode gates (empty until [`TinyGuest::set_idt_gate`]) |
//! | `0x3000`  | PML4 → `0x4000` PDPT → `0x5000` PD: first 1 GiB, 2 MiB pages |
//! | `0x8000`  | initial stack pointer (grows down)                       |
//! | `0x10000` | code ([`CODE_ADDR`]); real mode runs it as CS `0x1000`, IP 0 |
//!
//! Addresses between the end of guest memory and 1 GiB are mapped by the page tables but
//! backed by no memory slot, so guest accesses there become MMIO exits.

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Where test code is loaded and where the vCPU starts.
pub const CODE_ADDR: u64 = 0x1_0000;
/// The initial stack pointer.
pub const STACK_TOP: u64 = 0x8000;
/// Guest physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest physical address of the IDT.
pub const IDT_ADDR: u64 = 0x1000;
/// Guest physical address of the PML4.
pub const PML4_ADDR: u64 = 0x3000;
const PDPT_ADDR: u64 = 0x4000;
const PD_ADDR: u64 = 0x5000;
/// The 64-bit code segment selector.
pub const CODE64_SELECTOR: u16 = 0x08;
/// The data segment selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// Default guest memory size: 2 MiB.
pub const DEFAULT_MEM_SIZE: usize = 2 << 20;

// Control register and EFER bits (Intel SDM vol. 3, 2.5 and 2.2.1).
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PDE_PS: u64 = 1 << 7;

/// The mode the vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 16-bit real mode, CS `0x1000` (base [`CODE_ADDR`]), IP 0.
    Real,
    /// 64-bit long mode with paging, identity-mapped first GiB.
    Long,
}

/// Errors from setting up or running a tiny guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the VM failed.
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// Creating the vCPU failed.
    #[error("KVM_CREATE_VCPU failed")]
    CreateVcpu(#[source] kvm_ioctls::Error),
    /// Allocating guest memory failed.
    #[error("allocating {size} bytes of guest memory failed")]
    AllocateMemory {
        /// Requested size.
        size: usize,
        /// The cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// Registering guest memory with KVM failed.
    #[error("KVM_SET_USER_MEMORY_REGION failed")]
    SetMemoryRegion(#[source] kvm_ioctls::Error),
    /// Writing to guest memory failed (an address outside guest memory).
    #[error("writing guest memory at {addr:#x} failed")]
    WriteMemory {
        /// Guest physical address.
        addr: u64,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Reading guest memory failed.
    #[error("reading guest memory at {addr:#x} failed")]
    ReadMemory {
        /// Guest physical address.
        addr: u64,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A register ioctl failed.
    #[error("{op} failed")]
    Registers {
        /// The ioctl.
        op: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_RUN failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    /// The guest exited in a way the test did not expect.
    #[error("expected exit {expected:?}, got {actual:?}")]
    UnexpectedExit {
        /// What the test expected.
        expected: GuestExit,
        /// What the guest did.
        actual: GuestExit,
    },
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// An owned copy of a vCPU exit, comparable in assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// `out` to `port` with `data`.
    IoOut {
        /// The port.
        port: u16,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// `in` from `port` of `size` bytes; the kit answers with zeroes.
    IoIn {
        /// The port.
        port: u16,
        /// The access size.
        size: usize,
    },
    /// A read of unbacked guest memory; the kit answers with zeroes.
    MmioRead {
        /// The guest physical address.
        addr: u64,
        /// The access size.
        size: usize,
    },
    /// A write to unbacked guest memory.
    MmioWrite {
        /// The guest physical address.
        addr: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// `hlt`.
    Hlt,
    /// A triple fault.
    Shutdown,
    /// VM entry failed.
    FailEntry {
        /// The hardware reason.
        reason: u64,
    },
    /// KVM could not handle something (usually emulation).
    InternalError {
        /// The suberror.
        suberror: u32,
    },
    /// Any other exit, by name.
    Other(String),
}

impl GuestExit {
    fn capture(exit: VcpuExit<'_>) -> Self {
        match exit {
            VcpuExit::IoOut(port, data) => GuestExit::IoOut {
                port,
                data: data.to_vec(),
            },
            VcpuExit::IoIn(port, data) => {
                data.fill(0);
                GuestExit::IoIn {
                    port,
                    size: data.len(),
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                data.fill(0);
                GuestExit::MmioRead {
                    addr,
                    size: data.len(),
                }
            }
            VcpuExit::MmioWrite(addr, data) => GuestExit::MmioWrite {
                addr,
                data: data.to_vec(),
            },
            VcpuExit::Hlt => GuestExit::Hlt,
            VcpuExit::Shutdown => GuestExit::Shutdown,
            VcpuExit::FailEntry(reason, _cpu) => GuestExit::FailEntry { reason },
            other => GuestExit::Other(format!("{other:?}")),
        }
    }
}

/// A VM with guest memory at GPA 0 and one vCPU, ready to run loaded code.
pub struct TinyGuest {
    /// The VM.
    pub vm: VmFd,
    /// The vCPU (public so that tests can drive `KVM_RUN` themselves).
    pub vcpu: VcpuFd,
    /// Guest memory, starting at GPA 0.
    pub mem: GuestMemoryMmap,
    mode: Mode,
}

impl TinyGuest {
    /// A real-mode guest running `code` from [`CODE_ADDR`], with the default memory size.
    pub fn real_mode(kvm: &Kvm, code: &[u8]) -> Result<Self> {
        Self::with_vm(kvm.create_vm().map_err(Error::CreateVm)?, Mode::Real, code)
    }

    /// A long-mode guest running `code` from [`CODE_ADDR`], with the default memory size.
    pub fn long_mode(kvm: &Kvm, code: &[u8]) -> Result<Self> {
        Self::with_vm(kvm.create_vm().map_err(Error::CreateVm)?, Mode::Long, code)
    }

    /// A guest in an existing VM (for example one created with a VM type), default memory.
    pub fn with_vm(vm: VmFd, mode: Mode, code: &[u8]) -> Result<Self> {
        Self::build(vm, mode, DEFAULT_MEM_SIZE, code)
    }

    /// A guest in `vm` with `mem_size` bytes of memory at GPA 0 (at least 128 KiB).
    pub fn build(vm: VmFd, mode: Mode, mem_size: usize, code: &[u8]) -> Result<Self> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size)]).map_err(
            |source| Error::AllocateMemory {
                size: mem_size,
                source,
            },
        )?;
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the returned guest keeps
            // for as long as the VM (dropped first, field order) can use it.
            unsafe { vm.set_user_memory_region(region_desc) }.map_err(Error::SetMemoryRegion)?;
        }
        let vcpu = vm.create_vcpu(0).map_err(Error::CreateVcpu)?;
        let guest = TinyGuest {
            vm,
            vcpu,
            mem,
            mode,
        };
        guest.write(CODE_ADDR, code)?;
        match mode {
            Mode::Real => guest.enter_real_mode()?,
            Mode::Long => guest.enter_long_mode()?,
        }
        Ok(guest)
    }

    /// The mode the guest was started in.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Writes `bytes` to guest memory at `addr`.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|source| Error::WriteMemory { addr, source })
    }

    /// Reads `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .map_err(|source| Error::ReadMemory { addr, source })?;
        Ok(buf)
    }

    /// Points long-mode IDT vector `vector` at `handler` (a 64-bit interrupt gate, DPL 0).
    pub fn set_idt_gate(&self, vector: u8, handler: u64) -> Result<()> {
        self.write(
            IDT_ADDR + u64::from(vector) * 16,
            &idt_gate(handler, CODE64_SELECTOR),
        )
    }

    fn enter_real_mode(&self) -> Result<()> {
        let mut sregs = self.vcpu.get_sregs().map_err(regs_err("KVM_GET_SREGS"))?;
        // IP is 16 bits wide: reach CODE_ADDR through CS, with IP 0.
        sregs.cs.base = CODE_ADDR;
        sregs.cs.selector = (CODE_ADDR >> 4) as u16;
        self.vcpu
            .set_sregs(&sregs)
            .map_err(regs_err("KVM_SET_SREGS"))?;
        self.set_entry_regs(0)
    }

    fn enter_long_mode(&self) -> Result<()> {
        self.write(GDT_ADDR, &gdt_bytes())?;
        self.write(
            PML4_ADDR,
            &(PDPT_ADDR | PTE_PRESENT | PTE_WRITE).to_le_bytes(),
        )?;
        self.write(
            PDPT_ADDR,
            &(PD_ADDR | PTE_PRESENT | PTE_WRITE).to_le_bytes(),
        )?;
        let pd: Vec<u8> = (0..512u64)
            .flat_map(|i| ((i << 21) | PTE_PRESENT | PTE_WRITE | PDE_PS).to_le_bytes())
            .collect();
        self.write(PD_ADDR, &pd)?;

        let mut sregs = self.vcpu.get_sregs().map_err(regs_err("KVM_GET_SREGS"))?;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        sregs.efer = EFER_LME | EFER_LMA;
        sregs.cs = code64_segment();
        let data = data_segment();
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = 3 * 8 - 1;
        sregs.idt.base = IDT_ADDR;
        sregs.idt.limit = 256 * 16 - 1;
        self.vcpu
            .set_sregs(&sregs)
            .map_err(regs_err("KVM_SET_SREGS"))?;
        self.set_entry_regs(CODE_ADDR)
    }

    fn set_entry_regs(&self, rip: u64) -> Result<()> {
        let mut regs = self.vcpu.get_regs().map_err(regs_err("KVM_GET_REGS"))?;
        regs.rip = rip;
        regs.rsp = STACK_TOP;
        regs.rflags = 0x2;
        self.vcpu.set_regs(&regs).map_err(regs_err("KVM_SET_REGS"))
    }

    /// Runs the vCPU to its next exit and returns an owned copy of it.
    ///
    /// `in` and MMIO reads are answered with zeroes; `KVM_EXIT_INTR` is retried.
    pub fn run(&mut self) -> Result<GuestExit> {
        loop {
            let exit = self.vcpu.run().map_err(Error::Run)?;
            if matches!(exit, VcpuExit::Intr) {
                continue;
            }
            let captured = GuestExit::capture(exit);
            if let GuestExit::Other(_) = captured {
                // Internal errors carry a suberror worth showing.
                let run = self.vcpu.get_kvm_run();
                if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
                    // SAFETY: the exit reason says the `internal` member of the union is valid.
                    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                    return Ok(GuestExit::InternalError { suberror });
                }
            }
            return Ok(captured);
        }
    }

    /// Runs to the next exit and checks that it is `expected`.
    pub fn expect_exit(&mut self, expected: GuestExit) -> Result<()> {
        let actual = self.run()?;
        if actual == expected {
            Ok(())
        } else {
            Err(Error::UnexpectedExit { expected, actual })
        }
    }
}

fn regs_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Registers { op, source }
}

/// The flat 64-bit code segment the kit's long-mode guests run in.
pub fn code64_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: CODE64_SELECTOR,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    }
}

/// The flat data segment the kit's long-mode guests use for DS, ES, FS, GS and SS.
pub fn data_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: DATA_SELECTOR,
        type_: 0x3, // read/write, accessed
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    }
}

/// The GDT image matching [`code64_segment`] and [`data_segment`].
fn gdt_bytes() -> Vec<u8> {
    // Descriptor fields per Intel SDM vol. 3, 3.4.5: limit 0xfffff with G=1, base 0.
    let null = 0u64;
    let code64 = 0x00af_9b00_0000_ffffu64; // P, DPL0, S, type 0xb; L=1, G=1
    let data = 0x00cf_9300_0000_ffffu64; // P, DPL0, S, type 0x3; D/B=1, G=1
    [null, code64, data]
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect()
}

/// A 64-bit interrupt gate (type 0xe, present, DPL 0, IST 0) to `handler` in `selector`.
pub fn idt_gate(handler: u64, selector: u16) -> [u8; 16] {
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&selector.to_le_bytes());
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    gate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_descriptors_decode_to_the_segments() {
        let gdt = gdt_bytes();
        let code = u64::from_le_bytes(gdt[8..16].try_into().unwrap());
        let data = u64::from_le_bytes(gdt[16..24].try_into().unwrap());
        // Access byte: bits 40..48; flags nibble: bits 52..56.
        assert_eq!((code >> 40) & 0xff, 0x9b);
        assert_eq!((code >> 52) & 0xf, 0xa); // G, L
        assert_eq!((data >> 40) & 0xff, 0x93);
        assert_eq!((data >> 52) & 0xf, 0xc); // G, D/B
        let seg = code64_segment();
        assert_eq!(u64::from(seg.type_) | 0x90, (code >> 40) & 0xff);
    }

    #[test]
    fn idt_gate_splits_the_handler_address() {
        let gate = idt_gate(0x1234_5678_9abc_def0, 0x08);
        assert_eq!(&gate[0..2], &[0xf0, 0xde]);
        assert_eq!(&gate[2..4], &[0x08, 0x00]);
        assert_eq!(gate[5], 0x8e);
        assert_eq!(&gate[6..8], &[0xbc, 0x9a]);
        assert_eq!(&gate[8..12], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&gate[12..16], &[0, 0, 0, 0]);
    }

    #[test]
    fn layout_fits_below_the_code() {
        const { assert!(PD_ADDR + 0x1000 <= STACK_TOP - 0x1000) };
        const { assert!(STACK_TOP < CODE_ADDR) };
        const { assert!(IDT_ADDR + 256 * 16 <= PML4_ADDR) };
    }
}
