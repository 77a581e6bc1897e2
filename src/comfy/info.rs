//! `/object_info[/{class}]`, `/system_stats`, `/features`, `/extensions`, the user data,
//! settings and users endpoints the ComfyUI frontend boots from (stored under the data
//! dir, one default user), and the frontend's static files.

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json as JsonBody, Router};
use serde_json::{Map, Value as Json, json};

use super::files::file_response;
use super::{AppState, ComfyError};

/// Largest settings file read back.
const MAX_SETTINGS_BYTES: u64 = 4 << 20;
/// Most files a user data listing returns.
const MAX_LISTING: usize = 10_000;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/object_info", get(object_info))
        .route("/object_info/{class}", get(object_info_one))
        .route("/system_stats", get(system_stats))
        .route("/features", get(features))
        .route("/extensions", get(|| async { JsonBody(json!([])) }))
        .route("/i18n", get(|| async { JsonBody(json!({})) }))
        .route("/global_subgraphs", get(|| async { JsonBody(json!({})) }))
        .route("/workflow_templates", get(|| async { JsonBody(json!({})) }))
        .route("/experiment/models", get(|| async { JsonBody(json!([])) }))
        .route("/users", get(users).post(create_user))
        .route("/settings", get(settings).post(post_settings))
        .route("/settings/{id}", get(setting).post(post_setting))
        .route("/userdata", get(list_userdata))
        .route(
            "/userdata/{file}",
            get(get_userdata)
                .post(post_userdata)
                .delete(delete_userdata),
        )
        .route("/userdata/{file}/move/{dest}", post(move_userdata))
}

async fn object_info(State(app): State<Arc<AppState>>) -> Result<JsonBody<Json>, ComfyError> {
    let engine = app.engine()?.clone();
    let mut info = tokio::task::spawn_blocking(move || engine.registry().object_info(engine.env()))
        .await
        .map_err(|e| ComfyError::Io(std::io::Error::other(e)))?;
    if let Some(classes) = info.as_object_mut() {
        classes.values_mut().for_each(with_module);
    }
    Ok(JsonBody(info))
}

async fn object_info_one(
    State(app): State<Arc<AppState>>,
    Path(class): Path<String>,
) -> Result<JsonBody<Json>, ComfyError> {
    let engine = app.engine()?;
    let mut out = Map::new();
    if let Some(node) = engine.registry().get(&class) {
        let env = engine.env();
        let list = |options: &_| sakuga_nodes::files::list_options(env, options);
        let mut info = node.schema().to_object_info(&list);
        with_module(&mut info);
        out.insert(class, info);
    }
    Ok(JsonBody(Json::Object(out)))
}

/// The frontend reads `python_module` to tell core nodes from custom ones.
fn with_module(info: &mut Json) {
    if let Some(map) = info.as_object_mut() {
        map.entry("python_module").or_insert_with(|| json!("nodes"));
    }
}

/// `MemTotal` and `MemAvailable` of /proc/meminfo in bytes (0 where unknown).
fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

async fn system_stats(State(app): State<Arc<AppState>>) -> Result<JsonBody<Json>, ComfyError> {
    let engine = app.engine()?;
    let (ram_total, ram_free) = memory();
    let cuda = engine.env().device.is_cuda();
    let device = if cuda { "cuda" } else { "cpu" };
    let argv: Vec<String> = std::env::args().collect();
    Ok(JsonBody(json!({
        "system": {
            "os": std::env::consts::OS,
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": format!("sakuga {}", env!("CARGO_PKG_VERSION")),
            "python_version": "",
            "pytorch_version": "",
            "embedded_python": false,
            "argv": argv,
        },
        "devices": [{
            "name": device,
            "type": device,
            "index": if cuda { json!(0) } else { Json::Null },
            "vram_total": ram_total,
            "vram_free": ram_free,
            "torch_vram_total": 0,
            "torch_vram_free": 0,
        }],
    })))
}

