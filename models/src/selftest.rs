//! The model golden checks as a library, for `sakuga selftest`: the references the
//! integration tests under `models/tests/` compare against (numpy goldens for the demo SD
//! network and the demo RIFE, PyTorch goldens for the RIFE 4.6 and 4.25 demos, the official ncnn outputs for two released Real-ESRGAN
//! networks), run on any device. A shipped binary can so check a GPU host that has neither
//! cargo nor the source tree; it needs only the fixtures folder (`models/tests/fixtures`).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::demo::{DEMO_CHECKPOINT, write_demo_models};
use crate::diffusion::Checkpoint;
use crate::error::{ModelError, Result};
use crate::interpolate::Interpolator;
use crate::interpolate::demo::{DEMO_RIFE, DEMO_RIFE46, DEMO_RIFE425};
use crate::upscale::Upscaler;
use crate::upscale::demo::DEMO_UPSCALER;

/// How much looser a check is on a GPU: cuBLAS and the CUDA kernels sum in another order
/// than the CPU code, so f32 results differ in the last bits, more so through deep nets.
const GPU_TOLERANCE_FACTOR: f64 = 10.0;

/// The outcome of one golden check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    /// Largest absolute difference from the reference (`NaN` when the check failed to run).
    pub max_abs_diff: f64,
    pub tolerance: f64,
    pub seconds: f64,
    /// Why the check could not run.
    pub error: Option<String>,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.max_abs_diff <= self.tolerance
    }
}

/// One check: name, CPU tolerance, and the code that returns its largest difference.
type CheckFn = fn(&Inputs<'_>) -> Result<f64>;

const CHECKS: &[(&str, f64, CheckFn)] = &[
    ("clip_last_layer", 1e-4, |i| clip(i, "clip_last_layer", -1)),
    ("clip_skip_2", 1e-4, |i| clip(i, "clip_skip_2", -2)),
    ("vae_decode_2x2", 1e-4, vae_decode),
    // candle's GEGLU uses tanh GELU where the numpy reference uses erf (see the test).
    ("unet_8x8_t500", 5e-3, unet_step),
    ("realesr_animevideov3_x4", 1e-4, |i| {
        let model = i.models.join("upscale_models").join(DEMO_UPSCALER);
        upscaler(i, &model, "realesr-animevideov3-x4_output.npy")
    }),
    ("realesrgan_x4plus_anime_6b", 1e-4, |i| {
        let model = i.fixtures.join("realesrgan/realesrgan-x4plus-anime.param");
        upscaler(i, &model, "realesrgan-x4plus-anime_output.npy")
    }),
    ("rife_ifnet_t50", 1e-4, |i| rife(i, 0.5, "ifnet_t50.f32")),
    ("rife_ifnet_t25", 1e-4, |i| rife(i, 0.25, "ifnet_t25.f32")),
    ("rife46_resconv_t50", 1e-4, rife46_resconv),
    ("rife425_t50", 1e-5, rife425),
];

struct Inputs<'a> {
    fixtures: &'a Path,
    /// A models root holding the demo models.
    models: &'a Path,
    device: &'a Device,
    goldens: serde_json::Value,
}

