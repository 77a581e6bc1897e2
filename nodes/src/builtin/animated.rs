//! Animated outputs, as ComfyUI's `comfy_extras/nodes_images.py` has them: SaveAnimatedWEBP
//! (libwebp's animation encoder through `webp-animation`) and SaveAnimatedPNG (APNG through
//! the `png` crate). One file per batch, `{prefix}_{counter:05}_.webp|png`, numbered in the
//! same sequence as SaveImage's files. Each frame lasts `int(1000 / fps)` ms, as ComfyUI
//! hands PIL, and the API-format workflow is embedded where ComfyUI puts it: an EXIF `Model`
//! tag `prompt:{json}` in the WebP, a `comf` chunk `prompt\0{json}` after the APNG's frames.

use std::io::Write;
use std::path::Path;
use std::sync::LazyLock;

use webp_animation::{
    AnimParams, ColorMode, Encoder, EncoderOptions, EncodingConfig, EncodingType,
};

use super::output::{next_counter, output_target, save_cost};
use crate::error::NodeError;
use crate::image::{Pixels, to_pixels};
use crate::node::{ExecContext, Inputs, Node, OutputFile};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{InputSpec, NodeSchema};
use crate::value::Value;
use sakuga_telemetry::Stage;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(SaveAnimatedWebp);
    registry.register(SaveAnimatedPng);
}

/// ComfyUI's `method` choices and the libwebp effort each stands for.
const WEBP_METHODS: &[(&str, usize)] = &[("default", 4), ("fastest", 0), ("slowest", 6)];
const WEBP_METHOD_NAMES: &[&str] = &["default", "fastest", "slowest"];

/// How long each frame shows, in whole milliseconds, as ComfyUI computes it.
pub fn frame_duration_ms(fps: f64) -> u32 {
    ((1000.0 / fps) as u32).max(1)
}

/// Saves the batch as one animated WebP.
struct SaveAnimatedWebp;

static SAVE_ANIMATED_WEBP: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("SaveAnimatedWEBP", "SaveAnimatedWEBP", "image/animation")
        .stage(Stage::Deliver)
        .animation()
        .description("Saves the images as one animated WebP in your output directory.")
        .input(InputSpec::link("images", PortType::Image))
        .input(InputSpec::string("filename_prefix", "ComfyUI", false))
        .input(InputSpec::float("fps", 6.0, 0.01, 1000.0, 0.01))
        .input(InputSpec::boolean("lossless", true))
        .input(InputSpec::int("quality", 80, 0, 100))
        .input(InputSpec::combo("method", WEBP_METHOD_NAMES))
        .output_node()
        .shapes(save_cost)
});

impl Node for SaveAnimatedWebp {
    fn schema(&self) -> &NodeSchema {
        &SAVE_ANIMATED_WEBP
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let method = inputs.str("method")?;
        let settings = WebpSettings {
            duration_ms: frame_duration_ms(inputs.float("fps")?),
            lossless: inputs.boolean("lossless")?,
            quality: inputs.int("quality")? as f32,
            method: WEBP_METHODS
                .iter()
                .find(|(name, _)| *name == method)
                .map_or(4, |(_, effort)| *effort),
        };
        save_animation(ctx, inputs, "webp", |frames, prompt| {
            encode_webp(frames, &settings, prompt)
        })
    }
}

/// What SaveAnimatedWEBP hands the encoder.
#[derive(Debug, Clone, Copy)]
pub struct WebpSettings {
    pub duration_ms: u32,
    pub lossless: bool,
    /// 0-100: quality when lossy, effort when lossless (libwebp's meaning).
    pub quality: f32,
    /// libwebp's `method`, 0 (fast) to 6 (small).
    pub method: usize,
}

/// Encodes frames of one size as an endlessly looping animated WebP, with `prompt` in an
/// EXIF `Model` tag when given.
///
/// # Errors
/// [`NodeError::Encode`] for no frames, frames of different sizes, or an encoder failure.
pub fn encode_webp(
    frames: &[Pixels],
    settings: &WebpSettings,
    prompt: Option<&str>,
) -> Result<Vec<u8>, NodeError> {
    let fail = |reason: String| NodeError::Encode {
        format: "webp",
        reason,
    };
    let first = frames
        .first()
        .ok_or_else(|| fail("an animation needs at least one frame".into()))?;
    let channels = first.channels;
    let options = EncoderOptions {
        anim_params: AnimParams { loop_count: 0 },
        color_mode: if channels == 4 {
            ColorMode::Rgba
        } else {
            ColorMode::Rgb
        },
        encoding_config: Some(EncodingConfig {
            encoding_type: if settings.lossless {
                EncodingType::Lossless
            } else {
                EncodingType::new_lossy()
            },
            quality: settings.quality,
            method: settings.method,
        }),
        ..EncoderOptions::default()
    };
    let mut encoder = Encoder::new_with_options((first.width, first.height), options)
        .map_err(|e| fail(format!("encoder: {e:?}")))?;
    let step = settings.duration_ms as i32;
    let mut timestamp = 0i32;
    for frame in frames {
        if (frame.width, frame.height, frame.channels) != (first.width, first.height, channels) {
            return Err(fail("frames of an animation must share one size".into()));
        }
        let data = if channels == 1 {
            frame.data.iter().flat_map(|&v| [v, v, v]).collect()
        } else {
            frame.data.clone()
        };
        encoder
            .add_frame(&data, timestamp)
            .map_err(|e| fail(format!("frame: {e:?}")))?;
        timestamp = timestamp.saturating_add(step);
    }
    let webp = encoder
        .finalize(timestamp)
        .map_err(|e| fail(format!("finalize: {e:?}")))?;
    let mut bytes = webp.to_vec();
    if let Some(prompt) = prompt {
        add_webp_exif(&mut bytes, &exif_with_model(&format!("prompt:{prompt}")))?;
    }
    Ok(bytes)
}

