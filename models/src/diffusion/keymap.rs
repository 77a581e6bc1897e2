//! Tensor names: candle's (diffusers-style) module names and the original LDM layout.
//!
//! Single-file checkpoints as ComfyUI and A1111 load them keep the names of the original
//! CompVis code (`model.diffusion_model.input_blocks.1.0.in_layers.0.weight`,
//! `first_stage_model.decoder.up.3.block.0.conv1.weight`,
//! `cond_stage_model.transformer.text_model.*`), while candle's modules ask for diffusers
//! names (`down_blocks.0.resnets.0.norm1.weight`). The functions here translate one
//! requested name into the name stored in the file; [`super::weights::MappedWeights`] uses
//! them as a renaming VarBuilder backend. The demo writer runs the same functions the other
//! way round, so the mapping is exercised by every test that loads the demo checkpoint.

use super::config::{UnetConfig, VaeConfig};

/// Prefix of UNet tensors in an LDM checkpoint.
pub const LDM_UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of VAE tensors in an LDM checkpoint.
pub const LDM_VAE_PREFIX: &str = "first_stage_model.";
/// Prefix of CLIP text-encoder tensors in an LDM checkpoint (transformers >= 4.x layout).
pub const LDM_CLIP_PREFIX: &str = "cond_stage_model.transformer.";

/// Which part of a checkpoint a name belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Unet,
    Vae,
    Clip,
    /// SDXL's second text encoder (OpenCLIP-G): its LoRA keys are `lora_te2_*`.
    ClipG,
}

impl Part {
    /// The `kind` label for cache metrics.
    pub fn kind(self) -> crate::cache::ModelKind {
        match self {
            Part::Unet => crate::cache::ModelKind::Checkpoint,
            Part::Vae => crate::cache::ModelKind::Vae,
            Part::Clip | Part::ClipG => crate::cache::ModelKind::Clip,
        }
    }
}

fn split_index(rest: &str) -> Option<(usize, &str)> {
    let (index, tail) = rest.split_once('.')?;
    Some((index.parse().ok()?, tail))
}

fn unet_resnet(tail: &str) -> String {
    let (module, param) = tail.split_once('.').unwrap_or((tail, ""));
    let mapped = match module {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        other => other,
    };
    format!("{mapped}.{param}")
}

/// The LDM name (with [`LDM_UNET_PREFIX`]) of a diffusers UNet tensor name.
pub fn unet_to_ldm(name: &str, config: &UnetConfig) -> Option<String> {
    let stride = config.layers_per_block + 1;
    let n_levels = config.levels.len();
    let mapped = if let Some(rest) = name.strip_prefix("time_embedding.linear_1.") {
        format!("time_embed.0.{rest}")
    } else if let Some(rest) = name.strip_prefix("time_embedding.linear_2.") {
        format!("time_embed.2.{rest}")
    } else if let Some(rest) = name.strip_prefix("add_embedding.linear_1.") {
        format!("label_emb.0.0.{rest}")
    } else if let Some(rest) = name.strip_prefix("add_embedding.linear_2.") {
        format!("label_emb.0.2.{rest}")
    } else if let Some(rest) = name.strip_prefix("conv_in.") {
        format!("input_blocks.0.0.{rest}")
    } else if let Some(rest) = name.strip_prefix("conv_norm_out.") {
        format!("out.0.{rest}")
    } else if let Some(rest) = name.strip_prefix("conv_out.") {
        format!("out.2.{rest}")
    } else if let Some(rest) = name.strip_prefix("down_blocks.") {
        let (level, tail) = split_index(rest)?;
        if let Some(rest) = tail.strip_prefix("resnets.") {
            let (j, tail) = split_index(rest)?;
            format!(
                "input_blocks.{}.0.{}",
                1 + level * stride + j,
                unet_resnet(tail)
            )
        } else if let Some(rest) = tail.strip_prefix("attentions.") {
            let (j, tail) = split_index(rest)?;
            format!("input_blocks.{}.1.{tail}", 1 + level * stride + j)
        } else if let Some(rest) = tail.strip_prefix("downsamplers.0.conv.") {
            format!("input_blocks.{}.0.op.{rest}", (level + 1) * stride)
        } else {
            return None;
        }
    } else if let Some(rest) = name.strip_prefix("mid_block.") {
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (j, tail) = split_index(rest)?;
            format!("middle_block.{}.{}", j * 2, unet_resnet(tail))
        } else if let Some(rest) = rest.strip_prefix("attentions.0.") {
            format!("middle_block.1.{rest}")
        } else {
            return None;
        }
    } else if let Some(rest) = name.strip_prefix("up_blocks.") {
        let (level, tail) = split_index(rest)?;
        let has_attention = config
            .levels
            .get(n_levels.checked_sub(1 + level)?)?
            .transformer_depth
            .is_some();
        if let Some(rest) = tail.strip_prefix("resnets.") {
            let (j, tail) = split_index(rest)?;
            format!(
                "output_blocks.{}.0.{}",
                level * stride + j,
                unet_resnet(tail)
            )
        } else if let Some(rest) = tail.strip_prefix("attentions.") {
            let (j, tail) = split_index(rest)?;
            format!("output_blocks.{}.1.{tail}", level * stride + j)
        } else if let Some(rest) = tail.strip_prefix("upsamplers.0.conv.") {
            let slot = if has_attention { 2 } else { 1 };
            format!(
                "output_blocks.{}.{slot}.conv.{rest}",
                level * stride + config.layers_per_block
            )
        } else {
            return None;
        }
    } else {
        return None;
    };
    Some(format!("{LDM_UNET_PREFIX}{mapped}"))
}

