//! Bounds on what a request may carry and what an answer may hold, end to end over gRPC:
//! invalid-workflow statuses that fit in HTTP/2 trailers, capped labels and keys, pages of
//! `ListJobs` that fit the message limit, and refused garbage (page tokens, past
//! deadlines, undecodable messages).

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::net::TcpListener;
use tonic::Code;
use tonic_types::StatusExt;

use sakuga::client::SakugaClient;
use sakuga::server::{EngineStart, ServerConfig, run};
use sakuga_nodes::{NodeEnv, NodeRegistry};
use sakuga_proto::v1;
use sakuga_scheduler::{EngineConfig, EngineHandle};
use sakuga_telemetry::{Signals, SignalsConfig};

struct TestServer {
    url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn start(config: ServerConfig) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let env = NodeEnv::new(root.join("input"), root.join("output"), root.join("models"));
    let engine = EngineHandle::start(
        EngineConfig {
            data_dir: Some(root.join("data")),
            ..EngineConfig::default()
        },
        Arc::new(NodeRegistry::with_builtins()),
        Arc::new(env),
        Signals::new(SignalsConfig::default()),
    )
    .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        run(listener, EngineStart::Ready(engine), config, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    support::wait_serving(&url).await;
    TestServer {
        url,
        shutdown: Some(tx),
        task,
        _dir: dir,
    }
}

impl TestServer {
    async fn client(&self) -> SakugaClient {
        SakugaClient::connect(&self.url, None).await.unwrap()
    }

    async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

fn tiny_workflow() -> String {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    })
    .to_string()
}

fn submit(workflow: String) -> v1::SubmitRequest {
    v1::SubmitRequest {
        workflow: Some(v1::submit_request::Workflow::WorkflowJson(workflow)),
        workload: v1::Workload::SingleImage as i32,
        ..Default::default()
    }
}

