//! Validation of a parsed workflow against the node registry. Every problem is reported,
//! not only the first, in ComfyUI's vocabulary and `node_errors` shape, and nothing here
//! recurses, so graphs of any depth validate (ComfyUI's validator fails past ~985 nodes).
//!
//! Only nodes that an output node depends on are checked and run, as in ComfyUI; an
//! unknown `class_type` anywhere still fails the workflow.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use petgraph::algo::{kosaraju_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;
use serde_json::{Value as Json, json};

use sakuga_nodes::files::list_options;
use sakuga_nodes::{ComboOptions, InputKind, InputSpec, Node, NodeEnv, NodeRegistry, Value};

use crate::error::SchedulerError;
use crate::workflow::{RawInput, Workflow, WorkflowNode};

/// Longest piece of a client's own text (an id, a value, a file name) echoed back in a
/// problem; longer text is cut with its length noted, so a report stays small enough for
/// status trailers whatever the workflow holds.
pub const ECHO_LIMIT: usize = 160;

/// Most members of a cycle named in its message; the rest are counted.
const CYCLE_NAMES_SHOWN: usize = 8;

/// Most output nodes listed as depending on one failing node.
const DEPENDENTS_LISTED: usize = 32;

/// `text` cut to at most `limit` bytes (on a char boundary), noting the full length.
pub fn clip(text: &str, limit: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= limit {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}... ({} bytes)", &text[..end], text.len()))
}

fn echo(text: &str) -> std::borrow::Cow<'_, str> {
    clip(text, ECHO_LIMIT)
}

/// A received JSON value to echo: itself when short, else its clipped text.
fn echo_json(value: &Json) -> Json {
    match value {
        Json::String(s) => Json::String(echo(s).into_owned()),
        Json::Array(_) | Json::Object(_) => {
            let text = value.to_string();
            if text.len() <= ECHO_LIMIT {
                value.clone()
            } else {
                Json::String(echo(&text).into_owned())
            }
        }
        other => other.clone(),
    }
}

/// One problem, in ComfyUI's `{type, message, details, extra_info}` shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidationError {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub message: String,
    pub details: String,
    pub extra_info: Json,
}

/// The problems of one node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeErrors {
    pub errors: Vec<ValidationError>,
    /// Output nodes that depend on this node.
    pub dependent_outputs: Vec<String>,
    pub class_type: String,
}

/// Why a workflow was rejected: a top-level error and the problems per node id.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidationReport {
    pub error: ValidationError,
    pub node_errors: BTreeMap<String, NodeErrors>,
}

impl ValidationReport {
    /// One line: the top-level message and the number of problems.
    pub fn summary(&self) -> String {
        let count: usize = self.node_errors.values().map(|n| n.errors.len()).sum();
        format!(
            "{}: {count} problem(s) in {} node(s)",
            self.error.message,
            self.node_errors.len()
        )
    }

    /// Every problem as `node <id> (<class>): <type>: <message> (<details>)`, one per line.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if self.node_errors.is_empty() {
            lines.push(format!("{}: {}", self.error.kind, self.error.message));
        }
        for (id, node) in &self.node_errors {
            for e in &node.errors {
                let details = if e.details.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", e.details)
                };
                lines.push(format!(
                    "node {id} ({}): {}: {}{details}",
                    node.class_type, e.kind, e.message
                ));
            }
        }
        lines
    }

    /// The JSON ComfyUI answers an invalid prompt with.
    pub fn to_json(&self) -> Json {
        serde_json::to_value(self).unwrap_or(Json::Null)
    }
}

/// A validated node: its class and bound inputs, in execution (topological) order.
#[derive(Clone)]
pub struct ValidNode {
    pub id: Arc<str>,
    pub class_type: &'static str,
    pub node: Arc<dyn Node>,
    /// Widget values, converted to the input's type.
    pub literals: Vec<(Arc<str>, Value)>,
    /// `(input name, position of the source in `nodes`, output index)`.
    pub links: Vec<(Arc<str>, usize, usize)>,
}

