//! Textual-inversion embeddings: learned token vectors a prompt names as `embedding:name`
//! (ComfyUI's syntax), fed to the text encoder in place of word tokens.
//!
//! Files are A1111's `.pt` (`string_to_param.*`), `.safetensors` with one tensor
//! (`emb_params` and the like), or SDXL's pair (`clip_l` and `clip_g`), each `[n, width]`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::store::WeightFile;

/// Where a prompt's `embedding:name` words are looked up.
pub trait EmbeddingSource {
    /// The vectors `[n, width]` (f32, CPU) of embedding `name` for an encoder of `width`
    /// (`encoder` is `clip_l` or `clip_g`, the keys SDXL embeddings use), or `None`.
    fn embedding(&self, name: &str, width: usize, encoder: &str) -> Option<Tensor>;
}

/// The vectors of the embedding file at `path` for an encoder of `width`: the tensor keyed
/// `encoder` when the file has one, else the only `[n, width]` tensor in it.
///
/// # Errors
/// Unreadable files; [`ModelError::Unsupported`] when no tensor fits `width`.
pub fn load_embedding(path: &Path, width: usize, encoder: &str) -> Result<Tensor> {
    let file = WeightFile::open(path)?;
    let names = file.names();
    let fits = |name: &String| {
        file.info(name)
            .is_some_and(|i| i.shape.last() == Some(&width) && i.shape.len() <= 2)
    };
    let chosen = names
        .iter()
        .find(|n| n.as_str() == encoder && fits(n))
        .or_else(|| names.iter().find(|n| fits(n)))
        .ok_or_else(|| ModelError::Unsupported {
            path: path.to_path_buf(),
            reason: format!("no embedding vectors of width {width} in {names:?}"),
        })?;
    let vectors = file.load(chosen, &Device::Cpu)?.to_dtype(DType::F32)?;
    Ok(match vectors.rank() {
        1 => vectors.unsqueeze(0)?,
        _ => vectors,
    })
}
