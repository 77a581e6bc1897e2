//! ComfyUI's UI (LiteGraph) workflow format, the file the web UI saves and exports, turned
//! into the API format the rest of the crate reads, the way ComfyUI's frontend does when it
//! queues a prompt (`graphToPrompt`):
//!
//! - widget values go to the class's widget inputs in catalogue order (required, then
//!   optional); the `control_after_generate` value the UI keeps after a `seed` or
//!   `noise_seed` widget is skipped;
//! - links (`[id, from, from_slot, to, to_slot, type]`, or objects in subgraphs) become
//!   `["<from>", slot]`; a widget converted to a socket takes its link;
//! - Reroute is followed through, a PrimitiveNode gives its value, notes are dropped;
//! - muted (mode 2) and bypassed (mode 4) nodes are left out; a consumer of a bypassed node
//!   takes the bypassed node's input of the same type (the same slot first), and an input
//!   fed only by a left-out node is dropped, as ComfyUI drops it;
//! - subgraphs (`definitions.subgraphs`) are expanded with ids `"<instance>:<inner>"`.
//!
//! Conversion problems name the UI node: `node 7 'Load Checkpoint' (CheckpointLoaderSimple):
//! ...`. Everything else (missing inputs, ranges, cycles) is left to validation, which
//! reports it in ComfyUI's vocabulary against the converted ids.

use std::collections::HashMap;
use std::fmt;

use sakuga_nodes::NodeRegistry;
use sakuga_nodes::schema::{InputKind, NodeSchema};
use serde_json::{Map, Value as Json, json};

use crate::error::SchedulerError;

/// Links followed for one input (through reroutes, bypasses and subgraph borders) before
/// the chain is taken for a loop.
const MAX_HOPS: usize = 1024;
/// Subgraphs nested deeper than this are taken for a subgraph that contains itself.
const MAX_DEPTH: usize = 32;
/// What the UI stores after a seed widget; not an input of the node.
const SEED_CONTROLS: &[&str] = &["fixed", "increment", "decrement", "randomize"];
/// UI-only node types with nothing to run.
const NOTES: &[&str] = &["Note", "MarkdownNote"];
/// Subgraph input and output pseudo-nodes, as link ends inside a subgraph.
const SUBGRAPH_INPUT: &str = "-10";
const SUBGRAPH_OUTPUT: &str = "-20";

/// Why a UI node could not be converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UiProblem {
    /// The type is neither a registered class nor a subgraph nor a UI-only node.
    UnknownType,
    /// An input names a link id the graph's `links` do not hold.
    MissingLink { input: String, link: i64 },
    /// A link starts at a node the graph does not hold.
    MissingSource {
        input: String,
        link: i64,
        source: String,
    },
    /// Following an input went round in circles (reroutes or bypasses in a loop).
    LinkLoop { input: String },
    /// Subgraphs nest past [`MAX_DEPTH`] (one contains itself).
    NestedTooDeep,
    /// The node is not an object with an id and a type.
    Malformed(String),
}

impl fmt::Display for UiProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UiProblem::UnknownType => write!(f, "unknown node type"),
            UiProblem::MissingLink { input, link } => {
                write!(
                    f,
                    "input {input} uses link {link}, which is not in the links"
                )
            }
            UiProblem::MissingSource {
                input,
                link,
                source,
            } => write!(
                f,
                "input {input}: link {link} comes from node {source}, which is not in the graph"
            ),
            UiProblem::LinkLoop { input } => write!(
                f,
                "input {input}: its link goes round in a loop of reroutes or bypassed nodes"
            ),
            UiProblem::NestedTooDeep => {
                write!(
                    f,
                    "subgraphs nest deeper than {MAX_DEPTH} (one contains itself)"
                )
            }
            UiProblem::Malformed(what) => write!(f, "{what}"),
        }
    }
}

/// Whether `json` is a UI-format workflow (an object with a `nodes` array) rather than
/// API format (an object of nodes keyed by id).
pub fn is_ui_format(json: &Json) -> bool {
    json.get("nodes").is_some_and(Json::is_array)
}

