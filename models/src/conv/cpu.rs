//! The CPU kernel behind [`super::FusedConv2d`]: a stride-1 convolution as blocked
//! implicit-im2col GEMM, with bias and activation applied in the same pass.
//!
//! Layout trick: after zero-padding the input to `hp x wp`, the value feeding output
//! position `p = y * wp + x` through kernel tap `(ky, kx)` sits at `p + ky * wp + kx` of
//! its padded channel plane. So if outputs are computed on the padded-width grid (the
//! `wp - wo` extra columns per row are junk and dropped at the end), every row of the
//! im2col matrix for a block of consecutive positions is one contiguous slice of the
//! padded plane. Gathering a block is a handful of memcpys; the block (`K x BLOCK`
//! floats) stays in L2 while `gemm` consumes it, and the result is written once, already
//! cropped, biased and activated.

#![allow(unsafe_code)]

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

use super::Strides;

/// Output positions per GEMM block. A multiple of the `gemm` crate's f32 AVX-512 row tile
/// (48) so the last micro-tile of a block is full; 384 keeps the gathered block of a
/// 64-channel 3x3 layer (576 x 384 floats, 864 KiB) inside a 1 MiB L2.
pub const BLOCK_POSITIONS: usize = 384;

/// What to apply to each output value after adding its bias.
#[derive(Debug, Clone)]
pub enum Epilogue {
    Identity,
    LeakyRelu(f32),
    PRelu(Vec<f32>),
}

impl Epilogue {
    #[inline]
    fn slope(&self, channel: usize) -> Option<f32> {
        match self {
            Epilogue::Identity => None,
            Epilogue::LeakyRelu(s) => Some(*s),
            Epilogue::PRelu(slopes) => Some(slopes[channel]),
        }
    }
}

/// candle custom op: `(input [b, c_in, h, w], weight [c_out, c_in, kh, kw], bias [c_out])`
/// to `[b, c_out, h + 2p - kh + 1, w + 2p - kw + 1]`, f32, contiguous inputs.
#[derive(Debug, Clone)]
pub struct Conv2dStride1 {
    pub padding: usize,
    pub epilogue: Epilogue,
}

/// Dimensions of one stride-1 convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvDims {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub padding: usize,
}

impl ConvDims {
    fn hp(&self) -> usize {
        self.h + 2 * self.padding
    }
    fn wp(&self) -> usize {
        self.w + 2 * self.padding
    }
    /// Output height.
    pub fn ho(&self) -> usize {
        self.hp() + 1 - self.kh
    }
    /// Output width.
    pub fn wo(&self) -> usize {
        self.wp() + 1 - self.kw
    }
    fn reduction(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
}

fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("fused conv2d: {what} must be f32")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused conv2d: {what} must be contiguous")
    };
    Ok(&data[start..end])
}

impl CustomOp3 for Conv2dStride1 {
    fn name(&self) -> &'static str {
        "sakuga-conv2d-stride1"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = f32_slice(s1, l1, "input")?;
        let weight = f32_slice(s2, l2, "weight")?;
        let bias = f32_slice(s3, l3, "bias")?;
        let (batch, c_in, h, w) = l1.shape().dims4()?;
        let (c_out, w_c_in, kh, kw) = l2.shape().dims4()?;
        if w_c_in != c_in {
            candle_core::bail!("fused conv2d: input has {c_in} channels, weight expects {w_c_in}")
        }
        if bias.len() != c_out {
            candle_core::bail!("fused conv2d: {} biases for {c_out} outputs", bias.len())
        }
        if let Epilogue::PRelu(slopes) = &self.epilogue
            && slopes.len() != c_out
        {
            candle_core::bail!(
                "fused conv2d: {} prelu slopes for {c_out} outputs",
                slopes.len()
            )
        }
        if h + 2 * self.padding < kh || w + 2 * self.padding < kw {
            candle_core::bail!("fused conv2d: {h}x{w} input smaller than the {kh}x{kw} kernel")
        }
        let dims = ConvDims {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            padding: self.padding,
        };
        let out = conv2d_stride1(input, weight, bias, &self.epilogue, dims);
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, c_out, dims.ho(), dims.wo())),
        ))
    }
}

/// Raw output pointer shared by the block tasks. Every task writes a disjoint set of
/// output positions (its own block of rows/columns), so no two tasks touch one element.
#[derive(Clone, Copy)]
struct SharedOutput(*mut f32);
// SAFETY: the pointer is only used for writes to disjoint indices (see `run_block`), and the
// buffer outlives the parallel loop that uses it.
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

