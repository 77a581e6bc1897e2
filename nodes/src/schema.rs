//! Node schemas: a node's inputs, outputs, defaults, ranges and choice lists, declared once
//! and read by both the validator and the `sakuga nodes` catalogue (ComfyUI's
//! `/object_info` shape).

use serde_json::{Map, Value as Json, json};

use sakuga_telemetry::{ModelKind, Stage};

use crate::port::PortType;
use crate::shape::{NodeCost, ShapeFn, ShapeInputs, passthrough_cost};

/// Where the choices of a combo input come from.
#[derive(Debug, Clone)]
pub enum ComboOptions {
    /// A fixed list (sampler names, resize methods).
    Static(&'static [&'static str]),
    /// Image files in the input dir, like ComfyUI's `input/` folder.
    InputFiles,
    /// Video files in the input dir (`LoadVideo`).
    InputVideos,
    /// Model files in a folder of the models dir (`checkpoints`, `loras`...).
    ModelFolder(&'static str),
}

/// What an input accepts: a widget literal with its constraints, or a link of a port type.
#[derive(Debug, Clone)]
pub enum InputKind {
    /// The bounds are wider than the value (`i128`) because ComfyUI's seeds go up to
    /// `u64::MAX` (see [`InputSpec::seed`]); every other integer fits in `i64`.
    Int {
        default: i64,
        min: i128,
        max: i128,
        step: i64,
    },
    Float {
        default: f64,
        min: f64,
        max: f64,
        step: f64,
    },
    String {
        default: &'static str,
        multiline: bool,
    },
    Boolean {
        default: bool,
    },
    Combo {
        options: ComboOptions,
        default: Option<&'static str>,
    },
    /// Only a link can feed it (IMAGE, MODEL, LATENT...).
    Link(PortType),
}

impl InputKind {
    /// The port type a link into this input must carry.
    pub fn port_type(&self) -> PortType {
        match self {
            InputKind::Int { .. } => PortType::Int,
            InputKind::Float { .. } => PortType::Float,
            InputKind::String { .. } => PortType::String,
            InputKind::Boolean { .. } => PortType::Boolean,
            InputKind::Combo { .. } => PortType::Combo,
            InputKind::Link(t) => *t,
        }
    }
}

/// One named input.
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub name: &'static str,
    pub kind: InputKind,
    pub required: bool,
    pub tooltip: &'static str,
    /// The UI keeps a "control after generate" value (fixed, randomize...) right after this
    /// widget's value in a UI-format workflow.
    pub control_after_generate: bool,
    /// Evaluated only when the node asks for it ([`crate::Node::lazy_inputs_needed`]), so
    /// a branch not taken does not run.
    pub lazy: bool,
    /// For [`PortType::MatchType`] inputs: the template id tying them to the outputs.
    pub match_template: Option<&'static str>,
    /// The port types a wildcard link may carry (`IMAGE,MASK`); empty: any.
    pub allowed: &'static [PortType],
    /// For a dynamic combo (ComfyUI's `DynamicCombo`): each choice with the inputs it
    /// shows, named relative to this input (`width` for `resize_type.width`).
    pub dynamic: &'static [DynamicOption],
    /// For an input a dynamic combo shows: that combo's name. The input's own name is
    /// `parent.member`, as ComfyUI names it in API-format prompts.
    pub parent: Option<&'static str>,
}

