//! The engine end to end, in-process: submit and watch to completion with frames,
//! priorities, cancellation, queue caps, idempotency, deadlines, demand and the feature
//! flags. A gate node holds the device so queued states can be observed without sleeps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};
use serde_json::{Value as Json, json};

use sakuga_nodes::{
    ExecContext, InputSpec, Inputs, Node, NodeEnv, NodeError, NodeRegistry, NodeSchema, PortType,
    Value,
};
use sakuga_scheduler::admission::{AdmissionConfig, WorkloadValues};
use sakuga_scheduler::engine::clock::{Clock, ManualClock};
use sakuga_scheduler::engine::{EngineTunables, JobEvent, JobState, ListFilter, WatchItem};
use sakuga_scheduler::{EngineConfig, EngineHandle, SchedulerError, SubmitRequest};
use sakuga_telemetry::{AdmissionReason, Signals, SignalsConfig, Workload};

/// Blocks until its gate (by name) opens; returns its `value`.
struct Gate;
static GATES: LazyLock<(Mutex<Vec<String>>, Condvar)> = LazyLock::new(Default::default);
static GATE_RUNNING: AtomicBool = AtomicBool::new(false);
static GATE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("TestGate", "Gate", "test")
        .input(InputSpec::string("name", "", false))
        .input(InputSpec::link("images", PortType::Image))
        .output(PortType::Image)
});
impl Node for Gate {
    fn schema(&self) -> &NodeSchema {
        &GATE
    }
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let name = inputs.str("name")?.to_owned();
        GATE_RUNNING.store(true, Ordering::SeqCst);
        let (open, cv) = &*GATES;
        let mut open = open.lock();
        while !open.contains(&name) {
            if ctx.cancel.is_cancelled() {
                return Err(NodeError::Cancelled);
            }
            cv.wait_for(&mut open, Duration::from_millis(20));
        }
        Ok(vec![Value::Image(inputs.image("images")?.clone())])
    }
    fn cacheable(&self) -> bool {
        false
    }
}

/// Runs out of (pretend) device memory when asked to process more than `fits` images at
/// once, and honours the executor's batch limit the way the real batch nodes do.
struct MemoryHungry;
static MEMORY_HUNGRY: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("TestMemoryHungry", "Memory hungry", "test")
        .input(InputSpec::int("fits", 1, 0, 64))
        .input(InputSpec::link("images", PortType::Image))
        .output(PortType::Image)
});
impl Node for MemoryHungry {
    fn schema(&self) -> &NodeSchema {
        &MEMORY_HUNGRY
    }
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let images = inputs.image("images")?;
        let batch = images.dim(0)?;
        let at_once = ctx.batch_limit.unwrap_or(batch).min(batch);
        let fits = inputs.int("fits")? as usize;
        if at_once > fits {
            return Err(NodeError::Model(sakuga_models::ModelError::OverBudget {
                name: format!("{at_once} images"),
                needed: at_once as u64,
                budget: fits as u64,
            }));
        }
        Ok(vec![Value::Image(images.clone())])
    }
}

fn open_gate(name: &str) {
    GATES.0.lock().push(name.to_owned());
    GATES.1.notify_all();
}

fn engine_with(dir: &std::path::Path, config: EngineConfig) -> EngineHandle {
    let mut registry = NodeRegistry::with_builtins();
    registry.register(Gate);
    registry.register(MemoryHungry);
    let env = NodeEnv::new(dir.join("input"), dir.join("output"), dir.join("models"));
    std::fs::create_dir_all(&env.input_dir).unwrap();
    EngineHandle::start(
        config,
        Arc::new(registry),
        Arc::new(env),
        Signals::new(SignalsConfig::default()),
    )
    .unwrap()
}

fn frames_workflow(frames: u32) -> Json {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": frames, "color": 16777215}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "StreamFrames", "inputs": {"images": ["2", 0], "fps": 24.0, "pace": false}},
    })
}

