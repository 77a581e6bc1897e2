//! The model cache: loaded weights kept resident under a byte budget.
//!
//! Loading a checkpoint costs seconds; keeping every model resident costs memory the device
//! does not have. [`ModelCache`] holds any loaded model (checkpoint parts, VAEs, LoRA-merged
//! weights, upscalers, interpolators) as `Arc<dyn Any + Send + Sync>` behind a string key,
//! evicts the least recently used entries when a new one would exceed the budget, and meters
//! hits, misses, load and unload time and bytes, both as Prometheus metrics (DESIGN.md
//! section 5 names) and as [`CacheStats`] for tests and the CLI summary.
//!
//! Metrics go through the telemetry crate's typed recorders, so the names and label values
//! are the contract ones.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sakuga_telemetry::labels::{CacheResult, IoOp};
use sakuga_telemetry::record;

pub use sakuga_telemetry::labels::ModelKind;

use crate::error::{ModelError, Result};

/// Counts kept by a [`ModelCache`] since it was created.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheStats {
    /// Requests answered from memory.
    pub hits: u64,
    /// Requests that had to load.
    pub misses: u64,
    /// Successful loads (a failed load counts as a miss but not a load).
    pub loads: u64,
    /// Entries dropped to make room.
    pub evictions: u64,
    /// Bytes brought in by successful loads.
    pub bytes_loaded: u64,
    /// Wall time spent in loaders.
    pub load_time: Duration,
    /// Wall time spent dropping evicted entries.
    pub unload_time: Duration,
}

struct CacheEntry {
    value: Arc<dyn Any + Send + Sync>,
    kind: ModelKind,
    bytes: u64,
    last_used: u64,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<String, CacheEntry>,
    clock: u64,
    resident_bytes: u64,
    stats: CacheStats,
}

/// Loaded models under a byte budget with least-recently-used eviction.
pub struct ModelCache {
    budget_bytes: u64,
    device_label: String,
    state: Mutex<CacheState>,
    /// Where lookups are recorded once an engine runs (metrics and the rolling windows,
    /// so `sakuga run` and `GetSignals` show the hit rate); the bare metric before that.
    signals: std::sync::OnceLock<sakuga_telemetry::Signals>,
}

impl std::fmt::Debug for ModelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.lock();
        f.debug_struct("ModelCache")
            .field("budget_bytes", &self.budget_bytes)
            .field("device", &self.device_label)
            .field("entries", &state.entries.len())
            .field("resident_bytes", &state.resident_bytes)
            .finish()
    }
}

impl ModelCache {
    /// An empty cache holding at most `budget_bytes`; `device_label` (`cpu`, `cuda:0`) labels
    /// the `sakuga_model_cache_bytes` gauge.
    pub fn new(budget_bytes: u64, device_label: impl Into<String>) -> Self {
        Self {
            budget_bytes,
            device_label: device_label.into(),
            state: Mutex::new(CacheState::default()),
            signals: std::sync::OnceLock::new(),
        }
    }

    /// Records lookups and loads through `signals` from now on (the first call wins).
    pub fn record_to(&self, signals: sakuga_telemetry::Signals) {
        let _ = self.signals.set(signals);
    }

    fn lookup(&self, kind: ModelKind, result: CacheResult) {
        match self.signals.get() {
            Some(signals) => signals.model_cache(kind, result),
            None => record::model_cache_request(kind, result),
        }
    }

    fn loaded(&self, kind: ModelKind, took: std::time::Duration) {
        match self.signals.get() {
            Some(signals) => signals.model_loaded(kind, took),
            None => record::model_loaded(kind, took),
        }
    }

    /// The byte budget.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Bytes currently resident.
    pub fn resident_bytes(&self) -> u64 {
        self.state.lock().resident_bytes
    }

    /// A copy of the counters.
    pub fn stats(&self) -> CacheStats {
        self.state.lock().stats.clone()
    }

    /// Whether `key` is resident (does not count as a use).
    pub fn contains(&self, key: &str) -> bool {
        self.state.lock().entries.contains_key(key)
    }

    /// Resident keys, most recently used first.
    pub fn keys(&self) -> Vec<String> {
        let state = self.state.lock();
        let mut keys: Vec<(&String, u64)> = state
            .entries
            .iter()
            .map(|(k, e)| (k, e.last_used))
            .collect();
        keys.sort_by_key(|&(_, last_used)| std::cmp::Reverse(last_used));
        keys.into_iter().map(|(k, _)| k.clone()).collect()
    }

    /// The resident value under `key` if it is a `T`; counts a use but not a request.
    pub fn get<T: Any + Send + Sync>(&self, key: &str) -> Option<Arc<T>> {
        let mut state = self.state.lock();
        state.clock += 1;
        let now = state.clock;
        let entry = state.entries.get_mut(key)?;
        entry.last_used = now;
        entry.value.clone().downcast::<T>().ok()
    }