/// One choice of a dynamic combo and the inputs it shows, in the order the UI lays them out.
pub type DynamicOption = (&'static str, &'static [&'static str]);

impl InputSpec {
    fn new(name: &'static str, kind: InputKind) -> Self {
        Self {
            name,
            kind,
            required: true,
            tooltip: "",
            control_after_generate: false,
            lazy: false,
            match_template: None,
            allowed: &[],
            dynamic: &[],
            parent: None,
        }
    }

    /// A choice that shows its own inputs (ComfyUI's `DynamicCombo`): those inputs are
    /// declared on the schema with [`InputSpec::within`] and only count for their choice.
    pub fn dynamic_combo(name: &'static str, options: &'static [DynamicOption]) -> Self {
        let keys: Vec<&'static str> = options.iter().map(|(key, _)| *key).collect();
        let mut spec = Self::new(
            name,
            InputKind::Combo {
                options: ComboOptions::Static(keys.leak()),
                default: None,
            },
        );
        spec.dynamic = options;
        spec
    }

    /// Marks the input as one a dynamic combo shows; `self.name` is `parent.member`.
    pub fn within(mut self, parent: &'static str) -> Self {
        debug_assert!(
            self.name
                .strip_prefix(parent)
                .is_some_and(|rest| rest.starts_with('.')),
            "{} is not named under {parent}",
            self.name
        );
        self.parent = Some(parent);
        self
    }

    /// Restricts a wildcard link to these port types.
    pub fn allowing(mut self, ports: &'static [PortType]) -> Self {
        self.allowed = ports;
        self
    }

    /// The name the input has inside its dynamic combo's choice (`width`).
    pub fn member_name(&self) -> &'static str {
        match self.parent {
            Some(parent) => &self.name[parent.len() + 1..],
            None => self.name,
        }
    }

    /// An integer widget that moves in steps of `step` (sizes in multiples of 8).
    pub fn int_step(name: &'static str, default: i64, min: i64, max: i64, step: i64) -> Self {
        let mut spec = Self::int(name, default, min, max);
        spec.kind = InputKind::Int {
            default,
            min: min.into(),
            max: max.into(),
            step,
        };
        spec
    }

    /// A link of whatever type, passed on as that type; `template` ties the inputs and
    /// outputs that share it.
    pub fn match_type(name: &'static str, template: &'static str) -> Self {
        let mut input = Self::new(name, InputKind::Link(PortType::MatchType));
        input.match_template = Some(template);
        input
    }

    /// Evaluated only when the node asks for it.
    pub fn lazy(mut self) -> Self {
        self.lazy = true;
        self
    }

    /// A required link input of `port` type.
    pub fn link(name: &'static str, port: PortType) -> Self {
        Self::new(name, InputKind::Link(port))
    }

    /// A required integer widget.
    pub fn int(name: &'static str, default: i64, min: i64, max: i64) -> Self {
        Self::new(
            name,
            InputKind::Int {
                default,
                min: min.into(),
                max: max.into(),
                step: 1,
            },
        )
    }

    /// A required seed widget: 0 to `u64::MAX`, as ComfyUI's samplers declare it, so the
    /// web UI and scripts may send any seed ComfyUI takes. The value is kept as the
    /// seed's 64 bits in an `i64` (a seed above `i64::MAX` reads as negative): read it
    /// back with `as u64`, which gives the seed as sent.
    pub fn seed(name: &'static str) -> Self {
        Self::new(
            name,
            InputKind::Int {
                default: 0,
                min: 0,
                max: u64::MAX.into(),
                step: 1,
            },
        )
        .control_after_generate()
    }

    /// The UI offers "control after generate" for it (seeds, primitive ints).
    pub fn control_after_generate(mut self) -> Self {
        self.control_after_generate = true;
        self
    }

    /// A required float widget.
    pub fn float(name: &'static str, default: f64, min: f64, max: f64, step: f64) -> Self {
        Self::new(
            name,
            InputKind::Float {
                default,
                min,
                max,
                step,
            },
        )
    }

    /// A required string widget.
    pub fn string(name: &'static str, default: &'static str, multiline: bool) -> Self {
        Self::new(name, InputKind::String { default, multiline })
    }

    /// A required boolean widget.
    pub fn boolean(name: &'static str, default: bool) -> Self {
        Self::new(name, InputKind::Boolean { default })
    }

    /// A required choice from a fixed list; the first entry is the default.
    pub fn combo(name: &'static str, options: &'static [&'static str]) -> Self {
        Self::new(
            name,
            InputKind::Combo {
                options: ComboOptions::Static(options),
                default: options.first().copied(),
            },
        )
    }

    /// A required choice of a file (input image or model), listed at validation time.
    pub fn files(name: &'static str, options: ComboOptions) -> Self {
        Self::new(
            name,
            InputKind::Combo {
                options,
                default: None,
            },
        )
    }

    /// A combo whose default is not its first choice.
    pub fn default_choice(mut self, choice: &'static str) -> Self {
        if let InputKind::Combo { default, .. } = &mut self.kind {
            *default = Some(choice);
        }
        self
    }

    /// Marks the input optional.
    pub fn optional(mut self) -> Self {
        self.required = false;
        self
    }

    /// Attaches a tooltip for the catalogue.
    pub fn tooltip(mut self, tooltip: &'static str) -> Self {
        self.tooltip = tooltip;
        self
    }
}

/// One output slot.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    pub name: &'static str,
    pub port: PortType,
}

/// The models folder a loader reads, the input that names the file, and its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSlot {
    /// Folder under the models dir, as ComfyUI names it (`checkpoints`, `upscale_models`).
    pub folder: &'static str,
    /// The input holding the file name.
    pub input: &'static str,
    pub kind: ModelKind,
}

