//! `sakuga serve`: the gRPC server with its metrics listener, journal in `--data-dir`,
//! graceful shutdown on SIGTERM/Ctrl-C (stop admitting, finish running work, keep queued
//! work journaled) and configuration reload on SIGHUP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use clap::Args;

use sakuga_scheduler::engine::{EngineTunables, Reloaded};
use sakuga_scheduler::{EngineConfig, EngineHandle};
use sakuga_telemetry::{PrometheusConfig, Signals};

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
    let config = common.resolve()?;
    let token = args
        .auth_token_file
        .as_deref()
        .map(read_auth_token)
        .transpose()?;
    let tunables = load_tunables(args.tunables.as_ref())?;
    let metrics = sakuga_telemetry::prometheus::install(&PrometheusConfig {
        listen: Some(args.metrics_listen),
    })?;
    let env = Arc::new(runtime::node_env(&config)?);
    let registry = Arc::new(runtime::registry());
    let signals = Signals::new(config.signals.clone());
    let engine_config = EngineConfig {
        tunables,
        executor: config.executor.clone(),
        data_dir: Some(config.data_dir.clone()),
        ..EngineConfig::default()
    };
    let tunables_path = args.tunables.clone();
    let reload_common = common.clone();
    // Re-reads the tunables file and the config file's `[signals]` (SLO targets, quality
    // checks); folders, device and listeners need a restart and are left as they are.
    let reload: ReloadFn = Arc::new(move |engine: &EngineHandle| -> Result<Reloaded, String> {
        let tunables = load_tunables(tunables_path.as_ref()).map_err(|e| format!("{e:#}"))?;
        let signals = reload_common
            .resolve()
            .map_err(|e| format!("{e:#}"))?
            .signals;
        Ok(engine.reload_config(tunables, Some(signals), env!("CARGO_PKG_VERSION")))
    });
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::server::TlsIdentity {
            cert_pem: std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
            key_pem: std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
        }),
        _ => None,
    };
    let server_config = ServerConfig {
        auth_token: token,
        tls,
        reload: Some(reload.clone()),
        connections: connection_limits(),
        ..ServerConfig::default()
    };
    let warmup = args.warmup.clone();
    let started: Arc<OnceLock<EngineHandle>> = Arc::new(OnceLock::new());
    let started_slot = started.clone();
    let start = EngineStart::Start(Box::new(move || {
        let engine = EngineHandle::start(engine_config, registry, env, signals)?;
        let _ = started_slot.set(engine.clone());
        if !warmup.is_empty() {
            let report = crate::server::ops::warmup(&engine, &warmup);
            tracing::info!(loaded = ?report.loaded, failed = ?report.failed, "warmup done");
        }
        Ok(engine)
    }));
    let listen = args.listen;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        eprintln!(
            "sakuga serving gRPC on {} (metrics on {:?})",
            listener.local_addr()?,
            metrics.listen_addr()
        );
        tokio::spawn(reload_on_sighup(started, reload));
        run(listener, start, server_config, shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
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

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
