//! Device buses for port I/O and MMIO, keyed by address ranges.
//!
//! A [`Bus`] maps non-overlapping [`BusRange`]s to devices implementing [`BusDevice`]. An
//! access is routed to the device whose range holds every byte of it, with the offset from
//! the range's base. An access no device claims behaves as on a PC with nothing decoding the
//! address: a read returns all ones and a write is dropped. Such accesses are logged at debug
//! level and counted by the caller ([`crate::dispatch::ExitStats`]), since a guest probing for
//! absent hardware is normal.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// Errors from registering devices on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A range of length zero, or one that runs past the end of the address space.
    #[error("invalid {space} range: base {base:#x}, length {len:#x}")]
    InvalidRange {
        /// The address space.
        space: AddressSpace,
        /// The requested base.
        base: u64,
        /// The requested length.
        len: u64,
    },
    /// The range overlaps one that is already registered.
    #[error("{space} range {new} overlaps the registered range {existing}")]
    Overlap {
        /// The address space.
        space: AddressSpace,
        /// The range being inserted.
        new: BusRange,
        /// The registered range it collides with.
        existing: BusRange,
    },
}

/// A `Result` alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Which address space a bus decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressSpace {
    /// x86 port I/O: 64 KiB of ports.
    Pio,
    /// Memory-mapped I/O: guest physical addresses.
    Mmio,
}

impl AddressSpace {
    /// One past the last valid address.
    fn end(self) -> u128 {
        match self {
            AddressSpace::Pio => 1 << 16,
            AddressSpace::Mmio => 1 << 64,
        }
    }
}

impl fmt::Display for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressSpace::Pio => "port I/O",
            AddressSpace::Mmio => "MMIO",
        })
    }
}

/// A half-open address range `[base, base + len)`, `len > 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BusRange {
    base: u64,
    len: u64,
}

impl BusRange {
    /// The first address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The number of addresses.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a range is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// One past the last address, as `u128` so that a range ending at `2^64` is representable.
    fn end(&self) -> u128 {
        u128::from(self.base) + u128::from(self.len)
    }

    /// Whether `[addr, addr + size)` lies entirely within this range.
    fn holds(&self, addr: u64, size: usize) -> bool {
        addr >= self.base && u128::from(addr) + size as u128 <= self.end()
    }

    fn overlaps(&self, other: &BusRange) -> bool {
        u128::from(self.base) < other.end() && u128::from(other.base) < self.end()
    }
}

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.base, self.end())
    }
}

/// A device on a bus.
///
/// Methods take `&mut self`: the bus holds each device behind a mutex, so a device needs no
/// locking of its own even when several vCPUs access it. `offset` is relative to the base of
/// the range the device was registered at; `data.len()` is the access size (1, 2, 4 or 8 for
/// instructions; a string PIO instruction arrives as one access of `count * size` bytes).
pub trait BusDevice: Send {
    /// A guest read: fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Whether a device claimed an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A device handled it.
    Claimed,
    /// No device's range holds the whole access: a read returned all ones, a write was dropped.
    Unclaimed,
}

struct Slot {
    len: u64,
    device: SharedDevice,
}

/// Devices keyed by the address ranges they decode in one address space.
pub struct Bus {
    space: AddressSpace,
    devices: BTreeMap<u64, Slot>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("space", &self.space)
            .field("ranges", &self.ranges().collect::<Vec<_>>())
            .finish()
    }
}

impl Bus {
    /// An empty bus for `space`.
    pub fn new(space: AddressSpace) -> Self {
        Bus {
            space,
            devices: BTreeMap::new(),
        }
    }

    /// The address space this bus decodes.
    pub fn space(&self) -> AddressSpace {
        self.space
    }

