//! Proto <-> domain mapping: the only code that knows both `sakuga_proto` and the engine's
//! types, so neither side leaks into the other.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value as Json};
use tonic::Status;

use sakuga_proto::v1;
use sakuga_scheduler::admission::Estimate;
use sakuga_scheduler::engine::{JobEvent, JobInfo, JobOutput, JobState, TimedEvent};
use sakuga_telemetry::Workload;

/// Unix milliseconds of a time (0 for none).
pub fn unix_ms(at: Option<SystemTime>) -> i64 {
    at.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64)
}

/// A time from Unix milliseconds (`None` for 0 or less).
pub fn from_unix_ms(ms: i64) -> Option<SystemTime> {
    (ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ms as u64))
}

pub fn workload_to_proto(w: Workload) -> v1::Workload {
    match w {
        Workload::Animation => v1::Workload::Animation,
        Workload::SingleImage => v1::Workload::SingleImage,
        Workload::Batch => v1::Workload::Batch,
    }
}

/// `None` for unspecified (and unknown numbers).
pub fn workload_from_proto(value: i32) -> Option<Workload> {
    match v1::Workload::try_from(value).ok()? {
        v1::Workload::Unspecified => None,
        v1::Workload::Animation => Some(Workload::Animation),
        v1::Workload::SingleImage => Some(Workload::SingleImage),
        v1::Workload::Batch => Some(Workload::Batch),
    }
}

pub fn state_to_proto(s: JobState) -> v1::JobState {
    match s {
        JobState::Queued => v1::JobState::Queued,
        JobState::Running => v1::JobState::Running,
        JobState::Succeeded => v1::JobState::Succeeded,
        JobState::Failed => v1::JobState::Failed,
        JobState::Cancelled => v1::JobState::Cancelled,
        JobState::TimedOut => v1::JobState::TimedOut,
    }
}

pub fn state_from_proto(value: i32) -> Option<JobState> {
    match v1::JobState::try_from(value).ok()? {
        v1::JobState::Unspecified => None,
        v1::JobState::Queued => Some(JobState::Queued),
        v1::JobState::Running => Some(JobState::Running),
        v1::JobState::Succeeded => Some(JobState::Succeeded),
        v1::JobState::Failed => Some(JobState::Failed),
        v1::JobState::Cancelled => Some(JobState::Cancelled),
        v1::JobState::TimedOut => Some(JobState::TimedOut),
    }
}

pub fn estimate_to_proto(e: &Estimate) -> v1::Estimate {
    v1::Estimate {
        peak_memory_bytes: e.peak_memory_bytes,
        expected_seconds: e.expected_duration.as_secs_f64(),
        learned: e.learned,
        width: e.width,
        height: e.height,
        batch: e.batch,
        nodes: e
            .nodes
            .iter()
            .map(|n| v1::NodeEstimate {
                node_id: n.node_id.clone(),
                class_type: n.class_type.clone(),
                memory_bytes: n.memory_bytes,
                expected_seconds: n.duration.as_secs_f64(),
            })
            .collect(),
    }
}

fn output_to_proto(o: &JobOutput) -> v1::Output {
    v1::Output {
        node_id: o.node_id.clone(),
        path: o.path.display().to_string(),
        kind: o.kind.clone(),
    }
}

pub fn job_to_proto(info: &JobInfo) -> v1::Job {
    v1::Job {
        job_id: info.job_id.clone(),
        workload: workload_to_proto(info.workload) as i32,
        state: state_to_proto(info.state) as i32,
        priority: info.priority,
        labels: info.labels.clone().into_iter().collect(),
        trace_id: info.trace_id.clone(),
        idempotency_key: info.idempotency_key.clone().unwrap_or_default(),
        submitted_unix_ms: unix_ms(Some(info.submitted_at)),
        started_unix_ms: unix_ms(info.started_at),
        finished_unix_ms: unix_ms(info.finished_at),
        deadline_unix_ms: unix_ms(info.deadline),
        queue_position: info.queue_position.unwrap_or(0) as u32,
        estimate: info.estimate.as_ref().map(estimate_to_proto),
        error: info.error.clone().unwrap_or_default(),
        outputs: info.outputs.iter().map(output_to_proto).collect(),
        attempts: info.attempts,
        recovered: info.recovered,
        worker: info.worker.clone().unwrap_or_default(),
    }
}

