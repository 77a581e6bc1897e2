//! T2I adapters (TencentARC): a small convolutional network that turns a hint image into
//! features added to the UNet's own activations after some of its input blocks, once per
//! hint rather than once per step. Both of ComfyUI's families: the full adapter (SD 1.x and
//! SDXL, `conv_in` + `body.N` resnets, optionally with strided-convolution downsampling) and
//! the light one (`body.N.in_conv` extractors, SD 1.x widths), in the original key layout or
//! diffusers' (`adapter.body.I.resnets.J`).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig};

use super::unet::ControlResiduals;
use crate::error::{ModelError, Result};
use crate::upscale::StateDict;

/// Which adapter a file holds, read from its tensor names and shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterConfig {
    /// Channels after pixel-unshuffling the hint (`hint channels * unshuffle^2`).
    pub cin: usize,
    /// Channels of the four feature levels.
    pub channels: [usize; 4],
    pub light: bool,
    /// SDXL layout: a 16x unshuffle, features after input blocks 3, 5, 8 and the middle.
    pub xl: bool,
    /// Kernel size of the full adapter's resnets.
    pub ksize: usize,
    /// Downsampling by a strided convolution (else average pooling).
    pub conv_downsample: bool,
}

impl AdapterConfig {
    /// How far the hint is pixel-unshuffled first.
    pub fn unshuffle(&self) -> usize {
        if self.xl { 16 } else { 8 }
    }

    /// Channels of the hint image it reads (1 for sketch/canny adapters, 3 otherwise).
    pub fn hint_channels(&self) -> usize {
        self.cin / (self.unshuffle() * self.unshuffle())
    }

    /// The input block each feature level is added after (ComfyUI's numbering), and
    /// whether the last one goes to the middle block instead.
    fn targets(&self) -> ([Option<usize>; 4], bool) {
        if self.xl {
            ([Some(3), Some(5), Some(8), None], true)
        } else {
            ([Some(2), Some(5), Some(8), Some(11)], false)
        }
    }

    /// Reads the layout from tensor shapes (names already in the original layout).
    fn detect(weights: &StateDict) -> Result<Self> {
        let dims = |name: &str| -> Result<Vec<usize>> { Ok(weights.get(name)?.dims().to_vec()) };
        if weights.contains("body.0.in_conv.weight") {
            return Ok(Self {
                cin: dims("body.0.in_conv.weight")?[1],
                channels: [320, 640, 1280, 1280],
                light: true,
                xl: false,
                ksize: 3,
                conv_downsample: false,
            });
        }
        let conv_in = dims("conv_in.weight")?;
        let (cin, channel) = (conv_in[1], conv_in[0]);
        Ok(Self {
            cin,
            channels: [channel, channel * 2, channel * 4, channel * 4],
            light: false,
            // What ComfyUI goes by: SDXL adapters read 256 (1 x 16^2) or 768 (3 x 16^2).
            xl: cin == 256 || cin == 768,
            ksize: dims("body.0.block2.weight")?[2],
            conv_downsample: weights.names().any(|n| n.ends_with("down_opt.op.weight")),
        })
    }
}

/// Whether a state dict (original or diffusers names) is a T2I adapter.
pub(crate) fn is_adapter<'n>(mut names: impl Iterator<Item = &'n str>) -> bool {
    names.any(|n| {
        n == "conv_in.weight"
            || n == "body.0.in_conv.weight"
            || n.starts_with("adapter.body.0.resnets.0.")
    })
}

/// diffusers' names to the original ones, as ComfyUI maps them.
fn original_name(name: &str) -> String {
    let Some(rest) = name.strip_prefix("adapter.") else {
        return name.to_string();
    };
    let Some(body) = rest.strip_prefix("body.") else {
        return rest.to_string();
    };
    let mut parts = body.splitn(2, '.');
    let (Some(level), Some(tail)) = (parts.next(), parts.next()) else {
        return rest.to_string();
    };
    let Ok(level) = level.parse::<usize>() else {
        return rest.to_string();
    };
    if let Some(inner) = tail.strip_prefix("resnets.")
        && let Some((j, tail)) = inner.split_once('.')
        && let Ok(j) = j.parse::<usize>()
    {
        return format!("body.{}.{tail}", level * 2 + j);
    }
    format!("body.{}.{tail}", level * 2)
}

fn conv(weights: &StateDict, prefix: &str, stride: usize, dtype: DType) -> Result<Conv2d> {
    let weight = weights.get(&format!("{prefix}.weight"))?.to_dtype(dtype)?;
    let bias = weights.get(&format!("{prefix}.bias"))?.to_dtype(dtype)?;
    let k = weight.dim(2)?;
    Ok(Conv2d::new(
        weight,
        Some(bias),
        Conv2dConfig {
            padding: k / 2,
            stride,
            ..Default::default()
        },
    ))
}

