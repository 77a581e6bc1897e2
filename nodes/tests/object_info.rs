//! Every node's schema against the shape of ComfyUI's `/object_info`, and the inputs,
//! defaults and ranges of the classes ComfyUI also has against ComfyUI's own (its
//! `nodes.py` and `comfy_extras`), so graphs exported from ComfyUI validate the same here.

use std::path::PathBuf;

use sakuga_nodes::{NodeEnv, NodeRegistry};
use serde_json::{Value as Json, json};

fn object_info() -> Json {
    let dir = tempfile::tempdir().unwrap();
    let env = NodeEnv::new(
        dir.path().join("input"),
        dir.path().join("output"),
        PathBuf::from(dir.path().join("models")),
    );
    NodeRegistry::with_builtins().object_info(&env)
}

const TYPES: &[&str] = &[
    "INT",
    "FLOAT",
    "STRING",
    "BOOLEAN",
    "IMAGE",
    "MASK",
    "LATENT",
    "MODEL",
    "CLIP",
    "VAE",
    "CONDITIONING",
    "UPSCALE_MODEL",
    "INTERPOLATION_MODEL",
];

/// `[TYPE, {options}]`, `[TYPE]` or `[[choices], {options}]`, as ComfyUI writes inputs.
fn check_input(class: &str, name: &str, entry: &Json) {
    let entry = entry
        .as_array()
        .unwrap_or_else(|| panic!("{class}.{name}: {entry}"));
    assert!(
        !entry.is_empty() && entry.len() <= 2,
        "{class}.{name}: {entry:?}"
    );
    match &entry[0] {
        Json::Array(choices) => {
            assert!(
                choices.iter().all(Json::is_string),
                "{class}.{name}: {choices:?}"
            );
        }
        Json::String(kind) => {
            assert!(
                TYPES.contains(&kind.as_str())
                    || kind.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{class}.{name}: type {kind}"
            );
            let options = entry.get(1).cloned().unwrap_or(json!({}));
            if kind == "INT" || kind == "FLOAT" {
                let (min, max, default) = (&options["min"], &options["max"], &options["default"]);
                assert!(
                    min.as_f64() <= default.as_f64() && default.as_f64() <= max.as_f64(),
                    "{class}.{name}: default {default} outside {min}..{max}"
                );
            }
        }
        other => panic!("{class}.{name}: {other}"),
    }
}

#[test]
fn every_node_has_comfyuis_object_info_shape() {
    let info = object_info();
    let classes = info.as_object().unwrap();
    assert!(classes.len() >= 25, "{} classes", classes.len());
    for (class, node) in classes {
        for key in [
            "input",
            "input_order",
            "output",
            "output_is_list",
            "output_name",
            "name",
            "display_name",
            "description",
            "category",
            "output_node",
        ] {
            assert!(node.get(key).is_some(), "{class} lacks {key}");
        }
        assert_eq!(node["name"], *class);
        let outputs = node["output"].as_array().unwrap().len();
        assert_eq!(
            node["output_is_list"].as_array().unwrap().len(),
            outputs,
            "{class}"
        );
        assert_eq!(
            node["output_name"].as_array().unwrap().len(),
            outputs,
            "{class}"
        );
        assert!(
            outputs > 0 || node["output_node"] == true,
            "{class}: no outputs and not an output node, so it could never run"
        );
        for part in ["required", "optional"] {
            let inputs = node["input"][part].as_object().unwrap();
            let order: Vec<&str> = node["input_order"][part]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap())
                .collect();
            assert_eq!(order.len(), inputs.len(), "{class} {part}");
            for (name, entry) in inputs {
                assert!(
                    order.contains(&name.as_str()),
                    "{class}.{name} not in input_order"
                );
                check_input(class, name, entry);
            }
        }
    }
}

