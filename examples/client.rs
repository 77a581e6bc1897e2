//! A minimal render client: submits an animation preview workflow and follows it.
//!
//! Run a server first (`cargo run -- serve`), then:
//! `cargo run --example client -- http://127.0.0.1:50051 [TOKEN]`

use sakuga::client::SakugaClient;
use sakuga_proto::v1;
use sakuga_proto::v1::watch_event::Kind;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let token = args.next();
    let mut client = SakugaClient::connect(&url, token.as_deref()).await?;

    // Twelve 64x64 frames, streamed at 24 FPS: what an animation preview ends in.
    let workflow = serde_json::json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 12, "color": 0x3366ff}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "StreamFrames", "inputs": {"images": ["2", 0], "fps": 24.0, "pace": true}},
    });
    let submitted = client
        .render
        .submit(v1::SubmitRequest {
            workflow: Some(v1::submit_request::Workflow::WorkflowJson(
                workflow.to_string(),
            )),
            workload: v1::Workload::Animation as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    println!(
        "submitted {} (queue position {})",
        submitted.job_id, submitted.queue_position
    );

    let mut stream = client
        .render
        .watch(v1::WatchRequest {
            job_id: submitted.job_id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut frames = 0u64;
    while let Some(event) = stream.message().await? {
        match event.kind {
            Some(Kind::Stage(s)) => println!("stage {}: {}", s.name, s.detail),
            Some(Kind::Frame(f)) => {
                frames += 1;
                println!(
                    "frame {} ({}x{}, {} bytes PNG)",
                    f.index,
                    f.width,
                    f.height,
                    f.data.len()
                );
            }
            Some(Kind::FinalStatus(f)) => {
                println!("final: {:?} {}", v1::JobState::try_from(f.state)?, f.error)
            }
            _ => {}
        }
    }
    // Tell the server what was actually displayed, for delivered-FPS signals.
    let health = client
        .render
        .report_playback(v1::ReportPlaybackRequest {
            job_id: submitted.job_id,
            frames_displayed: frames,
            frames_dropped: 0,
            displayed_fps: 24.0,
        })
        .await?
        .into_inner();
    println!("fps health ratio now {:.2}", health.fps_health_ratio);
    Ok(())
}
