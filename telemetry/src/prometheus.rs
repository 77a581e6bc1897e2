//! The Prometheus exporter: one recorder per process, per-metric buckets, `/metrics` served
//! for `sakuga serve` or rendered to a string or file for `sakuga run --metrics-out`.
//!
//! `metrics` allows one global recorder per process, so [`install`] keeps its handle in a
//! `OnceLock`: the first call installs (and starts the listener, if asked), later calls get
//! the same handle back. That also lets every test in one test binary share it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};

use crate::catalogue::{self, METRICS};
use crate::error::{Result, TelemetryError};

/// Default `/metrics` address (DESIGN.md section 10, `--metrics-listen`).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// How often histogram storage is compacted when no scrape does it.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Where metrics go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrometheusConfig {
    /// Serve `/metrics` on this address; `None` keeps metrics in-process only (render them
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

/// Handle to the installed recorder: renders the current exposition.
#[derive(Debug, Clone)]
pub struct MetricsHandle {
    inner: PrometheusHandle,
    listen: Option<SocketAddr>,
}

impl MetricsHandle {
    /// The Prometheus text exposition of every series recorded so far.
    pub fn render(&self) -> String {
        self.inner.render()
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

    /// The address `/metrics` is served on, if any.
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
/// With `config.listen` set, `/metrics` is served there: on the current tokio runtime when
/// called inside one, else on a small runtime thread of its own. A second call returns the
/// first handle and ignores its own config.
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
    let handle = match config.listen {
        Some(addr) => install_with_listener(addr)?,
        None => install_in_process()?,
    };
    catalogue::describe_all();
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

fn install_with_listener(addr: SocketAddr) -> Result<MetricsHandle> {
    let prom_err = |reason: String| TelemetryError::Prometheus {
        listen: Some(addr),
        reason,
    };
    let builder = builder()?.with_http_listener(addr);
    let (recorder, handle) = match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            let _entered = runtime.enter();
            let (recorder, exporter) = builder.build().map_err(|e| prom_err(e.to_string()))?;
            let handle = recorder.handle();
            runtime.spawn(exporter);
            (recorder, handle)
        }
        Err(_) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| prom_err(e.to_string()))?;
            let (recorder, exporter) = {
                let _entered = runtime.enter();
                builder.build().map_err(|e| prom_err(e.to_string()))?
            };
            let handle = recorder.handle();
            std::thread::Builder::new()
                .name("sakuga-metrics-http".into())
                .spawn(move || {
                    if let Err(error) = runtime.block_on(exporter) {
                        tracing::error!(?error, "metrics listener stopped");
                    }
                })
                .map_err(|e| prom_err(e.to_string()))?;
            (recorder, handle)
        }
    };
    metrics::set_global_recorder(recorder).map_err(|_| TelemetryError::RecorderTaken)?;
    Ok(MetricsHandle {
        inner: handle,
        listen: Some(addr),
    })
}
