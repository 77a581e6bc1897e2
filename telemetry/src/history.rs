//! The embedded job history: one summary per finished job, plus deploy and config-change
//! markers, kept in the data dir for `sakuga report` (DESIGN.md section 13).
//!
//! Layout: `<data dir>/history/YYYY-MM-DD.jsonl`, one JSON [`HistoryEntry`] a line, one
//! file per UTC day, so retention is "delete the files older than N days" and a report
//! reads only the days it covers.
//!
//! The hot path ([`History::record`]) only hands the summary to a bounded channel
//! (`try_send`): serialising, writing and pruning happen on the `history_writer` thread.
//! When the writer falls behind by [`QUEUE_CAPACITY`] entries, summaries are dropped and
//! counted ([`History::dropped`]) rather than ever blocking a render.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TelemetryError};
use crate::labels::{ErrorKind, Outcome, Stage, Workload};

/// Default retention of the history, in days (a month plus a weekly review's margin).
pub const DEFAULT_RETENTION_DAYS: u32 = 35;
/// Summaries the writer may fall behind by before new ones are dropped.
pub const QUEUE_CAPACITY: usize = 4096;
/// The history's folder under the data dir.
pub const HISTORY_DIR: &str = "history";
const SECONDS_PER_DAY: u64 = 86_400;

/// Where and how long the history is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HistoryConfig {
    /// Keep the job history at all.
    pub enabled: bool,
    /// Days of history kept; older day files are deleted.
    pub retention_days: u32,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            enabled: true,
            retention_days: DEFAULT_RETENTION_DAYS,
        }
    }
}

/// Frames of one job's stream, as its [`crate::FrameStream`] counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FrameTotals {
    pub produced: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub duplicated: u64,
    /// Delivered frames that came later than the FPS floor allows.
    pub late: u64,
    /// Mean produced FPS from the first to the last produced frame.
    pub produced_fps: Option<f64>,
    /// Mean delivered FPS from the first to the last delivered frame.
    pub delivered_fps: Option<f64>,
}

/// One finished job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    /// Unix seconds when it finished.
    pub finished_at: f64,
    pub workload: Workload,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The settings that tell jobs of one model apart, e.g. `768x768 euler 20 steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_stage: Option<Stage>,
    /// Prompt received to final state, seconds.
    pub latency_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_wait_s: Option<f64>,
    #[serde(default)]
    pub frames: FrameTotals,
    pub config_generation: u64,
}

/// A deploy or config change: the running configuration became `generation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    /// Unix seconds of the change.
    pub at: f64,
    pub generation: u64,
    pub version: String,
    pub config_hash: String,
}

/// One line of a history file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HistoryEntry {
    Job(JobSummary),
    Marker(Marker),
}

impl HistoryEntry {
    /// Unix seconds the entry happened at.
    pub fn at(&self) -> f64 {
        match self {
            HistoryEntry::Job(job) => job.finished_at,
            HistoryEntry::Marker(marker) => marker.at,
        }
    }
}

/// Unix seconds now, as history timestamps are.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Days since 1970-01-01 as a civil (year, month, day), proleptic Gregorian.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days_from_civil inverse: eras of 400 years of 146097 days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a civil date.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` of the UTC day holding unix second `at`.
pub fn day_name(at: f64) -> String {
    let (y, m, d) = civil_from_days((at / SECONDS_PER_DAY as f64).floor() as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

fn day_of_file(path: &Path) -> Option<i64> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".jsonl")?;
    let mut parts = stem.splitn(3, '-');
    let year = parts.next()?.parse().ok()?;
    let month = parts.next()?.parse().ok()?;
    let day = parts.next()?.parse().ok()?;
    Some(days_from_civil(year, month, day))
}

