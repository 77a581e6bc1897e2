//! Shutdown of a real `sakuga serve` with a long job running: SIGTERM exits within the
//! drain timeout, journaling the job as interrupted so it runs again after a restart
//! without an attempt counted against it; a second SIGTERM exits at once.

use std::time::{Duration, Instant};

use serde_json::json;

use sakuga::client::SakugaClient;

mod support;
use sakuga_proto::v1;
use support::{ServerProcess, spawn_server, spawn_server_with, wait_serving};

/// 200 frames paced at 2 FPS: 100 s of playback, far past any drain timeout here.
fn long_job() -> v1::SubmitRequest {
    let wf = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 200, "color": 0}},
        "2": {"class_type": "StreamFrames", "inputs": {"images": ["1", 0], "fps": 2.0, "pace": true}},
    });
    v1::SubmitRequest {
        workflow: Some(v1::submit_request::Workflow::WorkflowJson(wf.to_string())),
        workload: v1::Workload::Animation as i32,
        ..Default::default()
    }
}

/// Submits the long job and returns once its first frame is out.
async fn start_long_job(client: &mut SakugaClient) -> String {
    let job_id = client
        .render
        .submit(long_job())
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let request = v1::WatchRequest {
        job_id: job_id.clone(),
        ..Default::default()
    };
    let mut stream = client.render.watch(request).await.unwrap().into_inner();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = stream.message().await.unwrap() {
            if matches!(event.kind, Some(v1::watch_event::Kind::Frame(_))) {
                return;
            }
        }
        panic!("the watch ended before a frame");
    })
    .await
    .expect("the long job streams");
    job_id
}

fn sigterm(server: &ServerProcess) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the process to exit; returns how long it took.
async fn exit_within(mut server: ServerProcess, limit: Duration) -> Duration {
    let started = Instant::now();
    let waited = tokio::task::spawn_blocking(move || {
        let status = server.0.wait();
        (server, status)
    });
    let (_server, status) = tokio::time::timeout(limit, waited)
        .await
        .unwrap_or_else(|_| panic!("the server did not exit within {limit:?}"))
        .unwrap();
    status.unwrap();
    started.elapsed()
}

/// Restarts on `dir` and returns the job once it runs again.
async fn rerun(dir: &std::path::Path, job_id: &str) -> (ServerProcess, v1::Job) {
    let (server, url) = spawn_server(dir);
    wait_serving(&url).await;
    let mut client = SakugaClient::connect(&url, None).await.unwrap();
    let request = v1::WatchRequest {
        job_id: job_id.into(),
        skip_frames: true,
        ..Default::default()
    };
    let mut stream = client.render.watch(request).await.unwrap().into_inner();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = stream.message().await.unwrap() {
            if matches!(event.kind, Some(v1::watch_event::Kind::NodeStarted(_))) {
                return;
            }
        }
        panic!("the recovered job never started");
    })
    .await
    .expect("the recovered job runs again");
    let job = client
        .render
        .get_job(v1::GetJobRequest {
            job_id: job_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (server, job)
}

async fn wait_not_serving(url: &str) {
    use tonic_health::pb::health_check_response::ServingStatus;
    support::wait_health(url, ServingStatus::NotServing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_drain_timeout_and_the_job_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let (server, url) = spawn_server_with(dir.path(), &[], &["--drain-timeout", "2"]);
    wait_serving(&url).await;
    let mut client = SakugaClient::connect(&url, None).await.unwrap();
    let job_id = start_long_job(&mut client).await;

    sigterm(&server);
    let took = exit_within(server, Duration::from_secs(20)).await;
    assert!(
        took >= Duration::from_secs(2),
        "it drained for the timeout first ({took:?})"
    );
    drop(client);

    let (_server, job) = rerun(dir.path(), &job_id).await;
    assert!(job.recovered);
    assert_eq!(
        job.attempts, 1,
        "the interrupted run is not counted as an attempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // The default drain timeout (90 s): only the second signal can end it in time.
    let (server, url) = spawn_server(dir.path());
    wait_serving(&url).await;
    let mut client = SakugaClient::connect(&url, None).await.unwrap();
    let job_id = start_long_job(&mut client).await;

    sigterm(&server);
    wait_not_serving(&url).await;
    sigterm(&server);
    exit_within(server, Duration::from_secs(10)).await;
    drop(client);

    let (_server, job) = rerun(dir.path(), &job_id).await;
    assert!(job.recovered);
    assert_eq!(job.attempts, 1);
}

/// Long-lived streams that are not jobs (`WatchSignals`, KEDA's `StreamIsActive`) end when
/// shutdown begins, so they cannot hold the server past its drain.
#[tokio::test]
async fn shutdown_ends_signal_and_scaler_streams() {
    let dir = tempfile::tempdir().unwrap();
    let (server, url) = spawn_server(dir.path());
    wait_serving(&url).await;
    let mut client = SakugaClient::connect(&url, None).await.unwrap();
    let mut signals = client
        .signals
        .watch_signals(v1::WatchSignalsRequest { interval_ms: 250 })
        .await
        .unwrap()
        .into_inner();
    let mut active = client
        .scaler
        .stream_is_active(sakuga_proto::externalscaler::ScaledObjectRef::default())
        .await
        .unwrap()
        .into_inner();
    // Both streams are live: each delivers its first message.
    assert!(signals.message().await.unwrap().is_some());
    assert!(active.message().await.unwrap().is_some());
    sigterm(&server);
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(_)) = signals.message().await {}
        while let Ok(Some(_)) = active.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "a stream outlived the shutdown");
    exit_within(server, Duration::from_secs(20)).await;
}
