//! ControlNet nodes with ComfyUI's class types and inputs (`nodes.py`): `ControlNetLoader`
//! (a file from `controlnet/`), `ControlNetApply` (one conditioning, the negative prompt
//! taking it too) and `ControlNetApplyAdvanced` (both prompts, a part of the schedule). The
//! hint image rides on each prompt; the sampler runs the ControlNet beside the UNet
//! (`sakuga_models::diffusion::controlnet`).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use candle_core::DType;
use sakuga_models::cache::ModelKind;
use sakuga_models::diffusion::{AppliedControl, ControlNetModel};
use sakuga_models::store::ModelFolder;

use super::diffusion::Conditioning;
use super::upscale::load_cached;
use crate::error::NodeError;
use crate::node::{ExecContext, Inputs, Node};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{ComboOptions, InputSpec, NodeSchema};
use crate::value::Value;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(ControlNetLoader);
    registry.register(ControlNetApply);
    registry.register(ControlNetApplyAdvanced);
}

struct ControlNetLoader;

static CONTROL_NET_LOADER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("ControlNetLoader", "Load ControlNet Model", "loaders")
        .loads("controlnet", "control_net_name", ModelKind::ControlNet)
        .input(InputSpec::files(
            "control_net_name",
            ComboOptions::ModelFolder("controlnet"),
        ))
        .output(PortType::ControlNet)
});

impl Node for ControlNetLoader {
    fn schema(&self) -> &NodeSchema {
        &CONTROL_NET_LOADER
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let device = ctx.env.device.clone();
        let net = load_cached(
            ctx.env,
            ModelFolder::ControlNet,
            inputs.str("control_net_name")?,
            ModelKind::ControlNet,
            |path| {
                let bytes = std::fs::metadata(path).map_or(0, |m| m.len());
                Ok((ControlNetModel::load(path, &device, DType::F32)?, bytes))
            },
        )?;
        Ok(vec![Value::Object(net)])
    }
}

/// The image as a hint `[b, c, h, w]`, checked against what the ControlNet reads.
fn hint(inputs: &Inputs, net: &ControlNetModel) -> Result<candle_core::Tensor, NodeError> {
    let image = inputs.image("image")?;
    let channels = image.dim(3)?;
    if !net.takes_hint_channels(channels) {
        return Err(NodeError::InvalidInput(format!(
            "the ControlNet reads {}-channel hint images; this image has {channels} channels",
            net.hint_channels()
        )));
    }
    Ok(image.permute((0, 3, 1, 2))?.contiguous()?)
}

struct ControlNetApply;

static CONTROL_NET_APPLY: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "ControlNetApply",
        "Apply ControlNet (OLD)",
        "conditioning/controlnet",
    )
    .input(InputSpec::link("conditioning", PortType::Conditioning))
    .input(InputSpec::link("control_net", PortType::ControlNet))
    .input(InputSpec::link("image", PortType::Image))
    .input(InputSpec::float("strength", 1.0, 0.0, 10.0, 0.01))
    .output(PortType::Conditioning)
});

impl Node for ControlNetApply {
    fn schema(&self) -> &NodeSchema {
        &CONTROL_NET_APPLY
    }

    /// Each prompt gets the ControlNet on the whole schedule, chained to the one it had;
    /// the negative prompt takes it at sampling time unless it has its own.
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let conditioning = inputs.object::<Conditioning>("conditioning")?;
        let strength = inputs.float("strength")?;
        if strength == 0.0 {
            return Ok(vec![Value::Object(conditioning)]);
        }
        let net = inputs.object::<ControlNetModel>("control_net")?;
        let hint = hint(inputs, &net)?;
        let entries = conditioning
            .entries
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.control = Some(Arc::new(AppliedControl {
                    net: net.clone(),
                    hint: hint.clone(),
                    strength,
                    range: (0.0, 1.0),
                    previous: c.control.take(),
                    apply_to_uncond: true,
                }));
                c
            })
            .collect();
        Ok(vec![Value::object(Conditioning { entries })])
    }
}

struct ControlNetApplyAdvanced;

static CONTROL_NET_APPLY_ADVANCED: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "ControlNetApplyAdvanced",
        "Apply ControlNet",
        "conditioning/controlnet",
    )
    .input(InputSpec::link("positive", PortType::Conditioning))
    .input(InputSpec::link("negative", PortType::Conditioning))
    .input(InputSpec::link("control_net", PortType::ControlNet))
    .input(InputSpec::link("image", PortType::Image))
    .input(InputSpec::float("strength", 1.0, 0.0, 10.0, 0.01))
    .input(InputSpec::float("start_percent", 0.0, 0.0, 1.0, 0.001))
    .input(InputSpec::float("end_percent", 1.0, 0.0, 1.0, 0.001))
    .input(InputSpec::link("vae", PortType::Vae).optional())
    .named_output("positive", PortType::Conditioning)
    .named_output("negative", PortType::Conditioning)
});

