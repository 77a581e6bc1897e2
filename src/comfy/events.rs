//! A job's feed as ComfyUI's WebSocket messages, in ComfyUI's order:
//! `execution_start`, `execution_cached` (every node served from the output cache before
//! the first node runs), then per node `executing`, `progress`, `executed` (nodes that
//! wrote files), and at the end `execution_success`, `execution_error` or
//! `execution_interrupted`, followed by `executing` with `node: null`.
//!
//! The executor finds cached nodes as it goes, so cached nodes are held back until the
//! first node really starts (or the job ends) and then listed in one `execution_cached`;
//! a cached node found later (an independent branch) gets its own `execution_cached`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value as Json, json};

use sakuga_nodes::NodeEnv;
use sakuga_scheduler::engine::{JobEvent, JobState, TimedEvent};

/// Milliseconds since the Unix epoch, as ComfyUI's `timestamp` fields.
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `{type, data}`, the envelope of every JSON message.
pub fn message(kind: &str, data: Json) -> Json {
    json!({"type": kind, "data": data})
}

/// A file a job wrote, as ComfyUI names it: `{filename, subfolder, type}`, relative to the
/// output or temp dir.
pub fn file_ref(env: &NodeEnv, path: &Path, kind: &str) -> Json {
    let root = if kind == "temp" {
        &env.temp_dir
    } else {
        &env.output_dir
    };
    let rel = path.strip_prefix(root).unwrap_or(path);
    let filename = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let subfolder = if path.starts_with(root) {
        rel.parent()
            .map(|p| {
                p.components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .unwrap_or_default()
    } else {
        String::new()
    };
    json!({"filename": filename, "subfolder": subfolder, "type": kind})
}

/// Follows one job's feed and says what ComfyUI would have sent.
#[derive(Debug)]
pub struct Translator {
    prompt_id: String,
    started: bool,
    /// Cached nodes not announced yet.
    cached: Vec<String>,
    /// Nodes that ran (not cached), in order.
    executed: Vec<String>,
    /// Nodes started and not finished, with their class.
    running: Vec<(String, String)>,
    /// The last node that started.
    last: Option<(String, String)>,
    /// Files per node, for `executed` and the history.
    outputs: BTreeMap<String, Vec<Json>>,
    /// Text per node (`PreviewAny`), for `executed`.
    texts: BTreeMap<String, Vec<String>>,
    /// The status messages (`execution_*`) for the history entry.
    status_messages: Vec<Json>,
    finished: Option<JobState>,
}

impl Translator {
    /// A translator for job `prompt_id`.
    pub fn new(prompt_id: &str) -> Self {
        Self {
            prompt_id: prompt_id.to_owned(),
            started: false,
            cached: Vec::new(),
            executed: Vec::new(),
            running: Vec::new(),
            last: None,
            outputs: BTreeMap::new(),
            texts: BTreeMap::new(),
            status_messages: Vec::new(),
            finished: None,
        }
    }

    /// The final state, once the feed's last event was seen.
    pub fn finished(&self) -> Option<JobState> {
        self.finished
    }

    /// `[type, data]` pairs of the `execution_*` messages, for `/history`'s `status`.
    pub fn status_messages(&self) -> &[Json] {
        &self.status_messages
    }

    fn status(&mut self, out: &mut Vec<Json>, kind: &str, data: Json) {
        self.status_messages.push(json!([kind, data.clone()]));
        out.push(message(kind, data));
    }

    /// Sends `execution_start` and the held-back `execution_cached` once.
    fn begin(&mut self, at: SystemTime, out: &mut Vec<Json>) {
        if self.started {
            return;
        }
        self.started = true;
        let ts = unix_ms(at);
        let id = self.prompt_id.clone();
        self.status(
            out,
            "execution_start",
            json!({"prompt_id": id, "timestamp": ts}),
        );
        let nodes = std::mem::take(&mut self.cached);
        self.status(
            out,
            "execution_cached",
            json!({"nodes": nodes, "prompt_id": id, "timestamp": ts}),
        );
    }

    /// The messages `event` becomes, appended to `out`.
    pub fn event(&mut self, env: &NodeEnv, event: &TimedEvent, out: &mut Vec<Json>) {
        let id = self.prompt_id.clone();
        match &event.event {
            JobEvent::NodeStarted {
                node_id,
                class_type,
            } => {
                self.begin(event.at, out);
                self.running.push((node_id.clone(), class_type.clone()));
                self.last = Some((node_id.clone(), class_type.clone()));
                out.push(message(
                    "executing",
                    json!({"node": node_id, "display_node": node_id, "prompt_id": id}),
                ));
            }
            JobEvent::NodeFinished {
                node_id, cached, ..
            } => self.node_finished(node_id, *cached, event.at, out),
            JobEvent::Progress {
                node_id,
                step,
                steps,
            } => {
                self.begin(event.at, out);
                out.push(message(
                    "progress",
                    json!({"value": step, "max": steps, "prompt_id": id, "node": node_id}),
                ));
            }
            JobEvent::Output {
                node_id,
                path,
                kind,
            } => self
                .outputs
                .entry(node_id.clone())
                .or_default()
                .push(file_ref(env, path, kind)),
            JobEvent::Text { node_id, text } => self
                .texts
                .entry(node_id.clone())
                .or_default()
                .push(text.clone()),
            JobEvent::Finished { state, error } => {
                self.job_finished(*state, error.as_deref(), event.at, out)
            }
            JobEvent::Stage { .. } | JobEvent::Admission { .. } => {}
        }
    }

    fn node_finished(&mut self, node_id: &str, cached: bool, at: SystemTime, out: &mut Vec<Json>) {
        if cached {
            if self.started {
                let data = json!({"nodes": [node_id], "prompt_id": self.prompt_id, "timestamp": unix_ms(at)});
                self.status(out, "execution_cached", data);
            } else {
                self.cached.push(node_id.to_owned());
            }
            return;
        }
        self.running.retain(|(n, _)| n != node_id);
        self.executed.push(node_id.to_owned());
        let mut output = serde_json::Map::new();
        if let Some(files) = self.outputs.get(node_id) {
            output.insert("images".into(), json!(files));
        }
        if let Some(texts) = self.texts.get(node_id) {
            output.insert("text".into(), json!(texts));
        }
        if !output.is_empty() {
            out.push(message(
                "executed",
                json!({
                    "node": node_id,
                    "display_node": node_id,
                    "output": output,
                    "prompt_id": self.prompt_id,
                }),
            ));
        }
    }

    fn job_finished(
        &mut self,
        state: JobState,
        error: Option<&str>,
        at: SystemTime,
        out: &mut Vec<Json>,
    ) {
        self.finished = Some(state);
        // A job deleted from the queue before it started ends silently, as in ComfyUI.
        if state == JobState::Cancelled && !self.started {
            return;
        }
        self.begin(at, out);
        let id = self.prompt_id.clone();
        let ts = unix_ms(at);
        let (node_id, node_type) = self
            .running
            .first()
            .or(self.last.as_ref())
            .cloned()
            .map_or((Json::Null, Json::Null), |(n, c)| (json!(n), json!(c)));
        match state {
            JobState::Succeeded => {
                self.status(
                    out,
                    "execution_success",
                    json!({"prompt_id": id, "timestamp": ts}),
                );
            }
            JobState::Cancelled => {
                let data = json!({
                    "prompt_id": id, "node_id": node_id, "node_type": node_type,
                    "executed": self.executed, "timestamp": ts,
                });
                self.status(out, "execution_interrupted", data);
            }
            _ => {
                let kind = if state == JobState::TimedOut {
                    "sakuga.Timeout"
                } else {
                    "sakuga.JobFailed"
                };
                let data = json!({
                    "prompt_id": id, "node_id": node_id, "node_type": node_type,
                    "executed": self.executed,
                    "exception_message": error.unwrap_or("the job failed"),
                    "exception_type": kind, "traceback": [],
                    "current_inputs": {}, "current_outputs": {}, "timestamp": ts,
                });
                self.status(out, "execution_error", data);
            }
        }
        out.push(message(
            "executing",
            json!({"node": null, "display_node": null, "prompt_id": id}),
        ));
    }
}

/// A preview frame in ComfyUI's binary framing: event type 1 (`PREVIEW_IMAGE`) and image
/// type 2 (PNG), both 4-byte big-endian, then the image.
pub fn preview_frame(png: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(png.len() + 8);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&2u32.to_be_bytes());
    out.extend_from_slice(png);
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    fn timed(event: JobEvent) -> TimedEvent {
        TimedEvent {
            seq: 0,
            at: SystemTime::now(),
            event,
        }
    }

    fn env() -> NodeEnv {
        NodeEnv::new("in".into(), PathBuf::from("out"), "models".into())
    }

    fn kinds(out: &[Json]) -> Vec<String> {
        out.iter()
            .map(|m| m["type"].as_str().unwrap().to_owned())
            .collect()
    }

    fn started(id: &str) -> JobEvent {
        JobEvent::NodeStarted {
            node_id: id.into(),
            class_type: "SaveImage".into(),
        }
    }

    fn finished(id: &str, cached: bool) -> JobEvent {
        JobEvent::NodeFinished {
            node_id: id.into(),
            class_type: "X".into(),
            duration: Duration::ZERO,
            cached,
        }
    }

    #[test]
    fn a_cached_rerun_lists_cached_nodes_before_the_first_executing() {
        let env = env();
        let mut t = Translator::new("p");
        let mut out = Vec::new();
        for e in [
            finished("4", true),
            finished("8", true),
            started("9"),
            JobEvent::Output {
                node_id: "9".into(),
                path: PathBuf::from("out/sub/a_00001_.png"),
                kind: "output".into(),
            },
            finished("9", false),
            JobEvent::Finished {
                state: JobState::Succeeded,
                error: None,
            },
        ] {
            t.event(&env, &timed(e), &mut out);
        }
        assert_eq!(
            kinds(&out),
            [
                "execution_start",
                "execution_cached",
                "executing",
                "executed",
                "execution_success",
                "executing"
            ]
        );
        assert_eq!(out[1]["data"]["nodes"], json!(["4", "8"]));
        assert_eq!(
            out[3]["data"]["output"]["images"][0],
            json!({"filename": "a_00001_.png", "subfolder": "sub", "type": "output"})
        );
        assert_eq!(out[5]["data"]["node"], Json::Null);
    }

    #[test]
    fn a_job_deleted_while_queued_sends_nothing_and_a_failure_names_the_node() {
        let env = env();
        let mut t = Translator::new("p");
        let mut out = Vec::new();
        let cancel = JobEvent::Finished {
            state: JobState::Cancelled,
            error: None,
        };
        t.event(&env, &timed(cancel), &mut out);
        assert!(out.is_empty());

        let mut t = Translator::new("q");
        for e in [
            started("3"),
            JobEvent::Finished {
                state: JobState::Failed,
                error: Some("boom".into()),
            },
        ] {
            t.event(&env, &timed(e), &mut out);
        }
        let error = out.iter().find(|m| m["type"] == "execution_error").unwrap();
        assert_eq!(error["data"]["node_id"], "3");
        assert_eq!(error["data"]["exception_message"], "boom");
    }

    #[test]
    fn preview_frames_use_comfyuis_binary_header() {
        assert_eq!(preview_frame(b"PNG")[..8], [0, 0, 0, 1, 0, 0, 0, 2]);
    }
}
