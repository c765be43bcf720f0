//! What an executable needs at run time: its shared libraries and ELF interpreter, via `ldd`.
//!
//! `ldd` runs the dynamic loader on the file, so it must only be given binaries the user
//! trusts to run anyway — here, binaries that are about to be run inside L1.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command;

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
    /// `ldd` could not be run, or failed for a reason other than a static binary.
    #[error("cannot list the shared libraries of {}", path.display())]
    Ldd {
        /// The binary.
        path: PathBuf,
        /// The failed run.
        #[source]
        source: command::Error,
    },
    /// The dynamic loader could not find a library the binary needs.
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
/// loads; empty for a static binary.
pub fn runtime_dependencies(binary: &Path) -> Result<Vec<PathBuf>> {
    let ldd_error = |source| Error::Ldd {
        path: binary.to_owned(),
        source,
    };
    let output = command::output_unchecked(Command::new("ldd").arg(binary)).map_err(ldd_error)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        // glibc's ldd exits 1 for a static binary and says so on stderr.
        if stderr.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        return Err(ldd_error(command::Error::Failed {
            command: command::CommandLine::of(Command::new("ldd").arg(binary)),
            status: output.status,
            stderr: stderr.trim().to_owned(),
        }));
    }
    parse_ldd(&stdout).map_err(|library| Error::LibraryNotFound {
        path: binary.to_owned(),
        library,
    })
}

/// Parses `ldd` output into the files to copy; `Err` names a library that was not found.
///
/// The line shapes are:
///
/// ```text
///     linux-vdso.so.1 (0x00007ffc...)                        in the kernel: nothing to copy
///     libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)   a library
///     /lib64/ld-linux-x86-64.so.2 (0x...)                    the ELF interpreter
///     libfoo.so.1 => not found
///     statically linked
/// ```
fn parse_ldd(output: &str) -> std::result::Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (soname, resolved) = match line.split_once("=>") {
            Some((soname, resolved)) => (soname.trim(), resolved.trim()),
            None => (line, line),
        };
        if resolved.starts_with("not found") {
            return Err(soname.to_owned());
        }
        // Strip the " (0xADDRESS)" load address.
        let path = resolved.split(" (0x").next().unwrap_or(resolved).trim();
        if path.starts_with('/') {
            files.push(PathBuf::from(path));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_yields_libraries_and_interpreter() {
        let output = "\
\tlinux-vdso.so.1 (0x00007ffd5c1f2000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1f98790000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1f985ae000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f1f987fa000)
";
        assert_eq!(
            parse_ldd(output).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn ldd_missing_library_is_reported_by_soname() {
        let output = "\tlibfoo.so.1 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n";
        assert_eq!(parse_ldd(output).unwrap_err(), "libfoo.so.1");
    }

    #[test]
    fn static_pie_has_no_dependencies() {
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }

    #[test]
    fn host_shell_is_dynamic_and_busybox_static_is_not() {
        let sh = runtime_dependencies(Path::new("/bin/sh")).unwrap();
        assert!(
            sh.iter().any(|p| p.to_string_lossy().contains("ld-linux")),
            "{sh:?}"
        );
        assert!(is_elf(Path::new("/bin/sh")).unwrap());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        assert!(!is_elf(&manifest).unwrap());
    }
}
