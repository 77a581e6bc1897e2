//! Frame interpolation benchmark: one 2x interpolation (one in-between frame at t = 0.5)
//! of a 256x256 pair, for each RIFE layout sakuga runs, on deterministic random weights:
//! - `prelu_demo`: `sakuga-demo-rife.safetensors` (the PReLU layout at demo widths);
//! - `v46_real_widths`: RIFE 4.6's ResConv layout at its real widths (192/128/96/64);
//! - `v425_demo`: `sakuga-demo-rife425.safetensors`, RIFE 4.25 at its real widths.
//!
//! Run with `cargo bench -p sakuga-models --bench interpolate`. On a shared machine,
//! `SAKUGA_BENCH_ROUNDS=N` skips criterion and instead times the three networks in turn,
//! N rounds, printing each one's median and range: interleaving puts all three under the
//! same background load, so their ratio holds even when the absolute times drift.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group};
use sakuga_models::interpolate::Interpolator;
use sakuga_models::interpolate::demo::{
    demo_rife_state_dict, demo_rife425_state_dict, rife46_real_widths_state_dict,
};

/// Two 256x256 BHWC frames, the second shifted, batched for `interpolate_sequence`.
fn pair(side: usize) -> Tensor {
    let frame = |shift: f64| {
        Tensor::arange(0u32, (side * side * 3) as u32, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| (t.affine(0.002, shift)?).sin()?.affine(0.4, 0.5))
            .and_then(|t| t.reshape((1, side, side, 3)))
            .expect("frame tensor")
    };
    Tensor::cat(&[frame(0.0), frame(0.3)], 0).expect("pair")
}

fn nets() -> Vec<(&'static str, Interpolator)> {
    [
        ("prelu_demo", demo_rife_state_dict()),
        ("v46_real_widths", rife46_real_widths_state_dict()),
        ("v425_demo", demo_rife425_state_dict()),
    ]
    .into_iter()
    .map(|(name, weights)| {
        let weights = weights.expect("demo weights");
        (
            name,
            Interpolator::from_state_dict(&weights).expect("loads"),
        )
    })
    .collect()
}

fn bench_rife(c: &mut Criterion) {
    let frames = pair(256);
    let mut group = c.benchmark_group("rife_2x_256x256");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for (name, interpolator) in nets() {
        group.bench_function(name, |b| {
            b.iter(|| {
                interpolator
                    .interpolate_sequence(&frames, 2)
                    .expect("interpolate")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_rife);

fn interleaved(rounds: usize) {
    let frames = pair(256);
    let nets = nets();
    let mut times = vec![Vec::new(); nets.len()];
    for round in 0..=rounds {
        for ((_, interpolator), samples) in nets.iter().zip(&mut times) {
            let started = Instant::now();
            interpolator
                .interpolate_sequence(&frames, 2)
                .expect("interpolate");
            // Round 0 warms caches and the thread pool.
            if round > 0 {
                samples.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    for ((name, _), mut samples) in nets.iter().zip(times) {
        samples.sort_by(f64::total_cmp);
        let median = samples[samples.len() / 2];
        let (lo, hi) = (samples[0], samples[samples.len() - 1]);
        println!("{name}: median {median:.1} ms (min {lo:.1}, max {hi:.1}, {rounds} rounds)");
    }
}

fn main() {
    if let Some(rounds) = std::env::var("SAKUGA_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
    {
        interleaved(rounds);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
