//! `/prompt`, `/queue`, `/history`, `/interrupt` and `/free` over the engine. Jobs are the
//! engine's; this module keeps only what ComfyUI's tuples show and the engine does not
//! (the client's `number`, the prompt as sent, `extra_data`), bounded, and which history
//! entries a client deleted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json as JsonBody, Router};
use parking_lot::Mutex;
use serde_json::{Map, Value as Json, json};

use sakuga_scheduler::SubmitRequest;
use sakuga_scheduler::engine::{JobInfo, JobState, ListFilter};

use super::events::{file_ref, unix_ms};
use super::ws::{broadcast_status, queue_status, relay_task};
use super::{AppState, ComfyError, error_body};

/// Prompt records kept (the engine keeps 4096 finished jobs in memory as well).
const RECORDS_KEPT: usize = 4096;
/// History entries listed when the client gives no `max_items`.
const HISTORY_DEFAULT: usize = 1000;
/// Jobs asked of the engine per page.
const PAGE: usize = 1000;
/// Priority of a `front: true` prompt (the engine's highest).
const FRONT_PRIORITY: i32 = 100;

/// What ComfyUI's queue and history show of a prompt beyond the engine's job.
#[derive(Debug, Clone)]
struct PromptRecord {
    number: Json,
    prompt: Arc<Json>,
    extra_data: Json,
    outputs: Vec<String>,
    /// `[type, data]` status messages, once the job's relay saw it end.
    messages: Option<Vec<Json>>,
}

#[derive(Debug, Default)]
struct Records {
    by_id: HashMap<String, PromptRecord>,
    order: VecDeque<String>,
    /// History entries deleted by a client (`POST /history`).
    hidden: HashSet<String>,
    hidden_order: VecDeque<String>,
    /// Entries that finished before this were cleared.
    cleared_at: Option<SystemTime>,
}

/// The prompt records and history deletions. See the module docs.
#[derive(Debug, Default)]
pub struct PromptStore {
    inner: Mutex<Records>,
    number: AtomicU64,
}

impl PromptStore {
    fn insert(&self, job_id: &str, record: PromptRecord) {
        let mut inner = self.inner.lock();
        if inner.order.len() >= RECORDS_KEPT
            && let Some(old) = inner.order.pop_front()
        {
            inner.by_id.remove(&old);
        }
        inner.order.push_back(job_id.to_owned());
        inner.by_id.insert(job_id.to_owned(), record);
    }

    fn get(&self, job_id: &str) -> Option<PromptRecord> {
        self.inner.lock().by_id.get(job_id).cloned()
    }

    /// Records the `execution_*` messages of a finished job for its history entry.
    pub fn set_messages(&self, job_id: &str, messages: Vec<Json>) {
        if let Some(r) = self.inner.lock().by_id.get_mut(job_id) {
            r.messages = Some(messages);
        }
    }

    fn hide(&self, job_id: &str) {
        let mut inner = self.inner.lock();
        if inner.hidden.insert(job_id.to_owned()) {
            inner.hidden_order.push_back(job_id.to_owned());
            if inner.hidden_order.len() > RECORDS_KEPT
                && let Some(old) = inner.hidden_order.pop_front()
            {
                inner.hidden.remove(&old);
            }
        }
    }

    fn clear(&self) {
        let mut inner = self.inner.lock();
        inner.cleared_at = Some(SystemTime::now());
        inner.hidden.clear();
        inner.hidden_order.clear();
    }

    fn is_hidden(&self, job: &JobInfo) -> bool {
        let inner = self.inner.lock();
        inner.hidden.contains(&job.job_id)
            || inner
                .cleared_at
                .is_some_and(|t| job.finished_at.is_some_and(|f| f <= t))
    }

    /// The next queue number; `front` ones are negative, as in ComfyUI.
    fn next_number(&self, front: bool) -> Json {
        let n = self.number.fetch_add(1, Ordering::Relaxed) as i64;
        json!(if front { -n } else { n })
    }
}

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/prompt", get(get_prompt).post(post_prompt))
        .route("/queue", get(get_queue).post(post_queue))
        .route("/history", get(get_history).post(post_history))
        .route("/history/{prompt_id}", get(get_history_entry))
        .route("/interrupt", post(post_interrupt))
        .route("/free", post(post_free))
}

async fn get_prompt(State(app): State<Arc<AppState>>) -> JsonBody<Json> {
    JsonBody(queue_status(&app))
}

fn bad(kind: &str, message: &str) -> (axum::http::StatusCode, JsonBody<Json>) {
    (
        axum::http::StatusCode::BAD_REQUEST,
        JsonBody(error_body(kind, message, message)),
    )
}

