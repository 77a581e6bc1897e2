//! Video values and the one file format they are saved in: H.264 in MP4, what ComfyUI
//! 0.8.0's SaveVideo writes (`format` auto/mp4, `codec` auto/h264). H.264 is Cisco's
//! OpenH264 (`openh264`, built from its bundled C source, so a fresh machine needs no codec
//! library); the container is the pure-Rust `mp4` crate. Frames go in and come out as 8-bit
//! RGB through 4:2:0 YUV (BT.601, limited range), as PyAV's `rgb24` to `yuv420p` does.

use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use bytes::Bytes;
use candle_core::Tensor;
use mp4::{AvcConfig, MediaConfig, Mp4Config, Mp4Reader, Mp4Sample, Mp4Writer, TrackConfig};
use openh264::OpenH264API;
use openh264::decoder::{DecodedYUV, Decoder};
use openh264::encoder::{BitRate, Complexity, Encoder, EncoderConfig, FrameRate, RateControlMode};
use openh264::formats::{RgbSliceU8, YUVBuffer, YUVSource};

use crate::error::NodeError;

/// Extensions LoadVideo lists: what ComfyUI's `filter_files_content_types(files, ["video"])`
/// keeps (Python's `video/*` mimetypes). Only MP4/MOV holding H.264 decode here; the
/// others are listed as ComfyUI lists them and refused with a clear error when loaded.
pub const VIDEO_EXTENSIONS: &[&str] = &[
    "mp4", "m4v", "mov", "qt", "webm", "mkv", "avi", "mpg", "mpeg", "mpe", "m1v", "mpa", "movie",
];

/// ComfyUI's CreateVideo `fps` range.
pub const FPS_RANGE: (f64, f64) = (1.0, 120.0);

/// OpenH264 stops at level 5.2.
const MAX_SIDE: usize = 3840;
const MAX_SHORT_SIDE: usize = 2160;

/// A VIDEO value: frames and their rate, decoded (see LoadVideo for why eagerly).
#[derive(Debug, Clone)]
pub struct Video {
    /// IMAGE batch `(frames, height, width, 3)`, f32 in `[0, 1]`.
    pub frames: Tensor,
    pub fps: f64,
}

/// The AUDIO a video without sound carries (ComfyUI's `None`): sakuga has no audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoAudio;

/// What an MP4's video track holds, read from its header alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoInfo {
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    /// Average rate, frames over the track's duration (PyAV's `average_rate`).
    pub fps: f64,
}

impl VideoInfo {
    /// Bytes of the decoded frames as an f32 IMAGE batch.
    pub fn image_bytes(&self) -> u64 {
        (self.frames as u64)
            .saturating_mul(self.width as u64 * self.height as u64 * 3)
            .saturating_mul(4)
    }
}

fn encode_error(reason: impl Into<String>) -> NodeError {
    NodeError::Encode {
        format: "mp4",
        reason: reason.into(),
    }
}

fn decode_error(path: &Path, reason: impl std::fmt::Display) -> NodeError {
    NodeError::InvalidInput(format!("video {}: {reason}", path.display()))
}

/// Checks that frames of `width x height` at `fps` can be H.264 4:2:0 in MP4. ComfyUI's
/// libx264 refuses odd sizes too ("width not divisible by 2"), so this errors rather than
/// padding or cropping the user's frames.
///
/// # Errors
/// [`NodeError::Encode`] naming the limit broken.
pub fn check_encodable(
    width: usize,
    height: usize,
    frames: usize,
    fps: f64,
) -> Result<(), NodeError> {
    if frames == 0 {
        return Err(encode_error(
            "a video needs at least one frame, got an empty batch",
        ));
    }
    if width == 0 || height == 0 || width % 2 == 1 || height % 2 == 1 {
        return Err(encode_error(format!(
            "H.264 4:2:0 needs even frame sizes, got {width}x{height}; crop or scale to an even size"
        )));
    }
    if width.max(height) > MAX_SIDE || width.min(height) > MAX_SHORT_SIDE {
        return Err(encode_error(format!(
            "OpenH264 encodes up to 3840x2160 (or 2160x3840), got {width}x{height}"
        )));
    }
    if !fps.is_finite() || fps <= 0.0 || fps > 1000.0 {
        return Err(encode_error(format!("fps must be in (0, 1000], got {fps}")));
    }
    Ok(())
}

