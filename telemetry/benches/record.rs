//! Hot-path recording cost: one counter increment, one histogram record, one window record.
//!
//! Run with `cargo bench -p sakuga-telemetry --bench record`. Target: under 100 ns each.
//! The Prometheus recorder is installed globally first, as in production. `*_handle`
//! variants use pre-registered handles (`record::FrameMetrics`, what `Signals` uses per frame).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sakuga_telemetry::prometheus::{self, PrometheusConfig};
use sakuga_telemetry::window::Windows;
use sakuga_telemetry::{FrameKind, FrameSide, Workload, record};

fn record_benches(c: &mut Criterion) {
    let _handle = prometheus::install(&PrometheusConfig::in_process()).expect("recorder installs");

    c.bench_function("counter_increment", |b| {
        b.iter(|| {
            record::frame(
                black_box(Workload::Animation),
                black_box(FrameKind::Produced),
            )
        })
    });

    let interval = Duration::from_micros(33_333);
    c.bench_function("histogram_record", |b| {
        b.iter(|| {
            record::frame_interval(
                black_box(Workload::Animation),
                black_box(FrameSide::Produced),
                black_box(interval),
            )
        })
    });

    let handles = record::FrameMetrics::new();
    c.bench_function("counter_increment_handle", |b| {
        b.iter(|| handles.frames(black_box(Workload::Animation), FrameKind::Produced, 1))
    });
    c.bench_function("histogram_record_handle", |b| {
        b.iter(|| {
            handles.interval(
                black_box(Workload::Animation),
                FrameSide::Produced,
                interval,
            )
        })
    });

    let windows = Windows::new(Duration::ZERO);
    let mut at = Duration::ZERO;
    c.bench_function("window_record", |b| {
        b.iter(|| {
            // Walk time forward so slots roll over as they do in production.
            at += Duration::from_micros(100);
            windows.frame(
                black_box(at),
                Workload::Animation,
                FrameSide::Produced,
                Some(black_box(interval)),
            )
        })
    });
}

criterion_group!(benches, record_benches);
criterion_main!(benches);
