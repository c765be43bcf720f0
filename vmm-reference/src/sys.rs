//! Raw constants of the x86 platform, the Linux boot protocol, the MP and ACPI specifications,
//! and the KVM API that this VMM uses. Nowhere else in the crate should a magic number appear.

use std::mem::size_of;
use std::os::raw::c_ulong;

use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

// ---- Guest physical memory layout (this VMM's choice, inside the PC's fixed holes) ----

/// The end of conventional memory below the EBDA; e820 RAM runs from 0 to here.
/// The MP floating pointer and table live in the last KiB, where Linux scans for them
/// (`arch/x86/kernel/mpparse.c`, `smp_scan_config(639 * 0x400, 0x400)`).
pub const EBDA_START: u64 = 0x9fc00;
/// The end of the legacy BIOS area; RAM resumes here (the "high memory" of the boot protocol).
pub const HIMEM_START: u64 = 0x10_0000;
/// Where the 64-bit GDT is written.
pub const GDT_ADDR: u64 = 0x500;
/// Where an empty IDT is written.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map and module list.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// The zero page (`struct boot_params`), passed in RSI (Documentation/x86/boot.rst).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Page-map level 4 of the identity map used for the 64-bit entry.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table of the identity map.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory of the identity map (512 2-MiB pages: the first GiB).
pub const PD_ADDR: u64 = 0xb000;
/// The initial stack pointer for the 64-bit entry (below the zero page, unused by Linux).
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// The largest command line this VMM passes (x86 `COMMAND_LINE_SIZE` is 2048).
pub const CMDLINE_MAX_LEN: usize = 2048;
/// ACPI tables: the RSDP must be in the BIOS read-only area Linux scans
/// (`0xe0000..0x100000`, ACPI 6.4 §5.2.5.1); the other tables follow it.
pub const ACPI_RSDP_ADDR: u64 = 0xe0000;
/// Start of the 32-bit MMIO gap: RAM above 3 GiB is moved above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Local APIC and I/O APIC addresses (Intel SDM vol. 3 §10.4.1; 82093AA datasheet).
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// I/O APIC base address.
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;

// ---- Linux boot protocol (Documentation/arch/x86/boot.rst) ----

/// `boot_flag` at 0x1fe of a bzImage.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS" at 0x202.
pub const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
/// File offset of `setup_sects`.
pub const SETUP_SECTS_OFFSET: usize = 0x1f1;
/// File offset of `syssize` (protected-mode code size in 16-byte paragraphs).
pub const SYSSIZE_OFFSET: usize = 0x1f4;
/// File offset of `boot_flag`.
pub const BOOT_FLAG_OFFSET: usize = 0x1fe;
/// File offset of the `HdrS` magic.
pub const HEADER_MAGIC_OFFSET: usize = 0x202;
/// `type_of_loader` for a boot loader without an assigned id.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// The 64-bit entry point is 0x200 bytes into the protected-mode kernel.
pub const STARTUP_64_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has the 64-bit entry at 0x200 (XLF_KERNEL_64).
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// ELF magic.
pub const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
/// e820 RAM (`E820_TYPE_RAM`, arch/x86/include/asm/e820/types.h).
pub const E820_RAM: u32 = 1;
/// e820 reserved.
pub const E820_RESERVED: u32 = 2;
/// PVH `hvm_start_info.magic` (xen/include/public/arch-x86/hvm/start_info.h).
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

// ---- Control registers, EFER, segment descriptors (Intel SDM vol. 3) ----

/// CR0.PE.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0.ET.
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0.PG.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE.
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER.LME.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA.
pub const EFER_LMA: u64 = 1 << 10;
/// Page-table entry: present | writable.
pub const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry: a 2-MiB page (PS).
pub const PDE_PS: u64 = 0x80;
/// RFLAGS bit 1 is reserved and reads as 1.
pub const RFLAGS_RESERVED: u64 = 0x2;
/// x87 control word after `FNINIT`.
pub const FPU_FCW_DEFAULT: u16 = 0x37f;
/// MXCSR after reset.
pub const MXCSR_DEFAULT: u32 = 0x1f80;

// ---- Local APIC registers (Intel SDM vol. 3 §10.5.1) ----

/// LVT LINT0 offset in the APIC page.
pub const APIC_LVT0: usize = 0x350;
/// LVT LINT1 offset in the APIC page.
pub const APIC_LVT1: usize = 0x360;
/// Delivery mode ExtINT in an LVT entry.
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// Delivery mode NMI in an LVT entry.
pub const APIC_MODE_NMI: u32 = 0x4;

// ---- CPUID (Intel SDM vol. 2A CPUID; AMD APM vol. 3 appendix E) ----

