//! Image conversions: `(batch, height, width, channels)` f32 tensors to and from 8-bit
//! pixels, PNG files with text chunks (the workflow, as ComfyUI embeds it), and resizing.

use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fast_image_resize::images::Image as ResizeImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::error::NodeError;

/// ComfyUI's resize method names.
pub const RESIZE_METHODS: &[&str] = &["nearest-exact", "bilinear", "area", "bicubic", "lanczos"];

/// One image of a batch as 8-bit pixels, row-major, `channels` per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub data: Vec<u8>,
}

/// Splits an image batch into 8-bit images; values are clipped to `[0, 1]` and truncated
/// the way ComfyUI's `np.clip(255 * i, 0, 255).astype(uint8)` does.
///
/// # Errors
/// When the tensor is not rank 4 with 1, 3 or 4 channels.
pub fn to_pixels(batch: &Tensor) -> Result<Vec<Pixels>, NodeError> {
    let (b, h, w, c) = batch.dims4()?;
    if !matches!(c, 1 | 3 | 4) {
        return Err(NodeError::InvalidInput(format!(
            "an image needs 1, 3 or 4 channels, got {c}"
        )));
    }
    let flat = batch
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let per = h * w * c;
    Ok((0..b)
        .map(|i| Pixels {
            width: w as u32,
            height: h as u32,
            channels: c as u8,
            data: flat[i * per..(i + 1) * per]
                .iter()
                .map(|v| (v * 255.0).clamp(0.0, 255.0) as u8)
                .collect(),
        })
        .collect())
}

