//! The `Signals` handle end to end on a manual clock: FPS health, SLO accessors, snapshots
//! and every diagnosis rule with a positive and a negative case.

use std::sync::Arc;
use std::time::Duration;

use sakuga_telemetry::diagnosis::{self, DiagnosisConfig};
use sakuga_telemetry::quality::{FrameChecker, QualityConfig};
use sakuga_telemetry::slo::SloId;
use sakuga_telemetry::{
    Clock, DeviceSample, ErrorKind, JobReport, ManualClock, Outcome, Signals, SignalsConfig,
    SignalsSnapshot, Stage, Window, Workload,
};

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Signals on a manual clock that starts at 1000 s.
fn signals() -> (Signals, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(secs(1000.0)));
    (
        Signals::with_clock(SignalsConfig::default(), clock.clone()),
        clock,
    )
}

/// Feeds `seconds` of one animation stream: produced at `produced_fps`, delivered at
/// `delivered_fps`, starting at the clock's now; leaves the clock at the end.
fn stream(
    signals: &Signals,
    clock: &ManualClock,
    seconds: f64,
    produced_fps: f64,
    delivered_fps: f64,
) {
    let stream = signals.stream(Workload::Animation, 24.0);
    let start = clock.now();
    let produced = (seconds * produced_fps) as u64;
    let delivered = (seconds * delivered_fps) as u64;
    for i in 0..produced {
        stream.frame_produced_at(start + secs(i as f64 / produced_fps));
    }
    for i in 0..delivered {
        stream.frame_delivered_at(start + secs(i as f64 / delivered_fps));
    }
    clock.set(start + secs(seconds));
}

fn rules(findings: &[diagnosis::Finding]) -> Vec<&str> {
    findings.iter().map(|f| f.rule.as_str()).collect()
}

fn device(utilization: f64, used: u64) -> DeviceSample {
    DeviceSample {
        device: "cuda:0".into(),
        memory_used_bytes: used,
        memory_total_bytes: 100,
        utilization_ratio: utilization,
    }
}

#[test]
fn produced_30_delivered_18_is_a_client_bottleneck() {
    let (signals, clock) = signals();
    stream(&signals, &clock, 300.0, 30.0, 18.0);
    let snap = signals.snapshot();
    let g = snap
        .golden(Workload::Animation, Window::FiveMinutes)
        .unwrap();
    let health = g.fps_health.unwrap();
    assert!((health - 0.6).abs() < 0.01, "fps health {health}");
    // Deviation over 20% for the window: degraded.
    assert!(1.0 - health > 0.2);
    assert!(signals.is_fps_degraded(Workload::Animation));
    // Delivered intervals are 1/18 s: every one misses the 24 FPS floor.
    let fps_slo = snap.slo(SloId::AnimationFps).unwrap();
    assert_eq!(fps_slo.good_ratio, Some(0.0));

    let findings = diagnosis::diagnose(&snap, &DiagnosisConfig::default());
    assert_eq!(rules(&findings), [diagnosis::DELIVERED_FPS_DEVIATION]);
    let finding = &findings[0];
    assert!(
        finding
            .probable_cause
            .contains("client/CDN/network bottleneck")
    );
    assert_eq!(
        finding.runbook_url,
        "docs/runbooks/SakugaDeliveredFpsDeviation.md"
    );
    let produced = finding
        .evidence
        .iter()
        .find(|e| e.name == "produced_fps")
        .unwrap();
    assert!((produced.value - 30.0).abs() < 0.5);
    assert!(diagnosis::render_findings(&findings).contains("client/CDN/network bottleneck"));
}

#[test]
fn healthy_stream_has_no_findings() {
    let (signals, clock) = signals();
    stream(&signals, &clock, 300.0, 30.0, 30.0);
    let snap = signals.snapshot();
    assert!(!signals.is_fps_degraded(Workload::Animation));
    assert_eq!(snap.slo(SloId::AnimationFps).unwrap().good_ratio, Some(1.0));
    assert!(diagnosis::diagnose(&snap, &DiagnosisConfig::default()).is_empty());
}

