//! The gRPC server: every service on one port (`RenderService`, `SignalService`,
//! `NodeService`, KEDA's `ExternalScaler`, `grpc.health.v1`, reflection v1 and v1alpha),
//! bearer-token auth on the sakuga and KEDA services (health and reflection stay open),
//! bounded message sizes, bounded connections ([`conn`]), and graceful shutdown: health goes NOT_SERVING, admission stops,
//! running work finishes (queued work stays journaled), then the port closes.
//!
//! [`run`] takes a bound listener and a shutdown future (as mini-redis does), so tests
//! start the real server on port 0.

pub mod conn;
pub mod convert;
pub mod ops;
pub mod render;
pub mod status;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};
use tonic_health::ServingStatus;

use sakuga_proto::externalscaler::external_scaler_server::ExternalScalerServer;
use sakuga_proto::v1::node_service_server::NodeServiceServer;
use sakuga_proto::v1::render_service_server::RenderServiceServer;
use sakuga_proto::v1::signal_service_server::SignalServiceServer;
use sakuga_scheduler::engine::Reloaded;
use sakuga_scheduler::{EngineHandle, SchedulerError};

/// Re-reads configuration and applies it to the engine (SIGHUP and the `Reload` RPC).
pub type ReloadFn = Arc<dyn Fn(&EngineHandle) -> anyhow::Result<Reloaded> + Send + Sync>;

/// Server settings.
#[derive(Clone)]
pub struct ServerConfig {
    /// Required `authorization: Bearer <token>` on the sakuga and KEDA services.
    pub auth_token: Option<String>,
    /// Largest request or response message.
    pub max_message_bytes: usize,
    /// KEDA metric name (overridable per ScaledObject with `metricName`).
    pub keda_metric_name: String,
    /// Demand one replica should carry (KEDA AverageValue; overridable with `targetSize`).
    pub keda_target: f64,
    /// Seconds of queued work one replica should carry, for replica advice.
    pub work_per_replica_s: f64,
    pub reload: Option<ReloadFn>,
    /// Serve TLS (rustls) with this identity; plaintext when `None`.
    pub tls: Option<TlsIdentity>,
    /// How long shutdown waits for running jobs before it journals them as interrupted
    /// (they run again after the next start) and exits; keep it under the orchestrator's
    /// grace period (120 s in deploy/kubernetes).
    pub drain_timeout: Duration,
    /// Caps and timeouts of client connections.
    pub connections: conn::ConnectionLimits,
    /// Whose jobs the render service answers for.
    pub role: Role,
}

/// What the server's render service fronts.
#[derive(Clone, Debug, Default)]
pub enum Role {
    /// The local engine (the embedded default).
    #[default]
    Embedded,
    /// A cluster gateway: every job in the cluster, through NATS.
    Gateway(crate::cluster::Gateway),
    /// A cluster worker only: no jobs are submitted here; health, signals and nodes serve.
    Worker(crate::cluster::Cluster),
}

impl Role {
    /// The cluster connection, in cluster mode.
    pub fn cluster(&self) -> Option<&crate::cluster::Cluster> {
        match self {
            Role::Embedded => None,
            Role::Gateway(g) => Some(g.cluster()),
            Role::Worker(c) => Some(c),
        }
    }
}

/// HTTP/2 flow-control window per stream: room for a few preview frames in flight.
pub const FRAME_WINDOW_BYTES: u32 = 4 << 20;

/// A PEM certificate chain and its private key.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("cert_bytes", &self.cert_pem.len())
            .finish_non_exhaustive()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            auth_token: None,
            max_message_bytes: 16 << 20,
            keda_metric_name: "sakuga_demand".into(),
            keda_target: 10.0,
            work_per_replica_s: 30.0,
            reload: None,
            tls: None,
            drain_timeout: Duration::from_secs(90),
            connections: conn::ConnectionLimits::default(),
            role: Role::Embedded,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("auth", &self.auth_token.is_some())
            .field("max_message_bytes", &self.max_message_bytes)
            .field("keda_metric_name", &self.keda_metric_name)
            .field("tls", &self.tls.is_some())
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("the engine did not start: {0}")]
    Engine(#[from] SchedulerError),
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection descriptors: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("engine start task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// How the server gets its engine: already running, or started once the port is open
/// (health says NOT_SERVING until then).
pub enum EngineStart {
    Ready(EngineHandle),
    Start(Box<dyn FnOnce() -> Result<EngineHandle, SchedulerError> + Send>),
}

impl std::fmt::Debug for EngineStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineStart::Ready(_) => "EngineStart::Ready",
            EngineStart::Start(_) => "EngineStart::Start",
        })
    }
}

