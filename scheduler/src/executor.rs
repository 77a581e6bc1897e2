//! The executor: runs an [`ExecutionPlan`] on blocking worker threads (never on the tokio
//! runtime). The calling thread runs ready steps itself, so a chain pays no hand-off, and
//! passes surplus ready steps to a fixed pool so independent branches run in parallel.
//! Outputs are reused through the [`OutputCache`]; a node's error or panic fails the job
//! with the node named and leaves every thread alive; cancellation is checked between steps.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde::Deserialize;
use serde_json::Value as Json;

use sakuga_nodes::{
    CancelToken, ExecContext, Inputs, JobSink, Node, NodeEnv, NodeError, NodeRoles,
};

use crate::cache::{OutputCache, OutputCacheConfig, Outputs};
use crate::error::SchedulerError;
use crate::plan::ExecutionPlan;

/// Executor settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ExecutorConfig {
    /// Pool threads for parallel branches, besides the calling thread.
    pub workers: usize,
    pub cache: OutputCacheConfig,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(8),
            cache: OutputCacheConfig::default(),
        }
    }
}

/// Hooks around every step, on top of the node-level [`JobSink`].
pub trait ExecutionObserver: JobSink {
    /// A step is about to run (not called for cached steps).
    fn node_started(&self, _node_id: &str, _class_type: &str, _roles: NodeRoles) {}
    /// A step finished, from the cache or by running.
    fn node_finished(&self, _run: &NodeRun) {}
}

/// Timing of one step.
#[derive(Debug, Clone)]
pub struct NodeRun {
    pub node_id: Arc<str>,
    pub class_type: &'static str,
    /// What the engine knows of its class (stage, loader, stream).
    pub roles: NodeRoles,
    pub duration: Duration,
    pub cached: bool,
}

/// What a finished job did, step by step.
#[derive(Debug, Clone, Default)]
pub struct JobReport {
    pub runs: Vec<NodeRun>,
    pub elapsed: Duration,
}

impl JobReport {
    /// Steps that ran.
    pub fn executed(&self) -> usize {
        self.runs.iter().filter(|r| !r.cached).count()
    }

    /// Steps served from the cache.
    pub fn cached(&self) -> usize {
        self.runs.iter().filter(|r| r.cached).count()
    }
}

/// One job's identity and channels for the executor.
#[derive(Clone)]
pub struct JobRun {
    pub job_id: Arc<str>,
    pub observer: Arc<dyn ExecutionObserver>,
    pub cancel: CancelToken,
    /// Most images a batch-capable node processes at once (`None`: whole batches); set
    /// when a job that ran out of device memory is retried with its batch split.
    pub batch_limit: Option<usize>,
    /// The job span node spans are children of (`Span::none()` when untraced).
    pub span: tracing::Span,
}

impl std::fmt::Debug for JobRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRun")
            .field("job_id", &self.job_id)
            .finish_non_exhaustive()
    }
}

type Task = Box<dyn FnOnce() + Send>;

/// Runs plans; shares its cache and pool across jobs.
pub struct Executor {
    env: Arc<NodeEnv>,
    cache: OutputCache,
    workers: usize,
    pool: Option<Sender<Task>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("workers", &self.workers)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// A finished step as reported back to the coordinating thread.
struct Completion {
    step: usize,
    key: u64,
    result: Result<Outputs, Failure>,
    duration: Duration,
    cached: bool,
}

enum Failure {
    Error(NodeError),
    Panic(String),
}

impl Executor {
    /// Starts the pool threads.
    pub fn new(env: Arc<NodeEnv>, config: ExecutorConfig) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<Task>(config.workers.max(1) * 2);
        let threads = (0..config.workers)
            .map(|i| {
                let rx: Receiver<Task> = rx.clone();
                std::thread::Builder::new()
                    .name(format!("sakuga-node-{i}"))
                    .spawn(move || node_worker(rx))
                    .expect("spawning a node worker thread")
            })
            .collect();
        Self {
            env,
            cache: OutputCache::new(config.cache),
            workers: config.workers,
            pool: Some(tx),
            threads,
        }
    }

    /// The environment nodes see.
    pub fn env(&self) -> &Arc<NodeEnv> {
        &self.env
    }

    /// The output cache.
    pub fn cache(&self) -> &OutputCache {
        &self.cache
    }

