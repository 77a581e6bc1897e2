//! LoRA files in kohya/ComfyUI naming, merged into weights as they load.
//!
//! A LoRA stores, per patched module, a low-rank pair `lora_down` `[r, in, kh, kw]` and
//! `lora_up` `[out, r, 1, 1]` (or their 2-D linear forms) plus an optional `alpha`. The merged
//! weight is `W + strength * (alpha / r) * up @ down`. Keys are `lora_unet_<module>` with the
//! module path's dots turned into underscores (diffusers or LDM module names) and
//! `lora_te_text_model_<module>` for the CLIP text encoder. Merging at load time makes a
//! patched model exactly as fast as the plain one; the cache keys the result by
//! (checkpoint, lora, strength) so the merge happens once.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use parking_lot::Mutex;

use crate::error::{ModelError, Result};
use crate::store::WeightFile;

/// Suffixes of a down factor and its up factor: kohya's, diffusers' and PEFT's.
const DOWN_SUFFIXES: &[(&str, &str)] = &[
    (".lora_down.weight", ".lora_up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
];

/// A diffusers module path (`unet.down_blocks.0...`, `text_encoder_2.text_model...`) as the
/// kohya key of the same module; kohya keys pass through.
fn kohya_key(base: &str) -> String {
    let underscore = |s: &str| s.replace('.', "_");
    for (prefix, kohya) in [
        ("unet.", "lora_unet_"),
        ("text_encoder_2.", "lora_te2_"),
        ("text_encoder.", "lora_te1_"),
    ] {
        if let Some(module) = base.strip_prefix(prefix) {
            return format!("{kohya}{}", underscore(module));
        }
    }
    base.to_string()
}

/// One patched module's low-rank factors, on the CPU in f32.
#[derive(Debug, Clone)]
struct LoraFactors {
    down: Tensor,
    up: Tensor,
    alpha: Option<f64>,
}

/// A parsed LoRA file.
#[derive(Debug)]
pub struct LoraFile {
    path: PathBuf,
    factors: BTreeMap<String, LoraFactors>,
}

impl LoraFile {
    /// Reads every low-rank pair of `path`: kohya's `*.lora_down.weight` /
    /// `*.lora_up.weight` / `*.alpha`, and diffusers' (`*.lora.down.weight`, or PEFT's
    /// `*.lora_A.weight` / `*.lora_B.weight`) under `unet.`, `text_encoder.` and
    /// `text_encoder_2.`, whose names are turned into kohya's.
    ///
    /// # Errors
    /// As [`WeightFile::open`]; [`ModelError::MissingTensor`] when a down factor has no
    /// matching up factor; [`ModelError::Unsupported`] when the file has no LoRA pairs.
    pub fn open(path: &Path) -> Result<Self> {
        let file = WeightFile::open(path)?;
        let mut factors = BTreeMap::new();
        for name in file.names() {
            let Some((base, up_suffix)) = DOWN_SUFFIXES
                .iter()
                .find_map(|(down, up)| name.strip_suffix(down).map(|base| (base, up)))
            else {
                continue;
            };
            let up_name = format!("{base}{up_suffix}");
            let down = file.load(&name, &Device::Cpu)?.to_dtype(DType::F32)?;
            if !file.contains(&up_name) {
                return Err(ModelError::MissingTensor {
                    path: path.to_path_buf(),
                    tensor: up_name,
                });
            }
            let up = file.load(&up_name, &Device::Cpu)?.to_dtype(DType::F32)?;
            let alpha_name = format!("{base}.alpha");
            let alpha = if file.contains(&alpha_name) {
                let alpha = file
                    .load(&alpha_name, &Device::Cpu)?
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?;
                alpha.first().copied()
            } else {
                None
            };
            factors.insert(kohya_key(base), LoraFactors { down, up, alpha });
        }
        if factors.is_empty() {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                reason: "no LoRA pairs (lora_down/lora_up, lora.down/lora.up or lora_A/lora_B)"
                    .to_string(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            factors,
        })
    }

    /// The file this came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Base keys of the patched modules (`lora_unet_...`, `lora_te_...`).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.factors.keys().map(String::as_str)
    }

    /// Bytes held by the factors.
    pub fn bytes(&self) -> u64 {
        self.factors
            .values()
            .map(|f| ((f.down.elem_count() + f.up.elem_count()) * 4) as u64)
            .sum()
    }

    /// The weight delta for `key` reshaped to `shape`, already multiplied by
    /// `strength * alpha / rank`; `None` when the LoRA does not patch that module.
    ///
    /// # Errors
    /// [`ModelError::TensorMismatch`] naming the LoRA file when the factors do not fit the
    /// weight.
    pub fn delta(&self, key: &str, shape: &[usize], strength: f64) -> Result<Option<Tensor>> {
        let Some(factors) = self.factors.get(key) else {
            return Ok(None);
        };
        let rank = factors.down.dim(0)?;
        let out = factors.up.dim(0)?;
        let up = factors.up.reshape((out, factors.up.elem_count() / out))?;
        let down = factors
            .down
            .reshape((rank, factors.down.elem_count() / rank))?;
        let expected: usize = shape.iter().product();
        if up.dim(1)? != rank || out * down.dim(1)? != expected {
            return Err(ModelError::TensorMismatch {
                path: self.path.clone(),
                tensor: format!("{key}.lora_up.weight"),
                expected: format!("factors of a weight shaped {shape:?}"),
                found: format!(
                    "up {:?} x down {:?}",
                    factors.up.dims(),
                    factors.down.dims()
                ),
            });
        }
        let scale = strength * factors.alpha.unwrap_or(rank as f64) / rank as f64;
        Ok(Some((up.matmul(&down)? * scale)?.reshape(shape)?))
    }
}

