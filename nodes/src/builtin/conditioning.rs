//! Conditioning edits with ComfyUI's class types and inputs (`nodes.py`): combining prompts
//! (`ConditioningCombine`, `ConditioningConcat`, `ConditioningAverage`), placing them
//! (`ConditioningSetArea`, `ConditioningSetAreaPercentage`, `ConditioningSetAreaStrength`,
//! `ConditioningSetMask`) and `ConditioningZeroOut`. The sampler runs each combined prompt
//! on its area or mask and averages them by weight.

use std::sync::LazyLock;

use candle_core::Tensor;
use sakuga_models::diffusion::{Area, TextConditioning};

use super::MAX_RESOLUTION;
use super::diffusion::Conditioning;
use crate::error::NodeError;
use crate::node::{ExecContext, Inputs, Node};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{InputSpec, NodeSchema};
use crate::value::Value;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(ConditioningCombine);
    registry.register(ConditioningConcat);
    registry.register(ConditioningAverage);
    registry.register(ConditioningSetArea);
    registry.register(ConditioningSetAreaPercentage);
    registry.register(ConditioningSetAreaStrength);
    registry.register(ConditioningSetMask);
    registry.register(ConditioningZeroOut);
    registry.register(LotusConditioning);
}

/// `name`'s prompts, each changed by `edit`.
fn edited(
    inputs: &Inputs,
    name: &str,
    edit: impl Fn(&mut TextConditioning) -> Result<(), NodeError>,
) -> Result<Vec<Value>, NodeError> {
    let conditioning = inputs.object::<Conditioning>(name)?;
    let entries = conditioning
        .entries
        .iter()
        .map(|c| {
            let mut c = c.clone();
            edit(&mut c)?;
            Ok(c)
        })
        .collect::<Result<_, NodeError>>()?;
    Ok(vec![Value::object(Conditioning { entries })])
}

/// The first prompt of `name` (ComfyUI reads only that one where it takes one).
fn first(inputs: &Inputs, name: &str) -> Result<TextConditioning, NodeError> {
    inputs
        .object::<Conditioning>(name)?
        .entries
        .first()
        .cloned()
        .ok_or_else(|| NodeError::InvalidInput(format!("{name} holds no prompt")))
}

static COMBINE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "ConditioningCombine",
        "Conditioning (Combine)",
        "conditioning",
    )
    .input(InputSpec::link("conditioning_1", PortType::Conditioning))
    .input(InputSpec::link("conditioning_2", PortType::Conditioning))
    .output(PortType::Conditioning)
});

struct ConditioningCombine;

impl Node for ConditioningCombine {
    fn schema(&self) -> &NodeSchema {
        &COMBINE
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let mut entries = inputs
            .object::<Conditioning>("conditioning_1")?
            .entries
            .clone();
        entries.extend(
            inputs
                .object::<Conditioning>("conditioning_2")?
                .entries
                .iter()
                .cloned(),
        );
        Ok(vec![Value::object(Conditioning { entries })])
    }
}

static CONCAT: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "ConditioningConcat",
        "Conditioning (Concat)",
        "conditioning",
    )
    .input(InputSpec::link("conditioning_to", PortType::Conditioning))
    .input(InputSpec::link("conditioning_from", PortType::Conditioning))
    .output(PortType::Conditioning)
});

struct ConditioningConcat;

impl Node for ConditioningConcat {
    fn schema(&self) -> &NodeSchema {
        &CONCAT
    }

    /// Each `to` prompt with the first `from` prompt's tokens appended.
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let from = first(inputs, "conditioning_from")?.context;
        edited(inputs, "conditioning_to", |c| {
            c.context = Tensor::cat(&[&c.context, &from], 1)?;
            Ok(())
        })
    }
}

static AVERAGE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("ConditioningAverage", "ConditioningAverage", "conditioning")
        .input(InputSpec::link("conditioning_to", PortType::Conditioning))
        .input(InputSpec::link("conditioning_from", PortType::Conditioning))
        .input(InputSpec::float(
            "conditioning_to_strength",
            1.0,
            0.0,
            1.0,
            0.01,
        ))
        .output(PortType::Conditioning)
});

struct ConditioningAverage;

impl Node for ConditioningAverage {
    fn schema(&self) -> &NodeSchema {
        &AVERAGE
    }

    /// Each `to` prompt blended with the first `from` one (`to * s + from * (1 - s)`), the
    /// shorter token list padded with zeros; pooled outputs blend alike.
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let from = first(inputs, "conditioning_from")?;
        let weight = inputs.float("conditioning_to_strength")?;
        edited(inputs, "conditioning_to", |c| {
            let (to_len, from_len) = (c.context.dim(1)?, from.context.dim(1)?);
            let to = c
                .context
                .pad_with_zeros(1, 0, from_len.saturating_sub(to_len))?;
            let other = from.context.narrow(1, 0, from_len.min(to.dim(1)?))?;
            let other = other.pad_with_zeros(1, 0, to.dim(1)? - other.dim(1)?)?;
            c.context = ((to * weight)? + (other * (1.0 - weight))?)?;
            if let (Some(p), Some(q)) = (&c.pooled, &from.pooled) {
                c.pooled = Some(((p * weight)? + (q * (1.0 - weight))?)?);
            }
            Ok(())
        })
    }
}

