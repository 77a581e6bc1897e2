//! The one error type of `sakuga-models`.
//!
//! Variants carry the file and what is wrong with it, so a message read in a log names both.
//! `kind()` gives the low-cardinality label used for metrics and status codes.

use sakuga_telemetry::ErrorKind;
use std::path::PathBuf;

/// Everything that can go wrong loading, resolving or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model name that resolves outside the models dir (`..`, absolute, symlink out).
    #[error("model name {name:?} escapes the models dir {root}")]
    PathEscapes { name: String, root: PathBuf },
    /// The named model file does not exist in its folder.
    #[error("model {name:?} not found in {folder}")]
    NotFound { name: String, folder: PathBuf },
    /// Reading the file failed at the OS level.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not what its extension claims, or is cut short.
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A tensor the network needs is absent from the file.
    #[error("{path} has no tensor {tensor:?}")]
    MissingTensor { path: PathBuf, tensor: String },
    /// A tensor exists but has the wrong shape or dtype for the network.
    #[error("{path}: tensor {tensor:?} is {found}, expected {expected}")]
    TensorMismatch {
        path: PathBuf,
        tensor: String,
        expected: String,
        found: String,
    },
    /// The file format or architecture is not one sakuga can run.
    #[error("{path}: unsupported model: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    /// The model would not fit the cache's byte budget even when empty.
    #[error("model {name:?} needs {needed} bytes, over the cache budget of {budget} bytes")]
    OverBudget {
        name: String,
        needed: u64,
        budget: u64,
    },
    /// Invalid arguments to a model call (shape of an input image, a bad scale).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A candle operation failed while running a network.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A long call (sampling, a tiled VAE decode, an upscale) stopped because the job was
    /// cancelled between two of its steps, tiles or blocks.
    #[error("cancelled before step {step} of {steps}")]
    Cancelled { step: usize, steps: usize },
}

impl ModelError {
    /// The error class of `sakuga_errors_total{kind}`; `None` for a cancellation, which
    /// is not a failure.
    pub fn kind(&self) -> Option<ErrorKind> {
        Some(match self {
            ModelError::InvalidInput(_) => ErrorKind::InvalidInput,
            ModelError::Candle(e) if is_oom(e) => ErrorKind::Oom,
            ModelError::Candle(_) => ErrorKind::Device,
            ModelError::OverBudget { .. } => ErrorKind::Oom,
            ModelError::Cancelled { .. } => return None,
            _ => ErrorKind::ModelLoad,
        })
    }
}

fn is_oom(e: &candle_core::Error) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("out of memory") || text.contains("out_of_memory")
}

/// Shorthand for results in this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
