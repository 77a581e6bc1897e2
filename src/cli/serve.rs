//! `sakuga serve`: the gRPC server with its metrics listener, journal in `--data-dir`,
//! graceful shutdown on SIGTERM/Ctrl-C (stop admitting, finish running work for up to
//! `--drain-timeout`, keep queued work journaled; a second signal exits at once) and
//! configuration reload on SIGHUP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use clap::Args;

use sakuga_scheduler::engine::{EngineTunables, Reloaded};
use sakuga_scheduler::{EngineConfig, EngineHandle};
use sakuga_telemetry::Workload;

use super::CommonArgs;
use crate::cluster::{Cluster, ClusterConfig, Gateway, WorkerConfig};
use crate::runtime;
use crate::server::{EngineStart, ReloadFn, Role, ServerConfig, run};

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// gRPC address (every service on one port).
    #[arg(long, env = "SAKUGA_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Prometheus /metrics address.
    #[arg(long, env = "SAKUGA_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,
    /// File holding the bearer token clients must send (health and metrics stay open).
    #[arg(long, env = "SAKUGA_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Engine tunables (queue caps, priorities, limits, feature flags) as TOML; re-read on
    /// SIGHUP and by the Reload RPC.
    #[arg(long, env = "SAKUGA_TUNABLES")]
    pub tunables: Option<PathBuf>,
    /// PEM certificate chain: serve TLS (with --tls-key).
    #[arg(long, env = "SAKUGA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "SAKUGA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Models to load into the model cache before serving (checkpoints, upscalers,
    /// interpolators; LoRA and VAE files are read through), under planned-heavy-load.
    #[arg(long, num_args = 1..)]
    pub warmup: Vec<String>,
    /// Seconds shutdown waits for running jobs; then they are journaled as interrupted
    /// (run again after the next start, not counted as an attempt) and the process exits.
    /// Keep it under the orchestrator's grace period (Kubernetes: 120 s as shipped).
    #[arg(
        long,
        env = "SAKUGA_DRAIN_TIMEOUT",
        default_value_t = 90.0,
        value_name = "SECONDS"
    )]
    pub drain_timeout: f64,
    /// ComfyUI HTTP + WebSocket API address (at `/` and `/api/`), or `off`.
    #[arg(long, env = "SAKUGA_COMFY_LISTEN", default_value = "127.0.0.1:8188")]
    pub comfy_listen: String,
    /// The ComfyUI frontend's static files (a folder with index.html) to serve at `/`;
    /// without it, the PyPI package `comfyui-frontend-package` is used when `python3`
    /// can import it.
    #[arg(long, env = "SAKUGA_FRONTEND")]
    pub frontend: Option<PathBuf>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Cluster mode (DESIGN.md section 11): without `--nats` nothing of this applies.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// NATS server(s) with JetStream (e.g. nats://127.0.0.1:4222): run as a cluster
    /// gateway (`serve`) or worker (`worker`); jobs, events and outputs live in JetStream.
    #[arg(long, env = "SAKUGA_NATS")]
    pub nats: Option<String>,
    /// NATS credentials file (JWT and nkey seed).
    #[arg(long, env = "SAKUGA_NATS_CREDS", requires = "nats")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate for NATS over TLS.
    #[arg(long, env = "SAKUGA_NATS_TLS_CA", requires = "nats")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Replicas of the cluster's streams and buckets (3 on a NATS cluster).
    #[arg(long, env = "SAKUGA_NATS_REPLICAS", default_value_t = 1)]
    pub nats_replicas: usize,
    /// Seconds a worker may stay silent on a job before it goes to another worker.
    #[arg(
        long,
        env = "SAKUGA_ACK_WAIT",
        default_value_t = 30.0,
        value_name = "SECONDS"
    )]
    pub ack_wait: f64,
    /// Deliveries of a job to workers that are lost before it fails as worker_lost.
    #[arg(long, env = "SAKUGA_MAX_DELIVER", default_value_t = 3)]
    pub max_deliver: u32,
    /// With --nats on `serve`: also pull and run jobs in this process.
    #[arg(long, requires = "nats")]
    pub worker: bool,
    /// This worker's name in heartbeats and job records (default: $HOSTNAME, else
    /// worker-<pid>).
    #[arg(long, env = "SAKUGA_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Jobs a worker holds besides the one running, so its device never waits on a pull.
    #[arg(long, env = "SAKUGA_WORKER_PREFETCH", default_value_t = 1)]
    pub prefetch: usize,
}

