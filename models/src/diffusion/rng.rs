//! Seeded Gaussian noise that reproduces bit for bit.
//!
//! A seed must give the same image on every run of the same device, whatever the batch
//! layout or thread count, so noise is a pure function of `(seed, stream, index)`: a
//! counter-based generator (SplitMix64's finaliser over the counter) gives uniform bits and
//! Box-Muller turns pairs of them into normals. No state is carried between calls, and the
//! values are produced on the CPU in f64 then converted, so every backend starts from the
//! same numbers.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// SplitMix64's output mix: a bijective avalanche of 64 bits.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A counter-based source of standard normal values for one `(seed, stream)` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoiseRng {
    key: u64,
}

impl NoiseRng {
    /// The generator for `seed`; `stream` separates independent uses of one seed (initial
    /// latent noise is stream 0, the ancestral noise of sampler step `i` is stream `i + 1`).
    pub fn new(seed: u64, stream: u64) -> Self {
        let key = mix64(seed ^ mix64(stream.wrapping_add(0x9e37_79b9_7f4a_7c15)));
        Self { key }
    }

    /// Uniform in (0, 1], 53 bits, for counter value `counter`.
    fn uniform(&self, counter: u64) -> f64 {
        let bits = mix64(
            self.key
                .wrapping_add(counter.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        );
        ((bits >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// The `index`-th uniform value in (0, 1] of this stream (shares counters with
    /// [`NoiseRng::normal`]; use a separate stream for both).
    pub fn uniform_at(&self, index: u64) -> f64 {
        self.uniform(index)
    }

    /// The `index`-th standard normal value of this stream.
    pub fn normal(&self, index: u64) -> f64 {
        let pair = index / 2;
        let u1 = self.uniform(2 * pair);
        let u2 = self.uniform(2 * pair + 1);
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u2;
        if index.is_multiple_of(2) {
            radius * angle.cos()
        } else {
            radius * angle.sin()
        }
    }

    /// `count` consecutive normals starting at index 0.
    pub fn normals(&self, count: usize) -> Vec<f32> {
        (0..count as u64).map(|i| self.normal(i) as f32).collect()
    }

    /// A tensor of standard normals of `shape` in `dtype` on `device`.
    ///
    /// # Errors
    /// When the device cannot allocate the tensor.
    pub fn tensor(&self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let count = shape.iter().product();
        let values = self.normals(count);
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values_and_streams_differ() {
        let a = NoiseRng::new(42, 0).normals(64);
        let b = NoiseRng::new(42, 0).normals(64);
        let c = NoiseRng::new(43, 0).normals(64);
        let d = NoiseRng::new(42, 1).normals(64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn values_look_standard_normal() {
        let values = NoiseRng::new(7, 0).normals(200_000);
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }
}
