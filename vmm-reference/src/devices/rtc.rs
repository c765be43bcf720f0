//! A CMOS real-time clock (MC146818) at ports 0x70/0x71 that reads the host's UTC time.
//!
//! A Linux guest that finds no CMOS RTC spends seconds probing for it (QEMU `-M microvm`
//! without `rtc=on` reached init about 6 s later). This device answers the time registers in
//! BCD, 24-hour mode, never reports an update in progress, and keeps the other 114 bytes of
//! CMOS RAM as plain storage. Writes to the time registers are accepted and ignored: the
//! guest cannot set the host's clock.

use std::time::{SystemTime, UNIX_EPOCH};

use vcpu_runner::BusDevice;

/// Register indices (MC146818 datasheet).
const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;
/// Status A: 32.768 kHz time base, 1024 Hz rate, update not in progress.
const STATUS_A_VALUE: u8 = 0x26;
/// Status B: 24-hour mode, BCD.
const STATUS_B_VALUE: u8 = 0x02;
/// Status D: valid RAM and time.
const STATUS_D_VALUE: u8 = 0x80;
/// The index port's low 7 bits select the register; bit 7 masks NMIs.
const INDEX_MASK: u8 = 0x7f;

/// A calendar date and time in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    /// Full year.
    pub year: u32,
    /// 1..=12.
    pub month: u32,
    /// 1..=31.
    pub day: u32,
    /// 0..=23.
    pub hour: u32,
    /// 0..=59.
    pub minute: u32,
    /// 0..=59.
    pub second: u32,
    /// 1 = Sunday .. 7 = Saturday, as the RTC counts.
    pub weekday: u32,
}

impl DateTime {
    /// The UTC date and time `secs` seconds after 1970-01-01 (proleptic Gregorian calendar).
    pub fn from_unix(secs: u64) -> Self {
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        // Civil-from-days (H. Hinnant): era-based conversion valid for all u64 inputs here.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        DateTime {
            year: year as u32,
            month: month as u32,
            day: day as u32,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
            // 1970-01-01 was a Thursday (5 in 1 = Sunday numbering).
            weekday: ((days + 4).rem_euclid(7) + 1) as u32,
        }
    }
}

fn bcd(v: u32) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// The CMOS RTC and its RAM.
#[derive(Debug)]
pub struct CmosRtc {
    index: u8,
    ram: [u8; 128],
    now: fn() -> u64,
}

fn host_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Default for CmosRtc {
    fn default() -> Self {
        Self::with_clock(host_now)
    }
}

impl CmosRtc {
    /// An RTC reading the host clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// An RTC reading `now` (seconds since the epoch), for tests.
    pub fn with_clock(now: fn() -> u64) -> Self {
        CmosRtc {
            index: 0,
            ram: [0; 128],
            now,
        }
    }

    /// The value of register `index`.
    pub fn register(&self, index: u8) -> u8 {
        let t = DateTime::from_unix((self.now)());
        match index {
            SECONDS => bcd(t.second),
            MINUTES => bcd(t.minute),
            HOURS => bcd(t.hour),
            WEEKDAY => bcd(t.weekday),
            DAY => bcd(t.day),
            MONTH => bcd(t.month),
            YEAR => bcd(t.year % 100),
            CENTURY => bcd(t.year / 100),
            STATUS_A => STATUS_A_VALUE,
            STATUS_B => STATUS_B_VALUE,
            STATUS_C => 0,
            STATUS_D => STATUS_D_VALUE,
            other => self.ram[usize::from(other & INDEX_MASK)],
        }
    }
}

impl BusDevice for CmosRtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index,
            _ => self.register(self.index),
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 => self.index = value & INDEX_MASK,
            _ => match self.index {
                SECONDS..=STATUS_D | CENTURY => {}
                i => self.ram[usize::from(i)] = value,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_dates() {
        let t = DateTime::from_unix(0);
        assert_eq!((t.year, t.month, t.day, t.weekday), (1970, 1, 1, 5));
        // 2024-02-29 12:34:56 UTC, a Thursday.
        let t = DateTime::from_unix(1_709_210_096);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2024, 2, 29, 12, 34, 56, 5)
        );
    }

    #[test]
    fn registers_through_the_ports() {
        let mut rtc = CmosRtc::with_clock(|| 1_709_210_096);
        let read = |rtc: &mut CmosRtc, index: u8| {
            rtc.write(0, &[index | 0x80]);
            let mut d = [0u8; 1];
            rtc.read(1, &mut d);
            d[0]
        };
        assert_eq!(read(&mut rtc, YEAR), 0x24);
        assert_eq!(read(&mut rtc, CENTURY), 0x20);
        assert_eq!(read(&mut rtc, HOURS), 0x12);
        assert_eq!(read(&mut rtc, STATUS_A) & 0x80, 0);
        assert_eq!(read(&mut rtc, STATUS_D), STATUS_D_VALUE);
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0xab]);
        assert_eq!(read(&mut rtc, 0x40), 0xab);
        rtc.write(0, &[SECONDS]);
        rtc.write(1, &[0x99]);
        assert_eq!(read(&mut rtc, SECONDS), 0x56);
        let mut idx = [0u8];
        rtc.read(0, &mut idx);
        assert_eq!(idx[0], SECONDS);
    }

    proptest! {
        #[test]
        fn fields_in_range(secs in 0u64..(1u64 << 36)) {
            let t = DateTime::from_unix(secs);
            prop_assert!((1..=12).contains(&t.month) && (1..=31).contains(&t.day));
            prop_assert!(t.hour < 24 && t.minute < 60 && t.second < 60);
            prop_assert!((1..=7).contains(&t.weekday));
            let next = DateTime::from_unix(secs + 86_400);
            prop_assert_eq!(next.weekday, t.weekday % 7 + 1);
        }
    }
}
