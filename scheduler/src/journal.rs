//! The durable job journal (DESIGN.md section 9): one redb file in the data dir holding a
//! record per accepted job, so that after a crash every accepted, unfinished job runs again
//! or is reported failed, and idempotency keys keep deduplicating.
//!
//! Writes go through one `journal_worker` thread that commits in groups: it takes every
//! write waiting in its channel, puts them in one transaction, commits once (fsync), then
//! runs each write's acknowledgement. A `Submit` returns only after its acknowledgement,
//! so a job is durable before the client hears about it, and concurrent submissions share
//! one fsync instead of paying one each.
//!
//! Writes nobody waits on (a job starting or finishing) linger up to [`LINGER`] for a
//! write that somebody does wait on, and ride its commit: with one client that turns three
//! commits per job into one. The price is that a crash can lose the last few milliseconds
//! of state changes; the jobs they belong to are still journaled as queued or running, so
//! they run again after the restart (at least once, never lost).
//!
//! The workflow is stored once, in its own table, when the job is accepted, and deleted
//! when the job's final record is written; the job records themselves stay small.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::SchedulerError;

const JOBS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("jobs");
const WORKFLOWS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("workflows");

/// File name of the journal inside the data dir.
pub const JOURNAL_FILE: &str = "journal.redb";

/// Writes waiting for the worker; a full channel makes writers wait (back-pressure).
const CHANNEL_CAPACITY: usize = 16 * 1024;
/// Most writes folded into one transaction.
const MAX_GROUP: usize = 4096;
/// Longest a write nobody waits on stays uncommitted.
pub const LINGER: Duration = Duration::from_millis(5);
/// Commits start at least this far apart, so that under load a commit gathers every
/// submission of the interval instead of the one or two that arrived during the last
/// fsync. A lone client's submissions come further apart than this and never wait.
pub const MIN_COMMIT_INTERVAL: Duration = Duration::from_micros(500);

/// Where a journaled job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl RecordState {
    /// Whether the job reached a final state.
    pub fn is_final(self) -> bool {
        !matches!(self, RecordState::Queued | RecordState::Running)
    }
}

/// One job as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    /// The API-format workflow as submitted. Written to its own table when present (the
    /// record that accepts the job), never inside the record; filled in on load.
    #[serde(default, skip_serializing)]
    pub workflow: Option<Json>,
    /// `animation`, `single_image` or `batch`.
    pub workload: String,
    pub priority: i32,
    pub deadline_unix_ms: Option<u64>,
    pub idempotency_key: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub trace_id: String,
    pub submitted_unix_ms: u64,
    pub state: RecordState,
    /// Times the job started running (a crash mid-run leaves `Running` with this count).
    pub attempts: u32,
    pub finished_unix_ms: Option<u64>,
    /// Why it failed, was cancelled or timed out.
    pub error: Option<String>,
    /// Files it produced.
    pub outputs: Vec<PathBuf>,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What to run after the write is durable (or failed).
pub type JournalAck = Box<dyn FnOnce(Result<(), SchedulerError>) + Send>;

