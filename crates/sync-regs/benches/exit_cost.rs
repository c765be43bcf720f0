//! Criterion bench of the per-exit cost of guest register access on a real guest exit loop:
//! (a) KVM_RUN alone, (b) GET/SET_REGS, (b') GET/SET_REGS and GET/SET_SREGS, (b'') GET/SET_REGS
//! and GET_SREGS, (c) sync regs with regs and sregs copied out, (c_regs) sync regs, regs only.
//! `examples/exit_cost_report.rs` prints the same figures as ratios from one run.
//!
//! Without a usable /dev/kvm the bench says so and measures nothing.

// The report example uses all of it; the bench does not need `measure`.
#[allow(dead_code)]
#[path = "support/exit_loop.rs"]
mod exit_loop;

use criterion::{criterion_group, criterion_main, Criterion};
use exit_loop::{ExitLoop, Variant};
use kvm_ioctls::Kvm;

fn exit_cost(c: &mut Criterion) {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("exit_cost: skipped, /dev/kvm is unusable: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group("exit_cost");
    for variant in Variant::ALL {
        let mut guest = match ExitLoop::new(&kvm, variant) {
            Ok(guest) => guest,
            Err(e) => {
                eprintln!("exit_cost: {}: setup failed: {e}", variant.label());
                continue;
            }
        };
        group.bench_function(variant.label(), |bencher| {
            bencher.iter(|| {
                if let Err(e) = guest.step() {
                    panic!("exit_cost: {}: {e}", variant.label());
                }
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = exit_cost
}
criterion_main!(benches);
