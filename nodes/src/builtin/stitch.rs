//! `ImageStitch` (`comfy_extras/nodes_images.py`): two images joined side by side or one
//! above the other, the second resized to the first's height (width) or both padded to
//! match, with an optional bar of spacing between: comic panels and before/after sheets.

use std::sync::LazyLock;

use candle_core::{DType, Tensor};

use crate::error::NodeError;
use crate::image::resize;
use crate::node::{ExecContext, Inputs, Node};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{InputSpec, NodeSchema};
use crate::value::Value;
use sakuga_telemetry::Stage;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(ImageStitch);
}

const DIRECTIONS: &[&str] = &["right", "down", "left", "up"];
const SPACING_COLORS: &[&str] = &["white", "black", "red", "green", "blue"];

static IMAGE_STITCH: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("ImageStitch", "Image Stitch", "image/transform")
        .stage(Stage::Postprocess)
        .description(
            "Stitches image2 to image1 in the specified direction.\nIf image2 is not provided, \
             returns image1 unchanged.\nOptional spacing can be added between images.",
        )
        .input(InputSpec::link("image1", PortType::Image))
        .input(InputSpec::combo("direction", DIRECTIONS))
        .input(InputSpec::boolean("match_image_size", true))
        .input(InputSpec::int_step("spacing_width", 0, 0, 1024, 2))
        .input(InputSpec::combo("spacing_color", SPACING_COLORS))
        .input(InputSpec::link("image2", PortType::Image).optional())
        .output(PortType::Image)
});

struct ImageStitch;

impl Node for ImageStitch {
    fn schema(&self) -> &NodeSchema {
        &IMAGE_STITCH
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let first = inputs.image("image1")?.to_dtype(DType::F32)?;
        if inputs.get("image2").is_none() {
            return Ok(vec![Value::Image(first)]);
        }
        let second = inputs.image("image2")?.to_dtype(DType::F32)?;
        let direction = inputs.str("direction")?;
        let sideways = matches!(direction, "left" | "right");
        let color = match inputs.str("spacing_color")? {
            "white" => [1.0, 1.0, 1.0],
            "black" => [0.0, 0.0, 0.0],
            "red" => [1.0, 0.0, 0.0],
            "green" => [0.0, 1.0, 0.0],
            _ => [0.0, 0.0, 1.0],
        };
        let (first, second) = same_batch(first, second)?;
        let (first, second) = if inputs.boolean("match_image_size")? {
            (first.clone(), matched(&first, &second, sideways)?)
        } else {
            // ComfyUI pads with the colour only when it is grey; a coloured one pads black.
            let grey = color[0] == color[1] && color[1] == color[2];
            let fill = if grey { color[0] } else { 0.0 };
            (
                padded(&first, &second, sideways, fill)?,
                padded(&second, &first, sideways, fill)?,
            )
        };
        let (first, second) = same_channels(first, second)?;
        let spacing = usize::try_from(inputs.int("spacing_width")?).unwrap_or(0);
        let axis = if sideways { 2 } else { 1 };
        let mut parts = if matches!(direction, "left" | "up") {
            vec![second.clone(), first.clone()]
        } else {
            vec![first.clone(), second.clone()]
        };
        if spacing > 0 {
            parts.insert(
                1,
                bar(&first, &second, spacing + spacing % 2, sideways, color)?,
            );
        }
        Ok(vec![Value::Image(Tensor::cat(&parts, axis)?)])
    }
}

/// Both batches as long as the longer, the shorter repeating its last image.
fn same_batch(a: Tensor, b: Tensor) -> Result<(Tensor, Tensor), NodeError> {
    let longest = a.dim(0)?.max(b.dim(0)?);
    let grow = |t: Tensor| -> Result<Tensor, NodeError> {
        let have = t.dim(0)?;
        if have == longest {
            return Ok(t);
        }
        let last = t
            .narrow(0, have - 1, 1)?
            .repeat((longest - have, 1, 1, 1))?;
        Ok(Tensor::cat(&[t, last], 0)?)
    };
    Ok((grow(a)?, grow(b)?))
}

/// `second` resized (lanczos) to `first`'s height keeping its aspect, or to its width.
fn matched(first: &Tensor, second: &Tensor, sideways: bool) -> Result<Tensor, NodeError> {
    let (_, h1, w1, _) = first.dims4()?;
    let (_, h2, w2, _) = second.dims4()?;
    let aspect = w2 as f64 / h2 as f64;
    let (width, height) = if sideways {
        ((h1 as f64 * aspect) as u32, h1 as u32)
    } else {
        (w1 as u32, (w1 as f64 / aspect) as u32)
    };
    resize(second, width, height, "lanczos")
}

