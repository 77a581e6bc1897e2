//! Output nodes: SaveImage (PNG with the workflow embedded, as ComfyUI writes it),
//! PreviewImage (into the temp dir) and StreamFrames (frames to the job's stream at a
//! target FPS, the node animation previews end in).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::NodeError;
use crate::files::resolve_inside;
use crate::image::{to_pixels, write_png};
use crate::node::{ExecContext, Inputs, Node, OutputFile, StreamFrame};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{InputSpec, NodeSchema};
use crate::shape::{NodeCost, ShapeInputs, megapasses};
use crate::value::Value;
use sakuga_telemetry::Stage;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(SaveImage);
    registry.register(PreviewImage);
    registry.register(ImageCompare);
    registry.register(StreamFrames);
}

/// Next free counter per (folder, prefix): scanned once, then counted in memory, so
/// concurrent jobs never pick the same file name.
static COUNTERS: LazyLock<Mutex<HashMap<PathBuf, u64>>> = LazyLock::new(Default::default);
/// Prefixes whose counters are kept; past it the map starts over (each prefix is scanned
/// again once), so clients naming a new prefix per job cannot grow it without end.
const MAX_COUNTERS: usize = 4096;
/// Previews are numbered by one process-wide counter: O(1) per file, no folder scan, no
/// per-job state. Their names carry the job id too, so runs never collide.
static PREVIEW_COUNTER: AtomicU64 = AtomicU64::new(0);

pub(super) fn next_counter(folder: &Path, stem: &str) -> u64 {
    let key = folder.join(stem);
    let mut counters = COUNTERS.lock();
    if counters.len() >= MAX_COUNTERS && !counters.contains_key(&key) {
        counters.clear();
    }
    let next = counters
        .entry(key)
        .or_insert_with(|| highest_counter(folder, stem) + 1);
    let counter = *next;
    *next += 1;
    counter
}

/// The largest `N` of existing `{stem}_{N:05}_.png` files, as ComfyUI scans for it.
fn highest_counter(folder: &Path, stem: &str) -> u64 {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix(stem)?.strip_prefix('_')?;
            rest.split('_').next()?.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0)
}

/// How files of a batch are numbered.
#[derive(Clone, Copy)]
enum Numbering {
    /// ComfyUI's `{prefix}_{counter:05}_.png`, continuing after the files already there.
    Continue,
    /// The process-wide preview counter.
    Preview,
}

/// Writes every image of `images` under `root` as `{prefix}_{counter:05}_.png`.
fn save_batch(
    ctx: &ExecContext<'_>,
    images: &candle_core::Tensor,
    root: &Path,
    prefix: &str,
    numbering: Numbering,
) -> Result<(), NodeError> {
    let kind = match numbering {
        Numbering::Continue => "output",
        Numbering::Preview => "temp",
    };
    let (folder, stem) = output_target(root, prefix)?;
    let workflow = ctx.workflow.map(|w| w.to_string());
    let text: Vec<(&str, &str)> = workflow.iter().map(|w| ("prompt", w.as_str())).collect();
    for pixels in to_pixels(images)? {
        let counter = match numbering {
            Numbering::Continue => next_counter(&folder, &stem),
            Numbering::Preview => PREVIEW_COUNTER.fetch_add(1, Ordering::Relaxed),
        };
        let path = folder.join(format!("{stem}_{counter:05}_.png"));
        write_png(&path, &pixels, &text)?;
        ctx.sink.output(ctx.node_id, OutputFile { path, kind });
    }
    Ok(())
}

/// The folder and file stem `prefix` names under `root`, with the folders created.
pub(super) fn output_target(root: &Path, prefix: &str) -> Result<(PathBuf, String), NodeError> {
    // The prefix may name subfolders ("anime/shot1"), never a way out of the root.
    let target = resolve_inside(root, prefix)?;
    let folder = target.parent().unwrap_or(root).to_path_buf();
    let stem = target
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .ok_or_else(|| NodeError::InvalidInput(format!("bad filename_prefix {prefix:?}")))?;
    std::fs::create_dir_all(&folder).map_err(|source| NodeError::Io {
        op: "create",
        path: folder.clone(),
        source,
    })?;
    // Judged again now that the folders exist: a link swapped in meanwhile is caught.
    resolve_inside(root, prefix)?;
    Ok((folder, stem))
}

