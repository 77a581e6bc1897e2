//! Model upscaling nodes with ComfyUI's names, inputs and outputs: `UpscaleModelLoader`
//! (a file from `upscale_models/` to an UPSCALE_MODEL) and `ImageUpscaleWithModel`
//! (IMAGE to IMAGE through it, in overlapped tiles, frame by frame so progress and
//! cancellation are checked between frames).

use std::sync::{Arc, LazyLock};

use sakuga_models::cache::{ModelCache, ModelKind};
use sakuga_models::store::{ModelFolder, ModelStore};
use sakuga_models::upscale::{TileConfig, Upscaler};

use crate::error::NodeError;
use crate::node::{ExecContext, Inputs, Node, NodeEnv};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{ComboOptions, Feature, InputSpec, NodeSchema};
use crate::shape::{NodeCost, Shape, megapasses};
use crate::value::Value;
use sakuga_telemetry::Stage;

/// The factor assumed for an upscale model before it is loaded: the largest of the
/// released Real-ESRGAN models, so admission never underestimates.
const ASSUMED_SCALE: u64 = 4;
/// Feature-map bytes per pixel of one tile, assumed before the model's architecture is known.
const ASSUMED_TILE_BYTES_PER_PIXEL: u64 = 4 * 256;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(UpscaleModelLoader);
    registry.register(ImageUpscaleWithModel);
}

/// Loads `folder/name` through the environment's model cache when there is one.
pub(super) fn load_cached<T, F>(
    env: &NodeEnv,
    folder: ModelFolder,
    name: &str,
    kind: ModelKind,
    load: F,
) -> Result<Arc<T>, NodeError>
where
    T: std::any::Any + Send + Sync,
    F: FnOnce(&std::path::Path) -> Result<(T, u64), sakuga_models::ModelError>,
{
    let store = env
        .resources
        .get::<ModelStore>()
        .unwrap_or_else(|| Arc::new(ModelStore::new(env.models_dir.clone())));
    let path = store.resolve(folder, name)?;
    let key = format!("{}#{}", path.display(), kind.as_str());
    match env.resources.get::<ModelCache>() {
        Some(cache) => Ok(cache.get_or_load(&key, kind, || load(&path))?),
        None => Ok(Arc::new(load(&path)?.0)),
    }
}

/// Loads a Real-ESRGAN model (`.safetensors`, `.pth`, or ncnn `.param` + `.bin`).
struct UpscaleModelLoader;

static UPSCALE_MODEL_LOADER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("UpscaleModelLoader", "Load Upscale Model", "loaders")
        .loads("upscale_models", "model_name", ModelKind::Upscale)
        .input(InputSpec::files(
            "model_name",
            ComboOptions::ModelFolder("upscale_models"),
        ))
        .output(PortType::UpscaleModel)
        .shapes(|_| {
            NodeCost::outputs(vec![Shape::Upscaler {
                scale: ASSUMED_SCALE,
            }])
        })
});

impl Node for UpscaleModelLoader {
    fn schema(&self) -> &NodeSchema {
        &UPSCALE_MODEL_LOADER
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let device = ctx.env.device.clone();
        let upscaler = load_cached(
            ctx.env,
            ModelFolder::UpscaleModels,
            inputs.str("model_name")?,
            ModelKind::Upscale,
            |path| {
                let upscaler = Upscaler::load(path, &device)?;
                let bytes = upscaler.approx_bytes();
                Ok((upscaler, bytes))
            },
        )?;
        Ok(vec![Value::Object(upscaler)])
    }
}

/// Upscales each image of the batch with the model, clamped to `[0, 1]`.
struct ImageUpscaleWithModel;

static IMAGE_UPSCALE_WITH_MODEL: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "ImageUpscaleWithModel",
        "Upscale Image (using Model)",
        "image/upscaling",
    )
    .stage(Stage::Postprocess)
    .feature(Feature::Upscaler)
    .input(InputSpec::link("upscale_model", PortType::UpscaleModel))
    .input(InputSpec::link("image", PortType::Image))
    .output(PortType::Image)
    .shapes(|i| {
        let image = i.shape("image");
        let scale = match i.shape("upscale_model") {
            Shape::Upscaler { scale } => scale,
            _ => ASSUMED_SCALE,
        };
        let Some((h, w)) = image.spatial() else {
            return NodeCost::outputs(vec![image]);
        };
        let out = image.resized(h.saturating_mul(scale), w.saturating_mul(scale));
        let tile = TileConfig::default().tile as u64;
        // Upscaled frames are gathered, then joined into one batch: the output twice.
        NodeCost::outputs(vec![out])
            .working(
                out.bytes()
                    .saturating_add(tile * tile * ASSUMED_TILE_BYTES_PER_PIXEL),
            )
            .work(megapasses(&image) * 16.0)
    })
});

