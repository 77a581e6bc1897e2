//! Upscaling benchmarks: Real-ESRGAN animevideov3 x4 on a 256x256 frame, and one of its
//! 64-channel 3x3 conv layers through sakuga's fast CPU conv vs candle's stock conv2d.
//!
//! Run with `cargo bench -p sakuga-models --bench upscale`. `scripts/bench_ncnn.py`
//! times the same network in ncnn for comparison: it starts this bench with
//! `SAKUGA_BENCH_STDIO=1`, which skips criterion and instead answers each `run` line on
//! stdin with one timed upscale (milliseconds) on stdout, so the script can interleave
//! sakuga and ncnn runs and compare medians taken under the same machine load.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor};
use criterion::{Criterion, Throughput, criterion_group};
use sakuga_models::conv::{Activation, FusedConv2d};
use sakuga_models::upscale::{TileConfig, Upscaler};

fn animevideov3() -> Upscaler {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/models/upscale_models/realesr-animevideov3-x4.param");
    Upscaler::load(&path, &Device::Cpu).expect("shipped animevideov3 weights load")
}

fn frame(side: usize) -> Tensor {
    // Smooth deterministic content; conv speed does not depend on values.
    Tensor::arange(0u32, (side * side * 3) as u32, &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| (t * 0.001)?.sin()?.affine(0.5, 0.5))
        .and_then(|t| t.reshape((1, side, side, 3)))
        .expect("frame tensor")
}

fn bench_srvgg(c: &mut Criterion) {
    let upscaler = animevideov3();
    let image = frame(256);
    let mut group = c.benchmark_group("srvgg_x4");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    group.bench_function("animevideov3_256x256", |b| {
        b.iter(|| {
            upscaler
                .upscale(&image, TileConfig::untiled())
                .expect("upscale")
        })
    });
    group.finish();
}

fn bench_conv(c: &mut Criterion) {
    let (channels, side) = (64usize, 256usize);
    let x = Tensor::randn(0f32, 1.0, (1, channels, side, side), &Device::Cpu).expect("input");
    let w = Tensor::randn(0f32, 0.05, (channels, channels, 3, 3), &Device::Cpu).expect("weight");
    let slopes = Tensor::full(0.25f32, channels, &Device::Cpu).expect("slopes");
    let conv = FusedConv2d::try_new(w, None, 1, 1, Activation::PRelu(slopes)).expect("conv");
    let flops = 2 * channels * channels * 9 * side * side;
    let mut group = c.benchmark_group("conv3x3_64ch_256x256");
    group
        .sample_size(10)
        .throughput(Throughput::Elements(flops as u64));
    group.bench_function("sakuga_fused", |b| {
        b.iter(|| conv.forward(&x).expect("fast conv"))
    });
    group.bench_function("candle_conv2d", |b| {
        b.iter(|| conv.forward_reference(&x).expect("candle conv"))
    });
    group.finish();
}

criterion_group!(benches, bench_conv, bench_srvgg);

/// The line protocol `scripts/bench_ncnn.py` drives: `ready` once warmed up, then one
/// elapsed-milliseconds line per `run` line read.
fn stdio_protocol() {
    let side: usize = std::env::var("SAKUGA_BENCH_SIDE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let upscaler = animevideov3();
    let image = frame(side);
    upscaler
        .upscale(&image, TileConfig::untiled())
        .expect("warm-up upscale");
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready").expect("stdout");
    stdout.flush().expect("stdout");
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        if line.trim() != "run" {
            break;
        }
        let started = Instant::now();
        upscaler
            .upscale(&image, TileConfig::untiled())
            .expect("upscale");
        writeln!(stdout, "{:.3}", started.elapsed().as_secs_f64() * 1e3).expect("stdout");
        stdout.flush().expect("stdout");
    }
}

fn main() {
    if std::env::var_os("SAKUGA_BENCH_STDIO").is_some() {
        stdio_protocol();
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