/// A frame as `Watch` sends it, its pixels already in `encoding`.
pub fn frame_to_proto(
    frame: &sakuga_scheduler::engine::Frame,
    encoding: v1::FrameEncoding,
    data: Vec<u8>,
) -> v1::WatchEvent {
    v1::WatchEvent {
        at_unix_ms: unix_ms(Some(frame.produced_at)),
        kind: Some(v1::watch_event::Kind::Frame(v1::Frame {
            node_id: frame.node_id.clone(),
            index: frame.index,
            width: frame.width,
            height: frame.height,
            encoding: encoding as i32,
            data,
            target_fps: frame.target_fps,
            produced_unix_ms: unix_ms(Some(frame.produced_at)),
        })),
    }
}

/// What a watcher missed by falling behind.
pub fn skipped_to_proto(frames_dropped: u64, events_skipped: u64) -> v1::WatchEvent {
    v1::WatchEvent {
        at_unix_ms: unix_ms(Some(SystemTime::now())),
        kind: Some(v1::watch_event::Kind::Skipped(v1::Skipped {
            frames_dropped,
            events_skipped,
        })),
    }
}

/// A feed event as a `WatchEvent` (frames are converted by the caller, which encodes).
pub fn event_to_proto(e: &TimedEvent, trace_id: &str) -> v1::WatchEvent {
    use v1::watch_event::Kind;
    let kind = match &e.event {
        JobEvent::Stage { name, detail } => Kind::Stage(v1::StageEvent {
            name: (*name).to_owned(),
            detail: detail.clone(),
            trace_id: trace_id.to_owned(),
        }),
        JobEvent::Admission {
            decision,
            reason,
            detail,
        } => Kind::Admission(v1::AdmissionEvent {
            decision: decision.as_str().to_owned(),
            reason: reason.as_str().to_owned(),
            detail: detail.clone(),
        }),
        JobEvent::NodeStarted {
            node_id,
            class_type,
        } => Kind::NodeStarted(v1::NodeEvent {
            node_id: node_id.clone(),
            class_type: class_type.clone(),
            duration_seconds: 0.0,
            cached: false,
        }),
        JobEvent::NodeFinished {
            node_id,
            class_type,
            duration,
            cached,
        } => Kind::NodeFinished(v1::NodeEvent {
            node_id: node_id.clone(),
            class_type: class_type.clone(),
            duration_seconds: duration.as_secs_f64(),
            cached: *cached,
        }),
        JobEvent::Progress {
            node_id,
            step,
            steps,
        } => Kind::Progress(v1::Progress {
            node_id: node_id.clone(),
            step: *step,
            steps: *steps,
        }),
        JobEvent::Output {
            node_id,
            path,
            kind,
        } => Kind::Output(v1::Output {
            node_id: node_id.clone(),
            path: path.display().to_string(),
            kind: kind.clone(),
        }),
        JobEvent::Text { node_id, text } => Kind::Text(v1::NodeText {
            node_id: node_id.clone(),
            text: text.clone(),
        }),
        JobEvent::Finished { state, error } => Kind::FinalStatus(v1::FinalStatus {
            state: state_to_proto(*state) as i32,
            error: error.clone().unwrap_or_default(),
        }),
    };
    v1::WatchEvent {
        at_unix_ms: unix_ms(Some(e.at)),
        kind: Some(kind),
    }
}

