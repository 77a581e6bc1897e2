//! ComfyUI's graph utilities: primitive values (`PrimitiveInt`, `PrimitiveFloat`,
//! `PrimitiveBoolean`, `PrimitiveString`, `PrimitiveStringMultiline`, in
//! `comfy_extras/nodes_primitive.py`), `StringConcatenate` (`nodes_string.py`), the lazy
//! `ComfySwitchNode` and `PreviewAny`, with their class names, inputs and ranges, so
//! templates that wire values through them run here.

use std::sync::{Arc, LazyLock};

use crate::error::NodeError;
use crate::node::{ExecContext, Inputs, Node};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{InputSpec, NodeSchema};
use crate::value::Value;

/// Python's `sys.maxsize`, the bound ComfyUI gives its primitive numbers.
const PY_MAXSIZE: i64 = i64::MAX;

/// A node that hands its one `value` widget on as its output.
struct Primitive {
    schema: &'static LazyLock<NodeSchema>,
}

static PRIMITIVE_INT: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("PrimitiveInt", "Int", "utils/primitive")
        .input(InputSpec::int("value", 0, -PY_MAXSIZE, PY_MAXSIZE).control_after_generate())
        .output(PortType::Int)
});

static PRIMITIVE_FLOAT: LazyLock<NodeSchema> = LazyLock::new(|| {
    let bound = PY_MAXSIZE as f64;
    NodeSchema::new("PrimitiveFloat", "Float", "utils/primitive")
        .input(InputSpec::float("value", 0.0, -bound, bound, 0.1))
        .output(PortType::Float)
});

static PRIMITIVE_BOOLEAN: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("PrimitiveBoolean", "Boolean", "utils/primitive")
        .input(InputSpec::boolean("value", false))
        .output(PortType::Boolean)
});

static PRIMITIVE_STRING: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("PrimitiveString", "String", "utils/primitive")
        .input(InputSpec::string("value", "", false))
        .output(PortType::String)
});

static PRIMITIVE_STRING_MULTILINE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "PrimitiveStringMultiline",
        "String (Multiline)",
        "utils/primitive",
    )
    .input(InputSpec::string("value", "", true))
    .output(PortType::String)
});

impl Node for Primitive {
    fn schema(&self) -> &NodeSchema {
        self.schema
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let value = match self.schema.outputs[0].port {
            PortType::Int => Value::Int(inputs.int("value")?),
            PortType::Float => Value::Float(inputs.float("value")?),
            PortType::Boolean => Value::Boolean(inputs.boolean("value")?),
            _ => Value::String(Arc::from(inputs.str("value")?)),
        };
        Ok(vec![value])
    }
}

/// `string_a`, the delimiter, then `string_b`.
struct StringConcatenate;

static STRING_CONCATENATE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("StringConcatenate", "Concatenate", "utils/string")
        .input(InputSpec::string("string_a", "", true))
        .input(InputSpec::string("string_b", "", true))
        .input(InputSpec::string("delimiter", "", false))
        .output(PortType::String)
});

impl Node for StringConcatenate {
    fn schema(&self) -> &NodeSchema {
        &STRING_CONCATENATE
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let joined =
            [inputs.str("string_a")?, inputs.str("string_b")?].join(inputs.str("delimiter")?);
        Ok(vec![Value::String(Arc::from(joined))])
    }
}

pub(super) fn register(registry: &mut NodeRegistry) {
    for schema in [
        &PRIMITIVE_INT,
        &PRIMITIVE_FLOAT,
        &PRIMITIVE_BOOLEAN,
        &PRIMITIVE_STRING,
        &PRIMITIVE_STRING_MULTILINE,
    ] {
        registry.register(Primitive { schema });
    }
    registry.register(StringConcatenate);
    registry.register(Switch);
    registry.register(PreviewAny);
}

/// Passes on `on_true` or `on_false`; only the branch taken is evaluated.
struct Switch;

static SWITCH: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("ComfySwitchNode", "Switch", "logic")
        .input(InputSpec::boolean("switch", false))
        .input(InputSpec::match_type("on_false", "switch").lazy())
        .input(InputSpec::match_type("on_true", "switch").lazy())
        .named_output("output", PortType::MatchType)
});

impl Switch {
    fn branch(inputs: &Inputs) -> Result<&'static str, NodeError> {
        Ok(if inputs.boolean("switch")? {
            "on_true"
        } else {
            "on_false"
        })
    }
}

impl Node for Switch {
    fn schema(&self) -> &NodeSchema {
        &SWITCH
    }

    fn lazy_inputs_needed(&self, inputs: &Inputs) -> Result<Vec<&'static str>, NodeError> {
        Ok(vec![Self::branch(inputs)?])
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let branch = Self::branch(inputs)?;
        let value = inputs
            .get(branch)
            .cloned()
            .ok_or_else(|| NodeError::MissingInput {
                name: branch.to_string(),
            })?;
        Ok(vec![value])
    }
}

/// Shows any value as text (in the job's log and events).
struct PreviewAny;

static PREVIEW_ANY: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("PreviewAny", "Preview as Text", "utils")
        .input(InputSpec::link("source", PortType::Any))
        .named_output("STRING", PortType::String)
        .output_node()
});

impl Node for PreviewAny {
    fn schema(&self) -> &NodeSchema {
        &PREVIEW_ANY
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let text = preview_text(inputs.required("source")?);
        tracing::info!(job_id = ctx.job_id, node_id = ctx.node_id, preview = %text, "preview");
        ctx.sink.text(ctx.node_id, &text);
        // Newer ComfyUI passes the text on, so previews can chain.
        Ok(vec![Value::String(text.into())])
    }
}

/// What `PreviewAny` shows: the value itself for primitives, the type and shape otherwise.
fn preview_text(value: &Value) -> String {
    match value {
        Value::Int(v) => v.to_string(),
        Value::Float(v) => v.to_string(),
        Value::String(v) => v.to_string(),
        Value::Boolean(v) => v.to_string(),
        Value::Image(t) | Value::Mask(t) => format!("{} {:?}", value.type_name(), t.dims()),
        Value::Object(_) => value.type_name().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rig;

    #[test]
    fn primitives_hand_their_value_on_and_strings_concatenate() {
        let rig = Rig::new(|_| {});
        let int = Primitive {
            schema: &PRIMITIVE_INT,
        };
        let out = rig.run(&int, &[("value", Value::Int(-7))]).unwrap();
        assert!(matches!(out[0], Value::Int(-7)));
        let text = Primitive {
            schema: &PRIMITIVE_STRING_MULTILINE,
        };
        let out = rig
            .run(&text, &[("value", Value::String("a\nb".into()))])
            .unwrap();
        assert!(matches!(&out[0], Value::String(s) if &**s == "a\nb"));
        let joined = rig
            .run(
                &StringConcatenate,
                &[
                    ("string_a", Value::String("masterpiece".into())),
                    ("string_b", Value::String("1girl".into())),
                    ("delimiter", Value::String(", ".into())),
                ],
            )
            .unwrap();
        assert!(matches!(&joined[0], Value::String(s) if &**s == "masterpiece, 1girl"));
    }
}
