//! The job queue's ordering: animation before single images before batch, smaller jobs
//! first inside a class, and aging so a long wait eventually wins. Pure data (no threads,
//! no clock of its own) so the engine's queue worker owns it and tests drive it directly.
//!
//! Each entry's score is `class offset + expected seconds - aging * seconds waited -
//! client priority`; the lowest score starts first, ties by arrival. Scores change with
//! time, so [`JobQueue::pick`] scans; the per-workload caps keep the scan short.

use std::collections::HashMap;
use std::time::Duration;

use sakuga_telemetry::{AdmissionReason, Workload};

use crate::admission::{AdmissionConfig, StartVerdict};

/// One queued job as the queue sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueEntry {
    pub job_id: String,
    pub workload: Workload,
    /// Expected seconds of work.
    pub cost_s: f64,
    /// Client priority: higher starts earlier within the aging rules (clamped to ±100).
    pub priority: i32,
    /// When it was queued, on the engine's clock.
    pub enqueued_at: Duration,
    seq: u64,
}

/// Result of [`JobQueue::pick`].
#[derive(Debug, Clone, PartialEq)]
pub struct Picked {
    /// The job to start now, removed from the queue.
    pub started: Option<QueueEntry>,
    /// Jobs that ranked ahead of it (or would have started) but were deferred, and why.
    pub deferred: Vec<(String, AdmissionReason)>,
}

/// Queued jobs across all workloads.
#[derive(Debug, Default)]
pub struct JobQueue {
    entries: Vec<QueueEntry>,
    positions: HashMap<String, usize>,
    per_workload: [usize; 3],
    next_seq: u64,
}

