//! `/view`, `/upload/image`, `/upload/mask`, `/models[/{folder}]` and `/embeddings`.
//!
//! Every path a client names resolves inside the output, input or temp dir: names with
//! `..` or a leading `/` are refused, and the resolved file (symlinks followed) must still
//! lie under the canonical root, so a symlink cannot lead out either.

use std::collections::HashMap;
use std::path::{Component, Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json as JsonBody, Router};
use serde_json::{Value as Json, json};

use sakuga_nodes::ComboOptions;
use sakuga_nodes::files::list_options;

use super::{AppState, ComfyError};

/// Model folders of ComfyUI's layout that `/models` lists.
pub const MODEL_FOLDERS: &[&str] = &[
    "checkpoints",
    "vae",
    "loras",
    "upscale_models",
    "frame_interpolation",
    "controlnet",
    "diffusion_models",
    "text_encoders",
    "embeddings",
];

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/view", get(view))
        .route("/upload/image", post(upload_image))
        .route("/upload/mask", post(upload_mask))
        .route("/models", get(|| async { JsonBody(json!(MODEL_FOLDERS)) }))
        .route("/models/{folder}", get(models_in))
        .route("/embeddings", get(embeddings))
}

/// The folder of a ComfyUI file `type`.
fn dir_of(app: &AppState, kind: &str) -> Result<PathBuf, ComfyError> {
    let env = app.engine()?.env();
    match kind {
        "output" => Ok(env.output_dir.clone()),
        "input" => Ok(env.input_dir.clone()),
        "temp" => Ok(env.temp_dir.clone()),
        _ => Err(ComfyError::BadRequest(format!("unknown type {kind:?}"))),
    }
}

/// `name [output]` style names carry their type, as in ComfyUI.
fn annotated(filename: &str) -> (&str, Option<&str>) {
    for kind in ["output", "input", "temp"] {
        if let Some(name) = filename.strip_suffix(&format!(" [{kind}]")) {
            return (name, Some(kind));
        }
    }
    (filename, None)
}

