//! The Prometheus exporter: one recorder per process, per-metric buckets, `/metrics` served
//! for `sakuga serve` or rendered to a string or file for `sakuga run --metrics-out`.
//!
//! `metrics` allows one global recorder per process, so [`install`] keeps its handle in a
//! `OnceLock`: the first call installs (and starts the listener, if asked), later calls get
//! the same handle back. That also lets every test in one test binary share it.
//!
//! Two series are not kept in the `metrics` registry: `sakuga_build_info` and
//! `sakuga_config_generation`. Their labels carry the config hash, and a registry never
//! forgets a label set, so after a reload the old hash would stay exported beside the new
//! one. They are rendered here from the one identity in force ([`set_identity`]).
//!
//! The `/metrics` listener is our own small HTTP/1.1 server rather than the exporter's:
//! it bounds what a client can hold (a connection cap, a deadline on reading the request
//! head and on writing the reply, a cap on the head's size), so half-sent requests or a
//! flood of idle connections cannot pin it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::catalogue::{self, BUILD_INFO, CONFIG_GENERATION, METRICS};
use crate::error::{Result, TelemetryError};

/// Default `/metrics` address (DESIGN.md section 10, `--metrics-listen`).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// How often histogram storage is compacted when no scrape does it.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Connections served at once; more are closed on accept. Prometheus holds one per
/// scraper, so this leaves room for a fleet of scrapers and curl.
const MAX_CONNECTIONS: usize = 64;
/// A client has this long to send its request head (the scrape timeout of a patient
/// Prometheus is 10 s; a request line and a few headers take microseconds).
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The reply must be taken within this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Larger request heads are refused: a scrape sends a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Where metrics go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrometheusConfig {
    /// Serve `/metrics` on this address (port 0 picks one; see
    /// [`MetricsHandle::listen_addr`]); `None` keeps metrics in-process only (render them
    /// with [`MetricsHandle::render`]).
    pub listen: Option<SocketAddr>,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        PrometheusConfig {
            listen: Some(
                DEFAULT_METRICS_LISTEN
                    .parse()
                    .expect("the default metrics address parses"),
            ),
        }
    }
}

impl PrometheusConfig {
    /// No listener: for `sakuga run` and tests.
    pub fn in_process() -> Self {
        PrometheusConfig { listen: None }
    }
}

/// The build and configuration in force: one `sakuga_build_info` and one
/// `sakuga_config_generation` series.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    version: String,
    config_hash: String,
    generation: u64,
}

static IDENTITY: Mutex<Option<Identity>> = Mutex::new(None);

/// Replaces the build and config identity the exposition reports. Until the first call
/// neither series is rendered, so no placeholder can ever read as a config change.
pub fn set_identity(version: &str, config_hash: &str, generation: u64) {
    *IDENTITY.lock() = Some(Identity {
        version: version.to_owned(),
        config_hash: config_hash.to_owned(),
        generation,
    });
}

/// The identity series in the text format, `# HELP`/`# TYPE` included.
fn render_identity(out: &mut String) {
    let Some(identity) = IDENTITY.lock().clone() else {
        return;
    };
    let labels = format!(
        "version=\"{}\",config_hash=\"{}\"",
        escape_label(&identity.version),
        escape_label(&identity.config_hash)
    );
    for (name, value) in [(BUILD_INFO, 1), (CONFIG_GENERATION, identity.generation)] {
        let help = catalogue::metric(name).map_or("", |def| def.help);
        // Infallible: writing to a String.
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {value}\n\n"
        );
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Handle to the installed recorder: renders the current exposition.
#[derive(Debug, Clone)]
pub struct MetricsHandle {
    inner: PrometheusHandle,
    listen: Option<SocketAddr>,
}

impl MetricsHandle {
    /// The Prometheus text exposition of every series recorded so far.
    pub fn render(&self) -> String {
        let mut text = self.inner.render();
        render_identity(&mut text);
        text
    }

    /// Writes the exposition to `path` (temp file + rename, so readers never see half).
    ///
    /// # Errors
    /// [`TelemetryError::Io`] when the file cannot be written.
    pub fn write_to(&self, path: &Path) -> Result<()> {
        let text = self.render();
        let tmp = path.with_extension("prom.tmp");
        let io_err = |source| TelemetryError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::write(&tmp, text).map_err(io_err)?;
        std::fs::rename(&tmp, path).map_err(io_err)
    }

    /// The address `/metrics` is served on, if any (the bound one when asked for port 0).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen
    }
}

static INSTALLED: OnceLock<MetricsHandle> = OnceLock::new();

/// A builder with every histogram's buckets set from the catalogue.
fn builder() -> Result<PrometheusBuilder> {
    let mut builder = PrometheusBuilder::new();
    for def in METRICS {
        if let Some(edges) = def.buckets() {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(def.name.to_owned()), edges)
                .map_err(|e| TelemetryError::Prometheus {
                    listen: None,
                    reason: e.to_string(),
                })?;
        }
    }
    Ok(builder)
}

