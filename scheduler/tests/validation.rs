//! Validation reports every problem in ComfyUI's vocabulary, names cycle members, and
//! never recurses.

mod common;

use sakuga_scheduler::SchedulerError;
use serde_json::{Value as Json, json};

fn report(
    result: Result<sakuga_scheduler::ExecutionPlan, SchedulerError>,
) -> sakuga_scheduler::ValidationReport {
    match result {
        Err(SchedulerError::Invalid(report)) => *report,
        Err(other) => panic!("expected a validation report, got {other}"),
        Ok(_) => panic!("expected a validation report, the workflow validated"),
    }
}

fn kinds_of(report: &sakuga_scheduler::ValidationReport, node: &str) -> Vec<&'static str> {
    report
        .node_errors
        .get(node)
        .map(|n| n.errors.iter().map(|e| e.kind).collect())
        .unwrap_or_default()
}

#[test]
fn five_mistakes_are_all_reported_with_node_ids_and_types() {
    let f = common::fixture(1);
    let wf = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 512, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "cubic-ish",
              "width": 99999, "height": 64, "crop": "disabled"}},
        "3": {"class_type": "ImageInvert", "inputs": {}},
        "4": {"class_type": "NoSuchNode", "inputs": {}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "y"}},
    });
    let r = report(f.plan(&wf));
    assert_eq!(r.error.kind, "prompt_outputs_failed_validation");
    assert_eq!(kinds_of(&r, "1"), ["value_smaller_than_min"]);
    let mut two = kinds_of(&r, "2");
    two.sort();
    assert_eq!(two, ["value_bigger_than_max", "value_not_in_list"]);
    assert_eq!(kinds_of(&r, "3"), ["required_input_missing"]);
    assert_eq!(kinds_of(&r, "4"), ["missing_node_type"]);
    assert_eq!(r.node_errors["1"].class_type, "EmptyImage");
    assert_eq!(r.node_errors["1"].dependent_outputs, ["5"]);
    assert_eq!(r.node_errors["3"].dependent_outputs, ["6"]);
    // The JSON shape clients read.
    let j = r.to_json();
    assert!(j["node_errors"]["2"]["errors"][0]["extra_info"]["input_name"].is_string());
    assert_eq!(j["error"]["type"], "prompt_outputs_failed_validation");
}

#[test]
fn link_problems_are_reported() {
    let f = common::fixture(1);
    let wf = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 3]}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["missing", 0]}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["1"]}},
        "5": {"class_type": "TestIntSink", "inputs": {"value": ["1", 0]}},
        "6": {"class_type": "TestIntSink", "inputs": {"value": "seven"}},
        "7": {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["3", 0]}},
        "8": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": 5}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "a"}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "b"}},
    });
    let r = report(f.plan(&wf));
    assert_eq!(kinds_of(&r, "2"), ["bad_linked_input"]);
    assert_eq!(kinds_of(&r, "3"), ["bad_linked_input"]);
    assert_eq!(kinds_of(&r, "4"), ["bad_linked_input"]);
    assert_eq!(kinds_of(&r, "5"), ["return_type_mismatch"]);
    assert_eq!(kinds_of(&r, "6"), ["invalid_input_type"]);
    assert_eq!(kinds_of(&r, "8"), ["invalid_input_type"]);
    assert!(
        r.node_errors["5"].errors[0]
            .details
            .contains("received_type(IMAGE) mismatch input_type(INT)")
    );
}

#[test]
fn a_dynamic_combos_inputs_count_only_for_the_chosen_option() {
    let f = common::fixture(1);
    let graph = |resize: Json| {
        json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ResizeImageMaskNode", "inputs": resize},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "r"}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        })
    };
    // A hidden input is ignored, even out of range; the shown one is checked.
    let by = graph(
        json!({"input": ["1", 0], "resize_type": "scale by multiplier",
        "resize_type.multiplier": 2.0, "resize_type.width": -5, "scale_method": "area"}),
    );
    f.plan(&by).unwrap();
    let too_big = graph(
        json!({"input": ["1", 0], "resize_type": "scale by multiplier",
        "resize_type.multiplier": 9.0, "scale_method": "area"}),
    );
    assert_eq!(
        kinds_of(&report(f.plan(&too_big)), "2"),
        ["value_bigger_than_max"]
    );
    let dims = graph(json!({"input": ["1", 0], "resize_type": "scale dimensions",
        "resize_type.multiplier": 2.0, "scale_method": "area"}));
    let r = report(f.plan(&dims));
    let missing: Vec<&str> = r.node_errors["2"]
        .errors
        .iter()
        .map(|e| e.details.as_str())
        .collect();
    assert_eq!(
        missing,
        [
            "resize_type.width",
            "resize_type.height",
            "resize_type.crop"
        ]
    );
    let unknown =
        graph(json!({"input": ["1", 0], "resize_type": "scale sideways", "scale_method": "area"}));
    assert_eq!(
        kinds_of(&report(f.plan(&unknown)), "2"),
        ["value_not_in_list"]
    );
    // IMAGE or MASK only: a LATENT is named against the allowed types.
    let latent = graph(
        json!({"input": ["4", 0], "resize_type": "scale by multiplier",
        "resize_type.multiplier": 2.0, "scale_method": "area"}),
    );
    let r = report(f.plan(&latent));
    assert_eq!(kinds_of(&r, "2"), ["return_type_mismatch"]);
    assert!(
        r.node_errors["2"].errors[0]
            .details
            .contains("received_type(LATENT) mismatch input_type(IMAGE,MASK)"),
        "{}",
        r.node_errors["2"].errors[0].details
    );
}

