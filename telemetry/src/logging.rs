//! Log and trace output: human text or JSON lines on stderr, optional OTLP span export.
//!
//! [`init_logging`] installs the process-wide subscriber once at start-up and returns a
//! guard that flushes exported spans on drop. [`subscriber`] builds the same stack over any
//! writer without installing it, which is how tests capture JSON lines in a buffer.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::error::{Result, TelemetryError};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, event fields at the top level.
    Json,
}

/// Logging configuration (`--log-format`, `--log-filter`, `--otlp-endpoint`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `sakuga=debug,tower=warn`.
    pub filter: String,
    /// OTLP/gRPC collector endpoint, e.g. `http://127.0.0.1:4317`; `None` exports nothing.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans.
    pub service_name: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info".to_owned(),
            otlp_endpoint: None,
            service_name: "sakuga".to_owned(),
        }
    }
}

/// Keeps the OTLP pipeline alive; dropping it flushes and shuts down span export.
#[derive(Debug, Default)]
pub struct LoggingGuard {
    provider: Option<SdkTracerProvider>,
    /// The runtime the gRPC exporter runs on when the caller had none.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for LoggingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Shutdown flushes pending spans; a collector that went away is not our failure.
            if let Err(error) = provider.shutdown() {
                eprintln!("sakuga: otlp span export did not shut down cleanly: {error}");
            }
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

fn fmt_layer<W>(format: LogFormat, writer: W) -> BoxedLayer
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_target(false)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
    }
}

fn env_filter(directive: &str) -> Result<EnvFilter> {
    EnvFilter::try_new(directive).map_err(|e| TelemetryError::Logging {
        reason: format!("bad log filter {directive:?}: {e}"),
    })
}

/// The subscriber stack over `writer`, without OTLP and without installing it.
///
/// Use with `tracing::subscriber::with_default` to capture log lines in tests.
///
/// # Errors
/// [`TelemetryError::Logging`] when `config.filter` is not a valid directive.
pub fn subscriber<W>(config: &LogConfig, writer: W) -> Result<impl Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    Ok(Registry::default()
        .with(fmt_layer(config.format, writer))
        .with(env_filter(&config.filter)?))
}

/// Installs the global subscriber: text or JSON on stderr, plus OTLP export when
/// `config.otlp_endpoint` is set. Call once, at start-up; keep the guard until exit.
///
/// # Errors
/// [`TelemetryError::Logging`] when a subscriber is already installed or the filter is
/// invalid, [`TelemetryError::Otlp`] when the exporter cannot be built.
pub fn init_logging(config: &LogConfig) -> Result<LoggingGuard> {
    let mut guard = LoggingGuard::default();
    let mut layers: Vec<BoxedLayer> = vec![fmt_layer(config.format, std::io::stderr)];
    if let Some(endpoint) = &config.otlp_endpoint {
        let (provider, runtime) = otlp_provider(endpoint, &config.service_name)?;
        let tracer = provider.tracer("sakuga");
        layers.push(tracing_opentelemetry::layer().with_tracer(tracer).boxed());
        guard.provider = Some(provider);
        guard.runtime = runtime;
    }
    let subscriber = Registry::default()
        .with(layers)
        .with(env_filter(&config.filter)?);
    tracing::subscriber::set_global_default(subscriber).map_err(|e| TelemetryError::Logging {
        reason: e.to_string(),
    })?;
    Ok(guard)
}

/// Builds the OTLP/gRPC batch pipeline. tonic needs a tokio runtime: the caller's when
/// there is one, else a one-worker runtime owned by the guard.
fn otlp_provider(
    endpoint: &str,
    service_name: &str,
) -> Result<(SdkTracerProvider, Option<tokio::runtime::Runtime>)> {
    let otlp_err = |reason: String| TelemetryError::Otlp {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let own_runtime = match tokio::runtime::Handle::try_current() {
        Ok(_) => None,
        Err(_) => Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("sakuga-otlp")
                .enable_all()
                .build()
                .map_err(|e| otlp_err(e.to_string()))?,
        ),
    };
    let _entered = own_runtime.as_ref().map(|rt| rt.enter());
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| otlp_err(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    drop(_entered);
    Ok((provider, own_runtime))
}

/// Makes `span` a child of the W3C trace `trace_id` (32 hex) / `parent_span_id` (16 hex),
/// so exported spans join the client's trace. Ignored when the ids do not parse or no OTLP
/// layer is installed.
pub(crate) fn join_trace(span: &tracing::Span, trace_id: &str, parent_span_id: &str) {
    let (Ok(trace_id), Ok(span_id)) = (
        TraceId::from_hex(trace_id),
        SpanId::from_hex(parent_span_id),
    ) else {
        return;
    };
    let parent = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let context = opentelemetry::Context::new().with_remote_span_context(parent);
    // Fails only when the span is disabled or already started; both mean "nothing to join".
    let _ = span.set_parent(context);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_pipeline_builds_and_shuts_down_without_a_runtime() {
        // Nothing listens there: the gRPC channel connects lazily, so building succeeds and
        // shutting down with no spans queued returns at once.
        let (provider, runtime) = otlp_provider("http://127.0.0.1:1", "sakuga-test").unwrap();
        assert!(
            runtime.is_some(),
            "a runtime is made when the caller has none"
        );
        let guard = LoggingGuard {
            provider: Some(provider),
            runtime,
        };
        drop(guard);
    }

    #[test]
    fn job_spans_join_the_w3c_trace() {
        let provider = SdkTracerProvider::builder().build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = Registry::default().with(layer);
        let trace = crate::events::TraceContext::from_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .unwrap();
        let fields = crate::events::EventFields::new("job-9", crate::Workload::Batch, &trace);
        tracing::subscriber::with_default(subscriber, || {
            let span = crate::events::job_span(&fields);
            let context = span.context();
            let otel_span = context.span();
            let trace_id = otel_span.span_context().trace_id();
            assert_eq!(trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        });
    }
}
