//! Video nodes, as ComfyUI 0.8.0's `comfy_extras/nodes_video.py` has them: LoadVideo,
//! GetVideoComponents, CreateVideo and SaveVideo. A VIDEO is an IMAGE batch and a frame
//! rate ([`Video`]); sakuga has no audio, so the AUDIO a video gives is [`NoAudio`] and
//! real audio is refused. Files are H.264 in MP4 ([`crate::video`]).

use std::sync::LazyLock;

use candle_core::Tensor;

use super::animated::write_atomically;
use super::image::file_salt;
use super::output::{next_counter, output_target};
use crate::error::NodeError;
use crate::files::resolve_inside;
use crate::image::{Pixels, from_pixels, to_pixels};
use crate::node::{ExecContext, Inputs, Node, NodeEnv, OutputFile};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{ComboOptions, InputSpec, NodeSchema};
use crate::shape::{NodeCost, Shape, ShapeInputs, megapasses};
use crate::value::Value;
use crate::video::{FPS_RANGE, NoAudio, Video, check_encodable, decode_mp4, encode_mp4, probe_mp4};
use sakuga_telemetry::Stage;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(LoadVideo);
    registry.register(GetVideoComponents);
    registry.register(CreateVideo);
    registry.register(SaveVideo);
}

/// ComfyUI's `Types.VideoContainer.as_input()` and `Types.VideoCodec.as_input()`.
const FORMATS: &[&str] = &["auto", "mp4"];
const CODECS: &[&str] = &["auto", "h264"];

/// A video file from the input dir, decoded into frames when it runs.
struct LoadVideo;

static LOAD_VIDEO: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("LoadVideo", "Load Video", "image/video")
        .input(InputSpec::files("file", ComboOptions::InputVideos))
        .output(PortType::Video)
        .shapes(load_video_cost)
});

/// Sized from the file's header: the decoded frames are the VIDEO (which has no shape of
/// its own, so they are counted as the node's memory).
fn load_video_cost(i: &ShapeInputs<'_>) -> NodeCost {
    let info = i
        .env
        .zip(i.str("file"))
        .and_then(|(env, name)| resolve_inside(&env.input_dir, name).ok())
        .and_then(|path| probe_mp4(&path).ok());
    let cost = NodeCost::outputs(vec![Shape::Fixed]);
    match info {
        Some(info) => {
            let frames = Shape::image(info.frames as u64, info.height as u64, info.width as u64);
            cost.working(info.image_bytes()).work(megapasses(&frames))
        }
        None => cost,
    }
}

impl Node for LoadVideo {
    fn schema(&self) -> &NodeSchema {
        &LOAD_VIDEO
    }

    /// Decodes every frame now rather than when GetVideoComponents asks (ComfyUI decodes
    /// lazily): the frames are what every consumer reads, the job's memory budget is
    /// checked against the header before the first frame, and a damaged file fails here,
    /// at the node that names it. The cost is that SaveVideo re-encodes a loaded video
    /// where ComfyUI copies its packets.
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let path = resolve_inside(&ctx.env.input_dir, inputs.str("file")?)?;
        let (info, frames) = decode_mp4(&path, |info, index| {
            if index == 0 {
                // The 8-bit frames are held until the f32 batch is built from them.
                let bytes = info.image_bytes();
                ctx.reserve("decoded video frames", bytes.saturating_add(bytes / 4))?;
            }
            ctx.step(index as u64, info.frames as u64)
        })?;
        let pixels: Vec<Pixels> = frames
            .into_iter()
            .map(|data| Pixels {
                width: info.width as u32,
                height: info.height as u32,
                channels: 3,
                data,
            })
            .collect();
        let frames = from_pixels(&pixels, &ctx.env.device)?;
        Ok(vec![Value::object(Video {
            frames,
            fps: info.fps,
        })])
    }

    /// A changed file must not be served from the cache (ComfyUI keys on its mtime).
    fn cache_salt(&self, env: &NodeEnv, inputs: &Inputs) -> Result<Option<String>, NodeError> {
        file_salt(env, inputs.str("file")?)
    }
}

