//! Frame interpolation nodes (sakuga's own, RIFE-style): `FrameInterpolationModelLoader`
//! (a file from `frame_interpolation/` to an INTERP_MODEL) and `FrameInterpolate`
//! (a batch of frames with `multiplier - 1` in-between frames inserted between each pair;
//! progress and cancellation are checked between generated frames).

use std::sync::LazyLock;

use sakuga_models::cache::ModelKind;
use sakuga_models::interpolate::Interpolator;
use sakuga_models::store::ModelFolder;

use super::upscale::load_cached;
use crate::error::NodeError;
use crate::node::{ExecContext, Inputs, Node};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{ComboOptions, DegradeKnob, Feature, InputSpec, NodeSchema};
use crate::shape::{NodeCost, megapasses};
use crate::value::Value;
use sakuga_telemetry::Stage;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(FrameInterpolationModelLoader);
    registry.register(FrameInterpolate);
}

/// Loads RIFE weights (`flownet.pkl`, `.pth`, `.safetensors`).
struct FrameInterpolationModelLoader;

static FRAME_INTERP_MODEL_LOADER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "FrameInterpolationModelLoader",
        "Load Frame Interpolation Model",
        "loaders",
    )
    .loads(
        "frame_interpolation",
        "model_name",
        ModelKind::Interpolation,
    )
    .input(InputSpec::files(
        "model_name",
        ComboOptions::ModelFolder("frame_interpolation"),
    ))
    .output(PortType::InterpolationModel)
});

impl Node for FrameInterpolationModelLoader {
    fn schema(&self) -> &NodeSchema {
        &FRAME_INTERP_MODEL_LOADER
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let device = ctx.env.device.clone();
        let interpolator = load_cached(
            ctx.env,
            ModelFolder::InterpolationModels,
            inputs.str("model_name")?,
            ModelKind::Interpolation,
            |path| {
                let interpolator = Interpolator::load(path, &device)?;
                let bytes = interpolator.approx_bytes();
                Ok((interpolator, bytes))
            },
        )?;
        Ok(vec![Value::Object(interpolator)])
    }
}

/// Inserts `multiplier - 1` frames between each consecutive pair of the batch.
struct FrameInterpolate;

static FRAME_INTERPOLATE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("FrameInterpolate", "Frame Interpolate", "image/animation")
        .stage(Stage::Postprocess)
        .animation()
        .degrade(DegradeKnob::InterpolationMultiplier)
        .feature(Feature::Interpolator)
        .input(InputSpec::link(
            "interp_model",
            PortType::InterpolationModel,
        ))
        .input(InputSpec::link("images", PortType::Image))
        .input(
            InputSpec::int("multiplier", 2, 1, 16)
                .tooltip("output frames per input interval: 2 doubles the frame rate"),
        )
        .output(PortType::Image)
        .shapes(|i| {
            let images = i.shape("images");
            let count = images.batch();
            let multiplier = i.size("multiplier", 2).clamp(1, 16);
            if multiplier == 1 || count < 2 {
                return NodeCost::outputs(vec![images]);
            }
            let frames = (count - 1).saturating_mul(multiplier) + 1;
            let out = images.with_batch(frames);
            let made = images.with_batch(frames - count);
            // New frames are gathered, then joined into one batch: the output twice.
            NodeCost::outputs(vec![out])
                .working(out.bytes())
                .work(megapasses(&made) * 8.0)
        })
});

