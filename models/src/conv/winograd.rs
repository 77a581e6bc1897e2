//! Winograd F(4x4, 3x3) for the stride-1, pad-1 3x3 convolutions that make up nearly all
//! of Real-ESRGAN's work.
//!
//! A 4x4 block of outputs needs a 6x6 input patch. Transforming patches (`B^T d B`) and
//! kernels (`G g G^T`, once per layer) into a 6x6 "Winograd domain" turns the convolution
//! into 36 independent matrix products `[tiles x c_in] @ [c_in x c_out]`, 36 multiplies per
//! 16 outputs instead of 144: a quarter of the arithmetic of direct or im2col convolution,
//! which is also how ncnn runs these layers. The output transform (`A^T m A`) then gives
//! the 4x4 outputs, where bias and activation are applied.
//!
//! Work is split into chunks of [`TILES_PER_CHUNK`] tiles, each transformed, multiplied
//! (with the `gemm` crate) and written out while its buffers stay in L2. The transforms
//! are plain loops over contiguous channel or tile vectors, compiled once per SIMD level
//! (AVX-512, AVX2) and picked at run time, since the crate builds for baseline x86-64.
//! Rounding differs from direct convolution by about 1e-6 relative, well inside the
//! 1e-4 the numerics tests allow.

#![allow(unsafe_code)]

use std::sync::Arc;

use rayon::prelude::*;

use super::Strides;
use super::cpu::Epilogue;

/// Tiles per chunk: the `gemm` crate's AVX-512 f32 row tile is 48, so the 36 products of a
/// full chunk have no partial micro-tiles; 48 tiles x 64 channels x 36 x 2 buffers is
/// 864 KiB, inside a 1 MiB L2.
pub const TILES_PER_CHUNK: usize = 48;

/// `B^T` of F(4x4, 3x3) (Lavin & Gray, interpolation points 0, ±1, ±2), spelled out in
/// [`bt_times`]; kept as the matrix its tests check against.
#[cfg_attr(not(test), allow(dead_code))]
const BT: [[f32; 6]; 6] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];
/// `G`, used in f64 for the one-off kernel transform.
const G: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];
/// `A^T`, spelled out in [`at_times`].
#[cfg_attr(not(test), allow(dead_code))]
const AT: [[f32; 6]; 4] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
    [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
];

/// A layer's kernels in the Winograd domain: `u[k][ci][co]` for the 36 positions `k`.
#[derive(Debug, Clone)]
pub struct WinogradKernels {
    c_in: usize,
    c_out: usize,
    u: Vec<f32>,
}

impl WinogradKernels {
    /// Transforms `[c_out, c_in, 3, 3]` weights.
    pub fn new(weight: &[f32], c_out: usize, c_in: usize) -> Arc<Self> {
        assert_eq!(weight.len(), c_out * c_in * 9, "3x3 weights");
        let mut u = vec![0f32; 36 * c_in * c_out];
        for co in 0..c_out {
            for ci in 0..c_in {
                let g = &weight[(co * c_in + ci) * 9..(co * c_in + ci) * 9 + 9];
                // t = G g (6x3), then U = t G^T (6x6).
                let mut t = [[0f64; 3]; 6];
                for (i, row) in t.iter_mut().enumerate() {
                    for (j, value) in row.iter_mut().enumerate() {
                        *value = (0..3).map(|l| G[i][l] * f64::from(g[l * 3 + j])).sum();
                    }
                }
                for i in 0..6 {
                    for j in 0..6 {
                        let value: f64 = (0..3).map(|l| t[i][l] * G[j][l]).sum();
                        u[((i * 6 + j) * c_in + ci) * c_out + co] = value as f32;
                    }
                }
            }
        }
        Arc::new(Self { c_in, c_out, u })
    }

    /// Output channels.
    pub fn c_out(&self) -> usize {
        self.c_out
    }

    /// Input channels.
    pub fn c_in(&self) -> usize {
        self.c_in
    }
}

/// Shape of one Winograd run.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    tiles_w: usize,
    /// Width of the zero-padded channels-last input copy.
    wp: usize,
}

#[derive(Clone, Copy)]
struct SharedOutput(*mut f32);
// SAFETY: tasks write disjoint output tiles through this pointer (see `store_outputs`),
// and the buffer outlives the parallel loop.
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