/// Runs the convolution described by `dims` on contiguous NCHW `input`, `[c_out, c_in, kh,
/// kw]` `weight` and `bias`, returning the contiguous NCHW output.
pub fn conv2d_stride1(
    input: &[f32],
    weight: &[f32],
    bias: &[f32],
    epilogue: &Epilogue,
    dims: ConvDims,
) -> Vec<f32> {
    let (hp, wp, ho, wo) = (dims.hp(), dims.wp(), dims.ho(), dims.wo());
    let plane_in = dims.h * dims.w;
    let plane_padded = hp * wp;
    let plane_out = ho * wo;
    // Positions computed on the padded-width grid; junk columns are dropped when storing.
    let positions = ho * wp;
    let blocks = positions.div_ceil(BLOCK_POSITIONS);
    let mut output = vec![0f32; dims.batch * dims.c_out * plane_out];
    // `kw` spare zeros: the last block's taps read up to `kw - 1` past the final plane.
    let mut padded = vec![0f32; dims.c_in * plane_padded + dims.kw];

    for image in 0..dims.batch {
        let image_in = &input[image * dims.c_in * plane_in..(image + 1) * dims.c_in * plane_in];
        padded[..dims.c_in * plane_padded]
            .par_chunks_mut(plane_padded)
            .zip(image_in.par_chunks(plane_in))
            .for_each(|(dst, src)| {
                for (y, row) in src.chunks(dims.w).enumerate() {
                    let at = (y + dims.padding) * wp + dims.padding;
                    dst[at..at + dims.w].copy_from_slice(row);
                }
            });
        let image_out =
            &mut output[image * dims.c_out * plane_out..(image + 1) * dims.c_out * plane_out];
        let out_ptr = SharedOutput(image_out.as_mut_ptr());
        let padded = &padded;
        (0..blocks).into_par_iter().for_each_init(
            || {
                (
                    vec![0f32; dims.reduction() * BLOCK_POSITIONS],
                    vec![0f32; dims.c_out * BLOCK_POSITIONS],
                )
            },
            |(gathered, block_out), block| {
                let first = block * BLOCK_POSITIONS;
                let len = BLOCK_POSITIONS.min(positions - first);
                run_block(
                    padded, weight, bias, epilogue, dims, first, len, gathered, block_out, out_ptr,
                );
            },
        );
    }
    output
}

/// Gathers, multiplies and stores one block of `len` positions starting at `first`.
#[allow(clippy::too_many_arguments)]
fn run_block(
    padded: &[f32],
    weight: &[f32],
    bias: &[f32],
    epilogue: &Epilogue,
    dims: ConvDims,
    first: usize,
    len: usize,
    gathered: &mut [f32],
    block_out: &mut [f32],
    out: SharedOutput,
) {
    let (wp, wo, ho) = (dims.wp(), dims.wo(), dims.ho());
    let plane_padded = dims.hp() * wp;
    let k = dims.reduction();
    // Row `(ci, ky, kx)` of the block's im2col matrix, in the weight's own reduction order.
    let mut row = 0;
    for ci in 0..dims.c_in {
        for ky in 0..dims.kh {
            for kx in 0..dims.kw {
                let src = ci * plane_padded + ky * wp + kx + first;
                gathered[row * BLOCK_POSITIONS..row * BLOCK_POSITIONS + len]
                    .copy_from_slice(&padded[src..src + len]);
                row += 1;
            }
        }
    }
    // block_out[co * BLOCK + p] = sum_k gathered[k * BLOCK + p] * weight[co * K + k]
    // m = positions (unit stride in both dst and lhs), n = c_out, k = reduction.
    super::matmul_into(
        (len, dims.c_out, k),
        block_out,
        Strides {
            row: 1,
            col: BLOCK_POSITIONS,
        },
        gathered,
        Strides {
            row: 1,
            col: BLOCK_POSITIONS,
        },
        weight,
        Strides { row: 1, col: k },
    );
    let plane_out = ho * wo;
    for co in 0..dims.c_out {
        let b = bias[co];
        let slope = epilogue.slope(co);
        let values = &block_out[co * BLOCK_POSITIONS..co * BLOCK_POSITIONS + len];
        // Walk the block one output row segment at a time, skipping the junk columns.
        let mut p = 0;
        while p < len {
            let pos = first + p;
            let (y, x) = (pos / wp, pos % wp);
            let run = (wp - x).min(len - p);
            if x < wo {
                let keep = (wo - x).min(run);
                let dst_index = co * plane_out + y * wo + x;
                // SAFETY: (co, y, x..x+keep) is an in-bounds output element range owned by
                // this block alone: blocks partition the positions, and each position maps
                // to at most one output element.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(dst_index), keep) };
                let src = &values[p..p + keep];
                match slope {
                    None => {
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d = v + b;
                        }
                    }
                    Some(s) => {
                        for (d, &v) in dst.iter_mut().zip(src) {
                            let v = v + b;
                            *d = if v >= 0.0 { v } else { v * s };
                        }
                    }
                }
            }
            p += run;
        }
    }
}
