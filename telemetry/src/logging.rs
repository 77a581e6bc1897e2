//! Log and trace output: human text or JSON lines on stderr, optional OTLP span export.
//!
//! [`init_logging`] installs the process-wide subscriber once at start-up and returns a
//! guard that flushes exported spans on drop. [`subscriber`] builds the same stack over any
//! writer without installing it, which is how tests capture JSON lines in a buffer.

use std::cell::Cell;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
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
    // Each layer filters for itself: the log filter (default `warn`) decides what is
    // printed, while job and node spans (info) are exported whatever it says.
    let mut layers: Vec<BoxedLayer> = vec![
        fmt_layer(config.format, std::io::stderr)
            .with_filter(env_filter(&config.filter)?)
            .boxed(),
    ];
    if let Some(endpoint) = &config.otlp_endpoint {
        let (provider, runtime) = otlp_provider(endpoint, &config.service_name)?;
        let tracer = provider.tracer("sakuga");
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
                .boxed(),
        );
        guard.provider = Some(provider);
        guard.runtime = runtime;
    }
    let subscriber = Registry::default().with(layers);
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
        .with_id_generator(PlannedIdGenerator::default())
        .build();
    drop(_entered);
    Ok((provider, own_runtime))
}

thread_local! {
    /// Ids the next OTel span built on this thread takes (see [`start_with_ids`]).
    static PLANNED_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
    static PLANNED_SPAN_ID: Cell<Option<SpanId>> = const { Cell::new(None) };
}

/// Random ids, except where [`start_with_ids`] planned them: that is how a job span is
/// exported with the ids sakuga already gave it (and put in logs and `Watch` events).
#[derive(Debug, Default)]
pub(crate) struct PlannedIdGenerator {
    random: RandomIdGenerator,
}

impl IdGenerator for PlannedIdGenerator {
    fn new_trace_id(&self) -> TraceId {
        PLANNED_TRACE_ID
            .take()
            .unwrap_or_else(|| self.random.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        PLANNED_SPAN_ID
            .take()
            .unwrap_or_else(|| self.random.new_span_id())
    }
}

/// Starts `span`'s OTel span now with `trace`'s ids: its span id, its trace id, and the
/// client's span as parent when there is one. Without an OTLP layer nothing happens.
pub(crate) fn start_with_ids(span: &tracing::Span, trace: &crate::events::TraceContext) {
    let Ok(span_id) = SpanId::from_hex(&trace.span_id) else {
        return;
    };
    match &trace.parent_span_id {
        Some(parent) => join_trace(span, &trace.trace_id, parent),
        None => PLANNED_TRACE_ID.set(TraceId::from_hex(&trace.trace_id).ok()),
    }
    PLANNED_SPAN_ID.set(Some(span_id));
    // Building the OTel span (which `context()` does) is when the generator is asked.
    let _ = span.context();
    PLANNED_TRACE_ID.set(None);
    PLANNED_SPAN_ID.set(None);
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
    fn job_spans_are_exported_with_the_job_ids_under_the_client_span() {
        let provider = SdkTracerProvider::builder()
            .with_id_generator(PlannedIdGenerator::default())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = Registry::default().with(layer);
        let trace = crate::events::TraceContext::from_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .unwrap();
        let root = crate::events::TraceContext::new_root();
        tracing::subscriber::with_default(subscriber, || {
            let span = crate::events::open_job_span("job-9", crate::Workload::Batch, &trace);
            let context = span.context();
            let exported = context.span().span_context().clone();
            assert_eq!(
                exported.trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            assert_eq!(exported.span_id().to_string(), trace.span_id);

            let span = crate::events::open_job_span("job-10", crate::Workload::Batch, &root);
            let context = span.context();
            let exported = context.span().span_context().clone();
            assert_eq!(exported.trace_id().to_string(), root.trace_id);
            assert_eq!(exported.span_id().to_string(), root.span_id);

            // A span opened later on the same thread gets fresh ids, not the job's.
            let other = tracing::info_span!("other");
            let other_id = other.context().span().span_context().span_id().to_string();
            assert_ne!(other_id, root.span_id);
        });
    }
}
