//! Inpainting with ComfyUI's class types and inputs: `SetLatentNoiseMask`,
//! `VAEEncodeForInpaint` and `InpaintModelConditioning` (`nodes.py`). A latent's noise mask makes the samplers repaint only inside it
//! (`sakuga_models::diffusion::sample_along`).

use std::sync::LazyLock;

use candle_core::{DType, Tensor};

use sakuga_models::diffusion::{InpaintConcat, TextConditioning};

use super::diffusion::{Conditioning, Latent, VaeDecoder, encode_pixels, latent_aligned};
use super::mask::resize_mask;
use crate::error::NodeError;
use crate::node::{ExecContext, Inputs, Node};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{InputSpec, NodeSchema};
use crate::value::Value;
use sakuga_telemetry::Stage;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(SetLatentNoiseMask);
    registry.register(VaeEncodeForInpaint);
    registry.register(InpaintModelConditioning);
}

/// A `[b, h, w]` mask as `[b, 1, h, w]`, the noise mask's layout.
fn as_noise_mask(mask: &Tensor) -> Result<Tensor, NodeError> {
    Ok(match mask.rank() {
        2 => mask.unsqueeze(0)?.unsqueeze(1)?,
        3 => mask.unsqueeze(1)?,
        _ => mask.clone(),
    })
}

static SET_LATENT_NOISE_MASK: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "SetLatentNoiseMask",
        "Set Latent Noise Mask",
        "latent/inpaint",
    )
    .input(InputSpec::link("samples", PortType::Latent))
    .input(InputSpec::link("mask", PortType::Mask))
    .output(PortType::Latent)
});

struct SetLatentNoiseMask;

impl Node for SetLatentNoiseMask {
    fn schema(&self) -> &NodeSchema {
        &SET_LATENT_NOISE_MASK
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let mask = as_noise_mask(inputs.mask("mask")?)?;
        Ok(vec![Value::object(Latent {
            samples: latent.samples.clone(),
            noise_mask: Some(mask),
        })])
    }
}

/// The mask at the pixels' size, cut to the latent-aligned centre, and the pixels with the
/// masked area set to grey (what the VAE should not see): ComfyUI's inpaint preparation.
fn prepare(
    vae: &VaeDecoder,
    pixels: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, Tensor), NodeError> {
    let (_, h, w, _) = pixels.dims4()?;
    let mask = as_noise_mask(mask)?.squeeze(1)?.to_dtype(DType::F32)?;
    let mask = resize_mask(&mask, w, h)?;
    let (top, left, ch, cw) = latent_aligned(&vae.vae, pixels)?;
    let mask = mask.narrow(1, top, ch)?.narrow(2, left, cw)?;
    let pixels = pixels
        .narrow(1, top, ch)?
        .narrow(2, left, cw)?
        .narrow(3, 0, 3)?;
    // torch.round: half to even.
    let rounded = mask.to_vec3::<f32>()?;
    let keep: Vec<f32> = rounded
        .iter()
        .flatten()
        .flatten()
        .map(|v| 1.0 - v.round_ties_even())
        .collect();
    let keep = Tensor::from_vec(keep, mask.dims(), mask.device())?.unsqueeze(3)?;
    let greyed = ((pixels.to_dtype(DType::F32)? - 0.5)?.broadcast_mul(&keep)? + 0.5)?;
    Ok((greyed, mask))
}

static VAE_ENCODE_FOR_INPAINT: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "VAEEncodeForInpaint",
        "VAE Encode (for Inpainting)",
        "latent/inpaint",
    )
    .stage(Stage::Inference)
    .input(InputSpec::link("pixels", PortType::Image))
    .input(InputSpec::link("vae", PortType::Vae))
    .input(InputSpec::link("mask", PortType::Mask))
    .input(InputSpec::int("grow_mask_by", 6, 0, 64))
    .output(PortType::Latent)
});

struct VaeEncodeForInpaint;

impl Node for VaeEncodeForInpaint {
    fn schema(&self) -> &NodeSchema {
        &VAE_ENCODE_FOR_INPAINT
    }

