//! Output nodes: SaveImage (PNG with the workflow embedded, as ComfyUI writes it),
//! PreviewImage (into the temp dir) and StreamFrames (frames to the job's stream at a
//! target FPS, the node animation previews end in).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::NodeError;
use crate::files::resolve_inside;
use crate::image::{to_pixels, write_png};
use crate::node::{ExecContext, Inputs, Node, OutputFile, StreamFrame};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{InputSpec, NodeSchema};
use crate::value::Value;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(SaveImage);
    registry.register(PreviewImage);
    registry.register(StreamFrames);
}

/// Next free counter per (folder, prefix): scanned once, then counted in memory, so
/// concurrent jobs never pick the same file name.
static COUNTERS: LazyLock<Mutex<HashMap<PathBuf, u64>>> = LazyLock::new(Default::default);

fn next_counter(folder: &Path, stem: &str) -> u64 {
    let key = folder.join(stem);
    let mut counters = COUNTERS.lock();
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

/// Writes every image of `images` under `root` as `{prefix}_{counter:05}_.png`.
fn save_batch(
    ctx: &ExecContext<'_>,
    images: &candle_core::Tensor,
    root: &Path,
    prefix: &str,
    kind: &'static str,
) -> Result<(), NodeError> {
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
    let workflow = ctx.workflow.map(|w| w.to_string());
    let text: Vec<(&str, &str)> = workflow.iter().map(|w| ("prompt", w.as_str())).collect();
    for pixels in to_pixels(images)? {
        let counter = next_counter(&folder, &stem);
        let path = folder.join(format!("{stem}_{counter:05}_.png"));
        write_png(&path, &pixels, &text)?;
        ctx.sink.output(ctx.node_id, OutputFile { path, kind });
    }
    Ok(())
}

/// Saves images into the output dir.
struct SaveImage;

static SAVE_IMAGE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("SaveImage", "Save Image", "image")
        .description("Saves the input images to your output directory.")
        .input(InputSpec::link("images", PortType::Image).tooltip("The images to save."))
        .input(
            InputSpec::string("filename_prefix", "ComfyUI", false)
                .tooltip("The prefix for the file to save; may name subfolders."),
        )
        .output_node()
});

impl Node for SaveImage {
    fn schema(&self) -> &NodeSchema {
        &SAVE_IMAGE
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let prefix = inputs.str("filename_prefix")?;
        save_batch(
            ctx,
            inputs.image("images")?,
            &ctx.env.output_dir,
            prefix,
            "output",
        )?;
        Ok(Vec::new())
    }
}

/// Saves images into the temp dir, for viewing rather than keeping.
struct PreviewImage;

static PREVIEW_IMAGE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("PreviewImage", "Preview Image", "image")
        .description("Saves the input images to the temporary directory.")
        .input(InputSpec::link("images", PortType::Image))
        .output_node()
});

impl Node for PreviewImage {
    fn schema(&self) -> &NodeSchema {
        &PREVIEW_IMAGE
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let prefix = format!("sakuga_temp_{}", ctx.job_id);
        save_batch(
            ctx,
            inputs.image("images")?,
            &ctx.env.temp_dir,
            &prefix,
            "temp",
        )?;
        Ok(Vec::new())
    }
}

/// Emits each image of the batch to the job's frame stream, paced at `fps`.
struct StreamFrames;

static STREAM_FRAMES: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("StreamFrames", "Stream Frames", "sakuga/animation")
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
