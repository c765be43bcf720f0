//! The smallest ACPI that lets a Linux guest power off and reset: an RSDP, an XSDT listing a
//! FADT and a MADT, and a DSDT with `\_S5` (soft off), COM1, a pvpanic device and `\_TTS`.
//!
//! Without ACPI (or APM) a Linux guest's `poweroff` ends in `machine_power_off()` with no
//! power-off handler: the CPU halts and the VMM cannot tell it from an idle guest (Firecracker
//! has this problem). Here the FADT is *hardware-reduced* (ACPI 6.4 §4.1) with the sleep
//! control and status registers in port I/O ([`ACPI_SLEEP_CONTROL_PORT`]); Linux's
//! `acpi_hw_extended_sleep()` powers off by writing `SLP_TYP(S5) | SLP_EN` there, which the
//! [`crate::devices::power`] device turns into "guest powered off". The FADT's reset register
//! is in the same block ([`ACPI_RESET_PORT`], used by Linux with `reboot=a`).
//!
//! The DSDT's `\_TTS` ("transition to state") method writes its argument to
//! [`ACPI_SHUTDOWN_NOTICE_PORT`]. Linux evaluates `\_TTS(5)` from a reboot notifier
//! (`tts_notify_reboot`, drivers/acpi/sleep.c) when an orderly restart, halt or power-off
//! begins, and not on the emergency restart after a panic, so the VMM can tell a reboot from a
//! panic that resets. `PEVT` is a pvpanic device (`QEMU0001`) at [`PVPANIC_PORT`].
//!
//! The XSDT also lists a MADT with one local APIC per vCPU and the I/O APIC: a kernel built
//! without `CONFIG_X86_MPPARSE` (the Debian cloud kernel is one) ignores the MP table
//! ([`crate::mptable`]) and finds its CPUs only here.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::sys::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SHUTDOWN_NOTICE_PORT,
    ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, APIC_DEFAULT_PHYS_BASE, FADT_RESET_REG_SUP,
    IO_APIC_DEFAULT_PHYS_BASE, PVPANIC_PORT,
};