#[test]
fn a_three_node_cycle_names_all_three_nodes() {
    let f = common::fixture(1);
    let wf = json!({
        "a": {"class_type": "TestCounter", "inputs": {"value": ["c", 0]}},
        "b": {"class_type": "TestCounter", "inputs": {"value": ["a", 0]}},
        "c": {"class_type": "TestCounter", "inputs": {"value": ["b", 0]}},
        "out": {"class_type": "TestIntSink", "inputs": {"value": ["c", 0]}},
    });
    let r = report(f.plan(&wf));
    for id in ["a", "b", "c"] {
        assert_eq!(kinds_of(&r, id), ["dependency_cycle"], "node {id}");
        let details = &r.node_errors[id].errors[0].details;
        for member in ["a", "b", "c"] {
            assert!(details.contains(member), "{details} does not name {member}");
        }
    }
    assert!(!r.node_errors.contains_key("out"));
}

#[test]
fn a_workflow_without_outputs_is_rejected() {
    let f = common::fixture(1);
    let wf = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}});
    let r = report(f.plan(&wf));
    assert_eq!(r.error.kind, "prompt_no_outputs");
}

#[test]
fn nodes_no_output_depends_on_are_neither_checked_nor_run() {
    let f = common::fixture(1);
    let wf = json!({
        "dangling": {"class_type": "ImageInvert", "inputs": {}},
        "1": {"class_type": "TestCounter", "inputs": {"value": 1}},
        "2": {"class_type": "TestIntSink", "inputs": {"value": ["1", 0]}},
    });
    let plan = f.plan(&wf).expect("dangling node is ignored");
    assert_eq!(plan.len(), 2);
}

#[test]
fn literals_convert_like_comfyui() {
    let f = common::fixture(1);
    let wf = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": "16", "height": 16.0, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "area", "scale_by": "0.5"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    });
    assert!(f.plan(&wf).is_ok());
}

#[test]
fn a_100000_node_chain_validates_without_recursion() {
    let f = common::fixture(1);
    let plan = f.plan(&common::counter_chain(100_000, 0)).unwrap();
    assert_eq!(plan.len(), 100_001);
}

#[test]
fn post_prompt_bodies_and_malformed_text() {
    let f = common::fixture(1);
    let body = json!({"prompt": common::counter_chain(3, 0), "client_id": "abc"});
    assert_eq!(f.plan(&body).unwrap().len(), 4);
    assert!(matches!(
        sakuga_scheduler::Workflow::from_json_str("{oops"),
        Err(SchedulerError::Malformed { .. })
    ));
    let r = report(f.plan(&json!({"1": 5, "2": {"inputs": {}}})));
    assert_eq!(kinds_of(&r, "1"), ["invalid_prompt"]);
    assert_eq!(kinds_of(&r, "2"), ["invalid_prompt"]);
}

#[test]
fn echoed_client_text_is_clipped_and_long_cycles_stay_small() {
    let f = common::fixture(1);
    let model = "m".repeat(3000);
    let class = "C".repeat(3000);
    let wf = json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": model}},
        "2": {"class_type": class, "inputs": {}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    });
    let r = report(f.plan(&wf));
    let text = r.to_json().to_string();
    assert!(text.len() < 4000, "report is {} bytes: {text}", text.len());
    assert!(text.contains("(3000 bytes)"), "{text}");

    // A 2,000-node cycle: each member's message names a few members, not all of them.
    let n = 2000;
    let mut nodes = serde_json::Map::new();
    for i in 0..n {
        let source = (i + 1) % n;
        nodes.insert(
            format!("{i}"),
            json!({"class_type": "ImageInvert", "inputs": {"image": [format!("{source}"), 0]}}),
        );
    }
    nodes.insert(
        "out".into(),
        json!({"class_type": "SaveImage", "inputs": {"images": ["0", 0], "filename_prefix": "x"}}),
    );
    let r = report(f.plan(&serde_json::Value::Object(nodes)));
    assert_eq!(r.node_errors.len(), n);
    let text = r.to_json().to_string();
    assert!(text.len() < 400 * n, "report is {} bytes", text.len());
    assert_eq!(
        r.node_errors["0"].errors[0].extra_info["cycle_length"],
        json!(n)
    );
}

/// A sampler with `seed` as sent, on the demo checkpoint.
fn sampler_with_seed(seed: Json) -> Json {
    json!({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sakuga_models::demo::DEMO_CHECKPOINT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": seed, "steps": 1, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["pos", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "s"}},
    })
}

#[test]
fn seeds_take_comfyuis_whole_u64_range_and_nothing_past_it() {
    let f = common::fixture(1);
    sakuga_models::demo::write_demo_models(&f.executor.env().models_dir).unwrap();
    // What the web UI or a script may send: above i64::MAX, up to u64::MAX, as numbers
    // or strings (Python's int() takes both).
    for seed in [
        json!(0),
        json!(9_223_372_036_854_775_808_u64),
        json!(u64::MAX),
        json!("18446744073709551615"),
    ] {
        f.plan(&sampler_with_seed(seed.clone()))
            .unwrap_or_else(|e| panic!("seed {seed} refused: {e}"));
    }
    let r = report(f.plan(&sampler_with_seed(json!(18_446_744_073_709_551_616_f64))));
    assert_eq!(kinds_of(&r, "sample"), ["value_bigger_than_max"]);
    // The bound exactly, not as a float.
    assert!(
        r.node_errors["sample"].errors[0]
            .message
            .ends_with("bigger than max of 18446744073709551615")
    );
    let r = report(f.plan(&sampler_with_seed(json!(-1))));
    assert_eq!(kinds_of(&r, "sample"), ["value_smaller_than_min"]);
}