/// Returns API-format JSON for any workflow: UI format converted with the node catalogue,
/// a `{"workflow": <UI>}` wrapper (ComfyUI's `extra_pnginfo`) unwrapped first, and
/// anything else (API format, a `POST /prompt` body, or not a workflow at all) unchanged
/// for the parser to judge.
///
/// # Errors
/// [`SchedulerError::UiNode`] naming the UI node that cannot be converted, or
/// [`SchedulerError::UiFormat`] when the graph's own structure is broken.
pub fn to_api_format(json: Json, registry: &NodeRegistry) -> Result<Json, SchedulerError> {
    let json = match json {
        Json::Object(mut top)
            if !top.contains_key("prompt")
                && top.get("workflow").is_some_and(is_ui_format)
                && !top.get("nodes").is_some_and(Json::is_array) =>
        {
            top.remove("workflow").unwrap_or_default()
        }
        other => other,
    };
    if !is_ui_format(&json) {
        return Ok(json);
    }
    let root = Graph::parse(&json, "the workflow")?;
    let mut subgraphs = HashMap::new();
    if let Some(defs) = json
        .pointer("/definitions/subgraphs")
        .and_then(Json::as_array)
    {
        for def in defs {
            let id = def.get("id").and_then(Json::as_str).ok_or_else(|| {
                ui_format_error("a subgraph definition has no string id".to_string())
            })?;
            subgraphs.insert(id, Graph::parse(def, &format!("subgraph {id}"))?);
        }
    }
    let converter = Converter {
        registry,
        subgraphs,
    };
    let mut out = Map::new();
    let frame = Frame {
        graph: &root,
        prefix: String::new(),
        instance: None,
    };
    converter.emit_graph(&[frame], &mut out)?;
    Ok(Json::Object(out))
}

fn ui_format_error(reason: String) -> SchedulerError {
    SchedulerError::UiFormat { reason }
}

/// One input socket of a UI node.
#[derive(Debug)]
struct UiInput {
    /// The input's name; for a widget converted to a socket, the widget's name.
    name: String,
    ty: String,
    link: Option<i64>,
    /// The socket stands for a widget (converted, or promoted on a subgraph).
    widget: bool,
}

#[derive(Debug)]
struct UiNode<'a> {
    id: String,
    ty: &'a str,
    mode: i64,
    title: Option<&'a str>,
    inputs: Vec<UiInput>,
    widgets: Option<&'a Json>,
}

impl UiNode<'_> {
    fn muted(&self) -> bool {
        self.mode == 2
    }

    fn bypassed(&self) -> bool {
        self.mode == 4
    }

    /// The value a widget socket holds on the node itself (a widget promoted to a subgraph
    /// instance): widget values follow the widget sockets in order, a seed's control value
    /// skipped.
    fn widget_socket_value(&self, slot: usize) -> Option<Json> {
        let values = match self.widgets? {
            Json::Object(values) => return values.get(&self.inputs[slot].name).cloned(),
            Json::Array(values) => values,
            _ => return None,
        };
        let mut values = values.iter().peekable();
        for (index, input) in self.inputs.iter().enumerate().filter(|(_, i)| i.widget) {
            let value = values.next()?;
            if index == slot {
                return Some(value.clone());
            }
            if input.ty == "INT"
                && is_seed(&input.name)
                && values.peek().is_some_and(|v| is_control(v))
            {
                values.next();
            }
        }
        None
    }
}

fn is_seed(name: &str) -> bool {
    matches!(name, "seed" | "noise_seed")
}

/// A seed's "control after generate" value: a mode name, or the boolean early frontends
/// saved for "randomize".
fn is_control(value: &Json) -> bool {
    value.is_boolean() || value.as_str().is_some_and(|v| SEED_CONTROLS.contains(&v))
}

#[derive(Debug, Clone, Copy)]
struct UiLink<'a> {
    origin: &'a Json,
    origin_slot: usize,
    target: &'a Json,
    target_slot: usize,
}

/// One graph: the root or a subgraph definition.
#[derive(Debug)]
struct Graph<'a> {
    nodes: Vec<UiNode<'a>>,
    by_id: HashMap<String, usize>,
    links: HashMap<i64, UiLink<'a>>,
    /// For a subgraph: the link feeding each of its outputs.
    outputs: HashMap<usize, i64>,
    /// For a subgraph: its inputs' names, by slot.
    input_names: Vec<String>,
}