/// Writing holds every image as 8-bit pixels besides the input batch.
pub(super) fn save_cost(i: &ShapeInputs<'_>) -> NodeCost {
    let images = i.shape("images");
    NodeCost::outputs(Vec::new())
        .working(images.elements())
        .work(megapasses(&images))
}

/// Saves images into the output dir.
struct SaveImage;

static SAVE_IMAGE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("SaveImage", "Save Image", "image")
        .stage(Stage::Deliver)
        .description("Saves the input images to your output directory.")
        .input(InputSpec::link("images", PortType::Image).tooltip("The images to save."))
        .input(
            InputSpec::string("filename_prefix", "ComfyUI", false)
                .tooltip("The prefix for the file to save; may name subfolders."),
        )
        .output_node()
        .shapes(save_cost)
});

impl Node for SaveImage {
    fn schema(&self) -> &NodeSchema {
        &SAVE_IMAGE
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let prefix = inputs.str("filename_prefix")?;
        save_batch(
            ctx,
            inputs.image("images")?,
            &ctx.env.output_dir,
            prefix,
            Numbering::Continue,
        )?;
        Ok(Vec::new())
    }
}

/// Saves images into the temp dir, for viewing rather than keeping.
struct PreviewImage;

static PREVIEW_IMAGE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("PreviewImage", "Preview Image", "image")
        .stage(Stage::Deliver)
        .description("Saves the input images to the temporary directory.")
        .input(InputSpec::link("images", PortType::Image))
        .output_node()
        .shapes(save_cost)
});

impl Node for PreviewImage {
    fn schema(&self) -> &NodeSchema {
        &PREVIEW_IMAGE
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        preview(ctx, inputs.image("images")?)?;
        Ok(Vec::new())
    }
}

/// Two images side by side in the UI (a before/after slider): both are saved as previews.
struct ImageCompare;

static IMAGE_COMPARE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("ImageCompare", "Image Compare", "image")
        .stage(Stage::Deliver)
        .description("Compares two images with a slider: both are saved as previews.")
        .input(InputSpec::link("image_a", PortType::Image).optional())
        .input(InputSpec::link("image_b", PortType::Image).optional())
        .output_node()
        .shapes(save_cost)
});

impl Node for ImageCompare {
    fn schema(&self) -> &NodeSchema {
        &IMAGE_COMPARE
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        for name in ["image_a", "image_b"] {
            if inputs.get(name).is_some() {
                preview(ctx, inputs.image(name)?)?;
            }
        }
        Ok(Vec::new())
    }
}

/// Writes `images` to the temp dir as the job's previews.
pub(super) fn preview(
    ctx: &ExecContext<'_>,
    images: &candle_core::Tensor,
) -> Result<(), NodeError> {
    let prefix = format!("sakuga_temp_{}", ctx.job_id);
    save_batch(ctx, images, &ctx.env.temp_dir, &prefix, Numbering::Preview)
}

/// Emits each image of the batch to the job's frame stream, paced at `fps`.
struct StreamFrames;

static STREAM_FRAMES: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("StreamFrames", "Stream Frames", "sakuga/animation")
        .streams()
        .description(
            "Streams the batch to the job's Watch stream as frames at a target FPS; \
             animation previews end in it.",
        )
        .input(InputSpec::link("images", PortType::Image))
        .input(InputSpec::float("fps", 24.0, 1.0, 240.0, 0.5))
        .input(
            InputSpec::boolean("pace", true)
                .tooltip("hold each frame until its time at the target FPS, as a player would"),
        )
        .output_node()
});

