//! A slow Watch reader: the server keeps a bounded ring per job, so the reader gets fewer
//! frames plus a count of the ones it missed, delivered FPS falls behind produced FPS in
//! the signals, and other jobs finish meanwhile.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;

use sakuga::client::SakugaClient;
use sakuga::server::{EngineStart, ServerConfig, run};
use sakuga_nodes::{NodeEnv, NodeRegistry};
use sakuga_proto::v1;
use sakuga_proto::v1::watch_event::Kind;
use sakuga_scheduler::{EngineConfig, EngineHandle};
use sakuga_telemetry::{Signals, SignalsConfig};

fn animation(frames: u32, size: u32) -> v1::SubmitRequest {
    let wf = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": frames, "color": 0x102030}},
        "2": {"class_type": "StreamFrames", "inputs": {"images": ["1", 0], "fps": 24.0, "pace": false}},
    });
    v1::SubmitRequest {
        workflow: Some(v1::submit_request::Workflow::WorkflowJson(wf.to_string())),
        workload: v1::Workload::Animation as i32,
        ..Default::default()
    }
}

async fn final_state(client: &mut SakugaClient, job_id: &str) -> i32 {
    let request = v1::WatchRequest {
        job_id: job_id.into(),
        skip_frames: true,
        ..Default::default()
    };
    let mut stream = client.render.watch(request).await.unwrap().into_inner();
    while let Some(event) = stream.message().await.unwrap() {
        if let Some(Kind::FinalStatus(f)) = event.kind {
            return f.state;
        }
    }
    panic!("the stream ended without a final status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_drops_frames_instead_of_growing_memory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let env = NodeEnv::new(root.join("input"), root.join("output"), root.join("models"));
    let engine = EngineHandle::start(
        EngineConfig::default(),
        Arc::new(NodeRegistry::with_builtins()),
        Arc::new(env),
        Signals::new(SignalsConfig::default()),
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(
        listener,
        EngineStart::Ready(engine),
        ServerConfig::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let mut client = SakugaClient::connect(&url, None).await.unwrap();

    // 400 frames of 128x128 RGB8 (19 MiB in all), produced as fast as the CPU allows.
    const FRAMES: u64 = 400;
    let job = client
        .render
        .submit(animation(FRAMES as u32, 128))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let mut slow = client
        .render
        .watch(v1::WatchRequest {
            job_id: job.clone(),
            frame_encoding: v1::FrameEncoding::Rgb8 as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Take one message, then stop reading until the job is over.
    let first = slow.message().await.unwrap().unwrap();
    assert!(
        matches!(first.kind, Some(Kind::Stage(_))),
        "replay starts with prompt_received"
    );
    let mut other = SakugaClient::connect(&url, None).await.unwrap();
    assert_eq!(
        final_state(&mut other, &job).await,
        v1::JobState::Succeeded as i32
    );
    // Another job runs to completion while the slow reader still holds its stream.
    let second = other
        .render
        .submit(animation(3, 8))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert_eq!(
        final_state(&mut other, &second).await,
        v1::JobState::Succeeded as i32
    );

    let (mut received, mut dropped) = (0u64, 0u64);
    let mut last_index = None;
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), slow.message())
        .await
        .unwrap()
        .unwrap()
    {
        match event.kind {
            Some(Kind::Frame(f)) => {
                received += 1;
                assert_eq!(f.data.len(), 128 * 128 * 3);
                last_index = Some(f.index);
            }
            Some(Kind::Skipped(s)) => dropped += s.frames_dropped,
            _ => {}
        }
    }
    assert!(dropped > 0, "the slow reader was told about missed frames");
    assert!(received < FRAMES, "it did not get every frame ({received})");
    assert_eq!(
        last_index,
        Some(FRAMES - 1),
        "the newest frames are the ones kept"
    );
    assert!(
        received + dropped >= FRAMES - 1,
        "every frame is delivered or counted dropped: {received} + {dropped}"
    );

    let signals = client
        .signals
        .get_signals(v1::GetSignalsRequest {})
        .await
        .unwrap()
        .into_inner();
    let anim = signals
        .workloads
        .iter()
        .find(|w| w.workload == v1::Workload::Animation as i32)
        .unwrap();
    assert!(
        anim.delivered_fps < anim.produced_fps,
        "delivered {} vs produced {}",
        anim.delivered_fps,
        anim.produced_fps
    );
    assert!(anim.fps_health_ratio < 1.0);

    drop(slow);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