fn id_text(id: &Json) -> Option<String> {
    match id {
        Json::Number(n) => Some(n.to_string()),
        Json::String(s) => Some(s.clone()),
        _ => None,
    }
}

impl<'a> Graph<'a> {
    fn parse(json: &'a Json, what: &str) -> Result<Self, SchedulerError> {
        let nodes = json
            .get("nodes")
            .and_then(Json::as_array)
            .ok_or_else(|| ui_format_error(format!("{what} has no nodes array")))?;
        let mut graph = Graph {
            nodes: Vec::with_capacity(nodes.len()),
            by_id: HashMap::with_capacity(nodes.len()),
            links: HashMap::new(),
            outputs: HashMap::new(),
            input_names: Vec::new(),
        };
        for (index, node) in nodes.iter().enumerate() {
            let node = parse_node(node).map_err(|e| {
                ui_format_error(format!("{what}: nodes[{index}] is not a node: {e}"))
            })?;
            graph.by_id.insert(node.id.clone(), graph.nodes.len());
            graph.nodes.push(node);
        }
        for link in json
            .get("links")
            .and_then(Json::as_array)
            .map_or(&[][..], Vec::as_slice)
        {
            let Some((id, link)) = parse_link(link) else {
                return Err(ui_format_error(format!("{what}: bad link {link}")));
            };
            if id_text(link.target).as_deref() == Some(SUBGRAPH_OUTPUT) {
                graph.outputs.insert(link.target_slot, id);
            }
            graph.links.insert(id, link);
        }
        graph.input_names = json
            .get("inputs")
            .and_then(Json::as_array)
            .map(|inputs| {
                inputs
                    .iter()
                    .map(|i| i.get("name").and_then(Json::as_str).unwrap_or("").into())
                    .collect()
            })
            .unwrap_or_default();
        Ok(graph)
    }
}

fn parse_node(node: &Json) -> Result<UiNode<'_>, &'static str> {
    let id = node.get("id").and_then(id_text).ok_or("no id")?;
    let ty = node
        .get("type")
        .and_then(Json::as_str)
        .ok_or("no string type")?;
    let inputs = node
        .get("inputs")
        .and_then(Json::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|input| {
            let widget = input.pointer("/widget/name").and_then(Json::as_str);
            UiInput {
                name: widget
                    .or_else(|| input.get("name").and_then(Json::as_str))
                    .unwrap_or("")
                    .to_string(),
                ty: input
                    .get("type")
                    .and_then(Json::as_str)
                    .unwrap_or("*")
                    .to_string(),
                link: input.get("link").and_then(Json::as_i64),
                widget: widget.is_some(),
            }
        })
        .collect();
    Ok(UiNode {
        id,
        ty,
        mode: node.get("mode").and_then(Json::as_i64).unwrap_or(0),
        title: node.get("title").and_then(Json::as_str),
        inputs,
        widgets: node.get("widgets_values").filter(|w| !w.is_null()),
    })
}

fn parse_link(link: &Json) -> Option<(i64, UiLink<'_>)> {
    let slot = |v: &Json| v.as_u64().map(|s| s as usize);
    match link {
        Json::Array(items) if items.len() >= 5 => Some((
            items[0].as_i64()?,
            UiLink {
                origin: &items[1],
                origin_slot: slot(&items[2])?,
                target: &items[3],
                target_slot: slot(&items[4])?,
            },
        )),
        Json::Object(fields) => Some((
            fields.get("id")?.as_i64()?,
            UiLink {
                origin: fields.get("origin_id")?,
                origin_slot: slot(fields.get("origin_slot")?)?,
                target: fields.get("target_id")?,
                target_slot: slot(fields.get("target_slot")?)?,
            },
        )),
        _ => None,
    }
}

/// Where one graph sits: its node ids' prefix and the subgraph instance it expands.
#[derive(Debug, Clone)]
struct Frame<'g, 'a> {
    graph: &'g Graph<'a>,
    prefix: String,
    instance: Option<&'g UiNode<'a>>,
}

/// What an input resolves to.
#[derive(Debug)]
enum Source {
    Link(String, usize),
    Literal(Json),
    /// Fed only by something left out (muted, bypassed without a match, unlinked).
    Nothing,
    /// A subgraph input its instance leaves empty: a widget promoted to the instance
    /// (`proxyWidgets`) whose value the inner node still holds.
    Unfed,
}

