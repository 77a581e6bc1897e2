//! SIGHUP on a real `sakuga serve`: new SLO targets from the config file and new queue
//! caps from the tunables file take effect without a restart, the configuration generation
//! goes up once, and a queued job submitted before the reload still runs.

use std::time::Duration;

use serde_json::json;

use sakuga::client::SakugaClient;
use sakuga_proto::v1;

mod support;
use support::{spawn_server_with, wait_serving};

fn config(latency_objective: f64) -> String {
    format!("[signals.slo.single_image]\nlatency_target_s = 5.0\nobjective = {latency_objective}\n")
}

fn tunables(single_image_cap: u32) -> String {
    format!(
        "[admission.queue_caps]\nanimation = 16\nsingle_image = {single_image_cap}\nbatch = 64\n"
    )
}

fn objective(signals: &v1::Signals, slo: &str) -> f64 {
    signals
        .slos
        .iter()
        .find(|s| s.slo == slo)
        .unwrap_or_else(|| panic!("{slo} is reported"))
        .objective
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_new_slos_and_caps_without_dropping_work() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("sakuga.toml");
    let tunables_path = dir.path().join("tunables.toml");
    std::fs::write(&config_path, config(0.95)).unwrap();
    std::fs::write(&tunables_path, tunables(64)).unwrap();
    let (server, url) = spawn_server_with(
        dir.path(),
        &["--config", config_path.to_str().unwrap()],
        &["--tunables", tunables_path.to_str().unwrap()],
    );
    wait_serving(&url).await;
    let mut client = SakugaClient::connect(&url, None).await.unwrap();
    let before = client
        .signals
        .get_signals(v1::GetSignalsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(objective(&before, "single_image_latency"), 0.95);

    // A job that is still playing out when the reload lands: paced streams play one at a
    // time, so the paced burst below queues behind it.
    let wf = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 72, "color": 0}},
        "2": {"class_type": "StreamFrames", "inputs": {"images": ["1", 0], "fps": 24.0, "pace": true}},
    });
    let job = client
        .render
        .submit(v1::SubmitRequest {
            workflow: Some(v1::submit_request::Workflow::WorkflowJson(wf.to_string())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;

    std::fs::write(&config_path, config(0.99)).unwrap();
    std::fs::write(&tunables_path, tunables(1)).unwrap();
    let pid = server.0.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());

    // The reload runs on the server's own schedule: wait for the generation to move.
    let after = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let now = client
                .signals
                .get_signals(v1::GetSignalsRequest {})
                .await
                .unwrap()
                .into_inner();
            if now.config_generation > before.config_generation {
                return now;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("SIGHUP reloaded the configuration");
    assert_eq!(after.config_generation, before.config_generation + 1);
    assert_eq!(objective(&after, "single_image_latency"), 0.99);

    // The new cap of 1 queued single image: a burst past it is refused.
    let burst = (0..4).map(|i| {
        let mut client = client.clone();
        let wf = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i}},
            "2": {"class_type": "StreamFrames", "inputs": {"images": ["1", 0], "fps": 24.0, "pace": true}},
        });
        async move {
            client
                .render
                .submit(v1::SubmitRequest {
                    workflow: Some(v1::submit_request::Workflow::WorkflowJson(wf.to_string())),
                    workload: v1::Workload::SingleImage as i32,
                    ..Default::default()
                })
                .await
        }
    });
    let results = futures_util::future::join_all(burst).await;
    assert!(
        results.iter().any(|r| r
            .as_ref()
            .is_err_and(|s| s.code() == tonic::Code::ResourceExhausted)),
        "the reloaded cap refuses work: {results:?}"
    );

    // The job from before the reload was not dropped.
    let mut watch = client
        .render
        .watch(v1::WatchRequest {
            job_id: job.clone(),
            skip_frames: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut final_state = None;
    while let Some(event) = watch.message().await.unwrap() {
        if let Some(v1::watch_event::Kind::FinalStatus(f)) = event.kind {
            final_state = Some(f.state);
        }
    }
    assert_eq!(final_state, Some(v1::JobState::Succeeded as i32));
    drop(server);
}