/// Length of a system description table header (ACPI 6.4 §5.2.6).
const HEADER_LEN: usize = 36;
/// Length of an ACPI 2.0+ RSDP.
const RSDP_LEN: usize = 36;
/// Length of a revision-6 FADT.
const FADT_LEN: usize = 276;
/// FADT flag HW_REDUCED_ACPI (bit 20).
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// IA-PC boot architecture flag "VGA not present" (bit 2).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// MADT flag PCAT_COMPAT: the platform also has dual 8259s (KVM's in-kernel PIC).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT entry types (ACPI 6.4 §5.2.12): processor local APIC, I/O APIC, local APIC NMI.
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// Local APIC flag: enabled.
const MADT_LAPIC_ENABLED: u32 = 1;
/// Processor UID meaning "all processors" in a local APIC NMI entry.
const MADT_ALL_PROCESSORS: u8 = 0xff;
/// Generic address structure: address space "system I/O".
const GAS_SYSTEM_IO: u8 = 1;
/// Generic address structure: byte access.
const GAS_ACCESS_BYTE: u8 = 1;
/// FADT field offsets (ACPI 6.4 table 5.9).
const FADT_DSDT: usize = 40;
const FADT_IAPC_BOOT_ARCH: usize = 109;
const FADT_FLAGS: usize = 112;
const FADT_RESET_REG: usize = 116;
const FADT_RESET_VALUE: usize = 128;
const FADT_MINOR_VERSION: usize = 131;
const FADT_X_DSDT: usize = 140;
const FADT_SLEEP_CONTROL: usize = 244;
const FADT_SLEEP_STATUS: usize = 256;
const FADT_HYPERVISOR_ID: usize = 268;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A table could not be written to guest memory.
    #[error("cannot write the ACPI {table} at {addr:#x}")]
    Write {
        /// Signature of the table.
        table: &'static str,
        /// Where.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Sets the checksum byte at `at` so that all bytes of `table` sum to zero.
fn fix_checksum(table: &mut [u8], at: usize) {
    table[at] = 0;
    let sum = table.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    table[at] = 0u8.wrapping_sub(sum);
}

fn header(signature: &[u8; 4], len: usize, revision: u8) -> Vec<u8> {
    let mut t = vec![0u8; len];
    t[0..4].copy_from_slice(signature);
    t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    t[8] = revision;
    t[10..16].copy_from_slice(b"VMMREF");
    t[16..24].copy_from_slice(b"VMMREFTB");
    t[24..28].copy_from_slice(&1u32.to_le_bytes());
    t[28..32].copy_from_slice(b"VMMR");
    t[32..36].copy_from_slice(&1u32.to_le_bytes());
    t
}

/// `\_S5`: `Name (_S5, Package (2) { 5, 0 })` in AML (ACPI 6.4 §20.2.5).
const AML_S5: [u8; 11] = [
    0x08, // NameOp
    b'_',
    b'S',
    b'5',
    b'_', // NameString
    0x12, // PackageOp
    0x05, // PkgLength: itself, NumElements and the three bytes below
    0x02, // NumElements
    0x0a,
    ACPI_S5_SLEEP_TYPE, // BytePrefix SLP_TYPa
    0x00,               // ZeroOp: SLP_TYPb
];

/// `\COM1`, a PNP0501 UART at 0x3f8 with IRQ 4:
/// `Device (COM1) { Name (_HID, EisaId ("PNP0501")) Name (_CRS, ResourceTemplate () {
/// IO (Decode16, 0x3F8, 0x3F8, 0, 8) IRQNoFlags () {4} }) }`.
///
/// A hardware-reduced guest has no legacy ISA IRQs (Linux installs `null_legacy_pic`), so the
/// built-in 8250 port's IRQ 4 is mapped to I/O APIC pin 4 only when a PNP device declares it;
/// without this the console tty never gets its interrupt and user-space output stalls.
const AML_COM1: [u8; 39] = [
    0x5b, 0x82, // DeviceOp
    0x25, // PkgLength: 37 bytes (itself, the name and the two Name objects)
    b'C', b'O', b'M', b'1', //
    0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01, // EisaId("PNP0501")
    0x08, b'_', b'C', b'R', b'S', // Name (_CRS, Buffer
    0x11, 0x10, 0x0a, 0x0d, // BufferOp, PkgLength 16, BytePrefix size 13
    0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x00, 0x08, // IO: decode16, 0x3f8..0x3f8, 8 ports
    0x22, 0x10, 0x00, // IRQNoFlags: IRQ 4
    0x79, 0x00, // EndTag
];

/// AML encodings (ACPI 6.4 §20.2) for the few objects built here.
mod aml {
    /// `PkgLength` followed by `body`: one byte up to 63, two bytes up to 4095 (§20.2.4).
    pub fn package(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 2);
        if body.len() + 1 < 0x40 {
            out.push((body.len() + 1) as u8);
        } else {
            let len = body.len() + 2;
            assert!(len < 0x1000, "AML package too long");
            out.push(0x40 | (len & 0xf) as u8);
            out.push((len >> 4) as u8);
        }
        out.extend_from_slice(body);
        out
    }

    /// `Device (name) { body }`.
    pub fn device(name: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut out = vec![0x5b, 0x82]; // ExtOpPrefix, DeviceOp
        out.extend(package(&[name.as_slice(), body].concat()));
        out
    }

    /// `Name (name, object)`.
    pub fn name(name: &[u8; 4], object: &[u8]) -> Vec<u8> {
        [&[0x08], name.as_slice(), object].concat() // NameOp
    }

    /// A string constant.
    pub fn string(s: &str) -> Vec<u8> {
        [&[0x0d], s.as_bytes(), &[0]].concat() // StringPrefix, bytes, NUL
    }

    /// `ResourceTemplate () { IO (Decode16, port, port, 1, len) }` as a buffer.
    pub fn io_resource(port: u16, len: u8) -> Vec<u8> {
        let [lo, hi] = port.to_le_bytes();
        let descriptors = [0x47, 0x01, lo, hi, lo, hi, 0x01, len, 0x79, 0x00]; // IO, EndTag
        let mut body = vec![0x0a, descriptors.len() as u8]; // BytePrefix buffer size
        body.extend_from_slice(&descriptors);
        let mut out = vec![0x11]; // BufferOp
        out.extend(package(&body));
        out
    }

    /// `OperationRegion (name, SystemIO, port, len)`.
    pub fn system_io_region(name: &[u8; 4], port: u16, len: u8) -> Vec<u8> {
        let [lo, hi] = port.to_le_bytes();
        // ExtOpPrefix, OpRegionOp, name, SystemIO, WordPrefix port, BytePrefix len.
        [
            &[0x5b, 0x80],
            name.as_slice(),
            &[0x01, 0x0b, lo, hi, 0x0a, len],
        ]
        .concat()
    }

    /// `Field (region, ByteAcc, NoLock, Preserve) { field, 8 }`.
    pub fn byte_field(region: &[u8; 4], field: &[u8; 4]) -> Vec<u8> {
        let body = [region.as_slice(), &[0x01], field.as_slice(), &[0x08]].concat();
        let mut out = vec![0x5b, 0x81]; // ExtOpPrefix, FieldOp
        out.extend(package(&body));
        out
    }

    /// `Method (name, 1, NotSerialized) { Store (Arg0, target) }`.
    pub fn method_store_arg0(name: &[u8; 4], target: &[u8; 4]) -> Vec<u8> {
        // MethodFlags 1 (one argument), StoreOp, Arg0Op, target.
        let body = [name.as_slice(), &[0x01, 0x70, 0x68], target.as_slice()].concat();
        let mut out = vec![0x14]; // MethodOp
        out.extend(package(&body));
        out
    }
}