/// `(class, input, [type, options])` as ComfyUI declares them.
fn comfyui_reference() -> Vec<(&'static str, &'static str, Json)> {
    let max_resolution = 16384;
    // sys.maxsize, as comfy_extras/nodes_primitive.py bounds its numbers.
    let maxsize = i64::MAX;
    vec![
        // ComfyUI 0.8.0's /object_info for the primitives and StringConcatenate.
        (
            "PrimitiveInt",
            "value",
            json!(["INT", {"min": -maxsize, "max": maxsize, "control_after_generate": true}]),
        ),
        (
            "PrimitiveFloat",
            "value",
            json!(["FLOAT", {"min": -maxsize, "max": maxsize, "step": 0.1}]),
        ),
        ("PrimitiveBoolean", "value", json!(["BOOLEAN", {}])),
        (
            "PrimitiveString",
            "value",
            json!(["STRING", {"multiline": false}]),
        ),
        (
            "PrimitiveStringMultiline",
            "value",
            json!(["STRING", {"multiline": true}]),
        ),
        (
            "StringConcatenate",
            "string_a",
            json!(["STRING", {"multiline": true}]),
        ),
        (
            "StringConcatenate",
            "string_b",
            json!(["STRING", {"multiline": true}]),
        ),
        (
            "StringConcatenate",
            "delimiter",
            json!(["STRING", {"default": "", "multiline": false}]),
        ),
        (
            "KSampler",
            "seed",
            json!(["INT", {"control_after_generate": true}]),
        ),
        // 0xffffffffffffffff in nodes.py; seeds past i64::MAX are kept as their 64 bits.
        (
            "KSampler",
            "seed",
            json!(["INT", {"default": 0, "min": 0, "max": u64::MAX}]),
        ),
        (
            "KSamplerAdvanced",
            "noise_seed",
            json!(["INT", {"default": 0, "min": 0, "max": u64::MAX}]),
        ),
        (
            "KSampler",
            "steps",
            json!(["INT", {"default": 20, "min": 1, "max": 10000}]),
        ),
        (
            "KSampler",
            "cfg",
            json!(["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}]),
        ),
        (
            "KSampler",
            "denoise",
            json!(["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}]),
        ),
        (
            "EmptyLatentImage",
            "width",
            json!(["INT", {"default": 512, "min": 16, "max": max_resolution, "step": 8}]),
        ),
        (
            "EmptyLatentImage",
            "height",
            json!(["INT", {"default": 512, "min": 16, "max": max_resolution, "step": 8}]),
        ),
        (
            "EmptyLatentImage",
            "batch_size",
            json!(["INT", {"default": 1, "min": 1, "max": 4096}]),
        ),
        (
            "CLIPSetLastLayer",
            "stop_at_clip_layer",
            json!(["INT", {"default": -1, "min": -24, "max": -1}]),
        ),
        (
            "LatentUpscaleBy",
            "scale_by",
            json!(["FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}]),
        ),
        (
            "ImageScaleBy",
            "scale_by",
            json!(["FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}]),
        ),
        (
            "RepeatLatentBatch",
            "amount",
            json!(["INT", {"default": 1, "min": 1, "max": 64}]),
        ),
        (
            "EmptyImage",
            "batch_size",
            json!(["INT", {"default": 1, "min": 1, "max": 4096}]),
        ),
    ]
}

#[test]
fn shared_classes_match_comfyuis_inputs_defaults_and_ranges() {
    let info = object_info();
    for (class, input, expected) in comfyui_reference() {
        let ours = &info[class]["input"]["required"][input];
        assert_eq!(ours[0], expected[0], "{class}.{input} type");
        for (key, value) in expected[1].as_object().unwrap() {
            let mine = &ours[1][key];
            let same = match (mine.as_f64(), value.as_f64()) {
                (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                _ => mine == value,
            };
            assert!(same, "{class}.{input}.{key}: ours {mine}, ComfyUI {value}");
        }
    }
    for (class, outputs) in [
        ("CheckpointLoaderSimple", json!(["MODEL", "CLIP", "VAE"])),
        ("KSampler", json!(["LATENT"])),
        ("VAEDecode", json!(["IMAGE"])),
        ("LoadImage", json!(["IMAGE", "MASK"])),
        ("UpscaleModelLoader", json!(["UPSCALE_MODEL"])),
        ("SaveImage", json!([])),
    ] {
        assert_eq!(info[class]["output"], outputs, "{class} outputs");
    }
    assert_eq!(info["SaveImage"]["output_node"], true);
    assert_eq!(
        info["SaveImage"]["input"]["required"]["filename_prefix"][1]["default"],
        "ComfyUI"
    );
}
