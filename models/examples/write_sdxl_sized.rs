//! Writes an SDXL base checkpoint at the real model's size (2.6 G UNet parameters, CLIP-L,
//! OpenCLIP-bigG, the SDXL VAE) with seeded random weights, in float16, for the CPU
//! benchmark in BENCHMARKS.md: no real weights can be fetched here, and the time and memory
//! of a step depend on the shapes, not the values.
//!
//!     cargo run --release -p sakuga-models --example write_sdxl_sized -- MODELS_DIR
//!
//! Needs about 14 GB of memory while it writes and 7 GB of disk.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;
use sakuga_models::demo::demo_checkpoint_tensors;
use sakuga_models::diffusion::SdConfig;
use sakuga_models::diffusion::config::{
    CONFIG_METADATA_KEY, ClipActivation, ClipConfig, UnetConfig, UnetLevel,
};
use sakuga_models::store::write_safetensors;

fn sdxl_base() -> SdConfig {
    let level = |channels, transformer_depth, heads| UnetLevel {
        channels,
        transformer_depth,
        heads,
    };
    let clip = |width, layers, heads, activation, projection_dim, pad_token| ClipConfig {
        vocab_size: 49408,
        width,
        layers,
        heads,
        intermediate_size: width * 4,
        max_positions: 77,
        activation,
        pad_token,
        default_stop_at_layer: -2,
        final_norm_on_hidden: false,
        projection_dim,
    };
    let mut config = SdConfig::demo_sdxl();
    config.unet = UnetConfig {
        levels: vec![
            level(320, None, 5),
            level(640, Some(2), 10),
            level(1280, Some(10), 20),
        ],
        layers_per_block: 2,
        cross_attention_dim: 2048,
        adm_in_channels: Some(2816),
        ..config.unet
    };
    config.vae.block_out_channels = vec![128, 256, 512, 512];
    config.vae.layers_per_block = 2;
    let l_pad = config.clip.pad_token;
    config.clip = clip(768, 12, 12, ClipActivation::QuickGelu, None, l_pad);
    let g_pad = config.clip_g.as_ref().map_or(l_pad, |g| g.pad_token);
    config.clip_g = Some(clip(1280, 32, 20, ClipActivation::Gelu, Some(1280), g_pad));
    config
}

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: write_sdxl_sized MODELS_DIR")?,
    );
    let config = sdxl_base();
    let mut half = BTreeMap::new();
    for (name, tensor) in demo_checkpoint_tensors(&config, 0x5d1)? {
        half.insert(name, tensor.to_dtype(DType::F16)?);
    }
    let metadata = BTreeMap::from([
        (
            CONFIG_METADATA_KEY.to_string(),
            serde_json::to_string(&config)?,
        ),
        ("format".to_string(), "pt".to_string()),
    ]);
    let path = dir
        .join("checkpoints")
        .join("sdxl-sized-random.safetensors");
    write_safetensors(&path, &half, &metadata)?;
    println!("{}", path.display());
    Ok(())
}