impl std::fmt::Debug for ValidNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValidNode")
            .field("id", &self.id)
            .field("class_type", &self.class_type)
            .field("links", &self.links)
            .finish_non_exhaustive()
    }
}

/// A workflow that passed validation: the nodes that run, in topological order.
#[derive(Debug, Clone)]
pub struct ValidWorkflow {
    pub nodes: Vec<ValidNode>,
    /// Positions of output nodes in `nodes`.
    pub outputs: Vec<usize>,
    /// The API-format prompt, embedded into saved images.
    pub source: Arc<Json>,
}

/// Validates `workflow`; combo choices backed by files are listed from `env`'s folders.
///
/// # Errors
/// [`SchedulerError::Invalid`] with every problem found.
pub fn validate(
    workflow: &Workflow,
    registry: &NodeRegistry,
    env: &NodeEnv,
) -> Result<ValidWorkflow, SchedulerError> {
    validate_with(workflow, registry, env, Roots::OutputNodes)
}

/// Which nodes a job must run: what its output nodes need (every workflow), or every node
/// as an output of its own (warmup jobs: a loader alone, which no output node consumes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Roots {
    #[default]
    OutputNodes,
    EveryNode,
}

/// [`validate`] with the job's roots chosen.
///
/// # Errors
/// [`SchedulerError::Invalid`] with every problem found.
pub fn validate_with(
    workflow: &Workflow,
    registry: &NodeRegistry,
    env: &NodeEnv,
    roots: Roots,
) -> Result<ValidWorkflow, SchedulerError> {
    let mut validator = Validator::new(workflow, registry, env);
    validator.roots = roots;
    validator.run()
}

struct Validator<'a> {
    workflow: &'a Workflow,
    registry: &'a NodeRegistry,
    env: &'a NodeEnv,
    classes: Vec<Option<&'a Arc<dyn Node>>>,
    errors: BTreeMap<usize, Vec<ValidationError>>,
    /// File-backed combo lists, read once per validation.
    listings: HashMap<String, Vec<String>>,
    roots: Roots,
}

impl<'a> Validator<'a> {
    fn new(workflow: &'a Workflow, registry: &'a NodeRegistry, env: &'a NodeEnv) -> Self {
        Self {
            workflow,
            registry,
            env,
            classes: Vec::new(),
            errors: BTreeMap::new(),
            listings: HashMap::new(),
            roots: Roots::OutputNodes,
        }
    }

    fn push(&mut self, node: usize, error: ValidationError) {
        self.errors.entry(node).or_default().push(error);
    }

    /// Nodes that are malformed, have no class, or name a class that is not registered.
    fn check_classes(&mut self) {
        let wf = self.workflow;
        for (i, node) in wf.nodes.iter().enumerate() {
            if let Some(reason) = &node.malformed {
                self.push(
                    i,
                    error(
                        "invalid_prompt",
                        "Malformed node",
                        reason.clone(),
                        json!({}),
                    ),
                );
            } else if node.class_type.is_none() {
                self.push(
                    i,
                    error(
                        "invalid_prompt",
                        "Node has no class_type",
                        format!("Node ID '#{}'", echo(&node.id)),
                        json!({"node_id": echo(&node.id)}),
                    ),
                );
            } else if self.classes[i].is_none() {
                let class = echo(node.class_type.as_deref().unwrap_or_default());
                let title = node.title.as_deref().map(echo);
                self.push(
                    i,
                    error(
                        "missing_node_type",
                        format!("Node '{class}' not found. Is it a sakuga node type? See `sakuga nodes`."),
                        format!("Node ID '#{}'", echo(&node.id)),
                        json!({"node_id": echo(&node.id), "class_type": class, "node_title": title}),
                    ),
                );
            }
        }
    }

