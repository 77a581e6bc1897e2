//! Pure image nodes with ComfyUI's inputs and defaults: EmptyImage, LoadImage,
//! ImageInvert, ImageScale, ImageScaleBy, ImageBatch.

use std::sync::LazyLock;
use std::time::UNIX_EPOCH;

use candle_core::{DType, Tensor};

use super::MAX_RESOLUTION;
use crate::error::NodeError;
use crate::files::resolve_inside;
use crate::image::{RESIZE_METHODS, load_image, resize};
use crate::node::{ExecContext, Inputs, Node, NodeEnv};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{ComboOptions, DegradeKnob, InputSpec, NodeSchema};
use crate::shape::{NodeCost, Shape, ShapeInputs, scaled};
use crate::value::Value;
use sakuga_telemetry::Stage;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(EmptyImage);
    registry.register(LoadImage);
    registry.register(ImageInvert);
    registry.register(ImageScale);
    registry.register(ImageScaleBy);
    registry.register(ImageBatch);
}

fn dim(inputs: &Inputs, name: &str) -> Result<usize, NodeError> {
    let v = inputs.int(name)?;
    usize::try_from(v).map_err(|_| NodeError::InvalidInput(format!("{name} must be >= 0, got {v}")))
}

/// A batch of images filled with one colour.
struct EmptyImage;

static EMPTY_IMAGE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("EmptyImage", "EmptyImage", "image")
        .degrade(DegradeKnob::KeyFrames)
        .input(InputSpec::int("width", 512, 1, MAX_RESOLUTION))
        .input(InputSpec::int("height", 512, 1, MAX_RESOLUTION))
        .input(InputSpec::int("batch_size", 1, 1, 4096))
        .input(InputSpec::int("color", 0, 0, 0xFF_FFFF).tooltip("colour as 0xRRGGBB"))
        .output(PortType::Image)
        .shapes(|i| {
            NodeCost::outputs(vec![Shape::image(
                i.size("batch_size", 1),
                i.size("height", 512),
                i.size("width", 512),
            )])
        })
});

impl Node for EmptyImage {
    fn schema(&self) -> &NodeSchema {
        &EMPTY_IMAGE
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let (w, h, b) = (
            dim(inputs, "width")?,
            dim(inputs, "height")?,
            dim(inputs, "batch_size")?,
        );
        let color = inputs.int("color")?;
        let rgb =
            [(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF].map(|c| c as f32 / 255.0);
        let pixel = Tensor::new(&rgb, &ctx.env.device)?;
        let image = pixel
            .reshape((1, 1, 1, 3))?
            .broadcast_as((b, h, w, 3))?
            .contiguous()?;
        Ok(vec![Value::Image(image)])
    }
}

/// An image file from the input dir, with its alpha channel as a mask.
struct LoadImage;

static LOAD_IMAGE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("LoadImage", "Load Image", "image")
        .input(InputSpec::files("image", ComboOptions::InputFiles))
        .output(PortType::Image)
        .output(PortType::Mask)
        .shapes(load_image_cost)
});

/// Sized from the file's header; decoding holds the 8-bit RGBA pixels besides the outputs.
fn load_image_cost(i: &ShapeInputs<'_>) -> NodeCost {
    let (w, h) = i
        .env
        .zip(i.str("image"))
        .and_then(|(env, name)| resolve_inside(&env.input_dir, name).ok())
        .and_then(|path| ::image::ImageReader::open(path).ok())
        .and_then(|r| r.with_guessed_format().ok())
        .and_then(|r| r.into_dimensions().ok())
        .map_or((512, 512), |(w, h)| (u64::from(w), u64::from(h)));
    let mask = Shape::Image {
        batch: 1,
        height: h,
        width: w,
        channels: 1,
    };
    NodeCost::outputs(vec![Shape::image(1, h, w), mask]).working(w * h * 4)
}

impl Node for LoadImage {
    fn schema(&self) -> &NodeSchema {
        &LOAD_IMAGE
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let path = resolve_inside(&ctx.env.input_dir, inputs.str("image")?)?;
        let (image, mask) = load_image(&path, &ctx.env.device)?;
        Ok(vec![Value::Image(image), Value::Mask(mask)])
    }

    /// A changed file must not be served from the cache: key on its size and mtime.
    fn cache_salt(&self, env: &NodeEnv, inputs: &Inputs) -> Result<Option<String>, NodeError> {
        file_salt(env, inputs.str("image")?)
    }
}

/// The size and mtime of input file `name`, so a changed file is not served from the cache.
pub(super) fn file_salt(env: &NodeEnv, name: &str) -> Result<Option<String>, NodeError> {
    let path = resolve_inside(&env.input_dir, name)?;
    let meta = std::fs::metadata(&path).map_err(|source| NodeError::Io {
        op: "stat",
        path: path.clone(),
        source,
    })?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(Some(format!("{}:{mtime}", meta.len())))
}

/// `1 - image`.
struct ImageInvert;

static IMAGE_INVERT: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("ImageInvert", "Invert Image", "image")
        .input(InputSpec::link("image", PortType::Image))
        .output(PortType::Image)
});

impl Node for ImageInvert {
    fn schema(&self) -> &NodeSchema {
        &IMAGE_INVERT
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let image = inputs.image("image")?;
        Ok(vec![Value::Image(image.affine(-1.0, 1.0)?)])
    }
}