/// `\PEVT`, a pvpanic device: `Device (PEVT) { Name (_HID, "QEMU0001") Name (_CRS,
/// ResourceTemplate () { IO (Decode16, 0x505, 0x505, 1, 1) }) }`.
pub fn aml_pvpanic() -> Vec<u8> {
    let body = [
        aml::name(b"_HID", &aml::string("QEMU0001")),
        aml::name(b"_CRS", &aml::io_resource(PVPANIC_PORT as u16, 1)),
    ]
    .concat();
    aml::device(b"PEVT", &body)
}

/// `\_TTS`: `OperationRegion (TTSR, SystemIO, 0x3c3, 1) Field (TTSR, ByteAcc, NoLock,
/// Preserve) { TTSP, 8 } Method (_TTS, 1) { Store (Arg0, TTSP) }`.
pub fn aml_tts() -> Vec<u8> {
    [
        aml::system_io_region(b"TTSR", ACPI_SHUTDOWN_NOTICE_PORT as u16, 1),
        aml::byte_field(b"TTSR", b"TTSP"),
        aml::method_store_arg0(b"_TTS", b"TTSP"),
    ]
    .concat()
}

/// The DSDT: `\_S5`, the COM1 device, the pvpanic device and `\_TTS`.
pub fn dsdt() -> Vec<u8> {
    let body = [AML_S5.as_slice(), &AML_COM1, &aml_pvpanic(), &aml_tts()].concat();
    let mut t = header(b"DSDT", HEADER_LEN + body.len(), 2);
    t[HEADER_LEN..].copy_from_slice(&body);
    fix_checksum(&mut t, 9);
    t
}

fn gas_io_byte(t: &mut [u8], at: usize, port: u64) {
    t[at] = GAS_SYSTEM_IO;
    t[at + 1] = 8; // register bit width
    t[at + 2] = 0; // bit offset
    t[at + 3] = GAS_ACCESS_BYTE;
    t[at + 4..at + 12].copy_from_slice(&port.to_le_bytes());
}