/// Runs every golden check on `device`, with the demo models written under `models_dir`
/// and the references read from `fixtures`, and calls `on_check` after each one.
///
/// # Errors
/// When the demo models cannot be written or `diffusion/goldens.json` cannot be read; a
/// failing check is a [`Check`] with its error, not an error of this call.
pub fn run_checks(
    fixtures: &Path,
    models_dir: &Path,
    device: &Device,
    on_check: &mut dyn FnMut(&Check),
) -> Result<Vec<Check>> {
    write_demo_models(models_dir)?;
    let goldens_path = fixtures.join("diffusion/goldens.json");
    let text = read(&goldens_path)?;
    let goldens = serde_json::from_slice(&text).map_err(|e| ModelError::Corrupt {
        path: goldens_path,
        reason: e.to_string(),
    })?;
    let inputs = Inputs {
        fixtures,
        models: models_dir,
        device,
        goldens,
    };
    let factor = if device.is_cuda() {
        GPU_TOLERANCE_FACTOR
    } else {
        1.0
    };
    let mut checks = Vec::new();
    for (name, tolerance, run) in CHECKS {
        let started = Instant::now();
        let outcome = run(&inputs);
        let check = Check {
            name,
            max_abs_diff: *outcome.as_ref().unwrap_or(&f64::NAN),
            tolerance: tolerance * factor,
            seconds: started.elapsed().as_secs_f64(),
            error: outcome.err().map(|e| e.to_string()),
        };
        on_check(&check);
        checks.push(check);
    }
    Ok(checks)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn corrupt(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Little-endian f32 values from raw bytes.
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// A `.npy` file of little-endian f32 in C order (numpy format versions 1 to 3).
pub fn read_npy_f32(path: &Path) -> Result<Tensor> {
    let bytes = read(path)?;
    if bytes.len() < 12 || &bytes[..6] != b"\x93NUMPY" {
        return Err(corrupt(path, "not an npy file"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| corrupt(path, "npy header cut short"))?;
    if !header.contains("'descr': '<f4'") || !header.contains("'fortran_order': False") {
        return Err(corrupt(
            path,
            format!("not C-order little-endian f32: {header}"),
        ));
    }
    let shape: Vec<usize> = header
        .split("'shape': (")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .ok_or_else(|| corrupt(path, "npy header has no shape"))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| corrupt(path, "bad npy shape")))
        .collect::<Result<_>>()?;
    let values = f32s(&bytes[start + header_len..]);
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// The largest absolute difference between a result (on any device) and a reference.
fn max_diff(got: &Tensor, want: &Tensor) -> Result<f64> {
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let want = want.to_dtype(DType::F32)?;
    if got.dims() != want.dims() {
        return Err(ModelError::InvalidInput(format!(
            "result is {:?}, the reference {:?}",
            got.dims(),
            want.dims()
        )));
    }
    let diff: f32 = (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
    Ok(f64::from(diff))
}

fn golden_tensor(value: &serde_json::Value, dims: &[usize]) -> Result<Tensor> {
    let values: Vec<f32> = value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_f64())
                .map(|x| x as f32)
                .collect()
        })
        .unwrap_or_default();
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}

/// The wave the numpy goldens feed the networks (`make_goldens.py`).
fn wave(count: usize, scale: f64, dims: &[usize], device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..count)
        .map(|i| ((i as f64 * 0.37 + 0.1).sin() * 1.3 * scale) as f32)
        .collect();
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?.to_device(device)?)
}

fn checkpoint(inputs: &Inputs<'_>) -> Result<Checkpoint> {
    Checkpoint::open(&inputs.models.join("checkpoints").join(DEMO_CHECKPOINT))
}

fn clip(inputs: &Inputs<'_>, key: &str, stop: i64) -> Result<f64> {
    let clip = checkpoint(inputs)?.load_clip(&[], inputs.device, DType::F32)?;
    let hidden = clip.with_stop_at_layer(stop).encode("a photo of a cat")?;
    let golden = &inputs.goldens[key];
    let tokens = golden["tokens"].as_u64().unwrap_or(0) as usize;
    let got = hidden.narrow(1, 0, tokens)?;
    let want = golden_tensor(&golden["values"], got.dims())?;
    max_diff(&got, &want)
}

fn vae_decode(inputs: &Inputs<'_>) -> Result<f64> {
    let vae = checkpoint(inputs)?.load_vae(inputs.device, DType::F32)?;
    // The golden is of scaled latents, which the decoder takes unscaled.
    let image = vae.decode(&(wave(16, 1.0, &[1, 4, 2, 2], inputs.device)? / 0.18215)?)?;
    let want = golden_tensor(&inputs.goldens["vae_decode_2x2"]["values"], image.dims())?;
    max_diff(&image, &want)
}

fn unet_step(inputs: &Inputs<'_>) -> Result<f64> {
    let unet = checkpoint(inputs)?.load_unet(&[], inputs.device, DType::F32)?;
    let width = unet.config().unet.cross_attention_dim;
    let x = wave(256, 1.0, &[1, 4, 8, 8], inputs.device)?;
    let context = wave(77 * width, 0.5, &[1, 77, width], inputs.device)?;
    let case = &inputs.goldens["unet_8x8_t500"];
    let eps = unet.forward(&x, case["t"].as_f64().unwrap_or(500.0), &context, None)?;
    let want = golden_tensor(&case["values"], eps.dims())?;
    max_diff(&eps, &want)
}

fn upscaler(inputs: &Inputs<'_>, model: &Path, reference: &str) -> Result<f64> {
    let reference_dir = inputs.fixtures.join("realesrgan/reference");
    let input = read_npy_f32(&reference_dir.join("input_64x64.npy"))?.unsqueeze(0)?;
    let want = read_npy_f32(&reference_dir.join(reference))?.unsqueeze(0)?;
    let upscaler = Upscaler::load(model, inputs.device)?;
    let got = upscaler.forward_nchw(&input.to_device(inputs.device)?)?;
    max_diff(&got, &want)
}

fn fixture(inputs: &Inputs<'_>, dir: &str, name: &str, dims: &[usize]) -> Result<Tensor> {
    let path = inputs.fixtures.join(dir).join(name);
    Ok(Tensor::from_vec(f32s(&read(&path)?), dims, &Device::Cpu)?)
}

