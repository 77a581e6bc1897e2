//! End to end over gRPC: the real server on 127.0.0.1:0 and generated tonic clients.
//! Submit and watch to completion, cancel, invalid workflows with node_errors in the
//! status details, overload with RetryInfo, auth, health transitions, reflection, KEDA.

mod support;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

use sakuga::client::SakugaClient;
use sakuga::server::{EngineStart, ServerConfig, run};
use sakuga_nodes::{NodeEnv, NodeRegistry};
use sakuga_proto::externalscaler as keda;
use sakuga_proto::v1;
use sakuga_scheduler::admission::WorkloadValues;
use sakuga_scheduler::{EngineConfig, EngineHandle};
use sakuga_telemetry::{Signals, SignalsConfig};

struct TestServer {
    url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn start(
    config: ServerConfig,
    engine_config: EngineConfig,
    gate: Option<tokio::sync::oneshot::Receiver<()>>,
) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let start = EngineStart::Start(Box::new(move || {
        if let Some(gate) = gate {
            let _ = gate.blocking_recv();
        }
        let env = NodeEnv::new(root.join("input"), root.join("output"), root.join("models"));
        let config = EngineConfig {
            data_dir: Some(root.join("data")),
            ..engine_config
        };
        EngineHandle::start(
            config,
            Arc::new(NodeRegistry::with_builtins()),
            Arc::new(env),
            Signals::new(SignalsConfig::default()),
        )
    }));
    let task = tokio::spawn(async move {
        run(listener, start, config, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    TestServer {
        url,
        shutdown: Some(tx),
        task,
        _dir: dir,
    }
}

impl TestServer {
    async fn client(&self, token: Option<&str>) -> SakugaClient {
        SakugaClient::connect(&self.url, token).await.unwrap()
    }

    async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

fn frames_workflow(frames: u32) -> String {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 8, "batch_size": frames, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "StreamFrames", "inputs": {"images": ["2", 0], "fps": 24.0, "pace": false}},
    })
    .to_string()
}

fn paced_workflow(frames: u32, fps: f64) -> String {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": frames, "color": 0}},
        "2": {"class_type": "StreamFrames", "inputs": {"images": ["1", 0], "fps": fps, "pace": true}},
    })
    .to_string()
}

fn submit(workflow: String, workload: v1::Workload) -> v1::SubmitRequest {
    v1::SubmitRequest {
        workflow: Some(v1::submit_request::Workflow::WorkflowJson(workflow)),
        workload: workload as i32,
        ..Default::default()
    }
}

