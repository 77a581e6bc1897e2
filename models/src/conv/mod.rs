//! Convolution layers for sakuga's image networks, with a fast CPU path.
//!
//! candle's stock CPU `conv2d` lowers a convolution to one whole-image im2col matrix
//! (9x the input for a 3x3 kernel, written and read back through main memory), runs the
//! matmul, then copies the result again to get NCHW back. On a 256x256x64 feature map that
//! traffic, plus a single-threaded im2col, keeps it at 18-42 GFLOP/s where the matmul alone
//! reaches 76. [`FusedConv2d`] instead runs a candle custom op ([`cpu`]) on CPU that works
//! in cache-sized blocks of output positions: for each block it gathers the shifted input
//! rows it needs (they are contiguous runs of a zero-padded copy of the input), runs one
//! `gemm` call with the whole `c_in * kh * kw` reduction, and applies bias and the
//! activation (PReLU or LeakyReLU, as the Real-ESRGAN and RIFE networks use) while the block
//! is still in cache. Blocks run on rayon's pool.
//!
//! 3x3 stride-1 pad-1 layers, nearly all of Real-ESRGAN, go further: [`winograd`] runs
//! them as Winograd F(4x4, 3x3), a quarter of the multiplies, as ncnn does.
//!
//! On other devices, for other dtypes and for strided convolutions the layer uses candle's
//! own `conv2d` plus separate bias and activation ops, so results are the same everywhere.

pub mod cpu;
pub mod winograd;

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor};

use self::winograd::{ActivationLayout, WinogradKernels};

/// The activation fused after a convolution.
#[derive(Debug, Clone)]
pub enum Activation {
    /// No activation: the convolution plus bias.
    Identity,
    /// `x` if positive, else `slope * x`.
    LeakyRelu(f32),
    /// Per output channel slopes, `x` if positive, else `slope[c] * x`.
    PRelu(Tensor),
}

/// A 2-D convolution with bias and a fused activation, as Real-ESRGAN and RIFE use them.
#[derive(Debug, Clone)]
pub struct FusedConv2d {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
    stride: usize,
    activation: Activation,
    /// The PReLU slopes on the host, read once so the CPU op need not touch the tensor.
    prelu_slopes_host: Option<Vec<f32>>,
    /// Winograd-domain kernels and host bias for CPU 3x3/s1/p1 layers.
    winograd: Option<(Arc<WinogradKernels>, Arc<Vec<f32>>)>,
}

impl FusedConv2d {
    /// A convolution with `weight` `[c_out, c_in, kh, kw]`, `bias` `[c_out]` (zeros when
    /// `None`), symmetric `padding` and `stride`, followed by `activation`.
    ///
    /// # Errors
    /// A shape that is not a conv weight, a bias or PReLU slope count that does not match
    /// `c_out`, or a failure reading the slopes.
    pub fn try_new(
        weight: Tensor,
        bias: Option<Tensor>,
        padding: usize,
        stride: usize,
        activation: Activation,
    ) -> candle_core::Result<Self> {
        let (c_out, _c_in, _kh, _kw) = weight.dims4()?;
        let bias = match bias {
            Some(bias) => bias.reshape(c_out)?,
            None => Tensor::zeros(c_out, weight.dtype(), weight.device())?,
        };
        let prelu_slopes_host = match &activation {
            Activation::PRelu(slopes) => {
                let slopes = slopes.reshape(c_out)?;
                Some(slopes.to_dtype(DType::F32)?.to_vec1::<f32>()?)
            }
            _ => None,
        };
        let (c_out, c_in, kh, kw) = weight.dims4()?;
        let winograd = if weight.device().is_cpu()
            && weight.dtype() == DType::F32
            && (kh, kw, stride, padding) == (3, 3, 1, 1)
        {
            let host = weight.flatten_all()?.to_vec1::<f32>()?;
            let bias_host = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            Some((
                WinogradKernels::new(&host, c_out, c_in),
                Arc::new(bias_host),
            ))
        } else {
            None
        };
        Ok(Self {
            weight: weight.contiguous()?,
            bias: bias.contiguous()?,
            padding,
            stride,
            activation,
            prelu_slopes_host,
            winograd,
        })
    }