/// What degrading an animation for FPS may change on a node (DESIGN.md section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DegradeKnob {
    /// A source of key frames: its `batch_size` sets them, its `width`/`height` the
    /// preview resolution.
    KeyFrames,
    /// A sampler: its `steps` may be halved.
    Steps,
    /// An interpolator: its `multiplier` may double while the key frames halve.
    InterpolationMultiplier,
}

/// A feature flag that bypasses a node, passing its image input through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    Upscaler,
    Interpolator,
}

impl Feature {
    pub const ALL: [Feature; 2] = [Feature::Upscaler, Feature::Interpolator];
}

/// What the engine, signals, admission and warmup need to know about a node class, so
/// none of them matches class names.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeRoles {
    /// Pipeline stage of its duration and stage events.
    pub stage: Option<Stage>,
    /// Its end marks `inference_finished` (samplers, VAE decode).
    pub ends_inference: bool,
    /// A loader: what it loads and from where (warmup and model listings use it).
    pub loads: Option<ModelSlot>,
    /// Streams its images as frames (inputs `fps`, `pace`): a preview's stream node.
    pub streams: bool,
    /// Its presence makes a plan an animation.
    pub animation: bool,
    pub degrade: Option<DegradeKnob>,
    pub feature: Option<Feature>,
}

/// Everything the validator and the catalogue need to know about a node class.
#[derive(Debug, Clone)]
pub struct NodeSchema {
    pub class_type: &'static str,
    pub display_name: &'static str,
    pub category: &'static str,
    pub description: &'static str,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<OutputSpec>,
    /// Output nodes are the roots of execution: only what they depend on runs.
    pub output_node: bool,
    /// Output shapes, scratch memory and work from input shapes; `None` passes the largest
    /// linked image or latent through (see [`passthrough_cost`]).
    pub shape: Option<ShapeFn>,
    pub roles: NodeRoles,
}

impl NodeSchema {
    /// Starts a schema for `class_type`.
    pub fn new(
        class_type: &'static str,
        display_name: &'static str,
        category: &'static str,
    ) -> Self {
        Self {
            class_type,
            display_name,
            category,
            description: "",
            inputs: Vec::new(),
            outputs: Vec::new(),
            output_node: false,
            shape: None,
            roles: NodeRoles::default(),
        }
    }

    /// Puts the node in a pipeline stage.
    pub fn stage(mut self, stage: Stage) -> Self {
        self.roles.stage = Some(stage);
        self
    }

    /// Marks its end as the end of inference.
    pub fn ends_inference(mut self) -> Self {
        self.roles.ends_inference = true;
        self
    }