/// The day files of `dir` with their day numbers, oldest first.
fn day_files(dir: &Path) -> Result<Vec<(i64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TelemetryError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut files: Vec<(i64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter_map(|p| day_of_file(&p).map(|d| (d, p)))
        .collect();
    files.sort();
    Ok(files)
}

/// Deletes the day files of `dir` older than `retention_days` before `now`; returns how
/// many it deleted.
///
/// # Errors
/// When the folder cannot be listed or a file cannot be removed.
pub fn prune(dir: &Path, retention_days: u32, now: f64) -> Result<usize> {
    let today = (now / SECONDS_PER_DAY as f64).floor() as i64;
    let oldest_kept = today - i64::from(retention_days.max(1)) + 1;
    let mut removed = 0;
    for (day, path) in day_files(dir)? {
        if day < oldest_kept {
            std::fs::remove_file(&path).map_err(|source| TelemetryError::Io { path, source })?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// What a history folder held over a time range.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryRead {
    pub jobs: Vec<JobSummary>,
    pub markers: Vec<Marker>,
    /// Day files that exist at all (in or out of the range).
    pub days_on_disk: usize,
    /// Lines that did not parse (a torn last line after a crash, for instance).
    pub bad_lines: usize,
}

/// Reads the entries of `dir` with `from <= at < to` (unix seconds), oldest first.
///
/// # Errors
/// When the folder or one of its files cannot be read.
pub fn read_range(dir: &Path, from: f64, to: f64) -> Result<HistoryRead> {
    let files = day_files(dir)?;
    let first = (from / SECONDS_PER_DAY as f64).floor() as i64;
    let last = (to / SECONDS_PER_DAY as f64).floor() as i64;
    let mut read = HistoryRead {
        days_on_disk: files.len(),
        ..HistoryRead::default()
    };
    for (_, path) in files.iter().filter(|(d, _)| (first..=last).contains(d)) {
        let io = |source| TelemetryError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        for line in BufReader::new(file).lines() {
            let line = line.map_err(io)?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<HistoryEntry>(&line) {
                Ok(entry) if (from..to).contains(&entry.at()) => match entry {
                    HistoryEntry::Job(job) => read.jobs.push(job),
                    HistoryEntry::Marker(marker) => read.markers.push(marker),
                },
                Ok(_) => {}
                Err(_) => read.bad_lines += 1,
            }
        }
    }
    read.jobs
        .sort_by(|a, b| a.finished_at.total_cmp(&b.finished_at));
    read.markers.sort_by(|a, b| a.at.total_cmp(&b.at));
    Ok(read)
}

/// The last marker before `at` (unix seconds), looking back day file by day file; the
/// report needs it to tell a deploy (new version) from a config change at the period start.
///
/// # Errors
/// When the folder or one of its files cannot be read.
pub fn last_marker_before(dir: &Path, at: f64) -> Result<Option<Marker>> {
    let last_day = (at / SECONDS_PER_DAY as f64).floor() as i64;
    for (_, path) in day_files(dir)?.iter().rev().filter(|(d, _)| *d <= last_day) {
        let file = File::open(path).map_err(|source| TelemetryError::Io {
            path: path.clone(),
            source,
        })?;
        let latest = BufReader::new(file)
            .lines()
            .map_while(std::result::Result::ok)
            .filter(|line| line.contains("\"type\":\"marker\""))
            .filter_map(|line| match serde_json::from_str(&line) {
                Ok(HistoryEntry::Marker(m)) if m.at < at => Some(m),
                _ => None,
            })
            .max_by(|a, b| a.at.total_cmp(&b.at));
        if latest.is_some() {
            return Ok(latest);
        }
    }
    Ok(None)
}

/// Appends entries to their day files at once (no writer thread); tests and tools that
/// build a history use it.
///
/// # Errors
/// When a day file cannot be opened or written.
pub fn write_entries(dir: &Path, entries: &[HistoryEntry]) -> Result<()> {
    let mut writer = DayWriter::new(dir.to_path_buf());
    for entry in entries {
        writer.append(entry)?;
    }
    writer.flush()
}

/// The open day file of the writer thread.
#[derive(Debug)]
struct DayWriter {
    dir: PathBuf,
    day: String,
    file: Option<BufWriter<File>>,
}

impl DayWriter {
    fn new(dir: PathBuf) -> Self {
        DayWriter {
            dir,
            day: String::new(),
            file: None,
        }
    }

    /// Appends one entry; returns whether it opened a new day file.
    fn append(&mut self, entry: &HistoryEntry) -> Result<bool> {
        let day = day_name(entry.at());
        let mut rolled = false;
        if self.file.is_none() || day != self.day {
            self.flush()?;
            let path = self.dir.join(format!("{day}.jsonl"));
            std::fs::create_dir_all(&self.dir).map_err(|source| TelemetryError::Io {
                path: self.dir.clone(),
                source,
            })?;
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| TelemetryError::Io { path, source })?;
            self.file = Some(BufWriter::new(file));
            self.day = day;
            rolled = true;
        }
        let path = self.path();
        let file = self.file.as_mut().expect("opened above");
        // Serialising a plain struct of numbers and strings cannot fail.
        let line = serde_json::to_string(entry).unwrap_or_default();
        writeln!(file, "{line}").map_err(|source| TelemetryError::Io { path, source })?;
        Ok(rolled)
    }

    fn path(&self) -> PathBuf {
        self.dir.join(format!("{}.jsonl", self.day))
    }

    fn flush(&mut self) -> Result<()> {
        let path = self.path();
        if let Some(file) = self.file.as_mut() {
            file.flush()
                .map_err(|source| TelemetryError::Io { path, source })?;
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Message {
    Entry(Box<HistoryEntry>),
    Flush(SyncSender<()>),
}

#[derive(Debug)]
struct Shared {
    sender: SyncSender<Message>,
    dropped: AtomicU64,
    dir: PathBuf,
}

/// The history of one data dir: a cheap clone whose [`Self::record`] never blocks.
#[derive(Debug, Clone)]
pub struct History {
    shared: Arc<Shared>,
}

impl History {
    /// Opens `<data_dir>/history`, prunes it to the retention and starts the writer thread
    /// (it stops when the last clone is dropped, after writing what it was handed).
    ///
    /// # Errors
    /// When the folder cannot be created or pruned, or the thread cannot start.
    pub fn open(data_dir: &Path, config: &HistoryConfig) -> Result<History> {
        let dir = data_dir.join(HISTORY_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| TelemetryError::Io {
            path: dir.clone(),
            source,
        })?;
        prune(&dir, config.retention_days, unix_now())?;
        let (sender, receiver) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
        let writer_dir = dir.clone();
        let retention = config.retention_days;
        std::thread::Builder::new()
            .name("history_writer".into())
            .spawn(move || history_writer(writer_dir, retention, receiver))
            .map_err(|source| TelemetryError::Io {
                path: dir.clone(),
                source,
            })?;
        Ok(History {
            shared: Arc::new(Shared {
                sender,
                dropped: AtomicU64::new(0),
                dir,
            }),
        })
    }

    /// The folder the day files are in.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Hands a finished job to the writer; drops it (and counts it) when the writer is
    /// [`QUEUE_CAPACITY`] entries behind.
    pub fn record(&self, job: JobSummary) {
        self.send(HistoryEntry::Job(job));
    }

    /// Records a deploy or config change.
    pub fn marker(&self, marker: Marker) {
        self.send(HistoryEntry::Marker(marker));
    }

    fn send(&self, entry: HistoryEntry) {
        match self.shared.sender.try_send(Message::Entry(Box::new(entry))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Entries dropped because the writer fell behind (or died).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits until everything recorded before this call is on disk, at most `timeout`;
    /// returns whether it is.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        if self.shared.sender.send(Message::Flush(done)).is_err() {
            return false;
        }
        wait.recv_timeout(timeout).is_ok()
    }
}

/// Writes entries as they come, flushing whenever the queue runs dry, and prunes old day
/// files each time a new day file is opened.
fn history_writer(dir: PathBuf, retention_days: u32, receiver: Receiver<Message>) {
    let mut writer = DayWriter::new(dir.clone());
    let report = |e: TelemetryError| tracing::warn!(error = %e, "job history write failed");
    while let Ok(message) = receiver.recv() {
        let mut pending = Some(message);
        while let Some(message) = pending.take() {
            match message {
                Message::Entry(entry) => match writer.append(&entry) {
                    Ok(true) => {
                        if let Err(e) = prune(&dir, retention_days, unix_now()) {
                            report(e);
                        }
                    }
                    Ok(false) => {}
                    Err(e) => report(e),
                },
                Message::Flush(done) => {
                    if let Err(e) = writer.flush() {
                        report(e);
                    }
                    let _ = done.send(());
                }
            }
            pending = receiver.try_recv().ok();
        }
        if let Err(e) = writer.flush() {
            report(e);
        }
    }
    if let Err(e) = writer.flush() {
        report(e);
    }
}

/// The distinct UTC days (as day numbers) of a set of unix times.
pub fn days_of(times: impl IntoIterator<Item = f64>) -> BTreeSet<i64> {
    times
        .into_iter()
        .map(|t| (t / SECONDS_PER_DAY as f64).floor() as i64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(at: f64) -> JobSummary {
        JobSummary {
            finished_at: at,
            workload: Workload::SingleImage,
            outcome: Outcome::Success,
            model: Some("sd15".into()),
            settings: None,
            error_kind: None,
            error_stage: None,
            latency_s: 1.5,
            queue_wait_s: Some(0.2),
            frames: FrameTotals::default(),
            config_generation: 1,
        }
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-1000, 0, 59, 60, 365, 11_016, 20_787, 30_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(day_name(0.0), "1970-01-01");
        assert_eq!(day_name(1_795_996_800.0), "2026-11-30");
    }

    #[test]
    fn the_writer_appends_by_day_and_reads_back_a_range() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path(), &HistoryConfig::default()).unwrap();
        let now = unix_now();
        history.record(job(now - 2.0 * 86_400.0));
        history.record(job(now - 60.0));
        history.marker(Marker {
            at: now - 30.0,
            generation: 2,
            version: "0.1.0".into(),
            config_hash: "abc".into(),
        });
        assert!(history.flush(Duration::from_secs(10)));
        let read = read_range(history.dir(), now - 86_400.0, now + 1.0).unwrap();
        assert_eq!(read.jobs.len(), 1);
        assert_eq!(read.markers.len(), 1);
        assert_eq!(
            read.days_on_disk,
            days_of([now - 2.0 * 86_400.0, now]).len()
        );
        assert_eq!(history.dropped(), 0);
    }

    #[test]
    fn pruning_keeps_the_retention_and_torn_lines_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let now = unix_now();
        let entries: Vec<HistoryEntry> = (0..10)
            .map(|d| HistoryEntry::Job(job(now - f64::from(d) * 86_400.0)))
            .collect();
        write_entries(dir.path(), &entries).unwrap();
        assert_eq!(prune(dir.path(), 3, now).unwrap(), 7);
        let today = dir.path().join(format!("{}.jsonl", day_name(now)));
        let mut file = OpenOptions::new().append(true).open(today).unwrap();
        file.write_all(b"{\"type\":\"job\",\"finish").unwrap();
        let read = read_range(dir.path(), 0.0, now + 1.0).unwrap();
        assert_eq!(
            (read.jobs.len(), read.days_on_disk, read.bad_lines),
            (3, 3, 1)
        );
    }
}
