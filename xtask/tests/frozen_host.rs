//! The nested runner's watchdog against a real test host that is silenced on purpose.
//!
//! A step stops L1's heartbeat loop and then sleeps without printing: from the host that is
//! exactly what a frozen test host looks like (no console line, no heartbeat). The runner
//! must name it, boot L1 again, resume at that step without rerunning the steps that ended,
//! and give up with an error once the retry bound is used up.
//!
//! Needs `qemu-system-x86_64`, `/bin/busybox` and the cached L1 kernel (fetched on first use);
//! without QEMU or busybox the tests are reported as ignored with the reason.

use std::time::Duration;

use libtest_mimic::{Arguments, Completion, Failed, Trial};
use xtask::init_script::{Step, HEARTBEAT_PID_FILE};
use xtask::l1::{self, L1Image, MachineOptions, ATTEMPT_ENV};

/// Short limits, so that each freeze costs seconds: the heartbeat comes every 2 s and healthy
/// runs showed at most 6.5 s between signs of life once it started (the quiet kernel boot
/// before it has the default's longer limit), so 20 s still tells a freeze from a busy host.
const OPTIONS: MachineOptions = MachineOptions {
    silence: Duration::from_secs(20),
    timeout: Duration::from_secs(300),
    step_timeout: Duration::from_secs(120),
    freeze_retries: 1,
    ..MachineOptions::DEFAULT
};

fn shell_step(label: &str, script: &str) -> Step {
    Step {
        label: label.into(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
    }
}

/// A step that freezes the host (as seen from outside) in the boots for which `condition`
/// holds, and otherwise prints `resumed`.
fn freezing_step(condition: &str) -> Step {
    shell_step(
        "freezes",
        &format!(
            "if {condition}; then kill -STOP $(cat {HEARTBEAT_PID_FILE}); exec sleep 100000; fi; echo resumed"
        ),
    )
}

fn missing_tools() -> Option<String> {
    let qemu = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("qemu-system-x86_64").is_file())
    });
    if !qemu {
        return Some("qemu-system-x86_64 is not installed (Debian: qemu-system-x86)".into());
    }
    if !std::path::Path::new(l1::BUSYBOX).exists() {
        return Some(format!(
            "{} is missing (Debian: busybox-static)",
            l1::BUSYBOX
        ));
    }
    None
}

fn boot(steps: Vec<Step>) -> l1::Result<l1::Outcome> {
    let image = L1Image::new(&xtask::cache_dir())?;
    image.boot(Vec::new(), steps, OPTIONS)
}

fn a_frozen_host_is_named_and_resumed_at_its_step() -> Result<(), Failed> {
    let outcome = boot(vec![
        shell_step("before", "echo ran-before"),
        freezing_step(&format!("[ \"${ATTEMPT_ENV}\" = 1 ]")),
        shell_step("after", "echo ran-after"),
    ])?;
    let labels: Vec<_> = outcome.steps.iter().map(|s| s.label.as_str()).collect();
    if labels != ["before", "freezes", "after"] {
        return Err(
            format!("steps run: {labels:?} (the step that ended must not run again)").into(),
        );
    }
    if outcome.rc != 0 || outcome.steps.iter().any(|s| s.rc != Some(0)) {
        return Err(format!("a step failed: {:?}", outcome.steps).into());
    }
    match outcome.freezes.as_slice() {
        [freeze] if freeze.step.as_deref() == Some("freezes") && freeze.attempt == 1 => Ok(()),
        other => Err(format!("expected one freeze in step `freezes`, got {other:?}").into()),
    }
}

fn freezes_beyond_the_bound_fail_the_run() -> Result<(), Failed> {
    match boot(vec![freezing_step("true")]) {
        Err(l1::Error::Frozen(reports)) => {
            let steps: Vec<_> = reports.iter().map(|r| r.step.as_deref()).collect();
            if steps == [Some("freezes"), Some("freezes")] {
                Ok(())
            } else {
                Err(format!("unexpected reports: {reports:?}").into())
            }
        }
        Err(other) => Err(format!("not reported as frozen: {other}").into()),
        Ok(outcome) => Err(format!("a host that always freezes passed: {outcome:?}").into()),
    }
}

fn main() {
    let mut args = Arguments::from_args();
    // One L1 at a time: two TCG machines on two cores would slow each other into the limits.
    args.test_threads = Some(1);
    let skip = missing_tools();
    let trial = |name: &str, test: fn() -> Result<(), Failed>| {
        let skip = skip.clone();
        Trial::ignorable_test(name, move || match skip {
            Some(reason) => Ok(Completion::ignored_with(reason)),
            None => test().map(|()| Completion::Completed),
        })
    };
    libtest_mimic::run(
        &args,
        vec![
            trial(
                "a_frozen_host_is_named_and_resumed_at_its_step",
                a_frozen_host_is_named_and_resumed_at_its_step,
            ),
            trial(
                "freezes_beyond_the_bound_fail_the_run",
                freezes_beyond_the_bound_fail_the_run,
            ),
        ],
    )
    .exit();
}