/// Leaf 1 ECX: VMX.
pub const CPUID_1_ECX_VMX: u32 = 1 << 5;
/// Leaf 1 ECX: TSC-deadline mode of the local APIC timer.
pub const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: hypervisor present.
pub const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: HTT (EBX bits 23:16 are valid).
pub const CPUID_1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX: SVM.
pub const CPUID_80000001_ECX_SVM: u32 = 1 << 2;
/// Leaf 0xB/0x1F level type "SMT".
pub const CPUID_LEVEL_TYPE_SMT: u32 = 1;
/// Leaf 0xB/0x1F level type "core".
pub const CPUID_LEVEL_TYPE_CORE: u32 = 2;

// ---- Legacy I/O ports ----

/// COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's IRQ / GSI.
pub const COM1_GSI: u32 = 4;
/// Number of 16550 registers.
pub const UART_REGISTERS: u64 = 8;
/// i8042 data port; the controller decodes 0x60..=0x64 here.
pub const I8042_PORT: u64 = 0x60;
/// Ports 0x60..=0x64 of the i8042.
pub const I8042_PORTS: u64 = 5;
/// CMOS RTC index port; 0x71 is data.
pub const CMOS_PORT: u64 = 0x70;
/// Index and data.
pub const CMOS_PORTS: u64 = 2;
/// ACPI hardware-reduced sleep control register (this VMM's choice; the FADT points to it).
pub const ACPI_SLEEP_CONTROL_PORT: u64 = 0x3c0;
/// ACPI sleep status register, right after the control register.
pub const ACPI_SLEEP_STATUS_PORT: u64 = 0x3c1;
/// `SLP_EN` in the sleep control register (ACPI 6.4 §4.8.3.7).
pub const ACPI_SLEEP_ENABLE: u8 = 1 << 5;
/// `SLP_TYP` field shift in the sleep control register.
pub const ACPI_SLEEP_TYPE_SHIFT: u8 = 2;
/// `SLP_TYP` field mask (3 bits) after shifting.
pub const ACPI_SLEEP_TYPE_MASK: u8 = 0x7;
/// The SLP_TYP value this VMM's DSDT declares for S5 (soft off).
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// The ACPI reset register (the FADT's `RESET_REG`, this VMM's choice of port), after the
/// sleep registers. Linux writes [`ACPI_RESET_VALUE`] there with `reboot=a`
/// (`acpi_reboot()`, drivers/acpi/reboot.c).
pub const ACPI_RESET_PORT: u64 = 0x3c2;
/// The FADT's `RESET_VALUE`.
pub const ACPI_RESET_VALUE: u8 = 0x42;
/// Where the DSDT's `\_TTS` method writes its argument: Linux evaluates `\_TTS(5)` from a
/// reboot notifier (`tts_notify_reboot`, drivers/acpi/sleep.c) at the start of every orderly
/// restart, halt and power-off, and never on the emergency restart that follows a panic.
pub const ACPI_SHUTDOWN_NOTICE_PORT: u64 = 0x3c3;
/// The four ports from [`ACPI_SLEEP_CONTROL_PORT`]: sleep control, sleep status, reset,
/// shutdown notice.
pub const ACPI_PORTS: u64 = 4;
/// FADT flag `RESET_REG_SUP` (bit 10): the reset register is valid.
pub const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// The PC reset vector: a real-mode jump to `f000:fff0` lands here. Linux's default restart
/// order on a hardware-reduced ACPI platform (`reboot_init()` picks `BOOT_EFI` when
/// `efi_reboot_required()`, i.e. `acpi_gbl_reduced_hardware`) falls through EFI to
/// `BOOT_BIOS`: `machine_real_restart(MRR_BIOS)` jumps here (arch/x86/kernel/reboot.c).
pub const RESET_VECTOR_ADDR: u64 = 0xf_fff0;
/// The 8042 command "pulse the reset line".
pub const I8042_CMD_RESET: u8 = 0xfe;
/// The 8042 command/status port.
pub const I8042_COMMAND_PORT: u8 = 0x64;

// ---- pvpanic (QEMU docs/specs/pvpanic.rst; Linux drivers/misc/pvpanic) ----

/// The ISA pvpanic port QEMU uses and this VMM's DSDT declares as `QEMU0001`.
pub const PVPANIC_PORT: u64 = 0x505;
/// Event and capability bit: the guest panicked (`PVPANIC_PANICKED`).
pub const PVPANIC_PANICKED: u8 = 1 << 0;

// ---- MP specification 1.4 ----