static SET_AREA: LazyLock<NodeSchema> = LazyLock::new(|| {
    let side = |name, default, min| InputSpec::int_step(name, default, min, MAX_RESOLUTION, 8);
    NodeSchema::new(
        "ConditioningSetArea",
        "Conditioning (Set Area)",
        "conditioning",
    )
    .input(InputSpec::link("conditioning", PortType::Conditioning))
    .input(side("width", 64, 64))
    .input(side("height", 64, 64))
    .input(side("x", 0, 0))
    .input(side("y", 0, 0))
    .input(InputSpec::float("strength", 1.0, 0.0, 10.0, 0.01))
    .output(PortType::Conditioning)
});

struct ConditioningSetArea;

impl Node for ConditioningSetArea {
    fn schema(&self) -> &NodeSchema {
        &SET_AREA
    }

    /// The area in pixels, as latent cells (/ 8, rounded down).
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let cells = |name: &str| -> Result<usize, NodeError> {
            Ok(usize::try_from(inputs.int(name)?).unwrap_or(0) / 8)
        };
        let area = Area::Cells(cells("height")?, cells("width")?, cells("y")?, cells("x")?);
        let strength = inputs.float("strength")?;
        edited(inputs, "conditioning", |c| {
            c.area = Some(area);
            c.strength = strength;
            Ok(())
        })
    }
}

static SET_AREA_PERCENTAGE: LazyLock<NodeSchema> = LazyLock::new(|| {
    let fraction = |name, default| InputSpec::float(name, default, 0.0, 1.0, 0.01);
    NodeSchema::new(
        "ConditioningSetAreaPercentage",
        "Conditioning (Set Area with Percentage)",
        "conditioning",
    )
    .input(InputSpec::link("conditioning", PortType::Conditioning))
    .input(fraction("width", 1.0))
    .input(fraction("height", 1.0))
    .input(fraction("x", 0.0))
    .input(fraction("y", 0.0))
    .input(InputSpec::float("strength", 1.0, 0.0, 10.0, 0.01))
    .output(PortType::Conditioning)
});

struct ConditioningSetAreaPercentage;

impl Node for ConditioningSetAreaPercentage {
    fn schema(&self) -> &NodeSchema {
        &SET_AREA_PERCENTAGE
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let area = Area::Fraction(
            inputs.float("height")?,
            inputs.float("width")?,
            inputs.float("y")?,
            inputs.float("x")?,
        );
        let strength = inputs.float("strength")?;
        edited(inputs, "conditioning", |c| {
            c.area = Some(area);
            c.strength = strength;
            Ok(())
        })
    }
}

static SET_AREA_STRENGTH: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "ConditioningSetAreaStrength",
        "ConditioningSetAreaStrength",
        "conditioning",
    )
    .input(InputSpec::link("conditioning", PortType::Conditioning))
    .input(InputSpec::float("strength", 1.0, 0.0, 10.0, 0.01))
    .output(PortType::Conditioning)
});

struct ConditioningSetAreaStrength;

impl Node for ConditioningSetAreaStrength {
    fn schema(&self) -> &NodeSchema {
        &SET_AREA_STRENGTH
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let strength = inputs.float("strength")?;
        edited(inputs, "conditioning", |c| {
            c.strength = strength;
            Ok(())
        })
    }
}

static SET_MASK: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "ConditioningSetMask",
        "Conditioning (Set Mask)",
        "conditioning",
    )
    .input(InputSpec::link("conditioning", PortType::Conditioning))
    .input(InputSpec::link("mask", PortType::Mask))
    .input(InputSpec::float("strength", 1.0, 0.0, 10.0, 0.01))
    .input(InputSpec::combo(
        "set_cond_area",
        &["default", "mask bounds"],
    ))
    .output(PortType::Conditioning)
});

struct ConditioningSetMask;

impl Node for ConditioningSetMask {
    fn schema(&self) -> &NodeSchema {
        &SET_MASK
    }

    /// The prompt applies where the mask is, scaled by `strength`; with "mask bounds" it
    /// also runs on the mask's bounding box only.
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let mask = inputs.mask("mask")?.clone();
        let strength = inputs.float("strength")?;
        let bounds = inputs.str("set_cond_area")? == "mask bounds";
        edited(inputs, "conditioning", |c| {
            c.mask = Some((mask.clone(), strength));
            if bounds {
                c.area = Some(Area::MaskBounds);
            }
            Ok(())
        })
    }
}