impl ClusterArgs {
    fn config(&self, tunables: &EngineTunables) -> anyhow::Result<Option<ClusterConfig>> {
        let Some(url) = &self.nats else {
            return Ok(None);
        };
        if self.max_deliver == 0 {
            anyhow::bail!("--max-deliver must be 1 or more");
        }
        let caps = &tunables.admission.queue_caps;
        Ok(Some(ClusterConfig {
            creds: self.nats_creds.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            replicas: self.nats_replicas.max(1),
            ack_wait: std::time::Duration::try_from_secs_f64(self.ack_wait)
                .ok()
                .filter(|d| d.as_millis() >= 100)
                .context("--ack-wait must be at least 0.1 seconds")?,
            max_deliver: self.max_deliver,
            queue_caps: [
                caps.get(Workload::Animation),
                caps.get(Workload::SingleImage),
                caps.get(Workload::Batch),
            ],
            ..ClusterConfig::new(url.clone())
        }))
    }

    fn worker_id(&self) -> String {
        self.worker_id
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| format!("worker-{}", std::process::id()))
    }
}

/// The ComfyUI address, `None` for `off`.
fn comfy_addr(text: &str) -> anyhow::Result<Option<SocketAddr>> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse().map(Some).with_context(|| {
        format!("--comfy-listen {text:?}: an address such as 127.0.0.1:8188, or off")
    })
}

/// The static folder of the `comfyui-frontend-package` that `python3` imports, if any.
fn installed_frontend() -> Option<PathBuf> {
    let script = "import os, comfyui_frontend_package as p; print(os.path.join(os.path.dirname(p.__file__), 'static'))";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (out.status.success() && dir.join("index.html").is_file()).then_some(dir)
}

pub(super) fn load_tunables(path: Option<&PathBuf>) -> anyhow::Result<EngineTunables> {
    match path {
        None => Ok(EngineTunables::default()),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
        }
    }
}

/// The bearer token in `path`. An empty (or blank) file is refused: serving with it would
/// accept an empty bearer token, which is no auth at all.
fn read_auth_token(path: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading the auth token file {}", path.display()))?
        .trim()
        .to_owned();
    if token.is_empty() {
        anyhow::bail!(
            "the auth token file {} is empty; put a token in it or drop --auth-token-file",
            path.display()
        );
    }
    Ok(token)
}