/// Builds a recorder that is *not* installed globally, with the catalogue's buckets.
///
/// For tests and benches that want `metrics::with_local_recorder`.
pub fn local_recorder() -> Result<metrics_exporter_prometheus::PrometheusRecorder> {
    Ok(builder()?.build_recorder())
}

/// Installs the global Prometheus recorder once per process and describes every metric.
///
/// With `config.listen` set, `/metrics` is served there on a thread of its own. A second
/// call returns the first handle and ignores its own config.
///
/// # Errors
/// [`TelemetryError::Prometheus`] when the listener cannot bind, [`TelemetryError::RecorderTaken`]
/// when another global recorder is already installed.
pub fn install(config: &PrometheusConfig) -> Result<MetricsHandle> {
    if let Some(handle) = INSTALLED.get() {
        return Ok(handle.clone());
    }
    // Serialise installers so racing callers (parallel tests) all get the one recorder.
    static INSTALLING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
    let _installing = INSTALLING.lock();
    if let Some(handle) = INSTALLED.get() {
        return Ok(handle.clone());
    }
    let mut handle = install_in_process()?;
    catalogue::describe_all();
    if let Some(addr) = config.listen {
        handle.listen = Some(serve_metrics(&handle, addr)?);
    }
    Ok(INSTALLED.get_or_init(|| handle).clone())
}

fn install_in_process() -> Result<MetricsHandle> {
    let recorder = builder()?.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| TelemetryError::RecorderTaken)?;
    let upkeep = handle.clone();
    // Histogram samples accumulate until rendered; a long `sakuga run` compacts them here.
    std::thread::Builder::new()
        .name("sakuga-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        })
        .map_err(|e| TelemetryError::Prometheus {
            listen: None,
            reason: e.to_string(),
        })?;
    Ok(MetricsHandle {
        inner: handle,
        listen: None,
    })
}

/// Binds `addr` now (so a taken port fails the start) and serves `/metrics` from a thread
/// with its own small runtime, apart from the gRPC runtime: a scrape still answers while
/// the server is saturated. Returns the bound address.
///
/// Call it once the series are primed and the identity is set, so the first scrape sees
/// the whole catalogue.
///
/// # Errors
/// [`TelemetryError::Prometheus`] when `addr` cannot be bound or the thread not started.
pub fn serve_metrics(handle: &MetricsHandle, addr: SocketAddr) -> Result<SocketAddr> {
    let handle = handle.clone();
    let prom_err = |reason: String| TelemetryError::Prometheus {
        listen: Some(addr),
        reason,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(|e| prom_err(e.to_string()))?;
    let bound = listener.local_addr().map_err(|e| prom_err(e.to_string()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| prom_err(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| prom_err(e.to_string()))?;
    std::thread::Builder::new()
        .name("sakuga-metrics-http".into())
        .spawn(move || runtime.block_on(metrics_accept_task(listener, handle)))
        .map_err(|e| prom_err(e.to_string()))?;
    Ok(bound)
}

async fn metrics_accept_task(listener: std::net::TcpListener, handle: MetricsHandle) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "metrics listener could not start");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning on the error.
                tracing::warn!(%error, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the cap the connection is closed at once (dropped): no client can queue up
        // work here by holding sockets open.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = serve_metrics_connection(stream, &handle).await;
        });
    }
}

/// One request per connection (`Connection: close`): Prometheus reconnects per scrape at
/// no measurable cost, and nothing idles here between scrapes.
async fn serve_metrics_connection(
    mut stream: tokio::net::TcpStream,
    handle: &MetricsHandle,
) -> std::io::Result<()> {
    let head =
        match tokio::time::timeout(REQUEST_HEAD_TIMEOUT, read_request_head(&mut stream)).await {
            Ok(Ok(Some(head))) => head,
            // Timed out, oversized, or closed early: drop the connection without a reply.
            _ => return Ok(()),
        };
    let (status, content_type, body) = respond(&head, handle);
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(reply.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .unwrap_or(Ok(()))
}

/// Reads up to the blank line ending the request head; `None` when the client closed
/// first or the head outgrew [`MAX_REQUEST_HEAD`].
async fn read_request_head(stream: &mut tokio::net::TcpStream) -> std::io::Result<Option<String>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(String::from_utf8_lossy(&head).into_owned()));
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
    }
}

fn respond(head: &str, handle: &MetricsHandle) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        ),
        ("GET", "/") => ("200 OK", TEXT, "sakuga metrics: GET /metrics\n".into()),
        ("GET", _) => ("404 Not Found", TEXT, "not found; try /metrics\n".into()),
        _ => (
            "405 Method Not Allowed",
            TEXT,
            "only GET /metrics is served\n".into(),
        ),
    }
}
