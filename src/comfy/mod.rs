//! ComfyUI's HTTP and WebSocket API on the same engine as gRPC (DESIGN.md section 12), so
//! ComfyUI clients, scripts and the ComfyUI frontend drive sakuga unchanged. One queue,
//! one journal, one set of job ids: a ComfyUI `prompt_id` is the sakuga job id.
//!
//! Every route answers at `/` and under `/api/`, as ComfyUI does. Module map:
//! - [`prompt`]: `/prompt`, `/queue`, `/history`, `/interrupt`, `/free`, and the prompt
//!   records (number, prompt, extra data) ComfyUI's queue and history tuples show.
//! - [`events`]: a job's feed translated into ComfyUI's WebSocket messages.
//! - [`ws`]: `/ws?clientId=`, the hub of connected clients, the per-job relay.
//! - [`files`]: `/view`, `/upload/image|mask`, `/models`, `/embeddings`.
//! - [`jobs`]: the unified `/jobs` API the current frontend reads its queue from.
//! - [`info`]: `/object_info`, `/system_stats`, `/features`, `/extensions`, the user data
//!   and settings endpoints the frontend boots from, and the frontend's static files.
//!
//! Bounds: open connections are capped (a semaphore permit per connection), request
//! bodies by the server's message-size limit, WebSocket messages from clients to 64 KiB,
//! and each client's outgoing queue (preview frames are dropped when it is full; events
//! wait a bounded time). A client that disconnects mid-job loses nothing: the job runs on,
//! and its outputs stay in `/history` and `/view`.

pub mod events;
pub mod files;
pub mod info;
pub mod jobs;
pub mod prompt;
pub mod ws;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};
use tokio::net::TcpListener;

use sakuga_scheduler::{EngineHandle, SchedulerError};

use crate::jobs::Jobs;
use crate::server::conn::{BoundedConn, CappedListener};
use sakuga_telemetry::AdmissionReason;

/// Settings of the ComfyUI listener.
#[derive(Debug, Clone)]
pub struct ComfyConfig {
    /// Required `authorization: Bearer <token>` on every API route (static files stay open).
    pub auth_token: Option<String>,
    /// Largest request body (a prompt, an upload).
    pub max_body_bytes: usize,
    /// Open connections at most; more wait in the listen backlog.
    pub max_connections: usize,
    /// Where user data and settings live (`<data dir>/comfy/user/default`).
    pub user_dir: PathBuf,
    /// The ComfyUI frontend's static files, served at `/` when set.
    pub frontend: Option<PathBuf>,
    /// On a cluster gateway: jobs go to the cluster, outputs come from its object store.
    pub cluster: Option<crate::cluster::Gateway>,
}

impl Default for ComfyConfig {
    fn default() -> Self {
        Self {
            auth_token: None,
            max_body_bytes: 16 << 20,
            max_connections: 1024,
            user_dir: PathBuf::from(".sakuga/data/comfy/user/default"),
            frontend: None,
            cluster: None,
        }
    }
}

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    engine: Arc<OnceLock<EngineHandle>>,
    pub config: ComfyConfig,
    pub prompts: prompt::PromptStore,
    pub hub: ws::Hub,
    /// Wakes the status broadcaster (`ws::status_task`).
    pub status_due: tokio::sync::Notify,
    /// Flips to true when the server stops; WebSocket connections and relays end.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

impl AppState {
    /// The engine, or 503 with `Retry-After` while it starts.
    ///
    /// # Errors
    /// [`ComfyError::Starting`] before the engine is up.
    pub fn engine(&self) -> Result<&EngineHandle, ComfyError> {
        self.engine.get().ok_or(ComfyError::Starting)
    }

    /// Where this server's jobs go: the local engine, or on a gateway the cluster.
    ///
    /// # Errors
    /// [`ComfyError::Starting`] before the engine is up.
    pub fn jobs(&self) -> Result<Jobs, ComfyError> {
        let engine = self.engine()?;
        Ok(match &self.config.cluster {
            Some(gateway) => {
                Jobs::Cluster(Box::new(gateway.clone()), engine.env().output_dir.clone())
            }
            None => Jobs::Local(engine.clone()),
        })
    }
}

/// An API failure, answered with ComfyUI's status codes and body shapes.
#[derive(Debug, thiserror::Error)]
pub enum ComfyError {
    #[error(transparent)]
    Engine(#[from] SchedulerError),
    /// Cluster mode: NATS unreachable or a record unreadable.
    #[error(transparent)]
    Cluster(crate::cluster::ClusterError),
    #[error("the render engine is starting")]
    Starting,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl From<crate::cluster::ClusterError> for ComfyError {
    fn from(error: crate::cluster::ClusterError) -> Self {
        match error {
            crate::cluster::ClusterError::Scheduler(e) => ComfyError::Engine(e),
            crate::cluster::ClusterError::NoOutput { .. } => ComfyError::NotFound,
            other => ComfyError::Cluster(other),
        }
    }
}

/// ComfyUI's `{error: {type, message, details, extra_info}, node_errors}` body.
pub fn error_body(kind: &str, message: &str, details: &str) -> Json {
    json!({
        "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
        "node_errors": {},
    })
}

/// `Retry-After` in whole seconds, at least 1.
fn retry_after(after: Duration) -> HeaderValue {
    let secs = after.as_secs_f64().ceil().max(1.0) as u64;
    HeaderValue::from(secs)
}

impl IntoResponse for ComfyError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        match self {
            ComfyError::Engine(e) => engine_error_response(e),
            ComfyError::Starting => (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, HeaderValue::from(1u64))],
                axum::Json(error_body("server_starting", &message, "")),
            )
                .into_response(),
            ComfyError::Cluster(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, HeaderValue::from(1u64))],
                axum::Json(error_body("cluster_unavailable", &message, "")),
            )
                .into_response(),
            ComfyError::BadRequest(_) => (
                StatusCode::BAD_REQUEST,
                axum::Json(error_body("invalid_request", &message, "")),
            )
                .into_response(),
            ComfyError::Forbidden(_) => (StatusCode::FORBIDDEN, message).into_response(),
            ComfyError::NotFound => StatusCode::NOT_FOUND.into_response(),
            ComfyError::Conflict(_) => (StatusCode::CONFLICT, message).into_response(),
            ComfyError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
                message,
            )
                .into_response(),
            ComfyError::Io(e) => {
                tracing::warn!(error = %e, "comfy api i/o error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
            }
        }
    }
}

