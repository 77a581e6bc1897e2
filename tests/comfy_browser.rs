//! The real ComfyUI frontend (PyPI `comfyui-frontend-package`, never vendored) served by
//! `sakuga serve --frontend`, in a real browser: Debian's `chromium` driven by
//! `playwright-core` (npm). The UI boots from sakuga's API, loads an API-format workflow on
//! the demo checkpoint, queues it, and the output image appears on its Save Image node.
//! The screenshot is kept under the target dir as an artifact.
//!
//! The frontend and playwright-core are installed into a cache under the target dir
//! (`scripts/test-deps`, or the test itself when missing). Without chromium, node or the
//! packages the test skips with a message, unless `SAKUGA_REQUIRE_COMFY_BROWSER=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value as Json;

mod support;
use support::{spawn_server_full, wait_serving};

const FRONTEND: &str = "comfyui-frontend-package==1.58.1";
const PLAYWRIGHT: &str = "playwright-core@1.65.1";
const CHROMIUM: &str = "/usr/bin/chromium";

fn cache_dir() -> PathBuf {
    std::env::var_os("SAKUGA_COMFY_CLIENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("comfy-clients"))
}

fn unavailable<T>(why: &str) -> Option<T> {
    if std::env::var("SAKUGA_REQUIRE_COMFY_BROWSER").as_deref() == Ok("1") {
        panic!("{why} (SAKUGA_REQUIRE_COMFY_BROWSER=1)");
    }
    eprintln!("skipped: {why}; run scripts/test-deps to install chromium and the frontend");
    None
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The frontend's static folder, installed with pip if missing.
fn frontend() -> Option<PathBuf> {
    let site = cache_dir().join("frontend");
    let static_dir = site.join("comfyui_frontend_package/static");
    if !static_dir.join("index.html").is_file() {
        let target = site.to_str().unwrap();
        let args = [
            "-m", "pip", "install", "--quiet", "--target", target, FRONTEND,
        ];
        if !succeeds("python3", &args) {
            return unavailable(&format!("pip could not install {FRONTEND}"));
        }
    }
    Some(static_dir)
}

/// The npm prefix holding playwright-core (which never downloads a browser itself).
fn playwright() -> Option<PathBuf> {
    if !succeeds("node", &["--version"]) || !succeeds("npm", &["--version"]) {
        return unavailable("node or npm is not installed");
    }
    let prefix = cache_dir().join("browser");
    if !prefix.join("node_modules/playwright-core").is_dir() {
        std::fs::create_dir_all(&prefix).unwrap();
        let args = [
            "install",
            "--prefix",
            prefix.to_str().unwrap(),
            "--no-audit",
            "--no-fund",
            "--silent",
            PLAYWRIGHT,
        ];
        if !succeeds("npm", &args) {
            return unavailable(&format!("npm could not install {PLAYWRIGHT}"));
        }
    }
    Some(prefix)
}

#[tokio::test]
async fn the_comfyui_frontend_runs_a_workflow_on_sakuga_in_chromium() {
    if !Path::new(CHROMIUM).is_file() {
        let _: Option<()> = unavailable("chromium is not installed (apt-get install chromium)");
        return;
    }
    let Some(static_dir) = frontend() else { return };
    let Some(prefix) = playwright() else { return };
    let dir = tempfile::tempdir().unwrap();
    sakuga_models::demo::write_demo_models(&dir.path().join("models")).unwrap();
    let server = spawn_server_full(
        dir.path(),
        &[],
        &["--frontend", static_dir.to_str().unwrap()],
    );
    wait_serving(&server.url).await;

    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("comfy-browser");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("screenshot.png");
    let _ = std::fs::remove_file(&screenshot);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut command = Command::new("node");
    command
        .arg(root.join("tests/comfy_clients/browser.js"))
        .arg(&prefix)
        .arg(format!("http://{}/", server.comfy_addr))
        .arg(root.join("examples/anime_txt2img.json"))
        .arg(&screenshot);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser run failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Json = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}): {stdout}"));

    assert_eq!(summary["nodes"], 8, "{summary}");
    assert_eq!(summary["content_type"], "image/png");
    let shown = &summary["shown"];
    assert!(
        shown["src"]
            .as_str()
            .unwrap()
            .contains("/view?filename=anime_txt2img_")
    );
    assert_eq!(
        (shown["width"].as_u64(), shown["height"].as_u64()),
        (Some(256), Some(256))
    );
    assert_eq!(shown["output_nodes"], serde_json::json!(["9"]));
    assert_eq!(summary["api_errors"], serde_json::json!([]));
    let png = std::fs::read(&screenshot).unwrap();
    assert_eq!(
        &png[..4],
        b"\x89PNG",
        "the screenshot is kept at {}",
        screenshot.display()
    );
    eprintln!("screenshot: {}", screenshot.display());
}