/// A hardware-reduced FADT pointing at the DSDT, the sleep registers and the reset register.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut t = header(b"FACP", FADT_LEN, 6);
    t[FADT_DSDT..FADT_DSDT + 4].copy_from_slice(&(dsdt_addr as u32).to_le_bytes());
    t[FADT_IAPC_BOOT_ARCH..FADT_IAPC_BOOT_ARCH + 2]
        .copy_from_slice(&IAPC_VGA_NOT_PRESENT.to_le_bytes());
    t[FADT_FLAGS..FADT_FLAGS + 4]
        .copy_from_slice(&(FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP).to_le_bytes());
    gas_io_byte(&mut t, FADT_RESET_REG, ACPI_RESET_PORT);
    t[FADT_RESET_VALUE] = ACPI_RESET_VALUE;
    t[FADT_MINOR_VERSION] = 4;
    t[FADT_X_DSDT..FADT_X_DSDT + 8].copy_from_slice(&dsdt_addr.to_le_bytes());
    gas_io_byte(&mut t, FADT_SLEEP_CONTROL, ACPI_SLEEP_CONTROL_PORT);
    gas_io_byte(&mut t, FADT_SLEEP_STATUS, ACPI_SLEEP_STATUS_PORT);
    t[FADT_HYPERVISOR_ID..FADT_HYPERVISOR_ID + 8].copy_from_slice(b"VMMREF\0\0");
    fix_checksum(&mut t, 9);
    t
}

/// A MADT for `vcpus` local APICs (IDs 0..vcpus) and the I/O APIC (ID `vcpus`), with NMI on
/// every processor's LINT1.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..vcpus {
        body.extend_from_slice(&[MADT_LOCAL_APIC, 8, id, id]);
        body.extend_from_slice(&MADT_LAPIC_ENABLED.to_le_bytes());
    }
    body.extend_from_slice(&[MADT_IO_APIC, 12, vcpus, 0]);
    body.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    body.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, MADT_ALL_PROCESSORS, 0, 0, 1]);
    let mut t = header(b"APIC", HEADER_LEN + body.len(), 5);
    t[HEADER_LEN..].copy_from_slice(&body);
    fix_checksum(&mut t, 9);
    t
}

/// An XSDT listing `tables`.
pub fn xsdt(tables: &[u64]) -> Vec<u8> {
    let mut t = header(b"XSDT", HEADER_LEN + 8 * tables.len(), 1);
    for (i, addr) in tables.iter().enumerate() {
        let at = HEADER_LEN + 8 * i;
        t[at..at + 8].copy_from_slice(&addr.to_le_bytes());
    }
    fix_checksum(&mut t, 9);
    t
}

/// An ACPI 2.0 RSDP pointing at the XSDT.
pub fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut t = vec![0u8; RSDP_LEN];
    t[0..8].copy_from_slice(b"RSD PTR ");
    t[9..15].copy_from_slice(b"VMMREF");
    t[15] = 2; // revision: 2.0 and later
    t[20..24].copy_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    t[24..32].copy_from_slice(&xsdt_addr.to_le_bytes());
    fix_checksum(&mut t[..20], 8);
    fix_checksum(&mut t, 32);
    t
}

fn align16(a: u64) -> u64 {
    (a + 15) & !15
}

