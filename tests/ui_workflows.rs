//! End-to-end tests of UI-format workflows, workflows embedded in images, and animated
//! outputs, through the real `sakuga` binary on the demo models: each UI example renders
//! the same pixels as its API twin, a saved PNG runs again, the README's main job writes an
//! animated WebP of the right frames, size and timing, and `submit` sends a UI-format file
//! to a live server.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");

fn sakuga(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sakuga"))
        .current_dir(dir)
        .args(args)
        .env_remove("SAKUGA_CONFIG")
        .output()
        .expect("the sakuga binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One demo models folder for every test of this binary.
fn models() -> &'static Path {
    static MODELS: OnceLock<PathBuf> = OnceLock::new();
    MODELS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-workflows");
        std::fs::create_dir_all(&dir).unwrap();
        let out = sakuga(&dir, &["models", "demo", "--dir", "models"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        dir.join("models")
    })
}

/// Runs `workflow` with its outputs under `dir/out`; returns that folder.
fn run(dir: &Path, workflow: &Path, out: &str) -> PathBuf {
    let models = models().to_str().unwrap();
    let output = sakuga(
        dir,
        &[
            "--models-dir",
            models,
            "run",
            workflow.to_str().unwrap(),
            "--out",
            out,
            "--no-progress",
        ],
    );
    assert!(
        output.status.success(),
        "run {} failed: {}",
        workflow.display(),
        text(&output.stderr)
    );
    dir.join(out)
}

/// Every file under `root` by relative path, decoded to what a viewer shows: PNG pixels,
/// or the frames and timestamps of an animated WebP. Embedded workflow text is left out,
/// as it differs between the formats by design.
fn rendered(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.strip_prefix(root).unwrap().display().to_string();
            let bytes = std::fs::read(&path).unwrap();
            let decoded = match path.extension().and_then(|e| e.to_str()) {
                Some("png") => png_pixels(&bytes),
                Some("webp") => webp_frames(&bytes)
                    .into_iter()
                    .flat_map(|(ts, data)| ts.to_le_bytes().into_iter().chain(data))
                    .collect(),
                _ => bytes,
            };
            files.insert(name, decoded);
        }
    }
    files
}

fn png_pixels(bytes: &[u8]) -> Vec<u8> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

/// `(end timestamp ms, RGBA)` of each frame.
fn webp_frames(bytes: &[u8]) -> Vec<(i32, Vec<u8>)> {
    webp_animation::Decoder::new(bytes)
        .unwrap()
        .into_iter()
        .map(|frame| (frame.timestamp(), frame.data().to_vec()))
        .collect()
}

#[test]
fn every_ui_example_renders_what_its_api_twin_renders() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "anime_preview.json",
        "anime_txt2img.json",
        "img2img_lora.json",
        "comic_panels_batch.json",
        "sd15_comfyui_export.json",
    ] {
        let stem = name.trim_end_matches(".json");
        let api = run(
            dir.path(),
            &Path::new(EXAMPLES).join(name),
            &format!("{stem}-api"),
        );
        let ui = run(
            dir.path(),
            &Path::new(EXAMPLES).join("ui").join(name),
            &format!("{stem}-ui"),
        );
        let (api, ui) = (rendered(&api), rendered(&ui));
        assert!(!api.is_empty(), "{name} saved nothing");
        assert_eq!(
            api.keys().collect::<Vec<_>>(),
            ui.keys().collect::<Vec<_>>(),
            "{name}: other files"
        );
        for (file, pixels) in &api {
            assert!(
                ui[file] == *pixels,
                "{name}: {file} differs between UI and API format"
            );
        }
    }
}

#[test]
fn the_readme_main_job_saves_an_animated_webp_of_its_preview() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        &Path::new(EXAMPLES).join("anime_preview.json"),
        "out",
    );
    let bytes = std::fs::read(out.join("anime_preview_00001_.webp")).unwrap();
    let decoder = webp_animation::Decoder::new(&bytes).unwrap();
    assert_eq!(
        decoder.dimensions(),
        (256, 256),
        "4x upscaled 64x64 key frames"
    );
    let frames = webp_frames(&bytes);
    // 6 key frames with one RIFE in-between in each of the 5 gaps.
    assert_eq!(frames.len(), 11);
    // 24 FPS is int(1000 / 24) = 41 ms a frame, as ComfyUI writes it.
    let ends: Vec<i32> = frames.iter().map(|(ts, _)| *ts).collect();
    assert_eq!(ends, (1..=11).map(|i| i * 41).collect::<Vec<_>>());
    let distinct = frames.windows(2).filter(|w| w[0].1 != w[1].1).count();
    assert!(
        distinct >= 5,
        "an animation, not a still: {distinct} changes"
    );
    // The workflow rides along: the WebP runs again.
    let again = sakuga(
        dir.path(),
        &[
            "--models-dir",
            models().to_str().unwrap(),
            "validate",
            out.join("anime_preview_00001_.webp").to_str().unwrap(),
        ],
    );
    assert!(again.status.success(), "{}", text(&again.stderr));
}