/// What every service shares.
#[derive(Clone)]
pub(crate) struct Shared {
    engine: Arc<OnceLock<EngineHandle>>,
    pub config: Arc<ServerConfig>,
    /// Flips to true when shutdown begins; open Watch streams end.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("ready", &self.engine.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Demand for autoscaling: the local engine's, or on a gateway the cluster's work
    /// queue (its consumers' pending and ack-pending counts, weighted by cost).
    pub async fn demand(&self) -> Result<sakuga_scheduler::engine::Demand, Status> {
        match &self.config.role {
            Role::Gateway(gateway) => Ok(gateway.demand()),
            _ => self.engine()?.demand().await.map_err(status::status_of),
        }
    }

    /// The engine, or UNAVAILABLE while it starts.
    pub fn engine(&self) -> Result<&EngineHandle, Status> {
        self.engine
            .get()
            .ok_or_else(|| Status::unavailable("the render engine is starting"))
    }
}

/// Checks `authorization: Bearer <token>` in constant time.
#[derive(Clone)]
pub struct BearerAuth {
    token: Option<Arc<[u8]>>,
}

impl BearerAuth {
    /// Auth requiring `token`; `None` lets everything through.
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(|t| Arc::from(format!("Bearer {}", t.trim()).into_bytes())),
        }
    }
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("enabled", &self.token.is_some())
            .finish()
    }
}

/// Equality whose time depends only on the lengths, not on where the bytes differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if constant_time_eq(presented, expected) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("a valid bearer token is required"))
        }
    }
}

const SERVICE_NAMES: &[&str] = &[
    "sakuga.v1.RenderService",
    "sakuga.v1.SignalService",
    "sakuga.v1.NodeService",
    "externalscaler.ExternalScaler",
    "",
];

async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for name in SERVICE_NAMES {
        reporter.set_service_status(*name, status).await;
    }
}

/// Waits up to `timeout` for running work to finish; past it, journals that work as
/// interrupted (it runs again after the next start). Returns whether the drain finished.
async fn drain_within(engine: &EngineHandle, timeout: Duration) -> bool {
    tracing::info!(
        timeout_s = timeout.as_secs_f64(),
        "draining: no new jobs; running work finishes, queued work stays journaled"
    );
    if tokio::time::timeout(timeout, engine.drain()).await.is_ok() {
        return true;
    }
    let jobs = engine.interrupt().await;
    tracing::warn!(
        ?jobs,
        "drain timed out: running jobs journaled as interrupted; they run again after the next start"
    );
    false
}