impl Node for ImageUpscaleWithModel {
    fn schema(&self) -> &NodeSchema {
        &IMAGE_UPSCALE_WITH_MODEL
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let upscaler = inputs.object::<Upscaler>("upscale_model")?;
        let image = inputs.image("image")?;
        let (batch, _, _, _) = image.dims4()?;
        // ComfyUI's 512 px tiles, with at least the network's receptive radius of overlap
        // so the stitched frame has no seams.
        let defaults = TileConfig::default();
        let tile = TileConfig {
            tile: defaults.tile,
            overlap: defaults.overlap.max(upscaler.arch().receptive_radius()),
        };
        let mut frames = Vec::with_capacity(batch);
        for index in 0..batch {
            ctx.step(index as u64, batch as u64)?;
            // Tiles of a large frame take seconds each on a CPU: check between them too.
            let proceed = |_: usize, _: usize| !ctx.cancel.is_cancelled();
            frames.push(upscaler.upscale_with(&image.narrow(0, index, 1)?, tile, &proceed)?);
        }
        ctx.step(batch as u64, batch as u64)?;
        Ok(vec![Value::Image(candle_core::Tensor::cat(&frames, 0)?)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rig;

    fn rig() -> Rig {
        Rig::new(|models| {
            let folder = models.join("upscale_models");
            std::fs::create_dir_all(&folder).unwrap();
            let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../assets/models/upscale_models/realesr-animevideov3-x4");
            for ext in ["param", "bin"] {
                std::fs::copy(
                    shipped.with_extension(ext),
                    folder.join(format!("anime.{ext}")),
                )
                .unwrap();
            }
        })
    }

    fn run(rig: &Rig, node: &dyn Node, inputs: &[(&str, Value)]) -> Result<Vec<Value>, NodeError> {
        rig.run(node, inputs)
    }

    #[test]
    fn loader_and_upscale_node_produce_a_4x_batch_in_range() {
        let rig = rig();
        let model = run(
            &rig,
            &UpscaleModelLoader,
            &[("model_name", Value::String("anime.param".into()))],
        )
        .unwrap();
        let image = candle_core::Tensor::rand(0f32, 1.0, (2, 12, 10, 3), &candle_core::Device::Cpu)
            .unwrap();
        let out = run(
            &rig,
            &ImageUpscaleWithModel,
            &[
                ("upscale_model", model[0].clone()),
                ("image", Value::Image(image)),
            ],
        )
        .unwrap();
        let Value::Image(out) = &out[0] else {
            panic!("not an image: {:?}", out[0])
        };
        assert_eq!(out.dims(), &[2, 48, 40, 3]);
        let values: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
        // The second load is served by the cache.
        run(
            &rig,
            &UpscaleModelLoader,
            &[("model_name", Value::String("anime.param".into()))],
        )
        .unwrap();
        let cache = rig.env.resources.get::<ModelCache>().unwrap();
        assert!(cache.stats().hits >= 1, "{:?}", cache.stats());
    }

    #[test]
    fn missing_and_escaping_model_names_fail_cleanly() {
        let rig = rig();
        let err = run(
            &rig,
            &UpscaleModelLoader,
            &[("model_name", Value::String("nope.pth".into()))],
        )
        .unwrap_err();
        assert_eq!(
            err.kind(),
            Some(sakuga_telemetry::ErrorKind::ModelLoad),
            "{err}"
        );
        let err = run(
            &rig,
            &UpscaleModelLoader,
            &[("model_name", Value::String("../x.pth".into()))],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("escapes") || err.to_string().contains("outside"),
            "{err}"
        );
    }

    #[test]
    fn cancellation_stops_between_frames() {
        let rig = rig();
        let model = run(
            &rig,
            &UpscaleModelLoader,
            &[("model_name", Value::String("anime.param".into()))],
        )
        .unwrap();
        rig.cancel.cancel();
        let image = candle_core::Tensor::zeros(
            (2, 8, 8, 3),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let err = run(
            &rig,
            &ImageUpscaleWithModel,
            &[
                ("upscale_model", model[0].clone()),
                ("image", Value::Image(image)),
            ],
        )
        .unwrap_err();
        assert!(matches!(err, NodeError::Cancelled), "{err:?}");
    }
}
