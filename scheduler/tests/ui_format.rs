//! UI-format (LiteGraph) workflows converted to API format: every UI example in
//! `examples/ui/` against its API twin in `examples/`, a real ComfyUI template, and the
//! graph features one at a time (Reroute, PrimitiveNode, bypass, mute, subgraphs) with the
//! errors that name a UI node.

use std::path::Path;

use sakuga_nodes::{NodeEnv, NodeRegistry};
use sakuga_scheduler::ui_format::{is_ui_format, to_api_format};
use sakuga_scheduler::{SchedulerError, Workflow, validate};
use serde_json::{Map, Value as Json, json};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");

fn read(path: impl AsRef<Path>) -> Json {
    let text = std::fs::read_to_string(path.as_ref()).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn convert(ui: Json) -> Result<Json, SchedulerError> {
    to_api_format(ui, &NodeRegistry::with_builtins())
}

/// The UI stores numbers as JavaScript does (`6`, not `6.0`); compare them as numbers.
fn numeric(json: &Json) -> Json {
    match json {
        Json::Number(n) => json!(n.as_f64().unwrap()),
        Json::Array(items) => Json::Array(items.iter().map(numeric).collect()),
        Json::Object(map) => {
            Json::Object(map.iter().map(|(k, v)| (k.clone(), numeric(v))).collect())
        }
        other => other.clone(),
    }
}

fn assert_same_graph(converted: &Json, twin: &Json, name: &str) {
    let (converted, twin) = (numeric(converted), numeric(twin));
    for (id, node) in twin.as_object().unwrap() {
        assert_eq!(converted.get(id), Some(node), "{name}: node {id} differs");
    }
    assert_eq!(converted, twin, "{name}: extra nodes in the conversion");
}

#[test]
fn every_flat_ui_example_converts_to_its_api_twin() {
    for name in [
        "anime_preview.json",
        "anime_txt2img.json",
        "img2img_lora.json",
        "sd15_comfyui_export.json",
    ] {
        let ui = read(Path::new(EXAMPLES).join("ui").join(name));
        assert!(is_ui_format(&ui), "{name} is not UI format");
        let converted = convert(ui).unwrap();
        assert_same_graph(&converted, &read(Path::new(EXAMPLES).join(name)), name);
    }
}

#[test]
fn the_comic_subgraph_expands_into_the_twins_panels() {
    let converted = convert(read(Path::new(EXAMPLES).join("ui/comic_panels_batch.json"))).unwrap();
    let twin = read(Path::new(EXAMPLES).join("comic_panels_batch.json"));
    // The twin's panel nodes 10-13, 20-23, 30-33 are the instances' inner nodes 1-4.
    let rename = |id: &str| -> String {
        match id.parse::<u32>() {
            Ok(n) if n >= 10 => format!("{}:{}", n / 10 * 10, n % 10 + 1),
            _ => id.to_string(),
        }
    };
    let mut expected = Map::new();
    for (id, node) in twin.as_object().unwrap() {
        let mut node = node.clone();
        for value in node["inputs"].as_object_mut().unwrap().values_mut() {
            if let Some(source) = value.get(0).and_then(Json::as_str) {
                value[0] = json!(rename(source));
            }
        }
        node.as_object_mut().unwrap().remove("_meta");
        expected.insert(rename(id), node);
    }
    let mut converted = converted;
    for node in converted.as_object_mut().unwrap().values_mut() {
        node.as_object_mut().unwrap().remove("_meta");
    }
    assert_same_graph(&converted, &Json::Object(expected), "comic_panels_batch");
}

#[test]
fn a_real_comfyui_template_converts_as_the_frontend_would() {
    let fixtures = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/comfyui_templates"
    );
    let converted = convert(read(Path::new(fixtures).join("image_sdxl_simple.json"))).unwrap();
    let expected = json!({
        "7": {"class_type": "SaveImage", "_meta": {"title": "Save Image"},
              "inputs": {"images": ["14", 0], "filename_prefix": "sdxl_simple"}},
        "10": {"class_type": "CLIPTextEncode", "_meta": {"title": "Positive Prompt"},
               "inputs": {"clip": ["15", 1], "text": "a giant classical marble statue standing alone in a pure white empty void, soft diffused lighting, subtle shadows, surreal, minimalist, fine art photography, quiet atmosphere, sense of scale"}},
        "11": {"class_type": "CLIPTextEncode", "_meta": {"title": "Negative Prompt"},
               "inputs": {"clip": ["15", 1], "text": "color, colored, lowres, blurry, out of focus, deformed, bad anatomy, extra limbs, mutated, watermark, text, logo, signature\n"}},
        "12": {"class_type": "KSampler", "_meta": {"title": "KSampler"},
               "inputs": {"model": ["15", 0], "seed": 812045847300606u64, "steps": 25, "cfg": 7,
                          "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1,
                          "positive": ["10", 0], "negative": ["11", 0], "latent_image": ["13", 0]}},
        "13": {"class_type": "EmptyLatentImage", "_meta": {"title": "Empty Latent"},
               "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "14": {"class_type": "VAEDecode", "_meta": {"title": "VAE Decode"},
               "inputs": {"samples": ["12", 0], "vae": ["15", 2]}},
        "15": {"class_type": "CheckpointLoaderSimple", "_meta": {"title": "Load Checkpoint"},
               "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
    });
    assert_same_graph(&converted, &expected, "image_sdxl_simple");
}

/// A UI node: `inputs` as `(name, type, link)`, a widget socket when the name starts `=`.
fn node(id: i64, ty: &str, mode: i64, inputs: &[(&str, &str, Option<i64>)], widgets: Json) -> Json {
    let inputs: Vec<Json> = inputs
        .iter()
        .map(|(name, ty, link)| match name.strip_prefix('=') {
            Some(name) => json!({"name": name, "type": ty, "widget": {"name": name}, "link": link}),
            None => json!({"name": name, "type": ty, "link": link}),
        })
        .collect();
    json!({"id": id, "type": ty, "mode": mode, "inputs": inputs, "outputs": [], "widgets_values": widgets})
}

fn graph(nodes: Vec<Json>, links: Json) -> Json {
    json!({"last_node_id": 99, "last_link_id": 99, "nodes": nodes, "links": links, "version": 0.4})
}

/// EmptyImage (1) -> `middle` -> ImageInvert (3) -> SaveImage (4), the middle fed by link 1.
fn chain(middle: Vec<Json>, links: Json) -> Json {
    let mut nodes = vec![
        node(1, "EmptyImage", 0, &[], json!([8, 8, 1, 0])),
        node(
            3,
            "ImageInvert",
            0,
            &[("image", "IMAGE", Some(2))],
            json!([]),
        ),
        node(
            4,
            "SaveImage",
            0,
            &[("images", "IMAGE", Some(3))],
            json!(["t"]),
        ),
    ];
    nodes.extend(middle);
    let mut links = links.as_array().unwrap().clone();
    links.push(json!([3, 3, 0, 4, 0, "IMAGE"]));
    graph(nodes, Json::Array(links))
}

#[test]
fn reroutes_are_followed_through() {
    let ui = chain(
        vec![
            node(5, "Reroute", 0, &[("", "*", Some(1))], json!([])),
            node(6, "Reroute", 0, &[("", "*", Some(4))], json!([])),
        ],
        json!([
            [1, 1, 0, 5, 0, "*"],
            [4, 5, 0, 6, 0, "IMAGE"],
            [2, 6, 0, 3, 0, "IMAGE"]
        ]),
    );
    let api = convert(ui).unwrap();
    assert_eq!(api["3"]["inputs"]["image"], json!(["1", 0]));
    assert!(api.get("5").is_none() && api.get("6").is_none());
}

#[test]
fn a_primitive_gives_its_value_to_the_converted_widget() {
    // The KSampler's own seed widget is stale; the primitive's value is what the UI queues.
    let ui = graph(
        vec![
            node(
                1,
                "KSampler",
                0,
                &[("=seed", "INT", Some(1))],
                json!([5, "randomize", 20, 8, "euler", "normal", 1]),
            ),
            node(2, "PrimitiveNode", 0, &[], json!([777, "fixed"])),
        ],
        json!([[1, 2, 0, 1, 0, "INT"]]),
    );
    let inputs = convert(ui).unwrap()["1"]["inputs"].clone();
    assert_eq!(inputs["seed"], json!(777));
    assert_eq!(inputs["steps"], json!(20), "the control value was skipped");
    assert_eq!(inputs["denoise"], json!(1));
}

#[test]
fn a_dynamic_combo_reads_the_widgets_its_choice_shows() {
    // As the frontend saves ResizeImageMaskNode: the choice, then its own widgets, then
    // the node's next widget; a shown widget converted to a socket takes its link.
    let resize = |widgets: Json, width_link: bool| {
        let mut sockets = vec![("input", "IMAGE,MASK", Some(1))];
        let mut nodes = vec![];
        let mut links = vec![
            json!([1, 1, 0, 2, 0, "IMAGE"]),
            json!([2, 2, 0, 3, 0, "IMAGE"]),
        ];
        if width_link {
            sockets.push(("=resize_type.width", "INT", Some(7)));
            nodes.push(node(8, "PrimitiveNode", 0, &[], json!([640, "fixed"])));
            links.push(json!([7, 8, 0, 2, 1, "INT"]));
        }
        nodes.push(node(2, "ResizeImageMaskNode", 0, &sockets, widgets));
        convert(chain(nodes, Json::Array(links))).unwrap()["2"]["inputs"].clone()
    };
    let dims = resize(
        json!(["scale dimensions", 1024, 768, "center", "lanczos"]),
        false,
    );
    assert_eq!(
        numeric(&dims),
        numeric(
            &json!({"input": ["1", 0], "resize_type": "scale dimensions",
            "resize_type.width": 1024, "resize_type.height": 768, "resize_type.crop": "center",
            "scale_method": "lanczos"})
        )
    );
    let by = resize(json!(["scale by multiplier", 1.5, "area"]), false);
    assert_eq!(
        numeric(&by),
        numeric(
            &json!({"input": ["1", 0], "resize_type": "scale by multiplier",
            "resize_type.multiplier": 1.5, "scale_method": "area"})
        )
    );
    let linked = resize(
        json!(["scale dimensions", 512, 512, "center", "area"]),
        true,
    );
    assert_eq!(linked["resize_type.width"], json!(640));
    assert_eq!(linked["resize_type.height"], json!(512));
    assert_eq!(linked["scale_method"], json!("area"));
}

#[test]
fn a_bypassed_node_passes_its_input_of_the_same_type() {
    let ui = chain(
        vec![node(
            2,
            "ImageScaleBy",
            4,
            &[("image", "IMAGE", Some(1))],
            json!(["bicubic", 2]),
        )],
        json!([[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]]),
    );
    let api = convert(ui).unwrap();
    assert!(api.get("2").is_none(), "bypassed nodes are left out");
    assert_eq!(api["3"]["inputs"]["image"], json!(["1", 0]));
}

#[test]
fn a_bypassed_lora_passes_model_and_clip_slot_for_slot() {
    let ui = graph(
        vec![
            node(
                1,
                "CheckpointLoaderSimple",
                0,
                &[],
                json!(["a.safetensors"]),
            ),
            node(
                2,
                "LoraLoader",
                4,
                &[("model", "MODEL", Some(1)), ("clip", "CLIP", Some(2))],
                json!(["l.safetensors", 1, 1]),
            ),
            node(
                3,
                "CLIPTextEncode",
                0,
                &[("clip", "CLIP", Some(3))],
                json!(["hi"]),
            ),
        ],
        json!([
            [1, 1, 0, 2, 0, "MODEL"],
            [2, 1, 1, 2, 1, "CLIP"],
            [3, 2, 1, 3, 0, "CLIP"]
        ]),
    );
    assert_eq!(convert(ui).unwrap()["3"]["inputs"]["clip"], json!(["1", 1]));
}

fn problems(api: Json) -> Vec<(String, String)> {
    let dir = tempfile::tempdir().unwrap();
    let env = NodeEnv::new(
        dir.path().join("in"),
        dir.path().join("out"),
        dir.path().into(),
    );
    let workflow = Workflow::from_json(api).unwrap();
    match validate(&workflow, &NodeRegistry::with_builtins(), &env) {
        Err(SchedulerError::Invalid(report)) => report
            .node_errors
            .iter()
            .flat_map(|(id, n)| {
                n.errors
                    .iter()
                    .map(move |e| (id.to_string(), e.kind.to_string()))
            })
            .collect(),
        other => panic!("expected an invalid workflow, got {other:?}"),
    }
}

#[test]
fn a_muted_node_is_left_out_and_its_consumers_lose_the_input() {
    let ui = chain(
        vec![node(
            2,
            "ImageScaleBy",
            2,
            &[("image", "IMAGE", Some(1))],
            json!(["bicubic", 2]),
        )],
        json!([[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]]),
    );
    let api = convert(ui).unwrap();
    assert!(api.get("2").is_none());
    assert!(api["3"]["inputs"].get("image").is_none());
    assert_eq!(
        problems(api),
        vec![("3".to_string(), "required_input_missing".to_string())]
    );
}

#[test]
fn a_bypass_without_an_input_of_the_wanted_type_drops_the_input() {
    let ui = chain(
        vec![node(2, "EmptyImage", 4, &[], json!([8, 8, 1, 0]))],
        json!([[2, 2, 0, 3, 0, "IMAGE"]]),
    );
    let api = convert(ui).unwrap();
    assert!(api["3"]["inputs"].get("image").is_none());
}

/// A subgraph that inverts its image input twice and outputs it; its second inner node
/// takes `inner_mode`.
fn subgraph_workflow(instance_mode: i64, inner_mode: i64) -> Json {
    let sub = json!({
        "id": "sub-1", "version": 1, "name": "Double invert",
        "inputNode": {"id": -10, "bounding": [0, 0, 10, 10]},
        "outputNode": {"id": -20, "bounding": [0, 0, 10, 10]},
        "inputs": [{"id": "i0", "name": "image", "type": "IMAGE", "linkIds": [1]}],
        "outputs": [{"id": "o0", "name": "IMAGE", "type": "IMAGE", "linkIds": [3]}],
        "widgets": [],
        "nodes": [
            node(1, "ImageInvert", 0, &[("image", "IMAGE", Some(1))], json!([])),
            node(2, "ImageInvert", inner_mode, &[("image", "IMAGE", Some(2))], json!([])),
        ],
        "links": [
            {"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 1, "target_slot": 0, "type": "IMAGE"},
            {"id": 2, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "IMAGE"},
            {"id": 3, "origin_id": 2, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "IMAGE"}
        ]
    });
    let mut ui = chain(
        vec![node(
            2,
            "sub-1",
            instance_mode,
            &[("image", "IMAGE", Some(1))],
            json!([]),
        )],
        json!([[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]]),
    );
    ui["definitions"] = json!({"subgraphs": [sub]});
    ui
}

#[test]
fn subgraphs_expand_with_instance_prefixed_ids() {
    let api = convert(subgraph_workflow(0, 0)).unwrap();
    assert_eq!(api["2:1"]["inputs"]["image"], json!(["1", 0]));
    assert_eq!(api["2:2"]["inputs"]["image"], json!(["2:1", 0]));
    assert_eq!(api["3"]["inputs"]["image"], json!(["2:2", 0]));
    assert!(api.get("2").is_none());
    // Inside too, a bypassed node passes its input on.
    let api = convert(subgraph_workflow(0, 4)).unwrap();
    assert_eq!(api["3"]["inputs"]["image"], json!(["2:1", 0]));
    // A bypassed instance passes its own input on; nothing inside runs.
    let api = convert(subgraph_workflow(4, 0)).unwrap();
    assert_eq!(api["3"]["inputs"]["image"], json!(["1", 0]));
    assert!(api.get("2:1").is_none());
}

#[test]
fn a_missing_link_names_the_node_and_the_link() {
    let ui = graph(
        vec![node(
            5,
            "VAEDecode",
            0,
            &[("samples", "LATENT", Some(99))],
            json!([]),
        )],
        json!([]),
    );
    let err = convert(ui).unwrap_err();
    assert_eq!(
        err.to_string(),
        "node 5 'VAE Decode' (VAEDecode): input samples uses link 99, which is not in the links"
    );
    assert_eq!(err.kind(), Some(sakuga_telemetry::ErrorKind::InvalidInput));
}

#[test]
fn an_unknown_node_type_names_the_node_id_and_title() {
    let mut fancy = node(7, "FancyLoader", 0, &[], json!(["x"]));
    fancy["title"] = json!("My Loader");
    let err = convert(graph(vec![fancy], json!([]))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "node 7 'My Loader' (FancyLoader): unknown node type"
    );
    assert!(matches!(err, SchedulerError::UiNode { ref node_id, .. } if node_id == "7"));
}

#[test]
fn a_reroute_loop_is_an_error_not_a_hang() {
    let ui = chain(
        vec![
            node(5, "Reroute", 0, &[("", "*", Some(4))], json!([])),
            node(6, "Reroute", 0, &[("", "*", Some(5))], json!([])),
        ],
        json!([
            [4, 6, 0, 5, 0, "*"],
            [5, 5, 0, 6, 0, "*"],
            [2, 6, 0, 3, 0, "IMAGE"]
        ]),
    );
    let err = convert(ui).unwrap_err().to_string();
    assert!(
        err.starts_with("node 3 'Invert Image' (ImageInvert): input image:"),
        "{err}"
    );
}

#[test]
fn api_format_passes_unchanged_and_a_workflow_wrapper_is_unwrapped() {
    let api = read(Path::new(EXAMPLES).join("anime_txt2img.json"));
    assert_eq!(convert(api.clone()).unwrap(), api);
    let body = json!({"prompt": api.clone(), "client_id": "x"});
    assert_eq!(convert(body.clone()).unwrap(), body);
    let ui = read(Path::new(EXAMPLES).join("ui/anime_txt2img.json"));
    let wrapped = convert(json!({"workflow": ui})).unwrap();
    assert_same_graph(&wrapped, &api, "wrapped");
}

#[test]
fn widget_values_may_be_an_object_by_name() {
    let ui = graph(
        vec![node(
            1,
            "EmptyImage",
            0,
            &[],
            json!({"height": 16, "width": 32, "batch_size": 2, "color": 0}),
        )],
        json!([]),
    );
    let inputs = convert(ui).unwrap()["1"]["inputs"].clone();
    assert_eq!(
        (inputs["width"].clone(), inputs["height"].clone()),
        (json!(32), json!(16))
    );
}

/// Widgets promoted to a subgraph instance (`proxyWidgets`) that the instance saves no value
/// for keep the inner node's own, as the frontend shows them: ComfyUI's video frame
/// interpolation template relies on it.
#[test]
fn promoted_widgets_without_an_instance_value_keep_the_inner_value() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/workflows/templates/utility_video_frame_interpolation.json"
    );
    let api = convert(read(path)).unwrap();
    let inner = |id: &str| &api[id]["inputs"];
    assert_eq!(inner("16:9")["value"], json!(2), "PrimitiveInt keeps 2");
    assert_eq!(
        inner("16:13")["value"],
        json!(true),
        "PrimitiveBoolean keeps true"
    );
    assert_eq!(
        inner("16:1")["model_name"],
        json!("sakuga-demo-rife425.safetensors")
    );
}
