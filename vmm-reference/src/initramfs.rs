//! The default guest's initramfs: a `newc` cpio archive with a static busybox, `/dev/console`
//! and an `/init` that prints a marker line with the CPU count and then ends the guest as the
//! kernel command line says (`vmmref.end=poweroff` (default), `reboot` or `shell`).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The line `/init` prints; tests and the demo look for it.
pub const MARKER: &str = "VMM-REFERENCE-BOOT-OK";

/// The `/init` script.
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
cpus=$(grep -c ^processor /proc/cpuinfo)
marker="VMM-REFERENCE-BOOT-OK cpus=$cpus uptime=$(cut -d' ' -f1 /proc/uptime)"
# Also through the kernel log: printk reaches the serial port synchronously, so the marker is
# out even if a power-off follows before the tty has drained.
echo "<2>$marker" > /dev/kmsg
echo "$marker"
end=poweroff
for arg in $(cat /proc/cmdline); do
  case "$arg" in vmmref.end=*) end="${arg#vmmref.end=}" ;; esac
done
case "$end" in
  reboot) echo "init: rebooting"; sleep 1; reboot -f ;;
  shell) echo "init: starting a shell; 'poweroff -f' ends the VM"; setsid cttyhack sh; poweroff -f ;;
  *) echo "init: powering off"; sleep 1; poweroff -f ;;
esac
"#;

/// `S_IFDIR`, `S_IFREG`, `S_IFCHR` file type bits.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Busybox could not be read.
    #[error("cannot read busybox at {path}")]
    ReadBusybox {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The archive could not be written.
    #[error("cannot write the initramfs {path}")]
    Write {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A `newc` cpio archive being written.
#[derive(Debug, Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    ino: u32,
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & S_IFDIR != 0 { 2 } else { 1 },
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        pad4(&mut self.out);
        self.out.extend_from_slice(data);
        pad4(&mut self.out);
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[]);
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, S_IFREG | mode, (0, 0), data);
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | 0o600, (major, minor), &[]);
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// The default initramfs around `busybox` (a static binary).
pub fn build(busybox: &[u8]) -> Vec<u8> {
    let mut w = CpioWriter::new();
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        w.dir(d);
    }
    w.char_dev("dev/console", 5, 1);
    w.file("bin/busybox", 0o755, busybox);
    w.file("init", 0o755, INIT_SCRIPT.as_bytes());
    w.finish()
}

/// Builds the default initramfs from the busybox at `busybox` into `out`.
pub fn write(busybox: &Path, out: &Path) -> Result<()> {
    let bb = std::fs::read(busybox).map_err(|source| Error::ReadBusybox {
        path: busybox.to_path_buf(),
        source,
    })?;
    let bytes = build(&bb);
    let tmp = out.with_extension("tmp");
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes))
        .and_then(|()| std::fs::rename(&tmp, out))
        .map_err(|source| Error::Write {
            path: out.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let a = build(b"BB");
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("dev/console") && text.contains("TRAILER!!!"));
        assert!(text.contains(MARKER));
        // The first header: ino 1, a directory.
        assert_eq!(&a[6..14], b"00000001");
        assert_eq!(&a[14..22], format!("{:08x}", S_IFDIR | 0o755).as_bytes());
    }

    #[test]
    fn write_errors_name_the_file() {
        let e = write(Path::new("/nonexistent/busybox"), Path::new("/tmp/x")).unwrap_err();
        assert!(matches!(e, Error::ReadBusybox { .. }));
        let dir = std::env::temp_dir().join(format!("vmmref-initramfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bb = dir.join("bb");
        std::fs::write(&bb, b"x").unwrap();
        write(&bb, &dir.join("out.cpio")).unwrap();
        assert!(std::fs::metadata(dir.join("out.cpio")).unwrap().len() > 0);
        assert!(matches!(
            write(&bb, &dir.join("missing/out.cpio")),
            Err(Error::Write { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