/// No frames: an unwatched animation stream would (rightly) read as degraded FPS and
/// defer batch starts, which this test is not about.
fn preview_workflow(color: u32) -> Json {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    })
}

fn gated_workflow(gate: &str) -> Json {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "TestGate", "inputs": {"images": ["1", 0], "name": gate}},
        "3": {"class_type": "StreamFrames", "inputs": {"images": ["2", 0], "fps": 24.0, "pace": false}},
    })
}

fn request(workflow: Json, workload: Workload) -> SubmitRequest {
    SubmitRequest {
        workload: Some(workload),
        ..SubmitRequest::new(workflow)
    }
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[test]
fn a_job_streams_its_frames_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(dir.path(), EngineConfig::default());
    let mut items = Vec::new();
    let info = engine
        .run_to_completion(SubmitRequest::new(frames_workflow(5)), |item| {
            items.push(item.clone())
        })
        .unwrap();
    assert_eq!(info.state, JobState::Succeeded);
    assert_eq!(
        info.workload,
        Workload::Animation,
        "inferred from StreamFrames"
    );
    let frames: Vec<u64> = items
        .iter()
        .filter_map(|i| match i {
            WatchItem::Frame(f) => Some(f.index),
            _ => None,
        })
        .collect();
    assert_eq!(frames, [0, 1, 2, 3, 4]);
    let first = items.iter().find_map(|i| match i {
        WatchItem::Frame(f) => Some(f.clone()),
        _ => None,
    });
    let first = first.unwrap();
    assert_eq!(
        (first.width, first.height, first.rgb8.len()),
        (8, 8, 8 * 8 * 3)
    );
    assert!(
        first.rgb8.iter().all(|&v| v == 0),
        "white inverted is black"
    );
    let stages: Vec<&str> = items
        .iter()
        .filter_map(|i| match i {
            WatchItem::Event(e) => match &e.event {
                JobEvent::Stage { name, .. } => Some(*name),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(stages.first(), Some(&"prompt_received"));
    assert_eq!(stages.last(), Some(&"deliver_complete"));
    assert!(
        matches!(items.last(), Some(WatchItem::Event(e)) if matches!(e.event, JobEvent::Finished { state: JobState::Succeeded, .. }))
    );
    engine.shutdown_blocking();
}

#[test]
fn priorities_cancel_caps_idempotency_and_demand() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EngineConfig::default();
    config.tunables.admission.queue_caps = WorkloadValues {
        animation: 4,
        single_image: 4,
        batch: 2,
    };
    let engine = engine_with(dir.path(), config);
    // Hold the device with a gated job.
    let blocker = engine
        .submit_blocking(request(gated_workflow("prio"), Workload::SingleImage))
        .unwrap();
    // Its own state, not the gate flag another test's gate may have set already.
    wait_until("the gate to run", || {
        engine.get_blocking(&blocker.job_id).unwrap().state == JobState::Running
    });

    let batch = engine
        .submit_blocking(request(preview_workflow(1), Workload::Batch))
        .unwrap();
    let batch2 = engine
        .submit_blocking(request(preview_workflow(2), Workload::Batch))
        .unwrap();
    // The batch queue is at its cap of 2: denied with a retry hint.
    match engine.submit_blocking(request(preview_workflow(3), Workload::Batch)) {
        Err(SchedulerError::Denied {
            reason,
            retry_after,
            ..
        }) => {
            assert_eq!(reason, AdmissionReason::QueueFull);
            assert!(retry_after >= Duration::from_secs(1));
        }
        other => panic!("expected a deny, got {other:?}"),
    }
    let anim = engine
        .submit_blocking(request(preview_workflow(4), Workload::Animation))
        .unwrap();
    assert_eq!(anim.queue_position, 1, "animation jumps ahead of batch");
    assert_eq!(
        engine.get_blocking(&batch.job_id).unwrap().queue_position,
        Some(2)
    );

    // Idempotency: the same key returns the same job.
    let keyed = SubmitRequest {
        idempotency_key: Some("k1".into()),
        ..request(preview_workflow(5), Workload::SingleImage)
    };
    let first = engine.submit_blocking(keyed.clone()).unwrap();
    let again = engine.submit_blocking(keyed).unwrap();
    assert_eq!(first.job_id, again.job_id);
    assert!(again.deduplicated);

    let demand = engine.demand_blocking().unwrap();
    assert_eq!((demand.queued_jobs, demand.running_jobs), (4, 1));
    assert!(demand.weighted >= 0.5, "every job weighs at least 0.1");
    assert_eq!(
        engine.active_jobs(),
        5,
        "the published count agrees with Demand"
    );

    // Cancel a queued job: final at once.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let cancelled = rt.block_on(engine.cancel(&batch2.job_id)).unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(engine.active_jobs(), 4);

    open_gate("prio");
    for id in [&blocker.job_id, &batch.job_id, &anim.job_id, &first.job_id] {
        let mut watch = engine.watch_blocking(id).unwrap();
        while watch.next_blocking().is_some() {}
        assert_eq!(
            engine.get_blocking(id).unwrap().state,
            JobState::Succeeded,
            "{id}"
        );
    }
    // Published before each job's final event, so it is exact once the last watch ends.
    assert_eq!(engine.active_jobs(), 0);
    // Animation ran before the earlier batch job.
    let started = |id: &str| engine.get_blocking(id).unwrap().started_at.unwrap();
    assert!(started(&anim.job_id) < started(&batch.job_id));

    let page = rt
        .block_on(engine.list(
            ListFilter {
                state: Some(JobState::Succeeded),
                ..ListFilter::default()
            },
            2,
            None,
        ))
        .unwrap();
    assert_eq!(page.jobs.len(), 2);
    let rest = rt
        .block_on(engine.list(
            ListFilter {
                state: Some(JobState::Succeeded),
                ..ListFilter::default()
            },
            2,
            page.next_page_token,
        ))
        .unwrap();
    assert_eq!(rest.jobs.len(), 2);
    assert!(rest.next_page_token.is_none());
    engine.shutdown_blocking();
}

#[test]
fn cancelling_a_running_job_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(dir.path(), EngineConfig::default());
    let job = engine
        .submit_blocking(request(gated_workflow("never"), Workload::SingleImage))
        .unwrap();
    wait_until("the job to run", || {
        engine.get_blocking(&job.job_id).unwrap().state == JobState::Running
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(engine.cancel(&job.job_id)).unwrap();
    let mut watch = engine.watch_blocking(&job.job_id).unwrap();
    while watch.next_blocking().is_some() {}
    assert_eq!(
        engine.get_blocking(&job.job_id).unwrap().state,
        JobState::Cancelled
    );
    engine.shutdown_blocking();
}

#[test]
fn invalid_and_oversized_workflows_are_refused_before_queueing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EngineConfig::default();
    config.tunables.admission = AdmissionConfig::default();
    config.tunables.admission.limits.max_resolution = 256;
    let engine = engine_with(dir.path(), config);
    let bad = json!({"1": {"class_type": "PreviewImage", "inputs": {}}});
    match engine.submit_blocking(SubmitRequest::new(bad)) {
        Err(SchedulerError::Invalid(report)) => assert!(report.node_errors.contains_key("1")),
        other => panic!("expected invalid, got {other:?}"),
    }
    let big = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 4096, "height": 8, "batch_size": 1, "color": 0}}});
    assert!(matches!(
        engine.submit_blocking(SubmitRequest::new(big)),
        Err(SchedulerError::TooLarge {
            what: "resolution",
            ..
        })
    ));
    assert_eq!(engine.demand_blocking().unwrap().queued_jobs, 0);
    engine.shutdown_blocking();
}

