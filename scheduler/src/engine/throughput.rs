//! How fast each workload's queue really drains: the completions of the last minute, per
//! workload. `RetryInfo` is computed from it, since estimates can be far off (an animation
//! queue whose estimates said 1 s took 31 s to drain).

use std::collections::VecDeque;
use std::time::Duration;

use sakuga_telemetry::Workload;

/// How far back completions count.
const WINDOW: Duration = Duration::from_secs(60);
/// Completions remembered per workload; enough for a rate, bounded under any load.
const KEPT: usize = 512;

/// Recent completion times per workload, on the engine's monotonic clock.
#[derive(Debug, Default)]
pub(crate) struct Throughput {
    done: [VecDeque<Duration>; 3],
}

impl Throughput {
    /// Notes that a job of `workload` left the queue for good (finished, failed, cancelled).
    pub fn record(&mut self, workload: Workload, now: Duration) {
        let done = &mut self.done[workload.index()];
        if done.len() == KEPT {
            done.pop_front();
        }
        done.push_back(now);
    }

    /// Completions per second of `workload` over the last minute, once at least two
    /// completions give a rate; `None` before that.
    pub fn per_second(&mut self, workload: Workload, now: Duration) -> Option<f64> {
        let done = &mut self.done[workload.index()];
        while done
            .front()
            .is_some_and(|&t| now.saturating_sub(t) > WINDOW)
        {
            done.pop_front();
        }
        if done.len() < 2 {
            return None;
        }
        let span = now.saturating_sub(done[0]).max(Duration::from_secs(1));
        Some(done.len() as f64 / span.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counts_the_last_minute_of_one_workload() {
        let mut t = Throughput::default();
        let s = Duration::from_secs;
        assert_eq!(t.per_second(Workload::Animation, s(0)), None);
        for i in 0..10 {
            t.record(Workload::Animation, s(100 + 3 * i));
        }
        t.record(Workload::Batch, s(120));
        // Ten completions over the 30 s since the first: one every 3 s.
        let rate = t.per_second(Workload::Animation, s(130)).unwrap();
        assert!((rate - 10.0 / 30.0).abs() < 1e-9, "{rate}");
        assert_eq!(t.per_second(Workload::Batch, s(130)), None);
        // A minute later, nothing is recent.
        assert_eq!(t.per_second(Workload::Animation, s(300)), None);
    }
}
