//! The boot profile (`boot --profile`): where a boot's time and memory go.
//!
//! At exit it reports
//! * the process's age when `main` started (from `/proc/self/stat`, in clock ticks), and from
//!   there the time each build step ended, the first `KVM_RUN` of every vCPU, the guest's first
//!   console byte, and the end of the run;
//! * per vCPU, every exit by kind and port/MMIO address/MSR index with counts, the time the
//!   VMM spent handling them and the time spent in `KVM_RUN` before them (vcpu-runner's
//!   [`ExitProfile`]);
//! * the resident memory at exit from `/proc/self/smaps`, split into guest RAM and the rest
//!   (the VMM's own overhead), with the largest other mappings, and the peak (`VmHWM`).

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vcpu_runner::profile::{ExitProfile, ProfileSlot};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Rows of the exit table per vCPU.
const EXIT_ROWS: usize = 25;
/// Non-guest mappings listed by size.
const MAPPING_ROWS: usize = 8;

/// A boot profile being collected; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct BootProfile(Arc<Inner>);

/// A build step: where it began (`None`: where the previous sequential step ended) and ended.
#[derive(Debug, Clone, Copy)]
struct Step {
    name: &'static str,
    began: Option<Instant>,
    ended: Instant,
}

#[derive(Debug)]
struct Inner {
    started: Instant,
    age_at_start: Option<Duration>,
    steps: Mutex<Vec<Step>>,
    vcpus: Mutex<Vec<ProfileSlot>>,
    first_console_byte: OnceLock<Option<Instant>>,
    ended: OnceLock<Instant>,
    memory: OnceLock<Result<MemorySplit, String>>,
}

impl BootProfile {
    /// A profile whose times count from `started` (`main`'s first instant).
    pub fn new(started: Instant) -> Self {
        BootProfile(Arc::new(Inner {
            started,
            age_at_start: process_age(),
            steps: Mutex::new(Vec::new()),
            vcpus: Mutex::new(Vec::new()),
            first_console_byte: OnceLock::new(),
            ended: OnceLock::new(),
            memory: OnceLock::new(),
        }))
    }

    /// Notes that build step `step` ended now.
    pub fn step_done(&self, step: &'static str) {
        lock(&self.0.steps).push(Step {
            name: step,
            began: None,
            ended: Instant::now(),
        });
    }

    /// Records that `step`, which ran beside the sequential ones (on a thread of its own), began
    /// at `began` and ended now.
    pub fn parallel_step_done(&self, step: &'static str, began: Instant) {
        lock(&self.0.steps).push(Step {
            name: step,
            began: Some(began),
            ended: Instant::now(),
        });
    }

    /// A new slot for the next vCPU's exit profile.
    pub fn vcpu_slot(&self) -> ProfileSlot {
        let slot = ProfileSlot::default();
        lock(&self.0.vcpus).push(slot.clone());
        slot
    }

    /// Records the end of the run: the console's first byte and the memory at this moment
    /// (guest RAM still mapped). Only the first call counts.
    pub fn finish(&self, first_console_byte: Option<Instant>, memory: &GuestMemoryMmap) {
        let _ = self.0.ended.set(Instant::now());
        let _ = self.0.first_console_byte.set(first_console_byte);
        let guest: Vec<Range<u64>> = memory
            .iter()
            .map(|r| {
                let start = r.as_ptr() as u64;
                start..start + r.len()
            })
            .collect();
        let split = std::fs::read_to_string("/proc/self/smaps")
            .map_err(|e| format!("cannot read /proc/self/smaps: {e}"))
            .map(|smaps| {
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                MemorySplit::from_smaps(&smaps, &guest, &status)
            });
        let _ = self.0.memory.set(split);
    }

    /// The vCPUs' exit profiles, in vCPU order (`None` for a vCPU that published none).
    pub fn exit_profiles(&self) -> Vec<Option<ExitProfile>> {
        lock(&self.0.vcpus)
            .iter()
            .map(|slot| lock(slot).clone())
            .collect()
    }