impl Node for StreamFrames {
    fn schema(&self) -> &NodeSchema {
        &STREAM_FRAMES
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let images = inputs.image("images")?;
        let fps = inputs.float("fps")?;
        let pace = inputs.boolean("pace")?;
        let frames = images.dim(0)?;
        // A sink with a pacer holds frames until their time; the device worker moves on.
        let sleep_here = pace && !ctx.sink.paces_frames();
        let interval = Duration::from_secs_f64(1.0 / fps);
        let start = Instant::now();
        for index in 0..frames {
            if sleep_here {
                // Sleep in short slices so a cancel is seen within one frame interval.
                let due = start + interval * index as u32;
                while let Some(left) = due.checked_duration_since(Instant::now()) {
                    if ctx.cancel.is_cancelled() {
                        return Err(NodeError::Cancelled);
                    }
                    std::thread::sleep(left.min(Duration::from_millis(20)));
                }
            }
            ctx.step(index as u64, frames as u64)?;
            let frame = StreamFrame {
                index: index as u64,
                image: images.get(index)?,
                target_fps: fps,
                paced: pace,
            };
            ctx.sink.frame(ctx.node_id, frame);
        }
        ctx.sink.progress(ctx.node_id, frames as u64, frames as u64);
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{CancelToken, NodeEnv, NullSink};
    use candle_core::{DType, Device, Tensor};

    fn preview(env: &NodeEnv, job_id: &str) -> Result<Vec<Value>, NodeError> {
        let ctx = ExecContext {
            job_id,
            node_id: "p",
            env,
            sink: &NullSink,
            cancel: &CancelToken::new(),
            workflow: None,
            batch_limit: None,
        };
        let mut inputs = Inputs::new();
        let images = Tensor::zeros((2, 4, 4, 3), DType::F32, &Device::Cpu).unwrap();
        inputs.insert("images", Value::Image(images));
        PreviewImage.execute(&ctx, &inputs)
    }

    #[test]
    fn previews_are_named_without_scanning_or_per_job_state() {
        let dir = tempfile::tempdir().unwrap();
        let env = NodeEnv::new(
            dir.path().join("in"),
            dir.path().join("out"),
            dir.path().into(),
        );
        for job in 0..50 {
            preview(&env, &format!("job{job}")).unwrap();
        }
        // Twice in one job (two preview nodes) never reuses a name.
        preview(&env, "job0").unwrap();
        assert_eq!(
            std::fs::read_dir(&env.temp_dir).unwrap().count(),
            51 * 2,
            "one file per image, none overwritten"
        );
        assert!(
            !COUNTERS.lock().keys().any(|k| k.starts_with(&env.temp_dir)),
            "previews added per-job counters"
        );
    }

    #[test]
    fn a_node_past_the_memory_budget_fails_with_oom_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let env = NodeEnv::new(
            dir.path().join("in"),
            dir.path().join("out"),
            dir.path().into(),
        );
        env.set_memory_budget(1 << 20);
        let empty = crate::registry::NodeRegistry::with_builtins();
        let node = empty.get("EmptyImage").unwrap();
        let ctx = ExecContext {
            job_id: "j",
            node_id: "1",
            env: &env,
            sink: &NullSink,
            cancel: &CancelToken::new(),
            workflow: None,
            batch_limit: None,
        };
        let mut inputs = Inputs::new();
        for (name, v) in [
            ("width", 1024),
            ("height", 1024),
            ("batch_size", 1),
            ("color", 0),
        ] {
            inputs.insert(name, Value::Int(v));
        }
        let err = node.execute(&ctx, &inputs).unwrap_err();
        assert_eq!(err.kind(), Some(sakuga_telemetry::ErrorKind::Oom), "{err}");
        assert!(matches!(err, NodeError::OverBudget { bytes, budget, .. }
            if bytes == 1024 * 1024 * 12 && budget == 1 << 20));
        inputs.insert("width", Value::Int(64));
        inputs.insert("height", Value::Int(64));
        assert!(node.execute(&ctx, &inputs).is_ok());
    }
}