/// A video's frames, audio and rate.
struct GetVideoComponents;

static GET_VIDEO_COMPONENTS: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("GetVideoComponents", "Get Video Components", "image/video")
        .description("Extracts all components from a video: frames, audio, and framerate.")
        .input(
            InputSpec::link("video", PortType::Video)
                .tooltip("The video to extract components from."),
        )
        .named_output("images", PortType::Image)
        .named_output("audio", PortType::Audio)
        .named_output("fps", PortType::Float)
        .shapes(|_| NodeCost::outputs(vec![Shape::Fixed; 3]))
});

impl Node for GetVideoComponents {
    fn schema(&self) -> &NodeSchema {
        &GET_VIDEO_COMPONENTS
    }

    fn execute(&self, _ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let video = inputs.object::<Video>("video")?;
        Ok(vec![
            Value::Image(video.frames.clone()),
            Value::object(NoAudio),
            Value::Float(video.fps),
        ])
    }
}

/// Frames and a rate made into a video.
struct CreateVideo;

static CREATE_VIDEO: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("CreateVideo", "Create Video", "image/video")
        .description("Create a video from images.")
        .input(
            InputSpec::link("images", PortType::Image)
                .tooltip("The images to create a video from."),
        )
        .input(InputSpec::float("fps", 30.0, FPS_RANGE.0, FPS_RANGE.1, 1.0))
        .input(
            InputSpec::link("audio", PortType::Audio)
                .optional()
                .tooltip("The audio to add to the video."),
        )
        .output(PortType::Video)
        .shapes(|_| NodeCost::outputs(vec![Shape::Fixed]))
});

impl Node for CreateVideo {
    fn schema(&self) -> &NodeSchema {
        &CREATE_VIDEO
    }

    /// The frames are shared, not copied. An empty batch or a rate outside ComfyUI's range
    /// fails here, where the user set it, not later in SaveVideo.
    fn execute(&self, _ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        // The "no audio" of another video is ComfyUI's `None`; anything else is sound
        // sakuga cannot carry.
        if let Some(audio) = inputs.get("audio")
            && !matches!(audio, Value::Object(o) if o.is::<NoAudio>())
        {
            return Err(NodeError::InvalidInput(
                "CreateVideo: audio is not supported by sakuga; unlink the audio input".into(),
            ));
        }
        let images = inputs.image("images")?;
        let fps = inputs.float("fps")?;
        if !(FPS_RANGE.0..=FPS_RANGE.1).contains(&fps) {
            return Err(NodeError::InvalidInput(format!(
                "fps {fps} is outside {}..{}",
                FPS_RANGE.0, FPS_RANGE.1
            )));
        }
        let frames = match images.dims() {
            [0, ..] => {
                return Err(NodeError::InvalidInput(
                    "a video needs at least one frame, got an empty image batch".into(),
                ));
            }
            [_, _, _, 3] => images.clone(),
            [_, _, _, 4] => images.narrow(3, 0, 3)?,
            [_, _, _, 1] => images.repeat((1, 1, 1, 3))?,
            dims => {
                return Err(NodeError::InvalidInput(format!(
                    "images must be (frames, height, width, 1|3|4), got {dims:?}"
                )));
            }
        };
        Ok(vec![Value::object(Video { frames, fps })])
    }
}

/// Saves a video as H.264 in MP4 in the output dir.
struct SaveVideo;

static SAVE_VIDEO: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("SaveVideo", "Save Video", "image/video")
        .stage(Stage::Deliver)
        .description("Saves the input images to your ComfyUI output directory.")
        .input(InputSpec::link("video", PortType::Video).tooltip("The video to save."))
        .input(
            InputSpec::string("filename_prefix", "video/ComfyUI", false).tooltip(
                "The prefix for the file to save. This may include formatting information \
                 such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values \
                 from nodes.",
            ),
        )
        .input(InputSpec::combo("format", FORMATS).tooltip("The format to save the video as."))
        .input(InputSpec::combo("codec", CODECS).tooltip("The codec to use for the video."))
        .output_node()
        .shapes(|_| NodeCost::outputs(Vec::new()))
});