/// What a failed resolution lacks; the caller names the node it was resolving for.
type Resolved = Result<Source, UiProblem>;

struct Converter<'a> {
    registry: &'a NodeRegistry,
    subgraphs: HashMap<&'a str, Graph<'a>>,
}

impl<'a> Converter<'a> {
    fn emit_graph<'g>(
        &'g self,
        stack: &[Frame<'g, 'a>],
        out: &mut Map<String, Json>,
    ) -> Result<(), SchedulerError> {
        let frame = stack.last().expect("a frame");
        for node in &frame.graph.nodes {
            if node.muted() || node.bypassed() || is_virtual(node.ty) {
                continue;
            }
            if let Some(sub) = self.subgraphs.get(node.ty) {
                if stack.len() > MAX_DEPTH {
                    return Err(self.node_error(frame, node, UiProblem::NestedTooDeep));
                }
                let mut inner = stack.to_vec();
                inner.push(Frame {
                    graph: sub,
                    prefix: format!("{}{}:", frame.prefix, node.id),
                    instance: Some(node),
                });
                self.emit_graph(&inner, out)?;
                continue;
            }
            let Some(class) = self.registry.get(node.ty) else {
                return Err(self.node_error(frame, node, UiProblem::UnknownType));
            };
            let api = self
                .api_node(stack, node, class.schema())
                .map_err(|problem| self.node_error(frame, node, problem))?;
            out.insert(format!("{}{}", frame.prefix, node.id), api);
        }
        Ok(())
    }

    fn node_error(
        &self,
        frame: &Frame<'_, '_>,
        node: &UiNode<'_>,
        problem: UiProblem,
    ) -> SchedulerError {
        let title = node.title.map(str::to_string).unwrap_or_else(|| {
            self.registry
                .get(node.ty)
                .map_or(node.ty, |c| c.schema().display_name)
                .to_string()
        });
        SchedulerError::UiNode {
            node_id: format!("{}{}", frame.prefix, node.id),
            title,
            node_type: node.ty.to_string(),
            problem: Box::new(problem),
        }
    }

    /// The API-format node for a runnable UI node.
    fn api_node<'g>(
        &'g self,
        stack: &[Frame<'g, 'a>],
        node: &UiNode<'a>,
        schema: &NodeSchema,
    ) -> Result<Json, UiProblem> {
        let mut widgets = widget_values(node, schema);
        let mut inputs = Map::new();
        let mut linked = Vec::new();
        for spec in &schema.inputs {
            let linked_slot = node
                .inputs
                .iter()
                .position(|i| i.name == spec.name && i.link.is_some());
            let choice = spec
                .parent
                .and_then(|parent| inputs.get(parent))
                .and_then(Json::as_str);
            if linked_slot.is_none() && !schema.is_shown(spec, choice) {
                continue;
            }
            match linked_slot {
                Some(slot) => linked.push(slot),
                None => {
                    // A widget the saved node lacks holds its default, as the UI creates it.
                    if let Some(value) = widgets.remove(spec.name).or_else(|| widget_default(spec))
                    {
                        inputs.insert(spec.name.to_string(), value);
                    }
                }
            }
        }
        // Sockets the class does not declare are passed on for validation to judge.
        linked.extend(
            (0..node.inputs.len())
                .filter(|&s| node.inputs[s].link.is_some())
                .filter(|&s| schema.find_input(&node.inputs[s].name).is_none()),
        );
        for slot in linked {
            let input = &node.inputs[slot];
            let want = if input.ty == "*" {
                schema
                    .find_input(&input.name)
                    .map_or("*", |s| s.kind.port_type().as_str())
            } else {
                input.ty.as_str()
            };
            let mut walk = Walk {
                converter: self,
                want,
                hops: 0,
            };
            let source = walk
                .input(stack, node, slot)
                .map_err(|problem| match problem {
                    // Named after the input the loop was met from, not a reroute's socket.
                    UiProblem::LinkLoop { .. } => UiProblem::LinkLoop {
                        input: input.name.clone(),
                    },
                    other => other,
                })?;
            match source {
                Source::Link(id, out) => {
                    inputs.insert(input.name.clone(), json!([id, out]));
                }
                Source::Literal(value) => {
                    inputs.insert(input.name.clone(), value);
                }
                Source::Unfed => {
                    let name = schema.find_input(&input.name).map(|spec| spec.name);
                    let kept = name
                        .and_then(|n| widgets.remove(n))
                        .or_else(|| schema.find_input(&input.name).and_then(widget_default));
                    if let Some(value) = kept {
                        inputs.insert(input.name.clone(), value);
                    }
                }
                Source::Nothing => {}
            }
        }
        let title = node.title.unwrap_or(schema.display_name);
        Ok(json!({"inputs": inputs, "class_type": node.ty, "_meta": {"title": title}}))
    }
}

