//! The `Node` trait and what a node sees while it runs: its bound inputs, the job's
//! environment (folders, device, shared resources such as the model cache), a sink for
//! progress, frames and outputs, and the job's cancellation token.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::{Device, Tensor};

use crate::error::NodeError;
use crate::schema::NodeSchema;
use crate::value::Value;

/// A node class. Implementations are stateless: per-job state lives in the inputs and the
/// context, shared state (loaded models) in the environment's resources.
pub trait Node: Send + Sync + 'static {
    /// The node's inputs, outputs and constraints.
    fn schema(&self) -> &NodeSchema;

    /// Computes the outputs, one value per schema output, in order.
    ///
    /// # Errors
    /// Any [`NodeError`]; the executor names the node and fails the job.
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError>;

    /// Extra cache-key material for nodes whose result depends on more than their inputs
    /// (a file's size and mtime for LoadImage). `None` means the inputs say it all.
    ///
    /// # Errors
    /// When the extra material cannot be read (a missing file).
    fn cache_salt(&self, _env: &NodeEnv, _inputs: &Inputs) -> Result<Option<String>, NodeError> {
        Ok(None)
    }

    /// Whether outputs may be reused across jobs. Output nodes (side effects) say no.
    fn cacheable(&self) -> bool {
        !self.schema().output_node
    }

    /// Which of its lazy inputs the node needs, given the inputs bound so far (every eager
    /// one; a lazy one only once asked for). The executor runs what feeds those, then the
    /// node; lazy inputs not named stay unevaluated. By default every lazy input is needed.
    ///
    /// # Errors
    /// When the eager inputs cannot decide (a wrong type).
    fn lazy_inputs_needed(&self, _inputs: &Inputs) -> Result<Vec<&'static str>, NodeError> {
        Ok(self
            .schema()
            .inputs
            .iter()
            .filter(|i| i.lazy)
            .map(|i| i.name)
            .collect())
    }
}

/// Bound inputs of one node execution: literals from the workflow and values from links.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    entries: Vec<(Arc<str>, Value)>,
}

impl Inputs {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds `name` to `value`, replacing an earlier binding.
    pub fn insert(&mut self, name: impl Into<Arc<str>>, value: Value) {
        let name = name.into();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.entries.push((name, value)),
        }
    }

    /// The value bound to `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.entries
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v)
    }

    /// All bindings in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(n, v)| (&**n, v))
    }

    /// The value bound to `name`, or [`NodeError::MissingInput`].
    pub fn required(&self, name: &str) -> Result<&Value, NodeError> {
        self.get(name).ok_or_else(|| NodeError::MissingInput {
            name: name.to_string(),
        })
    }

    fn wrong(name: &str, expected: &'static str, found: &Value) -> NodeError {
        NodeError::WrongInputType {
            name: name.to_string(),
            expected,
            found: found.type_name(),
        }
    }

    /// An INT input.
    ///
    /// # Errors
    /// Missing, or not an integer.
    pub fn int(&self, name: &str) -> Result<i64, NodeError> {
        match self.required(name)? {
            Value::Int(v) => Ok(*v),
            other => Err(Self::wrong(name, "INT", other)),
        }
    }

    /// A FLOAT input (an INT literal is widened).
    ///
    /// # Errors
    /// Missing, or not a number.
    pub fn float(&self, name: &str) -> Result<f64, NodeError> {
        match self.required(name)? {
            Value::Float(v) => Ok(*v),
            Value::Int(v) => Ok(*v as f64),
            other => Err(Self::wrong(name, "FLOAT", other)),
        }
    }

    /// A STRING or COMBO input.
    ///
    /// # Errors
    /// Missing, or not a string.
    pub fn str(&self, name: &str) -> Result<&str, NodeError> {
        match self.required(name)? {
            Value::String(v) => Ok(v),
            other => Err(Self::wrong(name, "STRING", other)),
        }
    }

    /// A BOOLEAN input.
    ///
    /// # Errors
    /// Missing, or not a boolean.
    pub fn boolean(&self, name: &str) -> Result<bool, NodeError> {
        match self.required(name)? {
            Value::Boolean(v) => Ok(*v),
            other => Err(Self::wrong(name, "BOOLEAN", other)),
        }
    }

    /// An IMAGE input, `(batch, height, width, channels)`.
    ///
    /// # Errors
    /// Missing, or not an image.
    pub fn image(&self, name: &str) -> Result<&Tensor, NodeError> {
        match self.required(name)? {
            Value::Image(t) => Ok(t),
            other => Err(Self::wrong(name, "IMAGE", other)),
        }
    }

    /// A MASK input, `(batch, height, width)`.
    ///
    /// # Errors
    /// Missing, or not a mask.
    pub fn mask(&self, name: &str) -> Result<&Tensor, NodeError> {
        match self.required(name)? {
            Value::Mask(t) => Ok(t),
            other => Err(Self::wrong(name, "MASK", other)),
        }
    }

    /// An object input (model, latent, conditioning) of type `T`.
    ///
    /// # Errors
    /// Missing, or an object of another type.
    pub fn object<T: Any + Send + Sync>(&self, name: &str) -> Result<Arc<T>, NodeError> {
        match self.required(name)? {
            Value::Object(o) => o
                .clone()
                .downcast::<T>()
                .map_err(|_| NodeError::WrongInputType {
                    name: name.to_string(),
                    expected: std::any::type_name::<T>(),
                    found: "another object type",
                }),
            other => Err(Self::wrong(name, "OBJECT", other)),
        }
    }
}

