//! Shapes before values exist: what each node will produce and how much memory it needs
//! while it runs, computed from its input shapes and literal inputs. Admission walks a plan
//! with these functions to find a job's peak memory and expected work before it starts,
//! and the nodes check the same sizes against the job's budget before they allocate.

use std::sync::Arc;

use sakuga_models::upscale::Upscaler;

use crate::builtin::diffusion::Latent;
use crate::error::NodeError;
use crate::node::{ExecContext, Inputs, NodeEnv};
use crate::port::PortType;
use crate::schema::NodeSchema;
use crate::value::Value;

/// Bytes of one tensor element as nodes hold images and latents (f32).
pub const ELEMENT_BYTES: u64 = 4;
/// Pixels per latent cell along one side (Stable Diffusion's VAE).
pub const LATENT_FACTOR: u64 = 8;
/// Channels of a Stable Diffusion latent.
pub const LATENT_CHANNELS: u64 = 4;

/// The size of a value a node will produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// An IMAGE `(batch, height, width, channels)` or a MASK (`channels` 1).
    Image {
        batch: u64,
        height: u64,
        width: u64,
        channels: u64,
    },
    /// A LATENT `(batch, channels, height, width)` in latent cells.
    Latent {
        batch: u64,
        channels: u64,
        height: u64,
        width: u64,
    },
    /// An upscale model that multiplies each image side by `scale`.
    Upscaler { scale: u64 },
    /// Anything whose size does not grow with the job: models (sized from their files),
    /// conditioning, scalars.
    Fixed,
}

impl Shape {
    /// An RGB image batch.
    pub fn image(batch: u64, height: u64, width: u64) -> Self {
        Shape::Image {
            batch,
            height,
            width,
            channels: 3,
        }
    }

    /// A Stable Diffusion latent batch for an image of `height x width` pixels.
    pub fn latent_for_pixels(batch: u64, height: u64, width: u64) -> Self {
        Shape::Latent {
            batch,
            channels: LATENT_CHANNELS,
            height: height / LATENT_FACTOR,
            width: width / LATENT_FACTOR,
        }
    }

    /// Elements of the tensor (0 for fixed-size values).
    pub fn elements(&self) -> u64 {
        match *self {
            Shape::Image {
                batch,
                height,
                width,
                channels,
            }
            | Shape::Latent {
                batch,
                channels,
                height,
                width,
            } => batch
                .saturating_mul(height)
                .saturating_mul(width)
                .saturating_mul(channels),
            Shape::Upscaler { .. } | Shape::Fixed => 0,
        }
    }

    /// Bytes the value occupies.
    pub fn bytes(&self) -> u64 {
        self.elements().saturating_mul(ELEMENT_BYTES)
    }

    /// The image size in pixels, `(batch, height, width)`; latents count their decoded pixels.
    pub fn pixels(&self) -> Option<(u64, u64, u64)> {
        match *self {
            Shape::Image {
                batch,
                height,
                width,
                ..
            } => Some((batch, height, width)),
            Shape::Latent {
                batch,
                height,
                width,
                ..
            } => Some((
                batch,
                height.saturating_mul(LATENT_FACTOR),
                width.saturating_mul(LATENT_FACTOR),
            )),
            Shape::Upscaler { .. } | Shape::Fixed => None,
        }
    }

    /// Batch size, 1 for fixed-size values.
    pub fn batch(&self) -> u64 {
        self.pixels().map_or(1, |(b, _, _)| b)
    }

    /// The same kind of value with its spatial size replaced (in the value's own units).
    pub fn resized(&self, height: u64, width: u64) -> Self {
        self.with_dims(|_, h, w| {
            *h = height;
            *w = width;
        })
    }

    /// The same value with its batch replaced.
    pub fn with_batch(&self, batch: u64) -> Self {
        self.with_dims(|b, _, _| *b = batch)
    }

    /// The same value with `change` applied to its batch, height and width (images and
    /// latents; other values have none).
    fn with_dims(&self, change: impl FnOnce(&mut u64, &mut u64, &mut u64)) -> Self {
        let mut out = *self;
        match &mut out {
            Shape::Image {
                batch,
                height,
                width,
                ..
            }
            | Shape::Latent {
                batch,
                height,
                width,
                ..
            } => change(batch, height, width),
            _ => {}
        }
        out
    }

    /// Spatial size `(height, width)` in the value's own units (pixels or latent cells).
    pub fn spatial(&self) -> Option<(u64, u64)> {
        match *self {
            Shape::Image { height, width, .. } | Shape::Latent { height, width, .. } => {
                Some((height, width))
            }
            Shape::Upscaler { .. } | Shape::Fixed => None,
        }
    }
}

