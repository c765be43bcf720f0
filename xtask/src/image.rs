//! An initramfs as a tree of entries, written out as one `newc` archive (with the `cpio`
//! crate's writer).
//!
//! Entries are keyed by their path inside L1, so adding the same shared library for two
//! binaries stores it once, a later entry replaces an earlier one at the same path, and the
//! archive lists every directory before its contents (as the kernel's unpacker requires)
//! because paths order component by component.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use cpio::newc::{self, ModeFileType};
use cpio::NewcBuilder;

/// Errors from describing or writing an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path meant for inside L1 is not absolute and normal.
    #[error("{0:?} is not a valid path inside L1: it must be absolute, without `.` or `..`, and not `/`")]
    InvalidGuestPath(String),
    /// A host file to be copied in could not be read.
    #[error("cannot read {} for the initramfs", path.display())]
    ReadSource {
        /// The host file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Writing the archive failed.
    #[error("cannot write the initramfs entry {path}")]
    Write {
        /// The entry being written.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// An absolute, normalised path inside L1 (not `/` itself), e.g. `/bin/busybox`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestPath(PathBuf);

impl GuestPath {
    /// The path as it is named in the archive: without the leading `/`.
    fn archive_name(&self) -> String {
        self.0
            .strip_prefix("/")
            .unwrap_or(&self.0)
            .to_string_lossy()
            .into_owned()
    }

    /// The containing directory, unless that is `/`.
    pub fn parent(&self) -> Option<GuestPath> {
        self.0
            .parent()
            .filter(|parent| *parent != Path::new("/"))
            .map(|parent| GuestPath(parent.to_owned()))
    }

    /// `self/name`, e.g. `/bin` joined with `busybox`.
    pub fn join(&self, name: &str) -> Result<GuestPath> {
        self.0.join(name).to_string_lossy().parse()
    }
}

impl FromStr for GuestPath {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let path = Path::new(text);
        let mut components = path.components();
        let absolute = components.next() == Some(Component::RootDir);
        let normal = components
            .clone()
            .all(|c| matches!(c, Component::Normal(_)));
        // `Path::components` drops `.` and repeated `/`, so reject them on the text.
        let clean = !text.contains("//")
            && !text.contains('\0')
            && !text.split('/').any(|part| part == ".");
        if absolute && normal && clean && components.next().is_some() && !text.ends_with('/') {
            Ok(Self(path.to_owned()))
        } else {
            Err(Error::InvalidGuestPath(text.to_owned()))
        }
    }
}

impl fmt::Display for GuestPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display().fmt(f)
    }
}

/// Where a regular file's bytes come from.
#[derive(Debug, Clone)]
pub enum FileSource {
    /// A host file, read (following symlinks) when the archive is written.
    Host(PathBuf),
    /// Bytes generated or decompressed in memory.
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Entry {
    Directory,
    File { source: FileSource, perm: u32 },
    Symlink { target: String },
    CharDevice { perm: u32, major: u32, minor: u32 },
}

/// The contents of an initramfs, built up entry by entry.
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    entries: BTreeMap<GuestPath, Entry>,
}

impl Initramfs {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds directory `path` and its parents.
    pub fn add_directory(&mut self, path: &GuestPath) {
        self.insert(path, Entry::Directory);
    }

    /// Adds regular file `path` (and its parents) with permission bits `perm`.
    pub fn add_file(&mut self, path: &GuestPath, source: FileSource, perm: u32) {
        self.insert(path, Entry::File { source, perm });
    }

    /// Adds symbolic link `path` to `target`.
    pub fn add_symlink(&mut self, path: &GuestPath, target: &str) {
        self.insert(
            path,
            Entry::Symlink {
                target: target.to_owned(),
            },
        );
    }

    /// Adds character device node `path` for `major:minor`.
    pub fn add_char_device(&mut self, path: &GuestPath, perm: u32, major: u32, minor: u32) {
        self.insert(path, Entry::CharDevice { perm, major, minor });
    }

    /// Whether the tree has an entry at `path`.
    pub fn contains(&self, path: &GuestPath) -> bool {
        self.entries.contains_key(path)
    }

    fn insert(&mut self, path: &GuestPath, entry: Entry) {
        let mut parent = path.parent();
        while let Some(dir) = parent {
            parent = dir.parent();
            self.entries.entry(dir).or_insert(Entry::Directory);
        }
        self.entries.insert(path.clone(), entry);
    }

    /// Writes the tree as a `newc` archive to `out` and returns `out`.
    ///
    /// Entries get inode numbers 1, 2, ... in path order, owner root and mtime 0, so the same
    /// tree gives the same bytes.
    pub fn write<W: Write>(&self, mut out: W) -> Result<W> {
        for (ino, (path, entry)) in (1..).zip(&self.entries) {
            let name = path.archive_name();
            let header = NewcBuilder::new(&name).ino(ino);
            let written = match entry {
                Entry::Directory => write_empty(
                    header
                        .mode(0o755)
                        .set_mode_file_type(ModeFileType::Directory)
                        .nlink(2),
                    out,
                ),
                Entry::Symlink { target } => write_data(
                    header.mode(0o777).set_mode_file_type(ModeFileType::Symlink),
                    out,
                    target.len() as u64,
                    target.as_bytes(),
                ),
                Entry::CharDevice { perm, major, minor } => write_empty(
                    header
                        .mode(perm & 0o7777)
                        .set_mode_file_type(ModeFileType::Char)
                        .rdev_major(*major)
                        .rdev_minor(*minor),
                    out,
                ),
                Entry::File { source, perm } => {
                    let header = header
                        .mode(perm & 0o7777)
                        .set_mode_file_type(ModeFileType::Regular);
                    match source {
                        FileSource::Bytes(bytes) => {
                            write_data(header, out, bytes.len() as u64, bytes.as_slice())
                        }
                        FileSource::Host(host) => {
                            let read_error = |source| Error::ReadSource {
                                path: host.clone(),
                                source,
                            };
                            let file = File::open(host).map_err(read_error)?;
                            let size = file.metadata().map_err(read_error)?.len();
                            write_data(header, out, size, file)
                        }
                    }
                }
            };
            out = written.map_err(|source| Error::Write { path: name, source })?;
        }
        newc::trailer(out).map_err(|source| Error::Write {
            path: "TRAILER!!!".to_owned(),
            source,
        })
    }
}

