//! The output cache: node outputs keyed by class, literal inputs and the keys of the inputs,
//! so an unchanged sub-graph is reused across jobs. Bounded by entries and bytes, LRU.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;
use parking_lot::Mutex;
use serde::Deserialize;

use sakuga_nodes::Value;

/// Bounds of the output cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct OutputCacheConfig {
    pub max_entries: usize,
    pub max_bytes: usize,
}

impl Default for OutputCacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 4096,
            max_bytes: 1 << 30,
        }
    }
}

/// Outputs of one node execution.
pub type Outputs = Arc<[Value]>;

struct Inner {
    entries: LruCache<u64, (Outputs, usize)>,
    bytes: usize,
}

/// A bounded LRU of node outputs.
pub struct OutputCache {
    config: OutputCacheConfig,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for OutputCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputCache")
            .field("config", &self.config)
            .field("hits", &self.hits)
            .field("misses", &self.misses)
            .finish_non_exhaustive()
    }
}

impl OutputCache {
    /// An empty cache with the given bounds.
    pub fn new(config: OutputCacheConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner {
                entries: LruCache::unbounded(),
                bytes: 0,
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The outputs stored under `key`, marking them recently used.
    pub fn get(&self, key: u64) -> Option<Outputs> {
        let found = self.inner.lock().entries.get(&key).map(|(v, _)| v.clone());
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Stores outputs under `key`, evicting least recently used entries over the bounds.
    /// Outputs larger than the whole byte budget are not stored.
    pub fn insert(&self, key: u64, outputs: Outputs) {
        let size: usize = outputs.iter().map(Value::approx_bytes).sum();
        if size > self.config.max_bytes || self.config.max_entries == 0 {
            return;
        }
        let mut inner = self.inner.lock();
        if let Some((_, old)) = inner.entries.put(key, (outputs, size)) {
            inner.bytes -= old;
        }
        inner.bytes += size;
        while inner.entries.len() > self.config.max_entries || inner.bytes > self.config.max_bytes {
            match inner.entries.pop_lru() {
                Some((_, (_, evicted))) => inner.bytes -= evicted,
                None => break,
            }
        }
    }

    /// `(hits, misses)` since start.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// `(entries, bytes)` held now.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.entries.len(), inner.bytes)
    }

    /// Drops every entry (models reloaded, config changed).
    pub fn clear(&self) {
        let mut inner = self.inner.lock();
        inner.entries.clear();
        inner.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outputs(n: i64) -> Outputs {
        Arc::from(vec![Value::Int(n)])
    }

    #[test]
    fn evicts_least_recently_used_over_the_entry_bound() {
        let cache = OutputCache::new(OutputCacheConfig {
            max_entries: 2,
            max_bytes: 1 << 20,
        });
        cache.insert(1, outputs(1));
        cache.insert(2, outputs(2));
        assert!(cache.get(1).is_some()); // 1 is now the most recent
        cache.insert(3, outputs(3));
        assert!(cache.get(2).is_none());
        assert!(cache.get(1).is_some() && cache.get(3).is_some());
        assert_eq!(cache.stats(), (3, 1));
    }

    #[test]
    fn respects_the_byte_bound() {
        let cache = OutputCache::new(OutputCacheConfig {
            max_entries: 100,
            max_bytes: 40,
        });
        for k in 0..10 {
            cache.insert(k, outputs(k as i64)); // 16 bytes each
        }
        let (entries, bytes) = cache.usage();
        assert_eq!(entries, 2);
        assert!(bytes <= 40);
    }
}