/// The ResConv RIFE 4.6 demo against `rife425/rife46_t50.f32` (PyTorch reference).
fn rife46_resconv(inputs: &Inputs<'_>) -> Result<f64> {
    let frames =
        fixture(inputs, "rife", "frames_32x32.f32", &[2, 3, 32, 32])?.to_device(inputs.device)?;
    let want = fixture(inputs, "rife425", "rife46_t50.f32", &[1, 3, 32, 32])?;
    let path = inputs.models.join("frame_interpolation").join(DEMO_RIFE46);
    let interpolator = Interpolator::load(&path, inputs.device)?;
    let got =
        interpolator
            .net()
            .forward(&frames.narrow(0, 0, 1)?, &frames.narrow(0, 1, 1)?, 0.5)?;
    max_diff(&got, &want)
}

/// The RIFE 4.25 demo through [`Interpolator::interpolate`] (mirrored padding to 64,
/// crop, clamp) against `rife425/rife425_t50.f32` (PyTorch reference).
fn rife425(inputs: &Inputs<'_>) -> Result<f64> {
    let bhwc = |t: Tensor| t.permute((0, 2, 3, 1));
    let frames = bhwc(fixture(
        inputs,
        "rife425",
        "frames_40x48.f32",
        &[2, 3, 40, 48],
    )?)?
    .to_device(inputs.device)?;
    let want = bhwc(fixture(
        inputs,
        "rife425",
        "rife425_t50.f32",
        &[1, 3, 40, 48],
    )?)?;
    let path = inputs.models.join("frame_interpolation").join(DEMO_RIFE425);
    let interpolator = Interpolator::load(&path, inputs.device)?;
    let got = interpolator.interpolate(&frames.narrow(0, 0, 1)?, &frames.narrow(0, 1, 1)?, 0.5)?;
    max_diff(&got, &want)
}

fn rife(inputs: &Inputs<'_>, t: f32, golden: &str) -> Result<f64> {
    let dir = inputs.fixtures.join("rife");
    let frames = Tensor::from_vec(
        f32s(&read(&dir.join("frames_32x32.f32"))?),
        (2, 3, 32, 32),
        &Device::Cpu,
    )?
    .to_device(inputs.device)?;
    let want = Tensor::from_vec(
        f32s(&read(&dir.join(golden))?),
        (1, 3, 32, 32),
        &Device::Cpu,
    )?;
    let path = inputs.models.join("frame_interpolation").join(DEMO_RIFE);
    let interpolator = Interpolator::load(&path, inputs.device)?;
    let got = interpolator
        .net()
        .forward(&frames.narrow(0, 0, 1)?, &frames.narrow(0, 1, 1)?, t)?;
    max_diff(&got, &want)
}

/// Device memory taken on purpose, so that work started next meets a real out-of-memory
/// (`sakuga selftest --ballast-leave-mib`). Dropping it frees the memory.
pub struct Ballast {
    held: Vec<Tensor>,
    held_mib: u64,
    probe: Box<dyn sakuga_telemetry::DeviceProbe>,
}

impl std::fmt::Debug for Ballast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ballast")
            .field("held_mib", &self.held_mib)
            .finish()
    }
}

impl Ballast {
    /// Allocates zeroed buffers (zeroing makes the driver really commit them) in halving
    /// chunks until the GPU reports at most `leave_mib` MiB free, other processes' use
    /// included, as NVML or the driver reads it.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for a device that is not a usable GPU.
    pub fn fill(spec: &str, leave_mib: u64) -> Result<Ballast> {
        let device = &crate::diffusion::device_from_spec(spec)?;
        if !device.is_cuda() {
            return Err(ModelError::InvalidInput(format!(
                "a ballast needs a GPU, not {spec}"
            )));
        }
        let mut ballast = Ballast {
            held: Vec::new(),
            held_mib: 0,
            probe: crate::device::probe_for(spec)?,
        };
        let mut chunk_mib = 4096u64;
        while chunk_mib >= 16 {
            let free = ballast.free_mib();
            if free <= leave_mib {
                break;
            }
            if free - leave_mib < chunk_mib {
                chunk_mib /= 2;
                continue;
            }
            match Tensor::zeros(((chunk_mib << 20) / 4) as usize, DType::F32, device) {
                Ok(t) => {
                    ballast.held.push(t);
                    ballast.held_mib += chunk_mib;
                }
                Err(_) => chunk_mib /= 2,
            }
            device.synchronize()?;
        }
        Ok(ballast)
    }

    pub fn held_mib(&self) -> u64 {
        self.held_mib
    }

    /// Free device memory now, in MiB.
    pub fn free_mib(&self) -> u64 {
        let sample = self.probe.sample();
        sample
            .memory_total_bytes
            .saturating_sub(sample.memory_used_bytes)
            >> 20
    }
}
