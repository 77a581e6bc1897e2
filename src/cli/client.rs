//! Client commands against a running server: `sakuga submit`, `watch`, `cancel`,
//! `signals`, and the remote half of `sakuga doctor --server`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tonic::Code;

use sakuga_proto::v1;

use super::EXIT_INVALID;
use crate::client::SakugaClient;

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Server URL.
    #[arg(long, env = "SAKUGA_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// File holding the bearer token.
    #[arg(long, env = "SAKUGA_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// PEM CA certificate that signed the server's certificate; needed for `https://`
    /// server URLs (the server name verified is the URL's host).
    #[arg(long, env = "SAKUGA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl ServerArgs {
    async fn connect(&self) -> anyhow::Result<SakugaClient> {
        let token = match &self.auth_token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
            ),
            None => None,
        };
        let ca = self.tls_ca()?;
        let host = tls_host(&self.server)?;
        let tls = match (&ca, &host) {
            (Some(ca), Some(host)) => Some((ca.as_slice(), host.as_str())),
            _ => None,
        };
        SakugaClient::connect_with(&self.server, token.as_deref(), tls)
            .await
            .with_context(|| format!("connecting to {}", self.server))
    }

    /// The CA to verify the server with: required for `https://`, refused for `http://`
    /// (where it would silently do nothing).
    fn tls_ca(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let https = self.server.starts_with("https://");
        match &self.tls_ca {
            Some(path) if https => Ok(Some(
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            )),
            Some(_) => anyhow::bail!(
                "--tls-ca is for https:// servers; {} is plaintext",
                self.server
            ),
            None if https => anyhow::bail!(
                "{} is a TLS server: pass the CA that signed its certificate with --tls-ca",
                self.server
            ),
            None => Ok(None),
        }
    }
}

/// The host of an `https://` URL (the name its certificate must carry).
fn tls_host(url: &str) -> anyhow::Result<Option<String>> {
    if !url.starts_with("https://") {
        return Ok(None);
    }
    let uri: tonic::transport::Uri = url.parse().with_context(|| format!("server URL {url}"))?;
    let host = uri
        .host()
        .with_context(|| format!("server URL {url} has no host"))?;
    Ok(Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    ))
}

#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// Workflow JSON file (API or UI format; the server converts UI format), or a PNG/WebP
    /// saved by ComfyUI or sakuga with the workflow embedded.
    pub workflow: PathBuf,
    #[command(flatten)]
    pub server: ServerArgs,
    /// animation, single_image or batch (inferred when omitted).
    #[arg(long)]
    pub workload: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Follow the job until it finishes.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: write the job's streamed frames (frames/) and its outputs (fetched
    /// with GetOutput, from any server of a cluster) into this dir.
    #[arg(long, requires = "watch")]
    pub save: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    pub job_id: String,
    #[command(flatten)]
    pub server: ServerArgs,
    /// `watch` only: write the job's frames and outputs into this dir.
    #[arg(long)]
    pub save: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct SignalsArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Print the full snapshot JSON (what `sakuga doctor --from` reads).
    #[arg(long)]
    pub json: bool,
}

fn block_on<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

fn workload(name: Option<&str>) -> anyhow::Result<v1::Workload> {
    Ok(match name {
        None => v1::Workload::Unspecified,
        Some("animation") => v1::Workload::Animation,
        Some("single_image") => v1::Workload::SingleImage,
        Some("batch") => v1::Workload::Batch,
        Some(other) => {
            anyhow::bail!("--workload must be animation, single_image or batch, not {other:?}")
        }
    })
}

/// The workflow text to submit: the file's own text, or the workflow embedded in an image.
fn submit_text(path: &std::path::Path) -> anyhow::Result<String> {
    let bytes = super::read_workflow_bytes(path)?;
    if sakuga_scheduler::embedded::image_kind(&bytes).is_some() {
        let json = sakuga_scheduler::embedded::embedded_workflow(&bytes)
            .with_context(|| format!("workflow {}", path.display()))?;
        return Ok(json.to_string());
    }
    String::from_utf8(bytes)
        .with_context(|| format!("workflow {} is not UTF-8 text", path.display()))
}

