//! Masks and the image operations inpainting and outpainting graphs use, with ComfyUI's
//! class types, inputs, defaults and ranges (`nodes.py`, `comfy_extras/nodes_mask.py`,
//! `nodes_images.py`, `nodes_post_processing.py`): `LoadImageMask`, `ImageToMask`,
//! `MaskToImage`, `SolidMask`, `InvertMask`, `GrowMask`, `ImageCompositeMasked`,
//! `ImagePadForOutpaint`, `ImageCrop`, `ImageScaleToTotalPixels`, `GetImageSize`.
//!
//! Images are `[batch, height, width, channels]` in 0..1 and masks `[batch, height, width]`,
//! as in ComfyUI; the pixel loops run on the CPU, where these small images live.

use std::sync::LazyLock;

use candle_core::{DType, Device, Tensor};

use super::MAX_RESOLUTION;
use crate::error::NodeError;
use crate::files::resolve_inside;
use crate::image::{RESIZE_METHODS, load_image, resize};
use crate::node::{ExecContext, Inputs, Node};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{ComboOptions, InputSpec, NodeSchema};
use crate::value::Value;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(GetImageSize);
    registry.register(ImageScaleToTotalPixels);
    registry.register(ImageCrop);
    registry.register(InvertMask);
    registry.register(SolidMask);
    registry.register(GrowMask);
    registry.register(ImageToMask);
    registry.register(MaskToImage);
    registry.register(LoadImageMask);
    registry.register(ImageCompositeMasked);
    registry.register(ImagePadForOutpaint);
    registry.register(ThresholdMask);
    registry.register(FeatherMask);
    registry.register(MaskComposite);
    registry.register(MaskPreview);
}

fn size(inputs: &Inputs, name: &str) -> Result<usize, NodeError> {
    let v = inputs.int(name)?;
    usize::try_from(v).map_err(|_| NodeError::InvalidInput(format!("{name} must be >= 0, got {v}")))
}

/// A batch's values on the CPU, f32, with its dims.
fn host(t: &Tensor) -> Result<(Vec<f32>, Vec<usize>), NodeError> {
    let dims = t.dims().to_vec();
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((values, dims))
}

/// A `[batch, h, w]` mask resized to `height x width` (bilinear).
pub(super) fn resize_mask(mask: &Tensor, width: usize, height: usize) -> Result<Tensor, NodeError> {
    let (_, h, w) = mask.dims3()?;
    if (h, w) == (height, width) {
        return Ok(mask.clone());
    }
    let image = mask.unsqueeze(3)?;
    Ok(resize(&image, width as u32, height as u32, "bilinear")?.squeeze(3)?)
}

/// A mask (`[b, H, W]`, `[b, 1, H, W]` or `[H, W]`) at latent size `h x w` (bilinear), as
/// `[b, 1, h, w]`: how a latent's noise mask meets its samples.
pub(super) fn latent_mask(mask: &Tensor, h: usize, w: usize) -> Result<Tensor, NodeError> {
    let planes = match mask.rank() {
        2 => mask.unsqueeze(0)?,
        3 => mask.clone(),
        4 => mask.squeeze(1)?,
        rank => {
            return Err(NodeError::InvalidInput(format!(
                "a noise mask of rank {rank}; expected [batch, height, width]"
            )));
        }
    };
    Ok(resize_mask(&planes.to_dtype(DType::F32)?, w, h)?.unsqueeze(1)?)
}

static GET_IMAGE_SIZE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("GetImageSize", "Get Image Size", "image")
        .input(InputSpec::link("image", PortType::Image))
        .named_output("width", PortType::Int)
        .named_output("height", PortType::Int)
        .named_output("batch_size", PortType::Int)
});

struct GetImageSize;

impl Node for GetImageSize {
    fn schema(&self) -> &NodeSchema {
        &GET_IMAGE_SIZE
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let (batch, height, width, _) = inputs.image("image")?.dims4()?;
        Ok([width, height, batch]
            .into_iter()
            .map(|v| Value::Int(v as i64))
            .collect())
    }
}

