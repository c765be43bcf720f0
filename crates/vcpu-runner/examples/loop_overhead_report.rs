//! Prints the run loop's cost per exit against the raw `KVM_RUN` floor, as a ratio, from
//! interleaved batches measured in this one run.
//!
//! `cargo run --release -p vcpu-runner --example loop_overhead_report [batches]`

use kvm_ioctls::Kvm;

#[path = "../benches/support/loop_guest.rs"]
mod loop_guest;

use loop_guest::{RawLoop, RunnerLoop, EXITS};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let batches: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 30,
    };
    let kvm = Kvm::new()?;
    let mut raw = RawLoop::new(&kvm);
    let mut runner = RunnerLoop::new(&kvm);
    // Warm up both paths (page faults, thread creation, caches).
    raw.batch();
    runner.batch();
    let (mut raw_ns, mut runner_ns) = (Vec::new(), Vec::new());
    for _ in 0..batches.max(1) {
        raw_ns.push(raw.batch().as_nanos() as f64 / f64::from(EXITS));
        runner_ns.push(runner.batch().as_nanos() as f64 / f64::from(EXITS));
    }
    let (raw_median, runner_median) = (median(raw_ns), median(runner_ns));
    println!(
        "vendor module: {}",
        kvm_test_support::harness::vendor_module().unwrap_or("unknown")
    );
    println!(
        "batches: {} x {EXITS} port-write exits each",
        batches.max(1)
    );
    println!("raw KVM_RUN floor:   {raw_median:8.0} ns/exit (median)");
    println!("vcpu-runner loop:    {runner_median:8.0} ns/exit (median)");
    println!(
        "overhead per exit:   {:8.0} ns, ratio runner/raw = {:.3}",
        runner_median - raw_median,
        runner_median / raw_median
    );
    Ok(())
}