/// Memory order of activations: candle's usual NCHW, or channels-last (NHWC), which the
/// Winograd transforms read and write directly, so chains of these convolutions (SRVGG)
/// skip a transpose on the way in and a scatter on the way out of every layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationLayout {
    Nchw,
    Nhwc,
}

/// Runs the pad-1 3x3 convolution on contiguous `input` (`batch` images of `c_in x h x w`
/// values in `layout` order), returning the output in the same layout.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_winograd(
    input: &[f32],
    batch: usize,
    h: usize,
    w: usize,
    kernels: &WinogradKernels,
    bias: &[f32],
    epilogue: &Epilogue,
    layout: ActivationLayout,
) -> Vec<f32> {
    let (c_in, c_out) = (kernels.c_in, kernels.c_out);
    let (tiles_h, tiles_w) = (h.div_ceil(4), w.div_ceil(4));
    let geometry = Geometry {
        h,
        w,
        tiles_w,
        wp: 4 * tiles_w + 2,
    };
    let hp = 4 * tiles_h + 2;
    let plane = h * w;
    // Not zero-filled: the chunks below write every element (their tiles partition each
    // image's output), and the length is only set once they have.
    let mut output: Vec<f32> = Vec::with_capacity(batch * c_out * plane);
    let mut padded = vec![0f32; hp * geometry.wp * c_in];
    // Chunks never straddle tile rows, so each one writes whole 4-row output strips.
    let chunks_per_row = tiles_w.div_ceil(TILES_PER_CHUNK);
    let chunks = tiles_h * chunks_per_row;
    for image in 0..batch {
        let src = &input[image * c_in * plane..(image + 1) * c_in * plane];
        // Channels-last copy with a 1-pixel zero border (and zeros past the last tile).
        padded
            .par_chunks_mut(geometry.wp * c_in)
            .enumerate()
            .for_each(|(py, row)| {
                if py == 0 || py > h {
                    row.fill(0.0);
                    return;
                }
                // Only the border pixels and the columns past the image need zeros.
                row[..c_in].fill(0.0);
                row[(w + 1) * c_in..].fill(0.0);
                let y = py - 1;
                if layout == ActivationLayout::Nhwc {
                    row[c_in..(w + 1) * c_in]
                        .copy_from_slice(&src[y * w * c_in..(y + 1) * w * c_in]);
                    return;
                }
                // Transpose in 16-pixel blocks: read each channel's 16 pixels contiguously
                // into a small buffer, then write each pixel's channels contiguously. Reading
                // across channels directly would stride by a whole plane per value.
                let mut block = [0f32; 16 * 64];
                let mut x0 = 0;
                while x0 < w {
                    let len = 16.min(w - x0);
                    let mut ci0 = 0;
                    while ci0 < c_in {
                        let channels = 64.min(c_in - ci0);
                        for c in 0..channels {
                            let start = (ci0 + c) * plane + y * w + x0;
                            let dst = &mut block[c * 16..c * 16 + 16];
                            if len == 16 {
                                // A fixed-size copy compiles to two vector moves, not a call.
                                let run: &[f32; 16] =
                                    src[start..start + 16].try_into().expect("16 pixels");
                                dst.copy_from_slice(run);
                            } else {
                                dst[..len].copy_from_slice(&src[start..start + len]);
                            }
                        }
                        for x in 0..len {
                            let dst = &mut row[(x0 + x + 1) * c_in + ci0..][..channels];
                            for (c, value) in dst.iter_mut().enumerate() {
                                *value = block[c * 16 + x];
                            }
                        }
                        ci0 += channels;
                    }
                    x0 += len;
                }
            });
        // SAFETY: in bounds of the allocation (capacity batch * c_out * plane).
        let out = SharedOutput(unsafe { output.as_mut_ptr().add(image * c_out * plane) });
        let padded = &padded;
        (0..chunks).into_par_iter().for_each_init(
            || {
                (
                    vec![0f32; 36 * TILES_PER_CHUNK * c_in],
                    vec![0f32; 36 * TILES_PER_CHUNK * c_out],
                    vec![0f32; c_out * 4 * 4 * TILES_PER_CHUNK],
                )
            },
            |(v, m, strip), chunk| {
                let (ty, part) = (chunk / chunks_per_row, chunk % chunks_per_row);
                let first_tx = part * TILES_PER_CHUNK;
                let first = ty * tiles_w + first_tx;
                let count = TILES_PER_CHUNK.min(tiles_w - first_tx);
                let job = ChunkJob {
                    padded,
                    kernels,
                    bias,
                    epilogue,
                    geometry,
                    first,
                    count,
                    out,
                    layout,
                };
                job.run(v, m, strip);
            },
        );
    }
    // SAFETY: every one of the batch * c_out * plane elements was written above: for each
    // image, the chunks cover every tile row and every tile, and each tile writes its
    // rows x cols (clipped at the image edge) for every output channel.
    unsafe { output.set_len(batch * c_out * plane) };
    output
}