#[test]
fn an_image_with_an_embedded_workflow_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let first = run(
        dir.path(),
        &Path::new(EXAMPLES).join("anime_txt2img.json"),
        "first",
    );
    let png = first.join("anime_txt2img_00001_.png");
    // sakuga's own PNG carries the API-format prompt.
    let again = run(dir.path(), &png, "again");
    // ComfyUI's PNG from the UI may carry only the UI-format workflow.
    let ui = std::fs::read_to_string(Path::new(EXAMPLES).join("ui/anime_txt2img.json")).unwrap();
    let comfy_png = dir.path().join("from_comfyui.png");
    let pixels = sakuga_nodes::image::Pixels {
        width: 2,
        height: 2,
        channels: 3,
        data: vec![0; 12],
    };
    sakuga_nodes::image::write_png(&comfy_png, &pixels, &[("workflow", ui.as_str())]).unwrap();
    let from_ui = run(dir.path(), &comfy_png, "from_ui");
    let expected = rendered(&first);
    assert_eq!(rendered(&again), expected);
    assert_eq!(rendered(&from_ui), expected);

    let bare = dir.path().join("bare.png");
    sakuga_nodes::image::write_png(&bare, &pixels, &[]).unwrap();
    let out = sakuga(dir.path(), &["validate", bare.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("png: no embedded prompt or workflow"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn ui_conversion_errors_name_the_node_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut ui: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(EXAMPLES).join("ui/sd15_comfyui_export.json")).unwrap(),
    )
    .unwrap();
    ui["nodes"][6]["type"] = "CheckpointLoaderFancy".into();
    ui["nodes"][6]["title"] = "Load Checkpoint".into();
    let path = dir.path().join("bad.json");
    std::fs::write(&path, ui.to_string()).unwrap();
    let out = sakuga(dir.path(), &["validate", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr)
            .contains("node 4 'Load Checkpoint' (CheckpointLoaderFancy): unknown node type"),
        "{}",
        text(&out.stderr)
    );
    let ok = sakuga(
        dir.path(),
        &[
            "--models-dir",
            models().to_str().unwrap(),
            "validate",
            Path::new(EXAMPLES)
                .join("ui/anime_preview.json")
                .to_str()
                .unwrap(),
        ],
    );
    assert!(ok.status.success(), "{}", text(&ok.stderr));
}

#[test]
fn submit_sends_a_ui_format_workflow_to_a_live_server() {
    let dir = tempfile::tempdir().unwrap();
    let demo = sakuga(dir.path(), &["models", "demo", "--dir", "models"]);
    assert!(demo.status.success(), "{}", text(&demo.stderr));
    let (_server, url) = support::spawn_server(dir.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(support::wait_serving(&url));
    let ui_text =
        std::fs::read_to_string(Path::new(EXAMPLES).join("ui/img2img_lora.json")).unwrap();
    runtime.block_on(validate_and_estimate_over_grpc(&url, &ui_text));
    let submit = |workflow: &Path| {
        sakuga(
            dir.path(),
            &[
                "submit",
                workflow.to_str().unwrap(),
                "--server",
                &url,
                "--watch",
            ],
        )
    };
    let out = submit(&Path::new(EXAMPLES).join("ui/img2img_lora.json"));
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let saved = dir.path().join("out/img2img_lora_00001_.png");
    assert!(saved.exists(), "{}", text(&out.stdout));
    // The saved PNG carries the converted (API-format) prompt, and submits as it is.
    let again = submit(&saved);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(dir.path().join("out/img2img_lora_00002_.png").exists());

    let mut bad: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(EXAMPLES).join("ui/img2img_lora.json")).unwrap(),
    )
    .unwrap();
    bad["nodes"][1]["inputs"][0]["link"] = 77.into();
    let path = dir.path().join("bad.json");
    std::fs::write(&path, bad.to_string()).unwrap();
    let out = submit(&path);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr)
            .contains("node 2 'Load LoRA (style)' (LoraLoader): input model uses link 77"),
        "{}",
        text(&out.stderr)
    );
}

/// `ValidateWorkflow` and `EstimateWorkflow` take UI format as `Submit` does.
async fn validate_and_estimate_over_grpc(url: &str, ui_text: &str) {
    use sakuga_proto::v1;
    let mut client = sakuga::client::SakugaClient::connect(url, None)
        .await
        .unwrap();
    let report = client
        .nodes
        .validate_workflow(v1::ValidateWorkflowRequest {
            workflow_json: ui_text.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(report.valid, "{:?}", report.problems);
    let estimate = client
        .nodes
        .estimate_workflow(v1::EstimateWorkflowRequest {
            workflow_json: ui_text.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(estimate.estimate.is_some());
    let unknown = ui_text.replace("\"LoraLoader\"", "\"LoraLoaderX\"");
    let refused = client
        .nodes
        .validate_workflow(v1::ValidateWorkflowRequest {
            workflow_json: unknown,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        refused.message(),
        "node 2 'Load LoRA (style)' (LoraLoaderX): unknown node type"
    );
}
