//! Overlapped tiling: run a network on a large frame piece by piece in bounded memory.
//!
//! The frame is cut into a grid of `tile x tile` cores. Each core is run with `overlap`
//! extra input pixels of real context on every side (clamped at the frame edge) and only
//! the core's part of the output is kept. When the overlap is at least the network's
//! receptive radius, every kept output pixel sees exactly the inputs it would see
//! untiled, so the stitched frame has no seams and matches the untiled output up to
//! float rounding. Unlike blending schemes, nothing is averaged.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::UpscaleArch;
use crate::Result;

/// How to tile a frame. `tile == 0` runs the whole frame at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileConfig {
    /// Core tile edge in input pixels.
    pub tile: usize,
    /// Context added on each side of a core, in input pixels.
    pub overlap: usize,
}

impl Default for TileConfig {
    /// ComfyUI's `ImageUpscaleWithModel` defaults: 512 px tiles, 32 px overlap (enough
    /// for SRVGGNetCompact's 18 px receptive radius).
    fn default() -> Self {
        Self {
            tile: 512,
            overlap: 32,
        }
    }
}

impl TileConfig {
    /// No tiling: the whole frame in one pass.
    pub fn untiled() -> Self {
        Self {
            tile: 0,
            overlap: 0,
        }
    }

    /// The largest power-of-two-ish tile (multiple of 32, at least 32) whose padded area
    /// keeps activations under `budget_bytes`, with the architecture's receptive radius as
    /// overlap so the output is seam-free.
    pub fn for_budget(arch: UpscaleArch, budget_bytes: u64) -> Self {
        let overlap = arch.receptive_radius();
        let per_pixel = arch.activation_bytes_per_pixel().max(1);
        let mut tile = 32;
        while {
            let next = tile + 32;
            let side = (next + 2 * overlap) as u64;
            side * side * per_pixel <= budget_bytes && next <= 4096
        } {
            tile += 32;
        }
        Self { tile, overlap }
    }

    fn is_untiled_for(&self, height: usize, width: usize) -> bool {
        self.tile == 0 || (height <= self.tile && width <= self.tile)
    }
}

/// Runs `forward` over an NCHW `frame` in tiles, stitching the `scale`x outputs.
///
/// # Errors
/// Whatever `forward` returns, and candle errors from cropping and stitching.
pub fn run_tiled(
    frame: &Tensor,
    scale: usize,
    config: TileConfig,
    forward: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, height, width) = frame.dims4()?;
    if config.is_untiled_for(height, width) {
        return forward(frame);
    }
    let spans = |extent: usize| -> Vec<(usize, usize, usize, usize)> {
        // (core start, core len, context start, context len)
        (0..extent)
            .step_by(config.tile)
            .map(|start| {
                let len = config.tile.min(extent - start);
                let ctx_start = start.saturating_sub(config.overlap);
                let ctx_end = (start + len + config.overlap).min(extent);
                (start, len, ctx_start, ctx_end - ctx_start)
            })
            .collect()
    };
    let mut rows = Vec::new();
    for (y, h, cy, ch) in spans(height) {
        let mut row = Vec::new();
        for (x, w, cx, cw) in spans(width) {
            let context = frame.narrow(2, cy, ch)?.narrow(3, cx, cw)?.contiguous()?;
            let out = forward(&context)?;
            let core = out.narrow(2, (y - cy) * scale, h * scale)?.narrow(
                3,
                (x - cx) * scale,
                w * scale,
            )?;
            row.push(core);
        }
        rows.push(Tensor::cat(&row, 3)?);
    }
    Ok(Tensor::cat(&rows, 2)?)
}
