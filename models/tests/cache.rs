//! Public API tests of the model cache: LRU eviction under a byte budget and the counters
//! that show it, with plain values and with the demo checkpoint's real parts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device};
use sakuga_models::ModelError;
use sakuga_models::cache::{ModelCache, ModelKind};
use sakuga_models::demo::{DEMO_CHECKPOINT, write_demo_models};
use sakuga_models::diffusion::keymap::Part;
use sakuga_models::diffusion::{Checkpoint, VaeModel};
use sakuga_models::store::{ModelFolder, ModelStore};

#[test]
fn budget_smaller_than_two_models_evicts_and_reloads() {
    let cache = ModelCache::new(150, "cpu");
    let loads = AtomicUsize::new(0);
    let load = |value: &'static str| {
        loads.fetch_add(1, Ordering::SeqCst);
        Ok((value.to_string(), 100))
    };
    let a: Arc<String> = cache
        .get_or_load("a", ModelKind::Checkpoint, || load("A"))
        .unwrap();
    assert_eq!(*a, "A");
    let again: Arc<String> = cache
        .get_or_load("a", ModelKind::Checkpoint, || load("A"))
        .unwrap();
    assert!(Arc::ptr_eq(&a, &again));
    let _b: Arc<String> = cache
        .get_or_load("b", ModelKind::Checkpoint, || load("B"))
        .unwrap();
    assert!(!cache.contains("a"), "a should have been evicted for b");
    assert!(cache.contains("b"));
    let _a2: Arc<String> = cache
        .get_or_load("a", ModelKind::Checkpoint, || load("A"))
        .unwrap();

    let stats = cache.stats();
    assert_eq!(stats.hits, 1);
    assert_eq!(stats.misses, 3);
    assert_eq!(stats.loads, 3);
    assert_eq!(stats.evictions, 2);
    assert_eq!(stats.bytes_loaded, 300);
    assert_eq!(loads.load(Ordering::SeqCst), 3);
    assert!(stats.load_time > std::time::Duration::ZERO);
    assert_eq!(cache.resident_bytes(), 100);
    assert_eq!(cache.keys(), vec!["a".to_string()]);
}

#[test]
fn least_recently_used_goes_first() {
    let cache = ModelCache::new(300, "cpu");
    for key in ["a", "b", "c"] {
        let _: Arc<u32> = cache
            .get_or_load(key, ModelKind::Vae, || Ok((1u32, 100)))
            .unwrap();
    }
    // Touch "a" so "b" is now the oldest.
    let _: Option<Arc<u32>> = cache.get("a");
    let _: Arc<u32> = cache
        .get_or_load("d", ModelKind::Vae, || Ok((4u32, 100)))
        .unwrap();
    assert!(cache.contains("a") && cache.contains("c") && cache.contains("d"));
    assert!(!cache.contains("b"));
}

#[test]
fn over_budget_and_wrong_type_are_errors() {
    let cache = ModelCache::new(10, "cpu");
    let err = cache
        .get_or_load::<u8, _>("huge", ModelKind::Checkpoint, || Ok((0u8, 11)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::OverBudget {
                needed: 11,
                budget: 10,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.kind(), Some(sakuga_telemetry::ErrorKind::Oom));
    let _: Arc<u8> = cache
        .get_or_load("k", ModelKind::Lora, || Ok((1u8, 1)))
        .unwrap();
    let err = cache
        .get_or_load::<String, _>("k", ModelKind::Lora, || Ok((String::new(), 1)))
        .unwrap_err();
    assert!(err.to_string().contains("\"k\""), "{err}");
    let failed = cache.get_or_load::<u8, _>("bad", ModelKind::Lora, || {
        Err(ModelError::InvalidInput("nope".to_string()))
    });
    assert!(failed.is_err());
    assert!(!cache.contains("bad"));
    assert!(cache.remove("k"));
    assert_eq!(cache.resident_bytes(), 0);
}

#[test]
fn demo_vae_is_cached_and_reloaded_under_a_small_budget() {
    let dir = tempfile::tempdir().unwrap();
    write_demo_models(dir.path()).unwrap();
    let store = ModelStore::new(dir.path());
    let path = store
        .resolve(ModelFolder::Checkpoints, DEMO_CHECKPOINT)
        .unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let vae_bytes = checkpoint.part_bytes(Part::Vae, DType::F32);
    let unet_bytes = checkpoint.part_bytes(Part::Unet, DType::F32);
    assert!(vae_bytes > 0 && unet_bytes > 0);
    let cache = ModelCache::new(vae_bytes.max(unet_bytes) + 1, "cpu");
    let load_vae = || {
        checkpoint
            .load_vae(&Device::Cpu, DType::F32)
            .map(|v| (v, vae_bytes))
    };
    let vae: Arc<VaeModel> = cache
        .get_or_load("demo/vae", ModelKind::Vae, load_vae)
        .unwrap();
    let _: Arc<VaeModel> = cache
        .get_or_load("demo/vae", ModelKind::Vae, load_vae)
        .unwrap();
    let _unet: Arc<sakuga_models::diffusion::UnetModel> = cache
        .get_or_load("demo/unet", ModelKind::Checkpoint, || {
            checkpoint
                .load_unet(&[], &Device::Cpu, DType::F32)
                .map(|u| (u, unet_bytes))
        })
        .unwrap();
    assert!(!cache.contains("demo/vae"));
    let _: Arc<VaeModel> = cache
        .get_or_load("demo/vae", ModelKind::Vae, load_vae)
        .unwrap();
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.loads), (1, 3, 3));
    assert!(stats.evictions >= 2);
    drop(vae);
}