static IMAGE_SCALE_TO_TOTAL_PIXELS: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "ImageScaleToTotalPixels",
        "ImageScaleToTotalPixels",
        "image/upscaling",
    )
    .input(InputSpec::link("image", PortType::Image))
    .input(InputSpec::combo("upscale_method", RESIZE_METHODS))
    .input(InputSpec::float("megapixels", 1.0, 0.01, 16.0, 0.01))
    .input(InputSpec::int("resolution_steps", 1, 1, 256))
    .output(PortType::Image)
});

struct ImageScaleToTotalPixels;

impl Node for ImageScaleToTotalPixels {
    fn schema(&self) -> &NodeSchema {
        &IMAGE_SCALE_TO_TOTAL_PIXELS
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let image = inputs.image("image")?;
        let (_, h, w, _) = image.dims4()?;
        let total = inputs.float("megapixels")? * 1024.0 * 1024.0;
        let steps = size(inputs, "resolution_steps")?.max(1) as f64;
        let scale = (total / (w * h) as f64).sqrt();
        // Python's round: half to even.
        let fit =
            |side: usize| ((side as f64 * scale / steps).round_ties_even() * steps).max(1.0) as u32;
        let method = inputs.str("upscale_method")?;
        Ok(vec![Value::Image(resize(image, fit(w), fit(h), method)?)])
    }
}

static IMAGE_CROP: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("ImageCrop", "Image Crop", "image/transform")
        .input(InputSpec::link("image", PortType::Image))
        .input(InputSpec::int("width", 512, 1, MAX_RESOLUTION))
        .input(InputSpec::int("height", 512, 1, MAX_RESOLUTION))
        .input(InputSpec::int("x", 0, 0, MAX_RESOLUTION))
        .input(InputSpec::int("y", 0, 0, MAX_RESOLUTION))
        .output(PortType::Image)
});

struct ImageCrop;

impl Node for ImageCrop {
    fn schema(&self) -> &NodeSchema {
        &IMAGE_CROP
    }

    /// The window at `(x, y)`, clipped to the image; a corner past the edge is pulled back
    /// onto the last pixel, as ComfyUI does.
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let image = inputs.image("image")?;
        let (_, h, w, _) = image.dims4()?;
        let x = size(inputs, "x")?.min(w - 1);
        let y = size(inputs, "y")?.min(h - 1);
        let width = size(inputs, "width")?.min(w - x);
        let height = size(inputs, "height")?.min(h - y);
        let cropped = image.narrow(1, y, height)?.narrow(2, x, width)?;
        Ok(vec![Value::Image(cropped)])
    }
}

static INVERT_MASK: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("InvertMask", "InvertMask", "mask")
        .input(InputSpec::link("mask", PortType::Mask))
        .output(PortType::Mask)
});

struct InvertMask;

impl Node for InvertMask {
    fn schema(&self) -> &NodeSchema {
        &INVERT_MASK
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        Ok(vec![Value::Mask(inputs.mask("mask")?.affine(-1.0, 1.0)?)])
    }
}

static SOLID_MASK: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("SolidMask", "SolidMask", "mask")
        .input(InputSpec::float("value", 1.0, 0.0, 1.0, 0.01))
        .input(InputSpec::int("width", 512, 1, MAX_RESOLUTION))
        .input(InputSpec::int("height", 512, 1, MAX_RESOLUTION))
        .output(PortType::Mask)
});

struct SolidMask;

impl Node for SolidMask {
    fn schema(&self) -> &NodeSchema {
        &SOLID_MASK
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let (w, h) = (size(inputs, "width")?, size(inputs, "height")?);
        let mask = Tensor::full(inputs.float("value")? as f32, (1, h, w), &Device::Cpu)?;
        Ok(vec![Value::Mask(mask)])
    }
}

static GROW_MASK: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("GrowMask", "Grow Mask", "mask")
        .input(InputSpec::link("mask", PortType::Mask))
        .input(InputSpec::int("expand", 0, -MAX_RESOLUTION, MAX_RESOLUTION))
        .input(InputSpec::boolean("tapered_corners", true))
        .output(PortType::Mask)
});

struct GrowMask;