/// Raises the open-file limit to its hard limit and keeps the connection cap under it, with
/// room left for the journal, model files and /metrics, so the cap (not EMFILE) is what a
/// flood of connections meets.
fn connection_limits() -> crate::server::conn::ConnectionLimits {
    const RESERVED_FDS: u64 = 256;
    let mut limits = crate::server::conn::ConnectionLimits::default();
    #[cfg(unix)]
    match crate::server::conn::raise_fd_limit() {
        Ok(soft) => {
            let room = soft.saturating_sub(RESERVED_FDS).max(64);
            limits.max_connections = limits.max_connections.min(room as usize);
        }
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    limits
}

/// Runs the server until SIGTERM or Ctrl-C: embedded, or with `--nats` a cluster gateway
/// (and with `--worker` a worker too).
///
/// # Errors
/// Bad configuration, an address in use, or a journal that cannot be opened.
pub fn serve(common: &CommonArgs, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    serve_as(common, args, false)
}

/// `sakuga worker --nats URL`: pulls and runs cluster jobs, serving health, signals and
/// `/metrics` of its own.
///
/// # Errors
/// As [`serve`], and without `--nats`.
pub fn worker(common: &CommonArgs, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    if args.cluster.nats.is_none() {
        anyhow::bail!("sakuga worker runs in cluster mode: give it --nats URL");
    }
    serve_as(common, args, true)
}

fn serve_as(common: &CommonArgs, args: &ServeArgs, worker_only: bool) -> anyhow::Result<ExitCode> {
    let mut config = common.resolve()?;
    runtime::settle_device(&mut config)?;
    let token = args
        .auth_token_file
        .as_deref()
        .map(read_auth_token)
        .transpose()?;
    let tunables = load_tunables(args.tunables.as_ref())?;
    let cluster = args.cluster.config(&tunables)?;
    let telemetry = runtime::start_signals(
        &config,
        &tunables,
        Some(&config.data_dir),
        Some(args.metrics_listen),
    )?;
    let parts = engine_parts(&config, tunables, cluster.is_some(), &telemetry.signals)?;
    let reload = reload_fn(common, args, &config.data_dir);
    let mut server_config = server_config(args, token, reload.clone())?;
    // A worker takes no jobs from clients; a gateway serves ComfyUI's API for the cluster.
    let comfy = match worker_only {
        false => comfy_addr(&args.comfy_listen)?,
        true => None,
    };
    let mut comfy_config = comfy_config(args, comfy.is_some(), &server_config, &config.data_dir)?;
    let started: Arc<OnceLock<EngineHandle>> = Arc::new(OnceLock::new());
    let start = match &cluster {
        None => engine_start(parts, args.warmup.clone(), started.clone()),
        // Cluster roles need the engine before they connect: started here, recovery-free.
        Some(_) => EngineStart::Ready(started_now(parts, &args.warmup, &started)?),
    };
    let metrics = telemetry
        .metrics_addr
        .map_or_else(|| "off".to_owned(), |addr| format!("http://{addr}/metrics"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let served = runtime.block_on(async move {
        let (listener, comfy_listener) = bind(args.listen, comfy).await?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let worker = match cluster {
            None => None,
            Some(cluster) => {
                let engine = started.get().cloned().context("the engine did not start")?;
                let (role, worker) =
                    cluster_role(cluster, &args.cluster, engine, worker_only, stop_rx).await?;
                if let Role::Gateway(gateway) = &role {
                    comfy_config.cluster = Some(gateway.clone());
                }
                server_config.role = role;
                worker
            }
        };
        let (stop_comfy, comfy_stopped) = tokio::sync::oneshot::channel::<()>();
        let comfy_task = comfy_listener
            .map(|listener| spawn_comfy(listener, started.clone(), comfy_config, comfy_stopped))
            .transpose()?;
        eprintln!(
            "sakuga serving gRPC on {} (metrics on {metrics}){}",
            listener.local_addr()?,
            role_note(&server_config.role, worker.is_some())
        );
        tokio::spawn(reload_on_sighup(started.clone(), reload));
        let stopping = shutdown_signal(started.clone());
        let shutdown = async move {
            stopping.await;
            let _ = stop_tx.send(true);
        };
        let served = run(listener, start, server_config, shutdown).await;
        let _ = stop_comfy.send(());
        stop_side_tasks(comfy_task, worker).await;
        served?;
        anyhow::Ok(())
    });
    // Nothing left should need waiting for; a stuck blocking task must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    served?;
    Ok(ExitCode::SUCCESS)
}

type EngineParts = (
    EngineConfig,
    Arc<sakuga_nodes::NodeRegistry>,
    Arc<sakuga_nodes::NodeEnv>,
    sakuga_telemetry::Signals,
);

/// What the engine starts with.
fn engine_parts(
    config: &crate::config::SakugaConfig,
    tunables: EngineTunables,
    cluster_mode: bool,
    signals: &sakuga_telemetry::Signals,
) -> anyhow::Result<EngineParts> {
    let engine_config = EngineConfig {
        tunables,
        executor: config.executor.clone(),
        // In cluster mode JetStream holds the jobs; a local journal would run them twice.
        data_dir: (!cluster_mode).then(|| config.data_dir.clone()),
        ..EngineConfig::default()
    };
    Ok((
        engine_config,
        Arc::new(runtime::registry()),
        Arc::new(runtime::node_env(config)?),
        signals.clone(),
    ))
}

/// Binds the gRPC port and, unless it is off, the ComfyUI API's.
async fn bind(
    listen: SocketAddr,
    comfy: Option<SocketAddr>,
) -> anyhow::Result<(tokio::net::TcpListener, Option<tokio::net::TcpListener>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let comfy_listener = match comfy {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("binding the ComfyUI API on {addr} (--comfy-listen ADDR, or off)")
        })?),
        None => None,
    };
    Ok((listener, comfy_listener))
}

