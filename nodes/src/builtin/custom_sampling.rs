//! ComfyUI's custom-sampling nodes (`comfy_extras/nodes_custom_sampler.py`), with their
//! class types, inputs, defaults and ranges: a sampling run taken apart into its sampler
//! (`KSamplerSelect`), sigmas (`BasicScheduler`, `SDTurboScheduler`, `ManualSigmas`,
//! `SetFirstSigma`, `SplitSigmas`), noise (`RandomNoise`, `DisableNoise`) and guider
//! (`CFGGuider`, `BasicGuider`), put back together by `SamplerCustom` and
//! `SamplerCustomAdvanced`. Both run the same sampling pass as `KSampler`.

use std::sync::{Arc, LazyLock};

use sakuga_models::diffusion::{SampleParams, SamplerKind, Scheduler};
use sakuga_telemetry::Stage;

use super::diffusion::{
    Conditioning, DiffusionModel, Latent, SAMPLER_NAMES, SCHEDULER_NAMES, sample_with_mask,
    sampler_cost,
};
use crate::error::NodeError;
use crate::node::{ExecContext, Inputs, Node};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{DegradeKnob, InputSpec, NodeSchema};
use crate::value::Value;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(KSamplerSelect);
    registry.register(BasicScheduler);
    registry.register(SdTurboScheduler);
    registry.register(ManualSigmas);
    registry.register(SetFirstSigma);
    registry.register(SplitSigmas);
    registry.register(RandomNoise);
    registry.register(DisableNoise);
    registry.register(CfgGuider);
    registry.register(BasicGuider);
    registry.register(SamplerCustom);
    registry.register(SamplerCustomAdvanced);
}

/// SAMPLER: which update rule a custom sampling run uses.
#[derive(Debug, Clone, Copy)]
pub struct SamplerChoice(pub SamplerKind);

/// SIGMAS: the noise levels a run visits, highest first.
#[derive(Debug, Clone)]
pub struct Sigmas(pub Vec<f64>);

/// NOISE: the seed of the initial noise, or none at all.
#[derive(Debug, Clone, Copy)]
pub struct NoiseSpec(pub Option<u64>);

/// GUIDER: the model with its conditioning and CFG scale.
#[derive(Debug, Clone)]
pub struct Guider {
    model: Arc<DiffusionModel>,
    positive: Arc<Conditioning>,
    /// `None` for `BasicGuider`: the positive prompt alone, CFG 1.
    negative: Option<Arc<Conditioning>>,
    cfg: f64,
}

fn sigmas_of(inputs: &Inputs, name: &str) -> Result<Vec<f64>, NodeError> {
    Ok(inputs.object::<Sigmas>(name)?.0.clone())
}

const SCHEDULERS: &str = "sampling/custom_sampling/schedulers";
const SIGMAS: &str = "sampling/custom_sampling/sigmas";

static KSAMPLER_SELECT: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "KSamplerSelect",
        "KSamplerSelect",
        "sampling/custom_sampling/samplers",
    )
    .input(InputSpec::combo("sampler_name", SAMPLER_NAMES.as_slice()))
    .output(PortType::Sampler)
});

struct KSamplerSelect;

impl Node for KSamplerSelect {
    fn schema(&self) -> &NodeSchema {
        &KSAMPLER_SELECT
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let name = inputs.str("sampler_name")?;
        let kind = SamplerKind::from_name(name)
            .ok_or_else(|| NodeError::InvalidInput(format!("unknown sampler {name:?}")))?;
        Ok(vec![Value::object(SamplerChoice(kind))])
    }
}

static BASIC_SCHEDULER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("BasicScheduler", "BasicScheduler", SCHEDULERS)
        .degrade(DegradeKnob::Steps)
        .input(InputSpec::link("model", PortType::Model))
        .input(InputSpec::combo("scheduler", SCHEDULER_NAMES.as_slice()))
        .input(InputSpec::int("steps", 20, 1, 10000))
        .input(InputSpec::float("denoise", 1.0, 0.0, 1.0, 0.01))
        .output(PortType::Sigmas)
});