    /// Returns the value under `key`, loading it with `load` on a miss.
    ///
    /// `load` returns the value and its resident size in bytes. It runs without the cache
    /// lock held, so other keys stay available while a slow load runs; if two callers load
    /// the same key at once, the first insert wins and both get that value.
    ///
    /// # Errors
    /// Whatever `load` returns; [`ModelError::OverBudget`] when the value alone exceeds the
    /// budget; [`ModelError::InvalidInput`] when `key` holds a value of another type.
    pub fn get_or_load<T, F>(&self, key: &str, kind: ModelKind, load: F) -> Result<Arc<T>>
    where
        T: Any + Send + Sync,
        F: FnOnce() -> Result<(T, u64)>,
    {
        {
            let mut state = self.state.lock();
            state.clock += 1;
            let now = state.clock;
            if let Some(entry) = state.entries.get_mut(key) {
                entry.last_used = now;
                let value = entry.value.clone();
                state.stats.hits += 1;
                drop(state);
                self.lookup(kind, CacheResult::Hit);
                return downcast_entry(key, value);
            }
            state.stats.misses += 1;
        }
        self.lookup(kind, CacheResult::Miss);

        let started = Instant::now();
        let (value, bytes) = load()?;
        let load_time = started.elapsed();
        self.loaded(kind, load_time);
        if bytes > self.budget_bytes {
            return Err(ModelError::OverBudget {
                name: key.to_string(),
                needed: bytes,
                budget: self.budget_bytes,
            });
        }
        let value: Arc<dyn Any + Send + Sync> = Arc::new(value);

        let mut evicted = Vec::new();
        let result = {
            let mut state = self.state.lock();
            state.stats.loads += 1;
            state.stats.bytes_loaded += bytes;
            state.stats.load_time += load_time;
            state.clock += 1;
            let now = state.clock;
            let stored = if let Some(existing) = state.entries.get_mut(key) {
                existing.last_used = now;
                existing.value.clone()
            } else {
                while state.resident_bytes + bytes > self.budget_bytes {
                    let Some(oldest) = state
                        .entries
                        .iter()
                        .min_by_key(|(_, e)| e.last_used)
                        .map(|(k, _)| k.clone())
                    else {
                        break;
                    };
                    if let Some(entry) = state.entries.remove(&oldest) {
                        state.resident_bytes -= entry.bytes;
                        state.stats.evictions += 1;
                        tracing::debug!(key = %oldest, kind = entry.kind.as_str(), bytes = entry.bytes, "model evicted");
                        evicted.push(entry);
                    }
                }
                state.resident_bytes += bytes;
                state.entries.insert(
                    key.to_string(),
                    CacheEntry {
                        value: value.clone(),
                        kind,
                        bytes,
                        last_used: now,
                    },
                );
                value
            };
            record::model_cache_bytes(&self.device_label, state.resident_bytes);
            stored
        };
        if !evicted.is_empty() {
            let started = Instant::now();
            drop(evicted);
            let unload_time = started.elapsed();
            self.state.lock().stats.unload_time += unload_time;
        }
        downcast_entry(key, result)
    }

    /// Drops `key` if resident; returns whether it was.
    pub fn remove(&self, key: &str) -> bool {
        let removed = {
            let mut state = self.state.lock();
            let removed = state.entries.remove(key);
            if let Some(entry) = &removed {
                state.resident_bytes -= entry.bytes;
                record::model_cache_bytes(&self.device_label, state.resident_bytes);
            }
            removed
        };
        let was_resident = removed.is_some();
        let started = Instant::now();
        drop(removed);
        self.state.lock().stats.unload_time += started.elapsed();
        was_resident
    }

    /// Drops every entry.
    pub fn clear(&self) {
        let entries = {
            let mut state = self.state.lock();
            state.resident_bytes = 0;
            record::model_cache_bytes(&self.device_label, 0);
            std::mem::take(&mut state.entries)
        };
        let started = Instant::now();
        drop(entries);
        self.state.lock().stats.unload_time += started.elapsed();
    }
}

fn downcast_entry<T: Any + Send + Sync>(
    key: &str,
    value: Arc<dyn Any + Send + Sync>,
) -> Result<Arc<T>> {
    value.downcast::<T>().map_err(|_| {
        ModelError::InvalidInput(format!(
            "model cache entry {key:?} holds a different model type than requested"
        ))
    })
}

/// Counts bytes of model weights read from the models dir.
pub(crate) fn record_model_read(bytes: u64) {
    record::io_bytes(IoOp::ModelRead, bytes);
}
