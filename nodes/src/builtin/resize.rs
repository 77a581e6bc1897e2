//! `ResizeImageMaskNode` ("Resize Image/Mask"): one node for images and masks whose
//! `resize_type` choice decides which size inputs it shows (a ComfyUI dynamic combo).

use std::sync::LazyLock;

use candle_core::Tensor;

use super::MAX_RESOLUTION;
use super::image::center_crop_to_aspect;
use crate::error::NodeError;
use crate::image::{RESIZE_METHODS, resize};
use crate::node::{ExecContext, Inputs, Node};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{DynamicOption, InputSpec, NodeSchema};
use crate::shape::{NodeCost, ShapeInputs};
use crate::value::Value;
use sakuga_telemetry::Stage;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(ResizeImageMask);
}

const SCALE_BY: &str = "scale by multiplier";
const DIMENSIONS: &str = "scale dimensions";
const LONGER: &str = "scale longer dimension";
const SHORTER: &str = "scale shorter dimension";
const WIDTH: &str = "scale width";
const HEIGHT: &str = "scale height";
const TOTAL_PIXELS: &str = "scale total pixels";
const MATCH_SIZE: &str = "match size";

static RESIZE_TYPES: &[DynamicOption] = &[
    (SCALE_BY, &["multiplier"]),
    (DIMENSIONS, &["width", "height", "crop"]),
    (LONGER, &["longer_size"]),
    (SHORTER, &["shorter_size"]),
    (WIDTH, &["width"]),
    (HEIGHT, &["height"]),
    (TOTAL_PIXELS, &["megapixels"]),
    (MATCH_SIZE, &["match", "crop"]),
];

const IMAGE_OR_MASK: &[PortType] = &[PortType::Image, PortType::Mask];

static RESIZE_IMAGE_MASK: LazyLock<NodeSchema> = LazyLock::new(|| {
    let side = |name| InputSpec::int(name, 512, 0, MAX_RESOLUTION).within("resize_type");
    let crop =
        InputSpec::combo("resize_type.crop", &["disabled", "center"]).default_choice("center");
    NodeSchema::new("ResizeImageMaskNode", "Resize Image/Mask", "transform")
        .stage(Stage::Postprocess)
        .input(InputSpec::match_type("input", "input_type").allowing(IMAGE_OR_MASK))
        .input(InputSpec::dynamic_combo("resize_type", RESIZE_TYPES))
        .input(
            InputSpec::float("resize_type.multiplier", 1.0, 0.01, 8.0, 0.01).within("resize_type"),
        )
        .input(side("resize_type.width"))
        .input(side("resize_type.height"))
        .input(crop.within("resize_type"))
        .input(side("resize_type.longer_size"))
        .input(side("resize_type.shorter_size"))
        .input(
            InputSpec::float("resize_type.megapixels", 1.0, 0.01, 16.0, 0.01).within("resize_type"),
        )
        .input(
            InputSpec::link("resize_type.match", PortType::Any)
                .allowing(IMAGE_OR_MASK)
                .within("resize_type"),
        )
        .input(InputSpec::combo("scale_method", RESIZE_METHODS).default_choice("area"))
        .named_output("resized", PortType::MatchType)
        .shapes(|i| {
            let source = i.shape("input");
            let Some((h, w)) = source.spatial() else {
                return NodeCost::outputs(vec![source]);
            };
            let request = Request::from_shape(i);
            match request.and_then(|r| r.target(w as usize, h as usize).ok()) {
                Some(Target { width, height, .. }) => {
                    let out = source.resized(height as u64, width as u64);
                    NodeCost::outputs(vec![out]).working(source.bytes().saturating_add(out.bytes()))
                }
                None => NodeCost::outputs(vec![source]),
            }
        })
});

/// The size the chosen `resize_type` asks for, with what it needs from the inputs.
enum Request {
    By(f64),
    Dimensions {
        width: usize,
        height: usize,
        crop: bool,
    },
    Longer(usize),
    Shorter(usize),
    TotalPixels(f64),
    Match {
        width: usize,
        height: usize,
        crop: bool,
    },
}

/// The output size, and whether the source is first cropped to its aspect ratio.
struct Target {
    width: usize,
    height: usize,
    crop: bool,
}

/// Python's `round`, which sakuga's ComfyUI counterpart uses for every size.
fn py_round(x: f64) -> usize {
    x.round_ties_even().max(0.0) as usize
}