async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn wait_healthy(url: &str, want: ServingStatus) {
    let mut health = HealthClient::new(channel(url).await);
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            if status == want as i32 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("health status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_watch_cancel_invalid_and_keda() {
    let server = start(ServerConfig::default(), EngineConfig::default(), None).await;
    wait_healthy(&server.url, ServingStatus::Serving).await;
    let mut client = server.client(None).await;

    // Submit and watch to completion: PNG frames, stage events, final status.
    let submitted = client
        .render
        .submit(submit(frames_workflow(3), v1::Workload::Unspecified))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(submitted.workload, v1::Workload::Animation as i32);
    let mut stream = client
        .render
        .watch(v1::WatchRequest {
            job_id: submitted.job_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut frames, mut stages, mut final_state) = (Vec::new(), Vec::new(), None);
    while let Some(event) = stream.message().await.unwrap() {
        match event.kind.unwrap() {
            v1::watch_event::Kind::Frame(f) => frames.push(f),
            v1::watch_event::Kind::Stage(s) => stages.push(s.name),
            v1::watch_event::Kind::FinalStatus(f) => final_state = Some(f.state),
            _ => {}
        }
    }
    assert_eq!(final_state, Some(v1::JobState::Succeeded as i32));
    assert_eq!(frames.len(), 3);
    assert!(frames[0].data.starts_with(b"\x89PNG"), "PNG by default");
    assert_eq!((frames[0].width, frames[0].height), (16, 8));
    assert!(stages.contains(&"prompt_received".to_string()));
    assert!(stages.contains(&"deliver_complete".to_string()));

    // Invalid workflow: INVALID_ARGUMENT with node_errors in the details.
    let bad = json!({"1": {"class_type": "PreviewImage", "inputs": {}}}).to_string();
    let status = client
        .render
        .submit(submit(bad, v1::Workload::SingleImage))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status.get_error_details();
    let node_errors = details
        .error_info()
        .unwrap()
        .metadata
        .get("node_errors")
        .unwrap()
        .clone();
    assert!(
        node_errors.contains("required_input_missing"),
        "{node_errors}"
    );
    assert!(!details.bad_request().unwrap().field_violations.is_empty());

    // Cancel a running paced job; KEDA sees the work while it is there.
    let slow = client
        .render
        .submit(submit(
            paced_workflow(1000, 10.0),
            v1::Workload::SingleImage,
        ))
        .await
        .unwrap()
        .into_inner();
    let queued = client
        .render
        .submit(submit(paced_workflow(10, 10.0), v1::Workload::Batch))
        .await
        .unwrap()
        .into_inner();
    let metrics = client
        .scaler
        .get_metrics(keda::GetMetricsRequest {
            scaled_object_ref: None,
            metric_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let value = &metrics.metric_values[0];
    assert_eq!(value.metric_name, "sakuga_demand");
    assert!(
        value.metric_value >= 1 && value.metric_value_float > 0.0,
        "{value:?}"
    );
    assert!(
        client
            .scaler
            .is_active(keda::ScaledObjectRef::default())
            .await
            .unwrap()
            .into_inner()
            .result
    );
    let spec = client
        .scaler
        .get_metric_spec(keda::ScaledObjectRef::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs[0].target_size, 10);
    for id in [&queued.job_id, &slow.job_id] {
        client
            .render
            .cancel(v1::CancelRequest { job_id: id.clone() })
            .await
            .unwrap();
        let mut stream = client
            .render
            .watch(v1::WatchRequest {
                job_id: id.clone(),
                skip_frames: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut last = None;
        while let Some(event) = stream.message().await.unwrap() {
            if let Some(v1::watch_event::Kind::FinalStatus(f)) = event.kind {
                last = Some(f.state);
            }
        }
        assert_eq!(last, Some(v1::JobState::Cancelled as i32));
    }
    let job = client
        .render
        .get_job(v1::GetJobRequest {
            job_id: slow.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, v1::JobState::Cancelled as i32);
    let after = client
        .scaler
        .get_metrics(keda::GetMetricsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.metric_values[0].metric_value, 0);
    let listed = client
        .render
        .list_jobs(v1::ListJobsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.jobs.len(), 2);
    assert!(!listed.next_page_token.is_empty());

    let signals = client
        .signals
        .get_signals(v1::GetSignalsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(signals.recommendation.unwrap().replicas >= 1);
    let nodes = client
        .nodes
        .list_node_types(v1::ListNodeTypesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(nodes.object_info_json.contains("StreamFrames"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_denied_with_retry_info() {
    let mut engine = EngineConfig::default();
    engine.tunables.admission.queue_caps = WorkloadValues {
        animation: 1,
        single_image: 1,
        batch: 1,
    };
    let server = start(ServerConfig::default(), engine, None).await;
    wait_healthy(&server.url, ServingStatus::Serving).await;
    let mut client = server.client(None).await;
    // One runs, one queues, the next is over the cap.
    let running = client
        .render
        .submit(submit(paced_workflow(1000, 10.0), v1::Workload::Batch))
        .await
        .unwrap()
        .into_inner();
    let mut denied = None;
    for _ in 0..3 {
        if let Err(status) = client
            .render
            .submit(submit(paced_workflow(5, 10.0), v1::Workload::Batch))
            .await
        {
            denied = Some(status);
            break;
        }
    }
    let status = denied.expect("the batch queue cap denies");
    assert_eq!(status.code(), Code::ResourceExhausted);
    let retry = status
        .get_details_retry_info()
        .expect("RetryInfo")
        .retry_delay
        .unwrap();
    assert!(retry >= Duration::from_secs(1));
    client
        .render
        .cancel(v1::CancelRequest {
            job_id: running.job_id,
        })
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_health_transitions_and_reflection() {
    let (open_engine, gate) = tokio::sync::oneshot::channel();
    let config = ServerConfig {
        auth_token: Some("s3cret".into()),
        ..ServerConfig::default()
    };
    let server = start(config, EngineConfig::default(), Some(gate)).await;
    // Before the engine is ready: NOT_SERVING.
    wait_healthy(&server.url, ServingStatus::NotServing).await;
    open_engine.send(()).unwrap();
    wait_healthy(&server.url, ServingStatus::Serving).await;

    let mut anonymous = server.client(None).await;
    let status = anonymous
        .render
        .get_job(v1::GetJobRequest { job_id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut wrong = server.client(Some("nope")).await;
    assert_eq!(
        wrong
            .render
            .get_job(v1::GetJobRequest { job_id: "x".into() })
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let mut authed = server.client(Some("s3cret")).await;
    assert_eq!(
        authed
            .render
            .get_job(v1::GetJobRequest { job_id: "x".into() })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Reflection (open, no token) lists every service, v1 and v1alpha.
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel(&server.url).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("no service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "sakuga.v1.RenderService",
        "sakuga.v1.SignalService",
        "sakuga.v1.NodeService",
        "externalscaler.ExternalScaler",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest as AlphaReq;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
        let mut alpha = AlphaClient::new(channel(&server.url).await);
        let req = AlphaReq {
            host: String::new(),
            message_request: Some(AlphaRequest::ListServices(String::new())),
        };
        let mut stream = alpha
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        assert!(stream.message().await.unwrap().is_some());
    }

    // Draining: NOT_SERVING, then the server stops.
    let url = server.url.clone();
    let mut health = HealthClient::new(channel(&url).await);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    let stop = tokio::spawn(server.stop());
    let mut saw_not_serving = false;
    while let Ok(Some(update)) = watch.message().await {
        if update.status == ServingStatus::NotServing as i32 {
            saw_not_serving = true;
            break;
        }
    }
    assert!(saw_not_serving, "health went NOT_SERVING while draining");
    // Open streams hold a graceful shutdown; a prober's Watch ends when it hangs up.
    drop(watch);
    drop(health);
    drop((anonymous, wrong, authed, reflection));
    stop.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_bumps_the_generation_and_warmup_reports_models() {
    let reload: sakuga::server::ReloadFn = Arc::new(|engine: &EngineHandle| {
        let mut tunables = engine.tunables();
        tunables.features.upscaler_off.batch = !tunables.features.upscaler_off.batch;
        Ok(engine.reload(tunables, "test"))
    });
    let config = ServerConfig {
        reload: Some(reload),
        ..ServerConfig::default()
    };
    let server = start(config, EngineConfig::default(), None).await;
    wait_healthy(&server.url, ServingStatus::Serving).await;
    let mut client = server.client(None).await;
    let before = client
        .signals
        .get_signals(v1::GetSignalsRequest {})
        .await
        .unwrap()
        .into_inner()
        .config_generation;
    let reloaded = client
        .signals
        .reload(v1::ReloadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(reloaded.changed);
    assert_eq!(reloaded.generation, before + 1);
    assert_eq!(reloaded.config_hash.len(), 16);
    let after = client
        .signals
        .get_signals(v1::GetSignalsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.config_generation, before + 1);
    assert!(
        !after.planned_heavy_load,
        "warmup's planned load is off again once it is done"
    );

    let warm = client
        .signals
        .warmup(v1::WarmupRequest {
            models: vec!["missing.safetensors".into(), "../escape".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(warm.loaded.is_empty());
    assert_eq!(warm.failed.len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_verified_clients_only() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    // A test CA and a leaf certificate for "localhost" signed by it (rustls refuses a CA
    // certificate as the server's own).
    let dir = certs.path();
    support::tls::make_certs(dir);
    let ca_pem = std::fs::read(dir.join("ca.pem")).unwrap();
    let cert_pem = std::fs::read(&cert).unwrap();
    let config = ServerConfig {
        tls: Some(sakuga::server::TlsIdentity {
            cert_pem: cert_pem.clone(),
            key_pem: std::fs::read(&key).unwrap(),
        }),
        ..ServerConfig::default()
    };
    let server = start(config, EngineConfig::default(), None).await;
    let https = server.url.replace("http://", "https://");
    let mut client = SakugaClient::connect_with(&https, None, Some((&ca_pem, "localhost")))
        .await
        .unwrap();
    let status = client
        .render
        .get_job(v1::GetJobRequest { job_id: "x".into() })
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::NotFound | Code::Unavailable),
        "{status}"
    );
    // A plaintext client cannot talk to it.
    let plain = SakugaClient::connect(&server.url, None).await;
    if let Ok(mut plain) = plain {
        assert!(
            plain
                .render
                .get_job(v1::GetJobRequest { job_id: "x".into() })
                .await
                .is_err()
        );
    }
    drop(client);
    server.stop().await;
}
