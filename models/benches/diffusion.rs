//! Demo txt2img latency per stage: checkpoint load, prompt encode, one sampler step (CFG,
//! batch 1), VAE decode, and a model cache hit versus a miss.
//!
//! Run with `cargo bench -p sakuga-models --bench diffusion`.

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device};
use criterion::{Criterion, criterion_group, criterion_main};
use sakuga_models::cache::{ModelCache, ModelKind};
use sakuga_models::demo::{DEMO_CHECKPOINT, write_demo_models};
use sakuga_models::diffusion::keymap::Part;
use sakuga_models::diffusion::{
    Checkpoint, ClipModel, Denoiser, GuidedDenoiser, NoiseRng, UnetModel, VaeModel, empty_latent,
};

/// The demo checkpoint's three parts, loaded from disk.
fn load(path: &std::path::Path, device: &Device) -> (UnetModel, ClipModel, VaeModel) {
    let checkpoint = Checkpoint::open(path).expect("open");
    let unet = checkpoint.load_unet(&[], device, DType::F32).expect("unet");
    let clip = checkpoint.load_clip(&[], device, DType::F32).expect("clip");
    let vae = checkpoint.load_vae(device, DType::F32).expect("vae");
    (unet, clip, vae)
}

fn stages(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    write_demo_models(dir.path()).expect("demo models");
    let path = dir.path().join("checkpoints").join(DEMO_CHECKPOINT);
    let device = Device::Cpu;

    let mut group = c.benchmark_group("demo_txt2img");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));

    group.bench_function("load_checkpoint", |b| {
        b.iter(|| black_box(load(&path, &device)))
    });

    let (unet, clip, vae) = load(&path, &device);
    let checkpoint = Checkpoint::open(&path).expect("open");

    group.bench_function("encode_prompt", |b| {
        b.iter(|| {
            black_box(
                clip.encode("1girl, anime style, cherry blossoms")
                    .expect("encode"),
            )
        })
    });

    let positive = clip.condition("1girl, anime style").expect("encode");
    let negative = clip.condition("lowres").expect("encode");
    let denoiser = GuidedDenoiser::new(
        &unet,
        std::slice::from_ref(&positive),
        std::slice::from_ref(&negative),
        7.0,
        (8, 8),
    )
    .expect("denoiser");
    for size in [64usize, 256] {
        let latent = empty_latent(size, size, 1, 8, &device).expect("latent");
        let noisy = NoiseRng::new(1, 0)
            .tensor(latent.dims(), DType::F32, &device)
            .expect("noise");
        group.bench_function(format!("sampler_step_cfg_{size}x{size}"), |b| {
            b.iter(|| black_box(denoiser.denoise(&noisy, 5.0).expect("step")))
        });
        group.bench_function(format!("vae_decode_{size}x{size}"), |b| {
            b.iter(|| black_box(vae.decode(&noisy).expect("decode")))
        });
    }

    let unet_bytes = checkpoint.part_bytes(Part::Unet, DType::F32);
    let cache = ModelCache::new(unet_bytes * 4, "cpu");
    let load = || {
        checkpoint
            .load_unet(&[], &device, DType::F32)
            .map(|u| (u, unet_bytes))
    };
    cache
        .get_or_load::<UnetModel, _>("demo/unet", ModelKind::Checkpoint, load)
        .expect("warm");
    group.bench_function("cache_hit_unet", |b| {
        b.iter(|| {
            black_box(
                cache
                    .get_or_load::<UnetModel, _>("demo/unet", ModelKind::Checkpoint, load)
                    .expect("hit"),
            )
        })
    });
    group.bench_function("cache_miss_unet", |b| {
        b.iter(|| {
            cache.remove("demo/unet");
            black_box(
                cache
                    .get_or_load::<UnetModel, _>("demo/unet", ModelKind::Checkpoint, load)
                    .expect("miss"),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
