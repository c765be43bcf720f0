//! An Intel MultiProcessor Specification 1.4 table: how a guest without ACPI's MADT finds its
//! CPUs, its I/O APIC and the ISA interrupt routing. Linux scans the last KiB of base memory
//! for the floating pointer (`arch/x86/kernel/mpparse.c`); the table follows it.
//!
//! Layout written at [`EBDA_START`]: the 16-byte floating pointer, the 44-byte table header,
//! one processor entry per vCPU (APIC ID = vCPU index, the BSP first), one ISA bus, the I/O
//! APIC (ID = number of vCPUs), ISA IRQs 0..15 routed 1:1 to I/O APIC pins, LINT0 as ExtINT
//! and LINT1 as NMI.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::sys::{
    APIC_DEFAULT_PHYS_BASE, APIC_VERSION, CPU_BOOTPROCESSOR, CPU_ENABLED, EBDA_START,
    IO_APIC_DEFAULT_PHYS_BASE, MAX_VCPUS, MPC_APIC_USABLE, MPC_SIGNATURE, MPF_SIGNATURE,
    MP_APIC_ALL, MP_BUS, MP_EXTINT, MP_INT, MP_INTSRC, MP_IOAPIC, MP_LINTSRC, MP_NMI, MP_PROCESSOR,
    MP_SPEC_REV,
};

/// Floating pointer length.
const MPF_LEN: usize = 16;
/// Configuration table header length.
const MPC_HEADER_LEN: usize = 44;
/// Processor entry length.
const PROCESSOR_LEN: usize = 20;
/// ISA IRQs routed through the I/O APIC.
const ISA_IRQS: u8 = 16;
/// I/O APIC version of KVM's in-kernel I/O APIC (82093AA).
const IOAPIC_VERSION: u8 = 0x11;
/// Bytes Linux scans at the end of base memory.
const SCAN_WINDOW: usize = 1024;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// More vCPUs than fit in the scanned KiB.
    #[error("an MP table for {vcpus} vCPUs does not fit; at most {max}")]
    TooManyVcpus {
        /// Requested.
        vcpus: u8,
        /// Limit.
        max: u8,
    },
    /// Zero vCPUs.
    #[error("an MP table needs at least one vCPU")]
    NoVcpus,
    /// The table could not be written.
    #[error("cannot write the MP table at {addr:#x}")]
    Write {
        /// Where.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

/// The floating pointer and table for `vcpus` CPUs, as they go at `base`.
pub fn build(vcpus: u8, base: u64) -> Result<Vec<u8>> {
    if vcpus == 0 {
        return Err(Error::NoVcpus);
    }
    if vcpus > MAX_VCPUS {
        return Err(Error::TooManyVcpus {
            vcpus,
            max: MAX_VCPUS,
        });
    }
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    for id in 0..vcpus {
        let mut e = [0u8; PROCESSOR_LEN];
        e[0] = MP_PROCESSOR;
        e[1] = id;
        e[2] = APIC_VERSION;
        e[3] = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        // CPU signature (family 6) and feature flags (FPU, APIC) as firmware would report.
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes());
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&e);
    }
    entries.extend_from_slice(&[MP_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    let mut ioapic = [
        MP_IOAPIC,
        ioapic_id,
        IOAPIC_VERSION,
        MPC_APIC_USABLE,
        0,
        0,
        0,
        0,
    ];
    ioapic[4..8].copy_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    entries.extend_from_slice(&ioapic);
    for irq in 0..ISA_IRQS {
        // type, irqtype, irqflag (2, conforming), source bus, bus IRQ, dest APIC, dest pin
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, MP_APIC_ALL, 1]);
    let entry_count = u16::from(vcpus) + 2 + u16::from(ISA_IRQS) + 2;

    let table_addr = base + MPF_LEN as u64;
    let mut mpf = [0u8; MPF_LEN];
    mpf[0..4].copy_from_slice(&MPF_SIGNATURE);
    mpf[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = MP_SPEC_REV;
    mpf[10] = checksum(&mpf);

    let mut mpc = vec![0u8; MPC_HEADER_LEN];
    mpc[0..4].copy_from_slice(&MPC_SIGNATURE);
    let table_len = (MPC_HEADER_LEN + entries.len()) as u16;
    mpc[4..6].copy_from_slice(&table_len.to_le_bytes());
    mpc[6] = MP_SPEC_REV;
    mpc[8..16].copy_from_slice(b"VMMREF  ");
    mpc[16..28].copy_from_slice(b"VMM-REFERENC");
    mpc[34..36].copy_from_slice(&entry_count.to_le_bytes());
    mpc[36..40].copy_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    mpc.extend_from_slice(&entries);
    mpc[7] = checksum(&mpc);

    let mut out = mpf.to_vec();
    out.extend_from_slice(&mpc);
    debug_assert!(out.len() <= SCAN_WINDOW);
    Ok(out)
}

/// Writes the MP table for `vcpus` at [`EBDA_START`].
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<()> {
    let bytes = build(vcpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|source| Error::Write {
            addr: EBDA_START,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn limits() {
        assert!(matches!(build(0, EBDA_START), Err(Error::NoVcpus)));
        assert!(matches!(
            build(MAX_VCPUS + 1, EBDA_START),
            Err(Error::TooManyVcpus { .. })
        ));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(write(&mem, 1), Err(Error::Write { .. })));
    }

    proptest! {
        #[test]
        fn table_is_consistent(vcpus in 1u8..=MAX_VCPUS) {
            let t = build(vcpus, EBDA_START).unwrap();
            prop_assert!(t.len() <= SCAN_WINDOW);
            prop_assert_eq!(checksum(&t[..MPF_LEN]), 0);
            let mpc = &t[MPF_LEN..];
            prop_assert_eq!(checksum(mpc), 0);
            prop_assert_eq!(u16::from_le_bytes([mpc[4], mpc[5]]) as usize, mpc.len());
            let cpus = mpc[MPC_HEADER_LEN..].chunks(PROCESSOR_LEN).take(vcpus as usize);
            for (i, e) in cpus.enumerate() {
                prop_assert_eq!(e[0], MP_PROCESSOR);
                prop_assert_eq!(e[1] as usize, i);
                prop_assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, i == 0);
            }
        }
    }
}