    /// The pixels with the masked area greyed out, encoded; the noise mask is the mask
    /// rounded and grown by `grow_mask_by` pixels so the repaint blends in latent space.
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let vae = inputs.object::<VaeDecoder>("vae")?;
        let (greyed, mask) = prepare(&vae, inputs.image("pixels")?, inputs.mask("mask")?)?;
        let grow = usize::try_from(inputs.int("grow_mask_by")?).unwrap_or(0);
        let samples = encode_pixels(ctx, &vae.vae, &greyed)?;
        let noise_mask = grown(&mask, grow)?.unsqueeze(1)?;
        Ok(vec![Value::object(Latent {
            samples,
            noise_mask: Some(noise_mask),
        })])
    }
}

/// ComfyUI's mask growth: a `grow x grow` box sum over the rounded mask (padded by
/// `ceil((grow - 1) / 2)`, so an even box leans up and left), clamped to 0..1, cut back to
/// the mask's size.
fn grown(mask: &Tensor, grow: usize) -> Result<Tensor, NodeError> {
    let (b, h, w) = mask.dims3()?;
    let values: Vec<f32> = mask
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f32::round_ties_even)
        .collect();
    if grow == 0 {
        return Ok(Tensor::from_vec(values, (b, h, w), mask.device())?);
    }
    let pad = (grow - 1).div_ceil(2);
    let mut out = vec![0.0f32; b * h * w];
    for i in 0..b {
        let plane = &values[i * h * w..(i + 1) * h * w];
        for y in 0..h {
            for x in 0..w {
                let mut any = false;
                'window: for dy in 0..grow {
                    for dx in 0..grow {
                        let (yy, xx) = ((y + dy) as i64 - pad as i64, (x + dx) as i64 - pad as i64);
                        if yy >= 0
                            && xx >= 0
                            && (yy as usize) < h
                            && (xx as usize) < w
                            && plane[yy as usize * w + xx as usize] > 0.0
                        {
                            any = true;
                            break 'window;
                        }
                    }
                }
                out[(i * h + y) * w + x] = f32::from(u8::from(any));
            }
        }
    }
    Ok(Tensor::from_vec(out, (b, h, w), mask.device())?)
}

static INPAINT_MODEL_CONDITIONING: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "InpaintModelConditioning",
        "InpaintModelConditioning",
        "conditioning/inpaint",
    )
    .stage(Stage::Inference)
    .input(InputSpec::link("positive", PortType::Conditioning))
    .input(InputSpec::link("negative", PortType::Conditioning))
    .input(InputSpec::link("vae", PortType::Vae))
    .input(InputSpec::link("pixels", PortType::Image))
    .input(InputSpec::link("mask", PortType::Mask))
    .input(InputSpec::boolean("noise_mask", true))
    .named_output("positive", PortType::Conditioning)
    .named_output("negative", PortType::Conditioning)
    .named_output("latent", PortType::Latent)
});

struct InpaintModelConditioning;

impl Node for InpaintModelConditioning {
    fn schema(&self) -> &NodeSchema {
        &INPAINT_MODEL_CONDITIONING
    }

    /// The original pixels encoded, with the mask as noise mask when `noise_mask`; both
    /// prompts carry the greyed-out pixels encoded and the mask, which an inpainting UNet
    /// reads beside the latent (other UNets ignore them).
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let vae = inputs.object::<VaeDecoder>("vae")?;
        let pixels = inputs.image("pixels")?;
        let (greyed, mask) = prepare(&vae, pixels, inputs.mask("mask")?)?;
        let samples = encode_pixels(ctx, &vae.vae, pixels)?;
        let concat = InpaintConcat {
            latent: encode_pixels(ctx, &vae.vae, &greyed)?,
            mask: mask.unsqueeze(1)?,
        };
        let noise_mask = if inputs.boolean("noise_mask")? {
            Some(mask.unsqueeze(1)?)
        } else {
            None
        };
        let with_concat = |name: &str| -> Result<Value, NodeError> {
            let conditioning = inputs.object::<Conditioning>(name)?;
            let entries = conditioning
                .entries
                .iter()
                .map(|c| TextConditioning {
                    inpaint: Some(concat.clone()),
                    ..c.clone()
                })
                .collect();
            Ok(Value::object(Conditioning { entries }))
        };
        Ok(vec![
            with_concat("positive")?,
            with_concat("negative")?,
            Value::object(Latent {
                samples,
                noise_mask,
            }),
        ])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::testing::Rig;

    fn run(rig: &Rig, class: &str, inputs: &[(&str, Value)]) -> Vec<Value> {
        let registry = NodeRegistry::with_builtins();
        let node = registry.get(class).unwrap_or_else(|| panic!("{class}"));
        rig.run(node.as_ref(), inputs)
            .unwrap_or_else(|e| panic!("{class}: {e}"))
    }

