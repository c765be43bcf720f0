//! Guest memory: RAM below 4 GiB with a hole for 32-bit MMIO from 3 GiB to 4 GiB, the RAM
//! beyond 3 GiB moved above 4 GiB, and the e820 map that describes it to the guest.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::sys::{E820_RAM, E820_RESERVED, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The anonymous mappings for guest RAM could not be created.
    #[error("cannot map {mem_bytes} bytes of guest memory")]
    Mmap {
        /// Requested size.
        mem_bytes: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// The guest-physical ranges backed by RAM for `mem_bytes` of memory.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// The end of RAM below the 32-bit MMIO hole: where the initramfs is placed under.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

/// Maps guest memory for `mem_bytes`.
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_bytes)
        .into_iter()
        .map(|(a, len)| (a, len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| Error::Mmap { mem_bytes, source })
}

/// The e820 map: base memory, the reserved EBDA/BIOS area (MP table, ACPI tables), RAM from
/// 1 MiB up to the hole, and RAM above 4 GiB.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIMEM_START,
            size: low_ram_end(mem_bytes) - HIMEM_START,
            kind: E820_RAM,
        },
    ];
    if mem_bytes > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_bytes - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn small_guest_has_one_range() {
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(e820_map(64 << 20).len(), 3);
    }

    proptest! {
        #[test]
        fn e820_covers_exactly_the_ram(mib in 64u64..16384) {
            let bytes = mib << 20;
            let map = e820_map(bytes);
            let ram: u64 = map.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum();
            // Everything but the reserved 0x9fc00..1 MiB is RAM.
            prop_assert_eq!(ram, bytes - (HIMEM_START - EBDA_START));
            let ranges: u64 = ram_ranges(bytes).iter().map(|r| r.1).sum();
            prop_assert_eq!(ranges, bytes);
            for e in &map {
                prop_assert!(e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END);
            }
        }
    }
}
