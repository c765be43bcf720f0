//! `cargo xtask nested`: run one command inside L1 and return its exit status.

use std::path::Path;

use crate::cli::NestedArgs;
use crate::image::GuestPath;
use crate::init_script::Step;
use crate::l1::{self, L1Image};
use crate::payload::{self, HostFile};

/// Errors from `cargo xtask nested`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building or booting L1 failed, or L1 did not report a result.
    #[error(transparent)]
    Host(#[from] l1::Error),
    /// A `--file` could not be resolved.
    #[error(transparent)]
    File(#[from] payload::Error),
    /// CMD is a path that neither the image nor the host has.
    #[error("{0}: no such file in the L1 image or on the host")]
    CommandNotFound(String),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Runs `args.command` in L1, with the kernel cached in `cache_dir`; returns its exit status.
pub fn run(cache_dir: &Path, args: &NestedArgs) -> Result<u8> {
    let Some((program, rest)) = args.command.split_first() else {
        return Err(Error::CommandNotFound(String::new()));
    };
    let mut image = L1Image::new(cache_dir)?;
    for file in args.host.host_files()? {
        image.add_host_file(&file)?;
    }
    let mut argv = vec![resolve_program(&mut image, program)?];
    argv.extend(rest.iter().cloned());
    let step = Step {
        label: program.clone(),
        argv,
    };
    let outcome = image.boot(args.host.env_pairs(), vec![step], args.host.machine())?;
    Ok(outcome.rc)
}

/// Decides what L1 runs for `program`:
///
/// * a bare name (`ls`) is looked up on L1's `PATH` (busybox applets, `--file` executables);
/// * a path the image already provides (`/bin/sh` is busybox) is used as it is;
/// * any other path is a host file, copied in at `/bin/<name>` with its libraries.
fn resolve_program(image: &mut L1Image, program: &str) -> Result<String> {
    if !program.contains('/') {
        return Ok(program.to_owned());
    }
    if program
        .parse::<GuestPath>()
        .is_ok_and(|path| image.provides(&path))
    {
        return Ok(program.to_owned());
    }
    if !Path::new(program).is_file() {
        return Err(Error::CommandNotFound(program.to_owned()));
    }
    let file = HostFile::with_default_dest(program.into())?;
    image.add_host_file(&file)?;
    Ok(file.dest.to_string())
}
