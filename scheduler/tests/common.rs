//! Test nodes and helpers shared by the scheduler's integration tests.
#![allow(dead_code, missing_debug_implementations)]

use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use sakuga_nodes::{
    CancelToken, ExecContext, InputSpec, Inputs, JobSink, Node, NodeEnv, NodeError, NodeRegistry,
    NodeSchema, OutputFile, PortType, StreamFrame, Value,
};
use sakuga_scheduler::{
    ExecutionObserver, ExecutionPlan, Executor, ExecutorConfig, JobRun, Workflow, validate,
};
use serde_json::{Value as Json, json};

/// Adds one to `value`; counts its executions in `COUNTER_RUNS`.
pub struct Counter;
pub static COUNTER_RUNS: AtomicUsize = AtomicUsize::new(0);
static COUNTER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("TestCounter", "Counter", "test")
        .input(InputSpec::int("value", 0, i64::MIN, i64::MAX))
        .output(PortType::Int)
});
impl Node for Counter {
    fn schema(&self) -> &NodeSchema {
        &COUNTER
    }
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        COUNTER_RUNS.fetch_add(1, Ordering::Relaxed);
        Ok(vec![Value::Int(inputs.int("value")? + 1)])
    }
}

/// An output node that records the INT it receives.
pub struct IntSink;
static INT_SINK: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("TestIntSink", "Int sink", "test")
        .input(InputSpec::int("value", 0, i64::MIN, i64::MAX))
        .input(InputSpec::string("tag", "", false).optional())
        .output_node()
});
impl Node for IntSink {
    fn schema(&self) -> &NodeSchema {
        &INT_SINK
    }
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let v = inputs.int("value")?;
        ctx.sink.output(
            ctx.node_id,
            OutputFile {
                path: format!("int:{v}").into(),
                kind: "output",
            },
        );
        Ok(Vec::new())
    }
}

/// Panics with a message.
pub struct Panicker;
static PANICKER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("TestPanic", "Panic", "test")
        .input(InputSpec::int("value", 0, i64::MIN, i64::MAX))
        .output(PortType::Int)
});
impl Node for Panicker {
    fn schema(&self) -> &NodeSchema {
        &PANICKER
    }
    fn execute(&self, _: &ExecContext<'_>, _: &Inputs) -> Result<Vec<Value>, NodeError> {
        panic!("deliberate test panic");
    }
}

/// Cancels the job's token when it runs, then succeeds: the next step must not start.
pub struct SelfCancel;
static SELF_CANCEL: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("TestSelfCancel", "Self cancel", "test")
        .input(InputSpec::int("value", 0, i64::MIN, i64::MAX))
        .output(PortType::Int)
});
impl Node for SelfCancel {
    fn schema(&self) -> &NodeSchema {
        &SELF_CANCEL
    }
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.cancel.cancel();
        Ok(vec![Value::Int(inputs.int("value")?)])
    }
}

pub fn registry() -> NodeRegistry {
    let mut registry = NodeRegistry::with_builtins();
    registry.register(Counter);
    registry.register(IntSink);
    registry.register(Panicker);
    registry.register(SelfCancel);
    registry
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub registry: NodeRegistry,
    pub executor: Executor,
}

pub fn fixture(workers: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let env = NodeEnv::new(
        dir.path().join("input"),
        dir.path().join("output"),
        dir.path().join("models"),
    );
    std::fs::create_dir_all(&env.input_dir).unwrap();
    let config = ExecutorConfig {
        workers,
        ..ExecutorConfig::default()
    };
    Fixture {
        registry: registry(),
        executor: Executor::new(Arc::new(env), config),
        dir,
    }
}

impl Fixture {
    pub fn plan(&self, workflow: &Json) -> Result<ExecutionPlan, sakuga_scheduler::SchedulerError> {
        let wf = Workflow::from_json(workflow.clone())?;
        let valid = validate(&wf, &self.registry, self.executor.env())?;
        Ok(ExecutionPlan::compile(valid))
    }
}

/// Collects outputs for assertions.
#[derive(Default)]
pub struct Recorder {
    pub outputs: parking_lot::Mutex<Vec<(String, OutputFile)>>,
    pub started: AtomicUsize,
}
impl JobSink for Recorder {
    fn progress(&self, _: &str, _: u64, _: u64) {}
    fn frame(&self, _: &str, _: StreamFrame) {}
    fn output(&self, node_id: &str, file: OutputFile) {
        self.outputs.lock().push((node_id.to_string(), file));
    }
}
impl ExecutionObserver for Recorder {
    fn node_started(&self, _: &str, _: &str, _: sakuga_nodes::NodeRoles) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }
}

pub fn job(id: &str, recorder: &Arc<Recorder>) -> JobRun {
    JobRun {
        job_id: Arc::from(id),
        observer: recorder.clone(),
        cancel: CancelToken::new(),
        batch_limit: None,
        span: tracing::Span::none(),
    }
}

/// `TestCounter` chain of `n` nodes from a literal `start`, ending in a sink.
pub fn counter_chain(n: usize, start: i64) -> Json {
    let mut wf = serde_json::Map::new();
    wf.insert(
        "c0".into(),
        json!({"class_type": "TestCounter", "inputs": {"value": start}}),
    );
    for i in 1..n {
        wf.insert(
            format!("c{i}"),
            json!({"class_type": "TestCounter", "inputs": {"value": [format!("c{}", i - 1), 0]}}),
        );
    }
    wf.insert(
        "sink".into(),
        json!({"class_type": "TestIntSink", "inputs": {"value": [format!("c{}", n - 1), 0]}}),
    );
    Json::Object(wf)
}