struct ChunkJob<'a> {
    padded: &'a [f32],
    kernels: &'a WinogradKernels,
    bias: &'a [f32],
    epilogue: &'a Epilogue,
    geometry: Geometry,
    first: usize,
    count: usize,
    out: SharedOutput,
    layout: ActivationLayout,
}

impl ChunkJob<'_> {
    fn run(&self, v: &mut [f32], m: &mut [f32], strip: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F, checked just above.
                unsafe { self.run_avx512(v, m, strip) };
                return;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                unsafe { self.run_avx2(v, m, strip) };
                return;
            }
        }
        self.run_portable(v, m, strip);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, v: &mut [f32], m: &mut [f32], strip: &mut [f32]) {
        self.run_portable(v, m, strip);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, v: &mut [f32], m: &mut [f32], strip: &mut [f32]) {
        self.run_portable(v, m, strip);
    }

    /// Inlined into each SIMD-level entry point above so its loops vectorize for it.
    #[inline(always)]
    fn run_portable(&self, v: &mut [f32], m: &mut [f32], strip: &mut [f32]) {
        self.transform_inputs(v);
        self.multiply(v, m);
        self.store_outputs(m, strip);
    }

    /// `v[k][t][ci] = (B^T d B)[k]` for each tile `t` of the chunk, vectorized over `ci`.
    #[inline(always)]
    fn transform_inputs(&self, v: &mut [f32]) {
        let c_in = self.kernels.c_in;
        let g = self.geometry;
        // cols[c][i] = (B^T d)[i][c], then v[i*6 + j][t] = (cols B)[i][j].
        let mut cols = vec![0f32; 36 * c_in];
        for t in 0..self.count {
            let tile = self.first + t;
            let (ty, tx) = (tile / g.tiles_w, tile % g.tiles_w);
            for c in 0..6 {
                let at = |r: usize| {
                    let start = ((4 * ty + r) * g.wp + 4 * tx + c) * c_in;
                    &self.padded[start..start + c_in]
                };
                let inputs = [at(0), at(1), at(2), at(3), at(4), at(5)];
                let block = &mut cols[c * 6 * c_in..(c + 1) * 6 * c_in];
                let mut outs = block.chunks_exact_mut(c_in);
                let outs = [(); 6].map(|_| outs.next().expect("six rows"));
                bt_times(inputs, outs, c_in);
            }
            for i in 0..6 {
                let at = |c: usize| &cols[(c * 6 + i) * c_in..(c * 6 + i + 1) * c_in];
                let inputs = [at(0), at(1), at(2), at(3), at(4), at(5)];
                // The six destinations v[i*6 + j][t], written in place.
                let mut planes = v
                    .chunks_exact_mut(TILES_PER_CHUNK * c_in)
                    .skip(i * 6)
                    .map(|plane| &mut plane[t * c_in..(t + 1) * c_in]);
                let outs = [(); 6].map(|_| planes.next().expect("36 planes"));
                bt_times(inputs, outs, c_in);
            }
        }
    }

    /// `m[k][t][co] = sum_ci v[k][t][ci] * u[k][ci][co]` for the 36 positions.
    #[inline(always)]
    fn multiply(&self, v: &[f32], m: &mut [f32]) {
        let (c_in, c_out) = (self.kernels.c_in, self.kernels.c_out);
        #[cfg(target_arch = "x86_64")]
        if c_out.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
            for k in 0..36 {
                let lhs = &v[k * TILES_PER_CHUNK * c_in..(k + 1) * TILES_PER_CHUNK * c_in];
                let rhs = &self.kernels.u[k * c_in * c_out..(k + 1) * c_in * c_out];
                let dst = &mut m[k * TILES_PER_CHUNK * c_out..(k + 1) * TILES_PER_CHUNK * c_out];
                // SAFETY: AVX-512F is present (checked above); slice sizes are as the kernel
                // requires (TILES_PER_CHUNK rows, a multiple of its 6-row block).
                unsafe { avx512::multiply(lhs, rhs, dst, c_in, c_out) };
            }
            return;
        }
        for k in 0..36 {
            let lhs = &v[k * TILES_PER_CHUNK * c_in..];
            let rhs = &self.kernels.u[k * c_in * c_out..(k + 1) * c_in * c_out];
            let dst = &mut m[k * TILES_PER_CHUNK * c_out..(k + 1) * TILES_PER_CHUNK * c_out];
            super::matmul_into(
                (self.count, c_out, c_in),
                dst,
                Strides { row: c_out, col: 1 },
                lhs,
                Strides { row: c_in, col: 1 },
                rhs,
                Strides { row: c_out, col: 1 },
            );
        }
    }

    /// `A^T m A` per tile, vectorized over output channels, plus bias and activation,
    /// written into the NCHW output.
    #[inline(always)]
    fn store_outputs(&self, m: &[f32], strip: &mut [f32]) {
        let g = self.geometry;
        let c_out = self.kernels.c_out;
        let plane = g.h * g.w;
        let slopes: Vec<f32> = match self.epilogue {
            Epilogue::Identity => vec![1.0; c_out],
            Epilogue::LeakyRelu(s) => vec![*s; c_out],
            Epilogue::PRelu(slopes) => slopes.clone(),
        };
        let mut partial = vec![0f32; 24 * c_out];
        let mut result = vec![0f32; 16 * c_out];
        for t in 0..self.count {
            let mk = |k: usize| {
                let start = (k * TILES_PER_CHUNK + t) * c_out;
                &m[start..start + c_out]
            };
            // partial[c][a] = (A^T M)[a][c]
            for c in 0..6 {
                let inputs = [
                    mk(c),
                    mk(6 + c),
                    mk(12 + c),
                    mk(18 + c),
                    mk(24 + c),
                    mk(30 + c),
                ];
                at_times(
                    inputs,
                    &mut partial[c * 4 * c_out..(c + 1) * 4 * c_out],
                    c_out,
                );
            }
            // result[a][b] = bias + (partial A)[a][b], then the activation as
            // max(x, 0) + slope * min(x, 0), which vectorizes.
            for a in 0..4 {
                let at = |c: usize| &partial[(c * 4 + a) * c_out..(c * 4 + a + 1) * c_out];
                let inputs = [at(0), at(1), at(2), at(3), at(4), at(5)];
                let row = &mut result[a * 4 * c_out..(a + 1) * 4 * c_out];
                at_times(inputs, row, c_out);
                for values in row.chunks_exact_mut(c_out) {
                    for ((x, &bias), &slope) in values.iter_mut().zip(self.bias).zip(&slopes) {
                        let y = *x + bias;
                        *x = y.max(0.0) + slope * y.min(0.0);
                    }
                }
            }
            if self.layout == ActivationLayout::Nhwc {
                // Channels-last: each output pixel's channels are one contiguous run.
                let tile = self.first + t;
                let (y0, x0) = (4 * (tile / g.tiles_w), 4 * (tile % g.tiles_w));
                for a in 0..4.min(g.h - y0) {
                    for b in 0..4.min(g.w - x0) {
                        let index = ((y0 + a) * g.w + x0 + b) * c_out;
                        // SAFETY: pixel (y0+a, x0+b) is inside the image and in this tile
                        // alone; tiles are partitioned between chunks.
                        let dst =
                            unsafe { std::slice::from_raw_parts_mut(self.out.0.add(index), c_out) };
                        dst.copy_from_slice(&result[(a * 4 + b) * c_out..(a * 4 + b + 1) * c_out]);
                    }
                }
                continue;
            }
            // Stage into strip[co][a][4t + b] (in cache), copied out row by row below;
            // scattering straight into 64 planes of the output thrashes the TLB.
            let strip_w = 4 * TILES_PER_CHUNK;
            for co in 0..c_out {
                for a in 0..4 {
                    let quad = [0, 1, 2, 3].map(|b| result[(a * 4 + b) * c_out + co]);
                    let at = (co * 4 + a) * strip_w + 4 * t;
                    strip[at..at + 4].copy_from_slice(&quad);
                }
            }
        }
        if self.layout == ActivationLayout::Nhwc {
            return;
        }
        let strip_w = 4 * TILES_PER_CHUNK;
        let (y0, x0) = (4 * (self.first / g.tiles_w), 4 * (self.first % g.tiles_w));
        let rows = 4.min(g.h - y0);
        let cols = (4 * self.count).min(g.w - x0);
        for co in 0..c_out {
            for a in 0..rows {
                let index = co * plane + (y0 + a) * g.w + x0;
                // SAFETY: (co, y0+a, x0..x0+cols) lies inside this image's output and in this
                // chunk's tiles alone; chunks partition the tiles and never straddle rows.
                let dst = unsafe { std::slice::from_raw_parts_mut(self.out.0.add(index), cols) };
                dst.copy_from_slice(&strip[(co * 4 + a) * strip_w..(co * 4 + a) * strip_w + cols]);
            }
        }
    }
}