/// Output node ids of an API-format prompt, by the registry's schemas.
fn output_ids(app: &AppState, prompt: &Json) -> Vec<String> {
    let Ok(engine) = app.engine() else {
        return Vec::new();
    };
    prompt
        .as_object()
        .map(|nodes| {
            nodes
                .iter()
                .filter(|(_, n)| {
                    n.get("class_type")
                        .and_then(Json::as_str)
                        .and_then(|c| engine.registry().get(c))
                        .is_some_and(|c| c.schema().output_node)
                })
                .map(|(id, _)| id.clone())
                .collect()
        })
        .unwrap_or_default()
}

async fn post_prompt(
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<axum::response::Response, ComfyError> {
    use axum::response::IntoResponse;
    let Ok(Json::Object(mut request)) = serde_json::from_slice::<Json>(&body) else {
        return Ok(bad("invalid_prompt", "the body is not a JSON object").into_response());
    };
    let Some(prompt) = request.remove("prompt") else {
        return Ok(bad("no_prompt", "No prompt provided").into_response());
    };
    let front = request
        .get("front")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    let number = match request.get("number") {
        Some(n) if n.is_number() => n.clone(),
        _ => app.prompts.next_number(front),
    };
    let mut extra_data = match request.remove("extra_data") {
        Some(Json::Object(map)) => map,
        _ => Map::new(),
    };
    let client_id = request
        .get("client_id")
        .and_then(Json::as_str)
        .map(str::to_owned);
    if let Some(id) = &client_id {
        extra_data.insert("client_id".into(), json!(id));
    }
    let jobs = app.jobs()?;
    let mut submit = SubmitRequest::new(prompt.clone());
    submit.workflow_bytes = Some(body.len() as u64);
    submit.priority = if front { FRONT_PRIORITY } else { 0 };
    submit.labels.insert("api".into(), "comfyui".into());
    let submitted = jobs.submit(submit).await?;
    let job_id = submitted.job_id;
    app.prompts.insert(
        &job_id,
        PromptRecord {
            number: number.clone(),
            outputs: output_ids(&app, &prompt),
            prompt: Arc::new(prompt),
            extra_data: Json::Object(extra_data),
            messages: None,
        },
    );
    tokio::spawn(relay_task(app.clone(), job_id.clone(), client_id));
    broadcast_status(&app);
    let body = json!({"prompt_id": job_id, "number": number, "node_errors": {}});
    Ok(JsonBody(body).into_response())
}

/// `[number, prompt_id, prompt, extra_data, outputs_to_execute]`, ComfyUI's queue item.
fn queue_item(app: &AppState, job: &JobInfo) -> Json {
    match app.prompts.get(&job.job_id) {
        Some(r) => json!([r.number, job.job_id, *r.prompt, r.extra_data, r.outputs]),
        None => json!([0, job.job_id, {}, {}, []]),
    }
}

async fn jobs_in(app: &AppState, state: JobState) -> Result<Vec<JobInfo>, ComfyError> {
    let jobs_front = app.jobs()?;
    let filter = ListFilter {
        state: Some(state),
        ..ListFilter::default()
    };
    let mut jobs = Vec::new();
    let mut token = None;
    loop {
        let page = jobs_front.list(filter.clone(), PAGE, token).await?;
        jobs.extend(page.jobs);
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => return Ok(jobs),
        }
    }
}

async fn get_queue(State(app): State<Arc<AppState>>) -> Result<JsonBody<Json>, ComfyError> {
    let running = jobs_in(&app, JobState::Running).await?;
    let mut pending = jobs_in(&app, JobState::Queued).await?;
    pending.sort_by_key(|j| j.queue_position.unwrap_or(usize::MAX));
    let running: Vec<Json> = running.iter().map(|j| queue_item(&app, j)).collect();
    let pending: Vec<Json> = pending.iter().map(|j| queue_item(&app, j)).collect();
    Ok(JsonBody(
        json!({"queue_running": running, "queue_pending": pending}),
    ))
}

