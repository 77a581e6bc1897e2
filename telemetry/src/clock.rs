//! Time sources for the rolling windows and SLO rings.
//!
//! Windows are keyed by "time since an origin" rather than `Instant`, so tests can drive a
//! [`ManualClock`] forward minutes at a time without sleeping, and a saved snapshot's times
//! are plain numbers.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A monotonic source of "time since origin".
pub trait Clock: Send + Sync + Debug {
    /// Time elapsed since this clock's origin.
    fn now(&self) -> Duration;
}

/// Real time, from the moment the clock was created.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        MonotonicClock {
            origin: Instant::now(),
        }
    }

    /// Converts an `Instant` taken by the caller into this clock's time (0 if before origin).
    pub fn at(&self, instant: Instant) -> Duration {
        instant.saturating_duration_since(self.origin)
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that only moves when told to; for tests and replays.
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    /// Starts at `start`.
    pub fn new(start: Duration) -> Self {
        ManualClock {
            nanos: AtomicU64::new(start.as_nanos() as u64),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.nanos
            .fetch_add(by.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Sets the clock to `to` (it may go backwards; windows ignore stale records).
    pub fn set(&self, to: Duration) {
        self.nanos.store(to.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(Duration::from_secs(10));
        assert_eq!(clock.now(), Duration::from_secs(10));
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now(), Duration::from_millis(11_500));
        clock.set(Duration::ZERO);
        assert_eq!(clock.now(), Duration::ZERO);
    }
}