    /// Declares a loader of `kind` files from `folder`, named by `input` (stage: load).
    pub fn loads(mut self, folder: &'static str, input: &'static str, kind: ModelKind) -> Self {
        self.roles.loads = Some(ModelSlot {
            folder,
            input,
            kind,
        });
        self.stage(Stage::ModelLoad)
    }

    /// Declares a frame stream node (stage: deliver; makes the plan an animation).
    pub fn streams(mut self) -> Self {
        self.roles.streams = true;
        self.animation().stage(Stage::Deliver)
    }

    /// Makes any plan holding this node an animation.
    pub fn animation(mut self) -> Self {
        self.roles.animation = true;
        self
    }

    /// Declares what degrading for FPS may change on it.
    pub fn degrade(mut self, knob: DegradeKnob) -> Self {
        self.roles.degrade = Some(knob);
        self
    }

    /// Declares the feature flag that may bypass it.
    pub fn feature(mut self, feature: Feature) -> Self {
        self.roles.feature = Some(feature);
        self
    }

    /// Sets the description shown in the catalogue.
    pub fn description(mut self, description: &'static str) -> Self {
        self.description = description;
        self
    }

    /// Adds an input.
    pub fn input(mut self, input: InputSpec) -> Self {
        self.inputs.push(input);
        self
    }

    /// Adds an output named after its type, as most ComfyUI nodes do.
    pub fn output(self, port: PortType) -> Self {
        self.named_output(port.as_str(), port)
    }

    /// Adds an output with its own name.
    pub fn named_output(mut self, name: &'static str, port: PortType) -> Self {
        self.outputs.push(OutputSpec { name, port });
        self
    }

    /// Marks the node as an output node.
    pub fn output_node(mut self) -> Self {
        self.output_node = true;
        self
    }

    /// Declares the node's shape function, read by admission before the node runs.
    pub fn shapes(mut self, shape: ShapeFn) -> Self {
        self.shape = Some(shape);
        self
    }

    /// What the node will cost for these inputs, by its shape function.
    pub fn cost(&self, inputs: &ShapeInputs<'_>) -> NodeCost {
        match self.shape {
            Some(shape) => shape(inputs),
            None => {
                let ports: Vec<PortType> = self.outputs.iter().map(|o| o.port).collect();
                passthrough_cost(&ports, inputs)
            }
        }
    }

    /// Looks an input up by name.
    pub fn find_input(&self, name: &str) -> Option<&InputSpec> {
        self.inputs.iter().find(|i| i.name == name)
    }

    /// Whether `spec` counts when its dynamic combo (if any) holds `choice`: inputs outside
    /// a dynamic combo always count; an unknown choice shows nothing.
    pub fn is_shown(&self, spec: &InputSpec, choice: Option<&str>) -> bool {
        let Some(parent) = spec.parent else {
            return true;
        };
        let Some(choice) = choice else {
            return false;
        };
        self.shown_by(parent, choice)
            .any(|member| member.name == spec.name)
    }

