//! A renaming, checking, LoRA-merging VarBuilder backend.
//!
//! candle's modules ask a `VarBuilder` for tensors by their own (diffusers-style) names and
//! shapes. [`MappedWeights`] answers from a [`WeightFile`] whose names may differ (LDM
//! single-file checkpoints), checks dtype and shape, adds LoRA deltas, and converts to the
//! compute dtype. candle's error type cannot carry our file-naming errors, so the first
//! problem is kept aside and [`build_part`] returns it instead of candle's generic one: a
//! bad checkpoint is reported as "<file>: tensor X is ..., expected ...", never a panic.

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use parking_lot::Mutex;

use super::keymap::{Part, lora_keys, split_slice};
use super::lora::LoraStack;
use crate::error::{ModelError, Result};
use crate::store::{TensorInfo, WeightFile, check_float_tensor};

/// Maps a requested (candle) name to the names it may be stored under, in order.
pub type Renamer = Box<dyn Fn(&str) -> Vec<String> + Send + Sync>;

/// A [`SimpleBackend`] over one weight file with renaming, checks and LoRA merging.
pub struct MappedWeights {
    file: Arc<WeightFile>,
    part: Part,
    rename: Renamer,
    loras: Arc<LoraStack>,
    first_error: Arc<Mutex<Option<ModelError>>>,
}

impl std::fmt::Debug for MappedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedWeights")
            .field("file", &self.file.path())
            .field("part", &self.part)
            .finish()
    }
}

/// A renamer's suffix for a matrix stored transposed (`text_projection` as a Linear
/// weight in transformers' layout, `[out, in]`, where the model wants `[in, out]`).
pub const TRANSPOSED: &str = "#T";

impl MappedWeights {
    /// A backend reading `part` of `file`, renaming with `rename`, patched by `loras`.
    pub fn new(file: Arc<WeightFile>, part: Part, rename: Renamer, loras: Arc<LoraStack>) -> Self {
        Self {
            file,
            part,
            rename,
            loras,
            first_error: Arc::new(Mutex::new(None)),
        }
    }

    fn remember(&self, error: ModelError) -> candle_core::Error {
        let message = error.to_string();
        let mut slot = self.first_error.lock();
        if slot.is_none() {
            *slot = Some(error);
        }
        candle_core::Error::Msg(message)
    }

    /// The stored name (possibly a `#i/n` slice of a fused tensor) and the dtype and shape
    /// the requested tensor has there.
    fn locate(&self, name: &str) -> Option<(String, TensorInfo)> {
        (self.rename)(name).into_iter().find_map(|stored| {
            if let Some(base) = stored.strip_suffix(TRANSPOSED) {
                let mut info = self.file.info(base)?;
                info.shape.reverse();
                return Some((stored, info));
            }
            let (base, slice) = split_slice(&stored);
            let mut info = self.file.info(base)?;
            if let Some((_, parts)) = slice {
                let first = info.shape.first_mut()?;
                if *first % parts != 0 {
                    return None;
                }
                *first /= parts;
            }
            Some((stored, info))
        })
    }

    fn load(
        &self,
        name: &str,
        shape: Option<&Shape>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let Some((stored, info)) = self.locate(name) else {
            let tensor = (self.rename)(name)
                .into_iter()
                .next()
                .unwrap_or_else(|| name.to_string());
            return Err(ModelError::MissingTensor {
                path: self.file.path().to_path_buf(),
                tensor,
            });
        };
        let target: Vec<usize> = match shape {
            Some(shape) => shape.dims().to_vec(),
            None => info.shape.clone(),
        };
        // LDM stores some linear weights as 1x1 convolutions ([C, C, 1, 1]) and vice versa;
        // the same numbers in either layout are accepted.
        let squeeze = |dims: &[usize]| -> Vec<usize> {
            let mut dims = dims.to_vec();
            while dims.len() > 2 && dims.last() == Some(&1) {
                dims.pop();
            }
            dims
        };
        let expected_shape = if squeeze(&info.shape) == squeeze(&target) {
            info.shape.clone()
        } else {
            target.clone()
        };
        check_float_tensor(self.file.path(), &stored, &info, &expected_shape)?;
        let mut tensor = match stored.strip_suffix(TRANSPOSED) {
            Some(base) => self.file.load(base, device)?.t()?.contiguous()?,
            None => {
                let (base, slice) = split_slice(&stored);
                let tensor = self.file.load(base, device)?;
                match slice {
                    Some((index, parts)) => {
                        let len = tensor.dim(0)? / parts;
                        tensor.narrow(0, index * len, len)?
                    }
                    None => tensor,
                }
            }
        };
        if !self.loras.is_empty() {
            let keys = lora_keys(self.part, name, &stored);
            if !keys.is_empty() {
                let weight = tensor.to_dtype(DType::F32)?.reshape(target.as_slice())?;
                tensor = self.loras.apply(&keys, weight)?;
            }
        }
        Ok(tensor.reshape(target.as_slice())?.to_dtype(dtype)?)
    }
}

impl SimpleBackend for MappedWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, Some(&s), dtype, dev)
            .map_err(|e| self.remember(e))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, dev)
            .map_err(|e| self.remember(e))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.locate(name).is_some()
    }
}

/// Builds a module from `backend`, turning a failure into the first file error the backend
/// saw (or candle's error when the failure was not about the file).
///
/// # Errors
/// The backend's first [`ModelError`], else [`ModelError::Candle`].
pub fn build_part<T>(
    backend: MappedWeights,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
) -> Result<T> {
    let first_error = backend.first_error.clone();
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    match build(vb) {
        Ok(value) => Ok(value),
        Err(e) => Err(first_error.lock().take().unwrap_or(ModelError::Candle(e))),
    }
}