/// Resolving one input: the port type it wants, and the links followed so far.
struct Walk<'w, 'g, 'a> {
    converter: &'g Converter<'a>,
    want: &'w str,
    hops: usize,
}

impl<'g, 'a> Walk<'_, 'g, 'a> {
    /// What feeds input `slot` of `node` (in the innermost frame of `stack`).
    fn input(&mut self, stack: &[Frame<'g, 'a>], node: &UiNode<'a>, slot: usize) -> Resolved {
        let Some(input) = node.inputs.get(slot) else {
            return Ok(Source::Nothing);
        };
        let Some(link) = input.link else {
            // A promoted widget on a subgraph instance holds its value there.
            let is_instance = self.converter.subgraphs.contains_key(node.ty);
            return Ok(match node.widget_socket_value(slot) {
                Some(value) if is_instance && input.widget => Source::Literal(value),
                _ => Source::Nothing,
            });
        };
        self.hops += 1;
        if self.hops > MAX_HOPS {
            return Err(UiProblem::LinkLoop {
                input: input.name.clone(),
            });
        }
        let frame = stack.last().expect("a frame");
        let Some(found) = frame.graph.links.get(&link) else {
            return Err(UiProblem::MissingLink {
                input: input.name.clone(),
                link,
            });
        };
        let origin = id_text(found.origin).unwrap_or_default();
        if origin == SUBGRAPH_INPUT {
            return self.subgraph_input(stack, found.origin_slot);
        }
        let Some(&index) = frame.graph.by_id.get(&origin) else {
            return Err(UiProblem::MissingSource {
                input: input.name.clone(),
                link,
                source: origin,
            });
        };
        let source = &frame.graph.nodes[index];
        self.output(stack, source, found.origin_slot)
    }

    /// What output `slot` of `source` stands for, following what the UI does not run.
    fn output(&mut self, stack: &[Frame<'g, 'a>], source: &'g UiNode<'a>, slot: usize) -> Resolved {
        let frame = stack.last().expect("a frame");
        if source.muted() {
            return Ok(Source::Nothing);
        }
        if source.bypassed() {
            return self.bypass(stack, source, slot);
        }
        match source.ty {
            "Reroute" => return self.input(stack, source, 0),
            "PrimitiveNode" => {
                return Ok(match source.widgets {
                    Some(Json::Array(values)) if !values.is_empty() => {
                        Source::Literal(values[0].clone())
                    }
                    _ => Source::Nothing,
                });
            }
            ty if NOTES.contains(&ty) => return Ok(Source::Nothing),
            _ => {}
        }
        let Some(sub) = self.converter.subgraphs.get(source.ty) else {
            return Ok(Source::Link(format!("{}{}", frame.prefix, source.id), slot));
        };
        if stack.len() > MAX_DEPTH {
            return Err(UiProblem::NestedTooDeep);
        }
        let Some(&link) = sub.outputs.get(&slot) else {
            return Ok(Source::Nothing);
        };
        let mut inner = stack.to_vec();
        inner.push(Frame {
            graph: sub,
            prefix: format!("{}{}:", frame.prefix, source.id),
            instance: Some(source),
        });
        // The subgraph's output node is a consumer whose only input is that link.
        let output_end = UiNode {
            id: SUBGRAPH_OUTPUT.into(),
            ty: "Reroute",
            mode: 0,
            title: None,
            inputs: vec![UiInput {
                name: format!("output {slot}"),
                ty: self.want.into(),
                link: Some(link),
                widget: false,
            }],
            widgets: None,
        };
        self.input(&inner, &output_end, 0)
    }

    /// A bypassed node passes on its input of the wanted type, the same slot first.
    fn bypass(&mut self, stack: &[Frame<'g, 'a>], source: &'g UiNode<'a>, slot: usize) -> Resolved {
        let candidates = std::iter::once(slot).chain(0..source.inputs.len());
        for candidate in candidates {
            if source
                .inputs
                .get(candidate)
                .is_some_and(|i| i.ty == self.want)
            {
                return self.input(stack, source, candidate);
            }
        }
        Ok(Source::Nothing)
    }

    /// Inside a subgraph, its input `slot` is whatever feeds the instance's socket.
    fn subgraph_input(&mut self, stack: &[Frame<'g, 'a>], slot: usize) -> Resolved {
        let (frame, outer) = stack.split_last().expect("a frame");
        let (Some(instance), false) = (frame.instance, outer.is_empty()) else {
            return Ok(Source::Nothing);
        };
        let by_name = frame
            .graph
            .input_names
            .get(slot)
            .and_then(|name| instance.inputs.iter().position(|i| &i.name == name));
        let Some(socket) = by_name.or_else(|| {
            // Unnamed subgraph inputs line up with the instance's sockets.
            frame.graph.input_names.get(slot).is_none().then_some(slot)
        }) else {
            return Ok(Source::Unfed);
        };
        match self.input(outer, instance, socket)? {
            Source::Nothing
                if instance
                    .inputs
                    .get(socket)
                    .is_some_and(|i| i.link.is_none()) =>
            {
                Ok(Source::Unfed)
            }
            resolved => Ok(resolved),
        }
    }
}