fn role_note(role: &Role, pulls: bool) -> &'static str {
    match (role, pulls) {
        (Role::Embedded, _) => "",
        (Role::Gateway(_), false) => ", a cluster gateway",
        (Role::Gateway(_), true) => ", a cluster gateway and worker",
        (Role::Worker(_), _) => ", a cluster worker",
    }
}

type WorkerTask = tokio::task::JoinHandle<Result<(), crate::cluster::ClusterError>>;

/// Connects to NATS (waiting for it if need be) and starts this process's cluster roles.
async fn cluster_role(
    config: ClusterConfig,
    args: &ClusterArgs,
    engine: EngineHandle,
    worker_only: bool,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(Role, Option<WorkerTask>)> {
    eprintln!("sakuga: connecting to NATS at {}", config.url);
    let cluster = Cluster::connect_patiently(config).await?;
    let worker = (worker_only || args.worker).then(|| {
        let config = WorkerConfig {
            worker_id: args.worker_id(),
            out_dir: engine.env().output_dir.clone(),
            prefetch: args.prefetch,
        };
        tokio::spawn(crate::cluster::run_worker(
            cluster.clone(),
            engine.clone(),
            config,
            stop,
        ))
    });
    let role = if worker_only {
        Role::Worker(cluster)
    } else {
        Role::Gateway(Gateway::new(cluster, engine))
    };
    Ok((role, worker))
}

/// Waits a little for the ComfyUI listener and the worker's pull loop to stop.
async fn stop_side_tasks(
    comfy: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    worker: Option<WorkerTask>,
) {
    let wait = std::time::Duration::from_secs(5);
    if let Some(task) = comfy {
        match tokio::time::timeout(wait, task).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the ComfyUI API listener failed"),
            Err(_) => tracing::warn!("the ComfyUI API listener did not stop in time"),
            _ => {}
        }
    }
    if let Some(task) = worker {
        match tokio::time::timeout(wait, task).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the worker stopped with an error"),
            Err(_) => tracing::warn!("the worker's pull loop did not stop in time"),
            _ => {}
        }
    }
}

/// Starts the engine now (cluster roles), warming the models asked for.
fn started_now(
    (config, registry, env, signals): EngineParts,
    warmup: &[String],
    started: &Arc<OnceLock<EngineHandle>>,
) -> anyhow::Result<EngineHandle> {
    let engine = EngineHandle::start(config, registry, env, signals)?;
    let _ = started.set(engine.clone());
    if !warmup.is_empty() {
        let report = crate::server::ops::warmup(&engine, warmup);
        tracing::info!(loaded = ?report.loaded, failed = ?report.failed, "warmup done");
    }
    Ok(engine)
}

/// Starts the engine (on the server's blocking pool), keeps it in `started` for the
/// ComfyUI API and SIGHUP, and warms the models asked for.
fn engine_start(
    (config, registry, env, signals): EngineParts,
    warmup: Vec<String>,
    started: Arc<OnceLock<EngineHandle>>,
) -> EngineStart {
    EngineStart::Start(Box::new(move || {
        let engine = EngineHandle::start(config, registry, env, signals)?;
        let _ = started.set(engine.clone());
        if !warmup.is_empty() {
            let report = crate::server::ops::warmup(&engine, &warmup);
            tracing::info!(loaded = ?report.loaded, failed = ?report.failed, "warmup done");
        }
        Ok(engine)
    }))
}

/// Runs the ComfyUI API on its listener until `stop`; says where it serves.
fn spawn_comfy(
    listener: tokio::net::TcpListener,
    engine: Arc<OnceLock<EngineHandle>>,
    config: crate::comfy::ComfyConfig,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    eprintln!(
        "sakuga serving the ComfyUI API on http://{}{}",
        listener.local_addr()?,
        if config.frontend.is_some() {
            " (with the ComfyUI frontend)"
        } else {
            ""
        }
    );
    let stopped = async move {
        let _ = stop.await;
    };
    Ok(tokio::spawn(crate::comfy::run(
        listener, engine, config, stopped,
    )))
}