impl Node for ControlNetApplyAdvanced {
    fn schema(&self) -> &NodeSchema {
        &CONTROL_NET_APPLY_ADVANCED
    }

    /// Both prompts get the ControlNet on `start_percent..end_percent` of the schedule,
    /// chained to the one each had. The `vae` is for ControlNets that read latent hints
    /// (SD3, Flux); the SD and SDXL ones read pixels and ignore it, as ComfyUI does.
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let positive = inputs.object::<Conditioning>("positive")?;
        let negative = inputs.object::<Conditioning>("negative")?;
        let strength = inputs.float("strength")?;
        if strength == 0.0 {
            return Ok(vec![Value::Object(positive), Value::Object(negative)]);
        }
        let net = inputs.object::<ControlNetModel>("control_net")?;
        let hint = hint(inputs, &net)?;
        let range = (inputs.float("start_percent")?, inputs.float("end_percent")?);
        // Prompts that had the same ControlNet before share one application, as ComfyUI
        // keys them by the previous one.
        let mut applied: HashMap<usize, Arc<AppliedControl>> = HashMap::new();
        let mut apply = |conditioning: &Conditioning| -> Conditioning {
            let entries = conditioning
                .entries
                .iter()
                .map(|c| {
                    let mut c = c.clone();
                    let previous = c.control.take();
                    let key = previous.as_ref().map_or(0, |p| Arc::as_ptr(p) as usize);
                    let control = applied.entry(key).or_insert_with(|| {
                        Arc::new(AppliedControl {
                            net: net.clone(),
                            hint: hint.clone(),
                            strength,
                            range,
                            previous,
                            apply_to_uncond: false,
                        })
                    });
                    c.control = Some(control.clone());
                    c
                })
                .collect();
            Conditioning { entries }
        };
        let positive = apply(&positive);
        let negative = apply(&negative);
        Ok(vec![Value::object(positive), Value::object(negative)])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use sakuga_models::demo::{DEMO_CHECKPOINT, DEMO_CONTROLNET, DEMO_SDXL_CONTROLNET};

    use super::*;
    use crate::builtin::diffusion::Latent;
    use crate::testing::Rig;

    struct Scene {
        rig: Rig,
        registry: NodeRegistry,
        loaded: Vec<Value>,
        positive: Value,
        negative: Value,
        latent: Value,
        hint: Value,
    }

    impl Scene {
        fn new() -> Self {
            let rig = Rig::new(|models| {
                sakuga_models::demo::write_demo_models(models).unwrap();
            });
            let registry = NodeRegistry::with_builtins();
            let mut scene = Scene {
                rig,
                registry,
                loaded: Vec::new(),
                positive: Value::Int(0),
                negative: Value::Int(0),
                latent: Value::Int(0),
                hint: Value::Image(Tensor::rand(0f32, 1.0, (1, 48, 64, 3), &Device::Cpu).unwrap()),
            };
            scene.loaded = scene.run(
                "CheckpointLoaderSimple",
                &[("ckpt_name", s(DEMO_CHECKPOINT))],
            );
            scene.positive = scene.encode("a fox in the snow");
            scene.negative = scene.encode("");
            scene.latent = scene
                .run(
                    "EmptyLatentImage",
                    &[
                        ("width", Value::Int(64)),
                        ("height", Value::Int(48)),
                        ("batch_size", Value::Int(1)),
                    ],
                )
                .remove(0);
            scene
        }

        fn try_run(&self, class: &str, inputs: &[(&str, Value)]) -> Result<Vec<Value>, NodeError> {
            let node = self
                .registry
                .get(class)
                .unwrap_or_else(|| panic!("{class}"));
            self.rig.run(node.as_ref(), inputs)
        }

        fn run(&self, class: &str, inputs: &[(&str, Value)]) -> Vec<Value> {
            self.try_run(class, inputs)
                .unwrap_or_else(|e| panic!("{class}: {e}"))
        }

        fn encode(&self, text: &str) -> Value {
            self.run(
                "CLIPTextEncode",
                &[("text", s(text)), ("clip", self.loaded[1].clone())],
            )
            .remove(0)
        }

        fn control_net(&self, name: &str) -> Value {
            self.run("ControlNetLoader", &[("control_net_name", s(name))])
                .remove(0)
        }

        fn advanced(&self, net: &Value, strength: f64, range: (f64, f64)) -> (Value, Value) {
            let mut out = self.run(
                "ControlNetApplyAdvanced",
                &[
                    ("positive", self.positive.clone()),
                    ("negative", self.negative.clone()),
                    ("control_net", net.clone()),
                    ("image", self.hint.clone()),
                    ("strength", Value::Float(strength)),
                    ("start_percent", Value::Float(range.0)),
                    ("end_percent", Value::Float(range.1)),
                ],
            );
            let negative = out.pop().unwrap();
            (out.pop().unwrap(), negative)
        }