    fn latent(value: &Value) -> std::sync::Arc<Latent> {
        let Value::Object(object) = value else {
            panic!("not a latent")
        };
        object.clone().downcast::<Latent>().expect("a latent")
    }

    #[test]
    fn a_noise_mask_keeps_the_latent_outside_it() {
        let rig = Rig::new(|models| {
            sakuga_models::demo::write_demo_models(models).unwrap();
        });
        let s = |v: &str| Value::String(v.into());
        let loaded = run(
            &rig,
            "CheckpointLoaderSimple",
            &[("ckpt_name", s(sakuga_models::demo::DEMO_CHECKPOINT))],
        );
        let encode = |text: &str| {
            run(
                &rig,
                "CLIPTextEncode",
                &[("text", s(text)), ("clip", loaded[1].clone())],
            )
            .remove(0)
        };
        let pixels = Tensor::rand(0f32, 1.0, (1, 64, 64, 3), &Device::Cpu).unwrap();
        // Repaint the left half.
        let mask: Vec<f32> = (0..64 * 64)
            .map(|i| if i % 64 < 32 { 1.0 } else { 0.0 })
            .collect();
        let mask = Value::Mask(Tensor::from_vec(mask, (1, 64, 64), &Device::Cpu).unwrap());
        let encoded = run(
            &rig,
            "VAEEncode",
            &[
                ("pixels", Value::Image(pixels.clone())),
                ("vae", loaded[2].clone()),
            ],
        );
        let masked = run(
            &rig,
            "SetLatentNoiseMask",
            &[("samples", encoded[0].clone()), ("mask", mask.clone())],
        );
        let sampled = run(
            &rig,
            "KSampler",
            &[
                ("model", loaded[0].clone()),
                ("seed", Value::Int(5)),
                ("steps", Value::Int(3)),
                ("cfg", Value::Float(5.0)),
                ("sampler_name", s("dpmpp_2m")),
                ("scheduler", s("karras")),
                ("positive", encode("a fox")),
                ("negative", encode("")),
                ("latent_image", masked[0].clone()),
                ("denoise", Value::Float(1.0)),
            ],
        );
        let (before, after) = (latent(&encoded[0]), latent(&sampled[0]));
        let half = |t: &Tensor, from: usize| t.narrow(3, from, 4).unwrap().flatten_all().unwrap();
        let kept = (half(&after.samples, 4) - half(&before.samples, 4))
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(kept < 1e-5, "outside the mask the latent stays: {kept}");
        let painted = (half(&after.samples, 0) - half(&before.samples, 0))
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(painted > 1e-2, "inside the mask it is repainted: {painted}");
        assert!(
            after.noise_mask.is_some(),
            "the sampled latent keeps its mask"
        );

        let for_inpaint = run(
            &rig,
            "VAEEncodeForInpaint",
            &[
                ("pixels", Value::Image(pixels)),
                ("vae", loaded[2].clone()),
                ("mask", mask),
                ("grow_mask_by", Value::Int(6)),
            ],
        );
        let noise_mask = latent(&for_inpaint[0])
            .noise_mask
            .clone()
            .expect("a noise mask");
        assert_eq!(noise_mask.dims(), &[1, 1, 64, 64]);
        let row: Vec<f32> = noise_mask
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(10)
            .unwrap()
            .to_vec1()
            .unwrap();
        // Grown by ceil(5 / 2) = 3 pixels to the right of the 32 masked columns.
        assert_eq!((row[34], row[35]), (1.0, 0.0));
    }

    #[test]
    fn growing_rounds_then_spreads_by_the_box() {
        let dot = Tensor::from_vec(
            vec![
                0.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            ],
            (1, 4, 4),
            &Device::Cpu,
        )
        .unwrap();
        let plane = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(plane(grown(&dot, 0).unwrap())[7], 1.0, "0.6 rounds to 1");
        // A 3x3 box (pad 1) around (1, 3).
        let three = plane(grown(&dot, 3).unwrap());
        assert_eq!(three.iter().filter(|&&v| v == 1.0).count(), 6);
        assert_eq!(
            (three[2], three[3], three[11], three[0]),
            (1.0, 1.0, 1.0, 0.0)
        );
    }
}