#[test]
fn low_produced_fps_with_hot_device_is_a_heavy_model() {
    let (signals, clock) = signals();
    for _ in 0..10 {
        signals.device_sample(&device(0.97, 80));
        clock.advance(secs(1.0));
    }
    clock.set(secs(1000.0));
    stream(&signals, &clock, 300.0, 12.0, 12.0);
    let findings = diagnosis::diagnose(&signals.snapshot(), &DiagnosisConfig::default());
    assert_eq!(
        rules(&findings),
        [diagnosis::PRODUCED_FPS_LOW_HIGH_UTILIZATION]
    );
    assert!(
        findings[0]
            .probable_cause
            .contains("model too heavy or VRAM thrash")
    );
}

#[test]
fn low_produced_fps_with_idle_device_is_not_a_heavy_model() {
    let (signals, clock) = signals();
    signals.device_sample(&device(0.30, 20));
    stream(&signals, &clock, 300.0, 12.0, 12.0);
    let findings = diagnosis::diagnose(&signals.snapshot(), &DiagnosisConfig::default());
    assert!(findings.is_empty(), "{findings:?}");
}

/// Ten minutes of fast single-image jobs with a steady queue, then `tail` seconds of slow
/// jobs while the queue goes from 2 to `final_depth`.
fn saturation(tail_latency: f64, final_depth: usize) -> SignalsSnapshot {
    let (signals, clock) = signals();
    let w = Workload::SingleImage;
    signals.queue_depth(w, 2);
    for _ in 0..600 {
        signals.job_finished(&JobReport::new(w, Outcome::Success, secs(1.5)));
        clock.advance(secs(1.0));
    }
    for i in 0..60 {
        signals.job_finished(&JobReport::new(w, Outcome::Success, secs(tail_latency)));
        signals.queue_depth(w, 2 + (final_depth - 2) * i / 59);
        clock.advance(secs(1.0));
    }
    signals.snapshot()
}

#[test]
fn growing_tail_and_rising_queue_is_scheduler_saturation() {
    let snap = saturation(12.0, 20);
    let findings = diagnosis::diagnose(&snap, &DiagnosisConfig::default());
    assert_eq!(rules(&findings), [diagnosis::SCHEDULER_SATURATION]);
    assert_eq!(findings[0].workload, Some(Workload::SingleImage));
    assert!(findings[0].action.contains("add workers"));
}

#[test]
fn growing_tail_with_flat_queue_is_not_saturation() {
    let snap = saturation(12.0, 3);
    assert!(diagnosis::diagnose(&snap, &DiagnosisConfig::default()).is_empty());
    let snap = saturation(1.5, 20);
    assert!(diagnosis::diagnose(&snap, &DiagnosisConfig::default()).is_empty());
}

#[test]
fn ooms_after_a_config_change_point_at_the_change() {
    let (signals, clock) = signals();
    signals.config_changed("0.1.0", "abc123");
    for _ in 0..4 {
        clock.advance(secs(30.0));
        signals.error(ErrorKind::Oom, Stage::Inference);
        signals.job_finished(&JobReport::new(Workload::Batch, Outcome::Oom, secs(3.0)));
    }
    let snap = signals.snapshot();
    assert_eq!(snap.config.ooms_since_change, 4);
    let findings = diagnosis::diagnose(&snap, &DiagnosisConfig::default());
    assert_eq!(rules(&findings), [diagnosis::OOM_SPIKE_AFTER_CONFIG_CHANGE]);
    assert!(findings[0].action.contains("roll back"));
}

#[test]
fn ooms_long_after_a_change_or_without_one_are_not_blamed_on_it() {
    let (signals, clock) = signals();
    for _ in 0..4 {
        signals.error(ErrorKind::Oom, Stage::Inference);
    }
    assert!(diagnosis::diagnose(&signals.snapshot(), &DiagnosisConfig::default()).is_empty());
    signals.config_changed("0.1.0", "abc123");
    clock.advance(secs(3600.0));
    for _ in 0..4 {
        signals.error(ErrorKind::Oom, Stage::Inference);
    }
    assert!(diagnosis::diagnose(&signals.snapshot(), &DiagnosisConfig::default()).is_empty());
}

