//! `sakuga-scheduler`: from workflow text to finished jobs.
//!
//! Module map:
//! - [`workflow`]: parsing ComfyUI API-format JSON (bare or as a `POST /prompt` body).
//! - [`ui_format`]: ComfyUI's UI (LiteGraph) format converted to API format.
//! - [`embedded`]: the workflow ComfyUI or sakuga embedded in a PNG or WebP.
//! - [`validate`]: checking a workflow against the node registry, reporting every problem
//!   in ComfyUI's `node_errors` shape; yields a [`ValidWorkflow`].
//! - [`plan`]: compiling a valid workflow into a flat [`ExecutionPlan`].
//! - [`executor`]: running plans on worker threads with an output cache.
//! - [`history`]: the job history detail of a finished job (for `sakuga report`).
//! - [`cache`]: the bounded LRU of node outputs.
//! - [`observe`]: stage events and metrics around execution.
//! - [`engine`]: the job runtime behind an [`EngineHandle`]: submit, watch, cancel, demand.
//! - [`admission`]: estimates, size caps, admit/deny/defer decisions.
//! - [`bounds`]: caps on labels, keys, ids and tokens, and past deadlines.
//! - [`ordering`]: which queued job starts next: class order, cost, aging.
//! - [`journal`]: the durable redb job journal with group commit.
//! - [`error`]: the crate's one error enum, [`SchedulerError`].

pub mod admission;
pub mod bounds;
pub mod cache;
pub mod degrade;
pub mod embedded;
pub mod engine;
pub mod error;
pub mod executor;
pub mod history;
pub mod journal;
pub mod observe;
pub mod ordering;
pub mod plan;
pub mod ui_format;
pub mod validate;
pub mod workflow;

pub use cache::{OutputCache, OutputCacheConfig};
pub use engine::{EngineConfig, EngineHandle, SubmitRequest, Submitted};
pub use error::SchedulerError;
pub use executor::{ExecutionObserver, Executor, ExecutorConfig, JobReport, JobRun, NodeRun};
pub use plan::ExecutionPlan;
pub use validate::{NodeErrors, ValidWorkflow, ValidationError, ValidationReport, validate};
pub use workflow::Workflow;