struct BasicScheduler;

impl Node for BasicScheduler {
    fn schema(&self) -> &NodeSchema {
        &BASIC_SCHEDULER
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let model = inputs.object::<DiffusionModel>("model")?;
        let name = inputs.str("scheduler")?;
        let scheduler = Scheduler::from_name(name)
            .ok_or_else(|| NodeError::InvalidInput(format!("unknown scheduler {name:?}")))?;
        let steps = steps_input(inputs)?;
        let sigmas = model
            .unet
            .sampling()
            .basic(scheduler, steps, inputs.float("denoise")?);
        Ok(vec![Value::object(Sigmas(sigmas))])
    }
}

fn steps_input(inputs: &Inputs) -> Result<usize, NodeError> {
    let steps = inputs.int("steps")?;
    usize::try_from(steps)
        .map_err(|_| NodeError::InvalidInput(format!("steps must be >= 1, got {steps}")))
}

static SD_TURBO_SCHEDULER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("SDTurboScheduler", "SDTurboScheduler", SCHEDULERS)
        .input(InputSpec::link("model", PortType::Model))
        .input(InputSpec::int("steps", 1, 1, 10))
        .input(InputSpec::float("denoise", 1.0, 0.0, 1.0, 0.01))
        .output(PortType::Sigmas)
});

struct SdTurboScheduler;

impl Node for SdTurboScheduler {
    fn schema(&self) -> &NodeSchema {
        &SD_TURBO_SCHEDULER
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let model = inputs.object::<DiffusionModel>("model")?;
        let sigmas = model
            .unet
            .sampling()
            .sd_turbo(steps_input(inputs)?, inputs.float("denoise")?);
        Ok(vec![Value::object(Sigmas(sigmas))])
    }
}

static MANUAL_SIGMAS: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "ManualSigmas",
        "ManualSigmas",
        "_for_testing/custom_sampling",
    )
    .input(InputSpec::string("sigmas", "1, 0.5", false))
    .output(PortType::Sigmas)
});

struct ManualSigmas;

impl Node for ManualSigmas {
    fn schema(&self) -> &NodeSchema {
        &MANUAL_SIGMAS
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let sigmas = parse_sigmas(inputs.str("sigmas")?)?;
        Ok(vec![Value::object(Sigmas(sigmas))])
    }
}

/// Every number in `text`, whatever separates them (ComfyUI scans with a regex too).
fn parse_sigmas(text: &str) -> Result<Vec<f64>, NodeError> {
    let is_part = |c: char| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E');
    text.split(|c: char| !is_part(c))
        .filter(|token| !token.is_empty())
        .map(|token| {
            token
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    NodeError::InvalidInput(format!("sigmas: {token:?} is not a number"))
                })
        })
        .collect()
}

static SET_FIRST_SIGMA: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("SetFirstSigma", "SetFirstSigma", SIGMAS)
        .input(InputSpec::link("sigmas", PortType::Sigmas))
        .input(InputSpec::float("sigma", 136.0, 0.0, 20000.0, 0.001))
        .output(PortType::Sigmas)
});

struct SetFirstSigma;

impl Node for SetFirstSigma {
    fn schema(&self) -> &NodeSchema {
        &SET_FIRST_SIGMA
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let mut sigmas = sigmas_of(inputs, "sigmas")?;
        if let Some(first) = sigmas.first_mut() {
            *first = inputs.float("sigma")?;
        }
        Ok(vec![Value::object(Sigmas(sigmas))])
    }
}

static SPLIT_SIGMAS: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("SplitSigmas", "SplitSigmas", SIGMAS)
        .input(InputSpec::link("sigmas", PortType::Sigmas))
        .input(InputSpec::int("step", 0, 0, 10000))
        .named_output("high_sigmas", PortType::Sigmas)
        .named_output("low_sigmas", PortType::Sigmas)
});