/// Ten minutes of batch jobs (inference 2 s, post-process 0.3 s), then two minutes with
/// post-process `post` and inference `infer`.
fn postprocess(post: f64, infer: f64) -> SignalsSnapshot {
    let (signals, clock) = signals();
    let w = Workload::Batch;
    for _ in 0..120 {
        signals.stage_finished(w, Stage::Inference, secs(2.0));
        signals.stage_finished(w, Stage::Postprocess, secs(0.3));
        clock.advance(secs(5.0));
    }
    for _ in 0..24 {
        signals.stage_finished(w, Stage::Inference, secs(infer));
        signals.stage_finished(w, Stage::Postprocess, secs(post));
        clock.advance(secs(5.0));
    }
    signals.snapshot()
}

#[test]
fn slow_postprocess_on_its_own_is_an_upscaler_regression() {
    let findings = diagnosis::diagnose(&postprocess(3.0, 2.0), &DiagnosisConfig::default());
    assert_eq!(rules(&findings), [diagnosis::POSTPROCESS_SLOW]);
    assert!(
        findings[0]
            .probable_cause
            .contains("upscaler/interpolator regression")
    );
}

#[test]
fn slow_postprocess_with_slow_inference_is_not_a_postprocess_regression() {
    let findings = diagnosis::diagnose(&postprocess(3.0, 6.0), &DiagnosisConfig::default());
    assert!(findings.is_empty(), "{findings:?}");
    let findings = diagnosis::diagnose(&postprocess(0.3, 2.0), &DiagnosisConfig::default());
    assert!(findings.is_empty(), "{findings:?}");
}

#[test]
fn headroom_accessors_follow_the_latest_sample() {
    let (signals, _clock) = signals();
    assert!(
        signals.headroom_ok(),
        "no sample yet must not block admission"
    );
    signals.device_sample(&device(0.8, 80));
    assert!(signals.headroom_ok());
    assert!(!signals.fits_in_headroom(10));
    signals.device_sample(&device(0.8, 95));
    assert!(!signals.headroom_ok());
    let status = signals.slo_status(SloId::MemoryHeadroom);
    assert_eq!((status.total, status.bad), (2, 1));
}

#[test]
fn job_outcomes_feed_success_latency_and_budget_slos() {
    let (signals, clock) = signals();
    for i in 0..200 {
        let outcome = if i < 2 {
            Outcome::Timeout
        } else {
            Outcome::Success
        };
        signals.job_finished(&JobReport::new(Workload::Batch, outcome, secs(2.0)).with_images(4));
        clock.advance(secs(0.5));
    }
    signals.job_finished(&JobReport::new(
        Workload::SingleImage,
        Outcome::Success,
        secs(6.0),
    ));
    signals.job_finished(
        &JobReport::new(Workload::SingleImage, Outcome::Success, secs(6.0))
            .with_resolution(1536, 768),
    );
    signals.job_finished(&JobReport::new(
        Workload::Batch,
        Outcome::Cancelled,
        secs(1.0),
    ));
    let batch = signals.slo_status(SloId::BatchSuccess);
    assert_eq!((batch.total, batch.bad), (200, 2));
    // 1% bad against a 0.5% allowance: burning twice as fast as the budget allows.
    assert!((batch.burn_rate(sakuga_telemetry::slo::BurnWindow::H1) - 2.0).abs() < 1e-9);
    let latency = signals.slo_status(SloId::SingleImageLatency);
    // 6 s misses the 5 s target at 768x768 but meets the 10 s target at 1536x768.
    assert_eq!((latency.total, latency.bad), (2, 1));
    let g = signals.golden(Workload::Batch, Window::TwoMinutes);
    assert_eq!(g.jobs_finished, 201);
    assert!((g.success_ratio.unwrap() - 198.0 / 200.0).abs() < 1e-9);
}