enum JournalOp {
    Put(Box<JobRecord>, Option<JournalAck>),
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// Handle to the journal worker. Dropping it commits what is pending and stops the worker.
pub struct Journal {
    path: PathBuf,
    tx: Option<Sender<JournalOp>>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (or creates) the journal in `data_dir` and returns every record in it; final
    /// records older than `retention` are deleted on the way.
    ///
    /// # Errors
    /// [`SchedulerError::Journal`] when the dir or file cannot be created, opened or read.
    pub fn open(
        data_dir: &Path,
        retention: Duration,
    ) -> Result<(Journal, Vec<JobRecord>), SchedulerError> {
        let path = data_dir.join(JOURNAL_FILE);
        let err = |reason: String| SchedulerError::Journal {
            path: path.clone(),
            reason,
        };
        std::fs::create_dir_all(data_dir)
            .map_err(|e| err(format!("creating the data dir: {e}")))?;
        let db = Database::create(&path).map_err(|e| err(e.to_string()))?;
        let records = load_and_prune(&db, retention).map_err(|e| err(e.to_string()))?;
        let (tx, rx) = crossbeam_channel::bounded(CHANNEL_CAPACITY);
        let worker_path = path.clone();
        let worker = std::thread::Builder::new()
            .name("sakuga-journal".into())
            .spawn(move || journal_worker(db, rx, worker_path))
            .map_err(|e| err(format!("spawning the journal thread: {e}")))?;
        Ok((
            Journal {
                path,
                tx: Some(tx),
                worker: Some(worker),
            },
            records,
        ))
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `record` (replacing the job's earlier record) in the next group commit and
    /// then runs `ack`. Blocks only while the worker's channel is full.
    pub fn put(&self, record: JobRecord, ack: Option<JournalAck>) {
        let op = JournalOp::Put(Box::new(record), ack);
        if let Some(tx) = &self.tx
            && let Err(crossbeam_channel::SendError(JournalOp::Put(_, Some(ack)))) = tx.send(op)
        {
            ack(Err(SchedulerError::Journal {
                path: self.path.clone(),
                reason: "the journal worker stopped".into(),
            }));
        }
    }

    /// Blocks until everything written before this call is committed.
    pub fn flush(&self) {
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        if let Some(tx) = &self.tx
            && tx.send(JournalOp::Flush(done_tx)).is_ok()
        {
            let _ = done_rx.recv();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

fn load_and_prune(db: &Database, retention: Duration) -> Result<Vec<JobRecord>, redb::Error> {
    let mut records = Vec::new();
    let mut expired = Vec::new();
    let cutoff = unix_ms(SystemTime::now()).saturating_sub(retention.as_millis() as u64);
    let mut workflows: std::collections::HashMap<String, Json> = std::collections::HashMap::new();
    {
        let read = db.begin_read()?;
        match read.open_table(WORKFLOWS) {
            Ok(table) => {
                for row in table.iter()? {
                    let (key, value) = row?;
                    match serde_json::from_slice::<Json>(value.value()) {
                        Ok(workflow) => {
                            workflows.insert(key.value().to_owned(), workflow);
                        }
                        Err(e) => {
                            tracing::warn!(job_id = key.value(), error = %e, "skipping an unreadable journaled workflow");
                        }
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        match read.open_table(JOBS) {
            Ok(table) => {
                for row in table.iter()? {
                    let (key, value) = row?;
                    match serde_json::from_slice::<JobRecord>(value.value()) {
                        Ok(r)
                            if r.state.is_final()
                                && r.finished_unix_ms.is_some_and(|f| f < cutoff) =>
                        {
                            expired.push(key.value().to_owned());
                        }
                        Ok(mut r) => {
                            if let Some(workflow) = workflows.remove(&r.job_id) {
                                r.workflow = Some(workflow);
                            }
                            records.push(r);
                        }
                        Err(e) => {
                            tracing::warn!(job_id = key.value(), error = %e, "skipping an unreadable journal record");
                        }
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let write = db.begin_write()?;
    {
        let mut table = write.open_table(JOBS)?;
        for key in &expired {
            table.remove(key.as_str())?;
        }
        // Workflows whose job record is gone (final and pruned, or never written).
        let mut orphans = write.open_table(WORKFLOWS)?;
        for key in workflows.keys() {
            orphans.remove(key.as_str())?;
        }
    }
    write.commit()?;
    records.sort_by_key(|r| r.submitted_unix_ms);
    Ok(records)
}

/// Writing JSON into a `Vec` fails only for maps with non-string keys, which neither a
/// job record nor a workflow has.
const SERIALIZES: &str = "a job record or workflow serializes to JSON";

fn commit_group(db: &Database, records: &mut [Box<JobRecord>]) -> Result<(), redb::Error> {
    // Only a job's newest record in the group is written; the workflow comes from
    // whichever record carried it.
    let mut newest: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, record) in records.iter().enumerate() {
        newest.insert(record.job_id.as_str(), i);
    }
    let newest: std::collections::HashSet<usize> = newest.into_values().collect();
    let write = db.begin_write()?;
    {
        let mut jobs = write.open_table(JOBS)?;
        let mut workflows = write.open_table(WORKFLOWS)?;
        let mut bytes = Vec::with_capacity(512);
        for (i, record) in records.iter_mut().enumerate() {
            if let Some(workflow) = record.workflow.take()
                && !record.state.is_final()
            {
                bytes.clear();
                serde_json::to_writer(&mut bytes, &workflow).expect(SERIALIZES);
                workflows.insert(record.job_id.as_str(), bytes.as_slice())?;
            }
            if !newest.contains(&i) {
                continue;
            }
            if record.state.is_final() {
                workflows.remove(record.job_id.as_str())?;
            }
            bytes.clear();
            serde_json::to_writer(&mut bytes, &**record).expect(SERIALIZES);
            jobs.insert(record.job_id.as_str(), bytes.as_slice())?;
        }
    }
    Ok(write.commit()?)
}

fn journal_worker(db: Database, rx: Receiver<JournalOp>, path: PathBuf) {
    let mut records: Vec<Box<JobRecord>> = Vec::new();
    let mut acks: Vec<JournalAck> = Vec::new();
    let mut flushes = Vec::new();
    let mut linger_until: Option<Instant> = None;
    let mut last_commit = Instant::now() - MIN_COMMIT_INTERVAL;
    loop {
        let (op, closed) = match linger_until {
            None => match rx.recv() {
                Ok(op) => (Some(op), false),
                Err(_) => (None, true),
            },
            Some(until) => match rx.recv_deadline(until) {
                Ok(op) => (Some(op), false),
                Err(RecvTimeoutError::Timeout) => (None, false),
                Err(RecvTimeoutError::Disconnected) => (None, true),
            },
        };
        let mut next = op;
        while let Some(op) = next {
            match op {
                JournalOp::Put(record, ack) => {
                    records.push(record);
                    acks.extend(ack);
                }
                JournalOp::Flush(done) => flushes.push(done),
            }
            next = if records.len() < MAX_GROUP {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        let now = Instant::now();
        let full = records.len() >= MAX_GROUP;
        let awaited = !acks.is_empty() || !flushes.is_empty();
        if !closed && !full && !records.is_empty() {
            let until = if awaited {
                (last_commit + MIN_COMMIT_INTERVAL).min(linger_until.unwrap_or(now + LINGER))
            } else {
                *linger_until.get_or_insert(now + LINGER)
            };
            if now < until {
                linger_until = Some(until);
                continue;
            }
        }
        last_commit = now;
        linger_until = None;
        let result = if records.is_empty() {
            Ok(())
        } else {
            commit_group(&db, &mut records)
        };
        if let Err(reason) = &result {
            tracing::error!(path = %path.display(), %reason, "journal commit failed");
        }
        records.clear();
        for ack in acks.drain(..) {
            ack(result
                .as_ref()
                .map(|_| ())
                .map_err(|e| SchedulerError::Journal {
                    path: path.clone(),
                    reason: e.to_string(),
                }));
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
        if closed {
            break;
        }
    }
}
