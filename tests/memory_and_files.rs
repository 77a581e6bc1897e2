//! Against the real `sakuga serve` binary: a workflow whose upscale cannot fit the memory
//! budget is refused at Submit with a message naming the node and its bytes, and the
//! server stays up; SaveImage refuses a symlinked subfolder of `out/` that leads outside.

use std::time::Duration;

use serde_json::{Value as Json, json};
use tonic::Code;

use sakuga::client::SakugaClient;

mod support;
use sakuga_proto::v1;
use support::{spawn_server, wait_serving};

fn submit_request(wf: &Json) -> v1::SubmitRequest {
    v1::SubmitRequest {
        workflow: Some(v1::submit_request::Workflow::WorkflowJson(wf.to_string())),
        workload: v1::Workload::SingleImage as i32,
        ..Default::default()
    }
}

fn scaled(side: u32, scale: f64, prefix: &str) -> Json {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": side, "height": side, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact", "scale_by": scale}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    })
}

/// Submits and follows the job to its end.
async fn run(client: &mut SakugaClient, wf: &Json) -> v1::Job {
    let job_id = client
        .render
        .submit(submit_request(wf))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    tokio::time::timeout(Duration::from_secs(60), async {
        let request = v1::WatchRequest {
            job_id: job_id.clone(),
            skip_frames: true,
            ..Default::default()
        };
        let mut stream = client.render.watch(request).await.unwrap().into_inner();
        while let Some(event) = stream.message().await.unwrap() {
            if matches!(event.kind, Some(v1::watch_event::Kind::FinalStatus(_))) {
                break;
            }
        }
    })
    .await
    .expect("the job finished");
    client
        .render
        .get_job(v1::GetJobRequest { job_id })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upscale_that_cannot_fit_is_refused_at_submit_and_the_server_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = spawn_server(dir.path());
    wait_serving(&url).await;
    let mut client = SakugaClient::connect(&url, None).await.unwrap();
    // Estimated at 2 GiB from literals before; it needs 48 GiB for the x8 output alone.
    let refused = client
        .render
        .submit(submit_request(&scaled(8192, 8.0, "big")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let message = refused.message();
    assert!(message.contains("node 2 (ImageScaleBy)"), "{message}");
    assert!(message.contains("bytes"), "{message}");
    // A size given as a string or a float meets the same cap as an integer.
    for width in [json!("16384"), json!(16384.0)] {
        let mut wf = scaled(8, 1.0, "x");
        wf["1"]["inputs"]["width"] = width;
        let status = client.render.submit(submit_request(&wf)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("resolution"), "{status:?}");
    }
    let small = run(&mut client, &scaled(16, 2.0, "small")).await;
    assert_eq!(
        small.state,
        v1::JobState::Succeeded as i32,
        "{}",
        small.error
    );
    assert!(server.0.try_wait().unwrap().is_none(), "the server exited");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_image_refuses_a_symlinked_subfolder_that_leads_out() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let (_server, url) = spawn_server(dir.path());
    wait_serving(&url).await;
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("out/shots")).unwrap();
    let mut client = SakugaClient::connect(&url, None).await.unwrap();
    for prefix in ["shots/cut", "shots/new/cut"] {
        let job = run(&mut client, &scaled(8, 1.0, prefix)).await;
        assert_eq!(job.state, v1::JobState::Failed as i32, "{prefix}");
        assert!(job.error.contains("outside"), "{}", job.error);
    }
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing was written through the link"
    );
    let inside = run(&mut client, &scaled(8, 1.0, "kept/cut")).await;
    assert_eq!(
        inside.state,
        v1::JobState::Succeeded as i32,
        "{}",
        inside.error
    );
}