#[test]
fn snapshot_round_trips_through_a_file_and_renders() {
    let (signals, clock) = signals();
    stream(&signals, &clock, 60.0, 30.0, 18.0);
    signals.job_finished(&JobReport::new(
        Workload::SingleImage,
        Outcome::Success,
        secs(2.0),
    ));
    let snap = signals.snapshot();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signals.json");
    snap.save(&path).unwrap();
    let loaded = SignalsSnapshot::load(&path).unwrap();
    assert_eq!(loaded, snap);
    let text = loaded.render_text();
    assert!(text.contains("animation"), "{text}");
    assert!(text.contains("health 0.6"), "{text}");
    assert!(text.contains("single_image"), "{text}");
    std::fs::write(&path, "{").unwrap();
    assert!(SignalsSnapshot::load(&path).is_err());
}

#[test]
fn quality_checks_count_duplicates_and_rejections() {
    let (signals, _clock) = signals();
    let mut checker = FrameChecker::new(QualityConfig::default());
    let frame = vec![0.5f32; 4 * 4 * 3];
    let mut frame2 = frame.clone();
    frame2[0] = 0.9;
    checker.check(&frame2, 4, 4, 3).unwrap();
    let report = checker.check(&frame2, 4, 4, 3).unwrap();
    assert!(report.duplicate);
    signals.frame_checked(Workload::Animation, &report);
    let blank = checker.check(&frame, 4, 4, 3).unwrap();
    assert!(blank.blank);
    signals.frame_checked(Workload::Animation, &blank);
    let stream = signals.stream(Workload::Animation, 24.0);
    stream.frame_delivered();
    let g = signals.golden(Workload::Animation, Window::TwoMinutes);
    assert_eq!(g.duplicated_ratio, Some(1.0));
}

#[test]
fn frame_stream_samples_events_and_flags_slow_frames() {
    let config = SignalsConfig {
        frame_events_every: Some(10),
        ..SignalsConfig::default()
    };
    let clock = Arc::new(ManualClock::new(secs(5.0)));
    let signals = Signals::with_clock(config, clock.clone());
    let stream = signals.stream(Workload::Animation, 24.0);
    let mut logged = Vec::new();
    for i in 0..20 {
        // Frame 13 arrives late (100 ms after the previous one).
        clock.advance(if i == 13 { secs(0.1) } else { secs(1.0 / 30.0) });
        let frame = stream.frame_produced();
        if stream.should_log(&frame, false) {
            logged.push(frame.index);
        }
    }
    assert_eq!(logged, [0, 10, 13]);
}

#[test]
fn client_playback_reports_feed_fps_and_drop_slos() {
    let (signals, clock) = signals();
    let stream = signals.stream(Workload::Animation, 24.0);
    let start = clock.now();
    for i in 0..3000 {
        stream.frame_produced_at(start + secs(i as f64 / 30.0));
    }
    clock.advance(secs(100.0));
    let report = sakuga_telemetry::PlaybackReport {
        delivered_frames: 2900,
        dropped_frames: 100,
        duplicated_frames: 0,
        late_frames: 29,
    };
    signals.playback_report(Workload::Animation, &report);
    let dropped = signals.slo_status(SloId::AnimationDroppedFrames);
    assert_eq!((dropped.total, dropped.bad), (3000, 100));
    let fps = signals.slo_status(SloId::AnimationFps);
    assert_eq!((fps.total, fps.bad), (2900, 29));
    let g = signals.golden(Workload::Animation, Window::TwoMinutes);
    assert!((g.dropped_ratio.unwrap() - 100.0 / 3000.0).abs() < 1e-9);
    assert!((g.fps_health.unwrap() - 2900.0 / 3000.0).abs() < 1e-9);
    assert!(!signals.is_planned_heavy_load());
    signals.planned_heavy_load(sakuga_telemetry::PlannedLoad::Warmup, true);
    assert!(signals.is_planned_heavy_load());
    assert!(signals.snapshot().planned_heavy_load);
}