/// What one node will cost: its output shapes, the memory it needs on top of its inputs
/// and outputs while it runs, and its work in units of one 512x512 image pass.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeCost {
    /// One shape per schema output, in order.
    pub outputs: Vec<Shape>,
    /// Scratch memory while it runs (copies, activations), beyond inputs and outputs.
    pub working_bytes: u64,
    /// Compute, in passes over a 512x512 image: a sampler's steps times its latent's size,
    /// a resize's output pixels.
    pub work: f64,
}

impl NodeCost {
    /// A node whose outputs are `outputs`, with no scratch memory and one unit of work per
    /// 512x512 of its largest output.
    pub fn outputs(outputs: Vec<Shape>) -> Self {
        let work = outputs.iter().map(megapasses).fold(0.0, f64::max);
        Self {
            outputs,
            working_bytes: 0,
            work,
        }
    }

    /// Adds scratch memory.
    pub fn working(mut self, bytes: u64) -> Self {
        self.working_bytes = self.working_bytes.saturating_add(bytes);
        self
    }

    /// Replaces the work figure.
    pub fn work(mut self, work: f64) -> Self {
        self.work = work;
        self
    }

    /// Bytes of every output together.
    pub fn output_bytes(&self) -> u64 {
        self.outputs
            .iter()
            .fold(0u64, |sum, s| sum.saturating_add(s.bytes()))
    }
}

/// Size of a shape in 512x512 image passes.
pub fn megapasses(shape: &Shape) -> f64 {
    shape
        .pixels()
        .map_or(0.0, |(b, h, w)| (b * h * w) as f64 / (512.0 * 512.0))
}

/// What a shape function sees: the node's literal inputs (converted to their types) and the
/// shapes flowing into its links.
#[derive(Debug)]
pub struct ShapeInputs<'a> {
    pub literals: &'a [(Arc<str>, Value)],
    pub links: Vec<(&'a str, Shape)>,
    /// The environment, for nodes whose output size depends on a file (LoadImage).
    pub env: Option<&'a NodeEnv>,
}

