//! Writes the hand-made seed inputs of every target into `corpus/<target>/seed-*`: valid
//! files and device sessions a real guest or user produces, and a few refusals, so that
//! fuzzing starts from the interesting paths. Run again after changing an input format:
//!
//! ```text
//! cargo run -p vmm-fuzz --example write_seeds
//! ```

use std::fs;
use std::path::Path;

use vmm_fuzz::images::{bzimage, BzImageFields};

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(format!("seed-{name}")), data).unwrap();
}

/// An x86-64 ELF with one loadable segment at 16 MiB and, with `pvh_entry`, a PT_NOTE
/// holding the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, 18).
fn elf(pvh_entry: Option<u32>) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
    let note_at = EHDR + PHDR * usize::from(phnum);
    let mut note = Vec::new();
    if let Some(entry) = pvh_entry {
        note.extend(4u32.to_le_bytes()); // namesz: "Xen\0"
        note.extend(4u32.to_le_bytes()); // descsz
        note.extend(18u32.to_le_bytes()); // type
        note.extend(b"Xen\0");
        note.extend(entry.to_le_bytes());
    }
    let code_at = (note_at + note.len()).next_multiple_of(16);
    let code = [0xf4u8; 32]; // hlt
    let mut b = vec![0u8; code_at + code.len()];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // ELFCLASS64
    b[5] = 1; // little endian
    b[6] = 1; // EV_CURRENT
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
    b[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    b[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    b[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    b[56..58].copy_from_slice(&phnum.to_le_bytes());
    let mut phdr = |i: usize, p_type: u32, offset: usize, addr: u64, size: usize| {
        let p = EHDR + i * PHDR;
        b[p..p + 4].copy_from_slice(&p_type.to_le_bytes());
        b[p + 4..p + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        b[p + 8..p + 16].copy_from_slice(&(offset as u64).to_le_bytes());
        b[p + 16..p + 24].copy_from_slice(&addr.to_le_bytes());
        b[p + 24..p + 32].copy_from_slice(&addr.to_le_bytes());
        b[p + 32..p + 40].copy_from_slice(&(size as u64).to_le_bytes());
        b[p + 40..p + 48].copy_from_slice(&(size as u64).to_le_bytes());
        b[p + 48..p + 56].copy_from_slice(&16u64.to_le_bytes());
    };
    phdr(0, 1, code_at, 0x100_0000, code.len()); // PT_LOAD
    if pvh_entry.is_some() {
        phdr(1, 4, note_at, 0, note.len()); // PT_NOTE
    }
    b[note_at..note_at + note.len()].copy_from_slice(&note);
    b[code_at..].copy_from_slice(&code);
    b
}

fn kernel_image() {
    write(
        "kernel_image",
        "bzimage",
        &bzimage(BzImageFields::default()),
    );
    let mut truncated = bzimage(BzImageFields {
        syssize: 0x100,
        ..Default::default()
    });
    truncated.truncate(3000);
    write("kernel_image", "bzimage-truncated", &truncated);
    let mut old = bzimage(BzImageFields::default());
    old[0x206] = 0x04; // protocol 2.04
    write("kernel_image", "bzimage-old-protocol", &old);
    write("kernel_image", "elf", &elf(None));
    write("kernel_image", "elf-pvh", &elf(Some(0x100_0000)));
    write("kernel_image", "script", b"#!/bin/sh\necho not a kernel\n");
}

fn config() {
    let seeds: [(&str, &str); 7] = [
        ("minimal", r#"{"kernel": "/k"}"#),
        (
            "full",
            r#"{"kernel": "/boot/vmlinuz", "initramfs": "/boot/initrd.img", "cmdline": "console=ttyS0 reboot=k panic=-1 quiet", "mem_mib": 512, "vcpus": 4, "amx": true, "nested_virt": true}"#,
        ),
        ("no-vcpus", r#"{"kernel": "/k", "vcpus": 0}"#),
        (
            "too-much-memory",
            r#"{"kernel": "/k", "mem_mib": 18446744073709551615}"#,
        ),
        ("unknown-key", r#"{"kernel": "/k", "memory": 5}"#),
        (
            "escapes",
            r#"{"kernel": "/k\u0000\ud83d\ude00", "cmdline": "a\"b\\c\n"}"#,
        ),
        (
            "little-memory",
            r#"{"kernel": "/k", "initramfs": "/i", "mem_mib": 64}"#,
        ),
    ];
    for (name, json) in seeds {
        write("config", name, json.as_bytes());
    }
}

/// The initramfs target's input: memory choice, vCPUs, kernel header fields, then the file.
fn initramfs_input(fields: BzImageFields, mem_choice: u8, content: &[u8]) -> Vec<u8> {
    let mut d = vec![mem_choice, 1];
    d.extend(fields.syssize.to_le_bytes());
    d.extend(fields.initrd_addr_max.to_le_bytes());
    d.push(fields.kernel_alignment.trailing_zeros() as u8);
    d.extend((fields.pref_address as u32).to_le_bytes());
    d.extend(fields.init_size.to_le_bytes());
    d.push(1); // with an initramfs
    d.extend(content);
    d
}

fn initramfs() {
    let cpio = b"07070100000000000041ed0000000000000000000000020000000000000000000000000000000000000000000000000000000000000002000000000.\0\0\0";
    let fields = BzImageFields::default();
    write("initramfs", "cpio", &initramfs_input(fields, 0, cpio));
    let big_kernel = BzImageFields {
        init_size: 0x200_0000,
        ..fields
    };
    write(
        "initramfs",
        "near-limit",
        &initramfs_input(big_kernel, 0, cpio),
    );
    let low_max = BzImageFields {
        initrd_addr_max: 0x1ff_ffff,
        ..fields
    };
    write(
        "initramfs",
        "low-initrd-max",
        &initramfs_input(low_max, 3, cpio),
    );
}

/// One CPUID entry of the xsave_layout input: leaf choice (0: 0xD, 4: 7, 5: 0x1D, 6: 0x1E),
/// subleaf, EAX, EBX, ECX, EDX.
fn cpuid(leaf_choice: u8, subleaf: u8, regs: [u32; 4]) -> Vec<u8> {
    let mut e = vec![leaf_choice, subleaf];
    for r in regs {
        e.extend(r.to_le_bytes());
    }
    e
}

fn xsave_layout() {
    // A CPU with AVX-512, PKRU and AMX: XCR0 0x602e7, 0x2b00 bytes in the standard format.
    let leaf_d = [
        cpuid(0, 0, [0x602e7, 0xa88, 0x2b00, 0]),
        cpuid(0, 1, [0xf, 0x2b00, 0, 0]),
        cpuid(0, 2, [256, 576, 0, 0]),
        cpuid(0, 5, [64, 1088, 0, 0]),
        cpuid(0, 6, [512, 1152, 0, 0]),
        cpuid(0, 7, [1024, 1664, 0, 0]),
        cpuid(0, 9, [8, 2688, 0, 0]),
        cpuid(0, 17, [64, 2752, 2, 0]),
        cpuid(0, 18, [8192, 2816, 6, 0]),
    ];
    let amx_flags = [
        cpuid(4, 0, [0, 0, 0, 0x0300_0000 | (1 << 22)]),
        cpuid(5, 0, [1, 0x0400_2000, 0x0008_0040, 0x10]),
        cpuid(6, 0, [0, 0x4010, 0, 0]),
    ];
    for (name, allowed, with_amx_flags) in [
        ("amx-allowed", 0x6_0000u64, true),
        ("amx-refused", 0, true),
        ("no-amx-flags", u64::MAX, false),
    ] {
        let mut d = allowed.to_le_bytes().to_vec();
        let entries: Vec<&Vec<u8>> = leaf_d
            .iter()
            .chain(amx_flags.iter().filter(|_| with_amx_flags))
            .collect();
        d.push(entries.len() as u8);
        for e in entries {
            d.extend(e);
        }
        let mut image = vec![0u8; 4096];
        image[512] = 0b111; // XSTATE_BV: x87, SSE, AVX
        d.extend(image);
        write("xsave_layout", name, &d);
    }
}

fn msr_filter() {
    // Default allow; one range built by deny() (kind 0) at a u16 base (1) 0x10, READ|WRITE,
    // 1 MSR; with feature control; probing 0x3a; then guest writes for a VMX guest.
    let mut d = vec![1, 1, 0, 1];
    d.extend(0x10u16.to_le_bytes());
    d.push(3);
    d.extend(1u32.to_le_bytes());
    d.extend([1, 1, 1]);
    d.extend(0x3au16.to_le_bytes());
    d.push(1); // features: VMX
    for value in [5u64, 1, 0] {
        d.push(1);
        d.extend(value.to_le_bytes());
    }
    write("msr_filter", "vmm-filter", &d);
    // Default deny, an explicit range (kind 2) over the x2APIC MSRs with a short bitmap.
    let mut d = vec![0, 1, 2, 2, 0x10, 1, 0, 0x20, 0];
    d.extend(0x40u16.to_le_bytes());
    d.extend(0u16.to_le_bytes());
    d.push(0);
    write("msr_filter", "x2apic-range", &d);
}

/// A devices-target operation: device (0 serial, 1 i8042, 2 RTC, 3 ACPI, 4 pvpanic), kind
/// (1 read, 2 write), offset, size choice (0: 1 byte, 1: 2, 2: 4, 3: 8), written bytes.
fn op(device: u8, kind: u8, offset: u8, size: u8, data: &[u8]) -> Vec<u8> {
    let mut o = vec![(device << 5) | kind, offset, size];
    o.extend(data);
    o
}

fn devices() {
    // The 8250 driver's probe and start-up, then "hi" and a read of the line status.
    let mut linux_serial: Vec<u8> = [
        op(0, 2, 3, 0, &[0x80]),
        op(0, 2, 0, 0, &[0x01]),
        op(0, 2, 1, 0, &[0x00]),
        op(0, 2, 3, 0, &[0x03]),
        op(0, 2, 1, 0, &[0x0f]),
        op(0, 2, 4, 0, &[0x0b]),
        op(0, 2, 0, 0, b"h"),
        op(0, 2, 0, 0, b"i"),
        op(0, 1, 5, 0, &[]),
    ]
    .concat();
    linux_serial.extend([0, 0, 4]); // console input: 4 bytes
    linux_serial.extend(b"ls\r\n");
    linux_serial.extend(op(0, 1, 0, 0, &[]));
    write("devices", "serial-session", &linux_serial);
    let rtc = [
        op(2, 2, 0, 0, &[0x80 | 0x09]),
        op(2, 1, 1, 0, &[]),
        op(2, 2, 0, 0, &[0x40]),
        op(2, 2, 1, 0, &[0xab]),
        op(2, 1, 1, 1, &[]),
        op(2, 1, 0, 1, &[]),
    ]
    .concat();
    write("devices", "rtc", &rtc);
    let ends = [
        op(4, 1, 0, 0, &[]),
        op(3, 2, 3, 0, &[5]),
        op(3, 2, 0, 0, &[(5 << 2) | 0x20]),
        op(1, 2, 4, 0, &[0xfe]),
        op(3, 2, 2, 0, &[0x42]),
        op(4, 2, 0, 0, &[1]),
        op(1, 1, 4, 0, &[]),
        op(3, 1, 1, 2, &[]),
    ]
    .concat();
    write("devices", "power-off-reset-panic", &ends);
}

/// An exit of the exit_dispatch target: kind, size choice, no system-event words, fields.
fn exit(kind: u8, size: u8, fields: &[u8]) -> Vec<u8> {
    let mut e = vec![kind, size, 0];
    e.extend(fields);
    e
}

fn exit_dispatch() {
    let mut d = vec![1]; // VMX guest, IA32_FEATURE_CONTROL starts at 0
    d.extend(exit(1, 0, &[5, 0, b'x'])); // out to COM1 (port choice 5: serial)
    d.extend(exit(0, 1, &[2, 1])); // in from CMOS data
    d.extend(exit(2, 2, &[2, 0])); // MMIO read of the RTC
    d.extend(exit(3, 0, &[3, 0, 1])); // MMIO write to pvpanic
    d.extend(exit(4, 0, &[1])); // RDMSR 0x3a
    let mut wrmsr = vec![1, 1];
    wrmsr.extend(5u64.to_le_bytes());
    d.extend(exit(5, 0, &wrmsr)); // WRMSR 0x3a = LOCKED | VMX_OUTSIDE_SMX
    d.extend(exit(5, 0, &wrmsr)); // refused: locked
    d.extend(exit(4, 0, &[0, 0x10, 0, 0, 0])); // RDMSR 0x10: no handler
    d.extend(exit(6, 0, &[]));
    d.extend(exit(7, 0, &[]));
    let mut event = vec![9, 0, 2];
    event.extend(0xdeadu64.to_le_bytes());
    event.extend(1u64.to_le_bytes());
    event.extend([0, 2]); // other kind byte, then CRASH
    d.extend(event);
    d.extend(exit(12, 0, &[0; 24]));
    d.extend(exit(15, 0, &[3]));
    write("exit_dispatch", "session", &d);
}

fn main() {
    kernel_image();
    config();
    initramfs();
    xsave_layout();
    msr_filter();
    devices();
    exit_dispatch();
}