/// "_MP_" floating pointer signature.
pub const MPF_SIGNATURE: [u8; 4] = *b"_MP_";
/// "PCMP" configuration table signature.
pub const MPC_SIGNATURE: [u8; 4] = *b"PCMP";
/// MP spec revision 1.4.
pub const MP_SPEC_REV: u8 = 4;
/// Processor entry.
pub const MP_PROCESSOR: u8 = 0;
/// Bus entry.
pub const MP_BUS: u8 = 1;
/// I/O APIC entry.
pub const MP_IOAPIC: u8 = 2;
/// I/O interrupt assignment entry.
pub const MP_INTSRC: u8 = 3;
/// Local interrupt assignment entry.
pub const MP_LINTSRC: u8 = 4;
/// Processor flags: enabled.
pub const CPU_ENABLED: u8 = 1;
/// Processor flags: bootstrap processor.
pub const CPU_BOOTPROCESSOR: u8 = 2;
/// Interrupt type INT (vectored through the I/O APIC).
pub const MP_INT: u8 = 0;
/// Interrupt type NMI.
pub const MP_NMI: u8 = 1;
/// Interrupt type ExtINT.
pub const MP_EXTINT: u8 = 3;
/// I/O APIC flags: usable.
pub const MPC_APIC_USABLE: u8 = 1;
/// Local APIC version reported for each CPU (integrated APIC).
pub const APIC_VERSION: u8 = 0x14;
/// Number of I/O APIC pins of KVM's in-kernel I/O APIC (`KVM_IOAPIC_NUM_PINS`).
pub const IOAPIC_PINS: u8 = 24;
/// Destination "all local APICs" in a local interrupt entry.
pub const MP_APIC_ALL: u8 = 0xff;

// ---- KVM ----

/// The most vCPUs this VMM creates: the MP floating pointer and table must fit the last KiB
/// of base memory (0x9fc00..0xa0000) where Linux scans; with 20 bytes per processor entry and
/// 24 interrupt entries that leaves room for 32 (Firecracker's limit for the same reason).
pub const MAX_VCPUS: u8 = 32;

/// Address of the three-page TSS region VMX needs (`KVM_SET_TSS_ADDR`), just below the BIOS
/// area at the top of the 32-bit space, as QEMU and Firecracker place it.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

// ---- seccomp ----

/// The KVM ioctls a vCPU thread makes once its guest runs, which its seccomp filter lets
/// through: `KVM_RUN`, and the register sets sync-regs reads and writes with an ioctl where
/// `kvm_run` does not carry them (and the MP state it asks before the first staged write).
/// Numbered as in `include/uapi/linux/kvm.h`; kvm-ioctls declares the same privately.
pub const VCPU_THREAD_IOCTLS: [(&str, c_ulong); 8] = [
    ("KVM_RUN", ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0)),
    (
        "KVM_GET_REGS",
        ioctl_expr(_IOC_READ, KVMIO, 0x81, size_of::<kvm_regs>() as u32),
    ),
    (
        "KVM_SET_REGS",
        ioctl_expr(_IOC_WRITE, KVMIO, 0x82, size_of::<kvm_regs>() as u32),
    ),
    (
        "KVM_GET_SREGS",
        ioctl_expr(_IOC_READ, KVMIO, 0x83, size_of::<kvm_sregs>() as u32),
    ),
    (
        "KVM_SET_SREGS",
        ioctl_expr(_IOC_WRITE, KVMIO, 0x84, size_of::<kvm_sregs>() as u32),
    ),
    (
        "KVM_GET_MP_STATE",
        ioctl_expr(_IOC_READ, KVMIO, 0x98, size_of::<kvm_mp_state>() as u32),
    ),
    (
        "KVM_GET_VCPU_EVENTS",
        ioctl_expr(_IOC_READ, KVMIO, 0x9f, size_of::<kvm_vcpu_events>() as u32),
    ),
    (
        "KVM_SET_VCPU_EVENTS",
        ioctl_expr(_IOC_WRITE, KVMIO, 0xa0, size_of::<kvm_vcpu_events>() as u32),
    ),
];

/// `KVMIO`, the ioctl type of every KVM ioctl (`include/uapi/linux/kvm.h`).
pub const KVMIO: u32 = 0xAE;

/// The head of a `siginfo_t` for `SIGSYS` on x86_64: the three ints and padding of
/// `__SIGINFO`, then the `_sigsys` member of the union (`include/uapi/asm-generic/siginfo.h`,
/// Linux 3.5), which a `SECCOMP_RET_TRAP` fills with the syscall that was refused.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SigsysInfo {
    /// `si_signo`.
    pub signo: i32,
    /// `si_errno`: the `SECCOMP_RET_DATA` of the filter's verdict.
    pub errno: i32,
    /// `si_code`: `SYS_SECCOMP` (1).
    pub code: i32,
    /// Alignment of the union to 8 bytes.
    pub pad: i32,
    /// `si_call_addr`: the instruction after the syscall.
    pub call_addr: usize,
    /// `si_syscall`: the syscall number.
    pub syscall: i32,
    /// `si_arch`: `AUDIT_ARCH_X86_64` for a 64-bit syscall.
    pub arch: u32,
}

/// The exit status of the VMM when a thread made a syscall its seccomp filter forbids: that
/// of every other VMM failure.
pub const EXIT_SECCOMP_VIOLATION: i32 = 4;
