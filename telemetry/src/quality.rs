//! Frame quality signals: duplicate-frame detection and blank / non-finite / out-of-range
//! checks over `&[f32]` HWC frames (ComfyUI's IMAGE layout, values in `[0, 1]`).
//!
//! Checks run on every emitted frame, so they are one pass over the pixels and allocate
//! nothing: duplicates are found by comparing a 16x16 grid of mean luminance (a cheap
//! perceptual signature) against the previous frame's, as a PSNR.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TelemetryError};
use crate::labels::QcCheck;

/// Side of the luminance grid used as a frame signature.
const GRID: usize = 16;

/// Thresholds of the frame checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QualityConfig {
    /// Signatures at least this similar (PSNR, dB) count as a duplicate frame.
    pub duplicate_psnr_db: f64,
    /// A frame whose luminance standard deviation is under this is blank.
    pub blank_max_std: f64,
    /// Values further than this outside `[0, 1]` are out of range...
    pub range_tolerance: f64,
    /// ...and a frame with more than this share of such values is rejected.
    pub max_out_of_range_ratio: f64,
}

impl Default for QualityConfig {
    fn default() -> Self {
        QualityConfig {
            duplicate_psnr_db: 50.0,
            blank_max_std: 1.0 / 255.0,
            range_tolerance: 0.01,
            max_out_of_range_ratio: 0.01,
        }
    }
}

/// What the checks found in one frame.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QcReport {
    pub non_finite: bool,
    pub blank: bool,
    pub out_of_range: bool,
    /// Identical or nearly so to the previous frame of the stream.
    pub duplicate: bool,
    /// Signature PSNR to the previous frame (dB; infinite when identical).
    pub psnr_to_previous: Option<f64>,
}

impl QcReport {
    /// The QC checks this frame failed (duplicates are counted as frames, not rejections).
    pub fn failed_checks(&self) -> impl Iterator<Item = QcCheck> + use<> {
        let failed = [
            (self.non_finite, QcCheck::NonFinite),
            (self.blank, QcCheck::Blank),
            (self.out_of_range, QcCheck::OutOfRange),
        ];
        failed
            .into_iter()
            .filter_map(|(bad, check)| bad.then_some(check))
    }

    /// Whether the frame should not be shown.
    pub fn rejected(&self) -> bool {
        self.non_finite || self.blank || self.out_of_range
    }
}

/// Checks the frames of one stream in order, remembering the previous frame's signature.
#[derive(Debug, Clone)]
pub struct FrameChecker {
    config: QualityConfig,
    previous: Option<[f32; GRID * GRID]>,
}

impl FrameChecker {
    pub fn new(config: QualityConfig) -> Self {
        FrameChecker {
            config,
            previous: None,
        }
    }

    /// Checks one `height x width x channels` frame.
    ///
    /// # Errors
    /// [`TelemetryError::InvalidFrame`] when the slice length does not match the shape or
    /// the frame is empty.
    pub fn check(
        &mut self,
        frame: &[f32],
        height: usize,
        width: usize,
        channels: usize,
    ) -> Result<QcReport> {
        let expected = height * width * channels;
        if expected == 0 || frame.len() != expected {
            return Err(TelemetryError::InvalidFrame {
                height,
                width,
                channels,
                len: frame.len(),
            });
        }
        let stats = scan(frame, height, width, channels, self.config.range_tolerance);
        let pixels = (height * width) as f64;
        let mean = stats.luma_sum / pixels;
        let variance = (stats.luma_sq_sum / pixels - mean * mean).max(0.0);
        let non_finite = stats.non_finite > 0;
        let psnr = match (&self.previous, non_finite) {
            (Some(previous), false) => Some(signature_psnr(previous, &stats.signature)),
            _ => None,
        };
        if !non_finite {
            self.previous = Some(stats.signature);
        }
        Ok(QcReport {
            non_finite,
            blank: !non_finite && variance.sqrt() < self.config.blank_max_std,
            out_of_range: stats.out_of_range as f64 / frame.len() as f64
                > self.config.max_out_of_range_ratio,
            duplicate: psnr.is_some_and(|p| p >= self.config.duplicate_psnr_db),
            psnr_to_previous: psnr,
        })
    }
}

struct Scan {
    non_finite: usize,
    out_of_range: usize,
    luma_sum: f64,
    luma_sq_sum: f64,
    signature: [f32; GRID * GRID],
}