/// Reroute, PrimitiveNode and notes exist only in the UI.
fn is_virtual(ty: &str) -> bool {
    matches!(ty, "Reroute" | "PrimitiveNode") || NOTES.contains(&ty)
}

/// The value a fresh widget for `spec` shows: its default, or a fixed list's first choice.
fn widget_default(spec: &sakuga_nodes::InputSpec) -> Option<Json> {
    match &spec.kind {
        InputKind::Int { default, .. } => Some(json!(default)),
        InputKind::Float { default, .. } => Some(json!(default)),
        InputKind::String { default, .. } => Some(json!(default)),
        InputKind::Boolean { default } => Some(json!(default)),
        InputKind::Combo { default, options } => match (default, options) {
            (Some(d), _) => Some(json!(d)),
            (None, sakuga_nodes::ComboOptions::Static(list)) => list.first().map(|c| json!(c)),
            _ => None,
        },
        InputKind::Link(_) => None,
    }
}

/// The node's widget values by input name: a list in the order the UI creates widgets
/// (required inputs, then optional, links excluded; a dynamic combo's shown inputs right
/// after it), or an object by name.
fn widget_values(node: &UiNode<'_>, schema: &NodeSchema) -> HashMap<&'static str, Json> {
    let mut named = HashMap::new();
    let Some(widgets) = node.widgets else {
        return named;
    };
    let is_widget = |i: &&sakuga_nodes::InputSpec| !matches!(i.kind, InputKind::Link(_));
    let top = schema.inputs.iter().filter(|i| i.parent.is_none());
    let order = top
        .clone()
        .filter(|i| i.required)
        .chain(top.filter(|i| !i.required))
        .filter(is_widget);
    match widgets {
        Json::Array(values) => {
            let mut values = values.iter().peekable();
            for spec in order {
                let Some(value) = values.next() else { break };
                named.insert(spec.name, value.clone());
                if spec.control_after_generate && values.peek().is_some_and(|v| is_control(v)) {
                    values.next();
                }
                let Some(choice) = value.as_str().filter(|_| !spec.dynamic.is_empty()) else {
                    continue;
                };
                for member in schema.shown_by(spec.name, choice).filter(is_widget) {
                    let Some(value) = values.next() else { break };
                    named.insert(member.name, value.clone());
                }
            }
        }
        Json::Object(values) => {
            for spec in schema.inputs.iter().filter(is_widget) {
                if let Some(value) = values.get(spec.name) {
                    named.insert(spec.name, value.clone());
                }
            }
        }
        _ => {}
    }
    named
}
