//! Parsing ComfyUI API-format workflows (`{"<id>": {"class_type", "inputs", "_meta"}}`),
//! bare or wrapped as the body of ComfyUI's `POST /prompt` (`{"prompt": {...}}`), into a
//! typed but not yet validated graph.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value as Json};

use crate::error::SchedulerError;

/// One input as written in the workflow.
#[derive(Debug, Clone, PartialEq)]
pub enum RawInput {
    /// `["<source id>", output_index]`.
    Link { source: Arc<str>, output: usize },
    /// A list that is not a well-formed link.
    BadLink(Json),
    /// A widget value.
    Literal(Json),
}

/// One node as written in the workflow.
#[derive(Debug, Clone)]
pub struct WorkflowNode {
    pub id: Arc<str>,
    /// `None` when the node has no string `class_type`.
    pub class_type: Option<String>,
    pub inputs: Vec<(Arc<str>, RawInput)>,
    /// `_meta.title`, for messages.
    pub title: Option<String>,
    /// Why the node itself is malformed (not an object, inputs not an object).
    pub malformed: Option<String>,
}

/// A parsed, unvalidated workflow.
#[derive(Debug, Clone)]
pub struct Workflow {
    pub nodes: Vec<WorkflowNode>,
    index: HashMap<Arc<str>, usize>,
    /// The API-format prompt as submitted, embedded into saved images.
    pub source: Arc<Json>,
}

impl Workflow {
    /// Parses workflow text.
    ///
    /// # Errors
    /// [`SchedulerError::Malformed`] when the text is not JSON or not an object of nodes.
    pub fn from_json_str(text: &str) -> Result<Self, SchedulerError> {
        let json: Json = serde_json::from_str(text).map_err(|e| SchedulerError::Malformed {
            reason: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(json)
    }

    /// Parses a workflow from JSON, unwrapping a `POST /prompt` body.
    ///
    /// # Errors
    /// [`SchedulerError::Malformed`] when it is not an object of nodes.
    pub fn from_json(json: Json) -> Result<Self, SchedulerError> {
        let Json::Object(mut top) = json else {
            return Err(SchedulerError::Malformed {
                reason: "a workflow must be a JSON object of nodes keyed by id".into(),
            });
        };
        let wrapped =
            matches!(top.get("prompt"), Some(Json::Object(p)) if !p.contains_key("class_type"));
        let prompt: Map<String, Json> = if wrapped {
            match top.remove("prompt") {
                Some(Json::Object(p)) => p,
                _ => unreachable!("checked above"),
            }
        } else {
            top
        };
        let mut nodes = Vec::with_capacity(prompt.len());
        let mut index = HashMap::with_capacity(prompt.len());
        for (id, body) in &prompt {
            let id: Arc<str> = Arc::from(id.as_str());
            index.insert(id.clone(), nodes.len());
            nodes.push(parse_node(id, body));
        }
        Ok(Self {
            nodes,
            index,
            source: Arc::new(Json::Object(prompt)),
        })
    }

    /// The position of node `id`.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the workflow has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

fn parse_node(id: Arc<str>, body: &Json) -> WorkflowNode {
    let mut node = WorkflowNode {
        id,
        class_type: None,
        inputs: Vec::new(),
        title: None,
        malformed: None,
    };
    let Json::Object(body) = body else {
        node.malformed = Some("a node must be an object with class_type and inputs".into());
        return node;
    };
    node.class_type = body
        .get("class_type")
        .and_then(Json::as_str)
        .map(str::to_string);
    node.title = body
        .get("_meta")
        .and_then(|m| m.get("title"))
        .and_then(Json::as_str)
        .map(str::to_string);
    match body.get("inputs") {
        None => {}
        Some(Json::Object(inputs)) => {
            node.inputs = inputs
                .iter()
                .map(|(name, value)| (Arc::from(name.as_str()), parse_input(value)))
                .collect();
        }
        Some(_) => node.malformed = Some("inputs must be an object".into()),
    }
    node
}

/// A list is a link, as in ComfyUI; it must be `[id, index]` with a string (or integer)
/// id and a non-negative integer index.
fn parse_input(value: &Json) -> RawInput {
    let Json::Array(items) = value else {
        return RawInput::Literal(value.clone());
    };
    let [source, output] = items.as_slice() else {
        return RawInput::BadLink(value.clone());
    };
    let source: Arc<str> = match source {
        Json::String(s) => Arc::from(s.as_str()),
        Json::Number(n) if n.is_u64() => Arc::from(n.to_string().as_str()),
        _ => return RawInput::BadLink(value.clone()),
    };
    match output.as_u64() {
        Some(output) => RawInput::Link {
            source,
            output: output as usize,
        },
        None => RawInput::BadLink(value.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unwraps_post_prompt_bodies() {
        let body =
            json!({"prompt": {"1": {"class_type": "EmptyImage", "inputs": {}}}, "client_id": "x"});
        let wf = Workflow::from_json(body).unwrap();
        assert_eq!(wf.len(), 1);
        assert_eq!(wf.nodes[0].class_type.as_deref(), Some("EmptyImage"));
    }

    #[test]
    fn classifies_links_and_literals() {
        assert_eq!(
            parse_input(&json!(["4", 1])),
            RawInput::Link {
                source: "4".into(),
                output: 1
            }
        );
        assert_eq!(
            parse_input(&json!([4, 0])),
            RawInput::Link {
                source: "4".into(),
                output: 0
            }
        );
        assert!(matches!(parse_input(&json!(["4"])), RawInput::BadLink(_)));
        assert!(matches!(
            parse_input(&json!(["4", -1])),
            RawInput::BadLink(_)
        ));
        assert!(matches!(parse_input(&json!(512)), RawInput::Literal(_)));
    }

    #[test]
    fn rejects_non_objects() {
        for text in ["[]", "42", "not json", "{\"a\": "] {
            assert!(matches!(
                Workflow::from_json_str(text),
                Err(SchedulerError::Malformed { .. })
            ));
        }
    }
}
