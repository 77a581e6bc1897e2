//! Building what jobs run against from a config: the node environment (folders, candle
//! device, model store and cache as shared resources) and the node registry.

use std::sync::Arc;

use sakuga_models::cache::ModelCache;
use sakuga_models::store::ModelStore;
use sakuga_nodes::{NodeEnv, NodeRegistry};

use crate::config::SakugaConfig;

/// Why the runtime could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("device {spec:?}: {source}")]
    Device {
        spec: String,
        #[source]
        source: sakuga_models::ModelError,
    },
}

/// The node environment for `config`, with the model store and cache registered as
/// resources for model nodes.
///
/// # Errors
/// When the configured device cannot be opened.
pub fn node_env(config: &SakugaConfig) -> Result<NodeEnv, RuntimeError> {
    let device = sakuga_models::diffusion::device_from_spec(&config.device).map_err(|source| {
        RuntimeError::Device {
            spec: config.device.clone(),
            source,
        }
    })?;
    let mut env = NodeEnv::new(
        config.input_dir.clone(),
        config.out.clone(),
        config.models_dir.clone(),
    );
    env.device = device;
    env.resources
        .insert(Arc::new(ModelStore::new(config.models_dir.clone())));
    env.resources.insert(Arc::new(ModelCache::new(
        config.model_cache_bytes,
        config.device.clone(),
    )));
    Ok(env)
}

/// Every built-in node class.
pub fn registry() -> NodeRegistry {
    NodeRegistry::with_builtins()
}