    fn run(mut self) -> Result<ValidWorkflow, SchedulerError> {
        let wf = self.workflow;
        self.classes = wf
            .nodes
            .iter()
            .map(|n| n.class_type.as_deref().and_then(|c| self.registry.get(c)))
            .collect();
        self.check_classes();

        let every = self.roots == Roots::EveryNode;
        let outputs: Vec<usize> = (0..wf.len())
            .filter(|&i| self.classes[i].is_some_and(|c| every || c.schema().output_node))
            .collect();
        let needed = self.reachable_from(&outputs);
        for &i in &needed {
            if let Some(class) = self.classes[i] {
                self.check_inputs(i, class.clone());
            }
        }

        // Edges of the needed subgraph, source -> consumer.
        let mut graph: DiGraph<usize, ()> = DiGraph::with_capacity(needed.len(), needed.len());
        let mut graph_index = vec![NodeIndex::end(); wf.len()];
        for &i in &needed {
            graph_index[i] = graph.add_node(i);
        }
        for &i in &needed {
            for (_, input) in &wf.nodes[i].inputs {
                if let RawInput::Link { source, .. } = input
                    && let Some(s) = wf.position(source)
                    && graph_index[s] != NodeIndex::end()
                {
                    graph.add_edge(graph_index[s], graph_index[i], ());
                }
            }
        }
        let order = match toposort(&graph, None) {
            Ok(order) => order,
            Err(_) => {
                self.report_cycles(&graph);
                Vec::new()
            }
        };

        if outputs.is_empty() || !self.errors.is_empty() {
            return Err(SchedulerError::Invalid(Box::new(self.report(&outputs))));
        }
        Ok(self.compile(&order, &graph, &outputs))
    }