fn id_list(body: &Json, key: &str) -> Vec<String> {
    body.get(key)
        .and_then(Json::as_array)
        .map(|ids| {
            ids.iter()
                .filter_map(Json::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn parse_body(body: &Bytes) -> Result<Json, ComfyError> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| ComfyError::BadRequest(format!("not JSON: {e}")))
}

/// `{"clear": true}` cancels every queued job; `{"delete": [ids]}` the queued ones named.
/// Running jobs are left alone, as in ComfyUI (`/interrupt` stops those).
async fn post_queue(State(app): State<Arc<AppState>>, body: Bytes) -> Result<(), ComfyError> {
    let body = parse_body(&body)?;
    let jobs = app.jobs()?;
    let mut cancel: Vec<String> = Vec::new();
    if body.get("clear").and_then(Json::as_bool) == Some(true) {
        cancel.extend(
            jobs_in(&app, JobState::Queued)
                .await?
                .into_iter()
                .map(|j| j.job_id),
        );
    }
    for id in id_list(&body, "delete") {
        if jobs
            .get(&id)
            .await
            .is_ok_and(|j| j.state == JobState::Queued)
        {
            cancel.push(id);
        }
    }
    for id in cancel {
        let _ = jobs.cancel(&id).await;
    }
    broadcast_status(&app);
    Ok(())
}

/// Stops the running job (or, with `{"prompt_id"}`, that job only if it is running).
async fn post_interrupt(State(app): State<Arc<AppState>>, body: Bytes) -> Result<(), ComfyError> {
    let body = parse_body(&body).unwrap_or_default();
    let only = body.get("prompt_id").and_then(Json::as_str);
    let jobs = app.jobs()?;
    for job in jobs_in(&app, JobState::Running).await? {
        if only.is_none_or(|id| id == job.job_id) {
            let _ = jobs.cancel(&job.job_id).await;
        }
    }
    Ok(())
}

/// Accepted for compatibility; the model cache evicts by its own byte budget.
async fn post_free(body: Bytes) -> Result<(), ComfyError> {
    parse_body(&body).map(|_| ())
}

/// A finished job as a `/history` entry.
fn history_entry(app: &AppState, job: &JobInfo) -> Json {
    let env = app.engine().map(|e| e.env().clone()).ok();
    let mut outputs: Map<String, Json> = Map::new();
    let mut meta: Map<String, Json> = Map::new();
    for out in &job.outputs {
        let Some(env) = &env else { break };
        let entry = outputs
            .entry(out.node_id.clone())
            .or_insert_with(|| json!({"images": []}));
        if let Some(images) = entry["images"].as_array_mut() {
            images.push(file_ref(env, &out.path, &out.kind));
        }
        meta.insert(
            out.node_id.clone(),
            json!({"node_id": out.node_id, "display_node": out.node_id, "parent_node": null, "real_node_id": out.node_id}),
        );
    }
    let record = app.prompts.get(&job.job_id);
    let success = job.state == JobState::Succeeded;
    let messages = record
        .as_ref()
        .and_then(|r| r.messages.clone())
        .unwrap_or_else(|| fallback_messages(job));
    json!({
        "prompt": queue_item(app, job),
        "outputs": outputs,
        "status": {
            "status_str": if success { "success" } else { "error" },
            "completed": success,
            "messages": messages,
        },
        "meta": meta,
    })
}

/// Status messages from the job record, for jobs no relay followed (submitted over gRPC).
fn fallback_messages(job: &JobInfo) -> Vec<Json> {
    let id = &job.job_id;
    let mut messages = Vec::new();
    if let Some(at) = job.started_at {
        messages.push(json!(["execution_start", {"prompt_id": id, "timestamp": unix_ms(at)}]));
    }
    let end = job.finished_at.map_or(0, unix_ms);
    let last = match job.state {
        JobState::Succeeded => json!(["execution_success", {"prompt_id": id, "timestamp": end}]),
        JobState::Cancelled => {
            json!(["execution_interrupted", {"prompt_id": id, "timestamp": end}])
        }
        _ => json!(["execution_error", {
            "prompt_id": id, "timestamp": end,
            "exception_message": job.error.clone().unwrap_or_default(),
        }]),
    };
    messages.push(last);
    messages
}

async fn get_history(
    State(app): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<JsonBody<Json>, ComfyError> {
    let max_items = query
        .get("max_items")
        .and_then(|m| m.parse::<usize>().ok())
        .unwrap_or(HISTORY_DEFAULT);
    let jobs = app.jobs()?;
    let mut finished = Vec::new();
    let mut token = None;
    while finished.len() < max_items {
        let page = jobs.list(ListFilter::default(), PAGE, token).await?;
        finished.extend(
            page.jobs
                .into_iter()
                .filter(|j| j.state.is_final() && !app.prompts.is_hidden(j)),
        );
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    finished.truncate(max_items);
    // Newest first from the engine; ComfyUI lists oldest first.
    let mut out = Map::new();
    for job in finished.iter().rev() {
        out.insert(job.job_id.clone(), history_entry(&app, job));
    }
    Ok(JsonBody(Json::Object(out)))
}

async fn get_history_entry(
    State(app): State<Arc<AppState>>,
    Path(prompt_id): Path<String>,
) -> Result<JsonBody<Json>, ComfyError> {
    let jobs = app.jobs()?;
    let mut out = Map::new();
    if let Ok(job) = jobs.get(&prompt_id).await
        && job.state.is_final()
        && !app.prompts.is_hidden(&job)
    {
        out.insert(job.job_id.clone(), history_entry(&app, &job));
    }
    Ok(JsonBody(Json::Object(out)))
}

async fn post_history(State(app): State<Arc<AppState>>, body: Bytes) -> Result<(), ComfyError> {
    let body = parse_body(&body)?;
    if body.get("clear").and_then(Json::as_bool) == Some(true) {
        app.prompts.clear();
    }
    for id in id_list(&body, "delete") {
        app.prompts.hide(&id);
    }
    Ok(())
}