/// One pass: non-finite and out-of-range counts, luminance moments and the grid means.
fn scan(frame: &[f32], height: usize, width: usize, channels: usize, tolerance: f64) -> Scan {
    let mut sums = [0f64; GRID * GRID];
    let mut counts = [0u32; GRID * GRID];
    let mut scan = Scan {
        non_finite: 0,
        out_of_range: 0,
        luma_sum: 0.0,
        luma_sq_sum: 0.0,
        signature: [0.0; GRID * GRID],
    };
    let (low, high) = (-tolerance as f32, 1.0 + tolerance as f32);
    for (y, row) in frame.chunks_exact(width * channels).enumerate() {
        let cell_row = y * GRID / height * GRID;
        for (x, pixel) in row.chunks_exact(channels).enumerate() {
            let mut finite = true;
            for &v in pixel {
                if !v.is_finite() {
                    finite = false;
                } else if v < low || v > high {
                    scan.out_of_range += 1;
                }
            }
            if !finite {
                scan.non_finite += 1;
                continue;
            }
            let luma = if channels >= 3 {
                0.299 * pixel[0] + 0.587 * pixel[1] + 0.114 * pixel[2]
            } else {
                pixel[0]
            } as f64;
            scan.luma_sum += luma;
            scan.luma_sq_sum += luma * luma;
            let cell = cell_row + x * GRID / width;
            sums[cell] += luma;
            counts[cell] += 1;
        }
    }
    for ((out, sum), count) in scan.signature.iter_mut().zip(sums).zip(counts) {
        *out = if count > 0 {
            (sum / count as f64) as f32
        } else {
            0.0
        };
    }
    scan
}

/// PSNR between two signatures of values in `[0, 1]`; infinite when equal.
fn signature_psnr(a: &[f32; GRID * GRID], b: &[f32; GRID * GRID]) -> f64 {
    let mse = a
        .iter()
        .zip(b.iter())
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        / (GRID * GRID) as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (1.0 / mse).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 32x48 RGB gradient with a bright square at `offset`.
    fn frame(offset: usize) -> Vec<f32> {
        let (h, w) = (32, 48);
        let mut data = Vec::with_capacity(h * w * 3);
        for y in 0..h {
            for x in 0..w {
                let square = (offset..offset + 8).contains(&x) && (8..16).contains(&y);
                let v = if square {
                    1.0
                } else {
                    (x + y) as f32 / (h + w) as f32
                };
                data.extend_from_slice(&[v, v * 0.5, 1.0 - v]);
            }
        }
        data
    }

    #[test]
    fn identical_consecutive_frames_are_duplicates() {
        let mut checker = FrameChecker::new(QualityConfig::default());
        let first = checker.check(&frame(4), 32, 48, 3).unwrap();
        assert!(!first.duplicate && first.psnr_to_previous.is_none());
        let again = checker.check(&frame(4), 32, 48, 3).unwrap();
        assert!(again.duplicate);
        assert_eq!(again.psnr_to_previous, Some(f64::INFINITY));
    }

    #[test]
    fn moving_content_is_not_a_duplicate() {
        let mut checker = FrameChecker::new(QualityConfig::default());
        checker.check(&frame(4), 32, 48, 3).unwrap();
        let moved = checker.check(&frame(20), 32, 48, 3).unwrap();
        assert!(!moved.duplicate, "psnr {:?}", moved.psnr_to_previous);
        assert!(!moved.rejected());
    }

    #[test]
    fn nearly_identical_frames_are_duplicates() {
        let mut checker = FrameChecker::new(QualityConfig::default());
        checker.check(&frame(4), 32, 48, 3).unwrap();
        // Quantisation-level noise: +-1/1000 on every value.
        let noisy: Vec<f32> = frame(4)
            .iter()
            .enumerate()
            .map(|(i, v)| v + if i % 2 == 0 { 0.001 } else { -0.001 })
            .collect();
        assert!(checker.check(&noisy, 32, 48, 3).unwrap().duplicate);
    }

    #[test]
    fn blank_nan_and_out_of_range_frames_are_rejected() {
        let mut checker = FrameChecker::new(QualityConfig::default());
        let black = vec![0.0f32; 8 * 8 * 3];
        let report = checker.check(&black, 8, 8, 3).unwrap();
        assert!(report.blank);
        assert_eq!(
            report.failed_checks().collect::<Vec<_>>(),
            vec![QcCheck::Blank]
        );

        let mut nan = frame(4);
        nan[7] = f32::NAN;
        let report = checker.check(&nan, 32, 48, 3).unwrap();
        assert!(report.non_finite && !report.blank);
        assert_eq!(report.failed_checks().next(), Some(QcCheck::NonFinite));

        let hot: Vec<f32> = frame(4).iter().map(|v| v * 3.0).collect();
        assert!(checker.check(&hot, 32, 48, 3).unwrap().out_of_range);
    }

    #[test]
    fn wrong_shape_is_an_error() {
        let mut checker = FrameChecker::new(QualityConfig::default());
        let err = checker.check(&[0.0; 10], 2, 2, 3).unwrap_err();
        assert!(matches!(err, TelemetryError::InvalidFrame { len: 10, .. }));
    }
}