impl JobQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a job.
    pub fn push(
        &mut self,
        job_id: String,
        workload: Workload,
        cost_s: f64,
        priority: i32,
        now: Duration,
    ) {
        let entry = QueueEntry {
            job_id: job_id.clone(),
            workload,
            cost_s,
            priority: priority.clamp(-100, 100),
            enqueued_at: now,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.positions.insert(job_id, self.entries.len());
        self.entries.push(entry);
        self.per_workload[workload.index()] += 1;
    }

    /// Removes a job (cancelled, expired); `None` when it is not queued.
    pub fn remove(&mut self, job_id: &str) -> Option<QueueEntry> {
        let at = self.positions.remove(job_id)?;
        let entry = self.entries.swap_remove(at);
        if let Some(moved) = self.entries.get(at) {
            self.positions.insert(moved.job_id.clone(), at);
        }
        self.per_workload[entry.workload.index()] -= 1;
        Some(entry)
    }

    /// Whether `job_id` is queued.
    pub fn contains(&self, job_id: &str) -> bool {
        self.positions.contains_key(job_id)
    }

    /// Queued jobs in all workloads.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Queued jobs of one workload.
    pub fn len_of(&self, workload: Workload) -> usize {
        self.per_workload[workload.index()]
    }

    /// Expected seconds of all queued work.
    pub fn total_cost_s(&self) -> f64 {
        self.entries.iter().map(|e| e.cost_s).sum()
    }

    /// Every queued entry, unordered.
    pub fn entries(&self) -> &[QueueEntry] {
        &self.entries
    }

    fn score(entry: &QueueEntry, now: Duration, config: &AdmissionConfig) -> f64 {
        let waited = now.saturating_sub(entry.enqueued_at).as_secs_f64();
        config.class_offset_s.get(entry.workload) + entry.cost_s
            - config.aging_per_s * waited
            - f64::from(entry.priority)
    }

    fn rank_order(&self, now: Duration, config: &AdmissionConfig) -> Vec<(f64, u64, usize)> {
        let mut ranked: Vec<(f64, u64, usize)> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (Self::score(e, now, config), e.seq, i))
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        ranked
    }

    /// 1-based position `job_id` would start at if nothing changed; `None` when not queued.
    pub fn position(&self, job_id: &str, now: Duration, config: &AdmissionConfig) -> Option<usize> {
        let at = *self.positions.get(job_id)?;
        let mine = Self::score(&self.entries[at], now, config);
        let seq = self.entries[at].seq;
        let ahead = self
            .entries
            .iter()
            .filter(|e| {
                let s = Self::score(e, now, config);
                s < mine || (s == mine && e.seq < seq)
            })
            .count();
        Some(ahead + 1)
    }

    /// Expected seconds of queued work that ranks ahead of a new job of `workload` and
    /// `cost_s` submitted now.
    pub fn work_ahead_s(
        &self,
        workload: Workload,
        cost_s: f64,
        priority: i32,
        now: Duration,
        config: &AdmissionConfig,
    ) -> f64 {
        let mine =
            config.class_offset_s.get(workload) + cost_s - f64::from(priority.clamp(-100, 100));
        self.entries
            .iter()
            .filter(|e| Self::score(e, now, config) <= mine)
            .map(|e| e.cost_s)
            .sum()
    }

    /// Takes the best-ranked job that `can_start` lets start; jobs ranked ahead of it that
    /// were deferred stay queued and are reported.
    pub fn pick(
        &mut self,
        now: Duration,
        config: &AdmissionConfig,
        mut can_start: impl FnMut(&QueueEntry) -> StartVerdict,
    ) -> Picked {
        let mut deferred = Vec::new();
        for (_, _, i) in self.rank_order(now, config) {
            match can_start(&self.entries[i]) {
                StartVerdict::Start => {
                    let id = self.entries[i].job_id.clone();
                    let started = self.remove(&id);
                    return Picked { started, deferred };
                }
                StartVerdict::Defer(reason) => {
                    deferred.push((self.entries[i].job_id.clone(), reason))
                }
            }
        }
        Picked {
            started: None,
            deferred,
        }
    }

    /// Jobs the filter selects, removed (expired deadlines).
    pub fn drain_where(&mut self, mut select: impl FnMut(&QueueEntry) -> bool) -> Vec<QueueEntry> {
        let ids: Vec<String> = self
            .entries
            .iter()
            .filter(|e| select(e))
            .map(|e| e.job_id.clone())
            .collect();
        ids.iter().filter_map(|id| self.remove(id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start_all(_: &QueueEntry) -> StartVerdict {
        StartVerdict::Start
    }

    fn order(q: &mut JobQueue, now: Duration, config: &AdmissionConfig) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(e) = q.pick(now, config, start_all).started {
            out.push(e.job_id);
        }
        out
    }

    #[test]
    fn classes_go_in_priority_order_and_small_jobs_first_inside_a_class() {
        let config = AdmissionConfig::default();
        let mut q = JobQueue::new();
        let t = Duration::ZERO;
        q.push("batch".into(), Workload::Batch, 0.1, 0, t);
        q.push("single-big".into(), Workload::SingleImage, 10.0, 0, t);
        q.push("single-small".into(), Workload::SingleImage, 1.0, 0, t);
        q.push("anim".into(), Workload::Animation, 5.0, 0, t);
        assert_eq!(q.len_of(Workload::SingleImage), 2);
        assert_eq!(q.position("anim", t, &config), Some(1));
        assert_eq!(
            order(&mut q, t, &config),
            ["anim", "single-small", "single-big", "batch"]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn aging_lets_an_old_batch_job_overtake_fresh_single_images() {
        let config = AdmissionConfig::default();
        let mut q = JobQueue::new();
        q.push("old-batch".into(), Workload::Batch, 1.0, 0, Duration::ZERO);
        let later = Duration::from_secs(200);
        q.push("fresh-single".into(), Workload::SingleImage, 1.0, 0, later);
        assert_eq!(order(&mut q, later, &config), ["old-batch", "fresh-single"]);
    }

    #[test]
    fn deferred_jobs_stay_queued_and_the_next_one_starts() {
        let config = AdmissionConfig::default();
        let mut q = JobQueue::new();
        q.push("anim".into(), Workload::Animation, 1.0, 0, Duration::ZERO);
        q.push("batch".into(), Workload::Batch, 1.0, 0, Duration::ZERO);
        let picked = q.pick(Duration::ZERO, &config, |e| {
            if e.workload == Workload::Animation {
                StartVerdict::Defer(AdmissionReason::MemoryHeadroom)
            } else {
                StartVerdict::Start
            }
        });
        assert_eq!(picked.started.map(|e| e.job_id).as_deref(), Some("batch"));
        assert_eq!(
            picked.deferred,
            vec![("anim".to_string(), AdmissionReason::MemoryHeadroom)]
        );
        assert!(q.contains("anim"));
    }

    #[test]
    fn remove_keeps_positions_consistent() {
        let mut q = JobQueue::new();
        for i in 0..5 {
            q.push(format!("j{i}"), Workload::Batch, 1.0, 0, Duration::ZERO);
        }
        assert!(q.remove("j1").is_some());
        assert!(q.remove("j1").is_none());
        assert!(q.remove("j4").is_some());
        assert_eq!(q.len(), 3);
        for id in ["j0", "j2", "j3"] {
            assert!(q.remove(id).is_some(), "{id}");
        }
        assert_eq!(q.len_of(Workload::Batch), 0);
    }
}
