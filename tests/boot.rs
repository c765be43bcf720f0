//! End-to-end tests of the `vmm-reference` binary.
//!
//! * Bad input (runs anywhere, no KVM): each case must end with exit status 2, a specific
//!   message, and no panic.
//! * Boots in the nested real-KVM host (`cargo xtask nested`): one L1 boot runs every scenario
//!   in turn — the Debian bzImage with 1 and 2 vCPUs, a reboot, and the ELF vmlinux extracted
//!   from the bzImage through its PVH note — and each test checks its scenario's marker line,
//!   CPU count, message and exit status. Skipped (ignored, with the reason) only where
//!   `qemu-system-x86_64` is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use libtest_mimic::{Arguments, Failed, Trial};

const MARKER: &str = "VMM-REFERENCE-BOOT-OK";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// Builds the binary once (this test package cannot name another package's binary).
fn vmm_bin() -> Result<PathBuf, Failed> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "vmm-reference"])
            .current_dir(workspace())
            .status()
            .map_err(|e| format!("cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build -p vmm-reference: {status}"));
        }
        Ok(target_dir().join("debug/vmm-reference"))
    })
    .clone()
    .map_err(Failed::from)
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmmref-boot-tests-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Result<Output, Failed> {
    Command::new(vmm_bin()?)
        .args(args)
        .output()
        .map_err(|e| Failed::from(format!("running vmm-reference: {e}")))
}

/// Runs `boot` with `args` and checks status 2, `expected` in stderr and no panic.
fn expect_usage_error(args: &[&str], expected: &str) -> Result<(), Failed> {
    let out = run(args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("panicked") {
        return Err(format!("panic: {stderr}").into());
    }
    if out.status.code() != Some(2) {
        return Err(format!("exit {:?}, want 2; stderr: {stderr}", out.status.code()).into());
    }
    if !stderr.contains(expected) {
        return Err(format!("stderr lacks {expected:?}: {stderr}").into());
    }
    Ok(())
}

/// Runs `args` and checks status 2 and that stderr ends with exactly the line
/// `vmm-reference: error: {message}`.
fn expect_usage_error_line(args: &[&str], message: &str) -> Result<(), Failed> {
    let out = run(args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(2) {
        return Err(format!("exit {:?}, want 2; stderr: {stderr}", out.status.code()).into());
    }
    let want = format!("vmm-reference: error: {message}");
    match stderr.lines().last() {
        Some(last) if last == want => Ok(()),
        _ => Err(format!("stderr's last line is not {want:?}: {stderr}").into()),
    }
}

/// A file that looks like a bzImage header whose size fields promise more than the file holds.
fn truncated_bzimage() -> PathBuf {
    let mut b = vec![0u8; 0x1000];
    b[0x1f1] = 1; // setup_sects
    b[0x1f4..0x1f8].copy_from_slice(&0x10000u32.to_le_bytes()); // syssize: 1 MiB
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x211] = 1; // loadflags: LOADED_HIGH
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start: 1 MiB
    b[0x236] = 1; // XLF_KERNEL_64
    let p = scratch().join("truncated-bzImage");
    std::fs::write(&p, b).unwrap();
    p
}

fn small_valid_kernel() -> PathBuf {
    // Complete as its header describes: (1 + 1) * 512 + 0x10 * 16 bytes.
    let mut b = vec![0u8; 1024 + 256];
    b[0x1f1] = 1;
    b[0x1f4..0x1f8].copy_from_slice(&0x10u32.to_le_bytes());
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x211] = 1; // loadflags: LOADED_HIGH
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start: 1 MiB
    b[0x236] = 1; // XLF_KERNEL_64
    let p = scratch().join("small-bzImage");
    std::fs::write(&p, b).unwrap();
    p
}