impl Node for GrowMask {
    fn schema(&self) -> &NodeSchema {
        &GROW_MASK
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let mask = inputs.mask("mask")?;
        let expand = inputs.int("expand")?;
        let tapered = inputs.boolean("tapered_corners")?;
        let (mut values, dims) = host(mask)?;
        let (h, w) = (dims[1], dims[2]);
        for plane in values.chunks_mut(h * w) {
            for _ in 0..expand.unsigned_abs() {
                if ctx.cancel.is_cancelled() {
                    return Err(NodeError::Cancelled);
                }
                let grown = morph(plane, h, w, tapered, expand > 0);
                plane.copy_from_slice(&grown);
            }
        }
        Ok(vec![Value::Mask(Tensor::from_vec(
            values,
            dims.as_slice(),
            mask.device(),
        )?)])
    }
}

/// One step of grey dilation (`grow`) or erosion over a 3x3 footprint, the corners left out
/// when `tapered`; the edge repeats outward (scipy's default `reflect` at radius 1).
fn morph(plane: &[f32], h: usize, w: usize, tapered: bool, grow: bool) -> Vec<f32> {
    let mut out = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut best = if grow { f32::MIN } else { f32::MAX };
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    if tapered && dy != 0 && dx != 0 {
                        continue;
                    }
                    let yy = (y as i64 + dy).clamp(0, h as i64 - 1) as usize;
                    let xx = (x as i64 + dx).clamp(0, w as i64 - 1) as usize;
                    let v = plane[yy * w + xx];
                    best = if grow { best.max(v) } else { best.min(v) };
                }
            }
            out[y * w + x] = best;
        }
    }
    out
}

const CHANNELS: &[&str] = &["red", "green", "blue", "alpha"];

static IMAGE_TO_MASK: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("ImageToMask", "Convert Image to Mask", "mask")
        .input(InputSpec::link("image", PortType::Image))
        .input(InputSpec::combo("channel", CHANNELS))
        .output(PortType::Mask)
});

struct ImageToMask;

impl Node for ImageToMask {
    fn schema(&self) -> &NodeSchema {
        &IMAGE_TO_MASK
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let image = inputs.image("image")?;
        let name = inputs.str("channel")?;
        let channel = CHANNELS.iter().position(|c| *c == name).unwrap_or(0);
        let (_, _, _, c) = image.dims4()?;
        if channel >= c {
            return Err(NodeError::InvalidInput(format!(
                "the image has {c} channels, so no {name} channel"
            )));
        }
        Ok(vec![Value::Mask(image.narrow(3, channel, 1)?.squeeze(3)?)])
    }
}

static MASK_TO_IMAGE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("MaskToImage", "Convert Mask to Image", "mask")
        .input(InputSpec::link("mask", PortType::Mask))
        .output(PortType::Image)
});

struct MaskToImage;

impl Node for MaskToImage {
    fn schema(&self) -> &NodeSchema {
        &MASK_TO_IMAGE
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let mask = inputs.mask("mask")?.unsqueeze(3)?;
        let image = Tensor::cat(&[&mask, &mask, &mask], 3)?;
        Ok(vec![Value::Image(image)])
    }
}

static LOAD_IMAGE_MASK: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("LoadImageMask", "Load Image (as Mask)", "mask")
        .input(InputSpec::files("image", ComboOptions::InputFiles))
        .input(InputSpec::combo(
            "channel",
            &["alpha", "red", "green", "blue"],
        ))
        .output(PortType::Mask)
});

struct LoadImageMask;

impl Node for LoadImageMask {
    fn schema(&self) -> &NodeSchema {
        &LOAD_IMAGE_MASK
    }