/// Stacks 8-bit images of one size into a `(batch, height, width, channels)` tensor.
///
/// # Errors
/// When the images differ in size or channel count.
pub fn from_pixels(images: &[Pixels], device: &Device) -> Result<Tensor, NodeError> {
    let first = images
        .first()
        .ok_or_else(|| NodeError::InvalidInput("no images".into()))?;
    let mut data = Vec::with_capacity(first.data.len() * images.len());
    for image in images {
        if (image.width, image.height, image.channels)
            != (first.width, first.height, first.channels)
        {
            return Err(NodeError::InvalidInput(
                "images in a batch must share one size".into(),
            ));
        }
        data.extend(image.data.iter().map(|&v| f32::from(v) / 255.0));
    }
    let shape = (
        images.len(),
        first.height as usize,
        first.width as usize,
        first.channels as usize,
    );
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Writes `pixels` as a PNG with `text` chunks, atomically (temp file, then rename), so a
/// reader never sees half a file.
///
/// # Errors
/// I/O and encoder failures, naming the path.
pub fn write_png(path: &Path, pixels: &Pixels, text: &[(&str, &str)]) -> Result<(), NodeError> {
    let io = |op, source| NodeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    let encode_err = |e: png::EncodingError| NodeError::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let tmp = path.with_extension("png.partial");
    // A leftover (or planted) file or link at the temp name is removed, never written
    // through: `create_new` refuses to follow a link.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove", e)),
        _ => {}
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    let mut buffered = BufWriter::new(&file);
    let mut encoder = png::Encoder::new(&mut buffered, pixels.width, pixels.height);
    encoder.set_color(match pixels.channels {
        1 => png::ColorType::Grayscale,
        4 => png::ColorType::Rgba,
        _ => png::ColorType::Rgb,
    });
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    for (key, value) in text {
        encoder
            .add_text_chunk((*key).to_string(), (*value).to_string())
            .map_err(encode_err)?;
    }
    let mut writer = encoder.write_header().map_err(encode_err)?;
    writer.write_image_data(&pixels.data).map_err(encode_err)?;
    writer.finish().map_err(encode_err)?;
    buffered.flush().map_err(|e| io("write", e))?;
    drop(buffered);
    file.sync_all().map_err(|e| io("sync", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("rename", e))
}

/// Reads the text chunks of a PNG (the embedded workflow).
///
/// # Errors
/// I/O or decode failures.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>, NodeError> {
    let file = std::fs::File::open(path).map_err(|source| NodeError::Io {
        op: "open",
        path: path.to_path_buf(),
        source,
    })?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().map_err(|e| NodeError::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect())
}

/// Decodes an image file into a `(1, h, w, 3)` image and a `(1, h, w)` mask taken from the
/// alpha channel (`1 - alpha`, as ComfyUI's LoadImage does; zeros when there is none).
///
/// # Errors
/// I/O or decode failures naming the file.
pub fn load_image(path: &Path, device: &Device) -> Result<(Tensor, Tensor), NodeError> {
    let decoded = image::open(path).map_err(|e| match e {
        image::ImageError::IoError(source) => NodeError::Io {
            op: "open",
            path: path.to_path_buf(),
            source,
        },
        other => NodeError::Image {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })?;
    let has_alpha = decoded.color().has_alpha();
    let rgba = decoded.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
    let mut mask = Vec::with_capacity((w * h) as usize);
    for px in rgba.pixels() {
        rgb.extend(px.0[..3].iter().map(|&v| f32::from(v) / 255.0));
        mask.push(if has_alpha {
            1.0 - f32::from(px.0[3]) / 255.0
        } else {
            0.0
        });
    }
    let image = Tensor::from_vec(rgb, (1, h as usize, w as usize, 3), device)?;
    let mask = Tensor::from_vec(mask, (1, h as usize, w as usize), device)?;
    Ok((image, mask))
}

/// Resizes every image of a batch to `width` x `height` with one of [`RESIZE_METHODS`].
///
/// # Errors
/// An unknown method, a zero size, or a tensor that is not an image batch.
pub fn resize(batch: &Tensor, width: u32, height: u32, method: &str) -> Result<Tensor, NodeError> {
    let algorithm = match method {
        "nearest-exact" => ResizeAlg::Nearest,
        "bilinear" => ResizeAlg::Interpolation(FilterType::Bilinear),
        "bicubic" => ResizeAlg::Interpolation(FilterType::CatmullRom),
        "area" => ResizeAlg::Convolution(FilterType::Box),
        "lanczos" => ResizeAlg::Convolution(FilterType::Lanczos3),
        other => {
            return Err(NodeError::InvalidInput(format!(
                "unknown resize method {other:?}, expected one of {RESIZE_METHODS:?}"
            )));
        }
    };
    resize_with(batch, width, height, algorithm)
}

/// PyTorch's `interpolate(mode="bicubic", antialias=True)`, which CLIP's preprocessing uses:
/// Catmull-Rom (a = -0.5) widened to the scale when shrinking.
///
/// # Errors
/// As [`resize`].
pub fn resize_bicubic_antialiased(
    batch: &Tensor,
    width: u32,
    height: u32,
) -> Result<Tensor, NodeError> {
    resize_with(
        batch,
        width,
        height,
        ResizeAlg::Convolution(FilterType::CatmullRom),
    )
}

fn resize_with(
    batch: &Tensor,
    width: u32,
    height: u32,
    algorithm: ResizeAlg,
) -> Result<Tensor, NodeError> {
    if width == 0 || height == 0 {
        return Err(NodeError::InvalidInput(format!(
            "cannot resize to {width}x{height}"
        )));
    }
    let (b, h, w, c) = batch.dims4()?;
    if (w as u32, h as u32) == (width, height) {
        return Ok(batch.clone());
    }
    let pixel_type = match c {
        1 => PixelType::F32,
        3 => PixelType::F32x3,
        4 => PixelType::F32x4,
        _ => {
            return Err(NodeError::InvalidInput(format!(
                "cannot resize an image with {c} channels"
            )));
        }
    };
    let device = batch.device().clone();
    let flat = batch
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let per = h * w * c;
    let options = ResizeOptions::new().resize_alg(algorithm);
    let mut resizer = Resizer::new();
    let mut out = Vec::with_capacity(b * width as usize * height as usize * c);
    for i in 0..b {
        let bytes: Vec<u8> = bytemuck::cast_slice(&flat[i * per..(i + 1) * per]).to_vec();
        let src = ResizeImage::from_vec_u8(w as u32, h as u32, bytes, pixel_type)
            .map_err(|e| NodeError::InvalidInput(e.to_string()))?;
        let mut dst = ResizeImage::new(width, height, pixel_type);
        resizer
            .resize(&src, &mut dst, &options)
            .map_err(|e| NodeError::InvalidInput(e.to_string()))?;
        out.extend_from_slice(bytemuck::cast_slice::<u8, f32>(dst.buffer()));
    }
    Ok(Tensor::from_vec(
        out,
        (b, height as usize, width as usize, c),
        &device,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_round_trip_through_tensors() {
        let px = Pixels {
            width: 2,
            height: 1,
            channels: 3,
            data: vec![0, 128, 255, 10, 20, 30],
        };
        let t = from_pixels(std::slice::from_ref(&px), &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 1, 2, 3]);
        let back = to_pixels(&t).unwrap();
        // 128/255*255 may land a hair under 128 and truncate: allow one step, as ComfyUI does.
        for (a, b) in back[0].data.iter().zip(&px.data) {
            assert!(a.abs_diff(*b) <= 1, "{a} vs {b}");
        }
    }

    #[test]
    fn png_keeps_text_chunks_and_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let px = Pixels {
            width: 3,
            height: 2,
            channels: 3,
            data: (0..18).map(|v| v * 10).collect(),
        };
        write_png(&path, &px, &[("prompt", "{\"1\":{}}")]).unwrap();
        assert!(!path.with_extension("png.partial").exists());
        let text = read_png_text(&path).unwrap();
        assert_eq!(text, vec![("prompt".to_string(), "{\"1\":{}}".to_string())]);
        let (image, mask) = load_image(&path, &Device::Cpu).unwrap();
        assert_eq!(image.dims(), &[1, 2, 3, 3]);
        assert_eq!(mask.dims(), &[1, 2, 3]);
        assert_eq!(to_pixels(&image).unwrap()[0].data, px.data);
    }

    #[test]
    fn resize_keeps_constant_images_constant() {
        let t = Tensor::full(0.25f32, (2, 8, 6, 3), &Device::Cpu).unwrap();
        for method in RESIZE_METHODS {
            let r = resize(&t, 13, 5, method).unwrap();
            assert_eq!(r.dims(), &[2, 5, 13, 3]);
            let v = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| (x - 0.25).abs() < 1e-5), "{method}");
        }
        assert!(resize(&t, 4, 4, "cubic").is_err());
    }
}
