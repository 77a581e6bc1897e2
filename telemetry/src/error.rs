//! The one error type of `sakuga-telemetry`.
//!
//! Telemetry must never take a render down, so only set-up can fail: installing the
//! Prometheus recorder, starting the log pipeline or the OTLP exporter, reading an SLO or
//! diagnosis config, and loading a saved snapshot. Variants carry the address or path involved
//! so the message names it; `kind()` is the low-cardinality label for metrics.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can go wrong setting up or loading signals.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The Prometheus recorder or its HTTP listener could not be built.
    #[error("cannot start the prometheus exporter on {listen:?}: {reason}")]
    Prometheus {
        listen: Option<SocketAddr>,
        reason: String,
    },
    /// A global `metrics` recorder was installed by someone else before ours.
    #[error("another metrics recorder is already installed in this process")]
    RecorderTaken,
    /// The tracing subscriber could not be installed (one is already set).
    #[error("cannot install the log subscriber: {reason}")]
    Logging { reason: String },
    /// The OTLP span exporter could not be built for the endpoint.
    #[error("cannot export spans to {endpoint}: {reason}")]
    Otlp { endpoint: String, reason: String },
    /// Reading or writing a file (metrics exposition, snapshot, config) failed.
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A TOML config file did not parse into the expected struct.
    #[error("{path}: invalid config: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// A saved snapshot is not valid `SignalsSnapshot` JSON.
    #[error("{path}: invalid signals snapshot: {source}")]
    Snapshot {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A label value from outside (CLI flag, config) is not one we know.
    #[error("unknown {label} {value:?}")]
    UnknownLabel { label: &'static str, value: String },
    /// A frame handed to the quality checks does not match its declared shape.
    #[error("frame of {len} values does not match {height}x{width}x{channels}")]
    InvalidFrame {
        height: usize,
        width: usize,
        channels: usize,
        len: usize,
    },
    /// The device sampler thread could not be spawned.
    #[error("cannot spawn the device sampler thread for {device}: {source}")]
    SamplerThread {
        device: String,
        #[source]
        source: std::io::Error,
    },
}

impl TelemetryError {
    /// Low-cardinality label for `sakuga_errors_total{kind}` and status mapping.
    pub fn kind(&self) -> &'static str {
        match self {
            TelemetryError::UnknownLabel { .. }
            | TelemetryError::Config { .. }
            | TelemetryError::Snapshot { .. }
            | TelemetryError::InvalidFrame { .. } => "invalid_input",
            _ => "internal",
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = TelemetryError> = std::result::Result<T, E>;
