//! Image preprocessors for ControlNet hints with ComfyUI's class types: `Canny`
//! (`comfy_extras/nodes_canny.py`), which runs kornia's Canny: greyscale, a 5x5 Gaussian
//! (sigma 1, reflected border), the unnormalised Sobel gradient (replicated border),
//! non-maximum suppression along the gradient rounded to 45 degrees, two thresholds and
//! hysteresis over 8-neighbours. Computed on the CPU in f32, in kornia's order of
//! operations, so ties and thresholds fall the same way.

use std::sync::LazyLock;

use candle_core::{DType, Device, Tensor};

use crate::error::NodeError;
use crate::node::{ExecContext, Inputs, Node};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{InputSpec, NodeSchema};
use crate::value::Value;
use sakuga_telemetry::Stage;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(Canny);
}

struct Canny;

static CANNY: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("Canny", "Canny", "image/preprocessors")
        .stage(Stage::Postprocess)
        .input(InputSpec::link("image", PortType::Image))
        .input(InputSpec::float("low_threshold", 0.4, 0.01, 0.99, 0.01))
        .input(InputSpec::float("high_threshold", 0.8, 0.01, 0.99, 0.01))
        .output(PortType::Image)
});

impl Node for Canny {
    fn schema(&self) -> &NodeSchema {
        &CANNY
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let image = inputs.image("image")?;
        let (low, high) = (
            inputs.float("low_threshold")? as f32,
            inputs.float("high_threshold")? as f32,
        );
        if low > high {
            return Err(NodeError::InvalidInput(format!(
                "low_threshold {low} is above high_threshold {high}"
            )));
        }
        let (batch, h, w, channels) = image.dims4()?;
        if channels != 3 && channels != 1 {
            return Err(NodeError::InvalidInput(format!(
                "Canny reads RGB or greyscale images; this one has {channels} channels"
            )));
        }
        let pixels = image
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(batch * h * w * 3);
        for frame in pixels.chunks(h * w * channels) {
            let grey = greyscale(frame, channels);
            for edge in canny(&grey, h, w, low, high) {
                let v = if edge { 1.0f32 } else { 0.0 };
                out.extend([v, v, v]);
            }
        }
        let edges =
            Tensor::from_vec(out, (batch, h, w, 3), &Device::Cpu)?.to_device(image.device())?;
        Ok(vec![Value::Image(edges)])
    }
}

/// kornia's `rgb_to_grayscale` for float images (ITU-R 601 weights).
fn greyscale(frame: &[f32], channels: usize) -> Vec<f32> {
    if channels == 1 {
        return frame.to_vec();
    }
    frame
        .chunks(3)
        .map(|p| 0.299f32 * p[0] + 0.587f32 * p[1] + 0.114f32 * p[2])
        .collect()
}

/// Index into a line of `len` for position `i` in -2..len+2, mirrored without repeating
/// the edge (PyTorch's `reflect`).
fn reflect(i: isize, len: usize) -> usize {
    let n = len as isize;
    let i = if i < 0 { -i } else { i };
    (if i >= n { 2 * (n - 1) - i } else { i }) as usize
}

/// The 5-tap Gaussian of sigma 1 as kornia builds it: taps at -2..2, normalised.
fn gaussian_taps() -> [f32; 5] {
    let mut taps = [0f32; 5];
    for (k, tap) in taps.iter_mut().enumerate() {
        let x = k as f32 - 2.0;
        *tap = (-(x * x) / 2.0).exp();
    }
    let sum: f32 = taps.iter().sum();
    taps.map(|t| t / sum)
}

/// kornia's separable Gaussian blur: along rows first, then columns, reflected borders.
fn blur(grey: &[f32], h: usize, w: usize) -> Vec<f32> {
    let taps = gaussian_taps();
    let mut rows = vec![0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0f32;
            for (k, tap) in taps.iter().enumerate() {
                acc += tap * grey[y * w + reflect(x as isize + k as isize - 2, w)];
            }
            rows[y * w + x] = acc;
        }
    }
    let mut out = vec![0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0f32;
            for (k, tap) in taps.iter().enumerate() {
                acc += tap * rows[reflect(y as isize + k as isize - 2, h) * w + x];
            }
            out[y * w + x] = acc;
        }
    }
    out
}

/// The unnormalised Sobel gradient `(gx, gy)` with replicated borders: positive where
/// values grow rightwards (downwards).
fn sobel(image: &[f32], h: usize, w: usize) -> (Vec<f32>, Vec<f32>) {
    let at = |y: isize, x: isize| {
        let y = y.clamp(0, h as isize - 1) as usize;
        let x = x.clamp(0, w as isize - 1) as usize;
        image[y * w + x]
    };
    const KX: [[f32; 3]; 3] = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]];
    let mut gx = vec![0f32; h * w];
    let mut gy = vec![0f32; h * w];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let (mut sx, mut sy) = (0f32, 0f32);
            for (dy, row) in KX.iter().enumerate() {
                for (dx, &k) in row.iter().enumerate() {
                    let v = at(y + dy as isize - 1, x + dx as isize - 1);
                    sx += k * v;
                    // The y kernel is the x kernel transposed.
                    sy += KX[dx][dy] * v;
                }
            }
            gx[y as usize * w + x as usize] = sx;
            gy[y as usize * w + x as usize] = sy;
        }
    }
    (gx, gy)
}