struct SplitSigmas;

impl Node for SplitSigmas {
    fn schema(&self) -> &NodeSchema {
        &SPLIT_SIGMAS
    }

    /// `sigmas[..=step]` and `sigmas[step..]`: the step's sigma ends one and starts the
    /// other, so the two halves chain.
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let sigmas = sigmas_of(inputs, "sigmas")?;
        let step = usize::try_from(inputs.int("step")?).unwrap_or(0);
        let high = sigmas[..(step + 1).min(sigmas.len())].to_vec();
        let low = sigmas[step.min(sigmas.len())..].to_vec();
        Ok(vec![
            Value::object(Sigmas(high)),
            Value::object(Sigmas(low)),
        ])
    }
}

static RANDOM_NOISE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "RandomNoise",
        "RandomNoise",
        "sampling/custom_sampling/noise",
    )
    .input(InputSpec::seed("noise_seed"))
    .output(PortType::Noise)
});

struct RandomNoise;

impl Node for RandomNoise {
    fn schema(&self) -> &NodeSchema {
        &RANDOM_NOISE
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let seed = inputs.int("noise_seed")? as u64;
        Ok(vec![Value::object(NoiseSpec(Some(seed)))])
    }
}

static DISABLE_NOISE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "DisableNoise",
        "DisableNoise",
        "sampling/custom_sampling/noise",
    )
    .output(PortType::Noise)
});

struct DisableNoise;

impl Node for DisableNoise {
    fn schema(&self) -> &NodeSchema {
        &DISABLE_NOISE
    }

    fn execute(&self, _: &ExecContext<'_>, _: &Inputs) -> Result<Vec<Value>, NodeError> {
        Ok(vec![Value::object(NoiseSpec(None))])
    }
}

static CFG_GUIDER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("CFGGuider", "CFGGuider", "sampling/custom_sampling/guiders")
        .input(InputSpec::link("model", PortType::Model))
        .input(InputSpec::link("positive", PortType::Conditioning))
        .input(InputSpec::link("negative", PortType::Conditioning))
        .input(InputSpec::float("cfg", 8.0, 0.0, 100.0, 0.1))
        .output(PortType::Guider)
});

struct CfgGuider;

impl Node for CfgGuider {
    fn schema(&self) -> &NodeSchema {
        &CFG_GUIDER
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        Ok(vec![Value::object(Guider {
            model: inputs.object::<DiffusionModel>("model")?,
            positive: inputs.object::<Conditioning>("positive")?,
            negative: Some(inputs.object::<Conditioning>("negative")?),
            cfg: inputs.float("cfg")?,
        })])
    }
}

static BASIC_GUIDER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "BasicGuider",
        "BasicGuider",
        "sampling/custom_sampling/guiders",
    )
    .input(InputSpec::link("model", PortType::Model))
    .input(InputSpec::link("conditioning", PortType::Conditioning))
    .output(PortType::Guider)
});

struct BasicGuider;

impl Node for BasicGuider {
    fn schema(&self) -> &NodeSchema {
        &BASIC_GUIDER
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        Ok(vec![Value::object(Guider {
            model: inputs.object::<DiffusionModel>("model")?,
            positive: inputs.object::<Conditioning>("conditioning")?,
            negative: None,
            cfg: 1.0,
        })])
    }
}

fn custom_sampler_schema(schema: NodeSchema) -> NodeSchema {
    schema
        .stage(Stage::Inference)
        .ends_inference()
        .input(InputSpec::link("sampler", PortType::Sampler))
        .input(InputSpec::link("sigmas", PortType::Sigmas))
        .input(InputSpec::link("latent_image", PortType::Latent))
        .named_output("output", PortType::Latent)
        .named_output("denoised_output", PortType::Latent)
        .shapes(|i| {
            let mut cost = sampler_cost(i);
            cost.outputs.push(cost.outputs[0]);
            cost
        })
}