/// The rate as the MP4 track stores it: ComfyUI's `Fraction(round(fps * 1000), 1000)`,
/// reduced, as `(timescale, ticks per frame)`.
fn rate_fraction(fps: f64) -> (u32, u32) {
    let num = (fps * 1000.0).round().max(1.0) as u64;
    let (mut a, mut b) = (num, 1000u64);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    ((num / a) as u32, (1000 / a) as u32)
}

/// Encodes 8-bit RGB frames of `width x height` (each `width * height * 3` bytes) as H.264
/// in an MP4 at `fps`.
///
/// # Errors
/// [`NodeError::Encode`] for sizes or rates H.264 cannot carry, frames of the wrong length,
/// or an encoder or muxer failure.
pub fn encode_mp4<I>(frames: I, width: usize, height: usize, fps: f64) -> Result<Vec<u8>, NodeError>
where
    I: ExactSizeIterator<Item = Result<Vec<u8>, NodeError>>,
{
    check_encodable(width, height, frames.len(), fps)?;
    // Rate control by quality, with a budget generous for anime-style frames (0.25 bits
    // per pixel); frame skipping off, since every frame of the batch must reach the file
    // (OpenH264 logs a warning that the budget is then not enforced, which is the point).
    let bits = (width * height) as f64 * fps * 0.25;
    let config = EncoderConfig::new()
        .skip_frames(false)
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .rate_control_mode(RateControlMode::Quality)
        .bitrate(BitRate::from_bps(
            bits.clamp(200_000.0, 100_000_000.0) as u32
        ))
        .complexity(Complexity::High);
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| encode_error(format!("openh264 encoder: {e}")))?;
    let (timescale, delta) = rate_fraction(fps);
    let mut muxer = Muxer::new(width, height, timescale, delta);
    let mut yuv = YUVBuffer::new(width, height);
    for (i, rgb) in frames.enumerate() {
        let rgb = rgb?;
        if rgb.len() != width * height * 3 {
            return Err(encode_error(format!(
                "frame {i} is not {width}x{height} RGB"
            )));
        }
        yuv.read_rgb8(RgbSliceU8::new(&rgb, (width, height)));
        let stream = encoder
            .encode(&yuv)
            .map_err(|e| encode_error(format!("openh264, frame {i}: {e}")))?
            .to_vec();
        muxer.push(i, &stream)?;
    }
    muxer.finish()
}

/// Annex B NAL units from the encoder into an MP4 track (length-prefixed samples, the
/// SPS and PPS moved into the `avcC` box).
struct Muxer {
    width: usize,
    height: usize,
    timescale: u32,
    delta: u32,
    sps: Option<Vec<u8>>,
    pps: Option<Vec<u8>>,
    samples: Vec<(Vec<u8>, bool)>,
}

impl Muxer {
    fn new(width: usize, height: usize, timescale: u32, delta: u32) -> Self {
        Self {
            width,
            height,
            timescale,
            delta,
            sps: None,
            pps: None,
            samples: Vec::new(),
        }
    }