    /// The weight, `[c_out, c_in, kh, kw]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Bytes held by the weight, bias and slopes.
    pub fn approx_bytes(&self) -> u64 {
        let tensor_bytes = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let slopes = match &self.activation {
            Activation::PRelu(s) => tensor_bytes(s),
            _ => 0,
        };
        tensor_bytes(&self.weight) + tensor_bytes(&self.bias) + slopes
    }

    fn uses_fast_path(&self, xs: &Tensor) -> bool {
        matches!(xs.device(), Device::Cpu)
            && xs.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && self.stride == 1
    }

    /// The same computation with candle's stock ops only: the reference the fast path is
    /// tested against, and the path on GPUs.
    ///
    /// # Errors
    /// Shape mismatches between input and weight, device errors.
    pub fn forward_reference(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let ys = xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        let ys = ys.broadcast_add(&self.bias.reshape((1, self.out_channels(), 1, 1))?)?;
        match &self.activation {
            Activation::Identity => Ok(ys),
            Activation::LeakyRelu(slope) => candle_nn::ops::leaky_relu(&ys, f64::from(*slope)),
            Activation::PRelu(slopes) => {
                let slopes = slopes.reshape((1, self.out_channels(), 1, 1))?;
                let positive = ys.relu()?;
                let negative = ys.minimum(0f32)?.broadcast_mul(&slopes)?;
                positive + negative
            }
        }
    }
}

impl FusedConv2d {
    fn epilogue(&self) -> Option<cpu::Epilogue> {
        match (&self.activation, &self.prelu_slopes_host) {
            (Activation::Identity, _) => Some(cpu::Epilogue::Identity),
            (Activation::LeakyRelu(slope), _) => Some(cpu::Epilogue::LeakyRelu(*slope)),
            (Activation::PRelu(_), Some(slopes)) => Some(cpu::Epilogue::PRelu(slopes.clone())),
            (Activation::PRelu(_), None) => None,
        }
    }

    /// The blocked im2col GEMM kernel alone (no Winograd), on CPU f32 stride-1 inputs;
    /// other inputs take [`FusedConv2d::forward_reference`]. For tests and benchmarks.
    ///
    /// # Errors
    /// Shape mismatches between input and weight.
    pub fn forward_im2col(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let Some(epilogue) = self.epilogue().filter(|_| self.uses_fast_path(xs)) else {
            return self.forward_reference(xs);
        };
        let op = cpu::Conv2dStride1 {
            padding: self.padding,
            epilogue,
        };
        xs.contiguous()?
            .apply_op3_no_bwd(&self.weight, &self.bias, &op)
    }
}

impl FusedConv2d {
    fn winograd_op(&self, xs: &Tensor, layout: ActivationLayout) -> Option<WinogradOp> {
        match (&self.winograd, self.epilogue()) {
            (Some((kernels, bias)), Some(epilogue)) if self.uses_fast_path(xs) => {
                Some(WinogradOp {
                    kernels: kernels.clone(),
                    bias: bias.clone(),
                    epilogue,
                    layout,
                })
            }
            _ => None,
        }
    }

    /// The same convolution on channels-last activations, `[b, h, w, c_in]` to
    /// `[b, h, w, c_out]`. CPU 3x3 layers run Winograd directly on that layout; others
    /// permute around the NCHW path.
    ///
    /// # Errors
    /// Shape mismatches between input and weight, device errors.
    pub fn forward_nhwc(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self.winograd_op(xs, ActivationLayout::Nhwc) {
            Some(op) => xs.contiguous()?.apply_op1_no_bwd(&op),
            None => self
                .forward(&xs.permute((0, 3, 1, 2))?)?
                .permute((0, 2, 3, 1))?
                .contiguous(),
        }
    }
}

impl Module for FusedConv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self.winograd_op(xs, ActivationLayout::Nchw) {
            Some(op) => xs.contiguous()?.apply_op1_no_bwd(&op),
            None => self.forward_im2col(xs),
        }
    }
}

