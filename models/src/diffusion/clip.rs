//! The CLIP text transformer that turns prompt tokens into UNet conditioning.
//!
//! Written here rather than taken from candle-transformers because candle's CLIP config has
//! private fields (no custom sizes, so no demo model) and no way to stop at an earlier layer,
//! which ComfyUI's `CLIPSetLastLayer` (clip skip) needs. Weight names follow transformers'
//! `CLIPTextModel` (`text_model.embeddings.token_embedding.weight`, ...).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

use super::config::{ClipActivation, ClipConfig};

#[derive(Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder<'_>, config: &ClipConfig) -> candle_core::Result<Self> {
        let width = config.width;
        Ok(Self {
            q_proj: candle_nn::linear(width, width, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(width, width, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(width, width, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(width, width, vb.pp("out_proj"))?,
            heads: config.heads,
            head_dim: width / config.heads,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, seq, width) = xs.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((batch, seq, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = split((self.q_proj.forward(xs)? * scale)?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch, seq, width))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug)]
pub(crate) struct ClipLayer {
    layer_norm1: LayerNorm,
    attention: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: ClipActivation,
}

impl ClipLayer {
    pub(crate) fn new(vb: VarBuilder<'_>, config: &ClipConfig) -> candle_core::Result<Self> {
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(config.width, 1e-5, vb.pp("layer_norm1"))?,
            attention: ClipAttention::new(vb.pp("self_attn"), config)?,
            layer_norm2: candle_nn::layer_norm(config.width, 1e-5, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(config.width, config.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear(config.intermediate_size, config.width, vb.pp("mlp.fc2"))?,
            activation: config.activation,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let residual = xs;
        let hidden = self
            .attention
            .forward(&self.layer_norm1.forward(xs)?, mask)?;
        let xs = (residual + hidden)?;
        let hidden = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let hidden = match self.activation {
            ClipActivation::QuickGelu => (&hidden * candle_nn::ops::sigmoid(&(&hidden * 1.702)?)?)?,
            ClipActivation::Gelu => hidden.gelu_erf()?,
        };
        xs + self.fc2.forward(&hidden)?
    }
}

/// CLIP's text transformer.
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
    /// `[width, projection]`: the pooled output's projection (OpenCLIP's layout).
    text_projection: Option<Tensor>,
    config: ClipConfig,
}

impl ClipTextModel {
    /// Builds the model from `vb` (names under `text_model.`).
    ///
    /// # Errors
    /// When a weight is missing or misshapen.
    pub fn new(vb: VarBuilder<'_>, config: &ClipConfig) -> candle_core::Result<Self> {
        let text_projection = config
            .projection_dim
            .map(|dim| {
                let init = candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: (config.width as f64).powf(-0.5),
                };
                vb.get_with_hints((config.width, dim), "text_projection", init)
            })
            .transpose()?;
        let vb = vb.pp("text_model");
        let embeddings = vb.pp("embeddings");
        let token_embedding = candle_nn::embedding(
            config.vocab_size,
            config.width,
            embeddings.pp("token_embedding"),
        )?;
        let position_embedding = embeddings.get(
            (config.max_positions, config.width),
            "position_embedding.weight",
        )?;
        let layers = (0..config.layers)
            .map(|i| ClipLayer::new(vb.pp(format!("encoder.layers.{i}")), config))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm =
            candle_nn::layer_norm(config.width, 1e-5, vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: config.clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Hidden states `[batch, seq, width]` for token ids `[batch, seq]` (u32).
    ///
    /// `stop_at_layer` follows ComfyUI's `CLIPSetLastLayer`: -1 runs every layer, -2 stops
    /// one early ("clip skip 2"), and so on. The final layer norm applies to the last
    /// layer's output, and to an earlier one's only where the model was trained that way
    /// (SD 1.x/2.x, not SDXL).
    ///
    /// # Errors
    /// When a tensor operation fails.
    pub fn forward(&self, tokens: &Tensor, stop_at_layer: i64) -> candle_core::Result<Tensor> {
        Ok(self.forward_pooled(tokens, stop_at_layer, false, None)?.0)
    }

    /// [`Self::forward`], and with `pooled` (on a model with a projection) the pooled
    /// output `[batch, projection]`: the last layer's normed state at each row's first end
    /// token, projected. Ids past the vocabulary stand for rows of `extra` (`[k, width]`,
    /// textual-inversion vectors): id `vocab_size + i` is row `i`.
    ///
    /// # Errors
    /// When a tensor operation fails, or an id is past both.
    pub fn forward_pooled(
        &self,
        tokens: &Tensor,
        stop_at_layer: i64,
        pooled: bool,
        extra: Option<&Tensor>,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let (_, seq) = tokens.dims2()?;
        let positions = self.position_embedding.narrow(0, 0, seq)?;
        let mut xs = self.embed(tokens, extra)?.broadcast_add(&positions)?;
        let mask = causal_mask(seq, xs.dtype(), xs.device())?;
        let skip = (-stop_at_layer - 1).max(0) as usize;
        let stop = self.layers.len().saturating_sub(skip).max(1);
        let projection = self.text_projection.as_ref().filter(|_| pooled);
        let run = if projection.is_some() {
            self.layers.len()
        } else {
            stop
        };
        let mut hidden = None;
        for (i, layer) in self.layers[..run].iter().enumerate() {
            xs = layer.forward(&xs, &mask)?;
            if i + 1 == stop {
                hidden = Some(xs.clone());
            }
        }
        let hidden = hidden.unwrap_or_else(|| xs.clone());
        let last_normed = self.final_layer_norm.forward(&xs)?;
        let hidden = if stop == self.layers.len() {
            last_normed.clone()
        } else if self.config.final_norm_on_hidden {
            self.final_layer_norm.forward(&hidden)?
        } else {
            hidden
        };
        let pooled = match projection {
            Some(projection) => Some(pool(&last_normed, tokens)?.matmul(projection)?),
            None => None,
        };
        Ok((hidden, pooled))
    }
}

impl ClipTextModel {
    /// Token vectors `[batch, seq, width]`: the vocabulary's, and `extra`'s rows for ids
    /// past it.
    fn embed(&self, tokens: &Tensor, extra: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let vocab = self.config.vocab_size as u32;
        let Some(extra) = extra else {
            return self.token_embedding.forward(tokens);
        };
        let ids = tokens.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let clamped: Vec<u32> = ids.iter().flatten().map(|&id| id.min(vocab - 1)).collect();
        let base = self.token_embedding.forward(&Tensor::from_vec(
            clamped,
            tokens.dims(),
            tokens.device(),
        )?)?;
        // Rows of the extra table where ids point past the vocabulary, zeros elsewhere.
        let (batch, seq) = (ids.len(), ids.first().map_or(0, Vec::len));
        let width = self.config.width;
        let table = extra
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?;
        let rows = table.dim(0)? as u32;
        let mut replaced = vec![0f32; batch * seq * width];
        let mut mask = vec![0f32; batch * seq];
        for (i, &id) in ids.iter().flatten().enumerate() {
            if id >= vocab {
                if id - vocab >= rows {
                    candle_core::bail!("token id {id} is past the vocabulary and the embeddings");
                }
                let row = table.get((id - vocab) as usize)?.to_vec1::<f32>()?;
                replaced[i * width..(i + 1) * width].copy_from_slice(&row);
                mask[i] = 1.0;
            }
        }
        let device = base.device();
        let replaced =
            Tensor::from_vec(replaced, (batch, seq, width), device)?.to_dtype(base.dtype())?;
        let mask = Tensor::from_vec(mask, (batch, seq, 1), device)?.to_dtype(base.dtype())?;
        let keep = mask.affine(-1.0, 1.0)?;
        base.broadcast_mul(&keep)? + replaced.broadcast_mul(&mask)?
    }
}

/// Each row's state at its first end-of-text token (the last position when there is none).
fn pool(states: &Tensor, tokens: &Tensor) -> candle_core::Result<Tensor> {
    let ids = tokens.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let rows = ids
        .iter()
        .enumerate()
        .map(|(row, ids)| {
            let at = ids
                .iter()
                .position(|&id| id == super::tokenizer::EOS_TOKEN)
                .unwrap_or(ids.len() - 1);
            states.get(row)?.get(at)?.unsqueeze(0)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0)
}

fn causal_mask(seq: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (seq, seq), device)?
        .to_dtype(dtype)?
        .unsqueeze(0)?
        .unsqueeze(0)
}
