//! Each job's Watch feed in `SAKUGA_EVENTS`, subject `sakuga.events.<job_id>`: every item
//! is a protobuf `sakuga.v1.WatchEvent`, the same message `Watch` streams, so a gateway
//! forwards what a worker published without knowing the engine's types. Frames over the
//! payload limit travel in chunks (header `Sakuga-Chunk: i/n`) and are joined on read.
//!
//! [`EventPublisher`] is the worker's side (acks awaited in a bounded window, so frames
//! are not held back by the round trip); [`ClusterWatch`] is the gateway's (an ordered
//! consumer: replay from the first event, then follow until the final status).

use std::collections::VecDeque;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{self, DeliverPolicy};
use async_nats::jetstream::context::PublishAckFuture;
use futures_util::StreamExt;
use prost::Message as _;

use sakuga_proto::v1;

use super::record::{JobRecord, unix_ms};
use super::{Cluster, ClusterError, EVENTS_STREAM, Result, events_subject};
use crate::server::convert::state_to_proto;

/// Largest event payload in one NATS message (the server's default limit is 1 MiB; the
/// rest is room for headers).
pub const CHUNK_BYTES: usize = 1000 * 1000 - 8 * 1024;
const CHUNK_HEADER: &str = "Sakuga-Chunk";
/// Publishes whose ack is outstanding before the next waits for the oldest.
const ACK_WINDOW: usize = 32;

/// Publishes one job's events in order.
pub struct EventPublisher {
    cluster: Cluster,
    subject: String,
    pending: VecDeque<PublishAckFuture>,
}

impl std::fmt::Debug for EventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPublisher")
            .field("subject", &self.subject)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl EventPublisher {
    pub fn new(cluster: &Cluster, job_id: &str) -> Self {
        Self {
            cluster: cluster.clone(),
            subject: events_subject(job_id),
            pending: VecDeque::new(),
        }
    }

    /// Publishes `event` (in chunks if it is large).
    ///
    /// # Errors
    /// NATS unreachable, or an earlier publish was refused.
    pub async fn publish(&mut self, event: &v1::WatchEvent) -> Result<()> {
        let bytes = event.encode_to_vec();
        let chunks: Vec<&[u8]> = bytes.chunks(CHUNK_BYTES).collect();
        let n = chunks.len().max(1);
        for (i, chunk) in chunks.iter().enumerate() {
            let payload = bytes::Bytes::copy_from_slice(chunk);
            let ack = if n == 1 {
                self.cluster.js.publish(self.subject.clone(), payload).await
            } else {
                let mut headers = HeaderMap::new();
                headers.insert(CHUNK_HEADER, format!("{}/{n}", i + 1).as_str());
                self.cluster
                    .js
                    .publish_with_headers(self.subject.clone(), headers, payload)
                    .await
            }
            .map_err(|e| ClusterError::nats("publishing a job event", e))?;
            self.pending.push_back(ack);
            if self.pending.len() > ACK_WINDOW {
                self.settle_one().await?;
            }
        }
        Ok(())
    }

    /// Publishes the final status of `record`, at most once per job: JetStream drops a
    /// repeat with the same message id (a redelivery finding the job final republishes it,
    /// in case its worker died between the record and the event).
    ///
    /// # Errors
    /// NATS unreachable.
    pub async fn publish_final(&mut self, record: &JobRecord) -> Result<()> {
        let mut headers = HeaderMap::new();
        let id = format!("{}.final", record.job_id);
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        let payload = final_event(record).encode_to_vec();
        let ack = self
            .cluster
            .js
            .publish_with_headers(self.subject.clone(), headers, payload.into())
            .await
            .map_err(|e| ClusterError::nats("publishing a job's end", e))?;
        self.pending.push_back(ack);
        self.flush().await
    }

    async fn settle_one(&mut self) -> Result<()> {
        if let Some(ack) = self.pending.pop_front() {
            ack.await
                .map_err(|e| ClusterError::nats("storing a job event", e))?;
        }
        Ok(())
    }

    /// Waits until every event published so far is stored.
    ///
    /// # Errors
    /// A publish was refused or NATS went away.
    pub async fn flush(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }
}