    fn push(&mut self, index: usize, annex_b: &[u8]) -> Result<(), NodeError> {
        let mut sample = Vec::with_capacity(annex_b.len());
        let mut sync = false;
        for unit in openh264::nal_units(annex_b) {
            let nal = strip_start_code(unit);
            let Some(&header) = nal.first() else { continue };
            match header & 0x1f {
                7 => self.sps = Some(nal.to_vec()),
                8 => self.pps = Some(nal.to_vec()),
                kind => {
                    sync |= kind == 5;
                    sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                    sample.extend_from_slice(nal);
                }
            }
        }
        if sample.is_empty() {
            return Err(encode_error(format!(
                "openh264 produced no picture for frame {index}"
            )));
        }
        self.samples.push((sample, sync));
        Ok(())
    }

    fn finish(self) -> Result<Vec<u8>, NodeError> {
        let mp4 = |e: mp4::Error| encode_error(format!("mp4 muxer: {e}"));
        let (Some(sps), Some(pps)) = (self.sps, self.pps) else {
            return Err(encode_error("openh264 wrote no SPS/PPS"));
        };
        let config = Mp4Config {
            major_brand: str::parse("isom").map_err(mp4)?,
            minor_version: 512,
            compatible_brands: ["isom", "iso2", "avc1", "mp41"]
                .iter()
                .map(|b| str::parse(b))
                .collect::<Result<_, _>>()
                .map_err(mp4)?,
            // The movie's clock is the track's: the muxer compares durations across both.
            timescale: self.timescale,
        };
        let mut writer = Mp4Writer::write_start(Cursor::new(Vec::new()), &config).map_err(mp4)?;
        writer
            .add_track(&TrackConfig {
                track_type: mp4::TrackType::Video,
                timescale: self.timescale,
                language: "und".into(),
                media_conf: MediaConfig::AvcConfig(AvcConfig {
                    width: self.width as u16,
                    height: self.height as u16,
                    seq_param_set: sps,
                    pic_param_set: pps,
                }),
            })
            .map_err(mp4)?;
        for (i, (bytes, is_sync)) in self.samples.into_iter().enumerate() {
            let sample = Mp4Sample {
                start_time: i as u64 * u64::from(self.delta),
                duration: self.delta,
                rendering_offset: 0,
                is_sync,
                bytes: Bytes::from(bytes),
            };
            writer.write_sample(1, &sample).map_err(mp4)?;
        }
        writer.write_end().map_err(mp4)?;
        Ok(writer.into_writer().into_inner())
    }
}

fn strip_start_code(unit: &[u8]) -> &[u8] {
    let zeros = unit.iter().take_while(|&&b| b == 0).count();
    match unit.get(zeros) {
        Some(1) if zeros >= 2 => &unit[zeros + 1..],
        _ => unit,
    }
}

/// Boxes an ISO-BMFF file (MP4, MOV) may open with.
const FIRST_BOXES: &[&[u8; 4]] = &[
    b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot",
];

/// A demuxer over a file, the id of its H.264 track and what the track holds.
type Opened = (Mp4Reader<BufReader<File>>, u32, VideoInfo);