fn vae_resnet(tail: &str) -> String {
    match tail.strip_prefix("conv_shortcut.") {
        Some(param) => format!("nin_shortcut.{param}"),
        None => tail.to_string(),
    }
}

fn vae_mid(rest: &str) -> Option<String> {
    if let Some(rest) = rest.strip_prefix("resnets.") {
        let (j, tail) = split_index(rest)?;
        Some(format!("mid.block_{}.{}", j + 1, vae_resnet(tail)))
    } else if let Some(rest) = rest.strip_prefix("attentions.0.") {
        let (module, param) = rest.rsplit_once('.')?;
        let mapped = match module {
            "group_norm" => "norm",
            "to_q" | "query" => "q",
            "to_k" | "key" => "k",
            "to_v" | "value" => "v",
            "to_out.0" | "proj_attn" => "proj_out",
            _ => return None,
        };
        Some(format!("mid.attn_1.{mapped}.{param}"))
    } else {
        None
    }
}

/// The LDM name (with [`LDM_VAE_PREFIX`]) of a diffusers VAE tensor name.
pub fn vae_to_ldm(name: &str, config: &VaeConfig) -> Option<String> {
    let n_levels = config.block_out_channels.len();
    let mapped = if let Some(rest) = name.strip_prefix("encoder.") {
        let inner = if let Some(rest) = rest.strip_prefix("conv_norm_out.") {
            format!("norm_out.{rest}")
        } else if let Some(rest) = rest.strip_prefix("down_blocks.") {
            let (level, tail) = split_index(rest)?;
            if let Some(rest) = tail.strip_prefix("resnets.") {
                let (j, tail) = split_index(rest)?;
                format!("down.{level}.block.{j}.{}", vae_resnet(tail))
            } else if let Some(rest) = tail.strip_prefix("downsamplers.0.conv.") {
                format!("down.{level}.downsample.conv.{rest}")
            } else {
                return None;
            }
        } else if let Some(rest) = rest.strip_prefix("mid_block.") {
            vae_mid(rest)?
        } else {
            rest.to_string()
        };
        format!("encoder.{inner}")
    } else if let Some(rest) = name.strip_prefix("decoder.") {
        let inner = if let Some(rest) = rest.strip_prefix("conv_norm_out.") {
            format!("norm_out.{rest}")
        } else if let Some(rest) = rest.strip_prefix("up_blocks.") {
            let (level, tail) = split_index(rest)?;
            let ldm_level = n_levels.checked_sub(1 + level)?;
            if let Some(rest) = tail.strip_prefix("resnets.") {
                let (j, tail) = split_index(rest)?;
                format!("up.{ldm_level}.block.{j}.{}", vae_resnet(tail))
            } else if let Some(rest) = tail.strip_prefix("upsamplers.0.conv.") {
                format!("up.{ldm_level}.upsample.conv.{rest}")
            } else {
                return None;
            }
        } else if let Some(rest) = rest.strip_prefix("mid_block.") {
            vae_mid(rest)?
        } else {
            rest.to_string()
        };
        format!("decoder.{inner}")
    } else {
        name.to_string()
    };
    Some(format!("{LDM_VAE_PREFIX}{mapped}"))
}

