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
//! On other devices, for other dtypes and for strided convolutions the layer uses candle's
//! own `conv2d` plus separate bias and activation ops, so results are the same everywhere.

pub mod cpu;

use candle_core::{DType, Device, Module, Tensor};

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
        Ok(Self {
            weight: weight.contiguous()?,
            bias: bias.contiguous()?,
            padding,
            stride,
            activation,
            prelu_slopes_host,
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

impl Module for FusedConv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if !self.uses_fast_path(xs) {
            return self.forward_reference(xs);
        }
        let epilogue = match (&self.activation, &self.prelu_slopes_host) {
            (Activation::Identity, _) => cpu::Epilogue::Identity,
            (Activation::LeakyRelu(slope), _) => cpu::Epilogue::LeakyRelu(*slope),
            (Activation::PRelu(_), Some(slopes)) => cpu::Epilogue::PRelu(slopes.clone()),
            (Activation::PRelu(_), None) => return self.forward_reference(xs),
        };
        let op = cpu::Conv2dStride1 {
            padding: self.padding,
            epilogue,
        };
        xs.contiguous()?
            .apply_op3_no_bwd(&self.weight, &self.bias, &op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(shape: &[usize], seed: u64) -> Tensor {
        // A small LCG so the test data is deterministic without an RNG dependency.
        let count: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
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
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    fn check(batch: usize, c_in: usize, c_out: usize, h: usize, w: usize, k: usize, pad: usize, act: Activation) {
        let x = seeded(&[batch, c_in, h, w], 1);
        let weight = seeded(&[c_out, c_in, k, k], 2);
        let bias = seeded(&[c_out], 3);
        let conv = FusedConv2d::try_new(weight, Some(bias), pad, 1, act).unwrap();
        let fast = conv.forward(&x).unwrap();
        let reference = conv.forward_reference(&x).unwrap();
        let diff = max_abs_diff(&fast, &reference);
        // Same sums in a different order: allow f32 rounding over c_in*k*k terms.
        assert!(diff < 1e-4, "{batch}x{c_in}x{h}x{w} k{k} p{pad}: max diff {diff}");
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
    fn strided_conv_falls_back_to_candle() {
        let x = seeded(&[1, 3, 16, 16], 5);
        let weight = seeded(&[4, 3, 3, 3], 6);
        let conv = FusedConv2d::try_new(weight, None, 1, 2, Activation::Identity).unwrap();
        let ys = conv.forward(&x).unwrap();
        assert_eq!(ys.dims(), &[1, 4, 8, 8]);
        assert_eq!(max_abs_diff(&ys, &conv.forward_reference(&x).unwrap()), 0.0);
    }
}