/// The reload of SIGHUP and the `Reload` RPC: re-reads the tunables file and the config
/// file's `[signals]` (SLO targets, quality checks); folders, device and listeners need a
/// restart and are left as they are.
fn reload_fn(common: &CommonArgs, args: &ServeArgs, data_dir: &std::path::Path) -> ReloadFn {
    let tunables_path = args.tunables.clone();
    let reload_common = common.clone();
    let generation_dir = data_dir.to_path_buf();
    Arc::new(move |engine: &EngineHandle| -> anyhow::Result<Reloaded> {
        let tunables = load_tunables(tunables_path.as_ref())?;
        let signals = reload_common.resolve()?.signals;
        let reloaded = engine.reload_config(tunables, Some(signals), env!("CARGO_PKG_VERSION"));
        runtime::write_generation(&generation_dir, reloaded.generation)?;
        Ok(reloaded)
    })
}

/// The gRPC server's settings from the flags.
fn server_config(
    args: &ServeArgs,
    auth_token: Option<String>,
    reload: ReloadFn,
) -> anyhow::Result<ServerConfig> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::server::TlsIdentity {
            cert_pem: std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
            key_pem: std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
        }),
        _ => None,
    };
    Ok(ServerConfig {
        auth_token,
        tls,
        reload: Some(reload),
        drain_timeout: std::time::Duration::try_from_secs_f64(args.drain_timeout)
            .context("--drain-timeout must be a number of seconds, 0 or more")?,
        connections: connection_limits(),
        ..ServerConfig::default()
    })
}

/// The ComfyUI API's settings: the gRPC side's token and limits, the user dir under the
/// data dir, and the frontend (`--frontend`, else the installed PyPI package).
fn comfy_config(
    args: &ServeArgs,
    enabled: bool,
    server: &ServerConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<crate::comfy::ComfyConfig> {
    let frontend = match &args.frontend {
        Some(dir) if !dir.join("index.html").is_file() => {
            anyhow::bail!("--frontend {}: no index.html there", dir.display())
        }
        Some(dir) => Some(dir.clone()),
        None if enabled => installed_frontend(),
        None => None,
    };
    Ok(crate::comfy::ComfyConfig {
        auth_token: server.auth_token.clone(),
        max_body_bytes: server.max_message_bytes,
        max_connections: server.connections.max_connections,
        user_dir: data_dir.join("comfy").join("user").join("default"),
        frontend,
        cluster: None,
    })
}

/// Applies the tunables file again on every SIGHUP, without dropping work.
async fn reload_on_sighup(engine: Arc<OnceLock<EngineHandle>>, reload: ReloadFn) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("no SIGHUP handler; reload with the Reload RPC");
            return;
        };
        while hup.recv().await.is_some() {
            let Some(engine) = engine.get().cloned() else {
                continue;
            };
            let reload = reload.clone();
            match tokio::task::spawn_blocking(move || reload(&engine)).await {
                Ok(Ok(r)) => {
                    tracing::info!(generation = r.generation, config_hash = %r.config_hash, "configuration reloaded")
                }
                Ok(Err(e)) => {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "reload failed; the running configuration stays"
                    )
                }
                Err(e) => tracing::error!(error = %e, "reload task failed"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (engine, reload);
    }
}

/// SIGTERM and Ctrl-C, installed once so no signal between two waits is missed.
struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
            StopSignals { term }
        }
        #[cfg(not(unix))]
        StopSignals {}
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Exit status after a second stop signal (as a shell reports a SIGTERM'd process).
const FORCED_EXIT: i32 = 143;
/// How long a forced exit waits for the journal to take the running jobs back.
const FORCED_JOURNAL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Resolves on the first SIGTERM or Ctrl-C, which starts the drain. A second one exits at
/// once, after at most a second for journaling running jobs as interrupted.
async fn shutdown_signal(engine: Arc<OnceLock<EngineHandle>>) {
    let mut signals = StopSignals::install();
    signals.recv().await;
    eprintln!("sakuga: draining (signal again to exit at once)");
    tokio::spawn(async move {
        signals.recv().await;
        eprintln!("sakuga: second signal, exiting now");
        if let Some(engine) = engine.get() {
            let _ = tokio::time::timeout(FORCED_JOURNAL_WAIT, engine.interrupt()).await;
        }
        std::process::exit(FORCED_EXIT);
    });
}