/// The LDM names (with [`LDM_CLIP_PREFIX`]) a diffusers/transformers CLIP tensor name may be
/// stored under: the current `text_model.*` layout first, then the pre-4.x one without it.
pub fn clip_to_ldm(name: &str) -> Vec<String> {
    let mut names = vec![format!("{LDM_CLIP_PREFIX}{name}")];
    if let Some(rest) = name.strip_prefix("text_model.") {
        names.push(format!("{LDM_CLIP_PREFIX}{rest}"));
    }
    names
}

/// Prefix of OpenCLIP text-encoder tensors in an SD 2.x LDM checkpoint.
pub const LDM_OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

/// The OpenCLIP name a transformers CLIP tensor name is stored under in SD 2.x checkpoints.
/// Query, key and value live in one fused `in_proj` tensor; those names carry a `#i/3`
/// suffix saying which third of dimension 0 holds them.
pub fn open_clip_to_ldm(name: &str) -> Option<String> {
    open_clip_to_ldm_at(LDM_OPEN_CLIP_PREFIX, name)
}

/// Prefix of SDXL's CLIP-L (transformers layout) in an SGM checkpoint.
pub const SDXL_CLIP_L_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Prefix of the SDXL refiner's OpenCLIP-G (its only text encoder).
pub const SDXL_REFINER_CLIP_PREFIX: &str = "conditioner.embedders.0.model.";
/// Prefix of SDXL's OpenCLIP-G in an SGM checkpoint.
pub const SDXL_CLIP_G_PREFIX: &str = "conditioner.embedders.1.model.";

/// [`open_clip_to_ldm`] for an OpenCLIP tower stored under `p`; `text_projection` (the
/// pooled output's `[width, projection]` matrix) keeps its name.
pub fn open_clip_to_ldm_at(p: &str, name: &str) -> Option<String> {
    if name == "text_projection" {
        return Some(format!("{p}text_projection"));
    }
    let rest = name.strip_prefix("text_model.")?;
    if rest == "embeddings.token_embedding.weight" {
        return Some(format!("{p}token_embedding.weight"));
    }
    if rest == "embeddings.position_embedding.weight" {
        return Some(format!("{p}positional_embedding"));
    }
    if let Some(param) = rest.strip_prefix("final_layer_norm.") {
        return Some(format!("{p}ln_final.{param}"));
    }
    let rest = rest.strip_prefix("encoder.layers.")?;
    let (layer, tail) = split_index(rest)?;
    let block = format!("{p}transformer.resblocks.{layer}.");
    let (module, param) = tail.rsplit_once('.')?;
    let mapped = match module {
        "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" => {
            let third = match module {
                "self_attn.q_proj" => 0,
                "self_attn.k_proj" => 1,
                _ => 2,
            };
            return Some(format!("{block}attn.in_proj_{param}#{third}/3"));
        }
        "self_attn.out_proj" => "attn.out_proj",
        "layer_norm1" => "ln_1",
        "layer_norm2" => "ln_2",
        "mlp.fc1" => "mlp.c_fc",
        "mlp.fc2" => "mlp.c_proj",
        _ => return None,
    };
    Some(format!("{block}{mapped}.{param}"))
}

/// Splits a `name#i/n` slice reference into the stored name and `(i, n)`.
pub fn split_slice(name: &str) -> (&str, Option<(usize, usize)>) {
    if let Some((base, slice)) = name.rsplit_once('#')
        && let Some((i, n)) = slice.split_once('/')
        && let (Ok(i), Ok(n)) = (i.parse(), n.parse())
        && i < n
    {
        return (base, Some((i, n)));
    }
    (name, None)
}