    /// Nodes that the given roots depend on through links (including the roots), found with
    /// an explicit stack.
    fn reachable_from(&self, roots: &[usize]) -> Vec<usize> {
        let wf = self.workflow;
        let mut seen = vec![false; wf.len()];
        let mut stack: Vec<usize> = roots.to_vec();
        let mut found = Vec::new();
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            found.push(i);
            for (_, input) in &wf.nodes[i].inputs {
                if let RawInput::Link { source, .. } = input
                    && let Some(s) = wf.position(source)
                    && !seen[s]
                {
                    stack.push(s);
                }
            }
        }
        found.sort_unstable();
        found
    }

    fn report_cycles(&mut self, graph: &DiGraph<usize, ()>) {
        for component in kosaraju_scc(graph) {
            let is_cycle =
                component.len() > 1 || graph.find_edge(component[0], component[0]).is_some();
            if !is_cycle {
                continue;
            }
            let mut members: Vec<usize> = component.iter().map(|&g| graph[g]).collect();
            members.sort_unstable();
            // Every member gets the message, so it names a few: naming all would make the
            // report quadratic in the cycle's length.
            let ids: Vec<String> = members
                .iter()
                .take(CYCLE_NAMES_SHOWN)
                .map(|&i| echo(&self.workflow.nodes[i].id).into_owned())
                .collect();
            let more = members.len().saturating_sub(CYCLE_NAMES_SHOWN);
            let details = if more == 0 {
                format!("cycle through nodes {}", ids.join(" -> "))
            } else {
                format!(
                    "cycle through nodes {} -> ... ({more} more)",
                    ids.join(" -> ")
                )
            };
            for &i in &members {
                self.push(
                    i,
                    error(
                        "dependency_cycle",
                        "Dependency cycle detected",
                        details.clone(),
                        json!({"cycle": ids, "cycle_length": members.len()}),
                    ),
                );
            }
        }
    }

    fn check_inputs(&mut self, i: usize, class: Arc<dyn Node>) {
        let wf = self.workflow;
        let node = &wf.nodes[i];
        let schema = class.schema();
        for spec in schema
            .inputs
            .iter()
            .filter(|spec| schema.is_shown(spec, dynamic_choice(node, spec)))
        {
            let given = node
                .inputs
                .iter()
                .find(|(n, _)| &**n == spec.name)
                .map(|(_, v)| v);
            match given {
                None if spec.required => self.push(
                    i,
                    error(
                        "required_input_missing",
                        "Required input is missing",
                        spec.name.to_string(),
                        json!({"input_name": spec.name}),
                    ),
                ),
                None => {}
                Some(RawInput::BadLink(raw)) => self.push(
                    i,
                    input_error(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        spec,
                        raw,
                    ),
                ),
                Some(RawInput::Link { source, output }) => {
                    self.check_link(i, spec, source, *output);
                }
                Some(RawInput::Literal(raw)) => {
                    if let Err(e) = self.convert_literal(spec, raw) {
                        self.push(i, e);
                    }
                }
            }
        }
    }

    fn check_link(&mut self, i: usize, spec: &InputSpec, source: &str, output: usize) {
        let raw = json!([source, output]);
        let Some(s) = self.workflow.position(source) else {
            self.push(
                i,
                ValidationError {
                    details: format!("{}: node '{}' does not exist", spec.name, echo(source)),
                    ..input_error("bad_linked_input", "Linked node does not exist", spec, &raw)
                },
            );
            return;
        };
        // An unknown source class is reported on the source itself.
        let Some(source_class) = self.classes[s] else {
            return;
        };
        let outputs = &source_class.schema().outputs;
        let Some(out) = outputs.get(output) else {
            self.push(
                i,
                ValidationError {
                    details: format!(
                        "{}: node '{}' ({}) has {} output(s), slot {output} requested",
                        spec.name,
                        echo(source),
                        source_class.schema().class_type,
                        outputs.len()
                    ),
                    ..input_error(
                        "bad_linked_input",
                        "Linked output slot does not exist",
                        spec,
                        &raw,
                    )
                },
            );
            return;
        };
        let expected = spec.kind.port_type();
        let allowed =
            spec.allowed.is_empty() || out.port.is_wildcard() || spec.allowed.contains(&out.port);
        if !out.port.feeds(expected) || !allowed {
            self.push(
                i,
                ValidationError {
                    details: format!(
                        "{}, received_type({}) mismatch input_type({})",
                        spec.name,
                        out.port,
                        match spec.allowed {
                            [] => expected.to_string(),
                            ports => ports
                                .iter()
                                .map(|p| p.as_str())
                                .collect::<Vec<_>>()
                                .join(","),
                        }
                    ),
                    ..input_error(
                        "return_type_mismatch",
                        "Return type mismatch between linked nodes",
                        spec,
                        &raw,
                    )
                },
            );
        }
    }

    // The error is this function's product, built once per bad input: no point boxing it.
    #[allow(clippy::result_large_err)]
    fn convert_literal(&mut self, spec: &InputSpec, raw: &Json) -> Result<Value, ValidationError> {
        let invalid = |type_name: &str| ValidationError {
            details: format!("{}, {}", spec.name, echo(&raw.to_string())),
            ..input_error(
                "invalid_input_type",
                &format!("Failed to convert an input value to a {type_name} value"),
                spec,
                raw,
            )
        };
        match &spec.kind {
            InputKind::Int { min, max, .. } => {
                let v = as_int(raw).ok_or_else(|| invalid("INT"))?;
                check_range(spec, raw, v, *min, *max)?;
                // In range, so it fits in 64 bits; a seed above i64::MAX keeps its bits
                // (see `InputSpec::seed`), everything else fits in i64 as is.
                let v = i64::try_from(v).unwrap_or(v as u64 as i64);
                Ok(Value::Int(v))
            }
            InputKind::Float { min, max, .. } => {
                let v = as_float(raw).ok_or_else(|| invalid("FLOAT"))?;
                check_range(spec, raw, v, *min, *max)?;
                Ok(Value::Float(v))
            }
            InputKind::String { .. } => match raw {
                Json::String(s) => Ok(Value::String(Arc::from(s.as_str()))),
                Json::Number(n) => Ok(Value::String(Arc::from(n.to_string().as_str()))),
                _ => Err(invalid("STRING")),
            },
            InputKind::Boolean { .. } => raw
                .as_bool()
                .map(Value::Boolean)
                .ok_or_else(|| invalid("BOOLEAN")),
            InputKind::Combo { options, .. } => {
                let text = match raw {
                    Json::String(s) => s.clone(),
                    Json::Number(n) => n.to_string(),
                    _ => return Err(invalid("COMBO")),
                };
                let allowed = self.combo_contains(options, &text);
                if allowed {
                    Ok(Value::String(Arc::from(text.as_str())))
                } else {
                    let choices = self.combo_choices(options);
                    let shown: Vec<_> = choices.iter().take(20).map(|c| echo(c)).collect();
                    Err(ValidationError {
                        details: format!(
                            "{}: '{}' not in {shown:?}{}",
                            spec.name,
                            echo(&text),
                            if choices.len() > 20 { " ..." } else { "" }
                        ),
                        ..input_error("value_not_in_list", "Value not in list", spec, raw)
                    })
                }
            }
            InputKind::Link(port) => Err(ValidationError {
                details: format!(
                    "{}: a {port} input takes a link [node_id, slot_index], got {}",
                    spec.name,
                    echo(&raw.to_string())
                ),
                ..input_error(
                    "invalid_input_type",
                    &format!("Failed to convert an input value to a {port} value"),
                    spec,
                    raw,
                )
            }),
        }
    }

    fn combo_choices(&mut self, options: &ComboOptions) -> Vec<String> {
        let key = format!("{options:?}");
        let env = self.env;
        self.listings
            .entry(key)
            .or_insert_with(|| list_options(env, options))
            .clone()
    }

    fn combo_contains(&mut self, options: &ComboOptions, value: &str) -> bool {
        match options {
            ComboOptions::Static(list) => list.contains(&value),
            _ => {
                let key = format!("{options:?}");
                let env = self.env;
                self.listings
                    .entry(key)
                    .or_insert_with(|| list_options(env, options))
                    .iter()
                    .any(|c| c == value)
            }
        }
    }

    fn report(&self, outputs: &[usize]) -> ValidationReport {
        let wf = self.workflow;
        let top = if outputs.is_empty() {
            error(
                "prompt_no_outputs",
                "Prompt has no outputs",
                String::new(),
                json!({}),
            )
        } else {
            error(
                "prompt_outputs_failed_validation",
                "Prompt outputs failed validation",
                String::new(),
                json!({}),
            )
        };
        // Which outputs depend on each failing node: one walk per output node.
        let mut dependents: HashMap<usize, Vec<String>> = HashMap::new();
        for &o in outputs {
            for n in self.reachable_from(&[o]) {
                if self.errors.contains_key(&n) {
                    let listed = dependents.entry(n).or_default();
                    // Many outputs over many failing nodes would list quadratically.
                    if listed.len() < DEPENDENTS_LISTED {
                        listed.push(echo(&wf.nodes[o].id).into_owned());
                    }
                }
            }
        }
        let node_errors = self
            .errors
            .iter()
            .map(|(&i, errors)| {
                let node = &wf.nodes[i];
                (
                    node.id.to_string(),
                    NodeErrors {
                        errors: errors.clone(),
                        dependent_outputs: dependents.remove(&i).unwrap_or_default(),
                        class_type: echo(node.class_type.as_deref().unwrap_or_default())
                            .into_owned(),
                    },
                )
            })
            .collect();
        ValidationReport {
            error: top,
            node_errors,
        }
    }

    fn compile(
        mut self,
        order: &[NodeIndex],
        graph: &DiGraph<usize, ()>,
        outputs: &[usize],
    ) -> ValidWorkflow {
        let wf = self.workflow;
        let mut position = vec![usize::MAX; wf.len()];
        for (p, &g) in order.iter().enumerate() {
            position[graph[g]] = p;
        }
        let mut nodes = Vec::with_capacity(order.len());
        for &g in order {
            let i = graph[g];
            let class = self.classes[i].expect("validated").clone();
            let schema = class.schema();
            let mut literals = Vec::new();
            let mut links = Vec::new();
            for (name, input) in &wf.nodes[i].inputs {
                // ComfyUI ignores inputs a class does not declare, or a choice hides.
                let Some(spec) = schema
                    .find_input(name)
                    .filter(|spec| schema.is_shown(spec, dynamic_choice(&wf.nodes[i], spec)))
                else {
                    continue;
                };
                match input {
                    RawInput::Link { source, output } => {
                        let s = wf.position(source).expect("validated");
                        links.push((spec_name(spec), position[s], *output));
                    }
                    RawInput::Literal(raw) => {
                        let value = self.convert_literal(spec, raw).expect("validated");
                        literals.push((spec_name(spec), value));
                    }
                    RawInput::BadLink(_) => unreachable!("validated"),
                }
            }
            nodes.push(ValidNode {
                id: wf.nodes[i].id.clone(),
                class_type: schema.class_type,
                node: class,
                literals,
                links,
            });
        }
        ValidWorkflow {
            nodes,
            outputs: outputs.iter().map(|&o| position[o]).collect(),
            source: wf.source.clone(),
        }
    }
}