/// The final status event of a record in a final state.
pub fn final_event(record: &JobRecord) -> v1::WatchEvent {
    v1::WatchEvent {
        at_unix_ms: record
            .finished_unix_ms
            .unwrap_or_else(|| unix_ms(std::time::SystemTime::now())),
        kind: Some(v1::watch_event::Kind::FinalStatus(v1::FinalStatus {
            state: state_to_proto(record.state) as i32,
            error: record.error.clone().unwrap_or_default(),
        })),
    }
}

/// A stage event as the gateway publishes it at acceptance.
pub fn stage_event(name: &str, detail: String, trace_id: &str) -> v1::WatchEvent {
    v1::WatchEvent {
        at_unix_ms: unix_ms(std::time::SystemTime::now()),
        kind: Some(v1::watch_event::Kind::Stage(v1::StageEvent {
            name: name.to_owned(),
            detail,
            trace_id: trace_id.to_owned(),
        })),
    }
}

/// One `Watch` on a gateway: the job's events from the first, then live ones, ending
/// after the final status.
pub struct ClusterWatch {
    messages: consumer::pull::Ordered,
    /// Chunks of a large event received so far.
    partial: Vec<u8>,
    /// The record was final at the start and its events have expired: end with this.
    synthesized_final: Option<v1::WatchEvent>,
    errors_in_a_row: u32,
    ended: bool,
}

/// Errors in a row (each after the ordered consumer's own retries) before a Watch ends
/// with UNAVAILABLE.
const MAX_ERRORS_IN_A_ROW: u32 = 10;

impl std::fmt::Debug for ClusterWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterWatch")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl ClusterWatch {
    /// Opens the job's event feed; `record` is its record now.
    ///
    /// # Errors
    /// NATS unreachable.
    pub async fn open(cluster: &Cluster, record: &JobRecord) -> Result<Self> {
        let stream = cluster
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(super::failed("opening a job's events"))?;
        let mut consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: events_subject(&record.job_id),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(super::failed("opening a job's events"))?;
        let nothing_stored = consumer
            .info()
            .await
            .map(|i| i.num_pending == 0)
            .unwrap_or(false);
        let synthesized_final =
            (record.state.is_final() && nothing_stored).then(|| final_event(record));
        let messages = consumer
            .messages()
            .await
            .map_err(|e| ClusterError::nats("following a job's events", e))?;
        Ok(Self {
            messages,
            partial: Vec::new(),
            synthesized_final,
            errors_in_a_row: 0,
            ended: false,
        })
    }

    /// The next event; `None` after the final status.
    pub async fn next(&mut self) -> Option<Result<v1::WatchEvent>> {
        if self.ended {
            return None;
        }
        if let Some(last) = self.synthesized_final.take() {
            self.ended = true;
            return Some(Ok(last));
        }
        loop {
            let message = match self.messages.next().await? {
                Ok(m) => {
                    self.errors_in_a_row = 0;
                    m
                }
                // The ordered consumer recreates itself after a reconnect and resumes
                // after the last event seen; only a lasting outage ends the Watch.
                Err(e) if self.errors_in_a_row < MAX_ERRORS_IN_A_ROW => {
                    self.errors_in_a_row += 1;
                    tracing::debug!(error = %e, "job events interrupted; resuming");
                    continue;
                }
                Err(e) => {
                    self.ended = true;
                    return Some(Err(ClusterError::nats("following a job's events", e)));
                }
            };
            let chunk = message
                .headers
                .as_ref()
                .and_then(|h| h.get(CHUNK_HEADER))
                .and_then(|v| parse_chunk(v.as_str()));
            let event = match chunk {
                Some((i, n)) => {
                    if i == 1 {
                        self.partial.clear();
                    }
                    self.partial.extend_from_slice(&message.payload);
                    if i < n {
                        continue;
                    }
                    v1::WatchEvent::decode(std::mem::take(&mut self.partial).as_slice())
                }
                None => v1::WatchEvent::decode(message.payload.as_ref()),
            };
            // Something else on the subject: not ours to show.
            let Ok(event) = event else { continue };
            if matches!(event.kind, Some(v1::watch_event::Kind::FinalStatus(_))) {
                self.ended = true;
            }
            return Some(Ok(event));
        }
    }
}