    /// A colour channel as is; the alpha channel inverted (transparent is masked), and an
    /// image without alpha counts as opaque, as ComfyUI converts it to RGBA first.
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let path = resolve_inside(&ctx.env.input_dir, inputs.str("image")?)?;
        let (image, inverted_alpha) = load_image(&path, &ctx.env.device)?;
        let mask = match inputs.str("channel")? {
            "red" => image.narrow(3, 0, 1)?.squeeze(3)?,
            "green" => image.narrow(3, 1, 1)?.squeeze(3)?,
            "blue" => image.narrow(3, 2, 1)?.squeeze(3)?,
            _ => inverted_alpha,
        };
        Ok(vec![Value::Mask(mask)])
    }

    fn cache_salt(
        &self,
        env: &crate::node::NodeEnv,
        inputs: &Inputs,
    ) -> Result<Option<String>, NodeError> {
        super::image::file_salt(env, inputs.str("image")?)
    }
}

static IMAGE_COMPOSITE_MASKED: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("ImageCompositeMasked", "ImageCompositeMasked", "image")
        .input(InputSpec::link("destination", PortType::Image))
        .input(InputSpec::link("source", PortType::Image))
        .input(InputSpec::int("x", 0, 0, MAX_RESOLUTION))
        .input(InputSpec::int("y", 0, 0, MAX_RESOLUTION))
        .input(InputSpec::boolean("resize_source", false))
        .input(InputSpec::link("mask", PortType::Mask).optional())
        .output(PortType::Image)
});

struct ImageCompositeMasked;

impl Node for ImageCompositeMasked {
    fn schema(&self) -> &NodeSchema {
        &IMAGE_COMPOSITE_MASKED
    }

    /// `source` pasted onto `destination` at `(x, y)`, blended by `mask` (resized to the
    /// source; all ones without one), clipped at the destination's edges. The source's
    /// batch repeats to the destination's.
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let destination = inputs.image("destination")?;
        let (b, h, w, c) = destination.dims4()?;
        let mut source = inputs.image("source")?.clone();
        if inputs.boolean("resize_source")? {
            source = resize(&source, w as u32, h as u32, "bilinear")?;
        }
        let (sb, sh, sw, sc) = source.dims4()?;
        if sc != c {
            return Err(NodeError::InvalidInput(format!(
                "source has {sc} channels, destination {c}"
            )));
        }
        let mask = match inputs.get("mask") {
            Some(_) => {
                let m = resize_mask(inputs.mask("mask")?, sw, sh)?;
                Some(host(&m)?)
            }
            None => None,
        };
        let (x, y) = (size(inputs, "x")?.min(w), size(inputs, "y")?.min(h));
        let (mut out, _) = host(destination)?;
        let (src, _) = host(&source)?;
        for i in 0..b {
            let si = i % sb;
            for row in 0..sh.min(h - y) {
                for col in 0..sw.min(w - x) {
                    let alpha = mask.as_ref().map_or(1.0, |(m, dims)| {
                        let mi = si % dims[0];
                        m[(mi * sh + row) * sw + col]
                    });
                    let d = ((i * h + y + row) * w + x + col) * c;
                    let s = ((si * sh + row) * sw + col) * c;
                    for k in 0..c {
                        out[d + k] = alpha * src[s + k] + (1.0 - alpha) * out[d + k];
                    }
                }
            }
        }
        Ok(vec![Value::Image(Tensor::from_vec(
            out,
            (b, h, w, c),
            destination.device(),
        )?)])
    }
}

static IMAGE_PAD_FOR_OUTPAINT: LazyLock<NodeSchema> = LazyLock::new(|| {
    let side = |name| InputSpec::int_step(name, 0, 0, MAX_RESOLUTION, 8);
    NodeSchema::new("ImagePadForOutpaint", "Pad Image for Outpainting", "image")
        .input(InputSpec::link("image", PortType::Image))
        .input(side("left"))
        .input(side("top"))
        .input(side("right"))
        .input(side("bottom"))
        .input(InputSpec::int("feathering", 40, 0, MAX_RESOLUTION))
        .output(PortType::Image)
        .output(PortType::Mask)
});

struct ImagePadForOutpaint;

impl Node for ImagePadForOutpaint {
    fn schema(&self) -> &NodeSchema {
        &IMAGE_PAD_FOR_OUTPAINT
    }

