//! Third-party ComfyUI clients against the real `sakuga serve`: `comfy-api-simplified`
//! (PyPI) and `@stable-canvas/comfyui-client` (npm), nobody here wrote either. They submit
//! the demo workflows of `examples/`, follow progress over the WebSocket and fetch outputs
//! through `/view` (and upload an input image through `/upload/image`).
//!
//! The clients are installed into a cache under the target dir (`scripts/test-deps` does it
//! ahead of time; the test installs them itself when they are missing). Without python3,
//! node or the packages the tests skip with a message, unless
//! `SAKUGA_REQUIRE_COMFY_CLIENTS=1` (CI) makes that a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value as Json;

mod support;
use support::{Spawned, spawn_server_full, wait_serving};

const PY_PACKAGE: &str = "comfy-api-simplified==1.6.0";
const NPM_PACKAGES: &[&str] = &["@stable-canvas/comfyui-client@1.5.9", "ws@8"];

/// Where the clients are installed: `$SAKUGA_COMFY_CLIENTS_DIR`, else
/// `<target>/tmp/comfy-clients` (what `scripts/test-deps` fills).
fn cache_dir() -> PathBuf {
    std::env::var_os("SAKUGA_COMFY_CLIENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("comfy-clients"))
}

/// Skips (returns `None` with a message), or fails when CI requires the clients.
fn unavailable<T>(why: &str) -> Option<T> {
    if std::env::var("SAKUGA_REQUIRE_COMFY_CLIENTS").as_deref() == Ok("1") {
        panic!("{why} (SAKUGA_REQUIRE_COMFY_CLIENTS=1)");
    }
    eprintln!("skipped: {why}; run scripts/test-deps to install the ComfyUI clients");
    None
}

fn runs(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn install(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// The site dir holding `comfy_api_simplified`, installed there if missing.
fn python_client() -> Option<PathBuf> {
    if !runs("python3", "--version") {
        return unavailable("python3 is not installed");
    }
    let site = cache_dir().join("py");
    if !site.join("comfy_api_simplified").is_dir() {
        let target = site.to_str().unwrap();
        let args = [
            "-m", "pip", "install", "--quiet", "--target", target, PY_PACKAGE,
        ];
        if !install("python3", &args) {
            return unavailable(&format!("pip could not install {PY_PACKAGE}"));
        }
    }
    Some(site)
}

/// The npm prefix holding `@stable-canvas/comfyui-client` and `ws`, installed if missing.
fn npm_client() -> Option<PathBuf> {
    if !runs("node", "--version") || !runs("npm", "--version") {
        return unavailable("node or npm is not installed");
    }
    let prefix = cache_dir().join("npm");
    if !prefix
        .join("node_modules/@stable-canvas/comfyui-client")
        .is_dir()
    {
        std::fs::create_dir_all(&prefix).unwrap();
        let mut args = vec![
            "install",
            "--prefix",
            prefix.to_str().unwrap(),
            "--no-audit",
            "--no-fund",
            "--silent",
        ];
        args.extend_from_slice(NPM_PACKAGES);
        if !install("npm", &args) {
            return unavailable("npm could not install @stable-canvas/comfyui-client");
        }
    }
    Some(prefix)
}

async fn server() -> (tempfile::TempDir, Spawned) {
    let dir = tempfile::tempdir().unwrap();
    sakuga_models::demo::write_demo_models(&dir.path().join("models")).unwrap();
    let spawned = spawn_server_full(dir.path(), &[], &[]);
    wait_serving(&spawned.url).await;
    (dir, spawned)
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/comfy_clients")
        .join(name)
}

/// Runs a client script to its end (off the runtime) and parses its one-line summary.
async fn run_script(mut command: Command) -> Json {
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the client failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {stdout}"))
}

#[tokio::test]
async fn comfy_api_simplified_from_pypi_runs_the_demo_workflows() {
    let Some(site) = python_client() else { return };
    let (dir, server) = server().await;
    let work = dir.path().join("client");
    std::fs::create_dir_all(&work).unwrap();
    let mut command = Command::new("python3");
    command
        .arg(script("python_client.py"))
        .arg(&site)
        .arg(format!("http://{}", server.comfy_addr))
        .arg(examples())
        .arg(&work);
    let summary = run_script(command).await;

    assert_eq!(summary["txt2img"]["png"], true, "{summary}");
    assert_eq!(summary["txt2img"]["names"][0], "anime_txt2img_00001_.png");
    assert_eq!(summary["img2img"]["uploaded"]["type"], "input");
    assert_eq!(summary["img2img"]["png"], true);
    assert_eq!(summary["img2img"]["count"], 1);
    // The preview's frames arrive as ComfyUI binary previews (8-byte header, then PNG).
    assert!(
        summary["preview"]["frames"].as_u64().unwrap() >= 1,
        "{summary}"
    );
    assert_eq!(summary["preview"]["png"], true);
    assert_eq!(summary["preview"]["history"], "success");
    assert_eq!(summary["queue"]["queue_pending"], serde_json::json!([]));
    let uploaded = dir.path().join("input/clients/source.png");
    assert!(uploaded.is_file(), "the upload landed in the input dir");
}

#[tokio::test]
async fn stable_canvas_comfyui_client_from_npm_runs_the_demo_workflows() {
    let Some(prefix) = npm_client() else { return };
    let (_dir, server) = server().await;
    let mut command = Command::new("node");
    command
        .arg(script("npm_client.js"))
        .arg(&prefix)
        .arg(&server.comfy_addr)
        .arg(examples());
    let summary = run_script(command).await;

    assert_eq!(summary["device"], "cpu");
    for name in ["txt2img", "comic"] {
        let run = &summary[name];
        let images = run["images"].as_array().unwrap();
        assert!(!images.is_empty(), "{name}: {summary}");
        for image in images {
            assert_eq!(image["png"], true, "{name}: {image}");
            let url = image["url"].as_str().unwrap();
            assert!(url.contains("/view?filename="), "{url}");
        }
        let events: Vec<&str> = run["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        for kind in ["execution_start", "executing", "progress", "executed"] {
            assert!(
                events.contains(&kind),
                "{name} never saw {kind}: {events:?}"
            );
        }
        assert!(run["progress"].as_u64().unwrap() > 0);
    }
}