#[test]
fn a_deadline_that_passes_in_the_queue_times_the_job_out() {
    let dir = tempfile::tempdir().unwrap();
    // Virtual time: the deadline is an hour away until the clock is moved past it.
    let clock = ManualClock::at(SystemTime::now());
    let engine = engine_with(
        dir.path(),
        EngineConfig {
            clock: clock.clone(),
            ..EngineConfig::default()
        },
    );
    let blocker = engine
        .submit_blocking(request(gated_workflow("deadline"), Workload::SingleImage))
        .unwrap();
    let late = SubmitRequest {
        deadline: Some(clock.now() + Duration::from_secs(3600)),
        ..request(frames_workflow(1), Workload::Batch)
    };
    let late = engine.submit_blocking(late).unwrap();
    assert_eq!(
        engine.get_blocking(&late.job_id).unwrap().state,
        JobState::Queued
    );
    clock.advance(Duration::from_secs(3601));
    let mut watch = engine.watch_blocking(&late.job_id).unwrap();
    while watch.next_blocking().is_some() {}
    let info = engine.get_blocking(&late.job_id).unwrap();
    assert_eq!(info.state, JobState::TimedOut);
    assert!(info.error.unwrap().contains("deadline"));
    open_gate("deadline");
    let mut watch = engine.watch_blocking(&blocker.job_id).unwrap();
    while watch.next_blocking().is_some() {}
    engine.shutdown_blocking();
}