    /// The image on a grey canvas grown by the four margins, and a mask that is 1 on the
    /// new margins, fading (quadratically, over `feathering` pixels) into the image from
    /// each padded side.
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let image = inputs.image("image")?;
        let (b, h, w, c) = image.dims4()?;
        let [left, top, right, bottom] =
            ["left", "top", "right", "bottom"].map(|n| size(inputs, n).unwrap_or(0));
        let feathering = size(inputs, "feathering")?;
        let (nh, nw) = (h + top + bottom, w + left + right);
        let (src, _) = host(image)?;
        let mut canvas = vec![0.5f32; b * nh * nw * c];
        for i in 0..b {
            for row in 0..h {
                let d = ((i * nh + top + row) * nw + left) * c;
                let s = (i * h + row) * w * c;
                canvas[d..d + w * c].copy_from_slice(&src[s..s + w * c]);
            }
        }
        let mut mask = vec![1.0f32; nh * nw];
        let feather = feathering > 0 && feathering * 2 < h && feathering * 2 < w;
        for row in 0..h {
            for col in 0..w {
                let mut v = 0.0;
                if feather {
                    let from_top = if top != 0 { row } else { h };
                    let from_bottom = if bottom != 0 { h - row } else { h };
                    let from_left = if left != 0 { col } else { w };
                    let from_right = if right != 0 { w - col } else { w };
                    let d = from_top.min(from_bottom).min(from_left).min(from_right);
                    if d < feathering {
                        let t = (feathering - d) as f32 / feathering as f32;
                        v = t * t;
                    }
                }
                mask[(top + row) * nw + left + col] = v;
            }
        }
        let device = image.device();
        Ok(vec![
            Value::Image(Tensor::from_vec(canvas, (b, nh, nw, c), device)?),
            Value::Mask(Tensor::from_vec(mask, (1, nh, nw), device)?),
        ])
    }
}

static THRESHOLD_MASK: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("ThresholdMask", "ThresholdMask", "mask")
        .input(InputSpec::link("mask", PortType::Mask))
        .input(InputSpec::float("value", 0.5, 0.0, 1.0, 0.01))
        .output(PortType::Mask)
});

struct ThresholdMask;

impl Node for ThresholdMask {
    fn schema(&self) -> &NodeSchema {
        &THRESHOLD_MASK
    }

    /// 1 where the mask is above `value`, else 0.
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let mask = inputs.mask("mask")?;
        let above = mask.gt(inputs.float("value")?)?.to_dtype(DType::F32)?;
        Ok(vec![Value::Mask(above)])
    }
}

static FEATHER_MASK: LazyLock<NodeSchema> = LazyLock::new(|| {
    let side = |name| InputSpec::int(name, 0, 0, MAX_RESOLUTION);
    NodeSchema::new("FeatherMask", "FeatherMask", "mask")
        .input(InputSpec::link("mask", PortType::Mask))
        .input(side("left"))
        .input(side("top"))
        .input(side("right"))
        .input(side("bottom"))
        .output(PortType::Mask)
});

struct FeatherMask;

impl Node for FeatherMask {
    fn schema(&self) -> &NodeSchema {
        &FEATHER_MASK
    }

    /// Each side fades linearly over its width, `(i + 1) / width` at distance `i`. As in
    /// ComfyUI, the right and bottom ramps count from index `-0`, so their first factor
    /// lands on the opposite edge (column or row 0).
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let mask = inputs.mask("mask")?;
        let (mut values, dims) = host(mask)?;
        let (h, w) = (dims[1], dims[2]);
        let [left, top, right, bottom] =
            ["left", "top", "right", "bottom"].map(|n| size(inputs, n));
        let (left, right) = (left?.min(w), right?.min(w));
        let (top, bottom) = (top?.min(h), bottom?.min(h));
        let from_end = |i: usize, n: usize| (n - i) % n;
        for plane in values.chunks_mut(h * w) {
            for i in 0..left {
                scale_column(plane, w, i, (i + 1) as f32 / left as f32);
            }
            for i in 0..right {
                scale_column(plane, w, from_end(i, w), (i + 1) as f32 / right as f32);
            }
            for i in 0..top {
                scale_row(plane, w, i, (i + 1) as f32 / top as f32);
            }
            for i in 0..bottom {
                scale_row(plane, w, from_end(i, h), (i + 1) as f32 / bottom as f32);
            }
        }
        Ok(vec![Value::Mask(Tensor::from_vec(
            values,
            dims.as_slice(),
            mask.device(),
        )?)])
    }
}