fn parse_chunk(text: &str) -> Option<(usize, usize)> {
    let (i, n) = text.split_once('/')?;
    Some((i.trim().parse().ok()?, n.trim().parse().ok()?))
}

/// A stage name as the engine spells it (`&'static`), for events read back from the stream.
fn stage_name(name: &str) -> &'static str {
    sakuga_telemetry::events::STAGE_EVENTS
        .iter()
        .find(|known| **known == name)
        .copied()
        .unwrap_or("stage")
}

/// An event from the stream as the engine's `WatchItem`, for front ends that speak the
/// engine's types (the ComfyUI API). Output paths become `<out_dir>/<job_id>/<name>`, so
/// the job id travels as the first folder of the output's subfolder. `None` for what has no
/// engine form.
pub fn to_watch_item(
    event: v1::WatchEvent,
    seq: u64,
    job_id: &str,
    out_dir: &std::path::Path,
) -> Option<sakuga_scheduler::engine::WatchItem> {
    use sakuga_scheduler::engine::{Frame, JobEvent, TimedEvent, WatchItem};
    use v1::watch_event::Kind;
    let at = super::record::at_unix_ms(event.at_unix_ms);
    let job_event = match event.kind? {
        Kind::Stage(s) => JobEvent::Stage {
            name: stage_name(&s.name),
            detail: s.detail,
        },
        Kind::Admission(a) => JobEvent::Admission {
            decision: a.decision.parse().ok()?,
            reason: a.reason.parse().ok()?,
            detail: a.detail,
        },
        Kind::NodeStarted(n) => JobEvent::NodeStarted {
            node_id: n.node_id,
            class_type: n.class_type,
        },
        Kind::NodeFinished(n) => JobEvent::NodeFinished {
            node_id: n.node_id,
            class_type: n.class_type,
            duration: std::time::Duration::from_secs_f64(n.duration_seconds.max(0.0)),
            cached: n.cached,
        },
        Kind::Progress(p) => JobEvent::Progress {
            node_id: p.node_id,
            step: p.step,
            steps: p.steps,
        },
        Kind::Output(o) => JobEvent::Output {
            node_id: o.node_id,
            path: out_dir.join(job_id).join(o.path),
            kind: o.kind,
        },
        Kind::Text(t) => JobEvent::Text {
            node_id: t.node_id,
            text: t.text,
        },
        Kind::FinalStatus(f) => JobEvent::Finished {
            state: crate::server::convert::state_from_proto(f.state)?,
            error: (!f.error.is_empty()).then_some(f.error),
        },
        Kind::Frame(f) if f.encoding == v1::FrameEncoding::Rgb8 as i32 => {
            return Some(WatchItem::Frame(std::sync::Arc::new(Frame {
                seq,
                node_id: f.node_id,
                index: f.index,
                width: f.width,
                height: f.height,
                rgb8: std::sync::Arc::new(f.data),
                target_fps: f.target_fps,
                produced_at: super::record::at_unix_ms(f.produced_unix_ms),
            })));
        }
        Kind::Frame(_) => return None,
        Kind::Skipped(s) if s.frames_dropped > 0 => {
            return Some(WatchItem::FramesDropped(s.frames_dropped));
        }
        Kind::Skipped(s) => return Some(WatchItem::EventsSkipped(s.events_skipped)),
    };
    Some(WatchItem::Event(std::sync::Arc::new(TimedEvent {
        seq,
        at,
        event: job_event,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_headers_parse() {
        assert_eq!(parse_chunk("2/3"), Some((2, 3)));
        assert_eq!(parse_chunk("x/3"), None);
        assert_eq!(parse_chunk("3"), None);
    }
}