/// Engine errors as ComfyUI clients expect them: invalid prompts are 400 with the
/// validation report; admission refusals 429 (queue full) or 503, with `Retry-After`.
fn engine_error_response(error: SchedulerError) -> Response {
    let message = error.to_string();
    match error {
        SchedulerError::Invalid(report) => {
            (StatusCode::BAD_REQUEST, axum::Json(report.to_json())).into_response()
        }
        SchedulerError::Malformed { .. } | SchedulerError::InvalidArgument { .. } => (
            StatusCode::BAD_REQUEST,
            axum::Json(error_body("invalid_prompt", &message, "")),
        )
            .into_response(),
        SchedulerError::TooLarge { .. } => (
            StatusCode::PAYLOAD_TOO_LARGE,
            axum::Json(error_body("prompt_too_large", &message, "")),
        )
            .into_response(),
        SchedulerError::Denied {
            reason,
            retry_after: after,
            ..
        } => {
            let status = if reason == AdmissionReason::QueueFull {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (
                status,
                [(header::RETRY_AFTER, retry_after(after))],
                axum::Json(error_body(reason.as_str(), &message, "")),
            )
                .into_response()
        }
        SchedulerError::ShuttingDown => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, HeaderValue::from(5u64))],
            axum::Json(error_body("shutting_down", &message, "")),
        )
            .into_response(),
        SchedulerError::JobNotFound { .. } => StatusCode::NOT_FOUND.into_response(),
        other => {
            tracing::warn!(error = %other, "comfy api engine error");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(error_body("internal", &message, "")),
            )
                .into_response()
        }
    }
}

/// Bearer-token check on the API routes, in constant time.
async fn require_token(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(token) = &app.config.auth_token {
        let expected = format!("Bearer {}", token.trim());
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !crate::server::constant_time_eq(presented, expected.as_bytes()) {
            return ComfyError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// Whether `host` (a Host header or an Origin's authority) names this machine.
fn is_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Refuses a browser request from another site to a loopback server (a web page must not
/// queue prompts on the visitor's machine), as ComfyUI's origin check does.
fn cross_origin_to_loopback(headers: &HeaderMap) -> bool {
    let (Some(host), Some(origin)) = (
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
    ) else {
        return false;
    };
    let authority = origin.split("://").nth(1).unwrap_or(origin);
    is_loopback(host) && !authority.eq_ignore_ascii_case(host)
}

async fn same_origin(request: Request, next: Next) -> Response {
    if cross_origin_to_loopback(request.headers()) {
        return (StatusCode::FORBIDDEN, "cross-origin request refused").into_response();
    }
    next.run(request).await
}

/// The API routes, at `/` and under `/api/`, plus the frontend when configured.
pub fn router(app: Arc<AppState>) -> Router {
    let api = Router::new()
        .merge(prompt::routes())
        .merge(ws::routes())
        .merge(files::routes())
        .merge(info::routes())
        .merge(jobs::routes())
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            require_token,
        ));
    let mut router = Router::new().nest("/api", api.clone()).merge(api);
    if app.config.frontend.is_some() {
        router = router.fallback(info::frontend_file);
    }
    router
        .layer(axum::middleware::from_fn(same_origin))
        .layer(DefaultBodyLimit::max(app.config.max_body_bytes))
        .with_state(app)
}

/// Serves the ComfyUI API on `listener` until `shutdown` resolves. The engine is read from
/// `engine` once it is set (503 with `Retry-After` before that).
///
/// # Errors
/// When the listener fails.
pub async fn run(
    listener: TcpListener,
    engine: Arc<OnceLock<EngineHandle>>,
    config: ComfyConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let listener = CappedListener::new(listener, config.max_connections);
    let app = Arc::new(AppState {
        engine,
        config,
        prompts: prompt::PromptStore::default(),
        hub: ws::Hub::default(),
        status_due: tokio::sync::Notify::new(),
        closing,
    });
    tokio::spawn(ws::status_task(app.clone()));
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = closing_tx.send(true);
        })
        .await
}

/// Time from accept to a client's first 24 bytes (any HTTP request line is longer).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl axum::serve::Listener for CappedListener {
    type Io = BoundedConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (tcp, slot, addr) = self.accept_slotted().await;
        // WebSocket clients may stay silent for hours, so only the handshake is timed.
        (BoundedConn::new(tcp, slot, HANDSHAKE_TIMEOUT, None), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        CappedListener::local_addr(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised() {
        assert!(is_loopback("127.0.0.1:8188"));
        assert!(is_loopback("localhost:8188"));
        assert!(is_loopback("[::1]:8188"));
        assert!(!is_loopback("example.com:8188"));
    }

    #[test]
    fn a_foreign_origin_to_a_loopback_host_is_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8188"));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(cross_origin_to_loopback(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8188"),
        );
        assert!(!cross_origin_to_loopback(&headers));
    }
}