/// A complete bzImage header whose kernel decompresses at `pref_address` and needs
/// `init_size` bytes from there.
fn kernel_with_init_size(pref_address: u64, init_size: u32) -> PathBuf {
    let mut b = std::fs::read(small_valid_kernel()).unwrap();
    b[0x258..0x260].copy_from_slice(&pref_address.to_le_bytes());
    b[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
    let p = scratch().join(format!("bzImage-{pref_address:x}-{init_size:x}"));
    std::fs::write(&p, b).unwrap();
    p
}

/// On a host whose `/dev/kvm` is backed by kvm_pvm (no VMX/SVM), `boot` must say so and end
/// instead of starting a guest that never shows anything. Ignored, with the reason, on a host
/// with kvm_intel or kvm_amd (there the guest boots) or without KVM.
fn software_kvm_trial() -> Trial {
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    let pvm = module("kvm_pvm") && !module("kvm_intel") && !module("kvm_amd");
    let trial = Trial::test("host::kvm_pvm_refuses_with_a_clear_error", || {
        let k = small_valid_kernel();
        let mut child = Command::new(vmm_bin()?)
            .args(["boot", "--kernel", k.to_str().unwrap(), "--mem-mib", "256"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        let start = std::time::Instant::now();
        while child.try_wait().map_err(|e| e.to_string())?.is_none() {
            if start.elapsed() > std::time::Duration::from_secs(30) {
                let _ = child.kill();
                return Err("still running after 30 s on a kvm_pvm host".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want = "vmm-reference: error: cannot boot a Linux guest here: this host's /dev/kvm \
                    is backed by kvm_pvm, which cannot run a stock Linux kernel";
        if out.status.code() != Some(4) || !stderr.contains(want) {
            return Err(format!("exit {:?}, stderr: {stderr}", out.status.code()).into());
        }
        Ok(())
    });
    if pvm {
        trial
    } else {
        trial.with_ignored_flag(true)
    }
}

fn bad_input_trials() -> Vec<Trial> {
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    vec![
        Trial::test("bad_input::missing_kernel", || {
            expect_usage_error(
                &["boot", "--kernel", "/nonexistent/bzImage"],
                "cannot open the file",
            )
        }),
        Trial::test("bad_input::truncated_kernel", move || {
            expect_usage_error(
                &["boot", "--kernel", &s(truncated_bzimage())],
                "is truncated",
            )
        }),
        Trial::test("bad_input::non_kernel_file", || {
            let p = scratch().join("not-a-kernel");
            std::fs::write(&p, vec![0x42u8; 8192]).unwrap();
            expect_usage_error(
                &["boot", "--kernel", p.to_str().unwrap()],
                "is not a kernel",
            )
        }),
        Trial::test("bad_input::initramfs_larger_than_memory", || {
            let p = scratch().join("big-initramfs");
            let f = std::fs::File::create(&p).unwrap();
            f.set_len(65 << 20).unwrap(); // sparse, 65 MiB
            let k = small_valid_kernel();
            expect_usage_error(
                &[
                    "boot",
                    "--kernel",
                    k.to_str().unwrap(),
                    "--initramfs",
                    p.to_str().unwrap(),
                    "--mem-mib",
                    "64",
                ],
                "is larger than guest memory",
            )
        }),
        Trial::test("bad_input::too_little_memory", || {
            let k = small_valid_kernel();
            expect_usage_error(
                &["boot", "--kernel", k.to_str().unwrap(), "--mem-mib", "16"],
                "too little memory: 16 MiB",
            )
        }),
        Trial::test("bad_input::unknown_config_key", || {
            let p = scratch().join("config.json");
            std::fs::write(&p, r#"{"kernel": "/k", "vcpu": 2}"#).unwrap();
            expect_usage_error(
                &["boot", "--config", p.to_str().unwrap()],
                "unknown field `vcpu`",
            )
        }),
        Trial::test("bad_input::zero_vcpus", || {
            let k = small_valid_kernel();
            expect_usage_error(
                &["boot", "--kernel", k.to_str().unwrap(), "--vcpus", "0"],
                "vcpus must be at least 1",
            )
        }),
        Trial::test("bad_input::too_many_vcpus", || {
            let k = small_valid_kernel();
            expect_usage_error(
                &["boot", "--kernel", k.to_str().unwrap(), "--vcpus", "33"],
                "too many vcpus: 33 requested",
            )
        }),
        Trial::test(
            "bad_input::memory_below_what_the_kernel_header_asks",
            || {
                // The Debian 6.1 cloud kernel's header: decompressed at pref_address 16 MiB,
                // init_size 0x3378000; 32 MiB to run on top: 99.47 MiB, so at least 100 MiB.
                let k = kernel_with_init_size(0x100_0000, 0x337_8000);
                let min = (0x100_0000u64 + 0x337_8000 + (32 << 20)).div_ceil(1 << 20);
                assert_eq!(min, 100);
                expect_usage_error(
                    &["boot", "--kernel", k.to_str().unwrap(), "--mem-mib", "64"],
                    &format!(
                    "too little memory for this kernel and initramfs: 64 MiB, at least {min} MiB \
                     needed"
                ),
                )
            },
        ),
        Trial::test("bad_input::initramfs_that_leaves_no_room_to_run", || {
            let p = scratch().join("250m-initramfs");
            let f = std::fs::File::create(&p).unwrap();
            f.set_len(250 << 20).unwrap(); // sparse
            let k = small_valid_kernel();
            // Kernel end 1 MiB + 256 bytes, page-aligned; the initramfs above it and unpacked;
            // 32 MiB to run: 533.004 MiB, so at least 534 MiB.
            let need = (1u64 << 20) + 4096 + 2 * (250 << 20) + (32 << 20);
            let min = need.div_ceil(1 << 20);
            expect_usage_error(
                &[
                    "boot",
                    "--kernel",
                    k.to_str().unwrap(),
                    "--initramfs",
                    p.to_str().unwrap(),
                    "--mem-mib",
                    "256",
                ],
                &format!("256 MiB, at least {min} MiB needed"),
            )
        }),
        Trial::test("bad_input::config_file_equals_flags", || {
            let p = scratch().join("config-ok.json");
            std::fs::write(&p, r#"{"kernel": "/nonexistent/k", "vcpus": 0}"#).unwrap();
            expect_usage_error(
                &["boot", "--config", p.to_str().unwrap()],
                "vcpus must be at least 1",
            )
        }),
        Trial::test("bad_input::bzimage_without_loaded_high", || {
            let mut b = std::fs::read(small_valid_kernel()).unwrap();
            b[0x211] = 0;
            let p = scratch().join("bzImage-not-loaded-high");
            std::fs::write(&p, b).unwrap();
            let p = p.to_str().unwrap();
            expect_usage_error_line(
                &["boot", "--kernel", p],
                &format!(
                    "kernel {p}: is not a bzImage the 64-bit boot protocol can load high: \
                     loadflags lack LOADED_HIGH"
                ),
            )
        }),
        Trial::test("bad_input::kernel_not_a_regular_file", || {
            expect_usage_error_line(
                &["boot", "--kernel", "/dev/zero"],
                "kernel /dev/zero: is not a regular file",
            )
        }),
        Trial::test("bad_input::initramfs_not_a_regular_file", || {
            let k = small_valid_kernel();
            expect_usage_error_line(
                &[
                    "boot",
                    "--kernel",
                    k.to_str().unwrap(),
                    "--initramfs",
                    "/dev/zero",
                ],
                "initramfs /dev/zero: is not a regular file",
            )
        }),
        Trial::test("bad_input::config_not_a_regular_file", || {
            expect_usage_error_line(
                &["boot", "--config", "/dev/zero"],
                "config file /dev/zero: is not a regular file",
            )
        }),
        Trial::test(
            "bad_input::config_parse_error_is_one_line_without_repeats",
            || {
                let p = scratch().join("config-bad-json.json");
                std::fs::write(&p, "{\"kernel\": ").unwrap();
                let p = p.to_str().unwrap();
                expect_usage_error_line(
                    &["boot", "--config", p],
                    &format!(
                        "invalid config file {p}: EOF while parsing a value at line 1 column 11"
                    ),
                )
            },
        ),
        Trial::test("cli::help_says_how_to_set_the_log_level", || {
            let out = run(&["--help"])?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            if out.status.code() != Some(0) || !stdout.contains("RUST_LOG sets its level") {
                return Err(format!("exit {:?}, stdout {stdout:?}", out.status.code()).into());
            }
            Ok(())
        }),
        Trial::test("cli::version", || {
            let out = run(&["--version"])?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let want = format!("vmm-reference {}\n", env!("CARGO_PKG_VERSION"));
            if out.status.code() != Some(0) || stdout != want {
                return Err(format!(
                    "exit {:?}, stdout {stdout:?}, want {want:?}",
                    out.status.code()
                )
                .into());
            }
            Ok(())
        }),
    ]
}

/// What the nested run printed, split per scenario.
struct NestedRun {
    log: String,
}

impl NestedRun {
    fn scenario(&self, name: &str) -> Result<(&str, i32), Failed> {
        let begin = format!("=== BEGIN {name}\n");
        // The last start: if the test host froze and was booted again, the script ran again
        // from its beginning, and only that run's output belongs to the scenario.
        let start = self.log.rfind(&begin).ok_or_else(|| {
            format!(
                "scenario {name} never started; log tail:\n{}",
                tail(&self.log)
            )
        })?;
        let rest = &self.log[start + begin.len()..];
        let end_tag = format!("=== END {name} rc=");
        let end = rest
            .find(&end_tag)
            .ok_or_else(|| format!("scenario {name} never ended:\n{}", tail(rest)))?;
        let rc: i32 = rest[end + end_tag.len()..]
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or("unparsable rc")?;
        Ok((&rest[..end], rc))
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<_> = s.lines().filter(|l| !l.contains("CPUID[")).collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

const SCRIPT: &str = r#"# A boot that ends in a triple fault before the guest printed its marker or a panic runs once
# more, after a RETRY line: the emulated test host triple-faults a guest now and then (see the
# README's feature table); a second one fails the scenario.
early_tf() { [ "$1" = 3 ] && grep -q "guest triple fault" /tmp/out && ! grep -q -e VMM-REFERENCE-BOOT-OK -e "Kernel panic" /tmp/out; }
run() { name=$1; shift; for try in 1 2; do echo "=== BEGIN $name"; { timeout 120 /bin/vmm-reference boot "$@" </dev/null 2>&1; echo $? >/tmp/rc; } | tee /tmp/out; rc=$(cat /tmp/rc); echo "=== END $name rc=$rc"; early_tf "$rc" || break; echo "=== RETRY $name"; done; }
C="console=ttyS0 reboot=k panic=-1 quiet"
# Linux's default restart order, without reboot=k.
D="console=ttyS0 panic=-1 quiet"
G="--kernel /data/bzImage --initramfs /data/initramfs.cpio"
run bz1 --kernel /data/bzImage --initramfs /data/initramfs.cpio --vcpus 1 --cmdline "$C"
run bz2 --kernel /data/bzImage --initramfs /data/initramfs.cpio --vcpus 2 --cmdline "$C"
run reboot --kernel /data/bzImage --initramfs /data/initramfs.cpio --vcpus 1 --cmdline "$C vmmref.end=reboot"
run pvh --kernel /data/vmlinux --initramfs /data/initramfs.cpio --vcpus 2 --cmdline "$C"
run reboot_default $G --cmdline "$D vmmref.end=reboot"
run reboot_acpi $G --cmdline "$D reboot=a vmmref.end=reboot"
run reboot_triple $G --cmdline "$D reboot=t vmmref.end=reboot"
# init exits at once: "Attempted to kill init!", a panic that restarts (panic=-1).
run panic_default $G --cmdline "$D rdinit=/bin/busybox -- false"
run panic_kbd $G --cmdline "$C rdinit=/bin/busybox -- false"
run halt $G --cmdline "$D rdinit=/bin/busybox -- halt -f"
# The least memory the VMM accepts for this kernel and initramfs boots.
out=$(/bin/vmm-reference boot $G --mem-mib 64 --cmdline "$C" 2>&1 </dev/null); echo "mem64 rc=$? $out"
min=$(echo "$out" | sed -n 's/.*at least \([0-9]*\) MiB.*/\1/p')
run mem_min $G --mem-mib "${min:-0}" --cmdline "$C"
# Input piped in at start reaches the guest's shell from its first byte.
for try in 1 2; do
  echo "=== BEGIN stdin"
  { printf 'echo INPUT-OK-$((6*7))\npoweroff -f\n' | timeout 120 /bin/vmm-reference boot $G --cmdline "$C vmmref.end=shell" 2>&1; echo $? >/tmp/rc; } | tee /tmp/out
  rc=$(cat /tmp/rc); echo "=== END stdin rc=$rc"; early_tf "$rc" || break; echo "=== RETRY stdin"
done
# A reader that goes away: one line, then EPIPE on every write.
echo "=== BEGIN epipe"
{ timeout 120 /bin/vmm-reference boot $G --cmdline "$D" </dev/null; echo $? >/tmp/rc_epipe; } 2>/tmp/err_epipe | head -1 >/dev/null
cat /tmp/err_epipe; echo "stderr-lines=$(wc -l </tmp/err_epipe)"
echo "=== END epipe rc=$(cat /tmp/rc_epipe)"
# Signals that end the VMM while the guest runs (a shell waiting on a console without input).
for sig in HUP QUIT INT USR1; do
  echo "=== BEGIN signal_$sig"
  /bin/vmm-reference boot $G --cmdline "$C vmmref.end=shell" </dev/null & pid=$!
  sleep 4; kill -$sig $pid; wait $pid
  echo "=== END signal_$sig rc=$?"
done
# SIGTERM while the VM is still being built (the handlers are in place from main() on): sent
# as soon as the VMM catches SIGTERM (bit 15 of SigCgt), well before the guest runs.
echo "=== BEGIN term_early"
/bin/vmm-reference boot $G --cmdline "$C" </dev/null & pid=$!
n=0; while [ $n -lt 500 ]; do
  c=$(sed -n 's/^SigCgt:[[:space:]]*//p' /proc/$pid/status 2>/dev/null)
  [ -n "$c" ] && [ $(( 0x$c & 0x4000 )) -ne 0 ] && break
  sleep 0.01; n=$((n+1))
done
kill -TERM $pid; wait $pid
echo "=== END term_early rc=$?"
# SIGTERM while the console is blocked: a guest flooding a pipe nobody reads.
echo "=== BEGIN term_blocked"
mkfifo /tmp/blocked; exec 3<>/tmp/blocked
/bin/vmm-reference boot $G --cmdline "$D rdinit=/bin/busybox -- yes" </dev/null >/tmp/blocked & pid=$!
sleep 20; kill -TERM $pid; n=0
while [ "$(cut -d' ' -f3 /proc/$pid/stat 2>/dev/null)" != Z ] && [ -e /proc/$pid ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
echo "exited-after-tenths=$n"; wait $pid
echo "=== END term_blocked rc=$?"
exec 3>&-
"#;

fn nested_run() -> Result<&'static NestedRun, Failed> {
    static RUN: OnceLock<Result<NestedRun, String>> = OnceLock::new();
    RUN.get_or_init(|| {
        let bin = vmm_bin().map_err(|e| format!("{e:?}"))?;
        let dir = scratch();
        let cached_kernel = |args: &[&str]| -> Result<PathBuf, String> {
            let out = Command::new(env!("CARGO"))
                .args(["xtask", "nested-kernel"])
                .args(args)
                .current_dir(workspace())
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!(
                    "cargo xtask nested-kernel {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        };
        let kernel = cached_kernel(&[])?;
        // The same kernel's ELF vmlinux, extracted from the bzImage by xtask (for the PVH run).
        let vmlinux = cached_kernel(&["--vmlinux"])?;
        let initramfs = dir.join("initramfs.cpio");
        let st = Command::new(env!("CARGO"))
            .args(["xtask", "guest-initramfs", "--out"])
            .arg(&initramfs)
            .current_dir(workspace())
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err("building the initramfs failed".into());
        }
        let script = dir.join("e2e.sh");
        std::fs::write(&script, SCRIPT).map_err(|e| e.to_string())?;
        let file = |src: &Path, dest: &str| format!("{}:{dest}", src.display());
        let out = Command::new(env!("CARGO"))
            .current_dir(workspace())
            .args(["xtask", "nested", "--timeout", "600", "--file"])
            .arg(file(&bin, "/bin/vmm-reference"))
            .arg("--file")
            .arg(file(&kernel, "/data/bzImage"))
            .arg("--file")
            .arg(file(&vmlinux, "/data/vmlinux"))
            .arg("--file")
            .arg(file(&initramfs, "/data/initramfs.cpio"))
            .arg("--file")
            .arg(file(&script, "/data/e2e.sh"))
            .args(["--", "/bin/sh", "/data/e2e.sh"])
            .output()
            .map_err(|e| e.to_string())?;
        let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
        log.push_str(&String::from_utf8_lossy(&out.stderr));
        // A lost test host booted again shows in the CI summary (it counts these lines), a
        // scenario run again after an early guest triple fault in the test output.
        for line in log
            .lines()
            .filter(|l| l.starts_with("xtask: FROZEN-HOST-RETRY") || l.starts_with("=== RETRY "))
        {
            println!("{line}");
        }
        Ok(NestedRun { log })
    })
    .as_ref()
    .map_err(|e| Failed::from(e.clone()))
}

/// What a scenario must show: its exit status, lines or fragments in its output, and the
/// marker with a CPU count when the guest's init is expected to run.
struct Expect {
    rc: i32,
    cpus: Option<u32>,
    contains: &'static [&'static str],
}

fn expect_scenario(name: &str, want: Expect) -> Result<(), Failed> {
    let run = nested_run()?;
    let (out, rc) = run.scenario(name)?;
    if let Some(cpus) = want.cpus {
        let marker = format!("{MARKER} cpus={cpus} ");
        if !out.contains(&marker) {
            return Err(format!("{name}: no {marker:?} in:\n{}", tail(out)).into());
        }
    }
    for fragment in want.contains {
        if !out.contains(fragment) {
            return Err(format!("{name}: no {fragment:?} in:\n{}", tail(out)).into());
        }
    }
    if out.contains("panicked at") {
        return Err(format!("{name}: the VMM panicked:\n{}", tail(out)).into());
    }
    if rc != want.rc {
        return Err(format!("{name}: exit {rc}, want {}:\n{}", want.rc, tail(out)).into());
    }
    Ok(())
}

/// The nested scenarios of issue #18: how each guest ending maps to an exit status, memory
/// sized by the kernel, console input and output, signals.
fn issue_18_trials() -> Vec<Trial> {
    const RESET: &str = "vmm-reference: guest requested reset";
    const PANIC_RESET: &str = "vmm-reference: guest reset without an orderly shutdown";
    vec![
        Trial::test("nested::reboot_default_order_exits_0", || {
            expect_scenario(
                "reboot_default",
                Expect {
                    rc: 0,
                    cpus: Some(1),
                    contains: &[RESET],
                },
            )
        }),
        Trial::test("nested::reboot_acpi_reset_register_exits_0", || {
            expect_scenario(
                "reboot_acpi",
                Expect {
                    rc: 0,
                    cpus: Some(1),
                    contains: &[RESET],
                },
            )
        }),
        Trial::test(
            "nested::reboot_triple_fault_exits_3_and_says_why_no_dump",
            || {
                expect_scenario(
                    "reboot_triple",
                    Expect {
                        rc: 3,
                        cpus: Some(1),
                        contains: &["vmm-reference: guest triple fault on vCPU 0"],
                    },
                )
            },
        ),
        Trial::test("nested::panic_default_order_exits_3", || {
            expect_scenario(
                "panic_default",
                Expect {
                    rc: 3,
                    cpus: None,
                    contains: &["Kernel panic", PANIC_RESET],
                },
            )
        }),
        Trial::test("nested::panic_with_reboot_k_exits_3", || {
            expect_scenario(
                "panic_kbd",
                Expect {
                    rc: 3,
                    cpus: None,
                    contains: &["Kernel panic", PANIC_RESET],
                },
            )
        }),
        Trial::test("nested::halt_f_exits_3", || {
            expect_scenario(
                "halt",
                Expect {
                    rc: 3,
                    cpus: None,
                    contains: &["vmm-reference: guest halted"],
                },
            )
        }),
        Trial::test("nested::least_accepted_memory_boots", || {
            let run = nested_run()?;
            let line = run
                .log
                .lines()
                .find(|l| l.starts_with("mem64 rc="))
                .ok_or("no mem64 line")?;
            if !line.starts_with("mem64 rc=2 ") || !line.contains("at least ") {
                return Err(format!("64 MiB was not refused with the minimum: {line}").into());
            }
            expect_scenario(
                "mem_min",
                Expect {
                    rc: 0,
                    cpus: Some(1),
                    contains: &["vmm-reference: guest powered off"],
                },
            )
        }),
        Trial::test("nested::piped_stdin_arrives_from_the_first_byte", || {
            expect_scenario(
                "stdin",
                Expect {
                    rc: 0,
                    cpus: Some(1),
                    contains: &["INPUT-OK-42", "vmm-reference: guest powered off"],
                },
            )
        }),
        Trial::test("nested::closed_stdout_ends_output_quietly", || {
            let run = nested_run()?;
            let (out, _) = run.scenario("epipe")?;
            let lines: usize = out
                .lines()
                .find_map(|l| l.strip_prefix("stderr-lines="))
                .and_then(|n| n.trim().parse().ok())
                .ok_or("no stderr-lines")?;
            if lines > 3 {
                return Err(format!("{lines} stderr lines after EPIPE:\n{}", tail(out)).into());
            }
            expect_scenario(
                "epipe",
                Expect {
                    rc: 0,
                    cpus: None,
                    contains: &["vmm-reference: guest powered off"],
                },
            )
        }),
        Trial::test("nested::sighup_exits_129", || {
            expect_scenario(
                "signal_HUP",
                Expect {
                    rc: 129,
                    cpus: None,
                    contains: &["vmm-reference: stopped by SIGHUP (signal 1)"],
                },
            )
        }),
        Trial::test("nested::sigterm_while_building_exits_143", || {
            expect_scenario(
                "term_early",
                Expect {
                    rc: 143,
                    cpus: None,
                    contains: &["vmm-reference: stopped by SIGTERM (signal 15)"],
                },
            )
        }),
        Trial::test("nested::sigquit_exits_131", || {
            expect_scenario(
                "signal_QUIT",
                Expect {
                    rc: 131,
                    cpus: None,
                    contains: &["vmm-reference: stopped by SIGQUIT (signal 3)"],
                },
            )
        }),
        Trial::test("nested::sigint_exits_130", || {
            expect_scenario(
                "signal_INT",
                Expect {
                    rc: 130,
                    cpus: None,
                    contains: &["vmm-reference: stopped by SIGINT (signal 2)"],
                },
            )
        }),
        Trial::test("nested::sigusr1_exits_138", || {
            expect_scenario(
                "signal_USR1",
                Expect {
                    rc: 138,
                    cpus: None,
                    contains: &["vmm-reference: stopped by SIGUSR1 (signal 10)"],
                },
            )
        }),
        Trial::test(
            "nested::sigterm_with_blocked_console_exits_143_at_once",
            || {
                let run = nested_run()?;
                let (out, _) = run.scenario("term_blocked")?;
                let tenths: u32 = out
                    .lines()
                    .find_map(|l| l.strip_prefix("exited-after-tenths="))
                    .and_then(|n| n.trim().parse().ok())
                    .ok_or("no exited-after-tenths")?;
                if tenths > 20 {
                    return Err(
                        format!("exit took {tenths}/10 s after SIGTERM:\n{}", tail(out)).into(),
                    );
                }
                expect_scenario(
                    "term_blocked",
                    Expect {
                        rc: 143,
                        cpus: None,
                        contains: &["vmm-reference: stopped by SIGTERM (signal 15)"],
                    },
                )
            },
        ),
    ]
}

fn expect_boot(name: &str, cpus: u32, message: &str) -> Result<(), Failed> {
    let run = nested_run()?;
    let (out, rc) = run.scenario(name)?;
    let marker = format!("{MARKER} cpus={cpus} ");
    if !out.contains(&marker) {
        return Err(format!("{name}: no {marker:?} in:\n{}", tail(out)).into());
    }
    if !out.contains(&format!("vmm-reference: {message}")) {
        return Err(format!("{name}: no {message:?} in:\n{}", tail(out)).into());
    }
    if rc != 0 {
        return Err(format!("{name}: exit {rc}, want 0:\n{}", tail(out)).into());
    }
    Ok(())
}

/// The script's `early_tf` check, run by `sh` on a saved output and exit status: whether the
/// scenario would be run again.
fn early_triple_fault(output: &str, rc: i32) -> Result<bool, Failed> {
    let dir = scratch();
    let out = dir.join("early_tf.out");
    std::fs::write(&out, output)?;
    let function = SCRIPT
        .lines()
        .find(|l| l.starts_with("early_tf() {"))
        .ok_or("no early_tf in the script")?
        .replace("/tmp/out", &out.display().to_string());
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("{function}\nearly_tf {rc}"))
        .status()?;
    Ok(status.success())
}

fn script_trials() -> Vec<Trial> {
    vec![Trial::test(
        "script::only_a_triple_fault_before_marker_or_panic_is_run_again",
        || {
            let tf = "vmm-reference: guest triple fault on vCPU 0 (no registers of the fault)";
            let cases = [
                (format!("[ 0.2] kvm: x\n{tf}\n"), 3, true),
                (format!("{MARKER} cpus=1 uptime=5\n{tf}\n"), 3, false),
                (format!("Kernel panic - not syncing: x\n{tf}\n"), 3, false),
                (format!("{tf}\n"), 0, false),
                (
                    "vmm-reference: guest halted for good\n".to_owned(),
                    3,
                    false,
                ),
            ];
            for (output, rc, want) in cases {
                if early_triple_fault(&output, rc)? != want {
                    return Err(format!("rc {rc}, output {output:?}: want retry {want}").into());
                }
            }
            Ok(())
        },
    )]
}

fn nested_trials() -> Vec<Trial> {
    let qemu = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").exists()))
        .unwrap_or(false);
    let trials = vec![
        Trial::test("nested::bzimage_1_vcpu_poweroff_exits_0", || {
            expect_boot("bz1", 1, "guest powered off")
        }),
        Trial::test("nested::bzimage_2_vcpus_see_2_cpus", || {
            expect_boot("bz2", 2, "guest powered off")
        }),
        Trial::test("nested::reboot_is_reported_as_reset_exit_0", || {
            expect_boot("reboot", 1, "guest requested reset")
        }),
        Trial::test("nested::elf_vmlinux_boots_through_pvh", || {
            expect_boot("pvh", 2, "guest powered off")
        }),
    ];
    let trials: Vec<Trial> = trials.into_iter().chain(issue_18_trials()).collect();
    if qemu {
        trials
    } else {
        trials
            .into_iter()
            .map(|t| t.with_ignored_flag(true))
            .collect()
    }
}

fn main() {
    let mut args = Arguments::from_args();
    // The nested scenarios share one L1 boot; run trials in one thread so it happens once.
    args.test_threads = Some(1);
    let mut trials = bad_input_trials();
    trials.push(software_kvm_trial());
    trials.extend(script_trials());
    trials.extend(nested_trials());
    libtest_mimic::run(&args, trials).exit();
}
