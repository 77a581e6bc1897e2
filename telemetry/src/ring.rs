//! A ring of fixed-length time slots: the storage under the rolling windows and SLO rings.
//!
//! Slot `n` covers `[n * slot_len, (n + 1) * slot_len)`; it lives at index `n % len` and
//! remembers `n`, so a slot left over from an earlier lap is cleared the first time it is
//! written again and skipped when read. Each slot has its own short mutex: writers to
//! different slots never meet, a write is O(1) and allocates nothing, and a reader locks
//! one slot at a time.

use std::time::Duration;

use parking_lot::Mutex;

/// Slot contents: plain data that can be cleared and summed.
pub trait SlotData: Default + Send {
    /// Adds `other` into `self` (used when reading a window).
    fn merge(&mut self, other: &Self);
}

#[derive(Debug)]
struct Slot<T> {
    /// Slot number + 1; 0 means never written.
    tag: u64,
    data: T,
}

/// Fixed-length ring of time slots.
#[derive(Debug)]
pub struct SlotRing<T> {
    slot_nanos: u64,
    slots: Box<[Mutex<Slot<T>>]>,
}

impl<T: SlotData> SlotRing<T> {
    /// A ring of `len` slots of `slot_len` each (it remembers `len * slot_len`).
    ///
    /// # Panics
    /// When `len` is 0 or `slot_len` is zero.
    pub fn new(slot_len: Duration, len: usize) -> Self {
        assert!(len > 0 && !slot_len.is_zero(), "a slot ring needs slots");
        let slots = (0..len)
            .map(|_| {
                Mutex::new(Slot {
                    tag: 0,
                    data: T::default(),
                })
            })
            .collect();
        SlotRing {
            slot_nanos: slot_len.as_nanos() as u64,
            slots,
        }
    }

    /// Length of one slot.
    pub fn slot_len(&self) -> Duration {
        Duration::from_nanos(self.slot_nanos)
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the ring has no slots (never: `new` refuses that).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The slot number holding time `at`.
    pub fn slot_number(&self, at: Duration) -> u64 {
        at.as_nanos() as u64 / self.slot_nanos
    }

    /// Start time of slot number `n`.
    pub fn slot_start(&self, n: u64) -> Duration {
        Duration::from_nanos(n.saturating_mul(self.slot_nanos))
    }

    /// Applies `write` to the slot covering `at`. Records older than the ring remembers
    /// are dropped (returns `false`).
    #[inline]
    pub fn record(&self, at: Duration, write: impl FnOnce(&mut T)) -> bool {
        let n = self.slot_number(at);
        let len = self.slots.len() as u64;
        let mut slot = self.slots[(n % len) as usize].lock();
        if slot.tag != n + 1 {
            if slot.tag > n + 1 {
                return false;
            }
            slot.tag = n + 1;
            slot.data = T::default();
        }
        write(&mut slot.data);
        true
    }

    /// Sums the last `count` slots up to and including the one covering `now`.
    pub fn sum_recent(&self, now: Duration, count: usize) -> T {
        let mut total = T::default();
        self.for_each_recent(now, count, |_, data| total.merge(data));
        total
    }

    /// Visits the last `count` slots (oldest first) that hold data of this lap, with their
    /// slot number.
    pub fn for_each_recent(&self, now: Duration, count: usize, visit: impl FnMut(u64, &T)) {
        self.for_each_ending_at(self.slot_number(now), count, visit);
    }

    /// Sums `count` slots ending with slot number `newest` (inclusive).
    pub fn sum_ending_at(&self, newest: u64, count: usize) -> T {
        let mut total = T::default();
        self.for_each_ending_at(newest, count, |_, data| total.merge(data));
        total
    }

    fn for_each_ending_at(&self, newest: u64, count: usize, mut visit: impl FnMut(u64, &T)) {
        let count = count.min(self.slots.len()) as u64;
        let oldest = (newest + 1).saturating_sub(count);
        let len = self.slots.len() as u64;
        for n in oldest..=newest {
            let slot = self.slots[(n % len) as usize].lock();
            if slot.tag == n + 1 {
                visit(n, &slot.data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Clone, PartialEq)]
    struct Count(u64);

    impl SlotData for Count {
        fn merge(&mut self, other: &Self) {
            self.0 += other.0;
        }
    }

    #[test]
    fn sums_only_the_requested_recent_slots() {
        let ring = SlotRing::<Count>::new(Duration::from_secs(1), 10);
        for s in 0..10 {
            ring.record(Duration::from_secs(s), |c| c.0 += s);
        }
        let now = Duration::from_millis(9_500);
        assert_eq!(ring.sum_recent(now, 3).0, 9 + 8 + 7);
        assert_eq!(ring.sum_recent(now, 100).0, (0..10).sum::<u64>());
    }

    #[test]
    fn old_laps_are_cleared_and_stale_writes_dropped() {
        let ring = SlotRing::<Count>::new(Duration::from_secs(1), 4);
        ring.record(Duration::from_secs(1), |c| c.0 += 5);
        // Slot 5 reuses slot 1's index: the old 5 must not leak into it.
        assert!(ring.record(Duration::from_secs(5), |c| c.0 += 1));
        assert_eq!(ring.sum_recent(Duration::from_secs(5), 4).0, 1);
        // A write for slot 1 now is older than the ring remembers.
        assert!(!ring.record(Duration::from_secs(1), |c| c.0 += 100));
        assert_eq!(ring.sum_recent(Duration::from_secs(5), 4).0, 1);
    }

    #[test]
    fn slots_skipped_in_time_read_as_empty() {
        let ring = SlotRing::<Count>::new(Duration::from_secs(1), 4);
        ring.record(Duration::from_secs(0), |c| c.0 += 7);
        // Ten seconds later, slot 0's data is from an old lap and outside any window.
        assert_eq!(ring.sum_recent(Duration::from_secs(10), 4).0, 0);
    }
}