/// `out[i] = sum_r BT[i][r] * d[r]` for six vectors of `n` lanes, written out with
/// B^T's zeros and small integers so the compiler emits one pass of vector arithmetic.
#[inline(always)]
fn bt_times(d: [&[f32]; 6], out: [&mut [f32]; 6], n: usize) {
    let (d0, d1, d2, d3, d4, d5) = (
        &d[0][..n],
        &d[1][..n],
        &d[2][..n],
        &d[3][..n],
        &d[4][..n],
        &d[5][..n],
    );
    let [o0, o1, o2, o3, o4, o5] = out;
    let (o0, o1, o2, o3, o4, o5) = (
        &mut o0[..n],
        &mut o1[..n],
        &mut o2[..n],
        &mut o3[..n],
        &mut o4[..n],
        &mut o5[..n],
    );
    for l in 0..n {
        let (a0, a1, a2, a3, a4, a5) = (d0[l], d1[l], d2[l], d3[l], d4[l], d5[l]);
        o0[l] = 4.0 * a0 - 5.0 * a2 + a4;
        o1[l] = -4.0 * (a1 + a2) + a3 + a4;
        o2[l] = 4.0 * (a1 - a2) - a3 + a4;
        o3[l] = 2.0 * (a3 - a1) - a2 + a4;
        o4[l] = 2.0 * (a1 - a3) - a2 + a4;
        o5[l] = 4.0 * a1 - 5.0 * a3 + a5;
    }
}