/// candle custom op running [`winograd::conv3x3_winograd`] on `[b, c_in, h, w]` f32.
#[derive(Debug, Clone)]
struct WinogradOp {
    kernels: Arc<WinogradKernels>,
    bias: Arc<Vec<f32>>,
    epilogue: cpu::Epilogue,
    layout: ActivationLayout,
}

impl CustomOp1 for WinogradOp {
    fn name(&self) -> &'static str {
        "sakuga-conv3x3-winograd"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("winograd conv: input must be f32")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("winograd conv: input must be contiguous")
        };
        let (batch, c_in, h, w) = match self.layout {
            ActivationLayout::Nchw => layout.shape().dims4()?,
            ActivationLayout::Nhwc => {
                let (b, h, w, c) = layout.shape().dims4()?;
                (b, c, h, w)
            }
        };
        if c_in != self.kernels.c_in() {
            candle_core::bail!(
                "winograd conv: input has {c_in} channels, weight expects {}",
                self.kernels.c_in()
            )
        }
        let out = winograd::conv3x3_winograd(
            &data[start..end],
            batch,
            h,
            w,
            &self.kernels,
            &self.bias,
            &self.epilogue,
            self.layout,
        );
        let c_out = self.kernels.c_out();
        let shape = match self.layout {
            ActivationLayout::Nchw => Shape::from((batch, c_out, h, w)),
            ActivationLayout::Nhwc => Shape::from((batch, h, w, c_out)),
        };
        Ok((CpuStorage::F32(out), shape))
    }
}

/// A matrix inside a slice: element `(row, col)` is at `row * row_stride + col * col_stride`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Strides {
    pub row: usize,
    pub col: usize,
}

impl Strides {
    /// The largest index a `rows x cols` matrix with these strides touches.
    fn last(self, rows: usize, cols: usize) -> usize {
        (rows - 1) * self.row + (cols - 1) * self.col
    }
}