/// A relative path with no `..`, root or prefix component (and no NUL), or `None`.
fn clean_relative(path: &str) -> Option<PathBuf> {
    if path.contains('\0') || path.contains('\\') {
        return None;
    }
    let mut out = PathBuf::new();
    for c in FsPath::new(path).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// `sub/name` resolved inside `root` by the one symlink-safe resolver the nodes use.
fn inside(root: &FsPath, sub: &FsPath, name: &str) -> Result<PathBuf, sakuga_nodes::NodeError> {
    let relative = sub.join(name);
    let relative = relative.to_str().unwrap_or_default().trim_end_matches('/');
    sakuga_nodes::files::resolve_inside(root, relative)
}

/// `root/sub/name` if it exists and, symlinks resolved, is a file under `root`.
fn resolve_existing(root: &FsPath, sub: &FsPath, name: &str) -> Result<PathBuf, ComfyError> {
    let file =
        inside(root, sub, name).map_err(|_| ComfyError::Forbidden("outside the folder".into()))?;
    if !file.is_file() {
        return Err(ComfyError::NotFound);
    }
    Ok(file)
}

fn content_type(path: &FsPath) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "application/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "ttf" => "font/ttf",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

/// A file's bytes with its content type.
pub async fn file_response(path: &FsPath, disposition: Option<&str>) -> Response {
    match tokio::fs::read(path).await {
        Ok(bytes) => {
            let mut response = (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(content_type(path)),
                )],
                bytes,
            )
                .into_response();
            if let Some(name) = disposition
                && let Ok(v) = HeaderValue::from_str(&format!("filename=\"{name}\""))
            {
                response
                    .headers_mut()
                    .insert(header::CONTENT_DISPOSITION, v);
            }
            response
        }
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `GET /view?filename=&subfolder=&type=output|input|temp`.
async fn view(
    State(app): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ComfyError> {
    let Some(filename) = query.get("filename") else {
        return Err(ComfyError::NotFound);
    };
    let (name, annotated_kind) = annotated(filename);
    if name.is_empty()
        || name.starts_with('/')
        || name.contains("..")
        || name.contains('\0')
        || name.contains('\\')
    {
        return Err(ComfyError::BadRequest("bad filename".into()));
    }
    let kind = annotated_kind.unwrap_or_else(|| {
        query
            .get("type")
            .map(String::as_str)
            .filter(|t| !t.is_empty())
            .unwrap_or("output")
    });
    let root = dir_of(&app, kind)?;
    let sub = clean_relative(query.get("subfolder").map_or("", String::as_str))
        .ok_or_else(|| ComfyError::Forbidden("bad subfolder".into()))?;
    // Only the last path element of the name counts, as in ComfyUI.
    let base = FsPath::new(name)
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ComfyError::BadRequest("bad filename".into()))?
        .to_owned();
    let file = match resolve_existing(&root, &sub, &base) {
        Ok(file) => file,
        Err(ComfyError::NotFound) if kind == "output" && app.config.cluster.is_some() => {
            return cluster_output(&app, &sub, &base).await;
        }
        Err(e) => return Err(e),
    };
    Ok(file_response(&file, Some(&base)).await)
}

/// A cluster job's output from the object store: the subfolder's first folder is the job
/// id (see `crate::jobs::Jobs::Cluster`), the rest its folder inside the out dir.
async fn cluster_output(app: &AppState, sub: &FsPath, base: &str) -> Result<Response, ComfyError> {
    let gateway = app.config.cluster.as_ref().ok_or(ComfyError::NotFound)?;
    let mut parts = sub.iter().map(|p| p.to_string_lossy().into_owned());
    let job_id = parts.next().ok_or(ComfyError::NotFound)?;
    let name = parts
        .chain(std::iter::once(base.to_owned()))
        .collect::<Vec<_>>()
        .join("/");
    let (size, mut object) = gateway.output(&job_id, &name).await?;
    let mut bytes = Vec::with_capacity(size.min(1 << 30) as usize);
    tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes).await?;
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(content_type(FsPath::new(base))),
        )],
        bytes,
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("filename=\"{base}\"")) {
        response
            .headers_mut()
            .insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

/// The fields of an upload form.
#[derive(Debug, Default)]
struct UploadForm {
    image: Option<(String, Bytes)>,
    overwrite: bool,
    kind: String,
    subfolder: String,
    original_ref: Option<Json>,
}

async fn read_form(mut multipart: Multipart) -> Result<UploadForm, ComfyError> {
    let mut form = UploadForm {
        kind: "input".into(),
        ..UploadForm::default()
    };
    let bad = |e: axum::extract::multipart::MultipartError| ComfyError::BadRequest(e.body_text());
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "image" {
            let filename = field.file_name().unwrap_or_default().to_owned();
            form.image = Some((filename, field.bytes().await.map_err(bad)?));
            continue;
        }
        let text = field.text().await.map_err(bad)?;
        match name.as_str() {
            "overwrite" => form.overwrite = text == "true" || text == "1",
            "type" if !text.is_empty() => form.kind = text,
            "subfolder" => form.subfolder = text,
            "original_ref" => {
                form.original_ref = Some(serde_json::from_str(&text).map_err(|e| {
                    ComfyError::BadRequest(format!("original_ref is not JSON: {e}"))
                })?);
            }
            _ => {}
        }
    }
    Ok(form)
}

/// `name (1).ext`, `name (2).ext`...: ComfyUI's names for uploads that would clash.
fn numbered(name: &str, i: usize) -> String {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!("{stem} ({i}).{ext}"),
        _ => format!("{name} ({i})"),
    }
}

