//! Host files copied into L1: executables with their shared libraries and ELF interpreter
//! (stripped of debug info when `strip` is available), other files as they are.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command;
use crate::elf;
use crate::image::{self, FileSource, GuestPath, Initramfs};

/// Errors from copying a host file into the image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file does not exist or is not a regular file.
    #[error("cannot copy {} into L1: not a regular file", path.display())]
    NotAFile {
        /// The host path.
        path: PathBuf,
    },
    /// The file's metadata could not be read.
    #[error("cannot stat {}", path.display())]
    Stat {
        /// The host path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file has no file name to derive a destination from.
    #[error("{} has no file name", path.display())]
    NoFileName {
        /// The host path.
        path: PathBuf,
    },
    /// Its shared libraries could not be determined.
    #[error(transparent)]
    Dependencies(#[from] elf::Error),
    /// `strip` failed on it.
    #[error("cannot strip {}", path.display())]
    Strip {
        /// The host path.
        path: PathBuf,
        /// The failed run.
        #[source]
        source: command::Error,
    },
    /// A destination path is invalid.
    #[error(transparent)]
    Destination(#[from] image::Error),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// One host file and where it goes inside L1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFile {
    /// The host path.
    pub source: PathBuf,
    /// The path inside L1.
    pub dest: GuestPath,
}

impl HostFile {
    /// `source` at its default place: `/bin/<name>` for an executable, `/data/<name>` otherwise.
    pub fn with_default_dest(source: PathBuf) -> Result<Self> {
        let executable = is_executable(&fs::metadata(&source).map_err(|e| Error::Stat {
            path: source.clone(),
            source: e,
        })?);
        let name = source
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or_else(|| Error::NoFileName {
                path: source.clone(),
            })?;
        let dir = if executable { "/bin" } else { "/data" };
        let dest = format!("{dir}/{name}").parse()?;
        Ok(Self { source, dest })
    }
}

fn is_executable(metadata: &fs::Metadata) -> bool {
    metadata.permissions().mode() & 0o111 != 0
}

/// Copies host files into an [`Initramfs`], staging stripped binaries in a scratch directory.
#[derive(Debug)]
pub struct Stager {
    staging: PathBuf,
    strip: bool,
    staged: usize,
}

impl Stager {
    /// A stager that writes stripped copies into `staging` (an existing, private directory).
    pub fn new(staging: &Path) -> Self {
        Self {
            staging: staging.to_owned(),
            strip: command::is_available("strip"),
            staged: 0,
        }
    }

    /// Adds `file`, and for a dynamically linked executable every library it loads, at the
    /// same absolute path as on the host.
    pub fn add(&mut self, image: &mut Initramfs, file: &HostFile) -> Result<()> {
        let metadata = fs::metadata(&file.source).map_err(|source| Error::Stat {
            path: file.source.clone(),
            source,
        })?;
        if !metadata.is_file() {
            return Err(Error::NotAFile {
                path: file.source.clone(),
            });
        }
        let perm = metadata.permissions().mode() & 0o7777;
        let binary = is_executable(&metadata) && elf::is_elf(&file.source)?;
        if !binary {
            image.add_file(&file.dest, FileSource::Host(file.source.clone()), perm);
            return Ok(());
        }
        for library in elf::runtime_dependencies(&file.source)? {
            let dest: GuestPath = library.to_string_lossy().parse()?;
            let library_perm = fs::metadata(&library)
                .map_err(|source| Error::Stat {
                    path: library.clone(),
                    source,
                })?
                .permissions()
                .mode()
                & 0o7777;
            image.add_file(&dest, FileSource::Host(library), library_perm);
        }
        let source = self.stripped(&file.source)?;
        image.add_file(&file.dest, FileSource::Host(source), perm);
        Ok(())
    }

    /// A copy of `binary` without debug info (symbols stay, for backtraces), or `binary`
    /// itself when there is no `strip`.
    fn stripped(&mut self, binary: &Path) -> Result<PathBuf> {
        if !self.strip {
            return Ok(binary.to_owned());
        }
        self.staged += 1;
        let copy = self.staging.join(format!("stripped-{}", self.staged));
        command::output(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&copy)
                .arg(binary),
        )
        .map_err(|source| Error::Strip {
            path: binary.to_owned(),
            source,
        })?;
        Ok(copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_destination_depends_on_the_executable_bit() {
        let sh = HostFile::with_default_dest("/bin/sh".into()).unwrap();
        assert_eq!(sh.dest.to_string(), "/bin/sh");
        let manifest = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        let data = HostFile::with_default_dest(manifest).unwrap();
        assert_eq!(data.dest.to_string(), "/data/Cargo.toml");
    }

    #[test]
    fn missing_source_is_an_error() {
        assert!(HostFile::with_default_dest("/nonexistent/tool".into()).is_err());
    }
}
