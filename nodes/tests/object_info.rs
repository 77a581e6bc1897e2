//! Every node's schema against the shape of ComfyUI's `/object_info`, and every class
//! ComfyUI also has against ComfyUI's own `/object_info` (inputs, types, defaults, ranges,
//! choices, outputs), so graphs exported from ComfyUI validate the same here.

use std::path::PathBuf;

use sakuga_nodes::{NodeEnv, NodeRegistry};
use serde_json::{Value as Json, json};

fn object_info() -> Json {
    let dir = tempfile::tempdir().unwrap();
    let env = NodeEnv::new(
        dir.path().join("input"),
        dir.path().join("output"),
        dir.path().join("models"),
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
    "INTERP_MODEL",
    "CONTROL_NET",
    "VIDEO",
    "AUDIO",
    "*",
    "COMFY_MATCHTYPE_V3",
    "COMFY_DYNAMICCOMBO_V3",
    "IMAGE,MASK",
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

/// ComfyUI 0.8.0's own `/object_info` for every class both have (fixtures/, written by
/// running ComfyUI with `--cpu` and keeping the shared classes).
fn comfyui_object_info() -> Json {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/comfyui_object_info.json");
    let fixture: Json = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    fixture["classes"].clone()
}

/// An input's type and options, with both of ComfyUI's combo spellings (`[[choices], {}]`
/// and `["COMBO", {"options": [...]}]`) read as `("COMBO", choices)`.
fn normalized(entry: &Json) -> (String, Vec<Json>, Json) {
    let options = entry.get(1).cloned().unwrap_or(json!({}));
    match &entry[0] {
        Json::Array(choices) => ("COMBO".into(), choices.clone(), options),
        Json::String(kind) if kind == "COMBO" => {
            let choices = options["options"].as_array().cloned().unwrap_or_default();
            ("COMBO".into(), choices, options)
        }
        other => (
            other.as_str().unwrap_or_default().into(),
            Vec::new(),
            options,
        ),
    }
}

#[test]
fn shared_classes_match_comfyuis_own_object_info() {
    let ours = object_info();
    let theirs = comfyui_object_info();
    let mut problems = Vec::new();
    for (class, reference) in theirs.as_object().unwrap() {
        let mine = &ours[class];
        for section in ["required", "optional"] {
            if let Some(inputs) = reference["input"][section].as_object() {
                compare_inputs(
                    class,
                    section,
                    inputs,
                    &mine["input"][section],
                    &mut problems,
                );
            }
        }
        // Newer ComfyUI releases add outputs at the end (PreviewAny's STRING), which graphs
        // made for 0.8.0 never link: ours must start with ComfyUI's.
        for key in ["output", "output_name"] {
            let (want, got) = (reference[key].as_array(), mine[key].as_array());
            if let (Some(want), Some(got)) = (want, got)
                && (got.len() < want.len() || got[..want.len()] != want[..])
            {
                problems.push(format!("{class}.{key}: ours {got:?}, ComfyUI {want:?}"));
            }
        }
        for key in ["output_node"] {
            if !reference[key].is_null() && mine[key] != reference[key] {
                problems.push(format!(
                    "{class}.{key}: ours {}, ComfyUI {}",
                    mine[key], reference[key]
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} differences:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Compares one section of inputs with ComfyUI's, a dynamic combo's choices recursively.
fn compare_inputs(
    label: &str,
    section: &str,
    inputs: &serde_json::Map<String, Json>,
    mine: &Json,
    problems: &mut Vec<String>,
) {
    for (name, entry) in inputs {
        let Some(my_entry) = mine.get(name) else {
            problems.push(format!("{label}.{name}: missing ({section})"));
            continue;
        };
        let (kind, choices, options) = normalized(entry);
        let (my_kind, my_choices, my_options) = normalized(my_entry);
        if kind != my_kind {
            problems.push(format!("{label}.{name}: type {my_kind}, ComfyUI {kind}"));
        }
        // Choices must be ComfyUI's (a subset where sakuga runs fewer); file lists
        // depend on what each install has on disk.
        if !choices.is_empty() {
            if let Some(extra) = my_choices.iter().find(|c| !choices.contains(c)) {
                problems.push(format!("{label}.{name}: choice {extra} is not ComfyUI's"));
            }
            let (first, my_first) = (choices.first(), my_choices.first());
            if my_choices.len() == choices.len() && first != my_first {
                problems.push(format!("{label}.{name}: default choice differs"));
            }
        }
        if kind == "COMFY_DYNAMICCOMBO_V3" {
            compare_dynamic(&format!("{label}.{name}"), &options, &my_options, problems);
        }
        if options["template"] != my_options["template"] {
            problems.push(format!(
                "{label}.{name}.template: ours {}, ComfyUI {}",
                my_options["template"], options["template"]
            ));
        }
        for key in [
            "default",
            "min",
            "max",
            "step",
            "multiline",
            "control_after_generate",
        ] {
            let (want, got) = (&options[key], &my_options[key]);
            let same = match (got.as_f64(), want.as_f64()) {
                (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                _ => want.is_null() || got == want,
            };
            if !same {
                problems.push(format!("{label}.{name}.{key}: ours {got}, ComfyUI {want}"));
            }
        }
    }
}

/// A dynamic combo: the same choices in the same order, each showing the same inputs.
fn compare_dynamic(label: &str, options: &Json, mine: &Json, problems: &mut Vec<String>) {
    let keys = |o: &Json| -> Vec<Json> {
        o["options"]
            .as_array()
            .map(|list| list.iter().map(|c| c["key"].clone()).collect())
            .unwrap_or_default()
    };
    if keys(options) != keys(mine) {
        problems.push(format!(
            "{label}: choices {:?}, ComfyUI {:?}",
            keys(mine),
            keys(options)
        ));
        return;
    }
    let (theirs, ours) = (
        options["options"].as_array().unwrap(),
        mine["options"].as_array().unwrap(),
    );
    for (choice, my_choice) in theirs.iter().zip(ours) {
        let label = format!("{label}[{}]", choice["key"]);
        let inputs = choice["inputs"]["required"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let order = |c: &Json| -> Vec<String> {
            c["inputs"]["required"]
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default()
        };
        if order(choice) != order(my_choice) {
            problems.push(format!(
                "{label}: inputs {:?}, ComfyUI {:?}",
                order(my_choice),
                order(choice)
            ));
        }
        compare_inputs(
            &label,
            "required",
            &inputs,
            &my_choice["inputs"]["required"],
            problems,
        );
    }
}