fn violation_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_bad_nodes_and_a_3kb_model_name_fit_in_the_trailers() {
    let server = start(ServerConfig::default()).await;
    let mut client = server.client().await;
    let long = "x".repeat(3000);
    let mut nodes = serde_json::Map::new();
    for i in 0..30 {
        nodes.insert(
            format!("bad{i}-{long}"),
            json!({"class_type": format!("NoSuchNode{i}{long}"), "inputs": {}}),
        );
    }
    nodes.insert(
        "ckpt".into(),
        json!({"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": long}}),
    );
    nodes.insert(
        "out".into(),
        json!({"class_type": "PreviewImage", "inputs": {"images": ["ckpt", 0]}}),
    );
    let text = serde_json::Value::Object(nodes).to_string();
    let status = client
        .render
        .submit(submit(text.clone()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.details().len() <= 4096,
        "details are {} bytes",
        status.details().len()
    );
    assert!(status.message().len() <= 1024);
    let details = status.get_error_details();
    let info = details.error_info().expect("ErrorInfo");
    let total: usize = info.metadata["problems"].parse().unwrap();
    let omitted: usize = info.metadata["omitted"].parse().unwrap();
    assert!(total >= 31, "{total}");
    assert!(omitted > 0 && omitted < total, "{omitted} of {total}");
    let shown: serde_json::Value = serde_json::from_str(&info.metadata["node_errors"]).unwrap();
    assert!(!shown["node_errors"].as_object().unwrap().is_empty());
    let violations = details.bad_request().unwrap().field_violations.len();
    assert!(violations > 1 && violations <= 12, "{violations}");

    // The full report comes in ValidateWorkflow's body.
    let full = client
        .nodes
        .validate_workflow(v1::ValidateWorkflowRequest {
            workflow_json: text,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!full.valid);
    assert_eq!(full.problems.len(), total);
    let report: serde_json::Value = serde_json::from_str(&full.report_json).unwrap();
    assert!(report["node_errors"].as_object().unwrap().len() >= 31);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_keys_ids_and_past_deadlines_are_refused_by_name() {
    let server = start(ServerConfig::default()).await;
    let mut client = server.client().await;

    let mut request = submit(tiny_workflow());
    request.labels = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
    let status = client.render.submit(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["labels"]);
    assert!(status.message().contains("32"), "{}", status.message());

    let mut request = submit(tiny_workflow());
    request.labels = [("k".to_owned(), "v".repeat(100_000))].into();
    let status = client.render.submit(request).await.unwrap_err();
    assert_eq!(violation_fields(&status), ["labels"]);

    let mut request = submit(tiny_workflow());
    request.idempotency_key = "k".repeat(10_000);
    let status = client.render.submit(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["idempotency_key"]);

    let mut request = submit(tiny_workflow());
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    request.deadline_unix_ms = now_ms - 1000;
    let status = client.render.submit(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violation_fields(&status), ["deadline_unix_ms"]);

    let status = client
        .render
        .get_job(v1::GetJobRequest {
            job_id: "j".repeat(5000),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().len() < 300);

    let status = client
        .render
        .list_jobs(v1::ListJobsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["page_token"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_stay_within_the_message_limit() {
    let limit = 64 << 10;
    let server = start(ServerConfig {
        max_message_bytes: limit,
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.client().await;
    let jobs = 24;
    let mut submitted = std::collections::BTreeSet::new();
    for i in 0..jobs {
        let mut request = submit(tiny_workflow());
        request.labels = (0..32)
            .map(|l| (format!("label{l}"), format!("{i}-{}", "v".repeat(480))))
            .collect();
        submitted.insert(
            client
                .render
                .submit(request)
                .await
                .unwrap()
                .into_inner()
                .job_id,
        );
    }
    // One job is about 17 KB: a 1000-job page must be cut and continued.
    let (mut seen, mut token, mut pages) = (std::collections::BTreeSet::new(), String::new(), 0);
    loop {
        let page = client
            .render
            .list_jobs(v1::ListJobsRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(prost::Message::encoded_len(&page) <= limit);
        pages += 1;
        for job in page.jobs {
            assert!(seen.insert(job.job_id), "a job listed twice");
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, submitted);
    assert!(pages > 1, "{pages} page(s)");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playback_reports_count_only_frames_the_stream_produced() {
    let server = start(ServerConfig::default()).await;
    let mut client = server.client().await;
    let workflow = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 3, "color": 0}},
        "2": {"class_type": "StreamFrames", "inputs": {"images": ["1", 0], "fps": 24.0, "pace": false}},
    })
    .to_string();
    let mut request = submit(workflow);
    request.workload = v1::Workload::Animation as i32;
    let job_id = client
        .render
        .submit(request)
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let mut stream = client
        .render
        .watch(v1::WatchRequest {
            job_id: job_id.clone(),
            skip_frames: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(event) = stream.message().await.unwrap() {
        if let Some(v1::watch_event::Kind::FinalStatus(f)) = event.kind {
            assert_eq!(f.state, v1::JobState::Succeeded as i32);
        }
    }
    // A million drops, then counts that would wrap a u64: only the 3 frames count.
    for (displayed, dropped) in [(3, 1_000_000), (u64::MAX, u64::MAX), (0, 5)] {
        client
            .render
            .report_playback(v1::ReportPlaybackRequest {
                job_id: job_id.clone(),
                frames_displayed: displayed,
                frames_dropped: dropped,
                displayed_fps: 24.0,
            })
            .await
            .unwrap();
    }
    let signals = client
        .signals
        .get_signals(v1::GetSignalsRequest {})
        .await
        .unwrap()
        .into_inner();
    let dropped = signals
        .slos
        .iter()
        .find(|s| s.slo == "animation_dropped_frames")
        .expect("the dropped-frames SLO");
    assert!(
        dropped.error_budget_remaining >= 0.0,
        "budget {}",
        dropped.error_budget_remaining
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_without_a_preface_are_closed_and_clients_still_served() {
    use tokio::io::AsyncReadExt;
    let limits = sakuga::server::conn::ConnectionLimits {
        max_connections: 16,
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let server = start(ServerConfig {
        connections: limits,
        ..ServerConfig::default()
    })
    .await;
    let addr = server.url.trim_start_matches("http://").to_owned();
    // More silent connections than the cap: they never send the HTTP/2 preface.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // A real client behind them is served (the silent ones are cut at their deadline).
    tokio::time::timeout(Duration::from_secs(20), async {
        let mut client = server.client().await;
        client
            .render
            .list_jobs(v1::ListJobsRequest::default())
            .await
            .unwrap();
    })
    .await
    .expect("a real client was served while idle connections were open");
    // The first silent connection was closed by the server: it reads the end (after
    // whatever the server wrote first, its HTTP/2 settings).
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 256];
        loop {
            match idle[0].read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle connection stayed open");
    server.stop().await;
}

/// A message shaped to be wrong for `SubmitRequest`: field 1 as raw bytes (not UTF-8)
/// and field 3 (an enum, a varint) length-delimited.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbage {
    #[prost(bytes = "vec", tag = "1")]
    workflow_json: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    workload: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_argument_not_internal() {
    let server = start(ServerConfig::default()).await;
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/sakuga.v1.RenderService/Submit");
    for garbage in [
        Garbage {
            workflow_json: vec![0xff, 0xfe, b'{'],
            workload: Vec::new(),
        },
        Garbage {
            workflow_json: b"{}".to_vec(),
            workload: vec![1, 2, 3],
        },
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let codec = sakuga_proto::codec::StrictCodec::<Garbage, v1::SubmitResponse>::default();
        let status = grpc
            .unary(tonic::Request::new(garbage), path.clone(), codec)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    server.stop().await;
}