impl Node for SaveVideo {
    fn schema(&self) -> &NodeSchema {
        &SAVE_VIDEO
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let video = inputs.object::<Video>("video")?;
        let (frames, height, width, _) = video.frames.dims4()?;
        check_encodable(width, height, frames, video.fps)?;
        // Encoding holds one frame's 8-bit copy at a time, and the growing file.
        ctx.reserve("video encoding", (width * height * 3) as u64 * 2)?;
        let (folder, stem) = output_target(&ctx.env.output_dir, inputs.str("filename_prefix")?)?;
        let path = folder.join(format!("{stem}_{:05}_.mp4", next_counter(&folder, &stem)));
        let rgb = (0..frames).map(|i| {
            ctx.step(i as u64, frames as u64)?;
            frame_rgb(&video.frames, i)
        });
        let bytes = encode_mp4(rgb, width, height, video.fps)?;
        write_atomically(&path, &bytes)?;
        ctx.sink.output(
            ctx.node_id,
            OutputFile {
                path,
                kind: "output",
            },
        );
        Ok(Vec::new())
    }
}

/// Frame `i` of an RGB batch as 8-bit pixels, clipped and truncated as ComfyUI's
/// `(frame * 255).clamp(0, 255).byte()` does.
fn frame_rgb(frames: &Tensor, i: usize) -> Result<Vec<u8>, NodeError> {
    let mut pixels = to_pixels(&frames.narrow(0, i, 1)?)?;
    Ok(pixels.pop().map(|p| p.data).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::path::PathBuf;

    use candle_core::Device;

    use super::*;
    use crate::testing::Rig;

    fn try_run(
        rig: &Rig,
        node: &dyn Node,
        inputs: &[(&str, Value)],
    ) -> Result<Vec<Value>, NodeError> {
        rig.run(node, inputs)
    }

    fn run(rig: &Rig, node: &dyn Node, inputs: &[(&str, Value)]) -> Vec<Value> {
        try_run(rig, node, inputs).unwrap_or_else(|e| panic!("{}: {e}", node.schema().class_type))
    }

    fn s(v: &str) -> Value {
        Value::String(v.into())
    }

    /// Smooth gradients with a square that moves: content a codec neither trivially nor
    /// hopelessly compresses.
    fn frames(count: usize, height: usize, width: usize) -> Tensor {
        let mut data = Vec::with_capacity(count * height * width * 3);
        for f in 0..count {
            for y in 0..height {
                for x in 0..width {
                    let inside = x / 8 == f % (width / 8) && (8..24).contains(&y);
                    let r = x as f32 / width as f32;
                    let g = y as f32 / height as f32;
                    let b = if inside { 0.9 } else { 0.2 };
                    data.extend([r, g, b]);
                }
            }
        }
        Tensor::from_vec(data, (count, height, width, 3), &Device::Cpu).unwrap()
    }

    fn video(value: &Value) -> std::sync::Arc<Video> {
        let Value::Object(o) = value else {
            panic!("not a video")
        };
        o.clone().downcast::<Video>().expect("a video")
    }

    /// Creates and saves a video, returning the written file.
    fn save(rig: &Rig, images: Tensor, fps: f64, prefix: &str) -> PathBuf {
        let video = run(
            rig,
            &CreateVideo,
            &[("images", Value::Image(images)), ("fps", Value::Float(fps))],
        );
        run(
            rig,
            &SaveVideo,
            &[
                ("video", video[0].clone()),
                ("filename_prefix", s(prefix)),
                ("format", s("auto")),
                ("codec", s("auto")),
            ],
        );
        let folder = rig.env.output_dir.join(Path::new(prefix).parent().unwrap());
        let stem = Path::new(prefix)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut found: Vec<PathBuf> = std::fs::read_dir(folder)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&stem))
            .collect();
        found.sort();
        found.pop().unwrap()
    }

    fn to_input(rig: &Rig, file: &Path, name: &str) {
        std::fs::create_dir_all(&rig.env.input_dir).unwrap();
        std::fs::copy(file, rig.env.input_dir.join(name)).unwrap();
    }

    fn load(rig: &Rig, name: &str) -> Result<Vec<Value>, NodeError> {
        try_run(rig, &LoadVideo, &[("file", s(name))])
    }

    #[test]
    fn a_video_survives_save_and_load_within_the_codecs_loss() {
        let rig = Rig::new(|_| {});
        let original = frames(6, 48, 64);
        let file = save(&rig, original.clone(), 12.5, "video/ComfyUI");
        assert_eq!(file, rig.env.output_dir.join("video/ComfyUI_00001_.mp4"));
        to_input(&rig, &file, "clip.mp4");
        let loaded = load(&rig, "clip.mp4").unwrap();
        let parts = run(&rig, &GetVideoComponents, &[("video", loaded[0].clone())]);
        let Value::Image(images) = &parts[0] else {
            panic!("images")
        };
        assert_eq!(images.dims(), &[6, 48, 64, 3]);
        assert!(matches!(&parts[1], Value::Object(o) if o.is::<NoAudio>()));
        let Value::Float(fps) = parts[2] else {
            panic!("fps")
        };
        assert!((fps - 12.5).abs() < 1e-9, "fps {fps}");
        let diff = (images - &original).unwrap().abs().unwrap();
        let mean = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
        let max = diff
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!("codec loss: mean {mean:.4}, max {max:.4}");
        assert!(mean < 0.015, "mean error {mean}");
        assert!(max < 0.1, "max error {max}");
    }

    #[test]
    fn saves_are_numbered_like_comfyuis() {
        let rig = Rig::new(|_| {});
        let first = save(&rig, frames(2, 32, 32), 30.0, "shots/take");
        let second = save(&rig, frames(2, 32, 32), 30.0, "shots/take");
        assert_eq!(first.file_name().unwrap(), "take_00001_.mp4");
        assert_eq!(second.file_name().unwrap(), "take_00002_.mp4");
    }

    #[test]
    fn create_video_refuses_empty_batches_bad_rates_and_audio() {
        let rig = Rig::new(|_| {});
        let create = |images: Tensor, fps: f64, audio: Option<Value>| {
            let mut inputs = vec![("images", Value::Image(images)), ("fps", Value::Float(fps))];
            inputs.extend(audio.map(|a| ("audio", a)));
            try_run(&rig, &CreateVideo, &inputs)
                .unwrap_err()
                .to_string()
        };
        let empty = Tensor::zeros((0, 32, 32, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(create(empty, 30.0, None).contains("at least one frame"));
        assert!(create(frames(1, 32, 32), 0.5, None).contains("fps 0.5 is outside 1..120"));
        assert!(create(frames(1, 32, 32), 121.0, None).contains("outside"));
        let audio = Value::object(42u32);
        assert!(create(frames(1, 32, 32), 30.0, Some(audio)).contains("audio is not supported"));
        // A video's own "no audio" passes, as ComfyUI's `None` does.
        let ok = [
            ("images", Value::Image(frames(1, 32, 32))),
            ("fps", Value::Float(30.0)),
            ("audio", Value::object(NoAudio)),
        ];
        assert_eq!(video(&run(&rig, &CreateVideo, &ok)[0]).fps, 30.0);
    }

    #[test]
    fn save_video_refuses_odd_sizes() {
        let rig = Rig::new(|_| {});
        let video = run(
            &rig,
            &CreateVideo,
            &[
                ("images", Value::Image(frames(1, 33, 32))),
                ("fps", Value::Float(8.0)),
            ],
        );
        let err = try_run(
            &rig,
            &SaveVideo,
            &[
                ("video", video[0].clone()),
                ("filename_prefix", s("odd")),
                ("format", s("mp4")),
                ("codec", s("h264")),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("even frame sizes, got 32x33"), "{err}");
    }

    #[test]
    fn load_video_names_what_is_wrong_with_a_file() {
        let rig = Rig::new(|_| {});
        std::fs::create_dir_all(&rig.env.input_dir).unwrap();
        let missing = load(&rig, "nope.mp4").unwrap_err();
        assert!(
            matches!(missing, NodeError::Io { op: "read", .. }),
            "{missing}"
        );
        assert!(matches!(
            load(&rig, "../escape.mp4").unwrap_err(),
            NodeError::PathEscapes { .. }
        ));

        std::fs::write(
            rig.env.input_dir.join("image.mp4"),
            b"\x89PNG\r\n\x1a\n0000000000",
        )
        .unwrap();
        let err = load(&rig, "image.mp4").unwrap_err().to_string();
        assert!(err.contains("not an MP4/MOV file (a PNG image)"), "{err}");
        std::fs::write(rig.env.input_dir.join("empty.mp4"), b"").unwrap();
        assert!(
            load(&rig, "empty.mp4")
                .unwrap_err()
                .to_string()
                .contains("an empty file")
        );

        let file = save(&rig, frames(4, 32, 32), 24.0, "whole");
        let bytes = std::fs::read(&file).unwrap();
        for cut in [bytes.len() / 2, bytes.len() - 40] {
            std::fs::write(rig.env.input_dir.join("cut.mp4"), &bytes[..cut]).unwrap();
            let err = load(&rig, "cut.mp4").unwrap_err().to_string();
            assert!(
                err.contains("truncated or damaged MP4"),
                "cut at {cut}: {err}"
            );
        }
    }

    /// A file ComfyUI 0.8.0 wrote itself (`VideoFromComponents.save_to`: PyAV, libx264
    /// High profile with B-frames, yuv420p, 25 fps): 6 frames of 64x48 gradients, red
    /// along x, green along y, blue 0.1 + 0.15 * frame (so frame order shows).
    #[test]
    fn load_video_reads_what_comfyui_writes() {
        let rig = Rig::new(|_| {});
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/video/comfyui_pyav_x264.mp4");
        to_input(&rig, &fixture, "comfy.mp4");
        let loaded = load(&rig, "comfy.mp4").unwrap();
        let video = video(&loaded[0]);
        assert_eq!(video.frames.dims(), &[6, 48, 64, 3]);
        assert!((video.fps - 25.0).abs() < 1e-9, "fps {}", video.fps);
        let expected = {
            let x = Tensor::arange(0f32, 64.0, &Device::Cpu).unwrap() / 63.0;
            let y = Tensor::arange(0f32, 48.0, &Device::Cpu).unwrap() / 47.0;
            let r = x
                .unwrap()
                .reshape((1, 1, 64, 1))
                .unwrap()
                .broadcast_as((6, 48, 64, 1))
                .unwrap();
            let g = y
                .unwrap()
                .reshape((1, 48, 1, 1))
                .unwrap()
                .broadcast_as((6, 48, 64, 1))
                .unwrap();
            let steps = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap();
            let b = ((steps * 0.15).unwrap() + 0.1).unwrap();
            let b = b
                .reshape((6, 1, 1, 1))
                .unwrap()
                .broadcast_as((6, 48, 64, 1))
                .unwrap();
            Tensor::cat(&[&r, &g, &b], 3).unwrap()
        };
        let diff = (&video.frames - &expected).unwrap().abs().unwrap();
        let mean = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
        let blue = video
            .frames
            .narrow(3, 2, 1)
            .unwrap()
            .mean((1, 2, 3))
            .unwrap();
        let blue = blue.to_vec1::<f32>().unwrap();
        assert!(
            blue.windows(2).all(|w| w[0] < w[1]),
            "frames out of order: {blue:?}"
        );
        assert!(mean < 0.015, "mean error {mean}");
    }
}