/// Where an upload goes: the folder (created) and a name that does not clash with a
/// different file unless `overwrite`; `None` as the name's second part when an identical
/// file is already there.
fn upload_target(
    dir: &FsPath,
    filename: &str,
    bytes: &[u8],
    overwrite: bool,
) -> Result<(String, bool), ComfyError> {
    if overwrite {
        return Ok((filename.to_owned(), false));
    }
    let mut name = filename.to_owned();
    let mut i = 1;
    loop {
        let path = dir.join(&name);
        match std::fs::read(&path) {
            Err(_) if !path.exists() => return Ok((name, false)),
            Ok(existing) if existing == bytes => return Ok((name, true)),
            _ => {}
        }
        name = numbered(filename, i);
        i += 1;
    }
}

/// The folder `root/subfolder`, created, checked to stay under `root` (symlinks too).
fn upload_dir(root: &FsPath, subfolder: &str) -> Result<PathBuf, ComfyError> {
    let sub =
        clean_relative(subfolder).ok_or_else(|| ComfyError::BadRequest("bad subfolder".into()))?;
    std::fs::create_dir_all(root)?;
    if sub.as_os_str().is_empty() {
        return Ok(root.to_path_buf());
    }
    let dir = inside(root, &sub, "")
        .map_err(|_| ComfyError::BadRequest("subfolder outside the folder".into()))?;
    std::fs::create_dir_all(&dir)?;
    // Created through the checked ancestor; checked again now that it exists.
    inside(root, &sub, "")
        .map_err(|_| ComfyError::BadRequest("subfolder outside the folder".into()))
}