/// A native graph as API-format JSON.
///
/// # Errors
/// `INVALID_ARGUMENT` for an input without a value.
pub fn graph_to_json(graph: &v1::Graph) -> Result<Json, Status> {
    let mut nodes = Map::new();
    for node in &graph.nodes {
        let mut inputs = Map::new();
        for (name, input) in &node.inputs {
            use v1::input_value::Value as V;
            let value = match &input.value {
                Some(V::IntValue(v)) => Json::from(*v),
                Some(V::FloatValue(v)) => Json::from(*v),
                Some(V::StringValue(v)) => Json::from(v.clone()),
                Some(V::BoolValue(v)) => Json::from(*v),
                Some(V::Link(l)) => serde_json::json!([l.node_id, l.output_index]),
                None => {
                    return Err(Status::invalid_argument(format!(
                        "node {} input {name} has no value",
                        node.id
                    )));
                }
            };
            inputs.insert(name.clone(), value);
        }
        let mut body = Map::new();
        body.insert("class_type".into(), Json::from(node.class_type.clone()));
        body.insert("inputs".into(), Json::Object(inputs));
        if !node.title.is_empty() {
            body.insert("_meta".into(), serde_json::json!({"title": node.title}));
        }
        nodes.insert(node.id.clone(), Json::Object(body));
    }
    Ok(Json::Object(nodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_through_unix_milliseconds_and_zero_means_none() {
        let at = UNIX_EPOCH + Duration::from_millis(1_796_077_875_245);
        assert_eq!(from_unix_ms(unix_ms(Some(at))), Some(at));
        assert_eq!(unix_ms(None), 0);
        assert_eq!(from_unix_ms(0), None);
        assert_eq!(from_unix_ms(-5), None);
    }

    #[test]
    fn every_workload_and_state_round_trips_and_unspecified_is_none() {
        for &w in Workload::ALL {
            assert_eq!(workload_from_proto(workload_to_proto(w) as i32), Some(w));
        }
        for s in [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
            JobState::TimedOut,
        ] {
            assert_eq!(state_from_proto(state_to_proto(s) as i32), Some(s));
        }
        assert_eq!(workload_from_proto(v1::Workload::Unspecified as i32), None);
        assert_eq!(state_from_proto(v1::JobState::Unspecified as i32), None);
        assert_eq!(workload_from_proto(99), None, "unknown numbers");
        assert_eq!(state_from_proto(-1), None);
    }

    #[test]
    fn final_events_carry_their_state_and_error() {
        let event = TimedEvent {
            seq: 3,
            at: UNIX_EPOCH + Duration::from_millis(42),
            event: JobEvent::Finished {
                state: JobState::TimedOut,
                error: Some("deadline".into()),
            },
        };
        let proto = event_to_proto(&event, "trace");
        assert_eq!(proto.at_unix_ms, 42);
        let Some(v1::watch_event::Kind::FinalStatus(status)) = proto.kind else {
            panic!("{proto:?}")
        };
        assert_eq!(status.state, v1::JobState::TimedOut as i32);
        assert_eq!(status.error, "deadline");
        let stage = TimedEvent {
            seq: 1,
            at: UNIX_EPOCH,
            event: JobEvent::Stage {
                name: "prompt_received",
                detail: "2 nodes".into(),
            },
        };
        let Some(v1::watch_event::Kind::Stage(stage)) = event_to_proto(&stage, "t1").kind else {
            panic!("a stage event")
        };
        assert_eq!(
            (stage.name.as_str(), stage.trace_id.as_str()),
            ("prompt_received", "t1")
        );
    }

    #[test]
    fn a_native_graph_becomes_api_format_json() {
        use v1::input_value::Value as V;
        let input = |value| v1::InputValue { value: Some(value) };
        let graph = v1::Graph {
            nodes: vec![
                v1::GraphNode {
                    id: "1".into(),
                    class_type: "EmptyImage".into(),
                    inputs: [
                        ("width".to_owned(), input(V::IntValue(64))),
                        ("scale".to_owned(), input(V::FloatValue(0.5))),
                        ("name".to_owned(), input(V::StringValue("x".into()))),
                        ("flag".to_owned(), input(V::BoolValue(true))),
                    ]
                    .into(),
                    title: "Source".into(),
                },
                v1::GraphNode {
                    id: "2".into(),
                    class_type: "PreviewImage".into(),
                    inputs: [(
                        "images".to_owned(),
                        input(V::Link(v1::Link {
                            node_id: "1".into(),
                            output_index: 0,
                        })),
                    )]
                    .into(),
                    title: String::new(),
                },
            ],
        };
        let json = graph_to_json(&graph).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "scale": 0.5, "name": "x", "flag": true}, "_meta": {"title": "Source"}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
            })
        );
        let mut missing = graph.clone();
        missing.nodes[1]
            .inputs
            .insert("empty".into(), v1::InputValue { value: None });
        let err = graph_to_json(&missing).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("node 2 input empty has no value"));
    }
}
