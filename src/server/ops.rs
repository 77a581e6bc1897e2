//! The operations-facing services: `SignalService` (golden signals, SLOs, diagnosis,
//! replica advice, reload, warmup), `NodeService` (catalogue, validation, estimates) and
//! KEDA's `externalscaler.ExternalScaler` (demand as queued + running work weighted by
//! estimated cost; an internal error is an error, never a zero).

use sakuga_models::ModelError;
use sakuga_models::store::{ModelFolder, ModelStore};
use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use sakuga_proto::externalscaler as keda;
use sakuga_proto::externalscaler::external_scaler_server::ExternalScaler;
use sakuga_proto::v1;
use sakuga_proto::v1::node_service_server::NodeService;
use sakuga_proto::v1::signal_service_server::SignalService;
use sakuga_scheduler::SchedulerError;
use sakuga_scheduler::engine::Demand;
use sakuga_telemetry::{
    DiagnosisConfig, PlannedLoad, SignalsSnapshot, Window, Workload, diagnose, render_findings,
};

use crate::server::Shared;
use crate::server::convert::{estimate_to_proto, workload_to_proto};
use crate::server::status::status_of;

/// Replica advice: how many replicas the current demand and signals call for, and why.
pub fn recommend_replicas(
    demand: &Demand,
    snapshot: &SignalsSnapshot,
    work_per_replica_s: f64,
) -> (u32, String) {
    let per = if work_per_replica_s > 0.0 {
        work_per_replica_s
    } else {
        30.0
    };
    let mut replicas = ((demand.work_s / per).ceil() as u32).max(1);
    let mut reasons = vec![format!(
        "queue backlog: {} queued + {} running, {:.1}s of work at {per:.0}s per replica",
        demand.queued_jobs, demand.running_jobs, demand.work_s
    )];
    let animation = snapshot.golden(Workload::Animation, Window::TwoMinutes);
    if let Some(health) = animation.and_then(|g| g.fps_health)
        && health < 0.9
        && demand.queued_jobs > 0
    {
        replicas += 1;
        reasons.push(format!(
            "animation FPS health {health:.2} under 0.90 with work queued"
        ));
    }
    if let Some(device) = &snapshot.device
        && device.utilization_ratio > 0.9
    {
        replicas += 1;
        reasons.push(format!(
            "device utilization {:.0}% over 90%",
            device.utilization_ratio * 100.0
        ));
    }
    (replicas, reasons.join("; "))
}

/// The signal service.
#[derive(Debug, Clone)]
pub struct SignalsApi {
    pub(crate) shared: Shared,
}

impl SignalsApi {
    async fn signals(&self) -> Result<v1::Signals, Status> {
        let engine = self.shared.engine()?;
        let demand = self.shared.demand().await?;
        let snapshot = engine.signals().snapshot();
        let workloads = Workload::ALL
            .iter()
            .map(|&w| {
                let g = snapshot.golden(w, Window::TwoMinutes);
                v1::WorkloadSignals {
                    workload: workload_to_proto(w) as i32,
                    produced_fps: g.map_or(0.0, |g| g.produced_fps),
                    delivered_fps: g.map_or(0.0, |g| g.delivered_fps),
                    fps_health_ratio: g.and_then(|g| g.fps_health).unwrap_or(0.0),
                    render_latency_p95_seconds: g.and_then(|g| g.render_latency.p95).unwrap_or(0.0),
                    queue_wait_p95_seconds: g.and_then(|g| g.queue_wait.p95).unwrap_or(0.0),
                    success_ratio: g.and_then(|g| g.success_ratio).unwrap_or(0.0),
                    jobs_per_minute: g.map_or(0.0, |g| g.jobs_per_minute),
                    queued_jobs: demand.queued_by_workload[w.index()] as u32,
                }
            })
            .collect();
        let slos = snapshot
            .slos
            .iter()
            .map(|s| v1::SloStatus {
                slo: s.slo.as_str().to_owned(),
                objective: s.objective,
                error_budget_remaining: s.error_budget_remaining,
                burn_rates: s
                    .burn_rates
                    .iter()
                    .map(|(w, r)| (w.as_str().to_owned(), *r))
                    .collect(),
            })
            .collect();
        let (replicas, reason) =
            recommend_replicas(&demand, &snapshot, self.shared.config.work_per_replica_s);
        Ok(v1::Signals {
            workloads,
            slos,
            demand: Some(v1::Demand {
                queued_jobs: demand.queued_jobs as u32,
                running_jobs: demand.running_jobs as u32,
                weighted: demand.weighted,
                work_seconds: demand.work_s,
            }),
            recommendation: Some(v1::ReplicaRecommendation { replicas, reason }),
            config_generation: engine.config_generation(),
            planned_heavy_load: snapshot.planned_heavy_load,
            snapshot_json: snapshot.to_json(),
            workers: self.workers().await,
        })
    }

