//! A per-run scratch directory under the cache, removed when the run ends.

use std::fs;
use std::io;
use std::path::Path;

use tempfile::TempDir;

/// A directory that exists for the lifetime of this value (a [`TempDir`] under the cache).
#[derive(Debug)]
pub struct ScratchDir(TempDir);

impl ScratchDir {
    /// Creates a fresh `<parent>/run-XXXXXX` (and `parent` if it is missing).
    pub fn create(parent: &Path) -> io::Result<Self> {
        fs::create_dir_all(parent)?;
        tempfile::Builder::new()
            .prefix("run-")
            .tempdir_in(parent)
            .map(Self)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lives_under_the_parent_until_dropped() {
        let parent = TempDir::new().unwrap();
        let scratch = ScratchDir::create(&parent.path().join("cache")).unwrap();
        let path = scratch.path().to_owned();
        assert!(path.starts_with(parent.path().join("cache")), "{path:?}");
        fs::write(path.join("initrd.cpio"), b"x").unwrap();
        drop(scratch);
        assert!(!path.exists(), "{path:?} left behind");
    }
}