    /// The registered ranges in address order.
    pub fn ranges(&self) -> impl Iterator<Item = BusRange> + '_ {
        self.devices.iter().map(|(&base, slot)| BusRange {
            base,
            len: slot.len,
        })
    }

    /// Registers `device` for `[base, base + len)`. Refuses an empty range, one past the end
    /// of the address space, and one that overlaps a registered range.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use vcpu_runner::bus::Error;
    /// use vcpu_runner::{BusDevice, Buses};
    ///
    /// struct Nop;
    /// impl BusDevice for Nop {
    ///     fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
    ///     fn write(&mut self, _offset: u64, _data: &[u8]) {}
    /// }
    ///
    /// let mut buses = Buses::new();
    /// buses.pio.insert(0x3f8, 8, Arc::new(Mutex::new(Nop)))?;
    /// let overlap = buses.pio.insert(0x3fc, 8, Arc::new(Mutex::new(Nop)));
    /// assert!(matches!(overlap, Err(Error::Overlap { .. })));
    /// let past_the_end = buses.pio.insert(0xfff0, 0x20, Arc::new(Mutex::new(Nop)));
    /// assert!(matches!(past_the_end, Err(Error::InvalidRange { .. })));
    /// # Ok::<(), Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRange`] for an empty range or one past the end of the space;
    /// [`Error::Overlap`] naming the registered range it overlaps.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<BusRange> {
        let range = BusRange { base, len };
        if len == 0 || range.end() > self.space.end() {
            return Err(Error::InvalidRange {
                space: self.space,
                base,
                len,
            });
        }
        // Only the closest range starting below the new end can overlap: ranges on the bus
        // are disjoint, so any earlier one ends before that one starts.
        let end = range.end();
        let below_end = if end > u128::from(u64::MAX) {
            self.devices.range(..).next_back()
        } else {
            self.devices.range(..end as u64).next_back()
        };
        if let Some((&other_base, slot)) = below_end {
            let existing = BusRange {
                base: other_base,
                len: slot.len,
            };
            if existing.overlaps(&range) {
                return Err(Error::Overlap {
                    space: self.space,
                    new: range,
                    existing,
                });
            }
        }
        self.devices.insert(base, Slot { len, device });
        Ok(range)
    }

    /// Removes the device registered at exactly `base`, returning it.
    pub fn remove(&mut self, base: u64) -> Option<SharedDevice> {
        self.devices.remove(&base).map(|slot| slot.device)
    }

    /// The device whose range holds every byte of `[addr, addr + size)`, with its range.
    pub fn find(&self, addr: u64, size: usize) -> Option<(BusRange, &SharedDevice)> {
        let (&base, slot) = self.devices.range(..=addr).next_back()?;
        let range = BusRange {
            base,
            len: slot.len,
        };
        range.holds(addr, size).then_some((range, &slot.device))
    }

    /// Routes a guest read of `data.len()` bytes at `addr`. Unclaimed reads return all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Access {
        match self.find(addr, data.len()) {
            Some((range, device)) => {
                lock(device).read(addr - range.base, data);
                Access::Claimed
            }
            None => {
                log::debug!(
                    "{} read of {} bytes at {addr:#x}: no device, returning all ones",
                    self.space,
                    data.len()
                );
                data.fill(0xff);
                Access::Unclaimed
            }
        }
    }

    /// Routes a guest write of `data` at `addr`. Unclaimed writes are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> Access {
        match self.find(addr, data.len()) {
            Some((range, device)) => {
                lock(device).write(addr - range.base, data);
                Access::Claimed
            }
            None => {
                log::debug!(
                    "{} write of {:02x?} at {addr:#x}: no device, dropped",
                    self.space,
                    data
                );
                Access::Unclaimed
            }
        }
    }
}

/// Locks a device. A poisoned lock means an earlier access panicked inside the device; the
/// device's state is still the best there is, so use it rather than take the vCPU down too.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| {
        log::warn!("a bus device panicked during an earlier access; using it anyway");
        poisoned.into_inner()
    })
}

/// The port I/O bus and the MMIO bus of one VM, shared by its vCPUs.
#[derive(Debug)]
pub struct Buses {
    /// Port I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
}

impl Default for Buses {
    fn default() -> Self {
        Buses {
            pio: Bus::new(AddressSpace::Pio),
            mmio: Bus::new(AddressSpace::Mmio),
        }
    }
}