    /// The fleet's workers from their heartbeats (cluster mode).
    async fn workers(&self) -> Vec<v1::WorkerStatus> {
        let Some(cluster) = self.shared.config.role.cluster() else {
            return Vec::new();
        };
        let beats = crate::cluster::gateway::read_heartbeats(cluster)
            .await
            .unwrap_or_default();
        beats
            .into_iter()
            .map(|h| v1::WorkerStatus {
                worker_id: h.worker_id,
                device: h.device,
                hardware_class: h.hardware_class,
                memory_total_bytes: h.memory_total_bytes,
                memory_headroom_bytes: h.memory_headroom_bytes,
                utilization: h.utilization,
                running_jobs: h.running_jobs,
                jobs_finished: h.jobs_finished,
                jobs_per_second: h.jobs_per_second,
                heartbeat_unix_ms: h.heartbeat_unix_ms,
            })
            .collect()
    }
}

type SignalsStream = Pin<Box<dyn Stream<Item = Result<v1::Signals, Status>> + Send>>;

#[tonic::async_trait]
impl SignalService for SignalsApi {
    async fn get_signals(
        &self,
        _: Request<v1::GetSignalsRequest>,
    ) -> Result<Response<v1::Signals>, Status> {
        Ok(Response::new(self.signals().await?))
    }

    type WatchSignalsStream = SignalsStream;

