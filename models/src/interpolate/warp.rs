//! Bilinear backward warping, the `grid_sample` RIFE needs and candle lacks.
//!
//! `warp(input, flow)` samples `input` at `(x + flow_x, y + flow_y)` for every output pixel,
//! exactly as RIFE's `warp()` does through
//! `grid_sample(mode="bilinear", padding_mode="border", align_corners=True)`: the sample
//! point is clamped into `[0, w-1] x [0, h-1]` and then interpolated between its four
//! neighbours. On CPU this is a custom op ([`BackwardWarp`]) looping over pixels; elsewhere
//! it is built from candle's `gather`, which gives the same numbers more slowly.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Warps NCHW `input` by the N2HW pixel-unit `flow` (channel 0 = x, 1 = y).
///
/// # Errors
/// Shape mismatches between input and flow, non-float inputs, device errors.
pub fn warp(input: &Tensor, flow: &Tensor) -> candle_core::Result<Tensor> {
    let (n, _c, h, w) = input.dims4()?;
    let (fn_, fc, fh, fw) = flow.dims4()?;
    if (fn_, fc, fh, fw) != (n, 2, h, w) {
        candle_core::bail!(
            "warp: flow {:?} does not match input {:?} (want [n, 2, h, w])",
            flow.dims(),
            input.dims()
        )
    }
    if input.device().is_cpu() && input.dtype() == DType::F32 && flow.dtype() == DType::F32 {
        input
            .contiguous()?
            .apply_op2_no_bwd(&flow.contiguous()?, &BackwardWarp)
    } else {
        warp_with_gather(input, flow)
    }
}

/// The CPU kernel of [`warp`].
#[derive(Debug, Clone, Copy)]
pub struct BackwardWarp;

/// Where to sample one axis: the two neighbour indices and the weight of the second.
#[inline]
fn taps(coord: f32, extent: usize) -> (usize, usize, f32) {
    let max = (extent - 1) as f32;
    let clamped = if coord.is_nan() {
        0.0
    } else {
        coord.clamp(0.0, max)
    };
    let low = clamped.floor();
    let low_index = low as usize;
    let high_index = (low_index + 1).min(extent - 1);
    (low_index, high_index, clamped - low)
}

impl CustomOp2 for BackwardWarp {
    fn name(&self) -> &'static str {
        "sakuga-backward-warp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(input), CpuStorage::F32(flow)) = (s1, s2) else {
            candle_core::bail!("warp: input and flow must be f32")
        };
        let (Some((i0, i1)), Some((f0, f1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("warp: input and flow must be contiguous")
        };
        let (input, flow) = (&input[i0..i1], &flow[f0..f1]);
        let (n, c, h, w) = l1.shape().dims4()?;
        let plane = h * w;
        let mut out = vec![0f32; n * c * plane];
        out.par_chunks_mut(c * plane)
            .zip(input.par_chunks(c * plane))
            .zip(flow.par_chunks(2 * plane))
            .for_each(|((out, input), flow)| {
                let (flow_x, flow_y) = flow.split_at(plane);
                for y in 0..h {
                    for x in 0..w {
                        let p = y * w + x;
                        let (x0, x1, wx) = taps(x as f32 + flow_x[p], w);
                        let (y0, y1, wy) = taps(y as f32 + flow_y[p], h);
                        let (a, b, cc, d) = (y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1);
                        for ch in 0..c {
                            let src = &input[ch * plane..(ch + 1) * plane];
                            let top = src[a] + (src[b] - src[a]) * wx;
                            let bottom = src[cc] + (src[d] - src[cc]) * wx;
                            out[ch * plane + p] = top + (bottom - top) * wy;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// [`warp`] from candle's own ops, for devices without the custom op.
///
/// # Errors
/// Shape or device errors.
pub fn warp_with_gather(input: &Tensor, flow: &Tensor) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = input.dims4()?;
    let device = input.device();
    let dtype = input.dtype();
    let flow = flow.to_dtype(DType::F32)?;
    let xs = Tensor::arange(0u32, w as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((1, 1, w))?
        .broadcast_as((n, h, w))?;
    let ys = Tensor::arange(0u32, h as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((1, h, 1))?
        .broadcast_as((n, h, w))?;
    let axis = |base: &Tensor, offset: Tensor, extent: usize| -> candle_core::Result<_> {
        let coord = (base + offset)?.clamp(0f32, (extent - 1) as f32)?;
        let low = coord.floor()?;
        let high = (&low + 1.0)?.minimum((extent - 1) as f32)?;
        let weight = (coord - &low)?;
        Ok((low, high, weight))
    };
    let (x0, x1, wx) = axis(&xs, flow.narrow(1, 0, 1)?.squeeze(1)?, w)?;
    let (y0, y1, wy) = axis(&ys, flow.narrow(1, 1, 1)?.squeeze(1)?, h)?;
    let flat = input.reshape((n, c, h * w))?;
    let sample = |yy: &Tensor, xx: &Tensor| -> candle_core::Result<Tensor> {
        let index = ((yy * w as f64)? + xx)?
            .to_dtype(DType::U32)?
            .reshape((n, 1, h * w))?
            .broadcast_as((n, c, h * w))?
            .contiguous()?;
        flat.gather(&index, 2)?.reshape((n, c, h, w))
    };
    let wx = wx.unsqueeze(1)?.to_dtype(dtype)?;
    let wy = wy.unsqueeze(1)?.to_dtype(dtype)?;
    let (a, b) = (sample(&y0, &x0)?, sample(&y0, &x1)?);
    let (cc, d) = (sample(&y1, &x0)?, sample(&y1, &x1)?);
    let top = (&a + (b - &a)?.broadcast_mul(&wx)?)?;
    let bottom = (&cc + (d - &cc)?.broadcast_mul(&wx)?)?;
    &top + (bottom - &top)?.broadcast_mul(&wy)?
}
