//! `sakuga-nodes`: the node model sakuga executes.
//!
//! Module map:
//! - [`port`]: port types (`IMAGE`, `MODEL`, `INT`...), spelled as ComfyUI spells them.
//! - [`schema`]: a node's inputs, outputs, defaults, ranges and choices, declared once for
//!   both validation and the catalogue.
//! - [`value`]: values that flow along links at run time.
//! - [`node`]: the [`Node`] trait and what a running node sees (inputs, environment, sink,
//!   cancellation).
//! - [`shape`]: output shapes, scratch memory and work of a node before it runs, and the
//!   budget check nodes make before large allocations.
//! - [`registry`]: node classes by name; crates above extend it.
//! - [`files`]: names resolved inside their folder, folder listings for combos.
//! - [`image`]: conversions between image tensors, pixels and PNG files.
//! - [`video`]: VIDEO values and their file format, H.264 in MP4 (OpenH264, `mp4`).
//! - [`builtin`]: the built-in nodes.

pub mod builtin;
pub mod error;
pub mod files;
pub mod image;
pub mod node;
pub mod port;
pub mod registry;
pub mod schema;
pub mod shape;
#[cfg(test)]
mod testing;
pub mod value;
pub mod video;

pub use error::NodeError;
pub use node::{
    CancelToken, ExecContext, Inputs, JobSink, Node, NodeEnv, NullSink, OutputFile, Resources,
    StreamFrame,
};
pub use port::PortType;
pub use registry::NodeRegistry;
pub use schema::{
    ComboOptions, DegradeKnob, DynamicOption, Feature, InputKind, InputSpec, ModelSlot, NodeRoles,
    NodeSchema, OutputSpec,
};
pub use shape::{NodeCost, Shape, ShapeInputs};
pub use value::Value;