impl Node for FrameInterpolate {
    fn schema(&self) -> &NodeSchema {
        &FRAME_INTERPOLATE
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let interpolator = inputs.object::<Interpolator>("interp_model")?;
        let images = inputs.image("images")?;
        let multiplier = inputs.int("multiplier")?;
        let multiplier = usize::try_from(multiplier)
            .ok()
            .filter(|m| (1..=16).contains(m))
            .ok_or_else(|| {
                NodeError::InvalidInput(format!("multiplier must be 1..=16, got {multiplier}"))
            })?;
        let frames =
            interpolator.interpolate_sequence_with(images, multiplier, |done, total| {
                ctx.step(done, total)
            })?;
        Ok(vec![Value::Image(frames)])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{DType, Device, Tensor};
    use sakuga_models::interpolate::demo::DEMO_RIFE425;
    use sakuga_models::interpolate::{RifeArch, write_demo_rife, write_demo_rife425};

    use super::*;
    use crate::node::{CancelToken, NodeEnv, NullSink};

    fn env() -> (tempfile::TempDir, NodeEnv) {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir_all(models.join("frame_interpolation")).unwrap();
        write_demo_rife(&models.join("frame_interpolation/rife-demo.safetensors")).unwrap();
        write_demo_rife425(&models.join("frame_interpolation").join(DEMO_RIFE425)).unwrap();
        let env = NodeEnv::new(dir.path().join("input"), dir.path().join("output"), models);
        (dir, env)
    }

    fn run(
        env: &NodeEnv,
        cancel: &CancelToken,
        node: &dyn Node,
        inputs: &[(&str, Value)],
    ) -> Result<Vec<Value>, NodeError> {
        let ctx = ExecContext {
            job_id: "job",
            node_id: "1",
            env,
            sink: &NullSink,
            cancel,
            workflow: None,
            batch_limit: None,
        };
        let mut bound = Inputs::new();
        for (name, value) in inputs {
            bound.insert(*name, value.clone());
        }
        node.execute(&ctx, &bound)
    }

    #[test]
    fn frame_interpolate_inserts_frames_between_pairs() {
        let (_dir, env) = env();
        let cancel = CancelToken::new();
        let model = run(
            &env,
            &cancel,
            &FrameInterpolationModelLoader,
            &[("model_name", Value::String("rife-demo.safetensors".into()))],
        )
        .unwrap();
        let Value::Object(object) = &model[0] else {
            panic!("not a model")
        };
        assert!(object.clone().downcast::<Interpolator>().is_ok());
        let frames = Tensor::rand(0f32, 1.0, (3, 20, 24, 3), &Device::Cpu).unwrap();
        for (multiplier, expected) in [(1, 3), (2, 5), (4, 9)] {
            let out = run(
                &env,
                &cancel,
                &FrameInterpolate,
                &[
                    ("interp_model", model[0].clone()),
                    ("images", Value::Image(frames.clone())),
                    ("multiplier", Value::Int(multiplier)),
                ],
            )
            .unwrap();
            let Value::Image(out) = &out[0] else {
                panic!("not an image")
            };
            assert_eq!(
                out.dims(),
                &[expected, 20, 24, 3],
                "multiplier {multiplier}"
            );
        }
        let _ = Arc::strong_count(object);
    }

    #[test]
    fn out_of_range_multiplier_and_cancellation_are_errors() {
        let (_dir, env) = env();
        let cancel = CancelToken::new();
        let model = run(
            &env,
            &cancel,
            &FrameInterpolationModelLoader,
            &[("model_name", Value::String("rife-demo.safetensors".into()))],
        )
        .unwrap();
        let frames = Tensor::zeros((2, 32, 32, 3), DType::F32, &Device::Cpu).unwrap();
        let inputs = |m: i64| {
            [
                ("interp_model", model[0].clone()),
                ("images", Value::Image(frames.clone())),
                ("multiplier", Value::Int(m)),
            ]
        };
        let err = run(&env, &cancel, &FrameInterpolate, &inputs(17)).unwrap_err();
        assert_eq!(err.kind(), Some(sakuga_telemetry::ErrorKind::InvalidInput));
        cancel.cancel();
        let err = run(&env, &cancel, &FrameInterpolate, &inputs(2)).unwrap_err();
        assert!(matches!(err, NodeError::Cancelled), "{err:?}");
    }

    /// ComfyUI's RIFE 4.25/4.26 family through the same two nodes: the loader detects
    /// the layout, FrameInterpolate keeps the originals and inserts frames at k/multiplier.
    #[test]
    fn rife425_weights_run_through_the_nodes() {
        let (_dir, env) = env();
        let cancel = CancelToken::new();
        let model = run(
            &env,
            &cancel,
            &FrameInterpolationModelLoader,
            &[("model_name", Value::String(DEMO_RIFE425.into()))],
        )
        .unwrap();
        let Value::Object(object) = &model[0] else {
            panic!("not a model")
        };
        let interpolator = object.clone().downcast::<Interpolator>().unwrap();
        assert_eq!(interpolator.arch(), RifeArch::V425);
        let frames = Tensor::rand(0f32, 1.0, (3, 20, 24, 3), &Device::Cpu).unwrap();
        let out = run(
            &env,
            &cancel,
            &FrameInterpolate,
            &[
                ("interp_model", model[0].clone()),
                ("images", Value::Image(frames.clone())),
                ("multiplier", Value::Int(2)),
            ],
        )
        .unwrap();
        let Value::Image(out) = &out[0] else {
            panic!("not an image")
        };
        assert_eq!(out.dims(), &[5, 20, 24, 3]);
        let same = |a: &Tensor, b: &Tensor| -> bool {
            let d: f32 = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            d == 0.0
        };
        for (index, original) in [(0, 0), (2, 1), (4, 2)] {
            assert!(same(
                &out.narrow(0, index, 1).unwrap(),
                &frames.narrow(0, original, 1).unwrap()
            ));
        }
        let a = frames.narrow(0, 0, 1).unwrap();
        let b = frames.narrow(0, 1, 1).unwrap();
        let mid = interpolator.interpolate(&a, &b, 0.5).unwrap();
        assert!(same(&out.narrow(0, 1, 1).unwrap(), &mid));
    }
}