#[test]
fn reload_bumps_the_generation_and_feature_flags_bypass_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(dir.path(), EngineConfig::default());
    let before = engine.config_generation();
    let mut tunables = EngineTunables::default();
    tunables.features.upscaler_off.single_image = true;
    let reloaded = engine.reload(tunables.clone(), "test");
    assert_eq!(reloaded.generation, before + 1);
    assert_eq!(
        engine.reload(tunables, "test").generation,
        before + 1,
        "no change, no bump"
    );
    // An upscale node this registry lacks fails validation; bypassed, the job runs.
    let wf = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"image": ["1", 0]}},
        "4": {"class_type": "StreamFrames", "inputs": {"images": ["3", 0], "fps": 24.0, "pace": false}},
    });
    let info = engine
        .run_to_completion(request(wf.clone(), Workload::SingleImage), |_| {})
        .unwrap();
    assert_eq!(info.state, JobState::Succeeded, "{:?}", info.error);
    assert!(
        engine
            .submit_blocking(request(wf, Workload::Batch))
            .is_err(),
        "batch keeps its upscaler"
    );
    engine.shutdown_blocking();
}

fn memory_hungry_workflow(batch: u32, fits: u32) -> Json {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": batch, "color": batch}},
        "2": {"class_type": "TestMemoryHungry", "inputs": {"images": ["1", 0], "fits": fits}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    })
}