/// `image` padded around its centre to `other`'s height (sideways) or width.
fn padded(image: &Tensor, other: &Tensor, sideways: bool, fill: f32) -> Result<Tensor, NodeError> {
    let axis = if sideways { 1 } else { 2 };
    let (have, want) = (image.dim(axis)?, other.dim(axis)?);
    if have >= want {
        return Ok(image.clone());
    }
    let before = (want - have) / 2;
    let block = |n: usize| -> Result<Tensor, NodeError> {
        let mut shape = image.dims().to_vec();
        shape[axis] = n;
        Ok(Tensor::full(fill, shape.as_slice(), image.device())?)
    };
    let after = want - have - before;
    let mut parts = Vec::with_capacity(3);
    if before > 0 {
        parts.push(block(before)?);
    }
    parts.push(image.clone());
    parts.push(block(after)?);
    Ok(Tensor::cat(&parts, axis)?)
}

/// Both with as many channels as the wider, the narrower filled with ones (opaque alpha).
fn same_channels(a: Tensor, b: Tensor) -> Result<(Tensor, Tensor), NodeError> {
    let widest = a.dim(3)?.max(b.dim(3)?);
    let widen = |t: Tensor| -> Result<Tensor, NodeError> {
        let (n, h, w, c) = t.dims4()?;
        if c == widest {
            return Ok(t);
        }
        let ones = Tensor::ones((n, h, w, widest - c), DType::F32, t.device())?;
        Ok(Tensor::cat(&[t, ones], 3)?)
    };
    Ok((widen(a)?, widen(b)?))
}

/// The spacing bar, `width` wide, as tall (wide) as the taller (wider) image.
fn bar(
    first: &Tensor,
    second: &Tensor,
    width: usize,
    sideways: bool,
    color: [f32; 3],
) -> Result<Tensor, NodeError> {
    let (n, h1, w1, channels) = first.dims4()?;
    let (_, h2, w2, _) = second.dims4()?;
    let (h, w) = if sideways {
        (h1.max(h2), width)
    } else {
        (width, w1.max(w2))
    };
    let mut pixel: Vec<f32> = color.iter().copied().take(channels).collect();
    pixel.resize(channels, 1.0);
    let pixel = Tensor::from_vec(pixel, (1, 1, 1, channels), first.device())?;
    Ok(pixel.broadcast_as((n, h, w, channels))?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::testing::Rig;

    fn stitch(
        a: &Tensor,
        b: Option<&Tensor>,
        direction: &str,
        matching: bool,
        spacing: i64,
        color: &str,
    ) -> Tensor {
        let rig = Rig::new(|_| {});
        let mut inputs = vec![
            ("image1", Value::Image(a.clone())),
            ("direction", Value::String(direction.into())),
            ("match_image_size", Value::Boolean(matching)),
            ("spacing_width", Value::Int(spacing)),
            ("spacing_color", Value::String(color.into())),
        ];
        if let Some(b) = b {
            inputs.push(("image2", Value::Image(b.clone())));
        }
        match rig.run(&ImageStitch, &inputs).unwrap().remove(0) {
            Value::Image(t) => t,
            _ => panic!("an image"),
        }
    }

    fn filled(n: usize, h: usize, w: usize, v: f32) -> Tensor {
        Tensor::full(v, (n, h, w, 3), &Device::Cpu).unwrap()
    }

    fn at(t: &Tensor, b: usize, y: usize, x: usize) -> Vec<f32> {
        t.get(b)
            .unwrap()
            .get(y)
            .unwrap()
            .get(x)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn stitches_as_comfyui_does() {
        let a = filled(1, 8, 6, 0.2);
        let b = filled(2, 4, 4, 0.7);
        // Right, matched: b becomes 8x8 (its aspect at a's height); batch 2 from a's last.
        let out = stitch(&a, Some(&b), "right", true, 0, "white");
        assert_eq!(out.dims(), &[2, 8, 14, 3]);
        assert_eq!(at(&out, 1, 0, 0), vec![0.2; 3]);
        assert!((at(&out, 0, 4, 10)[0] - 0.7).abs() < 1e-3);
        // Left puts image2 first; an odd spacing grows to even, in the colour.
        let out = stitch(&a, Some(&b), "left", true, 3, "red");
        assert_eq!(out.dims(), &[2, 8, 18, 3]);
        assert_eq!(at(&out, 0, 0, 9), vec![1.0, 0.0, 0.0]);
        assert_eq!(at(&out, 0, 0, 17), vec![0.2; 3]);
        // Down without matching pads the narrower around its centre (white pads white).
        let out = stitch(&a, Some(&b), "down", false, 0, "white");
        assert_eq!(out.dims(), &[2, 12, 6, 3]);
        assert_eq!(at(&out, 0, 10, 0), vec![1.0; 3]);
        assert_eq!(at(&out, 0, 10, 1), vec![0.7; 3]);
        assert_eq!(at(&out, 0, 10, 5), vec![1.0; 3]);
        // Without image2 the first passes through.
        assert_eq!(stitch(&a, None, "up", true, 0, "black").dims(), a.dims());
    }
}