impl Buses {
    /// Two empty buses.
    pub fn new() -> Self {
        Self::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A device that records writes and answers reads with its offset and a fill byte.
    #[derive(Default)]
    pub(crate) struct Recorder {
        pub(crate) writes: Vec<(u64, Vec<u8>)>,
        pub(crate) reads: Vec<(u64, usize)>,
        pub(crate) fill: u8,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.reads.push((offset, data.len()));
            data.fill(self.fill);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    pub(crate) fn recorder(fill: u8) -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder {
            fill,
            ..Default::default()
        }))
    }

    #[test]
    fn routes_with_offsets_and_answers_unclaimed_with_all_ones() {
        let mut bus = Bus::new(AddressSpace::Pio);
        let dev = recorder(0x5a);
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut data = [0u8; 1];
        assert_eq!(bus.read(0x3fd, &mut data), Access::Claimed);
        assert_eq!(data, [0x5a]);
        assert_eq!(bus.write(0x3f8, &[0x41]), Access::Claimed);
        let mut wide = [0u8; 2];
        // Straddles the end of the range: nobody decodes all of it.
        assert_eq!(bus.read(0x3ff, &mut wide), Access::Unclaimed);
        assert_eq!(wide, [0xff, 0xff]);
        assert_eq!(bus.write(0x80, &[1]), Access::Unclaimed);
        let dev = dev.lock().unwrap();
        assert_eq!(dev.reads, vec![(5, 1)]);
        assert_eq!(dev.writes, vec![(0, vec![0x41])]);
    }

    #[test]
    fn refuses_overlaps_and_invalid_ranges() {
        let mut bus = Bus::new(AddressSpace::Pio);
        bus.insert(0x10, 0x10, recorder(0)).unwrap();
        let err = bus.insert(0x18, 4, recorder(0)).unwrap_err();
        assert_eq!(
            err,
            Error::Overlap {
                space: AddressSpace::Pio,
                new: BusRange { base: 0x18, len: 4 },
                existing: BusRange {
                    base: 0x10,
                    len: 0x10
                },
            }
        );
        assert!(err.to_string().contains("overlaps"));
        assert!(matches!(
            bus.insert(0x0, 0x11, recorder(0)),
            Err(Error::Overlap { .. })
        ));
        // Adjacent on both sides is fine.
        bus.insert(0x0, 0x10, recorder(0)).unwrap();
        bus.insert(0x20, 0x10, recorder(0)).unwrap();
        assert!(matches!(
            bus.insert(0x40, 0, recorder(0)),
            Err(Error::InvalidRange { len: 0, .. })
        ));
        assert!(matches!(
            bus.insert(0xfff0, 0x20, recorder(0)),
            Err(Error::InvalidRange { .. })
        ));
        bus.insert(0xfff0, 0x10, recorder(0)).unwrap();
        assert_eq!(bus.ranges().count(), 4);
        assert!(bus.remove(0x10).is_some());
        assert!(bus.remove(0x10).is_none());
        bus.insert(0x18, 4, recorder(0)).unwrap();
        assert!(format!("{bus:?}").contains("Pio"));
    }

    #[test]
    fn mmio_range_may_end_at_the_top_of_the_address_space() {
        let mut bus = Bus::new(AddressSpace::Mmio);
        let top = bus.insert(u64::MAX - 0xfff, 0x1000, recorder(1)).unwrap();
        assert_eq!(top.to_string(), "[0xfffffffffffff000, 0x10000000000000000)");
        assert!(matches!(
            bus.insert(u64::MAX, 1, recorder(0)),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, recorder(0)),
            Err(Error::InvalidRange { .. })
        ));
        let mut data = [0u8; 8];
        assert_eq!(bus.read(u64::MAX - 7, &mut data), Access::Claimed);
        assert_eq!(data, [1; 8]);
        assert_eq!(bus.space(), AddressSpace::Mmio);
        assert!(!top.is_empty());
        assert_eq!(top.len(), 0x1000);
    }

    #[test]
    fn a_poisoned_device_still_answers() {
        let mut bus = Bus::new(AddressSpace::Mmio);
        let dev = recorder(7);
        bus.insert(0x1000, 0x10, dev.clone()).unwrap();
        let poisoner = dev.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("device bug");
        })
        .join();
        assert!(dev.is_poisoned());
        let mut data = [0u8; 4];
        assert_eq!(bus.read(0x1004, &mut data), Access::Claimed);
        assert_eq!(data, [7; 4]);
    }

    proptest! {
        /// Whatever is inserted, the registered ranges stay pairwise disjoint, an insert fails
        /// exactly when it would overlap (or is invalid), and every address is found in the
        /// one range that holds it.
        #[test]
        fn ranges_stay_disjoint_and_lookup_agrees(
            inserts in proptest::collection::vec((0u64..0x200, 0u64..0x40), 1..40),
            probes in proptest::collection::vec(0u64..0x260, 1..40),
        ) {
            let mut bus = Bus::new(AddressSpace::Pio);
            let mut model: Vec<BusRange> = Vec::new();
            for (base, len) in inserts {
                let candidate = BusRange { base, len };
                let expect_ok = len > 0 && !model.iter().any(|r| r.overlaps(&candidate));
                let got = bus.insert(base, len, recorder(0));
                prop_assert_eq!(got.is_ok(), expect_ok);
                if expect_ok {
                    model.push(candidate);
                }
            }
            let ranges: Vec<_> = bus.ranges().collect();
            for (i, a) in ranges.iter().enumerate() {
                for b in &ranges[i + 1..] {
                    prop_assert!(!a.overlaps(b));
                }
            }
            for addr in probes {
                let expected = model.iter().find(|r| r.holds(addr, 1)).copied();
                prop_assert_eq!(bus.find(addr, 1).map(|(r, _)| r), expected);
            }
        }
    }
}
