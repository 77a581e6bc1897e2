//! The registry of node classes by `class_type`. Crates above add their nodes with
//! [`NodeRegistry::register`]; the executor only ever looks classes up here.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value as Json};

use crate::files::list_options;
use crate::node::{Node, NodeEnv};

/// Node classes by name.
#[derive(Clone, Default)]
pub struct NodeRegistry {
    nodes: BTreeMap<&'static str, Arc<dyn Node>>,
}

impl NodeRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The registry with every built-in node.
    pub fn with_builtins() -> Self {
        let mut registry = Self::new();
        crate::builtin::register_all(&mut registry);
        registry
    }

    /// Adds a class, replacing one of the same name.
    pub fn register(&mut self, node: impl Node) {
        let node: Arc<dyn Node> = Arc::new(node);
        self.nodes.insert(node.schema().class_type, node);
    }

    /// The class named `class_type`.
    pub fn get(&self, class_type: &str) -> Option<&Arc<dyn Node>> {
        self.nodes.get(class_type)
    }

    /// Every class, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Node>> {
        self.nodes.values()
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the registry is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The catalogue as ComfyUI's `/object_info` returns it, with file choices listed from
    /// the environment's folders.
    pub fn object_info(&self, env: &NodeEnv) -> Json {
        let list = |options: &_| list_options(env, options);
        let mut out = Map::new();
        for (name, node) in &self.nodes {
            out.insert((*name).to_string(), node.schema().to_object_info(&list));
        }
        Json::Object(out)
    }
}

impl std::fmt::Debug for NodeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.nodes.keys()).finish()
    }
}
