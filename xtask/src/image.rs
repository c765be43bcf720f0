//! An initramfs as a tree of entries, written out as one `newc` archive.
//!
//! Entries are keyed by their path inside L1, so adding the same shared library for two
//! binaries stores it once, a later entry replaces an earlier one at the same path, and the
//! archive lists every directory before its contents (as the kernel's unpacker requires)
//! because paths order component by component.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use crate::cpio::CpioWriter;

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
        let clean = !text.contains("//") && !text.split('/').any(|part| part == ".");
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
    pub fn write<W: Write>(&self, out: W) -> Result<W> {
        let mut cpio = CpioWriter::new(out);
        for (path, entry) in &self.entries {
            let name = path.archive_name();
            let written = match entry {
                Entry::Directory => cpio.directory(&name, 0o755),
                Entry::Symlink { target } => cpio.symlink(&name, target),
                Entry::CharDevice { perm, major, minor } => {
                    cpio.char_device(&name, *perm, *major, *minor)
                }
                Entry::File {
                    source: FileSource::Bytes(bytes),
                    perm,
                } => cpio.file(&name, *perm, bytes.len() as u64, bytes.as_slice()),
                Entry::File {
                    source: FileSource::Host(host),
                    perm,
                } => {
                    let read_error = |source| Error::ReadSource {
                        path: host.clone(),
                        source,
                    };
                    let file = File::open(host).map_err(read_error)?;
                    let size = file.metadata().map_err(read_error)?.len();
                    cpio.file(&name, *perm, size, file)
                }
            };
            written.map_err(|source| Error::Write { path: name, source })?;
        }
        cpio.finish().map_err(|source| Error::Write {
            path: "TRAILER!!!".to_owned(),
            source,
        })
    }
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
}
