//! Guest memory: RAM below 4 GiB with a hole for 32-bit MMIO from 3 GiB to 4 GiB, the RAM
//! beyond 3 GiB moved above 4 GiB, and the e820 map that describes it to the guest.

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
    /// The huge-page advice could not be given for a guest RAM mapping.
    #[error("madvise({advice}) on {len} bytes of guest memory failed")]
    Madvise {
        /// `MADV_HUGEPAGE` or `MADV_NOHUGEPAGE`.
        advice: &'static str,
        /// Length of the mapping.
        len: u64,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
}

/// Whether guest RAM is backed by transparent huge pages.
///
/// Guest RAM is an anonymous private mapping with `MAP_NORESERVE` (vm-memory's default), so
/// a page costs memory only once the guest touches it. With huge pages a first touch faults in
/// 2 MiB at once: fewer faults and nested-paging entries, more resident memory for a guest
/// that touches little of each 2 MiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HugePages {
    /// `madvise(MADV_HUGEPAGE)`: transparent huge pages wherever the host allows them
    /// (`/sys/kernel/mm/transparent_hugepage/enabled` set to `always` or `madvise`).
    On,
    /// `madvise(MADV_NOHUGEPAGE)`: 4 KiB pages only, even where the host default is `always`.
    #[default]
    Off,
}

impl HugePages {
    fn advice(self) -> (libc::c_int, &'static str) {
        match self {
            HugePages::On => (libc::MADV_HUGEPAGE, "MADV_HUGEPAGE"),
            HugePages::Off => (libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE"),
        }
    }
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

/// Maps guest memory for `mem_bytes` (anonymous, private, `MAP_NORESERVE`) with the
/// transparent-huge-page advice `huge_pages`.
///
/// # Errors
///
/// [`Error::Mmap`] or [`Error::Madvise`].
pub fn create_guest_memory(mem_bytes: u64, huge_pages: HugePages) -> Result<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_bytes)
        .into_iter()
        .map(|(a, len)| (a, len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|source| Error::Mmap { mem_bytes, source })?;
    let (advice, name) = huge_pages.advice();
    for region in mem.iter() {
        // SAFETY: the range is exactly one live mapping owned by `mem`; the advice changes
        // only how the kernel backs it, never its contents or validity.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast::<libc::c_void>(),
                region.len() as usize,
                advice,
            )
        };
        if rc != 0 {
            return Err(Error::Madvise {
                advice: name,
                len: region.len(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(mem)
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

    /// The `VmFlags` of the smaps entry of the mapping that starts at `addr`.
    fn vm_flags(addr: u64) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, _)) = range.split_once('-') {
                    if let Ok(start) = u64::from_str_radix(start, 16) {
                        inside = start == addr;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.trim().to_owned();
                }
            }
        }
        panic!("no mapping at {addr:#x}")
    }

    #[test]
    fn guest_ram_is_noreserve_with_the_huge_page_advice() {
        for (huge, wanted, unwanted) in [(HugePages::On, "hg", "nh"), (HugePages::Off, "nh", "hg")]
        {
            let mem = create_guest_memory(64 << 20, huge).unwrap();
            let region = mem.iter().next().unwrap();
            let flags = vm_flags(region.as_ptr() as u64);
            let flags: Vec<&str> = flags.split_whitespace().collect();
            assert!(flags.contains(&"nr"), "MAP_NORESERVE missing: {flags:?}");
            assert!(flags.contains(&wanted), "{huge:?}: {flags:?}");
            assert!(!flags.contains(&unwanted), "{huge:?}: {flags:?}");
        }
    }

    #[test]
    fn small_guest_has_one_range() {
        let mem = create_guest_memory(64 << 20, HugePages::Off).unwrap();
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
