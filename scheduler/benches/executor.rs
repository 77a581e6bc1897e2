//! Executor overhead per node on chains of trivial nodes (10 .. 100,000), with and without
//! the output cache hitting, and validation time of a 1000-node workflow.
//!
//! Run: `cargo bench -p sakuga-scheduler --bench executor`

use std::sync::{Arc, LazyLock};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value as Json, json};

use sakuga_nodes::{
    CancelToken, ExecContext, InputSpec, Inputs, Node, NodeEnv, NodeError, NodeRegistry,
    NodeSchema, NullSink, PortType, Value,
};
use sakuga_scheduler::{
    ExecutionObserver, ExecutionPlan, Executor, ExecutorConfig, JobRun, OutputCacheConfig,
    Workflow, validate,
};

struct AddOne;
static ADD_ONE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("AddOne", "AddOne", "bench")
        .input(InputSpec::int("value", 0, i64::MIN, i64::MAX))
        .output(PortType::Int)
});
impl Node for AddOne {
    fn schema(&self) -> &NodeSchema {
        &ADD_ONE
    }
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        Ok(vec![Value::Int(inputs.int("value")? + 1)])
    }
}

struct Sink;
static SINK: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("Sink", "Sink", "bench")
        .input(InputSpec::int("value", 0, i64::MIN, i64::MAX))
        .output_node()
});
impl Node for Sink {
    fn schema(&self) -> &NodeSchema {
        &SINK
    }
    fn execute(&self, _: &ExecContext<'_>, _: &Inputs) -> Result<Vec<Value>, NodeError> {
        Ok(Vec::new())
    }
}

struct Quiet;
impl sakuga_nodes::JobSink for Quiet {
    fn progress(&self, _: &str, _: u64, _: u64) {}
    fn frame(&self, _: &str, _: sakuga_nodes::StreamFrame) {}
    fn output(&self, _: &str, _: sakuga_nodes::OutputFile) {}
}
impl ExecutionObserver for Quiet {}

fn chain(n: usize, start: i64) -> Json {
    let mut wf = serde_json::Map::new();
    wf.insert(
        "0".into(),
        json!({"class_type": "AddOne", "inputs": {"value": start}}),
    );
    for i in 1..n {
        wf.insert(
            i.to_string(),
            json!({"class_type": "AddOne", "inputs": {"value": [(i - 1).to_string(), 0]}}),
        );
    }
    wf.insert(
        "out".into(),
        json!({"class_type": "Sink", "inputs": {"value": [(n - 1).to_string(), 0]}}),
    );
    Json::Object(wf)
}

fn setup(cache_entries: usize) -> (NodeRegistry, Executor) {
    let mut registry = NodeRegistry::new();
    registry.register(AddOne);
    registry.register(Sink);
    let dir = std::env::temp_dir();
    let env = NodeEnv::new(dir.clone(), dir.clone(), dir);
    let config = ExecutorConfig {
        workers: 1,
        cache: OutputCacheConfig {
            max_entries: cache_entries,
            max_bytes: 1 << 30,
        },
    };
    (registry, Executor::new(Arc::new(env), config))
}

fn plan(registry: &NodeRegistry, executor: &Executor, wf: &Json) -> ExecutionPlan {
    let workflow = Workflow::from_json(wf.clone()).unwrap();
    ExecutionPlan::compile(validate(&workflow, registry, executor.env()).unwrap())
}

fn executor_overhead(c: &mut Criterion) {
    let _ = NullSink;
    let mut group = c.benchmark_group("execute_chain");
    for n in [10usize, 100, 1000, 100_000] {
        group.throughput(Throughput::Elements(n as u64));
        if n >= 100_000 {
            group.sample_size(10);
        }
        // Cache off: every node runs.
        let (registry, executor) = setup(0);
        let p = plan(&registry, &executor, &chain(n, 0));
        let job = JobRun {
            job_id: Arc::from("bench"),
            observer: Arc::new(Quiet),
            cancel: CancelToken::new(),
            batch_limit: None,
            span: tracing::Span::none(),
        };
        group.bench_with_input(BenchmarkId::new("uncached", n), &n, |b, _| {
            b.iter(|| executor.run(&p, &job).unwrap())
        });
        // Cache on and warm: every node but the output is a hit.
        let (registry, executor) = setup(n + 16);
        let p = plan(&registry, &executor, &chain(n, 0));
        executor.run(&p, &job).unwrap();
        group.bench_with_input(BenchmarkId::new("cached", n), &n, |b, _| {
            b.iter(|| executor.run(&p, &job).unwrap())
        });
    }
    group.finish();
}

fn validation(c: &mut Criterion) {
    let (registry, executor) = setup(0);
    let wf = chain(1000, 0);
    let workflow = Workflow::from_json(wf.clone()).unwrap();
    let text = wf.to_string();
    let mut group = c.benchmark_group("validate_1000");
    group.bench_function("validate", |b| {
        b.iter(|| validate(&workflow, &registry, executor.env()).unwrap())
    });
    group.bench_function("parse+validate+compile", |b| {
        b.iter(|| {
            let workflow = Workflow::from_json_str(&text).unwrap();
            ExecutionPlan::compile(validate(&workflow, &registry, executor.env()).unwrap())
        })
    });
    group.finish();
}

/// The same 1000-node chain with and without the telemetry observer (node spans, node and
/// stage histograms), to price the signals on the cheapest possible nodes.
fn telemetry_overhead(c: &mut Criterion) {
    use sakuga_scheduler::observe::TelemetryObserver;
    use sakuga_telemetry::{EventFields, PrometheusConfig, Signals, TraceContext, Workload};

    let _metrics = sakuga_telemetry::prometheus::install(&PrometheusConfig::in_process()).unwrap();
    let signals = Signals::new(Default::default());
    let (registry, executor) = setup(0);
    let p = plan(&registry, &executor, &chain(1000, 0));
    let quiet = JobRun {
        job_id: Arc::from("bench"),
        observer: Arc::new(Quiet),
        cancel: CancelToken::new(),
        batch_limit: None,
        span: tracing::Span::none(),
    };
    let fields = EventFields::new("bench", Workload::Batch, &TraceContext::new_root());
    let observed = JobRun {
        job_id: Arc::from("bench"),
        observer: Arc::new(TelemetryObserver::new(
            signals,
            fields,
            Arc::new(Quiet),
            24.0,
        )),
        cancel: CancelToken::new(),
        batch_limit: None,
        span: tracing::Span::none(),
    };
    let mut group = c.benchmark_group("telemetry_overhead_1000");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("without", |b| b.iter(|| executor.run(&p, &quiet).unwrap()));
    group.bench_function("with", |b| b.iter(|| executor.run(&p, &observed).unwrap()));
    group.finish();
}

criterion_group!(benches, executor_overhead, validation, telemetry_overhead);
criterion_main!(benches);
