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

/// The job history's hot-path call (`History::record`, a `try_send` of the summary) and,
/// separately, the whole cost per job including the writer thread's serialise and append.
/// Batches of 1000 are flushed between timings so the queue never fills (a full queue
/// would measure the drop path instead).
fn history_benches(c: &mut Criterion) {
    use sakuga_telemetry::history::{FrameTotals, History, HistoryConfig, JobSummary};
    use sakuga_telemetry::{ErrorKind, Outcome, Stage};
    use std::time::Instant;

    let dir = tempfile::tempdir().expect("temp dir");
    let history = History::open(dir.path(), &HistoryConfig::default()).expect("history opens");
    let summary = JobSummary {
        finished_at: sakuga_telemetry::history::unix_now(),
        workload: Workload::Animation,
        outcome: Outcome::Oom,
        model: Some("sd15-anime".into()),
        settings: Some("512x512 euler 20 steps".into()),
        error_kind: Some(ErrorKind::Oom),
        error_stage: Some(Stage::Inference),
        latency_s: 3.2,
        queue_wait_s: Some(0.4),
        frames: FrameTotals::default(),
        config_generation: 3,
    };
    const BATCH: u64 = 1000;
    let flush = Duration::from_secs(30);
    c.bench_function("history_record", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH);
                let start = Instant::now();
                for _ in 0..n {
                    history.record(black_box(summary.clone()));
                }
                spent += start.elapsed();
                history.flush(flush);
                left -= n;
            }
            spent
        })
    });
    c.bench_function("history_record_and_write", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters {
                history.record(black_box(summary.clone()));
                if i % BATCH == BATCH - 1 {
                    history.flush(flush);
                }
            }
            history.flush(flush);
            start.elapsed()
        })
    });
    assert_eq!(history.dropped(), 0, "the writer kept up");
}

criterion_group!(benches, record_benches, history_benches);
criterion_main!(benches);