/// `dst (m x n) = lhs (m x k) · rhs (k x n)` on one thread: the convolutions split their
/// work into blocks and parallelise over those instead.
///
/// # Panics
/// When a matrix reaches past the end of its slice.
#[allow(clippy::too_many_arguments, unsafe_code)]
pub(crate) fn matmul_into(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_strides: Strides,
    lhs: &[f32],
    lhs_strides: Strides,
    rhs: &[f32],
    rhs_strides: Strides,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(
        dst_strides.last(m, n) < dst.len(),
        "gemm: dst out of bounds"
    );
    assert!(
        lhs_strides.last(m, k) < lhs.len(),
        "gemm: lhs out of bounds"
    );
    assert!(
        rhs_strides.last(k, n) < rhs.len(),
        "gemm: rhs out of bounds"
    );
    let stride = |s: usize| s as isize;
    // SAFETY: the asserts above keep every index gemm touches inside its slice, and `dst`
    // is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            stride(dst_strides.col),
            stride(dst_strides.row),
            false,
            lhs.as_ptr(),
            stride(lhs_strides.col),
            stride(lhs_strides.row),
            rhs.as_ptr(),
            stride(rhs_strides.col),
            stride(rhs_strides.row),
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(shape: &[usize], seed: u64) -> Tensor {
        // A small LCG so the test data is deterministic without an RNG dependency.
        let count: usize = shape.iter().product();
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let values: Vec<f32> = (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        batch: usize,
        c_in: usize,
        c_out: usize,
        h: usize,
        w: usize,
        k: usize,
        pad: usize,
        act: Activation,
    ) {
        let x = seeded(&[batch, c_in, h, w], 1);
        let weight = seeded(&[c_out, c_in, k, k], 2);
        let bias = seeded(&[c_out], 3);
        let conv = FusedConv2d::try_new(weight, Some(bias), pad, 1, act).unwrap();
        let reference = conv.forward_reference(&x).unwrap();
        let scale: f32 = reference
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        for (name, fast) in [
            ("default", conv.forward(&x).unwrap()),
            ("im2col", conv.forward_im2col(&x).unwrap()),
        ] {
            let diff = max_abs_diff(&fast, &reference);
            // Same sums in a different order (or through the Winograd domain, whose
            // transforms scale values by up to ~100 before cancelling): allow f32 rounding
            // relative to the output magnitude.
            let tolerance = 1e-5 * (1.0 + scale);
            assert!(
                diff < tolerance,
                "{name} {batch}x{c_in}x{h}x{w} k{k} p{pad}: max diff {diff}, outputs up to {scale}"
            );
        }
    }

    #[test]
    fn fast_conv_matches_candle_for_3x3_prelu() {
        let slopes = seeded(&[16], 4);
        check(2, 8, 16, 23, 37, 3, 1, Activation::PRelu(slopes));
    }

    #[test]
    fn fast_conv_matches_candle_for_leaky_relu_and_identity() {
        check(1, 5, 7, 40, 19, 3, 1, Activation::LeakyRelu(0.2));
        check(1, 3, 4, 9, 30, 3, 1, Activation::Identity);
    }

    #[test]
    fn fast_conv_matches_candle_for_other_kernels_and_padding() {
        check(1, 4, 6, 17, 21, 1, 0, Activation::Identity);
        check(1, 4, 6, 17, 21, 5, 2, Activation::LeakyRelu(0.1));
        check(1, 4, 6, 17, 21, 3, 0, Activation::Identity);
        check(1, 2, 3, 3, 3, 3, 1, Activation::Identity);
    }

    #[test]
    fn fast_conv_spans_many_blocks() {
        // 64x80 on a 66-wide grid is 4224 positions: eleven blocks, the last one partial.
        check(1, 16, 24, 64, 80, 3, 1, Activation::LeakyRelu(0.2));
    }

    #[test]
    fn winograd_covers_ragged_edges_and_several_chunks() {
        // 37x61 is not a multiple of 4 (partial tiles) and has 10x16 = 160 tiles: four
        // chunks of 48, the last partial.
        let slopes = seeded(&[64], 7);
        check(2, 64, 64, 37, 61, 3, 1, Activation::PRelu(slopes));
        check(1, 3, 48, 5, 3, 3, 1, Activation::Identity);
    }

    #[test]
    fn channels_last_forward_matches_nchw() {
        let x = seeded(&[2, 16, 13, 22], 8);
        let slopes = seeded(&[32], 9);
        let weight = seeded(&[32, 16, 3, 3], 10);
        let conv = FusedConv2d::try_new(
            weight,
            Some(seeded(&[32], 11)),
            1,
            1,
            Activation::PRelu(slopes),
        )
        .unwrap();
        let nchw = conv.forward(&x).unwrap();
        let nhwc = conv
            .forward_nhwc(&x.permute((0, 2, 3, 1)).unwrap())
            .unwrap();
        assert_eq!(nhwc.dims(), &[2, 13, 22, 32]);
        let back = nhwc.permute((0, 3, 1, 2)).unwrap();
        assert_eq!(max_abs_diff(&back, &nchw), 0.0);
        // A strided layer has no channels-last kernel: it goes around through NCHW.
        let strided =
            FusedConv2d::try_new(seeded(&[8, 16, 3, 3], 12), None, 1, 2, Activation::Identity)
                .unwrap();
        let out = strided
            .forward_nhwc(&x.permute((0, 2, 3, 1)).unwrap())
            .unwrap();
        let want = strided.forward(&x).unwrap().permute((0, 2, 3, 1)).unwrap();
        assert_eq!(max_abs_diff(&out, &want), 0.0);
    }

    #[test]
    fn strided_conv_falls_back_to_candle() {
        let x = seeded(&[1, 3, 16, 16], 5);
        let weight = seeded(&[4, 3, 3, 3], 6);
        let conv = FusedConv2d::try_new(weight, None, 1, 2, Activation::Identity).unwrap();
        let ys = conv.forward(&x).unwrap();
        assert_eq!(ys.dims(), &[1, 4, 8, 8]);
        assert_eq!(max_abs_diff(&ys, &conv.forward_reference(&x).unwrap()), 0.0);
    }
}