    async fn watch_signals(
        &self,
        request: Request<v1::WatchSignalsRequest>,
    ) -> Result<Response<Self::WatchSignalsStream>, Status> {
        let ms = match request.into_inner().interval_ms {
            0 => 5000,
            ms => ms.max(250),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let api = self.clone();
        let mut closing = self.shared.closing.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(u64::from(ms)));
            loop {
                // A shutdown ends the stream, so the server does not wait on it.
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = closing.wait_for(|c| *c) => break,
                }
                if tx.send(api.signals().await).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn diagnose(
        &self,
        _: Request<v1::DiagnoseRequest>,
    ) -> Result<Response<v1::DiagnoseResponse>, Status> {
        let snapshot = self.shared.engine()?.signals().snapshot();
        let findings = diagnose(&snapshot, &DiagnosisConfig::default());
        Ok(Response::new(v1::DiagnoseResponse {
            text: render_findings(&findings),
            findings: findings
                .iter()
                .map(|f| v1::Finding {
                    rule: f.rule.clone(),
                    severity: f.severity.as_str().to_owned(),
                    summary: format!(
                        "{}{}",
                        f.rule,
                        f.workload.map(|w| format!(" ({w})")).unwrap_or_default()
                    ),
                    probable_cause: f.probable_cause.clone(),
                    action: f.action.clone(),
                    runbook_url: f.runbook_url.clone(),
                    evidence: f
                        .evidence
                        .iter()
                        .map(|e| format!("{} = {}", e.name, e.value))
                        .collect(),
                })
                .collect(),
        }))
    }

    async fn reload(
        &self,
        _: Request<v1::ReloadRequest>,
    ) -> Result<Response<v1::ReloadResponse>, Status> {
        let engine = self.shared.engine()?.clone();
        let before = engine.config_generation();
        let reload = self.shared.config.reload.clone();
        let reloaded = match reload {
            Some(reload) => tokio::task::spawn_blocking(move || reload(&engine))
                .await
                .map_err(|e| Status::internal(format!("reload task: {e}")))?
                .map_err(|e| Status::failed_precondition(format!("reload failed: {e:#}")))?,
            None => engine.reload(engine.tunables(), env!("CARGO_PKG_VERSION")),
        };
        Ok(Response::new(v1::ReloadResponse {
            changed: reloaded.generation != before,
            generation: reloaded.generation,
            config_hash: reloaded.config_hash,
        }))
    }

    async fn warmup(
        &self,
        request: Request<v1::WarmupRequest>,
    ) -> Result<Response<v1::WarmupResponse>, Status> {
        let engine = self.shared.engine()?.clone();
        let models = request.into_inner().models;
        let response = tokio::task::spawn_blocking(move || warmup(&engine, &models))
            .await
            .map_err(|e| Status::internal(format!("warmup task: {e}")))?;
        Ok(Response::new(response))
    }
}

/// Preloads each named model into the model cache exactly as its loader node would (same
/// cache keys, so the first job finds it resident), with
/// `sakuga_planned_heavy_load{reason="warmup"}` at 1 meanwhile so alerts stay quiet.
///
/// A name is looked up in the folder of every registered loader (its schema's `loads`
/// role: `checkpoints/`, `upscale_models/`, `frame_interpolation/`, `loras/`), or given
/// with its folder (`checkpoints/x.safetensors`). Files whose loader runs on its own are
/// loaded onto the device through it; LoRAs only apply on top of a checkpoint, so they are
/// read through once into the page cache.
pub fn warmup(engine: &sakuga_scheduler::EngineHandle, models: &[String]) -> v1::WarmupResponse {
    let started = Instant::now();
    let signals = engine.signals();
    signals.planned_heavy_load(PlannedLoad::Warmup, true);
    let env = engine.env();
    let (mut loaded, mut failed) = (Vec::new(), Vec::new());
    for name in models {
        match warm_one(engine, name) {
            Ok(()) => loaded.push(name.clone()),
            Err(reason) => failed.push(format!("{name}: {reason:#}")),
        }
    }
    signals.planned_heavy_load(PlannedLoad::Warmup, false);
    tracing::info!(
        loaded = loaded.len(),
        failed = failed.len(),
        models_dir = %env.models_dir.display(),
        "warmup finished"
    );
    v1::WarmupResponse {
        loaded,
        failed,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// A folder warmup searches: the loader node (class, file input) that fills the cache,
/// or `None` when its loader needs other nodes' outputs (a LoRA applies on top of a
/// checkpoint), so the file is only read through into the page cache.
type WarmupFolder = (&'static str, Option<(&'static str, &'static str)>);

/// Every registered loader's folder, from its schema's `loads` role.
fn warmup_folders(registry: &sakuga_nodes::NodeRegistry) -> Vec<WarmupFolder> {
    let mut folders: Vec<WarmupFolder> = Vec::new();
    for node in registry.iter() {
        let schema = node.schema();
        let Some(slot) = schema.roles.loads else {
            continue;
        };
        let standalone = schema
            .inputs
            .iter()
            .all(|i| !i.required || !matches!(i.kind, sakuga_nodes::InputKind::Link(_)));
        let loader = standalone.then_some((schema.class_type, slot.input));
        match folders.iter_mut().find(|(f, _)| *f == slot.folder) {
            Some(entry) if entry.1.is_none() => entry.1 = loader,
            Some(_) => {}
            None => folders.push((slot.folder, loader)),
        }
    }
    // Loaders that run first: a name found in two folders warms the runnable one.
    folders.sort_by_key(|(_, loader)| loader.is_none());
    folders
}

fn warm_one(engine: &sakuga_scheduler::EngineHandle, name: &str) -> anyhow::Result<()> {
    let env = engine.env();
    let store = ModelStore::new(&env.models_dir);
    let folders = warmup_folders(engine.registry());
    let (folder_hint, file) = match name.split_once('/') {
        Some((folder, file)) if folders.iter().any(|(f, _)| *f == folder) => (Some(folder), file),
        _ => (None, name),
    };
    let mut found = None;
    for (folder, loader) in folders
        .iter()
        .filter(|(folder, _)| folder_hint.is_none_or(|hint| hint == *folder))
    {
        let Some(model_folder) = ModelFolder::from_dir_name(folder) else {
            continue;
        };
        match store.resolve(model_folder, file) {
            Ok(path) => {
                found = Some((path, loader));
                break;
            }
            Err(e @ ModelError::PathEscapes { .. }) => {
                anyhow::bail!("model names stay inside the models dir: {e}");
            }
            Err(_) => {}
        }
    }
    let (path, loader) =
        found.ok_or_else(|| anyhow::anyhow!("not found in {}", env.models_dir.display()))?;
    let Some((class_type, input)) = loader else {
        return Ok(std::fs::read(path).map(drop)?);
    };
    // A job like any other: admitted against the memory budget, queued, and loaded on
    // the device worker, so a warmup never races a running job for device memory.
    let workflow = serde_json::json!({"1": {"class_type": class_type, "inputs": {*input: file}}});
    let mut request = sakuga_scheduler::SubmitRequest::new(workflow);
    request.roots = sakuga_scheduler::validate::Roots::EveryNode;
    // First among interactive work: what it loads is what the next jobs need.
    request.workload = Some(Workload::SingleImage);
    request.priority = 100;
    request.labels.insert(WARMUP_LABEL.into(), "true".into());
    let info = engine.run_to_completion(request, |_| {})?;
    match info.state {
        sakuga_scheduler::engine::JobState::Succeeded => Ok(()),
        state => Err(anyhow::anyhow!(
            "warmup job {} {}: {}",
            info.job_id,
            format!("{state:?}").to_lowercase(),
            info.error.unwrap_or_default()
        )),
    }
}

/// The label warmup jobs carry (`ListJobs` with it lists them).
pub const WARMUP_LABEL: &str = "sakuga_warmup";

/// The node service.
#[derive(Debug, Clone)]
pub struct NodesApi {
    pub(crate) shared: Shared,
}

/// Parses workflow text, API or UI format, into API-format JSON.
fn parse_workflow(
    text: &str,
    engine: &sakuga_scheduler::EngineHandle,
) -> Result<serde_json::Value, Status> {
    let json = serde_json::from_str(text).map_err(|e| {
        status_of(SchedulerError::Malformed {
            reason: format!("not valid JSON: {e}"),
        })
    })?;
    sakuga_scheduler::ui_format::to_api_format(json, engine.registry()).map_err(status_of)
}

#[tonic::async_trait]
impl NodeService for NodesApi {
    async fn list_node_types(
        &self,
        _: Request<v1::ListNodeTypesRequest>,
    ) -> Result<Response<v1::ListNodeTypesResponse>, Status> {
        let engine = self.shared.engine()?;
        let info = engine.registry().object_info(engine.env());
        let count = info.as_object().map_or(0, |o| o.len()) as u32;
        Ok(Response::new(v1::ListNodeTypesResponse {
            object_info_json: info.to_string(),
            count,
        }))
    }

    async fn validate_workflow(
        &self,
        request: Request<v1::ValidateWorkflowRequest>,
    ) -> Result<Response<v1::ValidateWorkflowResponse>, Status> {
        let text = request.into_inner().workflow_json;
        let engine = self.shared.engine()?;
        let workflow = parse_workflow(&text, engine)?;
        let response = match engine.check(&workflow, Some(text.len() as u64)) {
            Ok(_) => v1::ValidateWorkflowResponse {
                valid: true,
                report_json: String::new(),
                problems: Vec::new(),
            },
            Err(SchedulerError::Invalid(report)) => v1::ValidateWorkflowResponse {
                valid: false,
                report_json: report.to_json().to_string(),
                problems: report.lines(),
            },
            Err(other) => return Err(status_of(other)),
        };
        Ok(Response::new(response))
    }

    async fn estimate_workflow(
        &self,
        request: Request<v1::EstimateWorkflowRequest>,
    ) -> Result<Response<v1::EstimateWorkflowResponse>, Status> {
        let text = request.into_inner().workflow_json;
        let engine = self.shared.engine()?;
        let workflow = parse_workflow(&text, engine)?;
        let (_, estimate) = engine
            .check(&workflow, Some(text.len() as u64))
            .map_err(status_of)?;
        Ok(Response::new(v1::EstimateWorkflowResponse {
            estimate: Some(estimate_to_proto(&estimate)),
        }))
    }
}

/// KEDA's external scaler.
#[derive(Debug, Clone)]
pub struct ScalerApi {
    pub(crate) shared: Shared,
}

impl ScalerApi {
    fn metric_name(&self, object: Option<&keda::ScaledObjectRef>) -> String {
        object
            .and_then(|o| o.scaler_metadata.get("metricName"))
            .cloned()
            .unwrap_or_else(|| self.shared.config.keda_metric_name.clone())
    }

    /// Demand, or an error status: KEDA must never read an internal failure as zero.
    async fn demand(&self) -> Result<Demand, Status> {
        if let Some(cluster) = self.shared.config.role.cluster()
            && !cluster.is_connected()
        {
            return Err(Status::unavailable(
                "demand is unknown: reconnecting to NATS",
            ));
        }
        self.shared
            .demand()
            .await
            .map_err(|e| Status::unavailable(format!("demand is unknown: {}", e.message())))
    }
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<keda::IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for ScalerApi {
    async fn is_active(
        &self,
        _: Request<keda::ScaledObjectRef>,
    ) -> Result<Response<keda::IsActiveResponse>, Status> {
        let demand = self.demand().await?;
        Ok(Response::new(keda::IsActiveResponse {
            result: demand.queued_jobs + demand.running_jobs > 0,
        }))
    }

    type StreamIsActiveStream = ActiveStream;

    async fn stream_is_active(
        &self,
        _: Request<keda::ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let api = self.clone();
        let mut closing = self.shared.closing.clone();
        tokio::spawn(async move {
            let mut last = None;
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = closing.wait_for(|c| *c) => break,
                }
                let message = api
                    .demand()
                    .await
                    .map(|d| d.queued_jobs + d.running_jobs > 0);
                let changed = match &message {
                    Ok(active) => last.replace(*active) != Some(*active),
                    Err(_) => true,
                };
                if changed
                    && tx
                        .send(message.map(|result| keda::IsActiveResponse { result }))
                        .await
                        .is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_metric_spec(
        &self,
        request: Request<keda::ScaledObjectRef>,
    ) -> Result<Response<keda::GetMetricSpecResponse>, Status> {
        let object = request.into_inner();
        let target = object
            .scaler_metadata
            .get("targetSize")
            .and_then(|t| t.parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(self.shared.config.keda_target);
        Ok(Response::new(keda::GetMetricSpecResponse {
            metric_specs: vec![keda::MetricSpec {
                metric_name: self.metric_name(Some(&object)),
                target_size: target.ceil() as i64,
                target_size_float: target,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<keda::GetMetricsRequest>,
    ) -> Result<Response<keda::GetMetricsResponse>, Status> {
        let req = request.into_inner();
        let demand = self.demand().await?;
        let name = if req.metric_name.is_empty() {
            self.metric_name(req.scaled_object_ref.as_ref())
        } else {
            req.metric_name
        };
        Ok(Response::new(keda::GetMetricsResponse {
            metric_values: vec![keda::MetricValue {
                metric_name: name,
                metric_value: demand.weighted.ceil() as i64,
                metric_value_float: demand.weighted,
            }],
        }))
    }
}