/// Serves until `shutdown` resolves, then drains gracefully (for at most the configured
/// drain timeout) and stops the engine.
///
/// # Errors
/// When the engine cannot start or the transport fails.
pub async fn run(
    listener: TcpListener,
    engine: EngineStart,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let shared = Shared {
        engine: Arc::new(OnceLock::new()),
        config: Arc::new(config),
        closing: closing_rx,
    };
    let limit = shared.config.max_message_bytes;
    let auth = BearerAuth::new(shared.config.auth_token.as_deref());
    let render = RenderServiceServer::new(render::RenderApi {
        shared: shared.clone(),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let signals = SignalServiceServer::new(ops::SignalsApi {
        shared: shared.clone(),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let nodes = NodeServiceServer::new(ops::NodesApi {
        shared: shared.clone(),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let scaler = ExternalScalerServer::new(ops::ScalerApi {
        shared: shared.clone(),
    });

    let starter = start_engine(&shared, engine, reporter.clone());
    if let Some(cluster) = shared.config.role.cluster() {
        tokio::spawn(follow_nats(cluster.connected.clone(), reporter.clone()));
    }
    let drain_slot = shared.engine.clone();
    let drain_reporter = reporter.clone();
    let drain_timeout = shared.config.drain_timeout;
    let interrupted = Arc::new(AtomicBool::new(false));
    let interrupted_flag = interrupted.clone();
    let graceful = async move {
        shutdown.await;
        set_health(&drain_reporter, ServingStatus::NotServing).await;
        if let Some(engine) = drain_slot.get()
            && !drain_within(engine, drain_timeout).await
        {
            interrupted_flag.store(true, Ordering::Release);
        }
        let _ = closing_tx.send(true);
    };
    let limits = shared.config.connections;
    transport(&shared.config)?
        .add_service(health)
        .add_service(reflection_v1()?)
        .add_service(reflection_v1alpha()?)
        .add_service(InterceptedService::new(render, auth.clone()))
        .add_service(InterceptedService::new(signals, auth.clone()))
        .add_service(InterceptedService::new(nodes, auth.clone()))
        .add_service(InterceptedService::new(scaler, auth))
        .serve_with_incoming_shutdown(conn::bounded_incoming(listener, limits), graceful)
        .await?;
    if !starter.is_finished() {
        starter.abort();
    } else {
        starter.await??;
    }
    // After an interrupt the device worker may still be inside a node: do not wait for it.
    if let Some(engine) = shared.engine.get().cloned()
        && !interrupted.load(Ordering::Acquire)
    {
        tokio::task::spawn_blocking(move || engine.shutdown_blocking()).await?;
    }
    Ok(())
}

fn reflection_v1() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    ServerError,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sakuga_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?)
}

fn reflection_v1alpha() -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    ServerError,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sakuga_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?)
}

/// The HTTP/2 transport: keepalives, stream caps, windows sized for frames, TLS.
fn transport(config: &ServerConfig) -> Result<tonic::transport::Server, ServerError> {
    let limits = config.connections;
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .max_concurrent_streams(limits.max_concurrent_streams)
        // A preview frame is hundreds of KiB: with HTTP/2's default 64 KiB window each one
        // waits on the client's window updates, and that wait shows up as late frames.
        .initial_stream_window_size(Some(FRAME_WINDOW_BYTES))
        .initial_connection_window_size(Some(2 * FRAME_WINDOW_BYTES));
    if let Some(tls) = &config.tls {
        let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        builder =
            builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    Ok(builder)
}

/// Cluster mode: NOT_SERVING while NATS is unreachable, SERVING again once reconnected.
async fn follow_nats(
    mut connected: tokio::sync::watch::Receiver<bool>,
    reporter: tonic_health::server::HealthReporter,
) {
    loop {
        let up = *connected.borrow_and_update();
        let status = if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        set_health(&reporter, status).await;
        if connected.changed().await.is_err() {
            return;
        }
    }
}

/// Starts the engine (journal recovery, device worker handshake) while the port is already
/// open, so probes see NOT_SERVING rather than a refused connection; SERVING once it runs.
fn start_engine(
    shared: &Shared,
    engine: EngineStart,
    reporter: tonic_health::server::HealthReporter,
) -> tokio::task::JoinHandle<Result<(), ServerError>> {
    let slot = shared.engine.clone();
    // An engine that is already running serves the first request: no window in which a
    // client that connected at once is told it is starting.
    let engine = match engine {
        EngineStart::Ready(engine) => {
            let _ = slot.set(engine.clone());
            EngineStart::Ready(engine)
        }
        start => start,
    };
    tokio::spawn(async move {
        let engine = match engine {
            EngineStart::Ready(engine) => engine,
            EngineStart::Start(start) => tokio::task::spawn_blocking(start).await??,
        };
        let _ = slot.set(engine);
        set_health(&reporter, ServingStatus::Serving).await;
        Ok::<(), ServerError>(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"Bearer abc", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer abc", b"Bearer abd"));
        assert!(!constant_time_eq(b"Bearer ab", b"Bearer abc"));
        assert!(!constant_time_eq(b"", b"Bearer abc"));
    }
}