/// Crops the batch to `width:height` around its centre, as ComfyUI's `crop="center"`.
pub(super) fn center_crop_to_aspect(
    image: &Tensor,
    width: usize,
    height: usize,
) -> Result<Tensor, NodeError> {
    let (_, h, w, _) = image.dims4()?;
    let old_aspect = w as f64 / h as f64;
    let new_aspect = width as f64 / height as f64;
    if old_aspect > new_aspect {
        let keep = ((w as f64) * new_aspect / old_aspect).round().max(1.0) as usize;
        let x = (w - keep) / 2;
        Ok(image.narrow(2, x, keep)?)
    } else if old_aspect < new_aspect {
        let keep = ((h as f64) * old_aspect / new_aspect).round().max(1.0) as usize;
        let y = (h - keep) / 2;
        Ok(image.narrow(1, y, keep)?)
    } else {
        Ok(image.clone())
    }
}

/// Resize to an exact size; 0 keeps the aspect ratio from the other side.
struct ImageScale;

static IMAGE_SCALE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("ImageScale", "Upscale Image", "image/upscaling")
        .stage(Stage::Postprocess)
        .input(InputSpec::link("image", PortType::Image))
        .input(InputSpec::combo("upscale_method", RESIZE_METHODS))
        .input(InputSpec::int("width", 512, 0, MAX_RESOLUTION))
        .input(InputSpec::int("height", 512, 0, MAX_RESOLUTION))
        .input(InputSpec::combo("crop", &["disabled", "center"]))
        .output(PortType::Image)
        .shapes(|i| {
            let source = i.shape("image");
            let Some((h, w)) = source.spatial() else {
                return NodeCost::outputs(vec![source]);
            };
            let (width, height) =
                crate::shape::target_size(w, h, i.size("width", 512), i.size("height", 512));
            resize_cost(source, height, width)
        })
});

/// A resize holds a copy of its input and, per image, the source and destination buffers.
fn resize_cost(source: Shape, height: u64, width: u64) -> NodeCost {
    let out = source.resized(height, width);
    let batch = source.batch().max(1);
    let per_image = (source.bytes() + out.bytes()) / batch;
    NodeCost::outputs(vec![out]).working(source.bytes().saturating_add(per_image))
}

impl Node for ImageScale {
    fn schema(&self) -> &NodeSchema {
        &IMAGE_SCALE
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let image = inputs.image("image")?;
        let (_, h, w, _) = image.dims4()?;
        let (mut width, mut height) = (dim(inputs, "width")?, dim(inputs, "height")?);
        if width == 0 && height == 0 {
            return Ok(vec![Value::Image(image.clone())]);
        }
        if width == 0 {
            width = ((w * height) as f64 / h as f64).round().max(1.0) as usize;
        } else if height == 0 {
            height = ((h * width) as f64 / w as f64).round().max(1.0) as usize;
        }
        let source = match inputs.str("crop")? {
            "center" => center_crop_to_aspect(image, width, height)?,
            _ => image.clone(),
        };
        let method = inputs.str("upscale_method")?;
        Ok(vec![Value::Image(resize(
            &source,
            width as u32,
            height as u32,
            method,
        )?)])
    }
}

/// Resize by a factor.
struct ImageScaleBy;

static IMAGE_SCALE_BY: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("ImageScaleBy", "Upscale Image By", "image/upscaling")
        .stage(Stage::Postprocess)
        .input(InputSpec::link("image", PortType::Image))
        .input(InputSpec::combo("upscale_method", RESIZE_METHODS))
        .input(InputSpec::float("scale_by", 1.0, 0.01, 8.0, 0.01))
        .output(PortType::Image)
        .shapes(|i| {
            let source = i.shape("image");
            let factor = i.float("scale_by").unwrap_or(1.0);
            match source.spatial() {
                Some((h, w)) => resize_cost(source, scaled(h, factor), scaled(w, factor)),
                None => NodeCost::outputs(vec![source]),
            }
        })
});

impl Node for ImageScaleBy {
    fn schema(&self) -> &NodeSchema {
        &IMAGE_SCALE_BY
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let image = inputs.image("image")?;
        let (_, h, w, _) = image.dims4()?;
        let scale = inputs.float("scale_by")?;
        let width = (w as f64 * scale).round().max(1.0) as u32;
        let height = (h as f64 * scale).round().max(1.0) as u32;
        let method = inputs.str("upscale_method")?;
        Ok(vec![Value::Image(resize(image, width, height, method)?)])
    }
}

/// Concatenates two batches; the second is fitted to the first's size when they differ.
struct ImageBatch;

static IMAGE_BATCH: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("ImageBatch", "Batch Images", "image")
        .input(InputSpec::link("image1", PortType::Image))
        .input(InputSpec::link("image2", PortType::Image))
        .output(PortType::Image)
        .shapes(|i| {
            let (first, second) = (i.shape("image1"), i.shape("image2"));
            let joined = first.with_batch(first.batch().saturating_add(second.batch()));
            // The second batch is fitted to the first's size before the two are joined.
            let fitted = second.resized(
                first.spatial().map_or(0, |s| s.0),
                first.spatial().map_or(0, |s| s.1),
            );
            NodeCost::outputs(vec![joined]).working(fitted.bytes().saturating_mul(2))
        })
});

impl Node for ImageBatch {
    fn schema(&self) -> &NodeSchema {
        &IMAGE_BATCH
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let first = inputs.image("image1")?;
        let mut second = inputs.image("image2")?.clone();
        let (_, h, w, c) = first.dims4()?;
        let (_, h2, w2, c2) = second.dims4()?;
        if c != c2 {
            return Err(NodeError::InvalidInput(format!(
                "cannot batch images with {c} and {c2} channels"
            )));
        }
        if (h, w) != (h2, w2) {
            let cropped = center_crop_to_aspect(&second, w, h)?;
            second = resize(&cropped, w as u32, h as u32, "bilinear")?;
        }
        let joined = Tensor::cat(&[first, &second.to_dtype(DType::F32)?], 0)?;
        Ok(vec![Value::Image(joined)])
    }
}
