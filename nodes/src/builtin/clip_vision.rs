//! CLIP vision: `CLIPVisionLoader` (a file from `clip_vision/`), `CLIPVisionEncode` (images
//! to embeddings, with CLIP's own preprocessing) and `unCLIPConditioning` (those embeddings
//! on a prompt, where SDXL reads them instead of the text's pooled embedding: "revision").

use std::sync::{Arc, LazyLock};

use candle_core::Tensor;
use sakuga_models::diffusion::clip_vision::{
    ClipVisionModel, ClipVisionOutput, UnclipEntry, normalise,
};
use sakuga_models::store::ModelFolder;
use sakuga_telemetry::ModelKind;

use super::diffusion::Conditioning;
use super::upscale::load_cached;
use crate::error::NodeError;
use crate::image::resize_bicubic_antialiased;
use crate::node::{ExecContext, Inputs, Node};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{ComboOptions, InputSpec, NodeSchema};
use crate::value::Value;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(ClipVisionLoader);
    registry.register(ClipVisionEncode);
    registry.register(UnclipConditioning);
}

struct ClipVisionLoader;

static CLIP_VISION_LOADER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("CLIPVisionLoader", "Load CLIP Vision", "loaders")
        .loads("clip_vision", "clip_name", ModelKind::Clip)
        .input(InputSpec::files(
            "clip_name",
            ComboOptions::ModelFolder("clip_vision"),
        ))
        .output(PortType::ClipVision)
});

impl Node for ClipVisionLoader {
    fn schema(&self) -> &NodeSchema {
        &CLIP_VISION_LOADER
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let device = ctx.env.device.clone();
        let model = load_cached(
            ctx.env,
            ModelFolder::ClipVision,
            inputs.str("clip_name")?,
            ModelKind::Clip,
            |path| {
                let bytes = std::fs::metadata(path).map_or(0, |m| m.len());
                Ok((ClipVisionModel::load(path, &device)?, bytes))
            },
        )?;
        Ok(vec![Value::Object(model)])
    }
}

struct ClipVisionEncode;

static CLIP_VISION_ENCODE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("CLIPVisionEncode", "CLIP Vision Encode", "conditioning")
        .input(InputSpec::link("clip_vision", PortType::ClipVision))
        .input(InputSpec::link("image", PortType::Image))
        .input(InputSpec::combo("crop", &["center", "none"]))
        .output(PortType::ClipVisionOutput)
});

/// ComfyUI's `clip_preprocess`: RGB at `size` x `size` (shortest side scaled to `size` and
/// the middle cut out with `crop`, else squashed), as `[b, 3, size, size]`.
fn preprocess(image: &Tensor, size: usize, crop: bool) -> Result<Tensor, NodeError> {
    let (_, h, w, c) = image.dims4()?;
    let rgb = if c > 3 {
        image.narrow(3, 0, 3)?
    } else {
        image.clone()
    };
    let fitted = if (h, w) == (size, size) {
        rgb
    } else if crop {
        let scale = size as f64 / h.min(w) as f64;
        // Python's round, half to even.
        let (sh, sw) = (
            (scale * h as f64).round_ties_even() as usize,
            (scale * w as f64).round_ties_even() as usize,
        );
        let scaled = resize_bicubic_antialiased(&rgb, sw as u32, sh as u32)?;
        scaled
            .narrow(1, (sh - size) / 2, size)?
            .narrow(2, (sw - size) / 2, size)?
    } else {
        resize_bicubic_antialiased(&rgb, size as u32, size as u32)?
    };
    Ok(fitted.permute((0, 3, 1, 2))?.contiguous()?)
}

impl Node for ClipVisionEncode {
    fn schema(&self) -> &NodeSchema {
        &CLIP_VISION_ENCODE
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let model = inputs.object::<ClipVisionModel>("clip_vision")?;
        let image = inputs.image("image")?;
        let size = model.config().image_size;
        let pixels = preprocess(image, size, inputs.str("crop")? == "center")?;
        let output = model.encode(&normalise(&pixels)?)?;
        Ok(vec![Value::object(output)])
    }
}

struct UnclipConditioning;

static UNCLIP_CONDITIONING: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("unCLIPConditioning", "unCLIPConditioning", "conditioning")
        .input(InputSpec::link("conditioning", PortType::Conditioning))
        .input(InputSpec::link(
            "clip_vision_output",
            PortType::ClipVisionOutput,
        ))
        .input(InputSpec::float("strength", 1.0, -10.0, 10.0, 0.01))
        .input(InputSpec::float("noise_augmentation", 0.0, 0.0, 1.0, 0.01))
        .output(PortType::Conditioning)
});

impl Node for UnclipConditioning {
    fn schema(&self) -> &NodeSchema {
        &UNCLIP_CONDITIONING
    }

    /// Appends the images to every prompt of the conditioning; strength 0 leaves it as is.
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let conditioning = inputs.object::<Conditioning>("conditioning")?;
        let strength = inputs.float("strength")?;
        if strength == 0.0 {
            return Ok(vec![Value::Object(conditioning)]);
        }
        let output = inputs.object::<ClipVisionOutput>("clip_vision_output")?;
        let entry = UnclipEntry {
            image_embeds: output.image_embeds.clone(),
            strength,
            noise_augmentation: inputs.float("noise_augmentation")?,
        };
        let entries = conditioning
            .entries
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.unclip.push(entry.clone());
                c
            })
            .collect();
        Ok(vec![Value::Object(Arc::new(Conditioning { entries }))])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use serde_json::Value as Json;

    use super::*;

    fn goldens() -> Json {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/tests/fixtures/clip_vision/goldens.json"
        );
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// ComfyUI's preprocessed 8-bit levels against sakuga's, rounded the same way.
    fn level_differences(case: &Json, image: &Tensor, crop: bool) -> (usize, u8) {
        let hex = case["levels_hex"].as_str().unwrap();
        let want: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let got: Vec<f32> = preprocess(image, 224, crop)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got.len(), want.len());
        let mut differing = 0;
        let mut worst = 0;
        for (g, w) in got.iter().zip(&want) {
            let level = (g.clamp(0.0, 1.0) * 255.0).round() as u8;
            let d = level.abs_diff(*w);
            differing += usize::from(d > 0);
            worst = worst.max(d);
        }
        (differing, worst)
    }

    #[test]
    fn preprocessing_follows_comfyuis_clip_preprocess() {
        let g = goldens();
        let v = &g["image"];
        let values: Vec<f32> = v["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let image = Tensor::from_vec(values, (1, 40, 56, 3), &Device::Cpu).unwrap();
        for (name, crop) in [("crop", true), ("squash", false)] {
            let (differing, worst) = level_differences(&g[name], &image, crop);
            let total = 3 * 224 * 224;
            eprintln!("{name}: {differing} of {total} levels differ, by at most {worst}");
            // Antialiased bicubic in fast_image_resize and in PyTorch (both Catmull-Rom
            // widened by the scale) round a few values the other way.
            assert!(worst <= 1, "{name}: a level off by {worst}");
            assert!(
                differing * 1000 < total,
                "{name}: {differing} levels differ"
            );
        }
    }
}