/// What a request is read from: the node's inputs, or the literals admission sees.
struct Reading<'r> {
    choice: &'r str,
    side: &'r dyn Fn(&str) -> Option<usize>,
    number: &'r dyn Fn(&str) -> Option<f64>,
    crop: bool,
    /// `(height, width)` of the `match` input, where known.
    matched: Option<(usize, usize)>,
}

impl Request {
    /// `None` for an unknown choice or a missing input.
    fn parse(r: &Reading<'_>) -> Option<Self> {
        let crop = r.crop;
        Some(match r.choice {
            SCALE_BY => Request::By((r.number)("resize_type.multiplier")?),
            DIMENSIONS => Request::Dimensions {
                width: (r.side)("resize_type.width")?,
                height: (r.side)("resize_type.height")?,
                crop,
            },
            LONGER => Request::Longer((r.side)("resize_type.longer_size")?),
            SHORTER => Request::Shorter((r.side)("resize_type.shorter_size")?),
            WIDTH => Request::Dimensions {
                width: (r.side)("resize_type.width")?,
                height: 0,
                crop: false,
            },
            HEIGHT => Request::Dimensions {
                width: 0,
                height: (r.side)("resize_type.height")?,
                crop: false,
            },
            TOTAL_PIXELS => Request::TotalPixels((r.number)("resize_type.megapixels")?),
            MATCH_SIZE => {
                let (height, width) = r.matched?;
                Request::Match {
                    width,
                    height,
                    crop,
                }
            }
            _ => return None,
        })
    }

    fn read(inputs: &Inputs) -> Result<Self, NodeError> {
        let choice = inputs.str("resize_type")?;
        if !RESIZE_TYPES.iter().any(|(key, _)| *key == choice) {
            return Err(NodeError::InvalidInput(format!(
                "unknown resize_type {choice:?}"
            )));
        }
        let side = |name: &str| inputs.int(name).ok().and_then(|v| usize::try_from(v).ok());
        let number = |name: &str| inputs.float(name).ok();
        let matched = match inputs.get("resize_type.match") {
            Some(value) => Some(spatial(value)?),
            None => None,
        };
        let reading = Reading {
            choice,
            side: &side,
            number: &number,
            crop: inputs.str("resize_type.crop").is_ok_and(|c| c == "center"),
            matched,
        };
        Self::parse(&reading).ok_or_else(|| {
            NodeError::InvalidInput(format!(
                "resize_type {choice:?} lacks one of its inputs, or has a negative size"
            ))
        })
    }

    /// The same request from literals alone, for admission (no crop: it does not change
    /// the output size).
    fn from_shape(i: &ShapeInputs<'_>) -> Option<Self> {
        let side = |name: &str| i.int(name).map(|v| v.max(0) as usize);
        let number = |name: &str| i.float(name);
        let matched = i
            .shape("resize_type.match")
            .spatial()
            .map(|(h, w)| (h as usize, w as usize));
        Self::parse(&Reading {
            choice: i.str("resize_type")?,
            side: &side,
            number: &number,
            crop: false,
            matched,
        })
    }

    /// The size for a `w` x `h` source, by ComfyUI's rules (0 on one side of
    /// "scale dimensions" keeps the aspect ratio, 0 on both keeps the source).
    fn target(&self, w: usize, h: usize) -> Result<Target, NodeError> {
        let plain = |width, height| Target {
            width,
            height,
            crop: false,
        };
        let target = match *self {
            Request::By(m) => plain(py_round(w as f64 * m), py_round(h as f64 * m)),
            Request::Dimensions {
                width: 0,
                height: 0,
                ..
            } => plain(w, h),
            Request::Dimensions {
                width: 0,
                height,
                crop,
            } => Target {
                width: py_round(w as f64 * height as f64 / h as f64).max(1),
                height,
                crop,
            },
            Request::Dimensions {
                width,
                height: 0,
                crop,
            } => Target {
                width,
                height: py_round(h as f64 * width as f64 / w as f64).max(1),
                crop,
            },
            Request::Dimensions {
                width,
                height,
                crop,
            }
            | Request::Match {
                width,
                height,
                crop,
            } => Target {
                width,
                height,
                crop,
            },
            Request::Longer(size) if h > w => {
                plain(py_round(w as f64 / h as f64 * size as f64), size)
            }
            Request::Longer(size) if w > h => {
                plain(size, py_round(h as f64 / w as f64 * size as f64))
            }
            // ComfyUI 0.8.0 gives a portrait image a square here (its second branch repeats
            // the first condition); sakuga keeps the aspect ratio as the name says.
            Request::Shorter(size) if h < w => {
                plain(py_round(w as f64 / h as f64 * size as f64), size)
            }
            Request::Shorter(size) if w < h => {
                plain(size, py_round(h as f64 / w as f64 * size as f64))
            }
            Request::Longer(size) | Request::Shorter(size) => plain(size, size),
            Request::TotalPixels(megapixels) => {
                let total = (megapixels * 1024.0 * 1024.0).trunc();
                let scale = (total / (w * h) as f64).sqrt();
                plain(py_round(w as f64 * scale), py_round(h as f64 * scale))
            }
        };
        if target.width == 0 || target.height == 0 {
            return Err(NodeError::InvalidInput(format!(
                "resize_type {:?} gives a {}x{} result for a {w}x{h} input",
                self.name(),
                target.width,
                target.height
            )));
        }
        Ok(target)
    }