/// Writes RSDP, XSDT, FADT, DSDT and MADT from `rsdp_addr` on and returns the RSDP address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    rsdp_addr: GuestAddress,
    vcpus: u8,
) -> Result<GuestAddress> {
    let xsdt_addr = align16(rsdp_addr.0 + RSDP_LEN as u64);
    let fadt_addr = align16(xsdt_addr + HEADER_LEN as u64 + 16);
    let dsdt = dsdt();
    let dsdt_addr = align16(fadt_addr + FADT_LEN as u64);
    let madt_addr = align16(dsdt_addr + dsdt.len() as u64);
    let tables: [(&'static str, u64, Vec<u8>); 5] = [
        ("RSDP", rsdp_addr.0, rsdp(xsdt_addr)),
        ("XSDT", xsdt_addr, xsdt(&[fadt_addr, madt_addr])),
        ("FACP", fadt_addr, fadt(dsdt_addr)),
        ("DSDT", dsdt_addr, dsdt),
        ("APIC", madt_addr, madt(vcpus)),
    ];
    for (table, addr, bytes) in tables {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|source| Error::Write {
                table,
                addr,
                source,
            })?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(t: &[u8]) -> bool {
        t.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        for t in [dsdt(), fadt(0xe0100), xsdt(&[1, 2]), rsdp(0xe0040), madt(3)] {
            assert!(sums_to_zero(&t));
        }
        assert!(sums_to_zero(&rsdp(0xe0040)[..20]));
        let f = fadt(0xe0100);
        assert_eq!(
            u32::from_le_bytes(f[4..8].try_into().unwrap()),
            FADT_LEN as u32
        );
        assert_eq!(f[FADT_SLEEP_CONTROL + 4], ACPI_SLEEP_CONTROL_PORT as u8);
        assert_eq!(&dsdt()[HEADER_LEN + 1..HEADER_LEN + 5], b"_S5_");
        assert_eq!(f[FADT_RESET_REG + 4], ACPI_RESET_PORT as u8);
        assert_eq!(f[FADT_RESET_VALUE], ACPI_RESET_VALUE);
        let flags = u32::from_le_bytes(f[FADT_FLAGS..FADT_FLAGS + 4].try_into().unwrap());
        assert_eq!(flags, FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP);
        // Header, LAPIC address and flags, 3 LAPICs, the I/O APIC and the NMI entry.
        assert_eq!(madt(3).len(), HEADER_LEN + 8 + 3 * 8 + 12 + 6);
    }

    /// The AML, byte for byte as `iasl` compiles the ASL in the doc comments.
    #[test]
    fn aml_objects_encode_as_asl_compiles_them() {
        assert_eq!(
            aml_pvpanic(),
            [
                &[0x5b, 0x82, 0x27][..],
                b"PEVT",
                &[0x08],
                b"_HID",
                &[0x0d],
                b"QEMU0001\0",
                &[0x08],
                b"_CRS",
                &[0x11, 0x0d, 0x0a, 0x0a, 0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01],
                &[0x79, 0x00],
            ]
            .concat()
        );
        assert_eq!(
            aml_tts(),
            [
                &[0x5b, 0x80][..],
                b"TTSR",
                &[0x01, 0x0b, 0xc3, 0x03, 0x0a, 0x01],
                &[0x5b, 0x81, 0x0b],
                b"TTSR",
                &[0x01],
                b"TTSP",
                &[0x08],
                &[0x14, 0x0c],
                b"_TTS",
                &[0x01, 0x70, 0x68],
                b"TTSP",
            ]
            .concat()
        );
        let long = aml::package(&[0u8; 100]);
        assert_eq!(&long[..2], &[0x40 | (102 & 0xf), 102 >> 4]);
    }

    #[test]
    fn write_tables_lays_them_out_in_order() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rsdp_addr = write_tables(&mem, GuestAddress(0xe0000), 2).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp_addr).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let xsdt_addr: u64 = mem.read_obj(GuestAddress(0xe0000 + 24)).unwrap();
        let fadt_addr: u64 = mem.read_obj(GuestAddress(xsdt_addr + 36)).unwrap();
        let mut facp = [0u8; 4];
        mem.read_slice(&mut facp, GuestAddress(fadt_addr)).unwrap();
        assert_eq!(&facp, b"FACP");
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            write_tables(&small, GuestAddress(0xe0000), 1),
            Err(Error::Write { table: "RSDP", .. })
        ));
    }
}
