//! The one error type of `sakuga-scheduler`: workflows that cannot be read or are invalid,
//! and jobs that fail, panic or are cancelled while they execute.

use std::path::PathBuf;
use std::time::Duration;

use sakuga_nodes::NodeError;
use sakuga_telemetry::{AdmissionReason, ErrorKind, Workload};

use crate::validate::ValidationReport;

/// Everything that can stop a workflow from being accepted or finishing.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The text is not a workflow at all (not JSON, not an object of nodes).
    #[error("malformed workflow: {reason}")]
    Malformed { reason: String },
    /// A UI-format (LiteGraph) workflow has a node that cannot be converted to API format.
    #[error("node {node_id} '{title}' ({node_type}): {problem}")]
    UiNode {
        /// The UI node id; `"<instance>:<inner>"` inside a subgraph.
        node_id: String,
        title: String,
        node_type: String,
        problem: Box<crate::ui_format::UiProblem>,
    },
    /// A UI-format workflow whose structure (nodes, links, subgraph definitions) is broken.
    #[error("ui-format workflow: {reason}")]
    UiFormat { reason: String },
    /// An image file holds no workflow sakuga or ComfyUI embedded.
    #[error("{what}: {reason}")]
    NoEmbeddedWorkflow { what: &'static str, reason: String },
    /// The workflow parsed but failed validation; the report names every problem.
    #[error("{}", .0.summary())]
    Invalid(Box<ValidationReport>),
    /// A node returned an error.
    #[error("node {node_id} ({class_type}) failed: {source}")]
    NodeFailed {
        node_id: String,
        class_type: String,
        #[source]
        source: Box<NodeError>,
    },
    /// A node panicked; the worker survived and the job failed.
    #[error("node {node_id} ({class_type}) panicked: {message}")]
    NodePanicked {
        node_id: String,
        class_type: String,
        message: String,
    },
    /// The job was cancelled; `node_id` is where it stopped, if a node was running.
    #[error("job cancelled after {elapsed:?}{}", .node_id.as_deref().map(|n| format!(" at node {n}")).unwrap_or_default())]
    Cancelled {
        node_id: Option<String>,
        elapsed: Duration,
    },
    /// Admission control refused the job; retry after `retry_after`.
    #[error("{workload} job denied ({reason}): {detail}")]
    Denied {
        workload: Workload,
        reason: AdmissionReason,
        detail: String,
        retry_after: Duration,
    },
    /// The workflow is over one of the server's size caps.
    #[error("workflow too large: {what} is {actual}, the limit is {limit}")]
    TooLarge {
        what: &'static str,
        actual: u64,
        limit: u64,
    },
    /// A request field other than the workflow is out of bounds or unusable (a label too
    /// long, a page token ListJobs never issued, a deadline already past).
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// No job has this id.
    #[error("no job {job_id}")]
    JobNotFound { job_id: String },
    /// The engine is draining or stopped and takes no new work.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The journal in the data dir could not be opened, read or written.
    #[error("journal {path}: {reason}")]
    Journal { path: PathBuf, reason: String },
    /// A queued job's deadline passed before it could start.
    #[error("job {job_id} missed its deadline before it started")]
    DeadlineExceeded { job_id: String },
}

impl SchedulerError {
    /// The error class of `sakuga_errors_total{kind}` when this error fails a job; `None`
    /// when it is no failure of the job's own (cancelled, refused, unknown, shutting
    /// down).
    pub fn kind(&self) -> Option<ErrorKind> {
        Some(match self {
            SchedulerError::Malformed { .. }
            | SchedulerError::Invalid(_)
            | SchedulerError::UiNode { .. }
            | SchedulerError::UiFormat { .. }
            | SchedulerError::NoEmbeddedWorkflow { .. }
            | SchedulerError::TooLarge { .. }
            | SchedulerError::InvalidArgument { .. } => ErrorKind::InvalidInput,
            SchedulerError::NodeFailed { source, .. } => return source.kind(),
            SchedulerError::NodePanicked { .. } | SchedulerError::Journal { .. } => {
                ErrorKind::Internal
            }
            SchedulerError::DeadlineExceeded { .. } => ErrorKind::Timeout,
            SchedulerError::Cancelled { .. }
            | SchedulerError::Denied { .. }
            | SchedulerError::JobNotFound { .. }
            | SchedulerError::ShuttingDown => return None,
        })
    }

    /// Whether the job ran out of memory (device or its budget).
    pub fn is_oom(&self) -> bool {
        self.kind() == Some(ErrorKind::Oom)
    }
}