/// The kohya/ComfyUI LoRA base keys that may patch the weight `name` (a `*.weight` tensor)
/// of `part`, given its diffusers name and the LDM name it was found under.
pub fn lora_keys(part: Part, diffusers_name: &str, ldm_name: &str) -> Vec<String> {
    let Some(module) = diffusers_name.strip_suffix(".weight") else {
        return Vec::new();
    };
    let underscore = |s: &str| s.replace('.', "_");
    match part {
        Part::Unet => {
            let mut keys = vec![format!("lora_unet_{}", underscore(module))];
            if let Some(ldm_module) = ldm_name
                .strip_prefix(LDM_UNET_PREFIX)
                .and_then(|n| n.strip_suffix(".weight"))
            {
                keys.push(format!("lora_unet_{}", underscore(ldm_module)));
            }
            keys
        }
        Part::Clip => {
            let inner = module.strip_prefix("text_model.").unwrap_or(module);
            vec![
                format!("lora_te_text_model_{}", underscore(inner)),
                format!("lora_te1_text_model_{}", underscore(inner)),
            ]
        }
        Part::ClipG => {
            let inner = module.strip_prefix("text_model.").unwrap_or(module);
            vec![format!("lora_te2_text_model_{}", underscore(inner))]
        }
        Part::Vae => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::config::SdConfig;

    #[test]
    fn sd15_unet_names_map_like_the_reference_layout() {
        let config = SdConfig::v1_5().unet;
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            (
                "down_blocks.0.resnets.1.norm1.weight",
                "input_blocks.2.0.in_layers.0.weight",
            ),
            (
                "down_blocks.1.attentions.0.proj_in.weight",
                "input_blocks.4.1.proj_in.weight",
            ),
            (
                "down_blocks.2.downsamplers.0.conv.weight",
                "input_blocks.9.0.op.weight",
            ),
            (
                "down_blocks.3.resnets.1.conv2.bias",
                "input_blocks.11.0.out_layers.3.bias",
            ),
            (
                "mid_block.resnets.1.time_emb_proj.weight",
                "middle_block.2.emb_layers.1.weight",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.weight",
                "output_blocks.5.2.conv.weight",
            ),
            (
                "up_blocks.3.attentions.2.proj_out.bias",
                "output_blocks.11.1.proj_out.bias",
            ),
            (
                "up_blocks.2.resnets.0.conv_shortcut.weight",
                "output_blocks.6.0.skip_connection.weight",
            ),
            ("conv_out.bias", "out.2.bias"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(
                unet_to_ldm(diffusers, &config).as_deref(),
                Some(format!("{LDM_UNET_PREFIX}{ldm}").as_str()),
                "{diffusers}"
            );
        }
    }

    #[test]
    fn sd15_vae_names_map_like_the_reference_layout() {
        let config = SdConfig::v1_5().vae;
        let cases = [
            ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
                "encoder.down.0.downsample.conv.bias",
            ),
            (
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                "decoder.up.3.block.2.conv1.weight",
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                "decoder.up.1.upsample.conv.weight",
            ),
            (
                "decoder.mid_block.attentions.0.to_q.weight",
                "decoder.mid.attn_1.q.weight",
            ),
            (
                "decoder.mid_block.attentions.0.group_norm.bias",
                "decoder.mid.attn_1.norm.bias",
            ),
            (
                "decoder.mid_block.resnets.1.norm2.weight",
                "decoder.mid.block_2.norm2.weight",
            ),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(
                vae_to_ldm(diffusers, &config).as_deref(),
                Some(format!("{LDM_VAE_PREFIX}{ldm}").as_str()),
                "{diffusers}"
            );
        }
    }

    #[test]
    fn open_clip_names_map_to_fused_projections() {
        assert_eq!(
            open_clip_to_ldm("text_model.encoder.layers.3.self_attn.k_proj.weight").as_deref(),
            Some("cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight#1/3")
        );
        assert_eq!(
            open_clip_to_ldm("text_model.encoder.layers.0.mlp.fc2.bias").as_deref(),
            Some("cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.bias")
        );
        assert_eq!(
            open_clip_to_ldm("text_model.embeddings.position_embedding.weight").as_deref(),
            Some("cond_stage_model.model.positional_embedding")
        );
        assert_eq!(
            split_slice("a.in_proj_bias#2/3"),
            ("a.in_proj_bias", Some((2, 3)))
        );
        assert_eq!(split_slice("plain.weight"), ("plain.weight", None));
    }

    #[test]
    fn lora_keys_follow_kohya_naming() {
        let keys = lora_keys(
            Part::Unet,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        );
        assert_eq!(
            keys[0],
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        );
        assert_eq!(
            keys[1],
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
        );
        let keys = lora_keys(
            Part::Clip,
            "text_model.encoder.layers.0.self_attn.q_proj.weight",
            "",
        );
        assert_eq!(
            keys[0],
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        );
    }
}