/// Reads the MP4 at `path` and its H.264 track's parameters, refusing anything else by
/// name: another container, another codec, a file cut short.
fn open_mp4(path: &Path) -> Result<Opened, NodeError> {
    let io = |op, source| NodeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    // Read through a buffer, not into memory: probing for a cost reads only the boxes.
    let mut file = BufReader::new(File::open(path).map_err(|e| io("read", e))?);
    let size = file.get_ref().metadata().map_err(|e| io("stat", e))?.len();
    let mut head = [0u8; 16];
    let got = read_up_to(&mut file, &mut head).map_err(|e| io("read", e))?;
    let head = &head[..got];
    if head.len() < 8 || !FIRST_BOXES.iter().any(|b| &head[4..8] == *b) {
        let what = sniff(head);
        return Err(decode_error(
            path,
            format!("not an MP4/MOV file ({what}); only H.264 in MP4 is supported"),
        ));
    }
    file.seek(SeekFrom::Start(0)).map_err(|e| io("read", e))?;
    // The demuxer trusts box sizes and indexes with them: a damaged file may panic it,
    // and that must read as a bad file, not as a crashed node.
    let reader = std::panic::catch_unwind(move || Mp4Reader::read_header(file, size))
        .map_err(|_| decode_error(path, "malformed MP4 (the demuxer gave up)"))?
        .map_err(|e| decode_error(path, format!("truncated or damaged MP4: {e}")))?;
    let track = reader
        .tracks()
        .values()
        .filter(|t| {
            t.trak.mdia.minf.stbl.stsd.avc1.is_some()
                || t.trak.mdia.hdlr.handler_type == str::parse("vide").unwrap_or_default()
        })
        .min_by_key(|t| (t.trak.mdia.minf.stbl.stsd.avc1.is_none(), t.track_id()))
        .ok_or_else(|| decode_error(path, "no video track"))?;
    let Some(avc1) = &track.trak.mdia.minf.stbl.stsd.avc1 else {
        let codec = track
            .box_type()
            .map_or("unknown".to_string(), |b| b.to_string());
        return Err(decode_error(
            path,
            format!("video codec {codec} is not supported; only H.264 (avc1) is"),
        ));
    };
    let stbl = &track.trak.mdia.minf.stbl;
    let frames = track.sample_count() as usize;
    let ticks: u64 = stbl
        .stts
        .entries
        .iter()
        .map(|e| u64::from(e.sample_count) * u64::from(e.sample_delta))
        .sum();
    let fps = if ticks > 0 {
        frames as f64 * f64::from(track.timescale()) / ticks as f64
    } else {
        0.0
    };
    if frames == 0 {
        return Err(decode_error(path, "the video track has no frames"));
    }
    let info = VideoInfo {
        width: usize::from(avc1.width),
        height: usize::from(avc1.height),
        frames,
        fps,
    };
    let track_id = track.track_id();
    Ok((reader, track_id, info))
}

/// Fills `buf` as far as the file allows.
fn read_up_to(file: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// What a file that is not an MP4 looks like, for the error.
fn sniff(bytes: &[u8]) -> &'static str {
    let starts = |magic: &[u8]| bytes.starts_with(magic);
    if starts(b"\x1a\x45\xdf\xa3") {
        "a Matroska/WebM file"
    } else if starts(b"RIFF") {
        "a RIFF file (AVI or WebP)"
    } else if starts(b"\x00\x00\x01\xba") || starts(b"\x00\x00\x01\xb3") {
        "an MPEG program stream"
    } else if starts(b"\x89PNG") {
        "a PNG image"
    } else if starts(b"\xff\xd8") {
        "a JPEG image"
    } else if bytes.is_empty() {
        "an empty file"
    } else {
        "unrecognised content"
    }
}

/// The header of the MP4 at `path`, without decoding: sizes a load before it happens.
///
/// # Errors
/// As [`decode_mp4`].
pub fn probe_mp4(path: &Path) -> Result<VideoInfo, NodeError> {
    open_mp4(path).map(|(_, _, info)| info)
}

