//! `sakuga.v1.RenderService`: submit, watch (events and frames, bounded per watcher),
//! cancel, get, list and playback reports, over the engine handle.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use sakuga_proto::v1;
use sakuga_proto::v1::render_service_server::RenderService;
use sakuga_scheduler::SubmitRequest;
use sakuga_scheduler::bounds::check_job_id;
use sakuga_scheduler::engine::{Frame, JobWatch, ListFilter, WatchItem};
use sakuga_telemetry::{PlaybackReport, TraceContext, Window};

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::server::convert::{
    estimate_to_proto, event_to_proto, from_unix_ms, graph_to_json, job_to_proto, skipped_to_proto,
    state_from_proto, workload_from_proto, workload_to_proto,
};
use crate::server::status::{status_of, status_of_cluster};
use crate::server::{Role, Shared};

/// The render service.
#[derive(Debug, Clone)]
pub struct RenderApi {
    pub(crate) shared: Shared,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

/// Encodes RGB8 pixels as a PNG (fast compression: previews, not archives).
pub fn encode_png(width: u32, height: u32, rgb8: &[u8]) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::with_capacity(rgb8.len() / 2 + 64);
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb8)?;
    writer.finish()?;
    Ok(out)
}

async fn frame_to_proto(frame: &Frame, png: bool) -> Result<v1::WatchEvent, Status> {
    let data = if png {
        let (w, h, pixels) = (frame.width, frame.height, frame.rgb8.clone());
        tokio::task::spawn_blocking(move || encode_png(w, h, &pixels))
            .await
            .map_err(|e| Status::internal(format!("frame encoder task: {e}")))?
            .map_err(|e| Status::internal(format!("encoding a frame: {e}")))?
    } else {
        frame.rgb8.as_ref().clone()
    };
    let encoding = if png {
        v1::FrameEncoding::Png
    } else {
        v1::FrameEncoding::Rgb8
    };
    Ok(crate::server::convert::frame_to_proto(
        frame, encoding, data,
    ))
}

/// One Watch call's position in its job's feed.
struct WatchCursor {
    watch: JobWatch,
    trace_id: String,
    png: bool,
    skip_frames: bool,
    closing: tokio::sync::watch::Receiver<bool>,
    ended: bool,
}

impl WatchCursor {
    async fn next(&mut self) -> Option<Result<v1::WatchEvent, Status>> {
        if self.ended {
            return None;
        }
        loop {
            let item = tokio::select! {
                item = self.watch.next() => item,
                _ = self.closing.wait_for(|c| *c) => {
                    self.ended = true;
                    return Some(Err(Status::unavailable("the server is shutting down")));
                }
            };
            return Some(match item? {
                WatchItem::Event(e) => Ok(event_to_proto(&e, &self.trace_id)),
                WatchItem::Frame(_) if self.skip_frames => continue,
                WatchItem::Frame(f) => frame_to_proto(&f, self.png).await,
                WatchItem::FramesDropped(n) => Ok(skipped_to_proto(n, 0)),
                WatchItem::EventsSkipped(n) => Ok(skipped_to_proto(0, n)),
            });
        }
    }
}