/// `sakuga submit`.
///
/// # Errors
/// Unreadable files, connection failures, refusals other than an invalid workflow.
pub fn submit(args: &SubmitArgs) -> anyhow::Result<ExitCode> {
    block_on(async {
        let text = submit_text(&args.workflow)?;
        let mut client = args.server.connect().await?;
        let request = v1::SubmitRequest {
            workflow: Some(v1::submit_request::Workflow::WorkflowJson(text)),
            workload: workload(args.workload.as_deref())? as i32,
            priority: args.priority,
            idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
            ..Default::default()
        };
        let submitted = match client.render.submit(request).await {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == Code::InvalidArgument => {
                eprintln!("invalid workflow: {}", status.message());
                use tonic_types::StatusExt;
                if let Some(bad) = status.get_details_bad_request() {
                    for v in bad.field_violations {
                        eprintln!("  {}: {}", v.field, v.description);
                    }
                }
                return Ok(ExitCode::from(EXIT_INVALID));
            }
            Err(status) => {
                anyhow::bail!("submit refused: {} ({:?})", status.message(), status.code())
            }
        };
        let estimate = submitted.estimate.unwrap_or_default();
        println!(
            "job {} queued at position {} (expected {:.2}s, peak {} MiB){}",
            submitted.job_id,
            submitted.queue_position,
            estimate.expected_seconds,
            estimate.peak_memory_bytes >> 20,
            if submitted.deduplicated {
                ", deduplicated"
            } else {
                ""
            }
        );
        if args.watch {
            return follow(&mut client, &submitted.job_id, args.save.as_deref()).await;
        }
        Ok(ExitCode::SUCCESS)
    })
}

async fn follow(
    client: &mut SakugaClient,
    job_id: &str,
    save: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    use v1::watch_event::Kind;
    let mut outputs = Vec::new();
    let request = v1::WatchRequest {
        job_id: job_id.to_owned(),
        ..Default::default()
    };
    let mut stream = client.render.watch(request).await?.into_inner();
    let mut frames = 0u64;
    let mut code = ExitCode::FAILURE;
    while let Some(event) = stream.message().await? {
        match event.kind {
            Some(Kind::Stage(s)) => println!("{:<20} {}", s.name, s.detail),
            Some(Kind::Admission(a)) => {
                println!("admission: {} ({}) {}", a.decision, a.reason, a.detail)
            }
            Some(Kind::NodeFinished(n)) => println!(
                "  node {} ({}) {:.3}s{}",
                n.node_id,
                n.class_type,
                n.duration_seconds,
                if n.cached { " cached" } else { "" }
            ),
            Some(Kind::Output(o)) => {
                println!("output {} ({})", o.path, o.kind);
                outputs.push(o.path);
            }
            Some(Kind::Frame(f)) => {
                frames += 1;
                if let Some(dir) = save {
                    save_frame(dir, &f)?;
                }
            }
            Some(Kind::Skipped(s)) => println!(
                "fell behind: {} frames dropped, {} events skipped",
                s.frames_dropped, s.events_skipped
            ),
            Some(Kind::FinalStatus(f)) => {
                let state = v1::JobState::try_from(f.state).map_or("unknown".into(), |s| {
                    s.as_str_name()
                        .trim_start_matches("JOB_STATE_")
                        .to_lowercase()
                });
                println!(
                    "{state}{}{}",
                    if f.error.is_empty() { "" } else { ": " },
                    f.error
                );
                if f.state == v1::JobState::Succeeded as i32 {
                    code = ExitCode::SUCCESS;
                }
            }
            _ => {}
        }
    }
    if frames > 0 {
        println!("{frames} frames received");
    }
    if let Some(dir) = save
        && code == ExitCode::SUCCESS
    {
        for name in &outputs {
            let path = save_output(client, job_id, name, dir).await?;
            println!("saved {}", path.display());
        }
    }
    Ok(code)
}

