//! ComfyUI's unified jobs API (`GET /jobs?status=&limit=&offset=`, `GET /jobs/{id}`), which
//! the current frontend reads its queue and history panels from.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json as JsonBody, Router};
use serde_json::{Map, Value as Json, json};

use sakuga_scheduler::engine::{JobInfo, JobState, ListFilter};

use super::events::{file_ref, unix_ms};
use super::{AppState, ComfyError};

/// Jobs one page may hold.
const MAX_LIMIT: usize = 1000;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/jobs", get(list_jobs))
        .route("/jobs/{id}", get(job_detail))
}

/// ComfyUI's status word for a job state.
fn status_of(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "pending",
        JobState::Running => "in_progress",
        JobState::Succeeded => "completed",
        JobState::Cancelled => "cancelled",
        JobState::Failed | JobState::TimedOut => "failed",
    }
}

fn summary(app: &AppState, job: &JobInfo) -> Json {
    let env = app.engine().ok().map(|e| e.env().clone());
    let preview = env.as_ref().and_then(|env| {
        job.outputs.first().map(|o| {
            let mut r = file_ref(env, &o.path, &o.kind);
            r["nodeId"] = json!(o.node_id);
            r["mediaType"] = json!("images");
            r
        })
    });
    let error = (matches!(job.state, JobState::Failed | JobState::TimedOut)).then(|| {
        json!({
            "prompt_id": job.job_id, "node_id": "", "node_type": "",
            "exception_message": job.error.clone().unwrap_or_default(),
            "exception_type": "sakuga.JobFailed", "traceback": [],
        })
    });
    json!({
        "id": job.job_id,
        "status": status_of(job.state),
        "create_time": unix_ms(job.submitted_at),
        "execution_start_time": job.started_at.map(unix_ms),
        "execution_end_time": job.finished_at.map(unix_ms),
        "preview_output": preview,
        "outputs_count": job.outputs.len(),
        "previewable_outputs_count": job.outputs.len(),
        "execution_error": error,
        "priority": job.priority,
    })
}

async fn list_jobs(
    State(app): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<JsonBody<Json>, ComfyError> {
    let wanted: Vec<&str> = query
        .get("status")
        .map(|s| s.split(',').map(str::trim).collect())
        .unwrap_or_default();
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(100)
        .min(MAX_LIMIT);
    let offset = query
        .get("offset")
        .and_then(|o| o.parse::<usize>().ok())
        .unwrap_or(0);
    let jobs = app.jobs()?;
    let mut matching = Vec::new();
    let mut token = None;
    // Newest first from the engine; stop once the page and one more (for has_more) are in.
    while matching.len() <= offset + limit {
        let page = jobs.list(ListFilter::default(), MAX_LIMIT, token).await?;
        matching.extend(
            page.jobs
                .into_iter()
                .filter(|j| wanted.is_empty() || wanted.contains(&status_of(j.state))),
        );
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    let total = matching.len();
    let jobs: Vec<Json> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|j| summary(&app, j))
        .collect();
    Ok(JsonBody(json!({
        "jobs": jobs,
        "pagination": {"offset": offset, "limit": limit, "total": total, "has_more": total > offset + limit},
    })))
}

async fn job_detail(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<JsonBody<Json>, ComfyError> {
    let job = app
        .jobs()?
        .get(&id)
        .await
        .map_err(|_| ComfyError::NotFound)?;
    let env = app.engine()?.env().clone();
    let mut outputs: Map<String, Json> = Map::new();
    for out in &job.outputs {
        let entry = outputs
            .entry(out.node_id.clone())
            .or_insert_with(|| json!({"images": []}));
        if let Some(images) = entry["images"].as_array_mut() {
            images.push(file_ref(&env, &out.path, &out.kind));
        }
    }
    let mut detail = summary(&app, &job);
    detail["outputs"] = Json::Object(outputs);
    detail["update_time"] = json!(job.finished_at.or(job.started_at).map_or(0, unix_ms));
    Ok(JsonBody(detail))
}
