//! The default guest of the reference VMM: the L1 kernel (it boots as an L2 guest too) and a
//! busybox initramfs whose `/init` prints a marker line with the CPU count, then ends the
//! guest as the kernel command line says (`vmmref.end=poweroff` (default), `reboot`,
//! `shell`).
//!
//! Used by `cargo xtask demo`, `guest-initramfs`, the soak, and the boot tests. The archive
//! is written with the same `newc` writer as L1's image.

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use crate::image::{self, FileSource, GuestPath, Initramfs};

/// The line the guest's `/init` prints once it runs; the demo and the tests look for it.
pub const MARKER: &str = "VMM-REFERENCE-BOOT-OK";

/// The guest's `/init`.
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
# Each ending first gives the tty a second to send its line; the kernel output of a panic
# would otherwise cut into it.
end=poweroff
for arg in $(cat /proc/cmdline); do
  case "$arg" in vmmref.end=*) end="${arg#vmmref.end=}" ;; esac
done
case "$end" in
  reboot) echo "init: rebooting"; sleep 1; reboot -f ;;
  panic) echo "init: panicking"; sleep 1; echo c > /proc/sysrq-trigger ;;
  halt) echo "init: halting"; sleep 1; halt -f ;;
  shell) echo "init: starting a shell; 'poweroff -f' ends the VM"; setsid cttyhack sh; poweroff -f ;;
  *) echo "init: powering off"; sleep 1; poweroff -f ;;
esac
"#;

/// Errors from building the guest initramfs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Busybox is not where Debian's `busybox-static` puts it.
    #[error("busybox is missing at {} (Debian package busybox-static; `cargo xtask setup` installs it)", .0.display())]
    NoBusybox(PathBuf),
    /// A path in the archive was invalid.
    #[error(transparent)]
    Image(#[from] image::Error),
    /// The archive could not be written.
    #[error("cannot write the guest initramfs {}", path.display())]
    Write {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The guest's file tree: static busybox at `/bin/busybox`, `/dev/console` and `/init`.
pub fn initramfs(busybox: &Path) -> Result<Initramfs> {
    if !busybox.is_file() {
        return Err(Error::NoBusybox(busybox.to_owned()));
    }
    let mut tree = Initramfs::new();
    for dir in ["/dev", "/proc", "/sys", "/tmp"] {
        tree.add_directory(&dir.parse()?);
    }
    // The kernel opens /dev/console for /init's stdio before anything is mounted.
    tree.add_char_device(&"/dev/console".parse()?, 0o600, 5, 1);
    let bin: GuestPath = "/bin/busybox".parse()?;
    tree.add_file(&bin, FileSource::Host(busybox.to_owned()), 0o755);
    tree.add_file(
        &"/init".parse()?,
        FileSource::Bytes(INIT_SCRIPT.as_bytes().to_vec()),
        0o755,
    );
    Ok(tree)
}

/// Writes the guest initramfs to `out`.
pub fn write_initramfs(busybox: &Path, out: &Path) -> Result<()> {
    let tree = initramfs(busybox)?;
    let write_err = |source| Error::Write {
        path: out.to_owned(),
        source,
    };
    let file = File::create(out).map_err(write_err)?;
    let mut writer = tree.write(BufWriter::new(file))?;
    io::Write::flush(&mut writer).map_err(write_err)?;
    Ok(())
}

/// The initramfs in `cache_dir`, built there if it is missing or older than this xtask.
pub fn cached_initramfs(cache_dir: &Path, busybox: &Path) -> Result<PathBuf> {
    let path = cache_dir.join("guest-initramfs.cpio");
    let fresh = path
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .is_some_and(|built| {
            std::env::current_exe()
                .and_then(|exe| exe.metadata()?.modified())
                .is_ok_and(|exe| built >= exe)
        });
    if !fresh {
        std::fs::create_dir_all(cache_dir).map_err(|source| Error::Write {
            path: cache_dir.to_owned(),
            source,
        })?;
        write_initramfs(busybox, &path)?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_busybox_is_named() {
        let err = initramfs(Path::new("/nonexistent/busybox")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/busybox"), "{err}");
    }

    #[test]
    fn the_archive_holds_init_console_and_busybox() {
        // Any regular file stands in for busybox.
        let me = std::env::current_exe().unwrap();
        let tree = initramfs(&me).unwrap();
        for path in ["/init", "/dev/console", "/bin/busybox"] {
            assert!(tree.contains(&path.parse().unwrap()), "{path} missing");
        }
        let bytes = tree.write(Vec::new()).unwrap();
        assert!(bytes.starts_with(b"070701"), "not a newc archive");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains(MARKER));
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn the_init_script_parses_as_shell() {
        let status = std::process::Command::new("sh")
            .args(["-n", "-c", INIT_SCRIPT])
            .status()
            .unwrap();
        assert!(status.success());
    }
}
