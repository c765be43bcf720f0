//! The run loop's cost per exit against the raw `KVM_RUN` floor, measured in the same run.
//!
//! Both loops run the same guest (`support/loop_guest.rs`): one port write per exit. `raw_kvm_run`
//! calls `KVM_RUN` and matches the exit; `vcpu_runner` goes through the vCPU thread, the run
//! loop's command check, `dispatch` and the PIO bus to a device. Throughput is per exit.
//! `cargo run --release -p vcpu-runner --example loop_overhead_report` prints the ratio.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvm_ioctls::Kvm;

#[path = "support/loop_guest.rs"]
mod loop_guest;

use loop_guest::{RawLoop, RunnerLoop, EXITS};

fn loop_overhead(c: &mut Criterion) {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("loop_overhead: skipped, /dev/kvm is unusable: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group("loop_overhead");
    group.throughput(Throughput::Elements(u64::from(EXITS)));
    group.sample_size(20);
    let mut raw = RawLoop::new(&kvm);
    group.bench_function("raw_kvm_run", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| raw.batch()).sum())
    });
    let mut runner = RunnerLoop::new(&kvm);
    group.bench_function("vcpu_runner", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| runner.batch()).sum())
    });
    group.finish();

    // The ratio from interleaved batches of this same run, so both see the same machine load.
    let (mut raw_total, mut runner_total) = (0u128, 0u128);
    for _ in 0..10 {
        raw_total += raw.batch().as_nanos();
        runner_total += runner.batch().as_nanos();
    }
    let per_exit = |total: u128| total as f64 / (10.0 * f64::from(EXITS));
    println!(
        "loop_overhead: raw KVM_RUN {:.0} ns/exit, vcpu-runner {:.0} ns/exit, ratio {:.3}",
        per_exit(raw_total),
        per_exit(runner_total),
        runner_total as f64 / raw_total as f64
    );
}

criterion_group!(benches, loop_overhead);
criterion_main!(benches);
