//! `cargo xtask`: parse the task, run it, map the outcome to an exit status.

use std::error::Error;
use std::process::ExitCode;

use clap::Parser;
use xtask::cli::{Cli, Task};
use xtask::{
    ci, coverage, debian, demo, guest, l1, nested, nested_soak, nested_tests, protocol, setup,
};

/// Exit status when a task could not do its job at all (as `docker run` uses it).
const EXIT_TASK_FAILED: u8 = 125;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cache_dir = xtask::cache_dir();
    match cli.task {
        Task::Nested(args) => match nested::run(&cache_dir, &args) {
            Ok(rc) => ExitCode::from(rc),
            Err(nested::Error::Host(l1::Error::NoKvm(message))) => {
                eprintln!("error: L1 has no usable kvm-amd: {message}");
                ExitCode::from(protocol::SETUP_FAILED_RC)
            }
            Err(e) => fail(&e),
        },
        Task::NestedTests(args) => {
            match nested_tests::run(&xtask::workspace_root(), &cache_dir, &args) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => fail(&e),
            }
        }
        Task::NestedSoak(args) => {
            match nested_soak::run(&xtask::workspace_root(), &cache_dir, &args) {
                Ok(report) if report.passed() => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e) => fail(&e),
            }
        }
        Task::GuestInitramfs { out } => {
            match guest::write_initramfs(std::path::Path::new(l1::BUSYBOX), &out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Task::MinimalVersions => match xtask::minimal_versions::run(&xtask::workspace_root()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Task::BuildVmm => match demo::build_vmm(&xtask::workspace_root()) {
            Ok(path) => {
                println!("{}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Task::Demo(args) => match demo::run(&xtask::workspace_root(), &cache_dir, &args) {
            Ok(rc) => ExitCode::from(rc),
            Err(e) => fail(&e),
        },
        Task::Setup => match setup::ensure() {
            Ok(()) => {
                println!("setup: everything the nested test host and the demo need is installed");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Task::NestedKernel { vmlinux } => match debian::KernelCache::new(&cache_dir).get_or_fetch()
        {
            Ok(kernel) if vmlinux => match xtask::vmlinux::cached(&kernel.vmlinuz, &kernel.release)
            {
                Ok(path) => {
                    println!("{}", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            },
            Ok(kernel) => {
                println!("{}", kernel.vmlinuz.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Task::Ci => match ci::run(&xtask::workspace_root()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ci: FAILED");
                fail(&e)
            }
        },
        Task::Coverage => match coverage::run(&xtask::workspace_root()) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
    }
}

/// Prints `error` with its chain of causes and returns [`EXIT_TASK_FAILED`].
fn fail(error: &dyn Error) -> ExitCode {
    eprintln!("error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
    ExitCode::from(EXIT_TASK_FAILED)
}