static CONDITIONING_ZERO_OUT: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "ConditioningZeroOut",
        "ConditioningZeroOut",
        "advanced/conditioning",
    )
    .input(InputSpec::link("conditioning", PortType::Conditioning))
    .output(PortType::Conditioning)
});

struct ConditioningZeroOut;

impl Node for ConditioningZeroOut {
    fn schema(&self) -> &NodeSchema {
        &CONDITIONING_ZERO_OUT
    }

    /// Every context and pooled embedding as zeros (sizes, areas and masks stay).
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let conditioning = inputs.object::<Conditioning>("conditioning")?;
        let entries = conditioning
            .entries
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.context = c.context.zeros_like()?;
                c.pooled = c.pooled.map(|p| p.zeros_like()).transpose()?;
                Ok(c)
            })
            .collect::<Result<_, NodeError>>()?;
        Ok(vec![Value::object(Conditioning { entries })])
    }
}

/// LotusConditioning: the fixed prompt Lotus was trained with (a frozen text encoder on an
/// empty prompt), as ComfyUI inlines it; `nodes/assets/make_lotus_conditioning.py` copies
/// it from ComfyUI's node, float16 exactly.
struct LotusConditioning;

static LOTUS_CONDITIONING: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "LotusConditioning",
        "LotusConditioning",
        "conditioning/lotus",
    )
    .named_output("conditioning", PortType::Conditioning)
});

const LOTUS_PROMPT: &[u8] = include_bytes!("../../assets/lotus_conditioning.safetensors");

impl Node for LotusConditioning {
    fn schema(&self) -> &NodeSchema {
        &LOTUS_CONDITIONING
    }

    fn execute(&self, ctx: &ExecContext<'_>, _: &Inputs) -> Result<Vec<Value>, NodeError> {
        let mut tensors = candle_core::safetensors::load_buffer(LOTUS_PROMPT, &ctx.env.device)?;
        let embeds = tensors
            .remove("prompt_embeds")
            .ok_or_else(|| NodeError::InvalidInput("the built-in Lotus prompt is missing".into()))?
            .to_dtype(candle_core::DType::F32)?;
        Ok(vec![Value::object(Conditioning::one(
            TextConditioning::context(embeds),
        ))])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::testing::Rig;

    fn prompt(tokens: usize, value: f32) -> Value {
        let context = Tensor::full(value, (1, tokens, 4), &Device::Cpu).unwrap();
        Value::object(Conditioning::one(TextConditioning::context(context)))
    }

    fn entries(v: &Value) -> Vec<TextConditioning> {
        let Value::Object(o) = v else { panic!() };
        o.clone()
            .downcast::<Conditioning>()
            .unwrap()
            .entries
            .clone()
    }

    #[test]
    fn combine_concat_average_and_areas_shape_the_prompts() {
        let rig = Rig::new(|_| {});
        let (a, b) = (prompt(77, 1.0), prompt(154, 3.0));
        let combined = rig
            .run(
                &ConditioningCombine,
                &[("conditioning_1", a.clone()), ("conditioning_2", b.clone())],
            )
            .unwrap();
        assert_eq!(entries(&combined[0]).len(), 2);
        let concat = rig
            .run(
                &ConditioningConcat,
                &[
                    ("conditioning_to", a.clone()),
                    ("conditioning_from", b.clone()),
                ],
            )
            .unwrap();
        assert_eq!(entries(&concat[0])[0].context.dims(), &[1, 231, 4]);
        let average = rig
            .run(
                &ConditioningAverage,
                &[
                    ("conditioning_to", a.clone()),
                    ("conditioning_from", b),
                    ("conditioning_to_strength", Value::Float(0.25)),
                ],
            )
            .unwrap();
        let averaged = entries(&average[0])[0]
            .context
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(averaged.dims(), &[1, 154, 4], "padded to the longer prompt");
        let values: Vec<f32> = averaged.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!((values[0], values[77 * 4]), (0.25 + 2.25, 2.25));
        let placed = rig
            .run(
                &ConditioningSetArea,
                &[
                    ("conditioning", combined[0].clone()),
                    ("width", Value::Int(256)),
                    ("height", Value::Int(128)),
                    ("x", Value::Int(64)),
                    ("y", Value::Int(8)),
                    ("strength", Value::Float(0.5)),
                ],
            )
            .unwrap();
        for entry in entries(&placed[0]) {
            assert_eq!(entry.area, Some(Area::Cells(16, 32, 1, 8)));
            assert_eq!(entry.strength, 0.5);
        }
        let zero = rig
            .run(&ConditioningZeroOut, &[("conditioning", a)])
            .unwrap();
        let max: f32 = entries(&zero[0])[0]
            .context
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(max, 0.0);
    }
}