/// A little-endian TIFF block with one IFD entry: ASCII tag 0x0110 (`Model`).
fn exif_with_model(text: &str) -> Vec<u8> {
    let count = text.len() as u32 + 1;
    let mut tiff = Vec::with_capacity(26 + count as usize);
    tiff.extend_from_slice(b"II\x2a\x00");
    tiff.extend_from_slice(&8u32.to_le_bytes());
    tiff.extend_from_slice(&1u16.to_le_bytes());
    tiff.extend_from_slice(&0x0110u16.to_le_bytes());
    tiff.extend_from_slice(&2u16.to_le_bytes());
    tiff.extend_from_slice(&count.to_le_bytes());
    tiff.extend_from_slice(&26u32.to_le_bytes());
    tiff.extend_from_slice(&0u32.to_le_bytes());
    tiff.extend_from_slice(text.as_bytes());
    tiff.push(0);
    tiff
}

/// Appends an `EXIF` chunk to an extended-format (VP8X) WebP and sets its EXIF flag; the
/// animation encoder always writes VP8X. Container bookkeeping only, no pixels touched.
fn add_webp_exif(webp: &mut Vec<u8>, exif: &[u8]) -> Result<(), NodeError> {
    let fail = |reason: &str| NodeError::Encode {
        format: "webp",
        reason: reason.into(),
    };
    if webp.len() < 30 || &webp[0..4] != b"RIFF" || &webp[8..16] != b"WEBPVP8X" {
        return Err(fail("the encoder did not write an extended WebP"));
    }
    const EXIF_FLAG: u8 = 0x08;
    webp[20] |= EXIF_FLAG;
    webp.extend_from_slice(b"EXIF");
    webp.extend_from_slice(&(exif.len() as u32).to_le_bytes());
    webp.extend_from_slice(exif);
    if exif.len() % 2 == 1 {
        webp.push(0);
    }
    let riff_size = u32::try_from(webp.len() - 8).map_err(|_| fail("over 4 GiB"))?;
    webp[4..8].copy_from_slice(&riff_size.to_le_bytes());
    Ok(())
}

/// Saves the batch as one animated PNG (APNG).
struct SaveAnimatedPng;

static SAVE_ANIMATED_PNG: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("SaveAnimatedPNG", "SaveAnimatedPNG", "image/animation")
        .stage(Stage::Deliver)
        .animation()
        .description("Saves the images as one animated PNG in your output directory.")
        .input(InputSpec::link("images", PortType::Image))
        .input(InputSpec::string("filename_prefix", "ComfyUI", false))
        .input(InputSpec::float("fps", 6.0, 0.01, 1000.0, 0.01))
        .input(InputSpec::int("compress_level", 4, 0, 9))
        .output_node()
        .shapes(save_cost)
});

impl Node for SaveAnimatedPng {
    fn schema(&self) -> &NodeSchema {
        &SAVE_ANIMATED_PNG
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let duration_ms = frame_duration_ms(inputs.float("fps")?);
        let level = inputs.int("compress_level")?.clamp(0, 9) as u8;
        save_animation(ctx, inputs, "png", |frames, prompt| {
            encode_apng(frames, duration_ms, level, prompt)
        })
    }
}