static SAMPLER_CUSTOM: LazyLock<NodeSchema> = LazyLock::new(|| {
    custom_sampler_schema(
        NodeSchema::new("SamplerCustom", "SamplerCustom", "sampling/custom_sampling")
            .input(InputSpec::link("model", PortType::Model))
            .input(InputSpec::boolean("add_noise", true))
            .input(InputSpec::seed("noise_seed"))
            .input(InputSpec::float("cfg", 8.0, 0.0, 100.0, 0.1))
            .input(InputSpec::link("positive", PortType::Conditioning))
            .input(InputSpec::link("negative", PortType::Conditioning)),
    )
});

struct SamplerCustom;

impl Node for SamplerCustom {
    fn schema(&self) -> &NodeSchema {
        &SAMPLER_CUSTOM
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let guider = Guider {
            model: inputs.object::<DiffusionModel>("model")?,
            positive: inputs.object::<Conditioning>("positive")?,
            negative: Some(inputs.object::<Conditioning>("negative")?),
            cfg: inputs.float("cfg")?,
        };
        let seed = inputs.int("noise_seed")? as u64;
        let noise = NoiseSpec(inputs.boolean("add_noise")?.then_some(seed));
        run_custom(ctx, inputs, self.schema(), &guider, noise)
    }
}

static SAMPLER_CUSTOM_ADVANCED: LazyLock<NodeSchema> = LazyLock::new(|| {
    custom_sampler_schema(
        NodeSchema::new(
            "SamplerCustomAdvanced",
            "SamplerCustomAdvanced",
            "sampling/custom_sampling",
        )
        .input(InputSpec::link("noise", PortType::Noise))
        .input(InputSpec::link("guider", PortType::Guider)),
    )
});

struct SamplerCustomAdvanced;

impl Node for SamplerCustomAdvanced {
    fn schema(&self) -> &NodeSchema {
        &SAMPLER_CUSTOM_ADVANCED
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let guider = inputs.object::<Guider>("guider")?;
        let noise = *inputs.object::<NoiseSpec>("noise")?;
        run_custom(ctx, inputs, self.schema(), &guider, noise)
    }
}