#[test]
fn an_oom_splits_the_batch_and_retries_once() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(dir.path(), EngineConfig::default());

    // 4 images OOM; 2 at a time fit: the retry succeeds and says why it happened.
    let mut items = Vec::new();
    let info = engine
        .run_to_completion(
            request(memory_hungry_workflow(4, 2), Workload::Batch),
            |i| items.push(i.clone()),
        )
        .unwrap();
    assert_eq!(info.state, JobState::Succeeded, "{:?}", info.error);
    let splits: Vec<String> = items
        .iter()
        .filter_map(|i| match i {
            WatchItem::Event(e) => match &e.event {
                JobEvent::Admission {
                    reason: AdmissionReason::OomSplit,
                    detail,
                    ..
                } => Some(detail.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(splits.len(), 1, "{items:?}");
    assert!(splits[0].contains("batch of 4"), "{}", splits[0]);
    assert!(splits[0].contains("at most 2 at a time"), "{}", splits[0]);

    // Only one retry: when half the batch still does not fit, the job fails as an OOM.
    let info = engine
        .run_to_completion(
            request(memory_hungry_workflow(4, 1), Workload::Batch),
            |_| {},
        )
        .unwrap();
    assert_eq!(info.state, JobState::Failed);
    assert!(
        info.error.as_deref().unwrap_or("").contains("budget"),
        "{:?}",
        info.error
    );

    // A single image has nothing to split: it fails without a retry.
    let mut items = Vec::new();
    let info = engine
        .run_to_completion(
            request(memory_hungry_workflow(1, 0), Workload::Batch),
            |i| items.push(i.clone()),
        )
        .unwrap();
    assert_eq!(info.state, JobState::Failed);
    assert!(!items.iter().any(|i| matches!(i, WatchItem::Event(e)
        if matches!(e.event, JobEvent::Admission { reason: AdmissionReason::OomSplit, .. }))));
    engine.shutdown_blocking();
}

#[test]
fn a_preview_that_cannot_keep_its_fps_is_degraded_in_steps_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(dir.path(), EngineConfig::default());
    // Three 1536x1536 frames take far longer to render than their 12.5 ms at 240 FPS.
    let workflow = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 3, "color": 0x808080}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "lanczos", "scale_by": 3.0}},
        "3": {"class_type": "StreamFrames", "inputs": {"images": ["2", 0], "fps": 240.0, "pace": false}},
    });
    let run = || {
        let mut items = Vec::new();
        let info = engine
            .run_to_completion(SubmitRequest::new(workflow.clone()), |i| {
                items.push(i.clone())
            })
            .unwrap();
        assert_eq!(info.state, JobState::Succeeded, "{:?}", info.error);
        let notes: Vec<String> = items
            .iter()
            .filter_map(|i| match i {
                WatchItem::Event(e) => match &e.event {
                    JobEvent::Admission {
                        reason: AdmissionReason::DegradedForFps,
                        detail,
                        ..
                    } => Some(detail.clone()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        let width = items.iter().find_map(|i| match i {
            WatchItem::Frame(f) => Some(f.width),
            _ => None,
        });
        (notes, width)
    };
    // Nothing is known about the workflow yet: it runs as submitted.
    let (notes, width) = run();
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(width, Some(1536));
    // Now its render time is known to miss the target: the preview resolution drops.
    let (notes, width) = run();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("against a 240 FPS target"),
        "{}",
        notes[0]
    );
    assert!(
        notes[0].contains("lower preview resolution: 512x512 -> 384x384"),
        "{}",
        notes[0]
    );
    assert_eq!(width, Some(1152));

    // Switched off in the tunables, the same submission runs as submitted.
    let mut tunables = engine.tunables();
    tunables.admission.degrade_animation = false;
    engine.reload(tunables, "test");
    let (notes, width) = run();
    assert!(notes.is_empty());
    assert_eq!(width, Some(1536));
    engine.shutdown_blocking();
}

#[test]
fn on_a_gpu_the_memory_budget_is_the_devices_real_memory() {
    use sakuga_telemetry::DeviceSample;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(dir.path(), EngineConfig::default());
    let workflow = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 4, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    });
    let sample = |device: &str, total: u64| DeviceSample {
        device: device.into(),
        memory_used_bytes: 0,
        memory_total_bytes: total,
        utilization_ratio: 0.0,
    };
    // A GPU with 1 MiB: the job's estimate does not fit, whatever the configured budget.
    engine.signals().device_sample(&sample("cuda:0", 1 << 20));
    let denied = engine
        .run_to_completion(request(workflow.clone(), Workload::SingleImage), |_| {})
        .unwrap_err();
    assert!(
        matches!(&denied, SchedulerError::Denied { reason: AdmissionReason::MemoryHeadroom, detail, .. }
            if detail.contains("the device budget is 1 MiB")),
        "{denied:?}"
    );
    // On the CPU the configured budget (8 GiB by default) applies, not the RAM total.
    engine.signals().device_sample(&sample("cpu", 64 << 30));
    let info = engine
        .run_to_completion(request(workflow, Workload::SingleImage), |_| {})
        .unwrap();
    assert_eq!(info.state, JobState::Succeeded);
    engine.shutdown_blocking();
}