    /// The memory split taken by [`BootProfile::finish`].
    pub fn memory(&self) -> Option<&Result<MemorySplit, String>> {
        self.0.memory.get()
    }

    fn since_start(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.0.started).as_secs_f64() * 1e3
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How old this process is now: `CLOCK_BOOTTIME` minus the start time in `/proc/self/stat`
/// (field 22, clock ticks since boot). `None` where either cannot be read.
pub fn process_age() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let start_ticks = stat_start_ticks(&stat)?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return None;
    }
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) } != 0 {
        return None;
    }
    let now = Duration::new(now.tv_sec as u64, now.tv_nsec as u32);
    let start = Duration::from_secs_f64(start_ticks as f64 / hz as f64);
    Some(now.saturating_sub(start))
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line; the command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
fn stat_start_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields 3.. follow; starttime is the 20th of them.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// Resident memory at one moment, split between guest RAM and everything else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemorySplit {
    /// Resident KiB inside guest RAM mappings.
    pub guest_rss_kib: u64,
    /// Guest RAM mapped, KiB.
    pub guest_mapped_kib: u64,
    /// Of the guest's resident KiB, those in transparent huge pages.
    pub guest_huge_kib: u64,
    /// Resident KiB outside guest RAM: the VMM's own overhead.
    pub other_rss_kib: u64,
    /// The largest other mappings: (name or address range, resident KiB), largest first.
    pub largest_other: Vec<(String, u64)>,
    /// `VmHWM` of `/proc/self/status`: the peak resident set, KiB.
    pub peak_rss_kib: Option<u64>,
}

impl MemorySplit {
    /// Splits `smaps` (the text of `/proc/<pid>/smaps`) by whether a mapping overlaps one of
    /// the `guest` host-address ranges; `status` is `/proc/<pid>/status` for `VmHWM`.
    pub fn from_smaps(smaps: &str, guest: &[Range<u64>], status: &str) -> Self {
        let mut split = MemorySplit::default();
        let mut others: Vec<(String, u64)> = Vec::new();
        let mut current: Option<(String, bool, u64)> = None;
        let mut finish = |m: Option<(String, bool, u64)>, split: &mut MemorySplit| {
            if let Some((name, false, rss)) = m {
                split.other_rss_kib += rss;
                others.push((name, rss));
            }
        };
        for line in smaps.lines() {
            if let Some((range, name)) = mapping_header(line) {
                finish(current.take(), &mut split);
                // Guest RAM sits inside a slightly larger mapping (aligned to 2 MiB, see
                // `memory::GuestRam`): a mapping that overlaps it counts as guest RAM.
                let overlap: u64 = guest
                    .iter()
                    .map(|g| {
                        range
                            .end
                            .min(g.end)
                            .saturating_sub(range.start.max(g.start))
                    })
                    .sum();
                let in_guest = overlap > 0;
                split.guest_mapped_kib += overlap / 1024;
                current = Some((name, in_guest, 0));
                continue;
            }
            let Some((field, kib)) = kib_field(line) else {
                continue;
            };
            match (&mut current, field) {
                (Some((_, in_guest, rss)), "Rss") => {
                    *rss += kib;
                    if *in_guest {
                        split.guest_rss_kib += kib;
                    }
                }
                (Some((_, true, _)), "AnonHugePages") => split.guest_huge_kib += kib,
                _ => {}
            }
        }
        finish(current.take(), &mut split);
        // Mappings of one file or kind are summed under its name.
        others.sort_by(|a, b| a.0.cmp(&b.0));
        others.dedup_by(|next, kept| {
            if next.0 == kept.0 {
                kept.1 += next.1;
                true
            } else {
                false
            }
        });
        others.retain(|o| o.1 > 0);
        others.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        others.truncate(MAPPING_ROWS);
        split.largest_other = others;
        split.peak_rss_kib = status
            .lines()
            .filter_map(kib_field)
            .find(|(f, _)| *f == "VmHWM")
            .map(|(_, kib)| kib);
        split
    }
}

