//! Names the engine mints: job ids and the hash of the configuration in force.

use std::time::SystemTime;

use crate::journal::unix_ms;

/// A fresh job id: 16 hex digits that sort by submission time, unique per process and
/// across restarts: the Unix time in milliseconds shifted left by 20 bits, bumped past the
/// last id handed out. Ordered ids keep the journal's B-tree appending at its right edge,
/// so a group commit dirties a few pages instead of one per job (random ids did).
pub(crate) fn new_job_id() -> String {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = unix_ms(SystemTime::now()) << 20;
    let previous = LAST
        .fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |last| Some(now.max(last + 1)),
        )
        .unwrap_or_default();
    format!("{:016x}", now.max(previous + 1))
}

/// A job id unique across a fleet of processes minting at once (cluster gateways): a
/// [`new_job_id`], so ids still sort by time, then a random tag fixed per process.
pub(crate) fn new_fleet_job_id() -> String {
    static TAG: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let tag = TAG.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS per process.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.finish() as u32
    });
    format!("{}{tag:08x}", new_job_id())
}

/// Hash of the tunables and signals config in force, for `sakuga_config_generation{config_hash}`.
pub fn config_hash(
    tunables: &crate::engine::EngineTunables,
    signals: &sakuga_telemetry::SignalsConfig,
) -> String {
    let text = serde_json::to_string(&(tunables, signals)).unwrap_or_default();
    // FNV-1a: stable across processes, unlike the std hasher's random seed.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_ids_extend_local_ids_with_a_process_tag() {
        let a = new_fleet_job_id();
        let b = new_fleet_job_id();
        assert_eq!(a.len(), 24);
        assert!(a < b, "fleet ids still sort by time: {a} {b}");
        assert_eq!(a[16..], b[16..], "one tag per process");
    }

    #[test]
    fn job_ids_are_sixteen_hex_digits_that_sort_in_submission_order() {
        let ids: Vec<String> = (0..10_000).map(|_| new_job_id()).collect();
        assert!(
            ids.iter()
                .all(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        );
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "strictly increasing, so unique"
        );
        let first_ms = u64::from_str_radix(&ids[0], 16).unwrap() >> 20;
        let now_ms = unix_ms(SystemTime::now());
        assert!(now_ms.abs_diff(first_ms) < 60_000, "carries the wall clock");
    }
}