/// Neighbour offsets `(dy, dx)` by direction: right, down-right, down, down-left, left,
/// up-left, up, up-right (kornia's order, angle / 45 degrees).
const DIRECTIONS: [(isize, isize); 8] = [
    (0, 1),
    (1, 1),
    (1, 0),
    (1, -1),
    (0, -1),
    (-1, -1),
    (-1, 0),
    (-1, 1),
];

/// Edge pixels of a greyscale image after non-maximum suppression, thresholds and
/// hysteresis.
fn canny(grey: &[f32], h: usize, w: usize, low: f32, high: f32) -> Vec<bool> {
    const EPS: f32 = 1e-6;
    let (gx, gy) = sobel(&blur(grey, h, w), h, w);
    let magnitude: Vec<f32> = gx
        .iter()
        .zip(&gy)
        .map(|(x, y)| (x * x + y * y + EPS).sqrt())
        .collect();
    // Outside the image the gradient is zero: its magnitude is sqrt(eps).
    let border = EPS.sqrt();
    let at = |y: isize, x: isize| {
        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
            border
        } else {
            magnitude[y as usize * w + x as usize]
        }
    };
    let quarter_turns = 4.0f32 / std::f32::consts::PI;
    let mut level = vec![0u8; h * w];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let m = magnitude[i];
            let octant = (gy[i].atan2(gx[i]) * quarter_turns).round_ties_even() as i64;
            let kept = [octant.rem_euclid(8), (octant + 4).rem_euclid(8)]
                .into_iter()
                .all(|d| {
                    let (dy, dx) = DIRECTIONS[d as usize];
                    let neighbour = at(y as isize + dy, x as isize + dx);
                    // Right and down accept a tie, so of two equal pixels across a
                    // step the left (upper) one is kept.
                    m > neighbour || ((d == 0 || d == 2) && m == neighbour)
                });
            if kept && m > border {
                level[i] = u8::from(m > low) + u8::from(m > high);
            }
        }
    }
    hysteresis(&level, h, w)
}

/// Strong pixels (2) and every weak one (1) connected to them through 8-neighbours.
fn hysteresis(level: &[u8], h: usize, w: usize) -> Vec<bool> {
    let mut edge: Vec<bool> = level.iter().map(|&l| l == 2).collect();
    let mut stack: Vec<usize> = (0..level.len()).filter(|&i| edge[i]).collect();
    while let Some(i) = stack.pop() {
        let (y, x) = ((i / w) as isize, (i % w) as isize);
        for (dy, dx) in DIRECTIONS {
            let (ny, nx) = (y + dy, x + dx);
            if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                continue;
            }
            let j = ny as usize * w + nx as usize;
            if level[j] == 1 && !edge[j] {
                edge[j] = true;
                stack.push(j);
            }
        }
    }
    edge
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rig;

    fn goldens() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/canny/goldens.json"
        );
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn run(rig: &Rig, image: &Tensor, low: f64, high: f64) -> Result<Tensor, NodeError> {
        let out = rig.run(
            &Canny,
            &[
                ("image", Value::Image(image.clone())),
                ("low_threshold", Value::Float(low)),
                ("high_threshold", Value::Float(high)),
            ],
        )?;
        match &out[0] {
            Value::Image(t) => Ok(t.clone()),
            _ => panic!("Canny outputs an image"),
        }
    }

    #[test]
    fn edges_match_comfyuis_kornia_canny() {
        let g = goldens();
        let shape: Vec<usize> = g["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let values: Vec<f32> = g["image"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let image = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap();
        let rig = Rig::new(|_| {});
        for case in g["cases"].as_array().unwrap() {
            let (low, high) = (
                case["low"].as_f64().unwrap(),
                case["high"].as_f64().unwrap(),
            );
            let edges = run(&rig, &image, low, high).unwrap();
            assert_eq!(edges.dims(), &[shape[0], shape[1], shape[2], 3]);
            let got = edges.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want: String = case["edges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap())
                .collect();
            let got: String = got
                .chunks(3)
                .map(|p| if p[0] == 1.0 { '1' } else { '0' })
                .collect();
            let differ = got
                .chars()
                .zip(want.chars())
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(
                differ, 0,
                "{low}/{high}: {differ} pixels differ from kornia"
            );
            assert!(want.contains('1'), "the case has edges");
        }
    }

    #[test]
    fn bad_thresholds_and_channels_are_refused() {
        let rig = Rig::new(|_| {});
        let image = Tensor::zeros((1, 8, 8, 3), DType::F32, &Device::Cpu).unwrap();
        let error = run(&rig, &image, 0.8, 0.4).unwrap_err().to_string();
        assert!(error.contains("above high_threshold"), "{error}");
        let rgba = Tensor::zeros((1, 8, 8, 4), DType::F32, &Device::Cpu).unwrap();
        let error = run(&rig, &rgba, 0.4, 0.8).unwrap_err().to_string();
        assert!(error.contains("4 channels"), "{error}");
        let flat = run(&rig, &image, 0.4, 0.8).unwrap();
        assert_eq!(
            flat.sum_all().unwrap().to_scalar::<f32>().unwrap(),
            0.0,
            "no edges in a flat image"
        );
    }
}