fn scale_column(plane: &mut [f32], w: usize, x: usize, factor: f32) {
    for row in plane.chunks_mut(w) {
        row[x] *= factor;
    }
}

fn scale_row(plane: &mut [f32], w: usize, y: usize, factor: f32) {
    for v in &mut plane[y * w..(y + 1) * w] {
        *v *= factor;
    }
}

const MASK_OPERATIONS: &[&str] = &["multiply", "add", "subtract", "and", "or", "xor"];

static MASK_COMPOSITE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("MaskComposite", "MaskComposite", "mask")
        .input(InputSpec::link("destination", PortType::Mask))
        .input(InputSpec::link("source", PortType::Mask))
        .input(InputSpec::int("x", 0, 0, MAX_RESOLUTION))
        .input(InputSpec::int("y", 0, 0, MAX_RESOLUTION))
        .input(InputSpec::combo("operation", MASK_OPERATIONS))
        .output(PortType::Mask)
});

struct MaskComposite;

impl Node for MaskComposite {
    fn schema(&self) -> &NodeSchema {
        &MASK_COMPOSITE
    }

    /// `source` combined into `destination` at `(x, y)`, clipped to it and clamped to
    /// 0..1; the logic operations round both sides to 0 or 1 first. Each destination mask
    /// takes the source mask of its index, the last one repeated.
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let destination = inputs.mask("destination")?;
        let (mut out, dims) = host(destination)?;
        let (src, sdims) = host(inputs.mask("source")?)?;
        let (b, h, w) = (dims[0], dims[1], dims[2]);
        let (sb, sh, sw) = (sdims[0], sdims[1], sdims[2]);
        let (x, y) = (size(inputs, "x")?.min(w), size(inputs, "y")?.min(h));
        let op = inputs.str("operation")?;
        // torch.round: half to even.
        let bit = |v: f32| v.round_ties_even() != 0.0;
        for i in 0..b {
            let si = i.min(sb - 1);
            for row in 0..sh.min(h - y) {
                for col in 0..sw.min(w - x) {
                    let d = &mut out[(i * h + y + row) * w + x + col];
                    let s = src[(si * sh + row) * sw + col];
                    let combined = match op {
                        "multiply" => *d * s,
                        "add" => *d + s,
                        "subtract" => *d - s,
                        "and" => f32::from(u8::from(bit(*d) && bit(s))),
                        "or" => f32::from(u8::from(bit(*d) || bit(s))),
                        "xor" => f32::from(u8::from(bit(*d) != bit(s))),
                        other => {
                            return Err(NodeError::InvalidInput(format!(
                                "unknown operation {other:?}"
                            )));
                        }
                    };
                    *d = combined.clamp(0.0, 1.0);
                }
            }
        }
        // ComfyUI clamps the whole result, not only the pasted window.
        for v in &mut out {
            *v = v.clamp(0.0, 1.0);
        }
        Ok(vec![Value::Mask(Tensor::from_vec(
            out,
            dims.as_slice(),
            destination.device(),
        )?)])
    }
}

static MASK_PREVIEW: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("MaskPreview", "Preview Mask", "mask")
        .description("Saves the input images to your ComfyUI output directory.")
        .input(InputSpec::link("mask", PortType::Mask))
        .output_node()
});

struct MaskPreview;

impl Node for MaskPreview {
    fn schema(&self) -> &NodeSchema {
        &MASK_PREVIEW
    }

    /// The mask as a grey image in the temp dir, as `PreviewImage` shows images.
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let mask = inputs.mask("mask")?.unsqueeze(3)?;
        let image = Tensor::cat(&[&mask, &mask, &mask], 3)?;
        super::output::preview(ctx, &image)?;
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rig;

    fn rig() -> Rig {
        Rig::new(|_| {})
    }

    fn values(v: &Value) -> (Vec<f32>, Vec<usize>) {
        match v {
            Value::Image(t) | Value::Mask(t) => host(t).unwrap(),
            other => panic!("not a tensor: {other:?}"),
        }
    }