    fn name(&self) -> &'static str {
        match self {
            Request::By(_) => SCALE_BY,
            Request::Dimensions { .. } => DIMENSIONS,
            Request::Longer(_) => LONGER,
            Request::Shorter(_) => SHORTER,
            Request::TotalPixels(_) => TOTAL_PIXELS,
            Request::Match { .. } => MATCH_SIZE,
        }
    }
}

/// `(height, width)` of an IMAGE or MASK value.
fn spatial(value: &Value) -> Result<(usize, usize), NodeError> {
    match value {
        Value::Image(t) => {
            let (_, h, w, _) = t.dims4()?;
            Ok((h, w))
        }
        Value::Mask(t) => {
            let (_, h, w) = t.dims3()?;
            Ok((h, w))
        }
        other => Err(NodeError::InvalidInput(format!(
            "expected an IMAGE or MASK, got {}",
            other.type_name()
        ))),
    }
}

/// Resizes an image or a mask, keeping which of the two it is.
struct ResizeImageMask;

impl Node for ResizeImageMask {
    fn schema(&self) -> &NodeSchema {
        &RESIZE_IMAGE_MASK
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let input = inputs.required("input")?;
        let (h, w) = spatial(input)?;
        let target = Request::read(inputs)?.target(w, h)?;
        let method = inputs.str("scale_method")?;
        let scale = |image: &Tensor| -> Result<Tensor, NodeError> {
            let source = if target.crop {
                center_crop_to_aspect(image, target.width, target.height)?
            } else {
                image.clone()
            };
            resize(&source, target.width as u32, target.height as u32, method)
        };
        Ok(vec![match input {
            Value::Image(image) => Value::Image(scale(image)?),
            Value::Mask(mask) => Value::Mask(scale(&mask.unsqueeze(3)?)?.squeeze(3)?),
            _ => unreachable!("spatial accepts only images and masks"),
        }])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::shape::Shape;
    use crate::testing::Rig;

    fn image(h: usize, w: usize) -> Value {
        // Each pixel's value is its column, so crops and flips show.
        let data: Vec<f32> = (0..h * w * 3).map(|i| ((i / 3) % w) as f32).collect();
        Value::Image(Tensor::from_vec(data, (1, h, w, 3), &Device::Cpu).unwrap())
    }

    fn resized(input: Value, choice: &str, extra: &[(&str, Value)]) -> Result<Value, NodeError> {
        let mut inputs = vec![
            ("input", input),
            ("resize_type", Value::String(choice.into())),
            ("scale_method", Value::String("nearest-exact".into())),
        ];
        inputs.extend(extra.iter().cloned());
        Ok(Rig::new(|_| {}).run(&ResizeImageMask, &inputs)?.remove(0))
    }

    fn size(value: &Value) -> (usize, usize) {
        spatial(value).unwrap()
    }

    fn int(name: &str, v: i64) -> (&str, Value) {
        (name, Value::Int(v))
    }

    #[test]
    fn every_resize_type_gives_comfyuis_size() {
        let landscape = || image(6, 10);
        let portrait = || image(10, 6);
        let by = |m: f64| vec![("resize_type.multiplier", Value::Float(m))];
        assert_eq!(
            size(&resized(landscape(), SCALE_BY, &by(1.5)).unwrap()),
            (9, 15)
        );
        // Python rounds half to even: 6 * 1.25 = 7.5 -> 8, 10 * 1.25 = 12.5 -> 12.
        assert_eq!(
            size(&resized(landscape(), SCALE_BY, &by(1.25)).unwrap()),
            (8, 12)
        );
        let dims = |w, h| {
            vec![
                int("resize_type.width", w),
                int("resize_type.height", h),
                ("resize_type.crop", Value::String("disabled".into())),
            ]
        };
        assert_eq!(
            size(&resized(landscape(), DIMENSIONS, &dims(7, 5)).unwrap()),
            (5, 7)
        );
        assert_eq!(
            size(&resized(landscape(), DIMENSIONS, &dims(20, 0)).unwrap()),
            (12, 20)
        );
        assert_eq!(
            size(&resized(landscape(), DIMENSIONS, &dims(0, 0)).unwrap()),
            (6, 10)
        );
        let width = [int("resize_type.width", 5)];
        assert_eq!(size(&resized(landscape(), WIDTH, &width).unwrap()), (3, 5));
        let height = [int("resize_type.height", 12)];
        assert_eq!(
            size(&resized(landscape(), HEIGHT, &height).unwrap()),
            (12, 20)
        );
        let longer = [int("resize_type.longer_size", 20)];
        assert_eq!(
            size(&resized(landscape(), LONGER, &longer).unwrap()),
            (12, 20)
        );
        assert_eq!(
            size(&resized(portrait(), LONGER, &longer).unwrap()),
            (20, 12)
        );
        let shorter = [int("resize_type.shorter_size", 12)];
        assert_eq!(
            size(&resized(landscape(), SHORTER, &shorter).unwrap()),
            (12, 20)
        );
        assert_eq!(
            size(&resized(portrait(), SHORTER, &shorter).unwrap()),
            (20, 12)
        );
        // int(0.0001 * 2^20) = 104 pixels for 60: scale 1.3166 -> 13 x 8.
        let total = [("resize_type.megapixels", Value::Float(0.0001))];
        assert_eq!(
            size(&resized(landscape(), TOTAL_PIXELS, &total).unwrap()),
            (8, 13)
        );
    }

    #[test]
    fn masks_stay_masks_and_match_size_follows_the_other_input() {
        let mask =
            Value::Mask(Tensor::ones((2, 6, 10), candle_core::DType::F32, &Device::Cpu).unwrap());
        let out = resized(
            mask,
            MATCH_SIZE,
            &[
                ("resize_type.match", image(3, 4)),
                ("resize_type.crop", Value::String("disabled".into())),
            ],
        )
        .unwrap();
        let Value::Mask(t) = &out else {
            panic!("a mask in gives a mask out: {out:?}")
        };
        assert_eq!(t.dims(), &[2, 3, 4]);
        assert_eq!(t.min_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);
    }

    #[test]
    fn center_crop_keeps_the_middle_columns() {
        let out = resized(
            image(4, 8),
            DIMENSIONS,
            &[
                int("resize_type.width", 4),
                int("resize_type.height", 4),
                ("resize_type.crop", Value::String("center".into())),
            ],
        )
        .unwrap();
        let Value::Image(t) = out else { panic!() };
        let row: Vec<f32> = t
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(row, [2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn sizes_of_zero_and_unknown_choices_are_refused_by_name() {
        let err = resized(image(6, 10), LONGER, &[int("resize_type.longer_size", 0)]).unwrap_err();
        assert!(err.to_string().contains("scale longer dimension"), "{err}");
        let err = resized(image(6, 10), "scale sideways", &[]).unwrap_err();
        assert!(err.to_string().contains("scale sideways"), "{err}");
        let err = resized(
            Value::Int(3),
            SCALE_BY,
            &[("resize_type.multiplier", Value::Float(2.0))],
        )
        .unwrap_err();
        assert!(err.to_string().contains("IMAGE or MASK"), "{err}");
    }

    #[test]
    fn admission_sees_the_output_size() {
        let literals = [
            (
                std::sync::Arc::from("resize_type"),
                Value::String(SCALE_BY.into()),
            ),
            (
                std::sync::Arc::from("resize_type.multiplier"),
                Value::Float(2.0),
            ),
        ];
        let inputs = ShapeInputs {
            literals: &literals,
            links: vec![("input", Shape::image(1, 64, 32))],
            env: None,
        };
        let cost = RESIZE_IMAGE_MASK.cost(&inputs);
        assert_eq!(cost.outputs[0], Shape::image(1, 128, 64));
    }
}