/// PyTorch's `AvgPool2d(2)` with the padding the adapters set for odd sizes (zeros,
/// counted in the average).
fn halve(x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let x = x
        .pad_with_zeros(2, h % 2, h % 2)?
        .pad_with_zeros(3, w % 2, w % 2)?;
    x.avg_pool2d(2)
}

/// `[b, c, h, w]` to `[b, c * r * r, h / r, w / r]`, channel-major as PyTorch's
/// `PixelUnshuffle`.
fn pixel_unshuffle(x: &Tensor, r: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / r, r, w / r, r))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * r * r, h / r, w / r))
}

#[derive(Debug)]
enum Downsample {
    Conv(Conv2d),
    Pool,
}

/// The full adapter's resnet: optional downsampling and channel change, then two convs
/// around a ReLU with the input added back.
#[derive(Debug)]
struct ResnetBlock {
    down: Option<Downsample>,
    in_conv: Option<Conv2d>,
    block1: Conv2d,
    block2: Conv2d,
}

impl ResnetBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = match &self.down {
            Some(Downsample::Conv(c)) => c.forward(x)?,
            Some(Downsample::Pool) => halve(x)?,
            None => x.clone(),
        };
        if let Some(in_conv) = &self.in_conv {
            x = in_conv.forward(&x)?;
        }
        let h = self.block2.forward(&self.block1.forward(&x)?.relu()?)?;
        h + x
    }
}

/// The light adapter's level: downsample, squeeze, resnets, expand.
#[derive(Debug)]
struct Extractor {
    down: bool,
    in_conv: Conv2d,
    body: Vec<(Conv2d, Conv2d)>,
    out_conv: Conv2d,
}

impl Extractor {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = if self.down { halve(x)? } else { x.clone() };
        let mut x = self.in_conv.forward(&x)?;
        for (block1, block2) in &self.body {
            x = (block2.forward(&block1.forward(&x)?.relu()?)? + x)?;
        }
        self.out_conv.forward(&x)
    }
}

#[derive(Debug)]
enum Body {
    Full {
        conv_in: Conv2d,
        blocks: Vec<ResnetBlock>,
    },
    Light(Vec<Extractor>),
}

/// A loaded T2I adapter.
#[derive(Debug)]
pub struct T2iAdapter {
    config: AdapterConfig,
    body: Body,
    dtype: DType,
}

impl T2iAdapter {
    /// Builds the adapter from a state dict in either key layout.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`]/[`ModelError::TensorMismatch`] naming the tensor.
    pub fn from_state_dict(weights: &StateDict, dtype: DType) -> Result<Self> {
        let renamed = StateDict::from_tensors(
            weights.path(),
            weights
                .tensors()
                .iter()
                .map(|(name, t)| (original_name(name), t.clone()))
                .collect(),
        );
        let weights = &renamed;
        let config = AdapterConfig::detect(weights)?;
        let body = if config.light {
            Body::Light(Self::light_levels(weights, &config, dtype)?)
        } else {
            Body::Full {
                conv_in: conv(weights, "conv_in", 1, dtype)?,
                blocks: Self::full_blocks(weights, &config, dtype)?,
            }
        };
        Ok(Self {
            config,
            body,
            dtype,
        })
    }