impl ShapeInputs<'_> {
    /// An INT literal, if given.
    pub fn int(&self, name: &str) -> Option<i64> {
        match self.literal(name)? {
            Value::Int(v) => Some(*v),
            Value::Float(v) => Some(*v as i64),
            _ => None,
        }
    }

    /// A non-negative INT literal, or `default` when it is missing.
    pub fn size(&self, name: &str, default: u64) -> u64 {
        self.int(name).map_or(default, |v| v.max(0) as u64)
    }

    /// A FLOAT literal (an INT widened), if given.
    pub fn float(&self, name: &str) -> Option<f64> {
        match self.literal(name)? {
            Value::Float(v) => Some(*v),
            Value::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// A STRING or COMBO literal, if given.
    pub fn str(&self, name: &str) -> Option<&str> {
        match self.literal(name)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The shape linked into `name`; [`Shape::Fixed`] when it is not linked.
    pub fn shape(&self, name: &str) -> Shape {
        self.links
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(Shape::Fixed, |(_, s)| *s)
    }

    fn literal(&self, name: &str) -> Option<&Value> {
        self.literals
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v)
    }
}

/// A node's shape function: its cost from its inputs' shapes and literals.
pub type ShapeFn = fn(&ShapeInputs<'_>) -> NodeCost;

/// The cost of a node that declares no shape function: every IMAGE, MASK or LATENT output
/// as large as the largest linked value of its kind, everything else fixed.
pub fn passthrough_cost(outputs: &[PortType], inputs: &ShapeInputs<'_>) -> NodeCost {
    let largest = |latent: bool| {
        inputs
            .links
            .iter()
            .map(|(_, s)| *s)
            .filter(|s| matches!(s, Shape::Latent { .. }) == latent)
            .max_by_key(Shape::bytes)
            .unwrap_or(Shape::Fixed)
    };
    let shapes = outputs
        .iter()
        .map(|port| match port {
            PortType::Image | PortType::Mask => largest(false),
            PortType::Latent => largest(true),
            _ => Shape::Fixed,
        })
        .collect();
    NodeCost::outputs(shapes)
}

/// Scaled size, rounded as the nodes round it, never below 1.
pub fn scaled(size: u64, factor: f64) -> u64 {
    let factor = if factor.is_finite() {
        factor.max(0.0)
    } else {
        0.0
    };
    ((size as f64 * factor).round() as u64).max(1)
}

/// The size a resize to `width` x `height` gives a `w` x `h` source, where 0 on one side
/// keeps the aspect ratio and 0 on both keeps the source size (ComfyUI's rule).
pub fn target_size(w: u64, h: u64, width: u64, height: u64) -> (u64, u64) {
    match (width, height) {
        (0, 0) => (w, h),
        (0, height) => (scaled(w, height as f64 / h.max(1) as f64), height),
        (width, 0) => (width, scaled(h, width as f64 / w.max(1) as f64)),
        both => both,
    }
}

impl ExecContext<'_> {
    /// Checks that allocating `bytes` fits the job's memory budget, so that a job past its
    /// budget fails with `oom` instead of taking the process down in the allocator. Nodes
    /// call it with the size of each large tensor they are about to create.
    ///
    /// # Errors
    /// [`NodeError::OverBudget`] when `bytes` is more than the budget.
    pub fn reserve(&self, what: &str, bytes: u64) -> Result<(), NodeError> {
        let budget = self.env.memory_budget();
        if bytes > budget {
            return Err(NodeError::OverBudget {
                what: what.to_string(),
                bytes,
                budget,
            });
        }
        Ok(())
    }

    /// Runs `schema`'s shape function on the node's real inputs and reserves its outputs
    /// and scratch memory: what an allocating node calls before it allocates.
    ///
    /// # Errors
    /// As [`ExecContext::reserve`].
    pub fn reserve_for(&self, schema: &NodeSchema, inputs: &Inputs) -> Result<NodeCost, NodeError> {
        let entries: Vec<(Arc<str>, Value)> = inputs
            .iter()
            .map(|(n, v)| (Arc::from(n), v.clone()))
            .collect();
        let links = inputs
            .iter()
            .filter_map(|(n, v)| shape_of(v).map(|s| (n, s)))
            .collect();
        let shape_inputs = ShapeInputs {
            literals: &entries,
            links,
            env: Some(self.env),
        };
        let cost = schema.cost(&shape_inputs);
        let bytes = cost.output_bytes().saturating_add(cost.working_bytes);
        self.reserve(
            &format!("{} (outputs and scratch memory)", schema.class_type),
            bytes,
        )?;
        Ok(cost)
    }
}

/// The shape of a value that exists.
pub fn shape_of(value: &Value) -> Option<Shape> {
    match value {
        Value::Image(t) => match *t.dims() {
            [b, h, w, c] => Some(Shape::Image {
                batch: b as u64,
                height: h as u64,
                width: w as u64,
                channels: c as u64,
            }),
            _ => None,
        },
        Value::Mask(t) => match *t.dims() {
            [b, h, w] => Some(Shape::Image {
                batch: b as u64,
                height: h as u64,
                width: w as u64,
                channels: 1,
            }),
            _ => None,
        },
        Value::Object(o) => {
            if let Some(latent) = o.downcast_ref::<Latent>() {
                let (b, c, h, w) = latent.samples.dims4().ok()?;
                Some(Shape::Latent {
                    batch: b as u64,
                    channels: c as u64,
                    height: h as u64,
                    width: w as u64,
                })
            } else {
                o.downcast_ref::<Upscaler>().map(|u| Shape::Upscaler {
                    scale: u.scale() as u64,
                })
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_saturate_instead_of_wrapping() {
        let huge = Shape::image(u64::MAX, 1 << 20, 1 << 20);
        assert_eq!(huge.bytes(), u64::MAX);
        assert_eq!(Shape::image(1, 8192, 8192).bytes(), 8192 * 8192 * 3 * 4);
        assert_eq!(
            Shape::latent_for_pixels(2, 512, 768).pixels(),
            Some((2, 512, 768))
        );
    }

    #[test]
    fn passthrough_keeps_the_largest_linked_value_of_each_kind() {
        let literals = Vec::new();
        let inputs = ShapeInputs {
            literals: &literals,
            links: vec![
                ("a", Shape::image(1, 64, 64)),
                ("b", Shape::image(2, 64, 64)),
                ("c", Shape::latent_for_pixels(1, 64, 64)),
            ],
            env: None,
        };
        let cost = passthrough_cost(
            &[PortType::Image, PortType::Latent, PortType::Model],
            &inputs,
        );
        assert_eq!(
            cost.outputs,
            vec![
                Shape::image(2, 64, 64),
                Shape::latent_for_pixels(1, 64, 64),
                Shape::Fixed
            ]
        );
    }
}
