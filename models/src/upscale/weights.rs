//! A named set of tensors read from one weights file, whatever its format.
//!
//! The upscalers and the frame interpolator all start from a PyTorch-style state dict
//! (`body.0.weight`, `block0.conv0.0.0.weight`, ...), so every format is turned into one
//! here: `.safetensors`, PyTorch pickles (`.pth`, `.pkl`, `.pt`, `.ckpt`; BasicSR's
//! `params_ema`/`params` wrappers and DataParallel `module.` prefixes are unwrapped), and
//! ncnn `.param`/`.bin` pairs (mapped to PyTorch names by [`super::ncnn`]). Errors name the
//! file and what is wrong with it; all tensors are converted to f32 on the target device.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::{ModelError, Result};

/// Tensors by PyTorch key, plus the file they came from (for error messages).
#[derive(Debug, Clone)]
pub struct StateDict {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

/// The on-disk formats a weights file can be in, by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    Safetensors,
    Pickle,
    Ncnn,
}

impl WeightsFormat {
    /// The format a path's extension names, if sakuga reads it.
    pub fn from_path(path: &Path) -> Option<WeightsFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "safetensors" | "sft" => Some(WeightsFormat::Safetensors),
            "pth" | "pkl" | "pt" | "ckpt" => Some(WeightsFormat::Pickle),
            "param" => Some(WeightsFormat::Ncnn),
            _ => None,
        }
    }
}

impl StateDict {
    /// Wraps already loaded tensors; `path` is what errors will name.
    pub fn from_tensors(path: impl Into<PathBuf>, tensors: BTreeMap<String, Tensor>) -> Self {
        Self {
            path: path.into(),
            tensors,
        }
    }

    /// Reads a weights file, choosing the reader by extension, onto `device` as f32.
    ///
    /// # Errors
    /// [`ModelError::Io`] when the file cannot be read, [`ModelError::Corrupt`] when its
    /// contents do not parse, [`ModelError::Unsupported`] for an unknown extension.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        std::fs::metadata(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let format = WeightsFormat::from_path(path).ok_or_else(|| ModelError::Unsupported {
            path: path.to_path_buf(),
            reason: "unknown weights extension (expected .safetensors, .pth, .pkl or .param)"
                .to_string(),
        })?;
        let tensors = match format {
            WeightsFormat::Safetensors => read_safetensors(path)?,
            WeightsFormat::Pickle => read_pickle(path)?,
            WeightsFormat::Ncnn => return super::ncnn::load_state_dict(path, device),
        };
        let mut converted = BTreeMap::new();
        for (name, tensor) in tensors {
            let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
            let tensor = tensor.to_dtype(DType::F32)?.to_device(device)?;
            converted.insert(name, tensor);
        }
        if converted.is_empty() {
            return Err(ModelError::Corrupt {
                path: path.to_path_buf(),
                reason: "the file holds no tensors".to_string(),
            });
        }
        Ok(Self::from_tensors(path, converted))
    }

    /// The file these tensors came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensors, by name.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    /// The named tensor.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`] when it is absent.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// The named tensor, checked to have exactly `dims`.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`] when absent, [`ModelError::TensorMismatch`] when its
    /// shape differs.
    pub fn get_shaped(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        let tensor = self.get(name)?;
        if tensor.dims() != dims {
            return Err(ModelError::TensorMismatch {
                path: self.path.clone(),
                tensor: name.to_string(),
                expected: format!("{dims:?}"),
                found: format!("{:?}", tensor.dims()),
            });
        }
        Ok(tensor)
    }

    /// The shape of the named tensor.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`] when it is absent.
    pub fn dims(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.get(name)?.dims().to_vec())
    }

    /// The shape of the named tensor, which must have `rank` dimensions.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`] when absent, [`ModelError::TensorMismatch`] for another
    /// rank.
    pub fn dims_of_rank(&self, name: &str, rank: usize) -> Result<Vec<usize>> {
        let dims = self.dims(name)?;
        if dims.len() != rank {
            return Err(ModelError::TensorMismatch {
                path: self.path.clone(),
                tensor: name.to_string(),
                expected: format!("a rank-{rank} tensor"),
                found: format!("{dims:?}"),
            });
        }
        Ok(dims)
    }

    /// Total bytes of all tensors.
    pub fn approx_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum()
    }

    /// Writes the tensors as a `.safetensors` file with the same names.
    ///
    /// # Errors
    /// [`ModelError::Io`] when writing fails.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let tensors: std::collections::HashMap<&str, Tensor> = self
            .tensors
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        candle_core::safetensors::save(&tensors, path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })
    }
}

fn corrupt(path: &Path, reason: impl std::fmt::Display) -> ModelError {
    ModelError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let parsed = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| corrupt(path, format!("not a valid safetensors file: {e}")))?;
    let mut tensors = Vec::new();
    for (name, view) in parsed.tensors() {
        let tensor = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .map_err(|e| corrupt(path, format!("tensor {name:?}: {e}")))?;
        tensors.push((name, tensor));
    }
    Ok(tensors)
}

fn read_pickle(path: &Path) -> Result<Vec<(String, Tensor)>> {
    // BasicSR checkpoints wrap the state dict as {"params_ema": ...} or {"params": ...};
    // plain `torch.save(model.state_dict())` files (RIFE's flownet.pkl) have no wrapper.
    let mut last_error = None;
    for key in [Some("params_ema"), Some("params"), None] {
        match candle_core::pickle::read_all_with_key(path, key) {
            Ok(tensors) if !tensors.is_empty() => return Ok(tensors),
            Ok(_) => {}
            Err(e) => last_error = Some(e),
        }
    }
    Err(corrupt(
        path,
        match last_error {
            Some(e) => format!("not a readable PyTorch checkpoint: {e}"),
            None => "the PyTorch checkpoint holds no tensors".to_string(),
        },
    ))
}