/// `start-end perms offset dev inode [name]` → the range and a name (`[anon]` when none).
fn mapping_header(line: &str) -> Option<(Range<u64>, String)> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    if perms.len() != 4 {
        return None;
    }
    let name = fields
        .nth(3)
        .map_or_else(|| "[anon]".to_owned(), str::to_owned);
    Some((start..end, name))
}

/// `Name:   123 kB` → (`Name`, 123).
fn kib_field(line: &str) -> Option<(&str, u64)> {
    let (field, rest) = line.split_once(':')?;
    let value = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some((field, value))
}

impl fmt::Display for BootProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |t: Instant| self.since_start(t);
        writeln!(f, "boot profile (times in ms from main())")?;
        match self.0.age_at_start {
            Some(age) => writeln!(
                f,
                "  process start -> main: {:.0} (clock-tick resolution)",
                age.as_secs_f64() * 1e3
            )?,
            None => writeln!(f, "  process start -> main: unknown")?,
        }
        let mut steps = lock(&self.0.steps).clone();
        steps.sort_by_key(|s| s.ended);
        let mut previous = self.0.started;
        for step in steps {
            let began = step.began.unwrap_or(previous);
            writeln!(
                f,
                "  {:<28} done at {:>9.3}  ({:.3}{})",
                step.name,
                ms(step.ended),
                step.ended.saturating_duration_since(began).as_secs_f64() * 1e3,
                if step.began.is_some() {
                    ", in parallel"
                } else {
                    ""
                }
            )?;
            if step.began.is_none() {
                previous = step.ended;
            }
        }
        let profiles = self.exit_profiles();
        for (index, profile) in profiles.iter().enumerate() {
            match profile.as_ref().and_then(ExitProfile::first_run) {
                Some(t) => writeln!(f, "  vCPU {index} first KVM_RUN       at {:>9.3}", ms(t))?,
                None => writeln!(f, "  vCPU {index} never ran")?,
            }
        }
        match self.0.first_console_byte.get().copied().flatten() {
            Some(t) => writeln!(f, "  first console byte          at {:>9.3}", ms(t))?,
            None => writeln!(f, "  no console output")?,
        }
        if let Some(t) = self.0.ended.get() {
            writeln!(f, "  VM stopped                  at {:>9.3}", ms(*t))?;
        }
        match self.memory() {
            Some(Ok(m)) => {
                let mib = |kib: u64| kib as f64 / 1024.0;
                writeln!(
                    f,
                    "  memory at exit: guest RAM resident {:.1} of {:.1} MiB mapped ({:.1} MiB in huge pages); \
                     VMM outside guest RAM {:.1} MiB; peak RSS {}",
                    mib(m.guest_rss_kib),
                    mib(m.guest_mapped_kib),
                    mib(m.guest_huge_kib),
                    mib(m.other_rss_kib),
                    m.peak_rss_kib
                        .map_or_else(|| "unknown".to_owned(), |k| format!("{:.1} MiB", mib(k)))
                )?;
                for (name, kib) in &m.largest_other {
                    writeln!(f, "    {:>8} KiB  {name}", kib)?;
                }
            }
            Some(Err(e)) => writeln!(f, "  memory at exit: {e}")?,
            None => {}
        }
        for (index, profile) in profiles.iter().enumerate() {
            if let Some(p) = profile {
                writeln!(f, "  vCPU {index} exits:")?;
                for line in format!("{p:.EXIT_ROWS$}").lines() {
                    writeln!(f, "    {line}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d000000000-55d000100000 r-xp 00000000 08:01 1234                       /usr/bin/vmm-reference
Size:               1024 kB
Rss:                 600 kB
AnonHugePages:         0 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0 
Size:             262144 kB
Rss:               81920 kB
AnonHugePages:     40960 kB
7f0010000000-7f0010200000 rw-p 00000000 00:00 0 
Size:               2048 kB
Rss:                 300 kB
7f0020000000-7f0020100000 r-xp 00000000 08:01 99   /usr/lib/libc.so.6
Rss:                 700 kB
7f0020100000-7f0020200000 r--p 00100000 08:01 99   /usr/lib/libc.so.6
Rss:                  50 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  12 kB
VmFlags: rd wr mr mw me gd ac
";

    #[test]
    fn smaps_split_between_guest_and_vmm() {
        // Inside the mapping 7f0000000000-7f0010000000, as `GuestRam` places it.
        let guest = vec![Range {
            start: 0x7f00_0010_0000,
            end: 0x7f00_0ff0_0000,
        }];
        let status = "Name:\tvmm-reference\nVmHWM:\t   90000 kB\nVmRSS:\t   83000 kB\n";
        let m = MemorySplit::from_smaps(SMAPS, &guest, status);
        assert_eq!(m.guest_rss_kib, 81920);
        assert_eq!(m.guest_mapped_kib, 262_144 - 2048);
        assert_eq!(m.guest_huge_kib, 40960);
        assert_eq!(m.other_rss_kib, 600 + 300 + 700 + 50 + 12);
        assert_eq!(
            m.largest_other,
            vec![
                ("/usr/lib/libc.so.6".to_owned(), 750),
                ("/usr/bin/vmm-reference".to_owned(), 600),
                ("[anon]".to_owned(), 300),
                ("[stack]".to_owned(), 12),
            ]
        );
        assert_eq!(m.peak_rss_kib, Some(90000));
    }

    #[test]
    fn smaps_without_guest_ranges_is_all_vmm() {
        let m = MemorySplit::from_smaps(SMAPS, &[], "");
        assert_eq!(m.guest_rss_kib, 0);
        assert_eq!(m.other_rss_kib, 600 + 81920 + 300 + 700 + 50 + 12);
        assert_eq!(m.peak_rss_kib, None);
    }

    #[test]
    fn stat_start_time_after_a_strange_command_name() {
        let stat =
            "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 1000 200";
        assert_eq!(stat_start_ticks(stat), Some(987_654));
        assert_eq!(stat_start_ticks("garbage"), None);
    }

    #[test]
    fn own_process_age_is_known_and_small() {
        let age = process_age().expect("/proc/self/stat and CLOCK_BOOTTIME");
        assert!(age < Duration::from_secs(24 * 3600), "{age:?}");
    }

    #[test]
    fn report_lists_steps_vcpus_console_and_memory() {
        let p = BootProfile::new(Instant::now());
        let loader = Instant::now();
        std::thread::sleep(Duration::from_millis(4));
        p.step_done("create_vm");
        p.parallel_step_done("load_kernel", loader);
        let slot = p.vcpu_slot();
        let mut exits = ExitProfile::default();
        exits.entering(Instant::now());
        exits.record(
            vcpu_runner::profile::ExitKey::PortWrite(0x3f8),
            Duration::from_micros(5),
            Duration::from_micros(2),
        );
        *slot.lock().unwrap() = Some(exits);
        p.vcpu_slot(); // a vCPU that never published
        let mem =
            crate::memory::create_guest_memory(16 << 20, crate::memory::HugePages::Off).unwrap();
        p.finish(Some(Instant::now()), mem.memory());
        let text = p.to_string();
        for needle in [
            "process start -> main",
            "create_vm",
            ", in parallel)",
            "vCPU 0 first KVM_RUN",
            "vCPU 1 never ran",
            "first console byte",
            "memory at exit: guest RAM resident 0.0 of 16.0 MiB",
            "pio write 0x03f8",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in\n{text}");
        }
        // A parallel step's time counts from its own start, not from the step listed before.
        let line = text.lines().find(|l| l.contains("load_kernel")).unwrap();
        let took: f64 = line
            .rsplit_once('(')
            .and_then(|(_, t)| t.split_once(','))
            .and_then(|(t, _)| t.parse().ok())
            .unwrap_or_else(|| panic!("no time in {line:?}"));
        assert!(took >= 4.0, "{line:?}");
    }
}
