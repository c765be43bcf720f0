//! Guest memory: RAM below 4 GiB with a hole for 32-bit MMIO from 3 GiB to 4 GiB, the RAM
//! beyond 3 GiB moved above 4 GiB, and the e820 map that describes it to the guest.

use serde::{Deserialize, Serialize};
use vm_memory::mmap::{MmapRegion, MmapRegionError};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionCollectionError, GuestRegionMmap,
};

use crate::sys::{E820_RAM, E820_RESERVED, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An anonymous mapping for guest RAM could not be created.
    #[error("cannot map {len} bytes of guest memory at guest address {gpa:#x}")]
    Mmap {
        /// Guest-physical start of the range.
        gpa: u64,
        /// Its length.
        len: u64,
        /// What vm-memory reported.
        #[source]
        source: MmapRegionError,
    },
    /// vm-memory refused the regions (overlapping or unsorted).
    #[error("cannot assemble the guest memory regions")]
    Regions(#[source] GuestRegionCollectionError),
    /// A range would end beyond the 64-bit guest address space.
    #[error("guest memory range at {gpa:#x} ({len} bytes) wraps the address space")]
    RangeWraps {
        /// Guest-physical start of the range.
        gpa: u64,
        /// Its length.
        len: u64,
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
    /// (`/sys/kernel/mm/transparent_hugepage/enabled` set to `always` or `madvise`). A guest
    /// boots faster, most of all in a nested host, where every 4 KiB page the guest touches
    /// first costs a nested-paging fault through both hypervisors. The default.
    #[default]
    On,
    /// `madvise(MADV_NOHUGEPAGE)`: 4 KiB pages only, even where the host default is `always`:
    /// a few MiB less resident memory for a slower boot.
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

/// The size of a transparent huge page (and of a large nested-paging entry) on x86-64.
pub const HUGE_PAGE: u64 = 2 << 20;

/// Guest RAM: the vm-memory regions the VMM reads and writes, and the mappings behind them,
/// each placed so that a guest-physical address and its host address agree modulo 2 MiB.
///
/// KVM maps guest memory with large nested-paging entries only where that holds
/// (`kvm_alloc_memslot_metadata` in virt/kvm/kvm_main.c disallows large pages for a slot whose
/// `userspace_addr` and `guest_phys_addr` differ in their low 21 bits), and a kernel before
/// 6.7 aligns an anonymous mapping to a page only. Each range is therefore mapped 2 MiB
/// larger and the regions start at the first 2 MiB boundary inside.
///
/// The regions do not own their memory: clones of [`GuestRam::memory`] must not outlive
/// this value, which unmaps it when dropped.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    /// The unit in which the host backs guest RAM: 2 MiB with huge pages, else 4 KiB.
    block: u64,
    // Declared after `memory`, so dropped after it: the regions point into these mappings.
    _backing: Vec<MmapRegion>,
}

impl GuestRam {
    /// The guest memory, for everything that reads or writes it.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Gives back to the host every block of guest RAM inside `start .. start + len` that
    /// holds only zeros (a block is what backs guest RAM: a 2 MiB huge page, or a 4 KiB page
    /// with huge pages off), and returns how many bytes that was. A released block reads as
    /// zeros again and costs memory only once the guest touches it.
    ///
    /// This is for the zeros a loader copied from a file: an ELF kernel's segments carry
    /// `.bss` and alignment padding as zeros in the file, and writing them made the host back
    /// blocks the guest may never touch. Call it only while nothing else (no vCPU, no other
    /// thread) writes the range, or a write that lands between the check and the release is
    /// lost.
    ///
    /// # Errors
    ///
    /// [`Error::Madvise`] if the host refused `MADV_DONTNEED`.
    pub fn release_zero_blocks(&self, start: GuestAddress, len: u64) -> Result<u64> {
        let end = start.0.saturating_add(len);
        let mut released = 0;
        for region in self.memory.iter() {
            let base = region.start_addr().0;
            let first = start.0.max(base).next_multiple_of(self.block);
            let last = end.min(base + region.len());
            let mut block = first;
            while block.saturating_add(self.block) <= last {
                let offset = (block - base) as usize;
                // `block .. block + self.block` lies inside the region, so the pointer
                // arithmetic stays inside its mapping.
                let host = region.as_ptr().wrapping_add(offset);
                if is_zero(host, self.block as usize) {
                    // SAFETY: the range is inside this region's live private anonymous
                    // mapping, block-aligned on the host as in the guest; MADV_DONTNEED only
                    // drops pages that hold zeros, which read back as zeros.
                    let rc = unsafe {
                        libc::madvise(
                            host.cast::<libc::c_void>(),
                            self.block as usize,
                            libc::MADV_DONTNEED,
                        )
                    };
                    if rc != 0 {
                        return Err(Error::Madvise {
                            advice: "MADV_DONTNEED",
                            len: self.block,
                            source: std::io::Error::last_os_error(),
                        });
                    }
                    released += self.block;
                }
                block += self.block;
            }
        }
        Ok(released)
    }
}

/// Whether the `len` bytes at `host` (inside a live guest RAM mapping, 8-byte aligned, `len` a
/// multiple of 8) are all zero. Volatile reads: it is guest memory.
fn is_zero(host: *const u8, len: usize) -> bool {
    let words = host.cast::<u64>();
    (0..len / 8).all(|i| {
        // SAFETY: `i * 8 + 8 <= len`, inside the mapping the caller names; aligned.
        unsafe { std::ptr::read_volatile(words.add(i)) == 0 }
    })
}

/// Maps guest memory for `mem_bytes` (anonymous, private, `MAP_NORESERVE`, 2 MiB-aligned as
/// [`GuestRam`] says) with the transparent-huge-page advice `huge_pages`.
///
/// # Errors
///
/// [`Error::Mmap`], [`Error::Regions`] or [`Error::Madvise`].
pub fn create_guest_memory(mem_bytes: u64, huge_pages: HugePages) -> Result<GuestRam> {
    let (advice, name) = huge_pages.advice();
    let mut backing = Vec::new();
    let mut regions = Vec::new();
    for (gpa, len) in ram_ranges(mem_bytes) {
        let mapped = MmapRegion::new((len + HUGE_PAGE) as usize).map_err(|source| Error::Mmap {
            gpa: gpa.0,
            len,
            source,
        })?;
        let base = mapped.as_ptr() as u64;
        // The guest ranges start on 2 MiB boundaries, so the host start must too.
        let skip = base.next_multiple_of(HUGE_PAGE) - base;
        // SAFETY: `base + skip .. base + skip + len` lies inside `mapped` (which is `len` plus
        // 2 MiB long), and `mapped` lives in `GuestRam::_backing` for as long as the region
        // is reachable from `GuestRam::memory`; the flags are those `MmapRegion::new` used.
        let region = unsafe {
            MmapRegion::build_raw(
                mapped.as_ptr().add(skip as usize),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE,
            )
        }
        .map_err(|source| Error::Mmap {
            gpa: gpa.0,
            len,
            source,
        })?;
        // SAFETY: the whole mapping is owned by `mapped`; the advice changes only how the
        // kernel backs it, never its contents or validity.
        let rc = unsafe {
            libc::madvise(
                mapped.as_ptr().cast::<libc::c_void>(),
                mapped.size(),
                advice,
            )
        };
        if rc != 0 {
            return Err(Error::Madvise {
                advice: name,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        // `GuestRegionMmap::new` refuses only a region that would wrap the address space.
        let region =
            GuestRegionMmap::new(region, gpa).ok_or(Error::RangeWraps { gpa: gpa.0, len })?;
        regions.push(region);
        backing.push(mapped);
    }
    let memory = GuestMemoryMmap::from_regions(regions).map_err(Error::Regions)?;
    Ok(GuestRam {
        memory,
        block: match huge_pages {
            HugePages::On => HUGE_PAGE,
            HugePages::Off => 4096,
        },
        _backing: backing,
    })
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
    use vm_memory::Bytes;

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
            let ram = create_guest_memory(64 << 20, huge).unwrap();
            // The advice covers the whole mapping, which starts before the region.
            let flags = vm_flags(ram._backing[0].as_ptr() as u64);
            let flags: Vec<&str> = flags.split_whitespace().collect();
            assert!(flags.contains(&"nr"), "MAP_NORESERVE missing: {flags:?}");
            assert!(flags.contains(&wanted), "{huge:?}: {flags:?}");
            assert!(!flags.contains(&unwanted), "{huge:?}: {flags:?}");
        }
    }

    #[test]
    fn small_guest_has_one_range() {
        let ram = create_guest_memory(64 << 20, HugePages::Off).unwrap();
        assert_eq!(ram.memory().num_regions(), 1);
        assert_eq!(e820_map(64 << 20).len(), 3);
    }

    #[test]
    fn host_and_guest_addresses_agree_modulo_2_mib() {
        // Below and above the 32-bit MMIO hole.
        for mib in [64, 3072 + 64] {
            let ram = create_guest_memory(mib << 20, HugePages::Off).unwrap();
            let mut bytes = 0;
            for region in ram.memory().iter() {
                let hva = region.as_ptr() as u64;
                let gpa = region.start_addr().0;
                assert_eq!((hva ^ gpa) % HUGE_PAGE, 0, "{hva:#x} for {gpa:#x}");
                bytes += region.len();
            }
            assert_eq!(bytes, mib << 20);
            // Usable from end to end.
            let last = GuestAddress((mib << 20) - 1 + if mib > 3072 { 1 << 30 } else { 0 });
            ram.memory().write_obj(0xa5u8, last).unwrap();
            assert_eq!(ram.memory().read_obj::<u8>(last).unwrap(), 0xa5);
        }
    }

    /// Whether the page at `addr` is resident, from mincore(2).
    fn resident(addr: *const u8) -> bool {
        let mut vec = 0u8;
        // SAFETY: one page of a live mapping; mincore writes one byte into `vec`.
        let rc =
            unsafe { libc::mincore((addr as usize & !4095) as *mut libc::c_void, 4096, &mut vec) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        vec & 1 == 1
    }

    #[test]
    fn only_blocks_that_hold_nothing_but_zeros_are_released() {
        for (huge, block) in [(HugePages::On, HUGE_PAGE), (HugePages::Off, 4096)] {
            let ram = create_guest_memory(64 << 20, huge).unwrap();
            let mem = ram.memory();
            let at = |n: u64| GuestAddress((16 << 20) + n * block);
            // Blocks 0..4 written: data, zeros, zeros with one byte at the end, zeros.
            mem.write_slice(&vec![0x5a; block as usize], at(0)).unwrap();
            mem.write_slice(&vec![0; block as usize], at(1)).unwrap();
            mem.write_slice(&vec![0; block as usize], at(2)).unwrap();
            mem.write_obj(1u8, GuestAddress(at(3).0 - 1)).unwrap();
            mem.write_slice(&vec![0; block as usize], at(3)).unwrap();
            let host = |a: GuestAddress| mem.get_host_address(a).unwrap() as *const u8;
            for n in 0..4 {
                assert!(resident(host(at(n))), "{huge:?}: block {n} not resident");
            }
            // A range that starts inside block 0 and ends inside block 3: only whole blocks.
            let released = ram
                .release_zero_blocks(GuestAddress(at(0).0 + 8), 3 * block + 8)
                .unwrap();
            assert_eq!(
                released, block,
                "{huge:?}: only block 1 is all zeros and whole"
            );
            assert!(resident(host(at(0))), "{huge:?}: data released");
            assert!(!resident(host(at(1))), "{huge:?}: zeros kept");
            assert!(
                resident(host(at(2))),
                "{huge:?}: the non-zero byte's block released"
            );
            assert!(
                resident(host(at(3))),
                "{huge:?}: block 3 is only partly in the range"
            );
            assert_eq!(mem.read_obj::<u64>(at(1)).unwrap(), 0);
            assert_eq!(mem.read_obj::<u8>(GuestAddress(at(3).0 - 1)).unwrap(), 1);
            assert_eq!(mem.read_obj::<u8>(at(0)).unwrap(), 0x5a);
        }
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