    /// Loads an adapter file onto `device`.
    ///
    /// # Errors
    /// File errors; as [`Self::from_state_dict`].
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::from_state_dict(&StateDict::load(path, device)?, dtype)
    }

    fn full_blocks(
        weights: &StateDict,
        config: &AdapterConfig,
        dtype: DType,
    ) -> Result<Vec<ResnetBlock>> {
        let ch = config.channels;
        let (downsampled, widened): (&[usize], &[usize]) = if config.xl {
            (&[2], &[1])
        } else {
            (&[1, 2, 3], &[])
        };
        let mut blocks = Vec::new();
        for (i, &channels) in ch.iter().enumerate() {
            for j in 0..2 {
                let index = blocks.len();
                let prefix = format!("body.{index}");
                let first = j == 0 && (downsampled.contains(&i) || widened.contains(&i));
                let in_c = if first { ch[i - 1] } else { channels };
                let down = (j == 0 && downsampled.contains(&i))
                    .then(|| -> Result<Downsample> {
                        Ok(if config.conv_downsample {
                            Downsample::Conv(conv(
                                weights,
                                &format!("{prefix}.down_opt.op"),
                                2,
                                dtype,
                            )?)
                        } else {
                            Downsample::Pool
                        })
                    })
                    .transpose()?;
                let in_conv = (in_c != channels)
                    .then(|| conv(weights, &format!("{prefix}.in_conv"), 1, dtype))
                    .transpose()?;
                let block1 = conv(weights, &format!("{prefix}.block1"), 1, dtype)?;
                let block2 = conv(weights, &format!("{prefix}.block2"), 1, dtype)?;
                check_width(weights, &format!("{prefix}.block1.weight"), channels)?;
                blocks.push(ResnetBlock {
                    down,
                    in_conv,
                    block1,
                    block2,
                });
            }
        }
        Ok(blocks)
    }

    fn light_levels(
        weights: &StateDict,
        config: &AdapterConfig,
        dtype: DType,
    ) -> Result<Vec<Extractor>> {
        (0..4)
            .map(|i| {
                let prefix = format!("body.{i}");
                check_width(
                    weights,
                    &format!("{prefix}.out_conv.weight"),
                    config.channels[i],
                )?;
                let body = (0..4)
                    .map(|k| {
                        Ok((
                            conv(weights, &format!("{prefix}.body.{k}.block1"), 1, dtype)?,
                            conv(weights, &format!("{prefix}.body.{k}.block2"), 1, dtype)?,
                        ))
                    })
                    .collect::<Result<_>>()?;
                Ok(Extractor {
                    down: i > 0,
                    in_conv: conv(weights, &format!("{prefix}.in_conv"), 1, dtype)?,
                    body,
                    out_conv: conv(weights, &format!("{prefix}.out_conv"), 1, dtype)?,
                })
            })
            .collect()
    }

    /// What the file holds.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// The hint size for a latent of `h` x `w`: 8x, rounded up to the unshuffle factor.
    pub fn hint_size(&self, h: usize, w: usize) -> (usize, usize) {
        let r = self.config.unshuffle();
        ((h * 8).div_ceil(r) * r, (w * 8).div_ceil(r) * r)
    }

    /// The features for `hint` `[b, c, h, w]` in 0..1 (already at [`Self::hint_size`]),
    /// placed where the UNet adds them; a many-channel hint for a one-channel adapter is
    /// averaged over its channels first, as ComfyUI does.
    ///
    /// # Errors
    /// Tensor errors; a hint with the wrong channel count.
    pub fn forward(&self, hint: &Tensor) -> Result<ControlResiduals> {
        let wanted = self.config.hint_channels();
        let mut hint = hint.to_dtype(self.dtype)?;
        let channels = hint.dim(1)?;
        if wanted == 1 && channels > 1 {
            hint = hint.mean_keepdim(1)?;
        } else if channels != wanted {
            return Err(ModelError::InvalidInput(format!(
                "the T2I adapter reads {wanted}-channel hints; this one has {channels}"
            )));
        }
        let x = pixel_unshuffle(&hint, self.config.unshuffle())?;
        let mut features = Vec::with_capacity(4);
        match &self.body {
            Body::Full { conv_in, blocks } => {
                let mut x = conv_in.forward(&x)?;
                for pair in blocks.chunks(2) {
                    for block in pair {
                        x = block.forward(&x)?;
                    }
                    features.push(x.clone());
                }
            }
            Body::Light(levels) => {
                let mut x = x;
                for level in levels {
                    x = level.forward(&x)?;
                    features.push(x.clone());
                }
            }
        }
        let (targets, last_to_middle) = self.config.targets();
        let mut residuals = ControlResiduals::default();
        for (feature, target) in features.into_iter().zip(targets) {
            match target {
                Some(block) => residuals.after_blocks.push((block, feature)),
                None if last_to_middle => residuals.middle = Some(feature),
                None => {}
            }
        }
        Ok(residuals)
    }
}

fn check_width(weights: &StateDict, name: &str, channels: usize) -> Result<()> {
    let found = weights.get(name)?.dim(0)?;
    if found != channels {
        return Err(ModelError::TensorMismatch {
            path: weights.path().to_path_buf(),
            tensor: name.to_string(),
            expected: format!("{channels} output channels"),
            found: format!("{found}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_names_map_to_the_original_layout() {
        assert_eq!(original_name("adapter.conv_in.weight"), "conv_in.weight");
        assert_eq!(
            original_name("adapter.body.1.resnets.1.block2.bias"),
            "body.3.block2.bias"
        );
        assert_eq!(
            original_name("adapter.body.2.in_conv.weight"),
            "body.4.in_conv.weight"
        );
        assert_eq!(
            original_name("body.5.block1.weight"),
            "body.5.block1.weight"
        );
    }

    #[test]
    fn pixel_unshuffle_is_channel_major() {
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let y = pixel_unshuffle(&x, 2).unwrap();
        assert_eq!(y.dims(), &[1, 4, 2, 2]);
        // Channel (i, j) holds the pixels at row offset i, column offset j.
        let first: Vec<f32> = y
            .get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(first, [1.0, 3.0, 9.0, 11.0]);
    }

    #[test]
    fn odd_sizes_pool_with_counted_zero_padding() {
        let x = Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let y = halve(&x).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 2]);
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [0.25, 0.5, 0.5, 1.0]);
    }
}
