//! The one error type of `sakuga-nodes`: what a node reports when it cannot produce its
//! outputs. The executor adds the node id and class around it.

use sakuga_telemetry::ErrorKind;
use std::path::PathBuf;

/// Why a node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// An input the node needs was not bound (the validator should have caught it).
    #[error("input {name:?} is missing")]
    MissingInput { name: String },
    /// An input held a value of another type than the node asked for.
    #[error("input {name:?} is {found}, expected {expected}")]
    WrongInputType {
        name: String,
        expected: &'static str,
        found: &'static str,
    },
    /// A value was acceptable to the schema but not to the node (incompatible shapes...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A file named by an input resolves outside the folder it must stay in.
    #[error("{name:?} is outside {root}")]
    PathEscapes { name: String, root: PathBuf },
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An image file could not be decoded or encoded.
    #[error("image {path}: {reason}")]
    Image { path: PathBuf, reason: String },
    /// An encoder refused the node's frames (an output file format's own limits).
    #[error("{format} encoding: {reason}")]
    Encode {
        format: &'static str,
        reason: String,
    },
    /// A model could not be loaded or run.
    #[error(transparent)]
    Model(sakuga_models::ModelError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The node would allocate more than the job's memory budget; it stopped before it did.
    #[error("{what} would take {} MiB, past the job's memory budget of {} MiB", .bytes >> 20, .budget >> 20)]
    OverBudget {
        what: String,
        bytes: u64,
        budget: u64,
    },
    /// The job was cancelled while the node ran (checked between steps).
    #[error("cancelled")]
    Cancelled,
}

impl From<sakuga_models::ModelError> for NodeError {
    /// A model call stopped by the job's cancel is the node's cancel, whatever the model.
    fn from(e: sakuga_models::ModelError) -> Self {
        match e {
            sakuga_models::ModelError::Cancelled { .. } => NodeError::Cancelled,
            other => NodeError::Model(other),
        }
    }
}

impl NodeError {
    /// The error class of `sakuga_errors_total{kind}`; `None` for a cancellation, which
    /// is not a failure.
    pub fn kind(&self) -> Option<ErrorKind> {
        Some(match self {
            NodeError::MissingInput { .. }
            | NodeError::WrongInputType { .. }
            | NodeError::InvalidInput(_)
            | NodeError::PathEscapes { .. }
            | NodeError::Image { .. } => ErrorKind::InvalidInput,
            NodeError::Io { .. } | NodeError::Encode { .. } => ErrorKind::Internal,
            NodeError::Model(e) => return e.kind(),
            NodeError::Tensor(e) => {
                if e.to_string().to_ascii_lowercase().contains("out of memory") {
                    ErrorKind::Oom
                } else {
                    ErrorKind::Device
                }
            }
            NodeError::OverBudget { .. } => ErrorKind::Oom,
            NodeError::Cancelled => return None,
        })
    }
}