#[test]
fn a_new_slo_config_judges_what_comes_after_it_and_keeps_history() {
    let (signals, _clock) = signals();
    let single = |s: f64| JobReport::new(Workload::SingleImage, Outcome::Success, secs(s));
    signals.job_finished(&single(4.0));
    let before = signals.slo_status(SloId::SingleImageLatency);
    assert_eq!(
        (before.total, before.bad),
        (1, 0),
        "4 s meets the default 5 s"
    );

    let mut stricter = SignalsConfig::default();
    stricter.slo.single_image.latency_target_s = 3.0;
    stricter.slo.single_image.objective = 0.9;
    assert!(signals.set_config(stricter.clone()));
    assert!(
        !signals.set_config(stricter),
        "the same config again changes nothing"
    );
    signals.job_finished(&single(4.0));
    let after = signals.slo_status(SloId::SingleImageLatency);
    assert_eq!(
        (after.total, after.bad),
        (2, 1),
        "the earlier job keeps its verdict"
    );
    assert_eq!(after.objective, 0.9);
}

#[test]
fn planned_load_shorter_than_its_hold_stays_visible_until_the_hold_ends() {
    use sakuga_telemetry::PlannedLoad;
    let (signals, clock) = signals();
    // Default hold: two 15 s scrape intervals.
    signals.planned_heavy_load(PlannedLoad::Warmup, true);
    clock.advance(secs(2.0));
    signals.planned_heavy_load(PlannedLoad::Warmup, false);
    assert!(
        signals.is_planned_heavy_load(),
        "a 2 s warmup is still on: a scrape every 15 s would miss it"
    );
    clock.advance(secs(27.0));
    signals.tick();
    assert!(signals.is_planned_heavy_load(), "29 s after it began");
    clock.advance(secs(1.5));
    signals.tick();
    assert!(
        !signals.is_planned_heavy_load(),
        "off once the 30 s hold has passed"
    );

    // A load that ran longer than the hold goes off at once; one that restarts while held
    // stays on.
    signals.planned_heavy_load(PlannedLoad::Warmup, true);
    clock.advance(secs(40.0));
    signals.planned_heavy_load(PlannedLoad::Warmup, false);
    assert!(!signals.is_planned_heavy_load());
    signals.planned_heavy_load(PlannedLoad::Warmup, true);
    clock.advance(secs(1.0));
    signals.planned_heavy_load(PlannedLoad::Warmup, false);
    signals.planned_heavy_load(PlannedLoad::Warmup, true);
    clock.advance(secs(60.0));
    signals.tick();
    assert!(
        signals.is_planned_heavy_load(),
        "on again: the hold no longer applies"
    );
}

#[test]
fn fps_is_judged_per_running_stream_not_over_idle_time() {
    let (signals, clock) = signals();
    let preview = signals.stream(Workload::Animation, 24.0);
    let start = clock.now();
    for i in 0..48 {
        let at = start + secs(i as f64 / 24.0);
        preview.frame_produced_at(at);
        preview.frame_delivered_at(at);
    }
    clock.set(start + secs(2.0));
    assert!(!signals.is_fps_degraded(Workload::Animation), "healthy");
    // The 2-minute window now averages well under 24 FPS; the stream itself was fine.
    preview.end();
    clock.advance(secs(30.0));
    assert!(
        !signals.is_fps_degraded(Workload::Animation),
        "nothing runs"
    );

    let slow = signals.stream(Workload::Animation, 24.0);
    let start = clock.now();
    for i in 0..24 {
        slow.frame_produced_at(start + secs(i as f64 / 12.0));
    }
    clock.set(start + secs(2.0));
    assert!(signals.is_fps_degraded(Workload::Animation), "12 of 24 FPS");
    assert!(!signals.is_fps_degraded(Workload::Batch));
    slow.end();
    assert!(!signals.is_fps_degraded(Workload::Animation), "it ended");
}