    /// Runs `plan` to completion on the calling thread plus the pool.
    ///
    /// # Errors
    /// The first node error or panic (naming the node), or cancellation.
    pub fn run(&self, plan: &ExecutionPlan, job: &JobRun) -> Result<JobReport, SchedulerError> {
        let started = Instant::now();
        let mut state = JobState::new(plan);
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Completion>();
        let mut in_flight = 0usize;
        let mut failure: Option<SchedulerError> = None;

        while state.finished < state.expected {
            if failure.is_none() && job.cancel.is_cancelled() {
                failure = Some(SchedulerError::Cancelled {
                    node_id: None,
                    elapsed: started.elapsed(),
                });
            }
            if failure.is_some() {
                // Let running branches finish (they hold no lock and own their inputs);
                // start nothing new.
                if in_flight == 0 {
                    break;
                }
                let _ = done_rx.recv();
                in_flight -= 1;
                continue;
            }

            if let Err(e) = self.hand_out_surplus(plan, &mut state, job, &done_tx, &mut in_flight) {
                failure = Some(e);
                continue;
            }

            let completion = if let Some(step) = state.ready.pop_front() {
                match self.resolve_lazy(plan, step, &mut state) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        failure = Some(e);
                        continue;
                    }
                }
                match self.prepare(plan, step, &state, job) {
                    Prepared::Cached(c) => c,
                    Prepared::Run(task) => task.run(),
                    Prepared::Failed(e) => {
                        failure = Some(e);
                        continue;
                    }
                }
            } else {
                assert!(
                    in_flight > 0,
                    "execution plan stalled: no step ready or running"
                );
                in_flight -= 1;
                done_rx.recv().expect("the sender is held here")
            };
            if let Err(e) = self.complete(plan, completion, &mut state, job) {
                failure = Some(e);
                continue;
            }
            while let Ok(c) = done_rx.try_recv() {
                in_flight -= 1;
                if let Err(e) = self.complete(plan, c, &mut state, job) {
                    failure.get_or_insert(e);
                }
            }
        }
        let mut report = state.report;
        report.elapsed = started.elapsed();
        match failure {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Surplus ready steps go to the node pool; the calling thread keeps one.
    fn hand_out_surplus(
        &self,
        plan: &ExecutionPlan,
        state: &mut JobState,
        job: &JobRun,
        done_tx: &crossbeam_channel::Sender<Completion>,
        in_flight: &mut usize,
    ) -> Result<(), SchedulerError> {
        while state.ready.len() > 1 && *in_flight < self.workers {
            let step = state.ready.pop_back().expect("len > 1");
            if !self.resolve_lazy(plan, step, state)? {
                continue;
            }
            match self.prepare(plan, step, state, job) {
                Prepared::Cached(c) => self.complete(plan, c, state, job)?,
                Prepared::Run(task) => {
                    let tx = done_tx.clone();
                    let pool = self
                        .pool
                        .as_ref()
                        .expect("pool lives as long as the executor");
                    pool.send(Box::new(move || {
                        let _ = tx.send(task.run());
                    }))
                    .expect("node workers live as long as the executor");
                    *in_flight += 1;
                }
                Prepared::Failed(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Before a step with lazy inputs first runs: asks the node which it needs and starts
    /// their sources. `Ok(false)` when the step must wait for them (it becomes ready again
    /// once they finish).
    fn resolve_lazy(
        &self,
        plan: &ExecutionPlan,
        step: usize,
        state: &mut JobState,
    ) -> Result<bool, SchedulerError> {
        let s = &plan.steps[step];
        if state.lazy_resolved[step] || !s.lazy.contains(&true) {
            return Ok(true);
        }
        state.lazy_resolved[step] = true;
        let mut bound = Inputs::new();
        for (name, value) in &s.literals {
            bound.insert(name.clone(), value.clone());
        }
        for (name, source, output) in &s.links {
            if let Some(value) = state.outputs[*source].as_ref().and_then(|o| o.get(*output)) {
                bound.insert(name.clone(), value.clone());
            }
        }
        let needed =
            s.node
                .lazy_inputs_needed(&bound)
                .map_err(|source| SchedulerError::NodeFailed {
                    node_id: s.id.to_string(),
                    class_type: s.class_type.to_string(),
                    source: Box::new(source),
                })?;
        for (l, (name, source, _)) in s.links.iter().enumerate() {
            if s.lazy[l] && needed.contains(&&**name) && !state.done[*source] {
                state.counted[step][l] = true;
                state.waiting[step] += 1;
                activate(plan, *source, state);
            }
        }
        Ok(state.waiting[step] == 0)
    }

    /// Gathers a step's inputs and either finds its outputs in the cache or packages the
    /// run as a task.
    fn prepare(
        &self,
        plan: &ExecutionPlan,
        step: usize,
        state: &JobState,
        job: &JobRun,
    ) -> Prepared {
        let s = &plan.steps[step];
        let mut inputs = Inputs::new();
        for (name, value) in &s.literals {
            inputs.insert(name.clone(), value.clone());
        }
        let mut hasher = std::hash::DefaultHasher::new();
        s.static_key.hash(&mut hasher);
        for (l, (name, source, output)) in s.links.iter().enumerate() {
            let value = state.outputs[*source]
                .as_ref()
                .and_then(|o| o.get(*output))
                .cloned();
            let Some(value) = value else {
                assert!(s.lazy[l], "a step runs only after its eager sources");
                continue;
            };
            inputs.insert(name.clone(), value);
            (name, state.keys[*source], output).hash(&mut hasher);
        }
        let cacheable = s.node.cacheable() && !s.always_runs;
        if cacheable {
            match s.node.cache_salt(&self.env, &inputs) {
                Ok(salt) => salt.hash(&mut hasher),
                Err(source) => {
                    return Prepared::Failed(SchedulerError::NodeFailed {
                        node_id: s.id.to_string(),
                        class_type: s.class_type.to_string(),
                        source: Box::new(source),
                    });
                }
            }
        }
        let key = hasher.finish();
        if cacheable && let Some(hit) = self.cache.get(key) {
            return Prepared::Cached(Completion {
                step,
                key,
                result: Ok(hit),
                duration: Duration::ZERO,
                cached: true,
            });
        }
        job.observer
            .node_started(&s.id, s.class_type, s.node.schema().roles);
        Prepared::Run(StepTask {
            step,
            key,
            node: s.node.clone(),
            node_id: s.id.clone(),
            class_type: s.class_type,
            inputs,
            env: self.env.clone(),
            job: job.clone(),
            workflow: plan.source.clone(),
        })
    }

    /// Records a finished step: stores outputs, releases inputs nobody else needs, marks
    /// dependents ready.
    fn complete(
        &self,
        plan: &ExecutionPlan,
        c: Completion,
        state: &mut JobState,
        job: &JobRun,
    ) -> Result<(), SchedulerError> {
        let s = &plan.steps[c.step];
        let values = match c.result {
            Ok(values) => values,
            Err(Failure::Error(NodeError::Cancelled)) => {
                return Err(SchedulerError::Cancelled {
                    node_id: Some(s.id.to_string()),
                    elapsed: c.duration,
                });
            }
            Err(Failure::Error(source)) => {
                return Err(SchedulerError::NodeFailed {
                    node_id: s.id.to_string(),
                    class_type: s.class_type.to_string(),
                    source: Box::new(source),
                });
            }
            Err(Failure::Panic(message)) => {
                return Err(SchedulerError::NodePanicked {
                    node_id: s.id.to_string(),
                    class_type: s.class_type.to_string(),
                    message,
                });
            }
        };
        let expected = s.node.schema().outputs.len();
        if values.len() != expected {
            return Err(SchedulerError::NodeFailed {
                node_id: s.id.to_string(),
                class_type: s.class_type.to_string(),
                source: Box::new(NodeError::InvalidInput(format!(
                    "node returned {} outputs, its schema declares {expected}",
                    values.len()
                ))),
            });
        }
        if !c.cached && s.node.cacheable() {
            self.cache.insert(c.key, values.clone());
        }
        state.keys[c.step] = c.key;
        if !s.dependents.is_empty() {
            state.outputs[c.step] = Some(values);
        }
        state.done[c.step] = true;
        release_dependents(plan, c.step, state);
        for (_, source, _) in &s.links {
            state.consumers[*source] -= 1;
            if state.consumers[*source] == 0 {
                state.outputs[*source] = None;
            }
        }
        let run = NodeRun {
            node_id: s.id.clone(),
            class_type: s.class_type,
            roles: s.node.schema().roles,
            duration: c.duration,
            cached: c.cached,
        };
        job.observer.node_finished(&run);
        state.report.runs.push(run);
        state.finished += 1;
        Ok(())
    }
}

/// Counts `step` as done for every step waiting on it, and queues those left waiting on
/// nothing.
fn release_dependents(plan: &ExecutionPlan, step: usize, state: &mut JobState) {
    let mut dependents = plan.steps[step].dependents.clone();
    dependents.sort_unstable();
    dependents.dedup();
    for d in dependents {
        for (l, (_, source, _)) in plan.steps[d].links.iter().enumerate() {
            if *source == step && std::mem::take(&mut state.counted[d][l]) {
                state.waiting[d] -= 1;
                if state.waiting[d] == 0 {
                    state.ready.push_back(d);
                }
            }
        }
    }
}

/// Puts a step that has not run yet on the way: it and, through its eager links, the
/// steps it needs that are not on the way either.
fn activate(plan: &ExecutionPlan, step: usize, state: &mut JobState) {
    if state.active[step] {
        return;
    }
    state.active[step] = true;
    state.expected += 1;
    let s = &plan.steps[step];
    for (l, (_, source, _)) in s.links.iter().enumerate() {
        if !s.lazy[l] && !state.done[*source] {
            state.counted[step][l] = true;
            state.waiting[step] += 1;
            activate(plan, *source, state);
        }
    }
    if state.waiting[step] == 0 {
        state.ready.push_back(step);
    }
}

/// Per-job bookkeeping of the coordinating thread.
struct JobState {
    /// Unfinished inputs per step that it waits for.
    waiting: Vec<usize>,
    /// Per step and link: whether the step waits for that link's source.
    counted: Vec<Vec<bool>>,
    /// Steps that will run: the eager ones, and lazy sources once asked for.
    active: Vec<bool>,
    /// Steps whose lazy inputs were asked for already.
    lazy_resolved: Vec<bool>,
    done: Vec<bool>,
    /// Active steps: the job is over when this many have finished.
    expected: usize,
    /// Unfinished consumers per step; outputs are dropped at zero.
    consumers: Vec<usize>,
    outputs: Vec<Option<Outputs>>,
    keys: Vec<u64>,
    ready: VecDeque<usize>,
    finished: usize,
    report: JobReport,
}

impl JobState {
    fn new(plan: &ExecutionPlan) -> Self {
        let n = plan.len();
        let counted: Vec<Vec<bool>> = plan
            .steps
            .iter()
            .zip(&plan.eager)
            .map(|(s, &eager)| s.lazy.iter().map(|&lazy| eager && !lazy).collect())
            .collect();
        let waiting: Vec<usize> = counted
            .iter()
            .map(|c| c.iter().filter(|&&w| w).count())
            .collect();
        Self {
            ready: (0..n)
                .filter(|&i| plan.eager[i] && waiting[i] == 0)
                .collect(),
            waiting,
            counted,
            active: plan.eager.clone(),
            lazy_resolved: vec![false; n],
            done: vec![false; n],
            expected: plan.eager.iter().filter(|&&e| e).count(),
            consumers: plan.steps.iter().map(|s| s.dependents.len()).collect(),
            outputs: vec![None; n],
            keys: vec![0; n],
            finished: 0,
            report: JobReport {
                runs: Vec::with_capacity(n),
                elapsed: Duration::ZERO,
            },
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.pool.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

enum Prepared {
    Cached(Completion),
    Run(StepTask),
    Failed(SchedulerError),
}

/// Everything one step needs to run on any thread.
struct StepTask {
    step: usize,
    key: u64,
    node: Arc<dyn Node>,
    node_id: Arc<str>,
    class_type: &'static str,
    inputs: Inputs,
    env: Arc<NodeEnv>,
    job: JobRun,
    workflow: Arc<Json>,
}

impl StepTask {
    fn run(self) -> Completion {
        let span = sakuga_telemetry::node_span(&self.job.span, &self.node_id, self.class_type);
        let _entered = span.enter();
        let ctx = ExecContext {
            job_id: &self.job.job_id,
            node_id: &self.node_id,
            env: &self.env,
            sink: self.job.observer.as_ref(),
            cancel: &self.job.cancel,
            workflow: Some(&self.workflow),
            batch_limit: self.job.batch_limit,
        };
        let started = Instant::now();
        let result = match catch_unwind(AssertUnwindSafe(|| self.node.execute(&ctx, &self.inputs)))
        {
            Ok(Ok(values)) => Ok(Outputs::from(values)),
            Ok(Err(e)) => Err(Failure::Error(e)),
            Err(payload) => Err(Failure::Panic(panic_message(payload.as_ref()))),
        };
        Completion {
            step: self.step,
            key: self.key,
            result,
            duration: started.elapsed(),
            cached: false,
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".into())
}

fn node_worker(tasks: Receiver<Task>) {
    while let Ok(task) = tasks.recv() {
        task();
    }
}
