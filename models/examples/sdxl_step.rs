//! One guided SDXL step and one VAE decode at 1024x1024 on the CPU, on a checkpoint written
//! by `write_sdxl_sized`: the per-step figure BENCHMARKS.md extrapolates a 20-step render
//! from, where a whole render does not fit the time this machine has.
//!
//!     cargo run -p sakuga-models --example sdxl_step -- CHECKPOINT
//!
//! Run it under `/usr/bin/time -v` for the peak resident memory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use sakuga_models::diffusion::Checkpoint;

fn main() -> anyhow::Result<()> {
    let path = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: sdxl_step CHECKPOINT")?,
    );
    let device = Device::Cpu;
    let started = Instant::now();
    let checkpoint = Checkpoint::open(&path)?;
    let unet = checkpoint.load_unet(&[], &device, DType::F32)?;
    println!("unet loaded in {:.1} s", started.elapsed().as_secs_f64());
    // A guided step runs the prompt and the negative as one batch of two.
    let latents = Tensor::randn(0f32, 1.0, (2, 4, 128, 128), &device)?;
    let context = Tensor::randn(0f32, 1.0, (2, 77, 2048), &device)?;
    let y = Tensor::randn(0f32, 1.0, (2, 2816), &device)?;
    let step = Instant::now();
    let eps = unet.forward(&latents, 500.0, &context, Some(&y))?;
    println!(
        "guided step (batch 2, 128x128 latent) in {:.1} s, eps {:?}",
        step.elapsed().as_secs_f64(),
        eps.dims()
    );
    drop(unet);
    let vae = checkpoint.load_vae(&device, DType::F32)?;
    let decode = Instant::now();
    let image = vae.decode(&latents.narrow(0, 0, 1)?)?;
    println!(
        "VAE decode to {:?} in {:.1} s",
        image.dims(),
        decode.elapsed().as_secs_f64()
    );
    Ok(())
}
