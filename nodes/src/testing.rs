//! Test harness for the built-in nodes' unit tests: an environment over a temp dir with a
//! model cache, and a way to run one node outside the executor.

use std::path::Path;
use std::sync::Arc;

use sakuga_models::cache::ModelCache;

use crate::error::NodeError;
use crate::node::{CancelToken, ExecContext, Inputs, Node, NodeEnv, NullSink};
use crate::value::Value;

/// A node environment in a temp dir that lives as long as the rig.
pub(crate) struct Rig {
    _dir: tempfile::TempDir,
    pub env: NodeEnv,
    pub cancel: CancelToken,
}

impl Rig {
    /// A rig whose models dir `prepare` fills first.
    pub fn new(prepare: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        prepare(&models);
        let mut env = NodeEnv::new(dir.path().join("input"), dir.path().join("output"), models);
        env.resources
            .insert(Arc::new(ModelCache::new(1 << 30, "cpu")));
        Rig {
            _dir: dir,
            env,
            cancel: CancelToken::new(),
        }
    }

    /// Runs `node` once on `inputs`.
    pub fn run(&self, node: &dyn Node, inputs: &[(&str, Value)]) -> Result<Vec<Value>, NodeError> {
        let ctx = ExecContext {
            job_id: "job",
            node_id: "1",
            env: &self.env,
            sink: &NullSink,
            cancel: &self.cancel,
            workflow: None,
            batch_limit: None,
        };
        let mut bound = Inputs::new();
        for (name, value) in inputs {
            bound.insert(*name, value.clone());
        }
        node.execute(&ctx, &bound)
    }
}