#[tonic::async_trait]
impl RenderService for RenderApi {
    async fn submit(
        &self,
        request: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitResponse>, Status> {
        let engine = self.shared.engine()?;
        self.refuse_on_worker()?;
        let trace = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::from_traceparent);
        let req = request.into_inner();
        let (workflow, bytes) = match &req.workflow {
            Some(v1::submit_request::Workflow::WorkflowJson(text)) => {
                let json = serde_json::from_str(text).map_err(|e| {
                    status_of(sakuga_scheduler::SchedulerError::Malformed {
                        reason: format!("not valid JSON: {e}"),
                    })
                })?;
                (json, text.len() as u64)
            }
            Some(v1::submit_request::Workflow::Graph(graph)) => {
                let json = graph_to_json(graph)?;
                let bytes = json.to_string().len() as u64;
                (json, bytes)
            }
            None => {
                return Err(Status::invalid_argument(
                    "a workflow (workflow_json or graph) is required",
                ));
            }
        };
        let submit = SubmitRequest {
            workflow,
            workflow_bytes: Some(bytes),
            workload: workload_from_proto(req.workload),
            priority: req.priority,
            deadline: from_unix_ms(req.deadline_unix_ms),
            idempotency_key: (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
            labels: req.labels.into_iter().collect(),
            trace,
            assigned: None,
            roots: Default::default(),
        };
        let submitted = match &self.shared.config.role {
            Role::Gateway(gateway) => gateway.submit(submit).await.map_err(status_of_cluster)?,
            _ => engine.submit(submit).await.map_err(status_of)?,
        };
        Ok(Response::new(v1::SubmitResponse {
            job_id: submitted.job_id,
            queue_position: submitted.queue_position as u32,
            estimate: Some(estimate_to_proto(&submitted.estimate)),
            workload: workload_to_proto(submitted.workload) as i32,
            trace_id: submitted.trace_id,
            deduplicated: submitted.deduplicated,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let engine = self.shared.engine()?;
        self.refuse_on_worker()?;
        let req = request.into_inner();
        check_job_id(&req.job_id).map_err(status_of)?;
        if let Role::Gateway(gateway) = &self.shared.config.role {
            let watch = gateway
                .watch(&req.job_id)
                .await
                .map_err(status_of_cluster)?;
            return Ok(Response::new(cluster_watch_stream(
                watch,
                req.frame_encoding != v1::FrameEncoding::Rgb8 as i32,
                req.skip_frames,
                self.shared.closing.clone(),
            )));
        }
        let watch = engine.watch(&req.job_id).await.map_err(status_of)?;
        let cursor = WatchCursor {
            trace_id: watch.trace_id().to_owned(),
            watch,
            png: req.frame_encoding != v1::FrameEncoding::Rgb8 as i32,
            skip_frames: req.skip_frames,
            closing: self.shared.closing.clone(),
            ended: false,
        };
        // Pulled by the transport: the next item is taken from the feed only once the
        // previous one was handed to HTTP/2, so a slow client leaves frames in the feed's
        // ring (where they are counted dropped), not in a buffer here.
        let stream = futures_util::stream::unfold(cursor, |mut cursor| async move {
            let message = cursor.next().await?;
            Some((message, cursor))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel(
        &self,
        request: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let job_id = request.into_inner().job_id;
        check_job_id(&job_id).map_err(status_of)?;
        self.refuse_on_worker()?;
        let info = match &self.shared.config.role {
            Role::Gateway(gateway) => gateway.cancel(&job_id).await.map_err(status_of_cluster)?,
            _ => self
                .shared
                .engine()?
                .cancel(&job_id)
                .await
                .map_err(status_of)?,
        };
        Ok(Response::new(job_to_proto(&info)))
    }

    async fn get_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let job_id = request.into_inner().job_id;
        check_job_id(&job_id).map_err(status_of)?;
        self.refuse_on_worker()?;
        let info = match &self.shared.config.role {
            Role::Gateway(gateway) => gateway.get(&job_id).await.map_err(status_of_cluster)?,
            _ => self
                .shared
                .engine()?
                .get(&job_id)
                .await
                .map_err(status_of)?,
        };
        Ok(Response::new(job_to_proto(&info)))
    }

    async fn list_jobs(
        &self,
        request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        let req = request.into_inner();
        let filter = ListFilter {
            workload: workload_from_proto(req.workload),
            state: state_from_proto(req.state),
            labels: req.labels.into_iter().collect(),
        };
        let size = if req.page_size == 0 {
            100
        } else {
            req.page_size as usize
        };
        let token = (!req.page_token.is_empty()).then_some(req.page_token);
        self.refuse_on_worker()?;
        let page = match &self.shared.config.role {
            Role::Gateway(gateway) => gateway
                .list(filter, size, token)
                .await
                .map_err(status_of_cluster)?,
            _ => self
                .shared
                .engine()?
                .list(filter, size, token)
                .await
                .map_err(status_of)?,
        };
        let budget = self
            .shared
            .config
            .max_message_bytes
            .min(LIST_RESPONSE_BYTES);
        Ok(Response::new(page_within(page, budget)))
    }

    type GetOutputStream = OutputStream;

    async fn get_output(
        &self,
        request: Request<v1::GetOutputRequest>,
    ) -> Result<Response<Self::GetOutputStream>, Status> {
        let req = request.into_inner();
        check_job_id(&req.job_id).map_err(status_of)?;
        self.refuse_on_worker()?;
        let (name, size, reader): (String, u64, Box<dyn AsyncRead + Send + Unpin>) =
            match &self.shared.config.role {
                Role::Gateway(gateway) => {
                    let (size, object) = gateway
                        .output(&req.job_id, &req.name)
                        .await
                        .map_err(status_of_cluster)?;
                    (req.name.clone(), size, Box::new(object))
                }
                _ => {
                    let (name, size, file) = self.local_output(&req.job_id, &req.name).await?;
                    (name, size, Box::new(file))
                }
            };
        Ok(Response::new(output_stream(name, size, reader)))
    }

    async fn report_playback(
        &self,
        request: Request<v1::ReportPlaybackRequest>,
    ) -> Result<Response<v1::ReportPlaybackResponse>, Status> {
        let engine = self.shared.engine()?;
        let req = request.into_inner();
        check_job_id(&req.job_id).map_err(status_of)?;
        // Counted only up to the frames the job's stream produced: one client must not be
        // able to drive an SLO budget by claiming a million drops.
        let claim = engine
            .claim_playback(&req.job_id, req.frames_displayed, req.frames_dropped)
            .await
            .map_err(status_of)?;
        let report = PlaybackReport {
            delivered_frames: claim.displayed,
            dropped_frames: claim.dropped,
            ..PlaybackReport::default()
        };
        engine.signals().playback_report(claim.workload, &report);
        let health = engine
            .signals()
            .golden(claim.workload, Window::TwoMinutes)
            .fps_health;
        Ok(Response::new(v1::ReportPlaybackResponse {
            fps_health_ratio: health.unwrap_or(0.0),
        }))
    }
}

impl RenderApi {
    /// A worker-only process takes no jobs from clients: they go to a gateway.
    fn refuse_on_worker(&self) -> Result<(), Status> {
        match self.shared.config.role {
            Role::Worker(_) => Err(Status::failed_precondition(
                "this is a cluster worker; submit and watch jobs through a gateway (sakuga serve --nats)",
            )),
            _ => Ok(()),
        }
    }

    /// An output of a local job: `name` is its Output event's path or its name inside the
    /// out dir; only files the job reported are served.
    async fn local_output(
        &self,
        job_id: &str,
        name: &str,
    ) -> Result<(String, u64, tokio::fs::File), Status> {
        let engine = self.shared.engine()?;
        let info = engine.get(job_id).await.map_err(status_of)?;
        let out_dir = &engine.env().output_dir;
        let output = info
            .outputs
            .iter()
            .find(|o| {
                o.path == std::path::Path::new(name)
                    || crate::cluster::worker::object_name(out_dir, &o.path) == name
            })
            .ok_or_else(|| Status::not_found(format!("job {job_id} has no output {name:?}")))?;
        let file = tokio::fs::File::open(&output.path)
            .await
            .map_err(|e| Status::not_found(format!("{}: {e}", output.path.display())))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .len();
        Ok((
            crate::cluster::worker::object_name(out_dir, &output.path),
            size,
            file,
        ))
    }
}

type OutputStream = Pin<Box<dyn Stream<Item = Result<v1::OutputChunk, Status>> + Send>>;

/// Bytes per `OutputChunk`.
const OUTPUT_CHUNK_BYTES: usize = 256 * 1024;

/// The file as chunks, pulled by the transport; the first carries the name and size.
fn output_stream(
    name: String,
    total_bytes: u64,
    reader: Box<dyn AsyncRead + Send + Unpin>,
) -> OutputStream {
    let state = (reader, Some((name, total_bytes)), false);
    Box::pin(futures_util::stream::unfold(
        state,
        |(mut reader, mut first, done)| async move {
            if done {
                return None;
            }
            let mut data = vec![0u8; OUTPUT_CHUNK_BYTES];
            let mut filled = 0;
            while filled < data.len() {
                match reader.read(&mut data[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => {
                        let status = Status::internal(format!("reading the output: {e}"));
                        return Some((Err(status), (reader, first, true)));
                    }
                }
            }
            if filled == 0 && first.is_none() {
                return None;
            }
            data.truncate(filled);
            let (name, total_bytes) = first.take().unwrap_or_default();
            let chunk = v1::OutputChunk {
                name,
                total_bytes,
                data,
            };
            let end = filled < OUTPUT_CHUNK_BYTES;
            Some((Ok(chunk), (reader, first, end)))
        },
    ))
}

/// A gateway's Watch: the cluster's events as they come; frames re-encoded as asked.
fn cluster_watch_stream(
    watch: crate::cluster::events::ClusterWatch,
    png: bool,
    skip_frames: bool,
    closing: tokio::sync::watch::Receiver<bool>,
) -> WatchStream {
    let state = (watch, closing, false);
    Box::pin(futures_util::stream::unfold(
        state,
        move |(mut watch, mut closing, ended)| async move {
            if ended {
                return None;
            }
            loop {
                let next = tokio::select! {
                    next = watch.next() => Some(next),
                    _ = closing.wait_for(|c| *c) => None,
                };
                let Some(next) = next else {
                    let status = Status::unavailable("the server is shutting down");
                    return Some((Err(status), (watch, closing, true)));
                };
                let event = match next? {
                    Ok(event) => event,
                    Err(e) => return Some((Err(status_of_cluster(e)), (watch, closing, true))),
                };
                let event = match event.kind {
                    Some(v1::watch_event::Kind::Frame(_)) if skip_frames => continue,
                    Some(v1::watch_event::Kind::Frame(frame)) if png => {
                        match frame_as_png(frame).await {
                            Ok(frame) => v1::WatchEvent {
                                at_unix_ms: event.at_unix_ms,
                                kind: Some(v1::watch_event::Kind::Frame(frame)),
                            },
                            Err(status) => return Some((Err(status), (watch, closing, true))),
                        }
                    }
                    kind => v1::WatchEvent {
                        at_unix_ms: event.at_unix_ms,
                        kind,
                    },
                };
                return Some((Ok(event), (watch, closing, false)));
            }
        },
    ))
}

async fn frame_as_png(mut frame: v1::Frame) -> Result<v1::Frame, Status> {
    if frame.encoding == v1::FrameEncoding::Png as i32 {
        return Ok(frame);
    }
    let (w, h, pixels) = (frame.width, frame.height, std::mem::take(&mut frame.data));
    frame.data = tokio::task::spawn_blocking(move || encode_png(w, h, &pixels))
        .await
        .map_err(|e| Status::internal(format!("frame encoder task: {e}")))?
        .map_err(|e| Status::internal(format!("encoding a frame: {e}")))?;
    frame.encoding = v1::FrameEncoding::Png as i32;
    Ok(frame)
}

/// Most bytes of one `ListJobs` response: gRPC clients refuse messages over 4 MiB unless
/// told otherwise, and a page is cut short (with a token to go on) rather than fail.
const LIST_RESPONSE_BYTES: usize = 4 << 20;

/// The page as a response of at most `budget` bytes: jobs are kept while they fit (always
/// at least one), and the token then continues after the last one kept.
fn page_within(page: sakuga_scheduler::engine::JobPage, budget: usize) -> v1::ListJobsResponse {
    use prost::Message;
    // Room for the token and the field tags around each job.
    let mut used = 64;
    let mut jobs = Vec::with_capacity(page.jobs.len());
    for info in &page.jobs {
        let job = job_to_proto(info);
        let len = job.encoded_len() + 8;
        if !jobs.is_empty() && used + len > budget {
            break;
        }
        used += len;
        jobs.push(job);
    }
    let next_page_token = if jobs.len() < page.jobs.len() {
        page.resume_tokens[jobs.len() - 1].clone()
    } else {
        page.next_page_token.unwrap_or_default()
    };
    v1::ListJobsResponse {
        jobs,
        next_page_token,
    }
}
