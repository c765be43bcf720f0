//! A per-run scratch directory under the cache, removed when the run ends.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// A directory that exists for the lifetime of this value.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `<parent>/run-<pid>`, emptying it first if a crashed run with the same process
    /// id left it behind.
    pub fn create(parent: &Path) -> io::Result<Self> {
        let path = parent.join(format!("run-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Best effort: a leftover directory only costs disk space and is reused by pid.
        let _ = fs::remove_dir_all(&self.path);
    }
}
