//! Workflow rewriting before a job is queued: feature flags that bypass post-process nodes
//! (the "isolate and toggle" remedy). Degrading for FPS lives in [`crate::degrade`].

use std::collections::HashMap;

use serde_json::Value as Json;

use sakuga_telemetry::Workload;

use sakuga_nodes::{Feature, NodeRegistry};

use crate::engine::FeatureFlags;

/// Rewrites a workflow so nodes switched off by `features` for `workload` (by the feature
/// their schema names) pass their image input through: every link to the bypassed node's
/// output 0 is redirected to the node's own `image`/`images` input, and the node is removed.
pub(crate) fn apply_features(
    workflow: Json,
    features: FeatureFlags,
    workload: Workload,
    registry: &NodeRegistry,
) -> Json {
    let off = |feature: Feature| match feature {
        Feature::Upscaler => features.upscaler_off.get(workload),
        Feature::Interpolator => features.interpolator_off.get(workload),
    };
    if !Feature::ALL.iter().any(|&f| off(f)) {
        return workflow;
    }
    let bypassed = |class: &str| {
        registry
            .get(class)
            .and_then(|node| node.schema().roles.feature)
            .is_some_and(off)
    };
    let Json::Object(mut nodes) = workflow else {
        return workflow;
    };
    let mut redirects: HashMap<String, Json> = HashMap::new();
    nodes.retain(|id, node| {
        let class = node
            .get("class_type")
            .and_then(Json::as_str)
            .unwrap_or_default();
        if !bypassed(class) {
            return true;
        }
        let source = node
            .get("inputs")
            .and_then(|i| i.get("image").or_else(|| i.get("images")))
            .cloned();
        match source {
            Some(link @ Json::Array(_)) => {
                redirects.insert(id.clone(), link);
                false
            }
            _ => true,
        }
    });
    // Follow chains of bypassed nodes to the first kept source.
    let resolve = |link: &Json| {
        let mut link = link.clone();
        for _ in 0..redirects.len() {
            let target = link
                .get(0)
                .and_then(Json::as_str)
                .and_then(|id| redirects.get(id));
            match target {
                Some(next) => link = next.clone(),
                None => break,
            }
        }
        link
    };
    for node in nodes.values_mut() {
        if let Some(Json::Object(inputs)) = node.get_mut("inputs") {
            for value in inputs.values_mut() {
                if value
                    .get(0)
                    .and_then(Json::as_str)
                    .is_some_and(|id| redirects.contains_key(id))
                {
                    *value = resolve(value);
                }
            }
        }
    }
    Json::Object(nodes)
}