/// What the dynamic combo that shows `spec` holds on this node, if it is a literal.
fn dynamic_choice<'n>(node: &'n WorkflowNode, spec: &InputSpec) -> Option<&'n str> {
    let parent = spec.parent?;
    node.inputs
        .iter()
        .find(|(name, _)| &**name == parent)
        .and_then(|(_, given)| match given {
            RawInput::Literal(Json::String(choice)) => Some(choice.as_str()),
            _ => None,
        })
}

fn spec_name(spec: &InputSpec) -> Arc<str> {
    Arc::from(spec.name)
}

fn error(
    kind: &'static str,
    message: impl Into<String>,
    details: String,
    extra_info: Json,
) -> ValidationError {
    ValidationError {
        kind,
        message: message.into(),
        details,
        extra_info,
    }
}

fn input_error(
    kind: &'static str,
    message: &str,
    spec: &InputSpec,
    received: &Json,
) -> ValidationError {
    ValidationError {
        kind,
        message: message.to_string(),
        details: spec.name.to_string(),
        extra_info: json!({
            "input_name": spec.name,
            "input_config": spec.kind.port_type().as_str(),
            "received_value": echo_json(received),
        }),
    }
}

#[allow(clippy::result_large_err)] // as for `convert_literal`
fn check_range<T: PartialOrd + std::fmt::Display>(
    spec: &InputSpec,
    raw: &Json,
    v: T,
    min: T,
    max: T,
) -> Result<(), ValidationError> {
    if v < min {
        return Err(ValidationError {
            details: spec.name.to_string(),
            ..input_error(
                "value_smaller_than_min",
                &format!("Value {} smaller than min of {min}", echo(&raw.to_string())),
                spec,
                raw,
            )
        });
    }
    if v > max {
        return Err(ValidationError {
            details: spec.name.to_string(),
            ..input_error(
                "value_bigger_than_max",
                &format!("Value {} bigger than max of {max}", echo(&raw.to_string())),
                spec,
                raw,
            )
        });
    }
    Ok(())
}

/// Integers as Python's `int()` takes them: integers, floats (truncated), numeric strings.
/// Wider than any bound (`i128`), so that a value past `u64::MAX` is out of range, as in
/// ComfyUI, rather than not an integer.
fn as_int(raw: &Json) -> Option<i128> {
    match raw {
        Json::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite() && f.abs() < 1.0e38)
                    .map(|f| f.trunc() as i128)
            }),
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Floats as Python's `float()` takes them: numbers and numeric strings, finite only.
fn as_float(raw: &Json) -> Option<f64> {
    match raw {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|f: &f64| f.is_finite())
}
