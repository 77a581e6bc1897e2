//! Traces as a backend sees them: a real `sakuga serve --otlp-endpoint` exports to an
//! OTLP/gRPC receiver in this test. The client's span is the parent of the job span, the
//! job span the parent of every node span (the first node of an animation job included),
//! all in the client's trace, with the job's attributes; log lines name the same span.
//!
//! Run: `cargo test --test otlp_trace`.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use sakuga::client::SakugaClient;
use sakuga_proto::v1;

/// Hands every exported span to the test.
struct Receiver(mpsc::UnboundedSender<Span>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send(span);
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(span: &Span) -> BTreeMap<String, String> {
    span.attributes
        .iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => s.clone(),
                AnyValue::IntValue(i) => i.to_string(),
                AnyValue::DoubleValue(d) => d.to_string(),
                AnyValue::BoolValue(b) => b.to_string(),
                _ => return None,
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

async fn submit_traced(client: &mut SakugaClient, workflow: &Value, traceparent: &str) -> String {
    let mut request = tonic::Request::new(v1::SubmitRequest {
        workflow: Some(v1::submit_request::Workflow::WorkflowJson(
            workflow.to_string(),
        )),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    client
        .render
        .submit(request)
        .await
        .unwrap()
        .into_inner()
        .job_id
}

/// The spans of one trace, once its job span and `nodes` node spans have arrived.
async fn spans_of(
    received: &mut mpsc::UnboundedReceiver<Span>,
    all: &mut Vec<Span>,
    trace_id: &str,
    nodes: usize,
) -> Vec<Span> {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let mine: Vec<Span> = all
                .iter()
                .filter(|s| hex(&s.trace_id) == trace_id)
                .cloned()
                .collect();
            let jobs = mine.iter().filter(|s| s.name == "job").count();
            let node_spans = mine.iter().filter(|s| s.name == "node").count();
            if jobs == 1 && node_spans >= nodes {
                return mine;
            }
            all.push(received.recv().await.expect("the receiver stays up"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the spans of trace {trace_id} were not all exported"))
}

fn check_tree(spans: &[Span], client_span: &str, expect: &[(&str, &str)]) -> String {
    let job = spans.iter().find(|s| s.name == "job").unwrap();
    assert_eq!(
        hex(&job.parent_span_id),
        client_span,
        "the job span is a child of the client's span"
    );
    let job_id = hex(&job.span_id);
    let attrs = attributes(job);
    for (key, value) in expect {
        assert_eq!(
            attrs.get(*key).map(String::as_str),
            Some(*value),
            "job span attribute {key}: {attrs:?}"
        );
    }
    for node in spans.iter().filter(|s| s.name == "node") {
        assert_eq!(
            hex(&node.parent_span_id),
            job_id,
            "node span {:?} is a child of the job span",
            attributes(node)
        );
    }
    job_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_form_one_tree_from_the_client_span_down_to_the_nodes() {
    let (tx, mut received) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    sakuga_models::demo::write_demo_models(&dir.path().join("models")).unwrap();
    let endpoint = format!("http://{collector}");
    let server = support::spawn_server_full(
        dir.path(),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--log-format",
            "json",
            "--log-filter",
            "info",
        ],
        &[],
    );
    support::wait_serving(&server.url).await;
    let mut client = SakugaClient::connect(&server.url, None).await.unwrap();

    // A single image on the demo checkpoint: model, sampler, steps, resolution, batch.
    let mut txt2img: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/anime_txt2img.json"
        ))
        .unwrap(),
    )
    .unwrap();
    txt2img["5"]["inputs"] = json!({"width": 64, "height": 64, "batch_size": 1});
    txt2img["3"]["inputs"]["steps"] = json!(3);
    let image_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let image_parent = "00f067aa0ba902b7";
    let image_job = submit_traced(
        &mut client,
        &txt2img,
        &format!("00-{image_trace}-{image_parent}-01"),
    )
    .await;
    assert_eq!(
        support::watch_to_end(&mut client, &image_job).await,
        v1::JobState::Succeeded as i32
    );

    // An animation job: its first node used to be exported as a root of its own.
    let animation = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 4, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "StreamFrames", "inputs": {"images": ["2", 0], "fps": 24.0, "pace": true}},
    });
    let animation_trace = "0af7651916cd43dd8448eb211c80319c";
    let animation_parent = "b7ad6b7169203331";
    let animation_job = submit_traced(
        &mut client,
        &animation,
        &format!("00-{animation_trace}-{animation_parent}-01"),
    )
    .await;
    assert_eq!(
        support::watch_to_end(&mut client, &animation_job).await,
        v1::JobState::Succeeded as i32
    );

    let mut all = Vec::new();
    let image_spans = spans_of(&mut received, &mut all, image_trace, 8).await;
    let image_span = check_tree(
        &image_spans,
        image_parent,
        &[
            ("job_id", image_job.as_str()),
            ("workload", "single_image"),
            ("model_id", "sakuga-demo-sd15.safetensors"),
            ("sampler", "dpmpp_2m"),
            ("steps", "3"),
            ("width", "64"),
            ("height", "64"),
            ("batch_size", "1"),
            ("hardware_class", "cpu"),
        ],
    );
    let animation_spans = spans_of(&mut received, &mut all, animation_trace, 3).await;
    check_tree(
        &animation_spans,
        animation_parent,
        &[
            ("job_id", animation_job.as_str()),
            ("workload", "animation"),
        ],
    );
    // No span of either trace is a root: the client's span is every tree's top.
    for span in image_spans.iter().chain(&animation_spans) {
        assert!(!span.parent_span_id.is_empty(), "{} is a root", span.name);
    }

    // Log lines name the exported job span.
    let prompt = tokio::task::spawn_blocking(move || {
        loop {
            let line = server
                .logs
                .recv_timeout(Duration::from_secs(30))
                .expect("a prompt_received log line for the traced job");
            let Ok(line) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if line["event"] == "prompt_received" && line["trace_id"] == image_trace {
                return line;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(prompt["span_id"], image_span.as_str());
}