/// The sampling pass of both custom samplers: `output`, and `denoised_output` (the model's
/// clean estimate at the last step; the output itself when no step ran).
fn run_custom(
    ctx: &ExecContext<'_>,
    inputs: &Inputs,
    schema: &NodeSchema,
    guider: &Guider,
    noise: NoiseSpec,
) -> Result<Vec<Value>, NodeError> {
    ctx.reserve_for(schema, inputs)?;
    let sampler = inputs.object::<SamplerChoice>("sampler")?;
    let sigmas = sigmas_of(inputs, "sigmas")?;
    if sigmas.iter().any(|s| !s.is_finite() || *s < 0.0) {
        return Err(NodeError::InvalidInput(format!(
            "sigmas must be finite and >= 0, got {sigmas:?}"
        )));
    }
    let latent = inputs.object::<Latent>("latent_image")?;
    let params = SampleParams {
        cfg: guider.cfg,
        sampler: sampler.0,
        add_noise: noise.0.is_some(),
        max_batch: ctx.batch_limit,
        ..SampleParams::new(noise.0.unwrap_or(0))
    };
    let negative = guider.negative.as_ref().unwrap_or(&guider.positive);
    let (samples, denoised) = sample_with_mask(
        ctx,
        &guider.model,
        (&guider.positive.entries, &negative.entries),
        &latent,
        &sigmas,
        &params,
    )?;
    let denoised = denoised.unwrap_or_else(|| samples.clone());
    Ok(vec![
        Value::object(latent.with_samples(samples)),
        Value::object(latent.with_samples(denoised)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rig;

    /// Runs the registered node `class` on `inputs`.
    fn run(rig: &Rig, class: &str, inputs: &[(&str, Value)]) -> Vec<Value> {
        let registry = NodeRegistry::with_builtins();
        let node = registry.get(class).unwrap_or_else(|| panic!("{class}"));
        rig.run(node.as_ref(), inputs)
            .unwrap_or_else(|e| panic!("{class}: {e}"))
    }

    fn demo_rig() -> Rig {
        Rig::new(|models| {
            sakuga_models::demo::write_demo_models(models).unwrap();
        })
    }

    fn s(v: &str) -> Value {
        Value::String(v.into())
    }

    fn samples(value: &Value) -> Vec<f32> {
        let Value::Object(object) = value else {
            panic!("not a latent: {value:?}")
        };
        let latent = object.clone().downcast::<Latent>().expect("a latent");
        latent.samples.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The demo checkpoint's model, a prompt pair and a 64x64 empty latent.
    fn setup(rig: &Rig) -> (Value, Value, Value, Value) {
        let loaded = run(
            rig,
            "CheckpointLoaderSimple",
            &[("ckpt_name", s(sakuga_models::demo::DEMO_CHECKPOINT))],
        );
        let encode = |text: &str| {
            run(
                rig,
                "CLIPTextEncode",
                &[("text", s(text)), ("clip", loaded[1].clone())],
            )
            .remove(0)
        };
        let latent = run(
            rig,
            "EmptyLatentImage",
            &[
                ("width", Value::Int(64)),
                ("height", Value::Int(64)),
                ("batch_size", Value::Int(1)),
            ],
        );
        (
            loaded[0].clone(),
            encode("1girl, lineart"),
            encode("lowres"),
            latent[0].clone(),
        )
    }

    #[test]
    fn the_custom_samplers_take_apart_what_ksampler_does() {
        let rig = demo_rig();
        let (model, positive, negative, latent) = setup(&rig);
        for (sampler, scheduler) in [("dpmpp_2m_sde_gpu", "karras"), ("uni_pc", "normal")] {
            let ksampler = run(
                &rig,
                "KSampler",
                &[
                    ("model", model.clone()),
                    ("seed", Value::Int(11)),
                    ("steps", Value::Int(4)),
                    ("cfg", Value::Float(6.5)),
                    ("sampler_name", s(sampler)),
                    ("scheduler", s(scheduler)),
                    ("positive", positive.clone()),
                    ("negative", negative.clone()),
                    ("latent_image", latent.clone()),
                    ("denoise", Value::Float(1.0)),
                ],
            );
            let noise = run(&rig, "RandomNoise", &[("noise_seed", Value::Int(11))]);
            let guider = run(
                &rig,
                "CFGGuider",
                &[
                    ("model", model.clone()),
                    ("positive", positive.clone()),
                    ("negative", negative.clone()),
                    ("cfg", Value::Float(6.5)),
                ],
            );
            let chosen = run(&rig, "KSamplerSelect", &[("sampler_name", s(sampler))]);
            // KSampler's one-step-more-and-drop for uni_pc is its own, so the custom graph
            // schedules 5 and splits off the tail the same way by hand.
            let discards = SamplerKind::from_name(sampler)
                .unwrap()
                .discards_penultimate_sigma();
            let steps = if discards { 5 } else { 4 };
            let mut sigmas = run(
                &rig,
                "BasicScheduler",
                &[
                    ("model", model.clone()),
                    ("scheduler", s(scheduler)),
                    ("steps", Value::Int(steps)),
                    ("denoise", Value::Float(1.0)),
                ],
            );
            if discards {
                let Value::Object(o) = &sigmas[0] else {
                    panic!()
                };
                let mut values = o.clone().downcast::<Sigmas>().unwrap().0.clone();
                values.remove(values.len() - 2);
                sigmas[0] = Value::object(Sigmas(values));
            }
            let custom = run(
                &rig,
                "SamplerCustomAdvanced",
                &[
                    ("noise", noise[0].clone()),
                    ("guider", guider[0].clone()),
                    ("sampler", chosen[0].clone()),
                    ("sigmas", sigmas[0].clone()),
                    ("latent_image", latent.clone()),
                ],
            );
            assert_eq!(samples(&ksampler[0]), samples(&custom[0]), "{sampler}");
            // dpmpp_2m_sde's last step to 0 is its estimate there; UniPC stops at 0.001.
            let (out, denoised) = (samples(&custom[0]), samples(&custom[1]));
            if sampler == "uni_pc" {
                assert_ne!(out, denoised, "{sampler}: denoised_output");
            } else {
                assert_eq!(out, denoised, "{sampler}: denoised_output");
            }
        }
    }

    #[test]
    fn disabled_noise_and_no_steps_hand_the_latent_back() {
        let rig = demo_rig();
        let (model, positive, _, latent) = setup(&rig);
        let guider = run(
            &rig,
            "BasicGuider",
            &[("model", model.clone()), ("conditioning", positive.clone())],
        );
        let sampler = run(&rig, "KSamplerSelect", &[("sampler_name", s("euler"))]);
        let manual = run(&rig, "ManualSigmas", &[("sigmas", s("3.0"))]);
        let noise = run(&rig, "DisableNoise", &[]);
        let out = run(
            &rig,
            "SamplerCustomAdvanced",
            &[
                ("noise", noise[0].clone()),
                ("guider", guider[0].clone()),
                ("sampler", sampler[0].clone()),
                ("sigmas", manual[0].clone()),
                ("latent_image", latent.clone()),
            ],
        );
        assert_eq!(samples(&out[0]), samples(&latent));
        assert_eq!(samples(&out[1]), samples(&latent));
        let split = run(
            &rig,
            "SplitSigmas",
            &[
                (
                    "sigmas",
                    run(&rig, "ManualSigmas", &[("sigmas", s("9, 4, 1, 0"))]).remove(0),
                ),
                ("step", Value::Int(1)),
            ],
        );
        let values = |v: &Value| {
            let Value::Object(o) = v else { panic!() };
            o.clone().downcast::<Sigmas>().unwrap().0.clone()
        };
        assert_eq!(values(&split[0]), vec![9.0, 4.0]);
        assert_eq!(values(&split[1]), vec![4.0, 1.0, 0.0]);
    }

    #[test]
    fn negative_sigmas_are_refused_before_sampling() {
        let rig = demo_rig();
        let (model, positive, _, latent) = setup(&rig);
        let guider = run(
            &rig,
            "BasicGuider",
            &[("model", model), ("conditioning", positive)],
        );
        let registry = NodeRegistry::with_builtins();
        let err = rig
            .run(
                registry.get("SamplerCustomAdvanced").unwrap().as_ref(),
                &[
                    (
                        "noise",
                        run(&rig, "RandomNoise", &[("noise_seed", Value::Int(1))]).remove(0),
                    ),
                    ("guider", guider[0].clone()),
                    (
                        "sampler",
                        run(&rig, "KSamplerSelect", &[("sampler_name", s("euler"))]).remove(0),
                    ),
                    (
                        "sigmas",
                        run(&rig, "ManualSigmas", &[("sigmas", s("5, -1, 0"))]).remove(0),
                    ),
                    ("latent_image", latent),
                ],
            )
            .unwrap_err();
        assert!(matches!(err, NodeError::InvalidInput(_)), "{err}");
    }

    #[test]
    fn manual_sigmas_reads_every_number() {
        assert_eq!(
            parse_sigmas("14.6, 7,3.5 1e-1; 0").unwrap(),
            vec![14.6, 7.0, 3.5, 0.1, 0.0]
        );
        assert!(parse_sigmas("1, 2..3").is_err());
        assert_eq!(parse_sigmas("").unwrap(), Vec::<f64>::new());
    }
}