    fn mask(rows: &[&[f32]]) -> Value {
        let (h, w) = (rows.len(), rows[0].len());
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Value::Mask(Tensor::from_vec(flat, (1, h, w), &Device::Cpu).unwrap())
    }

    #[test]
    fn threshold_feather_and_composite_follow_comfyui() {
        let rig = rig();
        let ramp = mask(&[&[0.2, 0.6, 0.9], &[1.0, 0.5, 0.0]]);
        let out = rig
            .run(
                &ThresholdMask,
                &[("mask", ramp.clone()), ("value", Value::Float(0.5))],
            )
            .unwrap();
        assert_eq!(values(&out[0]).0, [0., 1., 1., 1., 0., 0.]);
        let ones = mask(&[&[1.0; 4], &[1.0; 4]]);
        let out = rig
            .run(
                &FeatherMask,
                &[
                    ("mask", ones),
                    ("left", Value::Int(2)),
                    ("top", Value::Int(0)),
                    ("right", Value::Int(2)),
                    ("bottom", Value::Int(0)),
                ],
            )
            .unwrap();
        // Left ramp 0.5, 1 on columns 0, 1; the right ramp's 0.5 lands on column 0 (-0),
        // its 1.0 on column 3.
        assert_eq!(values(&out[0]).0[..4], [0.25, 1.0, 1.0, 1.0]);
        let destination = mask(&[&[0.5, 0.5, 0.5], &[0.5, 0.5, 0.5]]);
        let source = mask(&[&[1.0, 0.7]]);
        let composite = |op: &str| {
            let out = rig
                .run(
                    &MaskComposite,
                    &[
                        ("destination", destination.clone()),
                        ("source", source.clone()),
                        ("x", Value::Int(2)),
                        ("y", Value::Int(1)),
                        ("operation", Value::String(op.into())),
                    ],
                )
                .unwrap();
            values(&out[0]).0
        };
        assert_eq!(composite("add"), [0.5, 0.5, 0.5, 0.5, 0.5, 1.0]);
        assert_eq!(composite("multiply")[5], 0.5);
        // 0.5 rounds to 0 (half to even), 1.0 to 1: xor is 1.
        assert_eq!(composite("xor")[5], 1.0);
        assert_eq!(composite("and")[5], 0.0);
    }

    #[test]
    fn grow_mask_dilates_and_erodes_with_or_without_corners() {
        let rig = rig();
        let dot = mask(&[&[0., 0., 0.], &[0., 1., 0.], &[0., 0., 0.]]);
        let grow = |expand: i64, tapered: bool, m: &Value| {
            let out = rig
                .run(
                    &GrowMask,
                    &[
                        ("mask", m.clone()),
                        ("expand", Value::Int(expand)),
                        ("tapered_corners", Value::Boolean(tapered)),
                    ],
                )
                .unwrap();
            values(&out[0]).0
        };
        assert_eq!(grow(1, true, &dot), [0., 1., 0., 1., 1., 1., 0., 1., 0.]);
        assert_eq!(grow(1, false, &dot), [1.; 9]);
        let full = mask(&[&[1., 1., 1.], &[1., 1., 1.], &[1., 1., 0.]]);
        assert_eq!(grow(-1, true, &full), [1., 1., 1., 1., 1., 0., 1., 0., 0.]);
        assert_eq!(grow(0, true, &dot), values(&dot).0);
    }