/// Encodes the node's `images` with `encode` (given the workflow to embed) into the next
/// numbered `<prefix>_NNNNN_.<extension>` of the output dir, and reports the file.
fn save_animation(
    ctx: &ExecContext<'_>,
    inputs: &Inputs,
    extension: &str,
    encode: impl FnOnce(&[Pixels], Option<&str>) -> Result<Vec<u8>, NodeError>,
) -> Result<Vec<Value>, NodeError> {
    let frames = to_pixels(inputs.image("images")?)?;
    let (folder, stem) = output_target(&ctx.env.output_dir, inputs.str("filename_prefix")?)?;
    let path = folder.join(format!(
        "{stem}_{:05}_.{extension}",
        next_counter(&folder, &stem)
    ));
    let prompt = ctx.workflow.map(|w| w.to_string());
    let bytes = encode(&frames, prompt.as_deref())?;
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

/// Encodes frames of one size as an endlessly looping APNG at zlib `level` (0-9), with
/// `prompt` in a `comf` chunk after the frames when given.
///
/// # Errors
/// [`NodeError::Encode`] for no frames, frames of different sizes, or an encoder failure.
pub fn encode_apng(
    frames: &[Pixels],
    duration_ms: u32,
    level: u8,
    prompt: Option<&str>,
) -> Result<Vec<u8>, NodeError> {
    let fail = |reason: String| NodeError::Encode {
        format: "apng",
        reason,
    };
    let text = |e: png::EncodingError| fail(e.to_string());
    let first = frames
        .first()
        .ok_or_else(|| fail("an animation needs at least one frame".into()))?;
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, first.width, first.height);
    encoder.set_color(match first.channels {
        1 => png::ColorType::Grayscale,
        4 => png::ColorType::Rgba,
        _ => png::ColorType::Rgb,
    });
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_deflate_compression(match level {
        0 => png::DeflateCompression::NoCompression,
        n => png::DeflateCompression::Level(n),
    });
    encoder.set_animated(frames.len() as u32, 0).map_err(text)?;
    encoder
        .set_frame_delay(duration_ms.min(u32::from(u16::MAX)) as u16, 1000)
        .map_err(text)?;
    let mut writer = encoder.write_header().map_err(text)?;
    for frame in frames {
        if (frame.width, frame.height, frame.channels)
            != (first.width, first.height, first.channels)
        {
            return Err(fail("frames of an animation must share one size".into()));
        }
        writer.write_image_data(&frame.data).map_err(text)?;
    }
    if let Some(prompt) = prompt {
        let mut chunk = b"prompt\0".to_vec();
        chunk.extend_from_slice(prompt.as_bytes());
        writer
            .write_chunk(png::chunk::ChunkType(*b"comf"), &chunk)
            .map_err(text)?;
    }
    writer.finish().map_err(text)?;
    Ok(bytes)
}

/// Writes through a temp file and a rename, so a reader never sees half a file.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), NodeError> {
    let io = |op, source| NodeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("partial");
    // A leftover (or planted) file or link at the temp name is removed, never written
    // through: `create_new` refuses to follow a link.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove", e)),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    file.write_all(bytes).map_err(|e| io("write", e))?;
    file.sync_all().map_err(|e| io("sync", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("rename", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(n: usize, w: u32, h: u32) -> Vec<Pixels> {
        (0..n)
            .map(|i| Pixels {
                width: w,
                height: h,
                channels: 3,
                data: (0..w * h * 3)
                    .map(|p| (p as usize * 7 + i * 40) as u8)
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn frame_durations_follow_comfyui() {
        assert_eq!(frame_duration_ms(6.0), 166);
        assert_eq!(frame_duration_ms(24.0), 41);
        assert_eq!(frame_duration_ms(1000.0), 1);
        assert_eq!(frame_duration_ms(0.01), 100_000);
    }

    #[test]
    fn apng_decodes_to_its_frames_and_delays() {
        let bytes = encode_apng(&frames(3, 8, 6), 41, 4, Some("{\"1\":{}}")).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
        let mut reader = decoder.read_info().unwrap();
        let control = reader.info().animation_control.unwrap();
        assert_eq!(control.num_frames, 3);
        assert_eq!(control.num_plays, 0, "loops forever");
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let mut seen = 0;
        while reader.next_frame(&mut buf).is_ok() {
            let fctl = reader.info().frame_control.unwrap();
            assert_eq!((fctl.delay_num, fctl.delay_den), (41, 1000));
            assert_eq!((fctl.width, fctl.height), (8, 6));
            seen += 1;
        }
        assert_eq!(seen, 3);
        let needle = b"comfprompt\0{\"1\":{}}";
        assert!(bytes.windows(needle.len()).any(|w| w == needle));
    }

    #[test]
    fn webp_carries_the_prompt_in_exif() {
        let settings = WebpSettings {
            duration_ms: 166,
            lossless: false,
            quality: 80.0,
            method: 4,
        };
        let bytes = encode_webp(&frames(2, 8, 8), &settings, Some("{}")).unwrap();
        assert_eq!(bytes[20] & 0x08, 0x08, "VP8X EXIF flag");
        let size = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        assert_eq!(size + 8, bytes.len());
        assert!(bytes.windows(9).any(|w| w == b"prompt:{}"));
    }

    #[test]
    fn mixed_sizes_and_empty_batches_are_refused() {
        let mut mixed = frames(2, 8, 8);
        mixed[1].width = 4;
        assert!(encode_apng(&mixed, 10, 1, None).is_err());
        assert!(encode_apng(&[], 10, 1, None).is_err());
    }
}