/// Writes an entry without data (a directory or a device node).
fn write_empty<W: Write>(header: NewcBuilder, out: W) -> io::Result<W> {
    header.write(out, 0).finish()
}

/// Writes an entry with exactly `size` bytes read from `data`.
fn write_data<W: Write>(header: NewcBuilder, out: W, size: u64, data: impl Read) -> io::Result<W> {
    let size32 = u32::try_from(size).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{size} bytes is too large for a newc archive"),
        )
    })?;
    let mut entry = header.write(out, size32);
    let copied = io::copy(&mut data.take(size), &mut entry)?;
    // The cpio writer would pad and carry on after short data; the archive would be corrupt.
    if copied != size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("expected {size} bytes, read {copied}"),
        ));
    }
    entry.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> GuestPath {
        text.parse().unwrap()
    }

    #[test]
    fn guest_paths_must_be_absolute_and_normal() {
        for bad in [
            "",
            "/",
            "bin/sh",
            "/bin/../etc",
            "/bin/./sh",
            "//bin",
            "/bin/",
            "/a//b",
            "/a\0b",
        ] {
            assert!(bad.parse::<GuestPath>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(path("/data/vmlinuz").archive_name(), "data/vmlinuz");
        assert_eq!(path("/bin").join("sh").unwrap(), path("/bin/sh"));
    }

    fn listing(image: &Initramfs) -> Vec<String> {
        image.entries.keys().map(GuestPath::archive_name).collect()
    }

    #[test]
    fn parents_are_added_and_listed_first() {
        let mut image = Initramfs::new();
        image.add_file(
            &path("/lib/x86_64-linux-gnu/libc.so.6"),
            FileSource::Bytes(vec![1]),
            0o755,
        );
        image.add_symlink(&path("/lib64/ld-linux-x86-64.so.2"), "/lib/ld");
        image.add_directory(&path("/lib/modules"));
        assert_eq!(
            listing(&image),
            [
                "lib",
                "lib/modules",
                "lib/x86_64-linux-gnu",
                "lib/x86_64-linux-gnu/libc.so.6",
                "lib64",
                "lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let mut image = Initramfs::new();
        image.add_symlink(&path("/bin/sh"), "busybox");
        image.add_file(&path("/bin/sh"), FileSource::Bytes(b"x".to_vec()), 0o755);
        assert!(matches!(
            image.entries.get(&path("/bin/sh")),
            Some(Entry::File { .. })
        ));
    }

    #[test]
    fn missing_host_file_names_the_file() {
        let mut image = Initramfs::new();
        image.add_file(
            &path("/bin/x"),
            FileSource::Host("/nonexistent/x".into()),
            0o755,
        );
        let err = image.write(Vec::new()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x"), "{err}");
    }

    /// One archive entry as the tests compare it: name, mode, nlink, rdev and data.
    type ReadEntry = (String, u32, u32, (u32, u32), Vec<u8>);

    /// Every entry of `archive`.
    fn read_back(archive: &[u8]) -> Vec<ReadEntry> {
        let mut entries = Vec::new();
        let mut rest = archive;
        loop {
            let mut reader = cpio::NewcReader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                return entries;
            }
            let entry = reader.entry().clone();
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            entries.push((
                entry.name().to_owned(),
                entry.mode(),
                entry.nlink(),
                (entry.rdev_major(), entry.rdev_minor()),
                data,
            ));
            rest = reader.finish().unwrap();
        }
    }

    fn sample() -> Vec<u8> {
        let mut image = Initramfs::new();
        image.add_char_device(&path("/dev/console"), 0o600, 5, 1);
        image.add_file(
            &path("/init"),
            FileSource::Bytes(b"#!/bin/sh\n".to_vec()),
            0o755,
        );
        image.add_symlink(&path("/bin/sh"), "busybox");
        image.write(Vec::new()).unwrap()
    }

    #[test]
    fn archive_carries_types_devices_and_data() {
        let archive = sample();
        assert!(archive.starts_with(b"070701"), "not a newc archive");
        assert_eq!(archive.len() % 4, 0);
        assert_eq!(
            read_back(&archive),
            [
                ("bin".into(), 0o040755, 2, (0, 0), vec![]),
                ("bin/sh".into(), 0o120777, 1, (0, 0), b"busybox".to_vec()),
                ("dev".into(), 0o040755, 2, (0, 0), vec![]),
                ("dev/console".into(), 0o020600, 1, (5, 1), vec![]),
                ("init".into(), 0o100755, 1, (0, 0), b"#!/bin/sh\n".to_vec()),
            ]
        );
        assert_eq!(sample(), archive, "the same tree gives the same bytes");
    }

    #[test]
    fn gnu_cpio_reads_the_archive() {
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&sample()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "bin\nbin/sh\ndev\ndev/console\ninit\n"
        );
    }

    #[test]
    fn short_data_is_an_error() {
        let header = NewcBuilder::new("f");
        assert!(write_data(header, Vec::new(), 10, &b"abc"[..]).is_err());
    }
}
