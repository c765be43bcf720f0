//! A writer for the `newc` cpio format, the archive format of the kernel's initramfs.
//!
//! See the kernel's `Documentation/driver-api/early-userspace/buffer-format.rst`: each entry is
//! a 110-byte ASCII header (`070701` then 13 eight-digit hex fields), the NUL-terminated name,
//! padding to a multiple of four bytes, the data, and padding again. The archive ends with an
//! entry named `TRAILER!!!`. Several archives may be concatenated; the kernel unpacks them in
//! order.
//!
//! Entries get distinct inode numbers, owner root and mtime 0, so the same input gives the same
//! bytes.

use std::io::{self, Read, Write};

/// The `c_magic` of a `newc` header (no checksum).
const MAGIC: &[u8] = b"070701";
/// The name of the entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `c_mode`, from `<linux/stat.h>`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Streams a `newc` archive into `W`.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    /// Bytes written so far, for alignment.
    offset: u64,
    next_ino: u32,
}

/// The type-specific fields of one header.
struct Header {
    mode: u32,
    nlink: u32,
    size: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive at the beginning of `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    /// Adds directory `path` (relative, e.g. `usr/bin`) with permission bits `perm`.
    pub fn directory(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.header(
            path,
            Header {
                mode: S_IFDIR | (perm & 0o7777),
                nlink: 2,
                size: 0,
                rdev_major: 0,
                rdev_minor: 0,
            },
        )
    }

    /// Adds regular file `path` with permission bits `perm` and exactly `size` bytes read from `data`.
    pub fn file(&mut self, path: &str, perm: u32, size: u64, data: impl Read) -> io::Result<()> {
        let size32 = u32::try_from(size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path}: {size} bytes is too large for a newc archive"),
            )
        })?;
        self.header(
            path,
            Header {
                mode: S_IFREG | (perm & 0o7777),
                nlink: 1,
                size: size32,
                rdev_major: 0,
                rdev_minor: 0,
            },
        )?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: expected {size} bytes, read {copied}"),
            ));
        }
        self.offset += size;
        self.pad()
    }

    /// Adds symbolic link `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let size = u32::try_from(target.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "symlink target too long"))?;
        self.header(
            path,
            Header {
                mode: S_IFLNK | 0o777,
                nlink: 1,
                size,
                rdev_major: 0,
                rdev_minor: 0,
            },
        )?;
        self.write(target.as_bytes())?;
        self.pad()
    }

    /// Adds character device node `path` for device `major:minor`.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(
            path,
            Header {
                mode: S_IFCHR | (perm & 0o7777),
                nlink: 1,
                size: 0,
                rdev_major: major,
                rdev_minor: minor,
            },
        )
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(
            TRAILER,
            Header {
                mode: 0,
                nlink: 1,
                size: 0,
                rdev_major: 0,
                rdev_minor: 0,
            },
        )?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(&mut self, name: &str, header: Header) -> io::Result<()> {
        if name.is_empty() || name.starts_with('/') || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid archive path {name:?}"),
            ));
        }
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let name_size = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "archive path too long"))?;
        let fields = [
            ino,
            header.mode,
            0, // uid
            0, // gid
            header.nlink,
            0, // mtime
            header.size,
            0, // dev major
            0, // dev minor
            header.rdev_major,
            header.rdev_minor,
            name_size,
            0, // check (unused by newc)
        ];
        let mut bytes = Vec::with_capacity(110 + name.len() + 4);
        bytes.extend_from_slice(MAGIC);
        for field in fields {
            bytes.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        bytes.extend_from_slice(name.as_bytes());
        bytes.push(0);
        self.write(&bytes)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Pads with NULs to the next multiple of four bytes.
    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0; 3][..padding])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_field(archive: &[u8], entry_start: usize, index: usize) -> u32 {
        let start = entry_start + 6 + index * 8;
        let text = std::str::from_utf8(&archive[start..start + 8]).unwrap();
        u32::from_str_radix(text, 16).unwrap()
    }

    #[test]
    fn file_entry_layout_matches_newc() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.file("init", 0o755, 3, &b"abc"[..]).unwrap();
        let archive = writer.finish().unwrap();

        assert_eq!(&archive[..6], MAGIC);
        assert_eq!(header_field(&archive, 0, 1), S_IFREG | 0o755);
        assert_eq!(header_field(&archive, 0, 6), 3, "filesize");
        assert_eq!(
            header_field(&archive, 0, 11),
            5,
            "namesize includes the NUL"
        );
        // 110 header + "init\0" = 115, padded to 116; data follows.
        assert_eq!(&archive[110..116], b"init\0\0");
        assert_eq!(&archive[116..119], b"abc");
        // Data padded to 120, where the trailer starts.
        assert_eq!(&archive[120..126], MAGIC);
        assert!(archive.ends_with(b"TRAILER!!!\0\0\0\0"));
        assert_eq!(archive.len() % 4, 0);
    }

    #[test]
    fn special_entries_carry_type_and_device() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.char_device("dev/console", 0o600, 5, 1).unwrap();
        let archive = writer.finish().unwrap();
        assert_eq!(header_field(&archive, 0, 1), S_IFCHR | 0o600);
        assert_eq!(header_field(&archive, 0, 9), 5);
        assert_eq!(header_field(&archive, 0, 10), 1);
    }

    #[test]
    fn symlink_data_is_its_target() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.symlink("bin/sh", "busybox").unwrap();
        let archive = writer.finish().unwrap();
        assert_eq!(header_field(&archive, 0, 1), S_IFLNK | 0o777);
        assert_eq!(header_field(&archive, 0, 6), 7);
        // 110 + "bin/sh\0" = 117 → 120.
        assert_eq!(&archive[120..127], b"busybox");
    }

    #[test]
    fn short_data_is_an_error() {
        let mut writer = CpioWriter::new(Vec::new());
        assert!(writer.file("f", 0o644, 10, &b"abc"[..]).is_err());
    }

    #[test]
    fn absolute_paths_are_rejected() {
        let mut writer = CpioWriter::new(Vec::new());
        assert!(writer.directory("/bin", 0o755).is_err());
    }

    #[test]
    fn gnu_cpio_reads_the_archive() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.directory("d", 0o755).unwrap();
        writer.file("d/f", 0o644, 5, &b"hello"[..]).unwrap();
        writer.symlink("d/l", "f").unwrap();
        let archive = writer.finish().unwrap();

        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        assert_eq!(String::from_utf8_lossy(&output.stdout), "d\nd/f\nd/l\n");
    }
}