/// Writes through a temp file and a rename, so a reader never sees half a file.
fn write_atomic(path: &FsPath, bytes: &[u8]) -> Result<(), ComfyError> {
    let tmp = path.with_file_name(format!(
        ".{}.upload",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn check_upload_name(filename: &str) -> Result<(), ComfyError> {
    let bad = filename.is_empty()
        || filename == "."
        || filename == ".."
        || filename.contains(['/', '\\', '\0']);
    if bad {
        return Err(ComfyError::BadRequest(format!(
            "bad file name {filename:?}"
        )));
    }
    Ok(())
}

/// A rewrite of uploaded bytes before they are stored.
type Transform = Box<dyn FnOnce(&[u8]) -> Result<Vec<u8>, ComfyError> + Send>;

/// Stores an upload; `transform` may rewrite the bytes (the mask's alpha merge).
async fn store_upload(
    app: &AppState,
    form: UploadForm,
    transform: Option<Transform>,
) -> Result<JsonBody<Json>, ComfyError> {
    let Some((filename, bytes)) = form.image else {
        return Err(ComfyError::BadRequest("no image in the form".into()));
    };
    check_upload_name(&filename)?;
    let root = dir_of(app, &form.kind)?;
    let (subfolder, overwrite, kind) = (form.subfolder, form.overwrite, form.kind);
    let echo = subfolder.clone();
    let stored = tokio::task::spawn_blocking(move || -> Result<String, ComfyError> {
        let bytes = match transform {
            Some(f) => f(&bytes)?,
            None => bytes.to_vec(),
        };
        let dir = upload_dir(&root, &subfolder)?;
        let (name, duplicate) = upload_target(&dir, &filename, &bytes, overwrite)?;
        if !duplicate {
            write_atomic(&dir.join(&name), &bytes)?;
        }
        Ok(name)
    })
    .await
    .map_err(|e| ComfyError::Io(std::io::Error::other(e)))??;
    Ok(JsonBody(json!({
        "name": stored,
        "subfolder": echo,
        "type": kind,
    })))
}

async fn upload_image(
    State(app): State<Arc<AppState>>,
    multipart: Multipart,
) -> Result<JsonBody<Json>, ComfyError> {
    let form = read_form(multipart).await?;
    store_upload(&app, form, None).await
}

/// `POST /upload/mask`: the uploaded image's alpha channel put on the image that
/// `original_ref` names, saved as PNG under the upload's name.
async fn upload_mask(
    State(app): State<Arc<AppState>>,
    multipart: Multipart,
) -> Result<JsonBody<Json>, ComfyError> {
    let form = read_form(multipart).await?;
    let original = form
        .original_ref
        .clone()
        .ok_or_else(|| ComfyError::BadRequest("original_ref is required".into()))?;
    let name = original["filename"].as_str().unwrap_or_default();
    let (name, annotated_kind) = annotated(name);
    if name.is_empty() || name.starts_with('/') || name.contains("..") {
        return Err(ComfyError::BadRequest("bad original_ref filename".into()));
    }
    let kind = annotated_kind.unwrap_or_else(|| original["type"].as_str().unwrap_or("output"));
    let root = dir_of(&app, kind)?;
    let sub = clean_relative(original["subfolder"].as_str().unwrap_or_default())
        .ok_or_else(|| ComfyError::Forbidden("bad original_ref subfolder".into()))?;
    let original_path = resolve_existing(&root, &sub, name)?;
    let merge = Box::new(move |mask: &[u8]| merge_alpha(&original_path, mask));
    store_upload(&app, form, Some(merge)).await
}

/// The original image with the mask's alpha channel, as PNG.
fn merge_alpha(original: &FsPath, mask: &[u8]) -> Result<Vec<u8>, ComfyError> {
    let bad = |e: image::ImageError| ComfyError::BadRequest(format!("image: {e}"));
    let mut base = image::open(original).map_err(bad)?.to_rgba8();
    let mask = image::load_from_memory(mask).map_err(bad)?.to_rgba8();
    if mask.dimensions() != base.dimensions() {
        return Err(ComfyError::BadRequest(format!(
            "the mask is {:?}, the image {:?}",
            mask.dimensions(),
            base.dimensions()
        )));
    }
    for (pixel, m) in base.pixels_mut().zip(mask.pixels()) {
        pixel.0[3] = m.0[3];
    }
    let mut out = std::io::Cursor::new(Vec::new());
    base.write_to(&mut out, image::ImageFormat::Png)
        .map_err(bad)?;
    Ok(out.into_inner())
}

async fn models_in(
    State(app): State<Arc<AppState>>,
    Path(folder): Path<String>,
) -> Result<JsonBody<Json>, ComfyError> {
    let Some(folder) = MODEL_FOLDERS.iter().find(|f| **f == folder) else {
        return Err(ComfyError::NotFound);
    };
    let env = app.engine()?.env().clone();
    let files = list_options(&env, &ComboOptions::ModelFolder(folder));
    Ok(JsonBody(json!(files)))
}

async fn embeddings(State(app): State<Arc<AppState>>) -> Result<JsonBody<Json>, ComfyError> {
    let env = app.engine()?.env().clone();
    let names: Vec<String> = list_options(&env, &ComboOptions::ModelFolder("embeddings"))
        .into_iter()
        .map(|f| match f.rsplit_once('.') {
            Some((stem, _)) => stem.to_owned(),
            None => f,
        })
        .collect();
    Ok(JsonBody(json!(names)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_never_climb() {
        assert_eq!(clean_relative("a/./b"), Some(PathBuf::from("a/b")));
        assert_eq!(clean_relative(""), Some(PathBuf::new()));
        assert_eq!(clean_relative("../x"), None);
        assert_eq!(clean_relative("a/../../x"), None);
        assert_eq!(clean_relative("/etc"), None);
        assert_eq!(clean_relative("a\\..\\b"), None);
    }

    #[test]
    fn clashing_uploads_are_numbered_and_duplicates_reused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"one").unwrap();
        assert_eq!(
            upload_target(dir.path(), "a.png", b"one", false).unwrap(),
            ("a.png".into(), true)
        );
        assert_eq!(
            upload_target(dir.path(), "a.png", b"two", false).unwrap(),
            ("a (1).png".into(), false)
        );
        assert_eq!(
            upload_target(dir.path(), "a.png", b"two", true).unwrap(),
            ("a.png".into(), false)
        );
    }
}
