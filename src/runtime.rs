//! Building what jobs run against from a config: the node environment (folders, candle
//! device, model store and cache as shared resources), the node registry, and the signals
//! every mode starts the same way ([`start_signals`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sakuga_models::cache::ModelCache;
use sakuga_models::store::ModelStore;
use sakuga_nodes::{NodeEnv, NodeRegistry};

use sakuga_scheduler::engine::{EngineTunables, config_hash};
use sakuga_telemetry::prometheus::{self, MetricsHandle, PrometheusConfig};
use sakuga_telemetry::{DeviceSampler, History, Signals};

use crate::config::SakugaConfig;

/// How often the device sampler reads memory and utilization; the signals ticker (planned
/// load holds, SLO gauges every 5 s) runs on the same thread.
const DEVICE_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// How long start-up waits for the first device sample before serving anyway.
const FIRST_SAMPLE_WAIT: Duration = Duration::from_secs(5);
/// The file in the data dir that carries the config generation across restarts.
const GENERATION_FILE: &str = "config_generation";

/// Why the runtime could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("device {spec:?}: {source}")]
    Device {
        spec: String,
        #[source]
        source: sakuga_models::ModelError,
    },
    #[error("signals: {0}")]
    Telemetry(#[from] sakuga_telemetry::TelemetryError),
    #[error("cannot keep the config generation in {path}: {source}")]
    Generation {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The signals of a running process: the Prometheus handle, the signals the engine records
/// to, and the device sampler thread (stops when this is dropped).
#[derive(Debug)]
pub struct SignalsRuntime {
    pub metrics: MetricsHandle,
    pub signals: Signals,
    /// The bound `/metrics` address, when one was asked for.
    pub metrics_addr: Option<SocketAddr>,
    _sampler: DeviceSampler,
}

/// Starts the signals the same way in every mode (`serve`, `run`), so that the first
/// scrape already sees every catalogue series: the recorder, every series primed at its
/// true zero, the build and config identity (a start counts as a config change; with a
/// `data_dir` the generation continues from the previous run, and the job history there
/// records every finished job and config change), a first device sample, the
/// SLO gauges, and then the `/metrics` listener when `metrics_listen` is given.
///
/// # Errors
/// A taken metrics address, an unusable device spec, or a data dir that cannot be written.
pub fn start_signals(
    config: &SakugaConfig,
    tunables: &EngineTunables,
    data_dir: Option<&Path>,
    metrics_listen: Option<SocketAddr>,
) -> Result<SignalsRuntime, RuntimeError> {
    let metrics = prometheus::install(&PrometheusConfig::in_process())?;
    sakuga_telemetry::record::prime_series(&config.device);
    sakuga_telemetry::record::prime_node_durations(
        registry().iter().map(|node| node.schema().class_type),
    );
    let signals = Signals::new(config.signals.clone());
    if let Some(dir) = data_dir {
        signals.resume_config_generation(read_generation(dir)?);
        if config.history.enabled {
            signals.attach_history(History::open(dir, &config.history)?);
        }
    }
    let hash = config_hash(tunables, &signals.config());
    let generation = signals.config_changed(env!("CARGO_PKG_VERSION"), &hash);
    if let Some(dir) = data_dir {
        write_generation(dir, generation)?;
    }
    let probe = sakuga_models::device::probe_for(&config.device).map_err(|source| {
        RuntimeError::Device {
            spec: config.device.clone(),
            source,
        }
    })?;
    let sampler = signals.spawn_device_sampler(probe, DEVICE_SAMPLE_INTERVAL)?;
    if sampler.wait_first(FIRST_SAMPLE_WAIT).is_none() {
        tracing::warn!(device = %config.device, "no device sample yet; serving without one");
    }
    signals.publish();
    let metrics_addr = metrics_listen
        .map(|addr| prometheus::serve_metrics(&metrics, addr))
        .transpose()?;
    Ok(SignalsRuntime {
        metrics,
        signals,
        metrics_addr,
        _sampler: sampler,
    })
}

/// The config generation the previous run of this data dir reached (0 for a new one).
fn read_generation(dir: &Path) -> Result<u64, RuntimeError> {
    let path = dir.join(GENERATION_FILE);
    match std::fs::read_to_string(&path) {
        // A damaged file restarts the count: the next change is still a change.
        Ok(text) => Ok(text.trim().parse().unwrap_or(0)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(RuntimeError::Generation { path, source }),
    }
}

/// Records the generation in force (temp file + rename).
///
/// # Errors
/// When the data dir cannot be written.
pub fn write_generation(dir: &Path, generation: u64) -> Result<(), RuntimeError> {
    let path = dir.join(GENERATION_FILE);
    let io = |source| RuntimeError::Generation {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!("{GENERATION_FILE}.tmp"));
    std::fs::write(&tmp, format!("{generation}\n")).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// Settles `config.device` on a device this build and machine can use. A GPU that cannot
/// be used (a CPU-only build, no driver, no such GPU, CUDA libraries missing) falls back to
/// the CPU with a warning that says why: the job still runs, and every metric label and the
/// hardware class then name the device that really renders. `sakuga selftest` does not
/// settle: a check asked to run on a GPU fails instead.
///
/// # Errors
/// A spec that is neither `cpu` nor a CUDA device.
pub fn settle_device(config: &mut SakugaConfig) -> Result<(), RuntimeError> {
    let (device, reason) =
        sakuga_models::device::settle_device(&config.device).map_err(|source| {
            RuntimeError::Device {
                spec: config.device.clone(),
                source,
            }
        })?;
    if let Some(reason) = reason {
        tracing::warn!(
            requested = %config.device,
            "GPU unavailable, rendering on the CPU: {reason}"
        );
    }
    config.device = device;
    Ok(())
}

/// The node environment for `config`, with the model store and cache registered as
/// resources for model nodes.
///
/// # Errors
/// When the configured device cannot be opened.
pub fn node_env(config: &SakugaConfig) -> Result<NodeEnv, RuntimeError> {
    let device = sakuga_models::diffusion::device_from_spec(&config.device).map_err(|source| {
        RuntimeError::Device {
            spec: config.device.clone(),
            source,
        }
    })?;
    let mut env = NodeEnv::new(
        config.input_dir.clone(),
        config.out.clone(),
        config.models_dir.clone(),
    );
    env.device = device;
    env.resources
        .insert(Arc::new(ModelStore::new(config.models_dir.clone())));
    env.resources.insert(Arc::new(ModelCache::new(
        config.model_cache_bytes,
        config.device.clone(),
    )));
    Ok(env)
}

/// Every built-in node class.
pub fn registry() -> NodeRegistry {
    NodeRegistry::with_builtins()
}
