//! ComfyUI's own workflow templates (`tests/workflows/templates/`, written by
//! `scripts/template_corpus.py`: UI format as shipped, model names mapped to the demo
//! models, pixel sizes cut to an eighth) validate and render through the real `sakuga` binary.
//! Their `LoadImage` nodes read `example.png`, the image ComfyUI ships in `input/` (or, for
//! image stitch, `angle_1.png`..`angle_4.png`, the T2I adapter's depth map, the SDXL
//! revision references); a generated one stands in for each. Their `LoadVideo` nodes read
//! `example.mp4`, a short clip ComfyUI's own writer (PyAV, libx264) made.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workflows/templates");

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

fn models() -> &'static Path {
    static MODELS: OnceLock<PathBuf> = OnceLock::new();
    MODELS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("template-corpus");
        std::fs::create_dir_all(&dir).unwrap();
        let out = sakuga(&dir, &["models", "demo", "--dir", "models"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        dir.join("models")
    })
}

/// An input dir with a 96x64 RGBA `example.png` (a gradient with a transparent corner).
fn input_dir(dir: &Path) -> PathBuf {
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let (w, h) = (96u32, 64u32);
    let mut pixels = Vec::with_capacity((w * h * 4) as usize);
    for y in 0..h {
        for x in 0..w {
            let alpha = if x < 16 && y < 16 { 0 } else { 255 };
            pixels.extend([(x * 255 / w) as u8, (y * 255 / h) as u8, 128, alpha]);
        }
    }
    let file = std::fs::File::create(input.join("example.png")).unwrap();
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(&pixels).unwrap();
    writer.finish().unwrap();
    // The image stitch template loads four views of one object, the T2I adapter one a
    // depth map, SDXL revision two reference images.
    let views = (1..=4).map(|view| format!("angle_{view}.png"));
    let others = [
        "depth-t2i-adapter_input.png",
        "sdxl_revision_text_prompts_ref_image1.png",
        "sdxl_revision_text_prompts_ref_image2.png",
    ];
    for name in views.chain(others.map(String::from)) {
        std::fs::copy(input.join("example.png"), input.join(name)).unwrap();
    }
    let clip = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/nodes/tests/fixtures/video/comfyui_pyav_x264.mp4"
    );
    std::fs::copy(clip, input.join("example.mp4")).unwrap();
    input
}

fn corpus() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(CORPUS)
        .expect("the template corpus")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

/// Active `SaveImage` nodes of a UI-format workflow (subgraphs included).
fn save_nodes(workflow: &serde_json::Value) -> usize {
    let count = |nodes: &serde_json::Value| {
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["type"] == "SaveImage" && n["mode"].as_u64().unwrap_or(0) == 0)
            .count()
    };
    let subgraphs = workflow["definitions"]["subgraphs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| count(&s["nodes"]))
        .sum::<usize>();
    count(&workflow["nodes"]) + subgraphs
}

#[test]
fn every_template_in_the_corpus_validates_and_renders() {
    let files = corpus();
    assert!(files.len() >= 4, "the corpus holds the SDXL templates");
    let models = models().to_str().unwrap().to_string();
    for file in files {
        let name = file.file_stem().unwrap().to_string_lossy().into_owned();
        let workflow: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let input = input_dir(dir.path());
        let input = input.to_str().unwrap();
        let path = file.to_str().unwrap();
        let flags = ["--models-dir", models.as_str(), "--input-dir", input];
        let valid = sakuga(dir.path(), &[&flags[..], &["validate", path]].concat());
        assert!(
            valid.status.success(),
            "{name} does not validate: {}{}",
            text(&valid.stdout),
            text(&valid.stderr)
        );
        let run = sakuga(
            dir.path(),
            &[&flags[..], &["run", path, "--out", "out", "--no-progress"]].concat(),
        );
        assert!(run.status.success(), "{name} failed: {}", text(&run.stderr));
        let images = std::fs::read_dir(dir.path().join("out"))
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "png"))
                })
                .count()
            })
            .unwrap_or(0);
        assert!(
            images >= save_nodes(&workflow),
            "{name}: {images} images for {} SaveImage nodes",
            save_nodes(&workflow)
        );
    }
}
