//! Prints the golden-signals summary and the diagnosis of a simulated degraded preview.
//!
//! Run with `cargo run -p sakuga-telemetry --example signals_demo`.
//! Five minutes of an animation stream produced at 30 FPS but delivered at 18 FPS, plus a
//! few single-image jobs, on a manual clock (so it runs instantly).

use std::sync::Arc;
use std::time::Duration;

use sakuga_telemetry::diagnosis::{self, DiagnosisConfig};
use sakuga_telemetry::{
    DeviceSample, JobReport, ManualClock, Outcome, Signals, SignalsConfig, Stage, Workload,
};

fn main() {
    let clock = Arc::new(ManualClock::new(Duration::from_secs(60)));
    let signals = Signals::with_clock(SignalsConfig::default(), clock.clone());
    let start = clock.now_duration();
    let stream = signals.stream(Workload::Animation, 24.0);
    for i in 0..(300 * 30) {
        stream.frame_produced_at(start + Duration::from_secs_f64(i as f64 / 30.0));
    }
    for i in 0..(300 * 18) {
        stream.frame_delivered_at(start + Duration::from_secs_f64(i as f64 / 18.0));
    }
    clock.advance(Duration::from_secs(300));
    for latency in [2.1, 2.4, 3.3, 4.8, 6.0] {
        let job = JobReport::new(
            Workload::SingleImage,
            Outcome::Success,
            Duration::from_secs_f64(latency),
        );
        signals.job_finished(&job);
        signals.stage_finished(
            Workload::SingleImage,
            Stage::Postprocess,
            Duration::from_millis(180),
        );
    }
    signals.device_sample(&DeviceSample {
        device: "cuda:0".into(),
        memory_used_bytes: 60 << 30,
        memory_total_bytes: 80 << 30,
        utilization_ratio: 0.72,
    });

    let snapshot = signals.snapshot();
    print!("{}", snapshot.render_text());
    println!();
    print!(
        "{}",
        diagnosis::render_findings(&diagnosis::diagnose(&snapshot, &DiagnosisConfig::default()))
    );
}

/// `Clock::now` without importing the trait at every call site.
trait NowDuration {
    fn now_duration(&self) -> Duration;
}

impl NowDuration for ManualClock {
    fn now_duration(&self) -> Duration {
        sakuga_telemetry::Clock::now(self)
    }
}