/// A job's cancellation flag, checked between nodes and between sampler steps.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A typed map of shared resources (model store, model cache, signals) that crates above
/// `nodes` put in the environment without `nodes` knowing their types.
#[derive(Default)]
pub struct Resources {
    map: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl Resources {
    /// Adds or replaces the resource of type `T`.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: Arc<T>) {
        self.map.insert(TypeId::of::<T>(), value);
    }

    /// The resource of type `T`, if present.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.map
            .get(&TypeId::of::<T>())
            .and_then(|v| v.clone().downcast::<T>().ok())
    }
}

impl fmt::Debug for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Resources({} entries)", self.map.len())
    }
}

/// The environment shared by every job on one executor.
#[derive(Debug)]
pub struct NodeEnv {
    /// Where LoadImage finds files (ComfyUI's `input/`); nothing outside it is readable.
    pub input_dir: PathBuf,
    /// Where SaveImage writes.
    pub output_dir: PathBuf,
    /// Where PreviewImage writes.
    pub temp_dir: PathBuf,
    /// The models dir in ComfyUI's layout.
    pub models_dir: PathBuf,
    /// The candle device nodes compute on.
    pub device: Device,
    /// Shared resources by type (model store and cache, signals).
    pub resources: Resources,
    /// Bytes one job may allocate at once; the engine keeps it at admission's budget.
    memory_budget: AtomicU64,
}

impl NodeEnv {
    /// An environment rooted at the given folders, on the CPU.
    pub fn new(input_dir: PathBuf, output_dir: PathBuf, models_dir: PathBuf) -> Self {
        let temp_dir = output_dir.join("temp");
        Self {
            input_dir,
            output_dir,
            temp_dir,
            models_dir,
            device: Device::Cpu,
            resources: Resources::default(),
            memory_budget: AtomicU64::new(u64::MAX),
        }
    }

    /// Bytes one job may allocate at once ([`ExecContext::reserve`] checks against it);
    /// unlimited until the engine sets it.
    pub fn memory_budget(&self) -> u64 {
        self.memory_budget.load(Ordering::Relaxed)
    }

    /// Sets the per-job memory budget.
    pub fn set_memory_budget(&self, bytes: u64) {
        self.memory_budget.store(bytes, Ordering::Relaxed);
    }
}

/// A file or preview a node produced, reported to the job's outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    pub path: PathBuf,
    /// `output` for saved files, `temp` for previews.
    pub kind: &'static str,
}

/// A frame for the job's stream, as StreamFrames emits it.
#[derive(Debug, Clone)]
pub struct StreamFrame {
    /// Position in the stream, from 0.
    pub index: u64,
    /// `(height, width, channels)` f32 in `[0, 1]`.
    pub image: Tensor,
    /// The FPS the stream targets.
    pub target_fps: f64,
    /// Hold the frame until its time at `target_fps` (index over FPS after the stream's
    /// first frame), as a player would; else emit it as soon as it is computed.
    pub paced: bool,
}

/// Where a running node reports progress, frames and outputs. The executor adds timing and
/// events around it; a server forwards it to `Watch` streams.
pub trait JobSink: Send + Sync {
    /// Step `step` of `steps` inside a long node (sampler steps, tiles).
    fn progress(&self, node_id: &str, step: u64, steps: u64);
    /// A frame for the job's stream. Blocks only for the executor's pacing, never on a
    /// reader: slow readers drop, they do not stall rendering.
    fn frame(&self, node_id: &str, frame: StreamFrame);
    /// A file the node wrote.
    fn output(&self, node_id: &str, file: OutputFile);
    /// Text the node shows in the UI (`PreviewAny`); dropped where nobody shows it.
    fn text(&self, node_id: &str, text: &str) {
        let _ = (node_id, text);
    }
    /// Whether [`Self::frame`] holds paced frames until their time off the calling thread,
    /// so the node may hand over a whole stream at once. When false the node paces itself
    /// (sleeping on the device worker).
    fn paces_frames(&self) -> bool {
        false
    }
}

/// A sink that ignores everything (validation-only paths, benchmarks).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl JobSink for NullSink {
    fn progress(&self, _: &str, _: u64, _: u64) {}
    fn frame(&self, _: &str, _: StreamFrame) {}
    fn output(&self, _: &str, _: OutputFile) {}
}

/// What a node sees of its job while it runs.
pub struct ExecContext<'a> {
    pub job_id: &'a str,
    pub node_id: &'a str,
    pub env: &'a NodeEnv,
    pub sink: &'a dyn JobSink,
    pub cancel: &'a CancelToken,
    /// The workflow as submitted (API format), embedded into saved PNGs.
    pub workflow: Option<&'a serde_json::Value>,
    /// Most images a batch-capable node (samplers, VAE decode, upscalers) processes at
    /// once; `None` processes whole batches. Results do not depend on it, peak memory does.
    pub batch_limit: Option<usize>,
}

impl ExecContext<'_> {
    /// Reports step progress and returns `Err(Cancelled)` when the job was cancelled, so
    /// long nodes call it once per step: `ctx.step(i, n)?`.
    ///
    /// # Errors
    /// [`NodeError::Cancelled`] once the job's token is cancelled.
    pub fn step(&self, step: u64, steps: u64) -> Result<(), NodeError> {
        self.sink.progress(self.node_id, step, steps);
        if self.cancel.is_cancelled() {
            return Err(NodeError::Cancelled);
        }
        Ok(())
    }
}

impl fmt::Debug for ExecContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecContext")
            .field("job_id", &self.job_id)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}