    #[test]
    fn pad_for_outpaint_grows_the_canvas_and_feathers_the_mask() {
        let rig = rig();
        let image = Value::Image(Tensor::ones((1, 8, 8, 3), DType::F32, &Device::Cpu).unwrap());
        let out = rig
            .run(
                &ImagePadForOutpaint,
                &[
                    ("image", image),
                    ("left", Value::Int(4)),
                    ("top", Value::Int(0)),
                    ("right", Value::Int(0)),
                    ("bottom", Value::Int(2)),
                    ("feathering", Value::Int(2)),
                ],
            )
            .unwrap();
        let (canvas, dims) = values(&out[0]);
        assert_eq!(dims, [1, 10, 12, 3]);
        assert_eq!(canvas[0], 0.5, "margins are grey");
        assert_eq!(
            canvas[(12 + 4) * 3],
            1.0,
            "the image sits right of the left margin"
        );
        let (m, dims) = values(&out[1]);
        assert_eq!(dims, [1, 10, 12]);
        assert_eq!(m[0], 1.0, "the new margin is masked");
        // Row 0 of the image, its left edge: distance 0 to the padded left side.
        assert_eq!(m[4], 1.0);
        assert_eq!(m[5], 0.25, "one pixel in: ((2 - 1) / 2)^2");
        assert_eq!(m[6], 0.0, "past the feathering");
        assert_eq!(m[12 * 9], 1.0, "bottom margin: row 9, column 0");
    }

    #[test]
    fn composite_pastes_within_the_mask_and_clips_at_the_edge() {
        let rig = rig();
        let zeros = Tensor::zeros((1, 4, 4, 3), DType::F32, &Device::Cpu).unwrap();
        let ones = Tensor::ones((1, 2, 2, 3), DType::F32, &Device::Cpu).unwrap();
        let out = rig
            .run(
                &ImageCompositeMasked,
                &[
                    ("destination", Value::Image(zeros)),
                    ("source", Value::Image(ones)),
                    ("x", Value::Int(3)),
                    ("y", Value::Int(1)),
                    ("resize_source", Value::Boolean(false)),
                    ("mask", mask(&[&[1.0, 1.0], &[0.5, 0.5]])),
                ],
            )
            .unwrap();
        let (v, _) = values(&out[0]);
        let at = |row: usize, col: usize| v[(row * 4 + col) * 3];
        assert_eq!(
            (at(1, 3), at(2, 3), at(0, 3), at(1, 2)),
            (1.0, 0.5, 0.0, 0.0)
        );
    }

    #[test]
    fn crop_size_and_channels() {
        let rig = rig();
        let image = Tensor::arange(0f32, 48.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 4, 4, 3))
            .unwrap();
        let out = rig
            .run(
                &ImageCrop,
                &[
                    ("image", Value::Image(image.clone())),
                    ("width", Value::Int(512)),
                    ("height", Value::Int(2)),
                    ("x", Value::Int(2)),
                    ("y", Value::Int(9)),
                ],
            )
            .unwrap();
        let (v, dims) = values(&out[0]);
        assert_eq!(
            dims,
            [1, 1, 2, 3],
            "x past the edge is pulled back to the last row"
        );
        assert_eq!(v[0], ((3 * 4 + 2) * 3) as f32);
        let size = rig
            .run(&GetImageSize, &[("image", Value::Image(image.clone()))])
            .unwrap();
        assert!(matches!(
            size[..],
            [Value::Int(4), Value::Int(4), Value::Int(1)]
        ));
        let green = rig
            .run(
                &ImageToMask,
                &[
                    ("image", Value::Image(image.clone())),
                    ("channel", Value::String("green".into())),
                ],
            )
            .unwrap();
        assert_eq!(values(&green[0]).0[..2], [1.0, 4.0]);
        let alpha = rig.run(
            &ImageToMask,
            &[
                ("image", Value::Image(image)),
                ("channel", Value::String("alpha".into())),
            ],
        );
        assert!(matches!(alpha, Err(NodeError::InvalidInput(_))));
        let pixels = rig
            .run(
                &ImageScaleToTotalPixels,
                &[
                    (
                        "image",
                        Value::Image(
                            Tensor::zeros((1, 30, 60, 3), DType::F32, &Device::Cpu).unwrap(),
                        ),
                    ),
                    ("upscale_method", Value::String("bilinear".into())),
                    ("megapixels", Value::Float(0.01)),
                    ("resolution_steps", Value::Int(8)),
                ],
            )
            .unwrap();
        // 0.01 MP = 10485.76 px at 2:1 -> 144.8 x 72.4, to multiples of 8 -> 144 x 72.
        assert_eq!(values(&pixels[0]).1, [1, 72, 144, 3]);
    }
}
