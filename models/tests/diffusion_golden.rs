//! Golden numerics: sakuga's schedules, DDIM loop, CLIP encoder and VAE decoder against an
//! independent numpy implementation (`fixtures/diffusion/make_goldens.py`, which reads the
//! demo checkpoint by its original LDM tensor names).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sakuga_models::demo::{DEMO_CHECKPOINT, write_demo_models};
use sakuga_models::diffusion::sampler::sample;
use sakuga_models::diffusion::{
    Checkpoint, Denoiser, ModelSampling, SamplerKind, Scheduler, StepHooks,
};

fn goldens() -> serde_json::Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusion/goldens.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Writes the demo models where `make_goldens.py` expects them.
#[test]
#[ignore = "generator input for make_goldens.py, not a check"]
fn write_demo_for_goldens() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/golden-demo");
    write_demo_models(&dir).unwrap();
}

#[test]
fn schedules_match_numpy() {
    let g = goldens();
    let sampling = ModelSampling::default();
    assert!((sampling.sigma_min() - g["sigma_min"].as_f64().unwrap()).abs() < 1e-9);
    assert!((sampling.sigma_max() - g["sigma_max"].as_f64().unwrap()).abs() < 1e-9);
    for (name, expected) in g["schedules_10"].as_object().unwrap() {
        let scheduler = Scheduler::from_name(name).unwrap();
        let got = sampling.sigmas(scheduler, 10);
        let diff = max_abs_diff(&got, &floats(expected));
        eprintln!("schedule {name}: max abs diff {diff:e}");
        assert!(diff < 1e-9, "{name}: {diff}");
    }
}

/// The numpy script's stand-in for the UNet, wrapped the way `GuidedDenoiser` wraps a real
/// one: scale the input by `c_in`, evaluate at the sigma's timestep, return the denoised
/// estimate.
struct AnalyticEps(ModelSampling);

impl Denoiser for AnalyticEps {
    fn denoise(&self, x: &Tensor, sigma: f64) -> sakuga_models::Result<Tensor> {
        let t = self.0.timestep(sigma);
        let x_vp = (x / (sigma * sigma + 1.0).sqrt())?;
        let eps = ((x_vp * 0.5)? + t / 1000.0)?.tanh()?;
        Ok((x - (eps * sigma)?)?)
    }
}

#[test]
fn ddim_loop_matches_classic_vp_ddim() {
    let g = goldens();
    let case = &g["ddim_4_steps"];
    let sampling = ModelSampling::default();
    let sigmas = sampling.sigmas(Scheduler::Normal, 4);
    assert!(max_abs_diff(&sigmas, &floats(&case["sigmas"])) < 1e-9);
    let init: Vec<f64> = (0..64)
        .map(|i| (i as f64 * 0.37 + 0.1).sin() * 1.3)
        .collect();
    let x = (Tensor::from_vec(init, (1, 4, 4, 4), &Device::Cpu).unwrap() * sigmas[0]).unwrap();
    let out = sample(
        SamplerKind::Ddim,
        &AnalyticEps(sampling),
        x,
        &sigmas,
        0,
        StepHooks::none(),
    )
    .unwrap();
    let got = out.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let diff = max_abs_diff(&got, &floats(&case["final"]));
    eprintln!("ddim 4 steps: max abs diff {diff:e}");
    assert!(diff < 1e-9, "ddim differs by {diff}");
}

fn demo_checkpoint() -> (tempfile::TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    write_demo_models(dir.path()).unwrap();
    let checkpoint =
        Checkpoint::open(&dir.path().join("checkpoints").join(DEMO_CHECKPOINT)).unwrap();
    (dir, checkpoint)
}

#[test]
fn clip_encode_matches_numpy() {
    let g = goldens();
    let (_dir, checkpoint) = demo_checkpoint();
    let clip = checkpoint.load_clip(&[], &Device::Cpu, DType::F32).unwrap();
    for (key, stop) in [("clip_last_layer", -1), ("clip_skip_2", -2)] {
        let hidden = clip
            .with_stop_at_layer(stop)
            .encode("a photo of a cat")
            .unwrap();
        let tokens = g[key]["tokens"].as_u64().unwrap() as usize;
        let got: Vec<f64> = hidden
            .narrow(1, 0, tokens)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let diff = max_abs_diff(&got, &floats(&g[key]["values"]));
        eprintln!("{key}: max abs diff {diff:e}");
        assert!(diff < 1e-4, "{key}: {diff}");
    }
}

#[test]
fn vae_decode_matches_numpy() {
    let g = goldens();
    let (_dir, checkpoint) = demo_checkpoint();
    let vae = checkpoint.load_vae(&Device::Cpu, DType::F32).unwrap();
    let init: Vec<f32> = (0..16)
        .map(|i| ((i as f64 * 0.37 + 0.1).sin() * 1.3) as f32)
        .collect();
    let latent = Tensor::from_vec(init, (1, 4, 2, 2), &Device::Cpu).unwrap();
    // The golden is of scaled latents, which the decoder now takes unscaled.
    let image = vae.decode(&(latent / 0.18215).unwrap()).unwrap();
    let case = &g["vae_decode_2x2"];
    let shape: Vec<usize> = case["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(&image.dims()[1..], shape.as_slice());
    let got: Vec<f64> = image
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let diff = max_abs_diff(&got, &floats(&case["values"]));
    eprintln!("vae decode: max abs diff {diff:e}");
    assert!(diff < 1e-4, "vae decode differs by {diff}");
}

fn wave(count: usize, scale: f64) -> Vec<f32> {
    (0..count)
        .map(|i| ((i as f64 * 0.37 + 0.1).sin() * 1.3 * scale) as f32)
        .collect()
}

#[test]
fn unet_step_matches_numpy() {
    let g = goldens();
    let (_dir, checkpoint) = demo_checkpoint();
    let unet = checkpoint.load_unet(&[], &Device::Cpu, DType::F32).unwrap();
    let width = unet.config().unet.cross_attention_dim;
    let x = Tensor::from_vec(wave(256, 1.0), (1, 4, 8, 8), &Device::Cpu).unwrap();
    let context = Tensor::from_vec(wave(77 * width, 0.5), (1, 77, width), &Device::Cpu).unwrap();
    let case = &g["unet_8x8_t500"];
    let eps = unet
        .forward(&x, case["t"].as_f64().unwrap(), &context, None)
        .unwrap();
    let got: Vec<f64> = eps
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let diff = max_abs_diff(&got, &floats(&case["values"]));
    eprintln!("unet step: max abs diff {diff:e}");
    // candle's GEGLU uses the tanh approximation of GELU where diffusers (and the numpy
    // reference) use the exact erf form. With a tanh GELU in the reference the difference
    // drops from 3.0e-4 to 2.2e-6, so the rest of the network (and the LDM key mapping)
    // matches to float precision.
    assert!(diff < 5e-3, "unet step differs by {diff}");
}
