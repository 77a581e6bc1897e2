//! SIGKILL with jobs queued and running, restart on the same data dir: every accepted job
//! ends (the queued ones run, marked recovered; the one that was running went down with the
//! process and is failed as poison after that one crash); none is lost.

use std::time::Duration;

use serde_json::json;

use sakuga::client::SakugaClient;

mod support;
use sakuga_proto::v1;
use support::{spawn_server, wait_serving};

fn workflow(frames: u32, fps: f64) -> v1::SubmitRequest {
    let wf = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": frames, "color": 0}},
        "2": {"class_type": "StreamFrames", "inputs": {"images": ["1", 0], "fps": fps, "pace": true}},
    });
    v1::SubmitRequest {
        workflow: Some(v1::submit_request::Workflow::WorkflowJson(wf.to_string())),
        workload: v1::Workload::SingleImage as i32,
        ..Default::default()
    }
}

/// Follows the job's Watch stream until `done` accepts an event; then returns the job.
async fn watch_until(
    client: &mut SakugaClient,
    job_id: &str,
    mut done: impl FnMut(&v1::watch_event::Kind) -> bool,
) -> v1::Job {
    tokio::time::timeout(Duration::from_secs(60), async {
        let request = v1::WatchRequest {
            job_id: job_id.into(),
            skip_frames: true,
            ..Default::default()
        };
        let mut stream = client.render.watch(request).await.unwrap().into_inner();
        while let Some(event) = stream.message().await.unwrap() {
            if event.kind.as_ref().is_some_and(&mut done) {
                break;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("job {job_id} never got there"));
    client
        .render
        .get_job(v1::GetJobRequest {
            job_id: job_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn is_final(kind: &v1::watch_event::Kind) -> bool {
    matches!(kind, v1::watch_event::Kind::FinalStatus(_))
}

fn is_running(kind: &v1::watch_event::Kind) -> bool {
    matches!(
        kind,
        v1::watch_event::Kind::NodeStarted(_) | v1::watch_event::Kind::Progress(_)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_jobs_queued_and_running_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, url) = spawn_server(dir.path());
    wait_serving(&url).await;
    let mut client = SakugaClient::connect(&url, None).await.unwrap();
    let running = client
        .render
        .submit(workflow(40, 20.0))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let mut queued = Vec::new();
    for _ in 0..5 {
        queued.push(
            client
                .render
                .submit(workflow(2, 50.0))
                .await
                .unwrap()
                .into_inner()
                .job_id,
        );
    }
    watch_until(&mut client, &running, is_running).await;
    // SIGKILL: no drain, no journal flush, no goodbye.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    drop(client);

    let (second, url) = spawn_server(dir.path());
    wait_serving(&url).await;
    let mut client = SakugaClient::connect(&url, None).await.unwrap();
    let poisoned = watch_until(&mut client, &running, is_final).await;
    assert_eq!(
        poisoned.state,
        v1::JobState::Failed as i32,
        "{}",
        poisoned.error
    );
    assert!(
        poisoned.error.starts_with("poison"),
        "the job running at the crash is not run into it again: {}",
        poisoned.error
    );
    assert_eq!(
        poisoned.attempts, 1,
        "its one start was journaled before it ran"
    );
    for id in &queued {
        let job = watch_until(&mut client, id, is_final).await;
        assert_eq!(job.state, v1::JobState::Succeeded as i32, "{}", job.error);
        assert!(job.recovered);
    }
    drop(second);
}