    /// The inputs a dynamic combo shows for `choice`, in its layout order.
    pub fn shown_by<'s>(
        &'s self,
        combo: &str,
        choice: &str,
    ) -> impl Iterator<Item = &'s InputSpec> + 's {
        let members = self
            .find_input(combo)
            .and_then(|c| c.dynamic.iter().find(|(key, _)| *key == choice))
            .map_or(&[][..], |(_, members)| *members);
        let combo = combo.to_string();
        members
            .iter()
            .filter_map(move |member| self.member(&combo, member))
    }

    /// The input `member` of dynamic combo `combo` (`width` of `resize_type`).
    fn member(&self, combo: &str, member: &str) -> Option<&InputSpec> {
        self.inputs
            .iter()
            .find(|i| i.parent == Some(combo) && i.member_name() == member)
    }

    /// The `/object_info` entry for this class; `list` resolves file-backed combos.
    pub fn to_object_info(&self, list: &dyn Fn(&ComboOptions) -> Vec<String>) -> Json {
        let mut required = Map::new();
        let mut optional = Map::new();
        for input in self.inputs.iter().filter(|i| i.parent.is_none()) {
            let entry = match input.dynamic {
                [] => input_info(input, list),
                options => self.dynamic_info(input.name, options, list),
            };
            if input.required {
                required.insert(input.name.to_string(), entry);
            } else {
                optional.insert(input.name.to_string(), entry);
            }
        }
        let order = |req: bool| -> Vec<&str> {
            self.inputs
                .iter()
                .filter(|i| i.required == req && i.parent.is_none())
                .map(|i| i.name)
                .collect()
        };
        json!({
            "input": {"required": required, "optional": optional},
            "input_order": {"required": order(true), "optional": order(false)},
            "output": self.outputs.iter().map(|o| o.port.as_str()).collect::<Vec<_>>(),
            "output_is_list": self.outputs.iter().map(|_| false).collect::<Vec<_>>(),
            "output_name": self.outputs.iter().map(|o| o.name).collect::<Vec<_>>(),
            "name": self.class_type,
            "display_name": self.display_name,
            "description": self.description,
            "category": self.category,
            "output_node": self.output_node,
        })
    }

    /// `["COMFY_DYNAMICCOMBO_V3", {"options": [{"key", "inputs": {"required": ...}}]}]`.
    fn dynamic_info(
        &self,
        combo: &str,
        options: &[DynamicOption],
        list: &dyn Fn(&ComboOptions) -> Vec<String>,
    ) -> Json {
        let options: Vec<Json> = options
            .iter()
            .map(|(key, members)| {
                let mut inputs = Map::new();
                for member in *members {
                    if let Some(spec) = self.member(combo, member) {
                        inputs.insert(member.to_string(), input_info(spec, list));
                    }
                }
                json!({"key": key, "inputs": {"required": inputs}})
            })
            .collect();
        json!(["COMFY_DYNAMICCOMBO_V3", {"options": options}])
    }
}

fn input_info(input: &InputSpec, list: &dyn Fn(&ComboOptions) -> Vec<String>) -> Json {
    let mut extra = match &input.kind {
        InputKind::Int {
            default,
            min,
            max,
            step,
        } => json!({"default": default, "min": min, "max": max, "step": step}),
        InputKind::Float {
            default,
            min,
            max,
            step,
        } => json!({"default": default, "min": min, "max": max, "step": step}),
        InputKind::String { default, multiline } => {
            json!({"default": default, "multiline": multiline})
        }
        InputKind::Boolean { default } => json!({ "default": default }),
        InputKind::Combo { options, default } => {
            let choices = list(options);
            let mut extra = Map::new();
            if let Some(d) = default {
                extra.insert("default".into(), json!(d));
            }
            if !input.tooltip.is_empty() {
                extra.insert("tooltip".into(), json!(input.tooltip));
            }
            return json!([choices, extra]);
        }
        InputKind::Link(port) => {
            let mut extra = Map::new();
            if !input.tooltip.is_empty() {
                extra.insert("tooltip".into(), json!(input.tooltip));
            }
            if input.lazy {
                extra.insert("lazy".into(), json!(true));
            }
            let allowed = match input.allowed {
                [] => "*".to_string(),
                ports => ports
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            };
            let kind = if let Some(id) = input.match_template {
                extra.insert(
                    "template".into(),
                    json!({"template_id": id, "allowed_types": allowed}),
                );
                port.as_str().to_string()
            } else if input.allowed.is_empty() {
                port.as_str().to_string()
            } else {
                allowed
            };
            if extra.is_empty() {
                return json!([kind]);
            }
            return json!([kind, extra]);
        }
    };
    if !input.tooltip.is_empty() {
        extra["tooltip"] = json!(input.tooltip);
    }
    if input.control_after_generate {
        extra["control_after_generate"] = json!(true);
    }
    if input.lazy {
        extra["lazy"] = json!(true);
    }
    json!([input.kind.port_type().as_str(), extra])
}
