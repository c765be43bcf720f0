//! `vmm-reference`: parse the command line, build a configuration, build the VM, run it, and
//! map how it ended to the exit status. Everything else is in the library.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use vmm_reference::cli::{error_chain, Cli, CliCommand, EXIT_USAGE};
use vmm_reference::probe;
use vmm_reference::profile::BootProfile;
use vmm_reference::terminal::{self, RawTerminal};
use vmm_reference::vmm::{RunOutcome, Vmm};

/// Exit status for a failure of the VMM itself (KVM setup, I/O).
const EXIT_VMM_ERROR: u8 = 4;

fn fail(code: u8, e: &dyn std::error::Error) -> ExitCode {
    eprintln!("vmm-reference: error: {}", error_chain(e));
    ExitCode::from(code)
}

fn boot(args: &vmm_reference::cli::BootArgs, started: Instant) -> ExitCode {
    // From here on a terminating signal is recorded rather than fatal: one that arrives while
    // the VM is built ends the VMM cleanly right after, before any guest code runs.
    if let Err(e) = terminal::install_termination_handlers() {
        return fail(EXIT_VMM_ERROR, &e);
    }
    let config = match args.to_config().and_then(|c| c.validate()) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE as u8, &e),
    };
    let profile = args.profile.then(|| BootProfile::new(started));
    let out = Box::new(std::io::stdout());
    let built = match &profile {
        Some(p) => Vmm::build_profiled(&config, out, p),
        None => Vmm::build(&config, out),
    };
    let vmm = match built {
        Ok(v) => v,
        Err(e) if e.is_input_error() => return fail(EXIT_USAGE as u8, &e),
        Err(e) => return fail(EXIT_VMM_ERROR, &e),
    };
    if let Some(signal) = terminal::termination_signal() {
        let outcome = RunOutcome::Signal(signal);
        eprintln!("vmm-reference: {outcome}");
        return ExitCode::from(outcome.exit_code() as u8);
    }
    // Restored when `terminal` drops, on every return below.
    let terminal = match RawTerminal::enter_if_tty(libc::STDIN_FILENO) {
        Ok(t) => t,
        Err(e) => return fail(EXIT_VMM_ERROR, &e),
    };
    if let Err(e) = vmm.forward_console_input(std::io::stdin()) {
        return fail(EXIT_VMM_ERROR, &e);
    }
    let outcome = vmm.run();
    drop(terminal);
    if let Some(p) = profile {
        eprint!("\nvmm-reference: {p}");
    }
    match outcome {
        Ok(outcome) => {
            eprintln!("\nvmm-reference: {outcome}");
            ExitCode::from(outcome.exit_code() as u8)
        }
        Err(e) => fail(EXIT_VMM_ERROR, &e),
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match &cli.command {
        CliCommand::Boot(args) => boot(args, started),
        CliCommand::Probe { json } => match probe::probe() {
            Ok(report) if *json => match serde_json::to_string_pretty(&report) {
                Ok(s) => {
                    println!("{s}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_VMM_ERROR, &e),
            },
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_VMM_ERROR, &e),
        },
    }
}
