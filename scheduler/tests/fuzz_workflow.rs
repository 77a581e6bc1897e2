//! Property tests of the workflow parser and validator: arbitrary text, arbitrary JSON and
//! graph-shaped JSON over the real node catalogue (real class and input names, links to
//! real and missing ids, cycles, out-of-range and wrongly typed values, very long strings).
//! A fixed, small case budget runs with the normal tests. The properties: nothing panics,
//! and a rejection's report stays proportional to the workflow it describes.

use std::sync::{Arc, LazyLock};

use proptest::prelude::*;
use serde_json::{Map, Value as Json, json};

use sakuga_nodes::{NodeEnv, NodeRegistry};
use sakuga_scheduler::admission::{WorkflowLimits, check_limits};
use sakuga_scheduler::{ExecutionPlan, SchedulerError, Workflow, validate};

static REGISTRY: LazyLock<NodeRegistry> = LazyLock::new(NodeRegistry::with_builtins);
static ENV: LazyLock<(tempfile::TempDir, Arc<NodeEnv>)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let env = NodeEnv::new(
        dir.path().join("input"),
        dir.path().join("output"),
        dir.path().join("models"),
    );
    (dir, Arc::new(env))
});

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Class names of the catalogue, plus a few that do not exist.
fn class_names() -> Vec<String> {
    let mut names: Vec<String> = REGISTRY
        .iter()
        .map(|n| n.schema().class_type.to_owned())
        .collect();
    names.sort();
    names.extend(["NoSuchNode".to_owned(), String::new(), "x".repeat(3000)]);
    names
}

/// Input names of the catalogue, plus junk.
fn input_names() -> Vec<String> {
    let mut names: Vec<String> = REGISTRY
        .iter()
        .flat_map(|n| n.schema().inputs.iter().map(|i| i.name.to_owned()))
        .collect();
    names.sort();
    names.dedup();
    names.extend(["".to_owned(), "width".to_owned(), "n".repeat(500)]);
    names
}

fn any_json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::from),
        any::<i64>().prop_map(Json::from),
        any::<u64>().prop_map(Json::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number)),
        "\\PC{0,12}".prop_map(Json::from),
        (0usize..4000).prop_map(|n| Json::from("s".repeat(n))),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            prop::collection::btree_map("\\PC{0,6}", inner, 0..4)
                .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

/// An input value: a literal, a link to one of `ids` (or a missing one), or a bad link.
fn input_value(ids: usize) -> impl Strategy<Value = Json> {
    prop_oneof![
        4 => any_json(),
        4 => (0..ids.max(1) + 2, 0u64..4).prop_map(|(id, slot)| json!([id.to_string(), slot])),
        1 => (0..ids.max(1), any::<i64>()).prop_map(|(id, slot)| json!([id, slot])),
        1 => prop::collection::vec(any_json(), 0..4).prop_map(Json::Array),
        1 => prop::sample::select(vec![
            json!(0), json!(-1), json!(16384), json!("16384"), json!(16384.0),
            json!(1e308), json!(i64::MIN), json!(u64::MAX), json!("nan"),
        ]),
    ]
}

/// A graph-shaped workflow of up to 24 nodes over the real catalogue.
fn graph() -> impl Strategy<Value = Json> {
    let classes = class_names();
    let inputs = input_names();
    (1usize..24).prop_flat_map(move |n| {
        let node = (
            prop::sample::select(classes.clone()),
            prop::collection::vec((prop::sample::select(inputs.clone()), input_value(n)), 0..6),
            any::<bool>(),
        );
        prop::collection::vec(node, n).prop_map(|nodes| {
            let mut map = Map::new();
            for (i, (class, inputs, wrap)) in nodes.into_iter().enumerate() {
                let inputs: Map<String, Json> = inputs.into_iter().collect();
                map.insert(
                    i.to_string(),
                    json!({"class_type": class, "inputs": inputs}),
                );
                if wrap && i == 0 {
                    map.insert("_meta".into(), json!({"title": "x"}));
                }
            }
            Json::Object(map)
        })
    })
}

/// Parses, caps, validates and compiles; a rejection's report must stay proportional.
fn check(json: Json) {
    let text_len = json.to_string().len();
    let _ = check_limits(&json, text_len as u64, &WorkflowLimits::default());
    let workflow = match Workflow::from_json(json) {
        Ok(workflow) => workflow,
        Err(SchedulerError::Malformed { .. }) => return,
        Err(other) => panic!("parsing gave {other}"),
    };
    match validate(&workflow, &REGISTRY, &ENV.1) {
        Ok(valid) => {
            let plan = ExecutionPlan::compile(valid);
            let _ = format!("{plan:?}");
        }
        Err(SchedulerError::Invalid(report)) => {
            let report_len = report.to_json().to_string().len();
            assert!(
                report_len <= 4096 + 64 * text_len,
                "a {text_len}-byte workflow gave a {report_len}-byte report"
            );
            assert!(!report.lines().is_empty());
            let _ = report.summary();
        }
        Err(other) => panic!("validation gave {other}"),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,64}") {
        let _ = Workflow::from_json_str(&text);
    }

    #[test]
    fn arbitrary_json_never_panics(json in any_json()) {
        check(json.clone());
        check(json!({"prompt": json}));
    }

    #[test]
    fn graph_shaped_workflows_never_panic(json in graph()) {
        check(json);
    }
}