async fn features(State(app): State<Arc<AppState>>) -> JsonBody<Json> {
    JsonBody(json!({
        "supports_preview_metadata": false,
        "max_upload_size": app.config.max_body_bytes,
    }))
}

async fn users() -> JsonBody<Json> {
    JsonBody(json!({"storage": "server", "migrated": true}))
}

/// Single-user mode: every user is the default one.
async fn create_user() -> JsonBody<Json> {
    JsonBody(json!("default"))
}

fn settings_path(app: &AppState) -> PathBuf {
    app.config.user_dir.join("comfy.settings.json")
}

async fn read_settings(app: &AppState) -> Map<String, Json> {
    let path = settings_path(app);
    let fits = tokio::fs::metadata(&path)
        .await
        .is_ok_and(|m| m.len() <= MAX_SETTINGS_BYTES);
    if !fits {
        return Map::new();
    }
    match tokio::fs::read(&path)
        .await
        .map(|b| serde_json::from_slice(&b))
    {
        Ok(Ok(Json::Object(map))) => map,
        _ => Map::new(),
    }
}

async fn write_settings(app: &AppState, settings: Map<String, Json>) -> Result<(), ComfyError> {
    let path = settings_path(app);
    let bytes = serde_json::to_vec_pretty(&Json::Object(settings))
        .map_err(|e| ComfyError::BadRequest(e.to_string()))?;
    write_file(&path, &bytes).await
}

async fn write_file(path: &FsPath, bytes: &[u8]) -> Result<(), ComfyError> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let tmp = path.with_extension("tmp-write");
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, path).await?;
    Ok(())
}

async fn settings(State(app): State<Arc<AppState>>) -> JsonBody<Json> {
    JsonBody(Json::Object(read_settings(&app).await))
}

async fn setting(State(app): State<Arc<AppState>>, Path(id): Path<String>) -> JsonBody<Json> {
    JsonBody(read_settings(&app).await.remove(&id).unwrap_or(Json::Null))
}

