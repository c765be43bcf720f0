//! Replays every file of `corpus/<target>/` through its target, so that the normal test run
//! (stable, no libFuzzer) keeps every input the fuzzer found interesting passing. A target
//! whose corpus directory is missing or empty fails: a replay of nothing proves nothing.

use std::fs;
use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files
}

fn replay(target: &str) {
    let (_, run) = vmm_fuzz::TARGETS
        .into_iter()
        .find(|(name, _)| *name == target)
        .unwrap();
    let files = corpus(target);
    for file in &files {
        let data = fs::read(file).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        if let Err(panic) = outcome {
            eprintln!("{target}: {} crashes the target", file.display());
            std::panic::resume_unwind(panic);
        }
    }
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn every_target_has_a_replay_test() {
    let tested = [
        "kernel_image",
        "config",
        "initramfs",
        "xsave_layout",
        "msr_filter",
        "devices",
        "exit_dispatch",
    ];
    let names: Vec<&str> = vmm_fuzz::TARGETS.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, tested);
}

#[test]
fn kernel_image() {
    replay("kernel_image");
}

#[test]
fn config() {
    replay("config");
}

#[test]
fn initramfs() {
    replay("initramfs");
}

#[test]
fn xsave_layout() {
    replay("xsave_layout");
}

#[test]
fn msr_filter() {
    replay("msr_filter");
}

#[test]
fn devices() {
    replay("devices");
}

#[test]
fn exit_dispatch() {
    replay("exit_dispatch");
}