/// LoRAs applied to one model part, with the keys each one has patched so far.
#[derive(Debug, Default)]
pub struct LoraStack {
    entries: Vec<(Arc<LoraFile>, f64)>,
    used: Mutex<HashSet<(usize, String)>>,
}

impl LoraStack {
    /// A stack of `(lora, strength)`; zero strengths are dropped.
    pub fn new(entries: Vec<(Arc<LoraFile>, f64)>) -> Self {
        Self {
            entries: entries.into_iter().filter(|(_, s)| *s != 0.0).collect(),
            used: Mutex::new(HashSet::new()),
        }
    }

    /// Whether nothing will be patched.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds every delta that matches one of `keys` (the first key a LoRA holds wins) to
    /// `weight`, which must be f32.
    ///
    /// # Errors
    /// As [`LoraFile::delta`].
    pub fn apply(&self, keys: &[String], weight: Tensor) -> Result<Tensor> {
        let mut weight = weight;
        for (index, (lora, strength)) in self.entries.iter().enumerate() {
            for key in keys {
                if let Some(delta) = lora.delta(key, weight.dims(), *strength)? {
                    let delta = delta.to_device(weight.device())?;
                    weight = (weight + delta)?;
                    self.used.lock().insert((index, key.clone()));
                    break;
                }
            }
        }
        Ok(weight)
    }

    /// Keys of `prefix` (`lora_unet_` or `lora_te`) that no loaded weight matched, per file;
    /// ComfyUI reports these as "lora key not loaded".
    pub fn unused_keys(&self, prefix: &str) -> Vec<(PathBuf, String)> {
        let used = self.used.lock();
        let mut unused = Vec::new();
        for (index, (lora, _)) in self.entries.iter().enumerate() {
            for key in lora.keys().filter(|k| k.starts_with(prefix)) {
                if !used.contains(&(index, key.to_string())) {
                    unused.push((lora.path.clone(), key.to_string()));
                }
            }
        }
        unused
    }
}