        fn try_sample(&self, positive: &Value, negative: &Value) -> Result<Tensor, NodeError> {
            let out = self.try_run(
                "KSampler",
                &[
                    ("model", self.loaded[0].clone()),
                    ("seed", Value::Int(7)),
                    ("steps", Value::Int(3)),
                    ("cfg", Value::Float(5.0)),
                    ("sampler_name", s("euler")),
                    ("scheduler", s("normal")),
                    ("positive", positive.clone()),
                    ("negative", negative.clone()),
                    ("latent_image", self.latent.clone()),
                    ("denoise", Value::Float(1.0)),
                ],
            )?;
            let Value::Object(object) = &out[0] else {
                panic!("not a latent")
            };
            Ok(object.clone().downcast::<Latent>().unwrap().samples.clone())
        }

        fn sample(&self, positive: &Value, negative: &Value) -> Tensor {
            self.try_sample(positive, negative).unwrap()
        }
    }

    fn s(v: &str) -> Value {
        Value::String(v.into())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn a_controlnet_steers_sampling_as_comfyui_applies_it() {
        let scene = Scene::new();
        let net = scene.control_net(DEMO_CONTROLNET);
        let plain = scene.sample(&scene.positive, &scene.negative);

        let (positive, negative) = scene.advanced(&net, 1.0, (0.0, 1.0));
        let controlled = scene.sample(&positive, &negative);
        assert!(
            max_diff(&plain, &controlled) > 1e-2,
            "the ControlNet changes the render"
        );

        let (positive, negative) = scene.advanced(&net, 0.0, (0.0, 1.0));
        assert_eq!(
            max_diff(&plain, &scene.sample(&positive, &negative)),
            0.0,
            "strength 0 leaves the prompts as they were"
        );

        // A range that ends before the first step never runs the ControlNet.
        let (positive, negative) = scene.advanced(&net, 1.0, (0.0, 0.0));
        assert!(max_diff(&plain, &scene.sample(&positive, &negative)) < 1e-4);

        // The old node applies to the positive prompt; the negative one takes it at sampling
        // time, so the render is the advanced node's on both prompts.
        let old = scene
            .run(
                "ControlNetApply",
                &[
                    ("conditioning", scene.positive.clone()),
                    ("control_net", net.clone()),
                    ("image", scene.hint.clone()),
                    ("strength", Value::Float(1.0)),
                ],
            )
            .remove(0);
        assert_eq!(
            max_diff(&controlled, &scene.sample(&old, &scene.negative)),
            0.0
        );

        // Two ControlNets chained add up: twice the same one at 0.5 is the one at 1.
        let (half_positive, half_negative) = scene.advanced(&net, 0.5, (0.0, 1.0));
        let chained = scene.run(
            "ControlNetApplyAdvanced",
            &[
                ("positive", half_positive),
                ("negative", half_negative),
                ("control_net", net.clone()),
                ("image", scene.hint.clone()),
                ("strength", Value::Float(0.5)),
                ("start_percent", Value::Float(0.0)),
                ("end_percent", Value::Float(1.0)),
            ],
        );
        let twice = scene.sample(&chained[0], &chained[1]);
        assert!(max_diff(&controlled, &twice) < 1e-4);
    }

    #[test]
    fn mismatched_hints_and_families_are_named() {
        let scene = Scene::new();
        let net = scene.control_net(DEMO_CONTROLNET);
        let rgba = Value::Image(Tensor::zeros((1, 48, 64, 4), DType::F32, &Device::Cpu).unwrap());
        let error = scene
            .try_run(
                "ControlNetApply",
                &[
                    ("conditioning", scene.positive.clone()),
                    ("control_net", net),
                    ("image", rgba),
                    ("strength", Value::Float(1.0)),
                ],
            )
            .expect_err("an RGBA hint is refused")
            .to_string();
        assert!(
            error.contains("3-channel") && error.contains("4 channels"),
            "{error}"
        );

        let sdxl = scene.control_net(DEMO_SDXL_CONTROLNET);
        let (positive, negative) = scene.advanced(&sdxl, 1.0, (0.0, 1.0));
        let error = scene
            .try_sample(&positive, &negative)
            .expect_err("an SDXL ControlNet cannot guide SD 1.5")
            .to_string();
        assert!(error.contains("SDXL ControlNet"), "{error}");

        let missing = scene
            .try_run(
                "ControlNetLoader",
                &[("control_net_name", s("nope.safetensors"))],
            )
            .expect_err("a missing file")
            .to_string();
        assert!(missing.contains("nope.safetensors"), "{missing}");
    }
}
