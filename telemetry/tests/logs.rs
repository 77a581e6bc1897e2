//! JSON log lines of one job carry the stage events in order, under one trace id.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sakuga_telemetry::events::{self, EventFields, TraceContext};
use sakuga_telemetry::logging::{self, LogConfig, LogFormat};
use sakuga_telemetry::{AdmissionReason, Decision, Workload};

/// A `MakeWriter` that appends into a shared buffer.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl io::Write for Buffer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
    type Writer = Buffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[test]
fn json_lines_carry_stage_events_in_order_with_one_trace_id() {
    let buffer = Buffer::default();
    let config = LogConfig {
        format: LogFormat::Json,
        ..LogConfig::default()
    };
    let subscriber = logging::subscriber(&config, buffer.clone()).unwrap();
    let trace =
        TraceContext::from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .unwrap();
    let fields = EventFields::new("job-1", Workload::Animation, &trace)
        .with_model("anime.safetensors")
        .with_sampler("euler", 8)
        .with_resolution(512, 512, 1)
        .with_hardware_class("cpu");
    tracing::subscriber::with_default(subscriber, || {
        let job = events::open_job_span("job-1", Workload::Animation, &trace);
        events::record_job_attributes(&job, &fields);
        let _in_job = job.enter();
        events::prompt_received(&fields);
        events::admission_decision(&fields, Decision::Admit, AdmissionReason::Capacity);
        events::model_loaded(
            &fields,
            "anime.safetensors",
            false,
            Duration::from_millis(120),
        );
        {
            let node = events::node_span(&job, "3", "KSampler");
            let _in_node = node.enter();
            events::inference_started(&fields);
            events::inference_finished(&fields, Duration::from_millis(900));
        }
        events::postprocess_done(&fields, Duration::from_millis(40));
        events::frame_emitted(&fields, 0, None);
        events::deliver_complete(&fields, Duration::from_millis(5));
    });

    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    let names: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            events::PROMPT_RECEIVED,
            events::ADMISSION_DECISION,
            events::MODEL_LOADED,
            events::INFERENCE_STARTED,
            events::INFERENCE_FINISHED,
            events::POSTPROCESS_DONE,
            events::FRAME_EMITTED,
            events::DELIVER_COMPLETE,
        ]
    );
    for line in &lines {
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["job_id"], "job-1");
        assert_eq!(line["workload"], "animation");
        assert_eq!(line["model_id"], "anime.safetensors");
        assert_eq!(line["steps"], 8);
        assert_eq!(line["width"], 512);
        assert!(line["span"]["name"].as_str().is_some());
    }
    assert_eq!(lines[4]["duration"], 0.9);
    assert_eq!(lines[3]["span"]["name"], "node");
    assert_eq!(lines[3]["span"]["class_type"], "KSampler");
    assert_eq!(lines[0]["span"]["name"], "job");
    assert_eq!(lines[1]["decision"], "admit");
}

#[test]
fn text_format_is_the_default_and_bad_filters_are_errors() {
    assert_eq!(LogConfig::default().format, LogFormat::Text);
    let bad = LogConfig {
        filter: "sakuga=[".to_owned(),
        ..LogConfig::default()
    };
    assert!(logging::subscriber(&bad, Buffer::default()).is_err());
}