fn save_frame(dir: &std::path::Path, frame: &v1::Frame) -> anyhow::Result<()> {
    let frames = dir.join("frames");
    std::fs::create_dir_all(&frames).with_context(|| format!("creating {}", frames.display()))?;
    let node: String = frame
        .node_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let (ext, bytes) = if frame.encoding == v1::FrameEncoding::Png as i32 {
        ("png", frame.data.clone())
    } else {
        ("rgb", frame.data.clone())
    };
    let path = frames.join(format!("{node}_{:05}.{ext}", frame.index));
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Fetches one output with GetOutput into `dir`, under its name inside the out dir (never
/// outside `dir`).
async fn save_output(
    client: &mut SakugaClient,
    job_id: &str,
    name: &str,
    dir: &std::path::Path,
) -> anyhow::Result<PathBuf> {
    let request = v1::GetOutputRequest {
        job_id: job_id.to_owned(),
        name: name.to_owned(),
    };
    let mut stream = client
        .render
        .get_output(request)
        .await
        .map_err(|s| anyhow::anyhow!("output {name}: {}", s.message()))?
        .into_inner();
    let mut bytes = Vec::new();
    let mut file_name = String::new();
    while let Some(chunk) = stream.message().await? {
        if file_name.is_empty() {
            file_name = chunk.name;
            bytes.reserve(chunk.total_bytes.min(1 << 30) as usize);
        }
        bytes.extend_from_slice(&chunk.data);
    }
    let relative = std::path::Path::new(&file_name);
    let safe = relative
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    let path = if safe && !file_name.is_empty() {
        dir.join(relative)
    } else {
        dir.join(
            relative
                .file_name()
                .unwrap_or(std::ffi::OsStr::new("output")),
        )
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `sakuga watch`.
///
/// # Errors
/// Connection failures or an unknown job.
pub fn watch(args: &JobArgs) -> anyhow::Result<ExitCode> {
    block_on(async {
        let mut client = args.server.connect().await?;
        follow(&mut client, &args.job_id, args.save.as_deref()).await
    })
}

/// `sakuga cancel`.
///
/// # Errors
/// Connection failures or an unknown job.
pub fn cancel(args: &JobArgs) -> anyhow::Result<ExitCode> {
    block_on(async {
        let mut client = args.server.connect().await?;
        let job = client
            .render
            .cancel(v1::CancelRequest {
                job_id: args.job_id.clone(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("cancel refused: {}", s.message()))?
            .into_inner();
        let state = v1::JobState::try_from(job.state).map_or("unknown".into(), |s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_lowercase()
        });
        println!("job {}: {state}", job.job_id);
        Ok(ExitCode::SUCCESS)
    })
}

/// `sakuga signals`.
///
/// # Errors
/// Connection failures.
pub fn signals(args: &SignalsArgs) -> anyhow::Result<ExitCode> {
    block_on(async {
        let mut client = args.server.connect().await?;
        let s = client
            .signals
            .get_signals(v1::GetSignalsRequest {})
            .await?
            .into_inner();
        if args.json {
            println!("{}", s.snapshot_json);
            return Ok(ExitCode::SUCCESS);
        }
        for w in &s.workloads {
            let name = v1::Workload::try_from(w.workload).map_or("?".into(), |w| {
                w.as_str_name()
                    .trim_start_matches("WORKLOAD_")
                    .to_lowercase()
            });
            println!(
                "{name:<28} queued {:>4}  fps {:.1}/{:.1} (health {:.2})  p95 latency {:.2}s  p95 wait {:.2}s  jobs/min {:.1}",
                w.queued_jobs,
                w.delivered_fps,
                w.produced_fps,
                w.fps_health_ratio,
                w.render_latency_p95_seconds,
                w.queue_wait_p95_seconds,
                w.jobs_per_minute
            );
        }
        for slo in &s.slos {
            println!(
                "slo {:<28} objective {:.4}  budget left {:.2}",
                slo.slo, slo.objective, slo.error_budget_remaining
            );
        }
        if let Some(d) = &s.demand {
            println!(
                "demand: {} queued, {} running, weighted {:.1}, {:.1}s of work",
                d.queued_jobs, d.running_jobs, d.weighted, d.work_seconds
            );
        }
        if let Some(r) = &s.recommendation {
            println!("recommended replicas: {} ({})", r.replicas, r.reason);
        }
        for w in &s.workers {
            println!(
                "worker {:<20} {} {:.0}% busy, {} MiB free, {} running, {:.2} jobs/s",
                w.worker_id,
                w.device,
                w.utilization * 100.0,
                w.memory_headroom_bytes >> 20,
                w.running_jobs.len(),
                w.jobs_per_second
            );
        }
        println!(
            "config generation {}{}",
            s.config_generation,
            if s.planned_heavy_load {
                ", planned heavy load"
            } else {
                ""
            }
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// `sakuga doctor --server URL`: the server's diagnosis, printed with runbooks.
///
/// # Errors
/// Connection failures.
pub fn doctor(server: &ServerArgs) -> anyhow::Result<ExitCode> {
    block_on(async {
        let mut client = server.connect().await?;
        let d = client
            .signals
            .diagnose(v1::DiagnoseRequest {})
            .await?
            .into_inner();
        print!("{}", d.text);
        Ok(if d.findings.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })
}
