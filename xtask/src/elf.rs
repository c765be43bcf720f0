//! What an executable needs at run time: its shared libraries and ELF interpreter, found
//! with the `lddtree` crate (which reads the ELF files and runs nothing, unlike `ldd`).

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use lddtree::DependencyAnalyzer;

/// The first bytes of every ELF file.
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";

/// Errors from finding the run-time dependencies of a binary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The binary or one of its libraries could not be read as ELF.
    #[error("cannot list the shared libraries of {}", path.display())]
    Analyze {
        /// The binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: lddtree::Error,
    },
    /// A library the binary needs is not on the host's library path.
    #[error("{}: shared library {library} not found on the host", path.display())]
    LibraryNotFound {
        /// The binary.
        path: PathBuf,
        /// The library's soname.
        library: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Whether `path` is an ELF file.
pub fn is_elf(path: &Path) -> Result<bool> {
    let read_error = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let mut magic = [0u8; 4];
    let mut file = File::open(path).map_err(read_error)?;
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(magic == ELF_MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(read_error(e)),
    }
}

/// The absolute host paths of the shared libraries and the ELF interpreter that `binary`
/// loads, as `ldd` lists them; empty for a static binary.
///
/// [`lddtree`] resolves the `DT_NEEDED` entries the way glibc's `ld.so` does (`DT_RUNPATH` or
/// `DT_RPATH`, `LD_LIBRARY_PATH`, `/etc/ld.so.conf`, the trusted directories) by reading the
/// files, without running anything. glibc's `libc.so.6` also names the dynamic loader in
/// `DT_NEEDED`; like `ldd`, the loader is listed once, at the path in `PT_INTERP`, which is
/// where the kernel looks for it.
pub fn runtime_dependencies(binary: &Path) -> Result<Vec<PathBuf>> {
    let tree = DependencyAnalyzer::default()
        .analyze(binary)
        .map_err(|source| Error::Analyze {
            path: binary.to_owned(),
            source,
        })?;
    let interpreter = tree.interpreter.map(PathBuf::from);
    let interpreter_file = interpreter.as_deref().and_then(|p| p.canonicalize().ok());
    let mut libraries: Vec<_> = tree.libraries.into_values().collect();
    libraries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut files = Vec::new();
    for library in libraries {
        if !library.found() {
            return Err(Error::LibraryNotFound {
                path: binary.to_owned(),
                library: library.name,
            });
        }
        if interpreter_file.is_none() || library.realpath != interpreter_file {
            files.push(library.path);
        }
    }
    files.extend(interpreter);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::process::Command;

    /// The absolute paths in `ldd`'s output for `binary`, sorted.
    fn ldd(binary: &Path) -> Vec<PathBuf> {
        let output = Command::new("ldd").arg(binary).output().unwrap();
        let mut files: Vec<PathBuf> = String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .filter(|word| word.starts_with('/'))
            .map(PathBuf::from)
            .collect();
        files.sort();
        files
    }

    #[test]
    fn host_binaries_need_what_ldd_lists() {
        let this_test = std::env::current_exe().unwrap();
        for binary in [Path::new("/bin/sh"), Path::new("/bin/bash"), &this_test] {
            let mut found = runtime_dependencies(binary).unwrap();
            found.sort();
            assert_eq!(found, ldd(binary), "{}", binary.display());
            assert!(
                found.contains(&PathBuf::from("/lib64/ld-linux-x86-64.so.2")),
                "{found:?}"
            );
        }
    }

    #[test]
    fn busybox_static_needs_nothing() {
        let busybox = Path::new("/bin/busybox");
        assert!(is_elf(busybox).unwrap());
        assert!(runtime_dependencies(busybox).unwrap().is_empty());
    }

    #[test]
    fn only_elf_files_are_elf() {
        assert!(is_elf(Path::new("/bin/sh")).unwrap());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        assert!(!is_elf(&manifest).unwrap());
    }
}