async fn post_settings(
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<StatusCode, ComfyError> {
    let Ok(Json::Object(new)) = serde_json::from_slice::<Json>(&body) else {
        return Err(ComfyError::BadRequest(
            "settings must be a JSON object".into(),
        ));
    };
    let mut settings = read_settings(&app).await;
    settings.extend(new);
    write_settings(&app, settings).await?;
    Ok(StatusCode::OK)
}

async fn post_setting(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ComfyError> {
    let value: Json = serde_json::from_slice(&body)
        .map_err(|e| ComfyError::BadRequest(format!("not JSON: {e}")))?;
    let mut settings = read_settings(&app).await;
    settings.insert(id, value);
    write_settings(&app, settings).await?;
    Ok(StatusCode::OK)
}

/// A user data path (`workflows/a.json`) inside the user dir, or 400.
fn user_path(app: &AppState, rel: &str) -> Result<PathBuf, ComfyError> {
    let bad = rel.is_empty()
        || rel.contains('\0')
        || rel.contains('\\')
        || rel.starts_with('/')
        || rel.split('/').any(|p| p == "..");
    if bad {
        return Err(ComfyError::BadRequest(format!(
            "bad user data path {rel:?}"
        )));
    }
    Ok(app.config.user_dir.join(rel))
}

/// Files under `dir`, relative, `/`-separated, sorted; at most [`MAX_LISTING`].
fn listing(dir: &FsPath, recurse: bool) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() {
                if recurse {
                    pending.push(path);
                }
            } else if kind.is_file()
                && let Ok(rel) = path.strip_prefix(dir)
                && found.len() < MAX_LISTING
            {
                found.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    found.sort();
    found
}

async fn list_userdata(
    State(app): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<JsonBody<Json>, ComfyError> {
    let dir = user_path(&app, query.get("dir").map_or("", String::as_str))?;
    if !dir.is_dir() {
        return Err(ComfyError::NotFound);
    }
    let recurse = query.get("recurse").is_some_and(|v| v == "true");
    let split = query.get("split").is_some_and(|v| v == "true");
    let files = tokio::task::spawn_blocking(move || listing(&dir, recurse))
        .await
        .map_err(|e| ComfyError::Io(std::io::Error::other(e)))?;
    if split {
        let rows: Vec<Json> = files
            .into_iter()
            .map(|f| {
                let mut parts: Vec<Json> = vec![json!(f)];
                parts.extend(f.split('/').map(|p| json!(p)));
                Json::Array(parts)
            })
            .collect();
        return Ok(JsonBody(Json::Array(rows)));
    }
    Ok(JsonBody(json!(files)))
}

async fn get_userdata(
    State(app): State<Arc<AppState>>,
    Path(file): Path<String>,
) -> Result<Response, ComfyError> {
    let path = user_path(&app, &file)?;
    if !path.is_file() {
        return Err(ComfyError::NotFound);
    }
    Ok(file_response(&path, None).await)
}

async fn post_userdata(
    State(app): State<Arc<AppState>>,
    Path(file): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ComfyError> {
    let path = user_path(&app, &file)?;
    let overwrite = query.get("overwrite").is_none_or(|v| v != "false");
    if !overwrite && path.exists() {
        return Err(ComfyError::Conflict("file exists".into()));
    }
    write_file(&path, &body).await?;
    let full_info = query.get("full_info").is_some_and(|v| v == "true");
    if full_info {
        let meta = tokio::fs::metadata(&path).await?;
        let modified = meta
            .modified()
            .ok()
            .map_or(0.0, |m| super::events::unix_ms(m) as f64 / 1000.0);
        return Ok(
            JsonBody(json!({"path": file, "size": meta.len(), "modified": modified}))
                .into_response(),
        );
    }
    Ok(JsonBody(json!(file)).into_response())
}

async fn delete_userdata(
    State(app): State<Arc<AppState>>,
    Path(file): Path<String>,
) -> Result<StatusCode, ComfyError> {
    let path = user_path(&app, &file)?;
    if !path.is_file() {
        return Err(ComfyError::NotFound);
    }
    tokio::fs::remove_file(&path).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn move_userdata(
    State(app): State<Arc<AppState>>,
    Path((file, dest)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<JsonBody<Json>, ComfyError> {
    let from = user_path(&app, &file)?;
    let to = user_path(&app, &dest)?;
    if !from.is_file() {
        return Err(ComfyError::NotFound);
    }
    let overwrite = query.get("overwrite").is_none_or(|v| v != "false");
    if !overwrite && to.exists() {
        return Err(ComfyError::Conflict("destination exists".into()));
    }
    if let Some(parent) = to.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    tokio::fs::rename(&from, &to).await?;
    Ok(JsonBody(json!(dest)))
}

/// A static file of the frontend (`index.html` for `/`), confined to its folder.
pub(super) async fn frontend_file(State(app): State<Arc<AppState>>, uri: Uri) -> Response {
    let Some(root) = app.config.frontend.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let rel = uri.path().trim_start_matches('/');
    let rel = if rel.is_empty() { "index.html" } else { rel };
    let decoded = percent_decode(rel);
    let Some(rel) = decoded
        .as_deref()
        .filter(|r| !r.contains('\\') && !r.contains('\0'))
    else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    // The one symlink-safe resolver the nodes use: no `..`, no link out of the folder.
    let Ok(path) = sakuga_nodes::files::resolve_inside(&root, rel) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if !path.is_file() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let mut response = file_response(&path, None).await;
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-cache"),
    );
    response
}

/// `%XX` decoding of a URL path; `None` when it is not valid UTF-8 afterwards.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?, 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_keeps_plain_text_and_decodes_escapes() {
        assert_eq!(percent_decode("a%20b.js").as_deref(), Some("a b.js"));
        assert_eq!(percent_decode("%2e%2e/x").as_deref(), Some("../x"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
    }
}
