//! Execution plans: a validated workflow compiled into a flat, topologically ordered list of
//! steps with dependency counters, ready for the executor to signal dependents as steps
//! finish (no graph walking at run time).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde_json::Value as Json;

use sakuga_nodes::{Node, Value};

use crate::validate::ValidWorkflow;

/// One node of a plan.
#[derive(Clone)]
pub struct PlanStep {
    pub id: Arc<str>,
    pub class_type: &'static str,
    pub node: Arc<dyn Node>,
    pub literals: Vec<(Arc<str>, Value)>,
    /// `(input name, source step, output index)`.
    pub links: Vec<(Arc<str>, usize, usize)>,
    /// Per link: whether it feeds a lazy input, evaluated only when the node asks.
    pub lazy: Vec<bool>,
    /// Steps that consume this step's outputs, once per link.
    pub dependents: Vec<usize>,
    /// Hash of the class and literal inputs; the executor folds in the keys of the inputs.
    pub static_key: u64,
    /// A root of the job (an output node; with `Roots::EveryNode`, every node): it runs
    /// even when the output cache holds its outputs.
    pub always_runs: bool,
}

impl std::fmt::Debug for PlanStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanStep")
            .field("id", &self.id)
            .field("class_type", &self.class_type)
            .field("links", &self.links)
            .field("dependents", &self.dependents)
            .finish_non_exhaustive()
    }
}

/// A validated workflow compiled for execution.
#[derive(Debug, Clone)]
pub struct ExecutionPlan {
    pub steps: Vec<PlanStep>,
    /// Per step: whether it runs from the start. The others feed only lazy inputs (directly
    /// or through other such steps) and run when a node asks for them.
    pub eager: Vec<bool>,
    /// The API-format prompt, embedded into saved images.
    pub source: Arc<Json>,
}

impl ExecutionPlan {
    /// Compiles `workflow` into a plan.
    pub fn compile(workflow: ValidWorkflow) -> Self {
        let mut roots = vec![false; workflow.nodes.len()];
        for &i in &workflow.outputs {
            roots[i] = true;
        }
        let mut steps: Vec<PlanStep> = workflow
            .nodes
            .into_iter()
            .zip(roots)
            .map(|(n, always_runs)| {
                let static_key = static_key(n.class_type, &n.literals);
                let schema = n.node.schema();
                let lazy = n
                    .links
                    .iter()
                    .map(|(name, _, _)| schema.find_input(name).is_some_and(|i| i.lazy))
                    .collect();
                PlanStep {
                    lazy,
                    id: n.id,
                    class_type: n.class_type,
                    node: n.node,
                    literals: n.literals,
                    links: n.links,
                    dependents: Vec::new(),
                    static_key,
                    always_runs,
                }
            })
            .collect();
        for i in 0..steps.len() {
            for l in 0..steps[i].links.len() {
                let source = steps[i].links[l].1;
                steps[source].dependents.push(i);
            }
        }
        let eager = eager_steps(&steps);
        Self {
            steps,
            eager,
            source: workflow.source,
        }
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether the plan has no steps.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// The roots and everything they reach through links that are not lazy.
fn eager_steps(steps: &[PlanStep]) -> Vec<bool> {
    let mut eager: Vec<bool> = steps.iter().map(|s| s.always_runs).collect();
    let mut stack: Vec<usize> = (0..steps.len()).filter(|&i| eager[i]).collect();
    while let Some(i) = stack.pop() {
        for (l, (_, source, _)) in steps[i].links.iter().enumerate() {
            if !steps[i].lazy[l] && !eager[*source] {
                eager[*source] = true;
                stack.push(*source);
            }
        }
    }
    eager
}

fn static_key(class_type: &str, literals: &[(Arc<str>, Value)]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    class_type.hash(&mut hasher);
    let mut sorted: Vec<&(Arc<str>, Value)> = literals.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, value) in sorted {
        name.hash(&mut hasher);
        hash_literal(value, &mut hasher);
    }
    hasher.finish()
}

fn hash_literal(value: &Value, hasher: &mut impl Hasher) {
    match value {
        Value::Int(v) => (0u8, v).hash(hasher),
        Value::Float(v) => (1u8, v.to_bits()).hash(hasher),
        Value::String(v) => (2u8, v).hash(hasher),
        Value::Boolean(v) => (3u8, v).hash(hasher),
        // Literals are never tensors or objects; hash the variant for completeness.
        other => (4u8, other.type_name()).hash(hasher),
    }
}