/// Decodes the H.264 track of the MP4 at `path` into 8-bit RGB frames (`width * height * 3`
/// bytes each) in presentation order. `progress(info, i)` runs before sample `i` is
/// decoded, the first time after the whole header was read, so a caller may size (or
/// refuse) the load there and stop it between frames.
///
/// # Errors
/// [`NodeError::Io`] when the file cannot be read; [`NodeError::InvalidInput`] naming the
/// file for another container or codec, a damaged or truncated file, or a frame the
/// decoder rejects; whatever `progress` returns.
pub fn decode_mp4(
    path: &Path,
    mut progress: impl FnMut(&VideoInfo, usize) -> Result<(), NodeError>,
) -> Result<(VideoInfo, Vec<Vec<u8>>), NodeError> {
    let (mut reader, track_id, info) = open_mp4(path)?;
    let track = &reader.tracks()[&track_id];
    let length_size = track
        .trak
        .mdia
        .minf
        .stbl
        .stsd
        .avc1
        .as_ref()
        .map_or(4, |a| usize::from(a.avcc.length_size_minus_one & 3) + 1);
    let (sps, pps) = match (
        track.sequence_parameter_set(),
        track.picture_parameter_set(),
    ) {
        (Ok(sps), Ok(pps)) => (sps.to_vec(), pps.to_vec()),
        _ => return Err(decode_error(path, "the H.264 track has no SPS/PPS")),
    };
    let mut decoder =
        Decoder::new().map_err(|e| decode_error(path, format!("openh264 decoder: {e}")))?;
    // OpenH264 hands pictures out in decode order; B-frames (libx264's default) make that
    // differ from presentation order, so each picture keeps its sample's composition time.
    let mut times = Vec::with_capacity(info.frames);
    let mut pictures: Vec<Vec<u8>> = Vec::with_capacity(info.frames);
    let mut take = |yuv: &DecodedYUV<'_>| -> Result<(), NodeError> {
        let (w, h) = yuv.dimensions();
        if (w, h) != (info.width, info.height) {
            let n = pictures.len();
            let (tw, th) = (info.width, info.height);
            return Err(decode_error(
                path,
                format!("frame {n} is {w}x{h}, the track says {tw}x{th}"),
            ));
        }
        let mut rgb = vec![0u8; w * h * 3];
        yuv.write_rgb8(&mut rgb);
        pictures.push(rgb);
        Ok(())
    };
    for i in 0..info.frames {
        progress(&info, i)?;
        let sample = reader
            .read_sample(track_id, i as u32 + 1)
            .map_err(|e| decode_error(path, format!("truncated or damaged MP4 at frame {i}: {e}")))?
            .ok_or_else(|| decode_error(path, format!("frame {i} is missing")))?;
        times.push(sample.start_time as i64 + i64::from(sample.rendering_offset));
        let mut annex_b = Vec::with_capacity(sample.bytes.len() + sps.len() + pps.len() + 16);
        if i == 0 {
            for nal in [&sps, &pps] {
                annex_b.extend_from_slice(&[0, 0, 0, 1]);
                annex_b.extend_from_slice(nal);
            }
        }
        avcc_to_annex_b(&sample.bytes, length_size, &mut annex_b)
            .ok_or_else(|| decode_error(path, format!("frame {i} has a broken NAL length")))?;
        let picture = decoder
            .decode(&annex_b)
            .map_err(|e| decode_error(path, format!("H.264 frame {i}: {e}")))?;
        if let Some(yuv) = picture {
            take(&yuv)?;
        }
    }
    for yuv in decoder
        .flush_remaining()
        .map_err(|e| decode_error(path, format!("H.264 flush: {e}")))?
    {
        take(&yuv)?;
    }
    if pictures.len() != info.frames {
        let n = pictures.len();
        return Err(decode_error(
            path,
            format!("decoded {n} of {} frames", info.frames),
        ));
    }
    let mut order: Vec<usize> = (0..info.frames).collect();
    order.sort_by_key(|&i| times[i]);
    let mut slots: Vec<Option<Vec<u8>>> = pictures.into_iter().map(Some).collect();
    let frames = order.into_iter().filter_map(|i| slots[i].take()).collect();
    Ok((info, frames))
}

/// Length-prefixed NAL units (`size`-byte lengths, 4 in what ffmpeg and this muxer write)
/// to Annex B; `None` when a length runs past the sample.
fn avcc_to_annex_b(mut sample: &[u8], size: usize, out: &mut Vec<u8>) -> Option<()> {
    while !sample.is_empty() {
        let len = sample
            .get(..size)?
            .iter()
            .fold(0usize, |n, &b| n << 8 | usize::from(b));
        let nal = sample.get(size..size + len)?;
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(nal);
        sample = &sample[size + len..];
    }
    Some(())
}
