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

use super::CommonArgs;
use crate::runtime;
use crate::server::{EngineStart, ReloadFn, ServerConfig, run};

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

/// Runs the server until SIGTERM or Ctrl-C.
///
/// # Errors
/// Bad configuration, an address in use, or a journal that cannot be opened.
pub fn serve(common: &CommonArgs, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = common.resolve()?;
    runtime::settle_device(&mut config)?;
    let token = args
        .auth_token_file
        .as_deref()
        .map(read_auth_token)
        .transpose()?;
    let tunables = load_tunables(args.tunables.as_ref())?;
    let telemetry = runtime::start_signals(
        &config,
        &tunables,
        Some(&config.data_dir),
        Some(args.metrics_listen),
    )?;
    let signals = telemetry.signals.clone();
    let env = Arc::new(runtime::node_env(&config)?);
    let registry = Arc::new(runtime::registry());
    let engine_config = EngineConfig {
        tunables,
        executor: config.executor.clone(),
        data_dir: Some(config.data_dir.clone()),
        ..EngineConfig::default()
    };
    let reload = reload_fn(common, args, &config.data_dir);
    let server_config = server_config(args, token, reload.clone())?;
    let comfy = comfy_addr(&args.comfy_listen)?;
    let comfy_config = comfy_config(args, comfy.is_some(), &server_config, &config.data_dir)?;
    let started: Arc<OnceLock<EngineHandle>> = Arc::new(OnceLock::new());
    let start = engine_start(
        (engine_config, registry, env, signals),
        args.warmup.clone(),
        started.clone(),
    );
    let listen = args.listen;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let comfy_listener = match comfy {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("binding the ComfyUI API on {addr} (--comfy-listen ADDR, or off)")
            })?),
            None => None,
        };
        let metrics = telemetry
            .metrics_addr
            .map_or_else(|| "off".to_owned(), |addr| format!("http://{addr}/metrics"));
        let (stop_comfy, comfy_stopped) = tokio::sync::oneshot::channel::<()>();
        let comfy_task = comfy_listener
            .map(|listener| spawn_comfy(listener, started.clone(), comfy_config, comfy_stopped))
            .transpose()?;
        eprintln!(
            "sakuga serving gRPC on {} (metrics on {metrics})",
            listener.local_addr()?
        );
        tokio::spawn(reload_on_sighup(started.clone(), reload));
        let served = run(listener, start, server_config, shutdown_signal(started)).await;
        let _ = stop_comfy.send(());
        if let Some(task) = comfy_task {
            match tokio::time::timeout(std::time::Duration::from_secs(5), task).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the ComfyUI API listener failed"),
                Err(_) => tracing::warn!("the ComfyUI API listener did not stop in time"),
                _ => {}
            }
        }
        served?;
        anyhow::Ok(())
    });
    // Nothing left should need waiting for; a stuck blocking task must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    served?;
    Ok(ExitCode::SUCCESS)
}

/// Starts the engine (on the server's blocking pool), keeps it in `started` for the
/// ComfyUI API and SIGHUP, and warms the models asked for.
fn engine_start(
    (config, registry, env, signals): (
        EngineConfig,
        Arc<sakuga_nodes::NodeRegistry>,
        Arc<sakuga_nodes::NodeEnv>,
        sakuga_telemetry::Signals,
    ),
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
    Arc::new(move |engine: &EngineHandle| -> Result<Reloaded, String> {
        let tunables = load_tunables(tunables_path.as_ref()).map_err(|e| format!("{e:#}"))?;
        let signals = reload_common
            .resolve()
            .map_err(|e| format!("{e:#}"))?
            .signals;
        let reloaded = engine.reload_config(tunables, Some(signals), env!("CARGO_PKG_VERSION"));
        runtime::write_generation(&generation_dir, reloaded.generation)
            .map_err(|e| format!("{e:#}"))?;
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
                    tracing::error!(error = %e, "reload failed; the running configuration stays")
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