/// `out[a] = sum_r AT[a][r] * m[r]` for six vectors of `n` lanes.
#[inline(always)]
fn at_times(m: [&[f32]; 6], out: &mut [f32], n: usize) {
    let (m0, m1, m2, m3, m4, m5) = (
        &m[0][..n],
        &m[1][..n],
        &m[2][..n],
        &m[3][..n],
        &m[4][..n],
        &m[5][..n],
    );
    let (o0, rest) = out[..4 * n].split_at_mut(n);
    let (o1, rest) = rest.split_at_mut(n);
    let (o2, o3) = rest.split_at_mut(n);
    for l in 0..n {
        let (sum12, diff12) = (m1[l] + m2[l], m1[l] - m2[l]);
        let (sum34, diff34) = (m3[l] + m4[l], m3[l] - m4[l]);
        o0[l] = m0[l] + sum12 + sum34;
        o1[l] = diff12 + 2.0 * diff34;
        o2[l] = sum12 + 4.0 * sum34;
        o3[l] = diff12 + 8.0 * diff34 + m5[l];
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The batched small matrix product of the Winograd domain with AVX-512 intrinsics:
    //! 6 tiles x 64 (or 32, 16) output channels of accumulators stay in registers across
    //! the whole `c_in` reduction, the kernels being pre-transformed in `[ci][co]` order.

    use std::arch::x86_64::{
        __m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps,
        _mm512_storeu_ps,
    };

    use super::TILES_PER_CHUNK;

    const ROWS: usize = 6;

    /// `dst[t][co] = sum_ci lhs[t][ci] * rhs[ci][co]` for `t < TILES_PER_CHUNK`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `c_out` must be a multiple of 16; `lhs` holds
    /// `TILES_PER_CHUNK * c_in`, `rhs` `c_in * c_out`, `dst` `TILES_PER_CHUNK * c_out` floats.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn multiply(lhs: &[f32], rhs: &[f32], dst: &mut [f32], c_in: usize, c_out: usize) {
        debug_assert!(lhs.len() >= TILES_PER_CHUNK * c_in && rhs.len() >= c_in * c_out);
        debug_assert!(dst.len() >= TILES_PER_CHUNK * c_out && c_out.is_multiple_of(16));
        let mut co = 0;
        while co < c_out {
            let left = c_out - co;
            for t0 in (0..TILES_PER_CHUNK).step_by(ROWS) {
                // SAFETY: indices stay below the lengths asserted above: rows t0..t0+6 <=
                // TILES_PER_CHUNK (a multiple of 6), columns co..co+16*V <= c_out.
                unsafe {
                    if left >= 64 {
                        block::<4>(lhs, rhs, dst, c_in, c_out, t0, co);
                    } else if left >= 32 {
                        block::<2>(lhs, rhs, dst, c_in, c_out, t0, co);
                    } else {
                        block::<1>(lhs, rhs, dst, c_in, c_out, t0, co);
                    }
                }
            }
            co += if left >= 64 {
                64
            } else if left >= 32 {
                32
            } else {
                16
            };
        }
    }

    #[inline(always)]
    unsafe fn block<const V: usize>(
        lhs: &[f32],
        rhs: &[f32],
        dst: &mut [f32],
        c_in: usize,
        c_out: usize,
        t0: usize,
        co: usize,
    ) {
        // SAFETY (whole body): the caller guarantees AVX-512F and in-bounds rows/columns.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; ROWS];
            let a = lhs.as_ptr().add(t0 * c_in);
            let b = rhs.as_ptr().add(co);
            for ci in 0..c_in {
                let mut bv: [__m512; V] = [_mm512_setzero_ps(); V];
                for (j, slot) in bv.iter_mut().enumerate() {
                    *slot = _mm512_loadu_ps(b.add(ci * c_out + 16 * j));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(r * c_in + ci));
                    for j in 0..V {
                        row[j] = _mm512_fmadd_ps(av, bv[j], row[j]);
                    }
                }
            }
            let out = dst.as_mut_ptr().add(t0 * c_out + co);
            for (r, row) in acc.iter().enumerate() {
                for (j, value) in row.iter().enumerate() {
                    _mm512_storeu_ps(out.add(r * c_out + 16 * j), *value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(values: [f32; 6]) -> [Vec<f32>; 6] {
        values.map(|v| vec![v, 2.0 * v])
    }

    #[test]
    fn spelled_out_transforms_match_the_matrices() {
        let d = [0.3f32, -1.2, 2.5, 0.7, -0.4, 1.9];
        let inputs = lanes(d);
        let mut out = [0f32; 12];
        let mut rows = out.chunks_exact_mut(2);
        bt_times(
            inputs.each_ref().map(Vec::as_slice),
            [(); 6].map(|_| rows.next().unwrap()),
            2,
        );
        for i in 0..6 {
            let want: f32 = (0..6).map(|r| BT[i][r] * d[r]).sum();
            assert!((out[i * 2] - want).abs() < 1e-5 && (out[i * 2 + 1] - 2.0 * want).abs() < 1e-5);
        }
        let mut out = [0f32; 8];
        at_times(inputs.each_ref().map(Vec::as_slice), &mut out, 2);
        for a in 0..4 {
            let want: f32 = (0..6).map(|r| AT[a][r] * d[r]).sum();
            assert!(
                (out[a * 2] - want).abs() < 1e-4,
                "row {a}: {} vs {want}",
                out[a * 2]
            );
        }
    }
}
