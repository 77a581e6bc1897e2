//! A real `sakuga serve` process for end-to-end tests.
#![allow(dead_code)]

pub mod http;
pub mod nats;
pub mod promstack;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Kills the server process when the test ends, pass or fail.
pub struct ServerProcess(pub Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits on the health Watch stream (not a poll) until the server says SERVING.
pub async fn wait_serving(url: &str) {
    use tonic_health::pb::health_check_response::ServingStatus;
    wait_health(url, ServingStatus::Serving).await;
}

/// Waits on the health Watch stream (not a poll) until the server reports `status`.
pub async fn wait_health(
    url: &str,
    status: tonic_health::pb::health_check_response::ServingStatus,
) {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    let mut updates = health.watch(request).await.unwrap().into_inner();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(update) = updates.message().await.unwrap() {
            if update.status == status as i32 {
                return;
            }
        }
        panic!("the health stream ended before {status:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("the server did not report {status:?}"));
}

/// A `sakuga serve` process started by [`spawn_server_full`].
pub struct Spawned {
    pub process: ServerProcess,
    /// `http://host:port` of the gRPC port.
    pub url: String,
    /// `host:port` of `/metrics`.
    pub metrics_addr: String,
    /// `host:port` of the ComfyUI API (empty with `--comfy-listen off`).
    pub comfy_addr: String,
    /// Its stderr, line by line, after the address line.
    pub logs: mpsc::Receiver<String>,
}

/// Starts `sakuga serve` on free ports with its folders under `dir`, `global` flags
/// before the subcommand and `serve` flags after it.
pub fn spawn_server_full(dir: &std::path::Path, global: &[&str], serve: &[&str]) -> Spawned {
    spawn_command(dir, global, "serve", serve)
}

/// Starts `sakuga <command>` (`serve` or `worker`) on free ports, as [`spawn_server_full`].
pub fn spawn_command(
    dir: &std::path::Path,
    global: &[&str],
    command: &str,
    serve: &[&str],
) -> Spawned {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sakuga"))
        .args(global)
        .args(["--data-dir", dir.join("data").to_str().unwrap()])
        .args(["--out", dir.join("out").to_str().unwrap()])
        .args(["--models-dir", dir.join("models").to_str().unwrap()])
        .args(["--input-dir", dir.join("input").to_str().unwrap()])
        .args([
            command,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(serve)
        // Free ports for the ComfyUI API too, unless the test chose its own.
        .args(if serve.contains(&"--comfy-listen") {
            &[][..]
        } else {
            &["--comfy-listen", "127.0.0.1:0"][..]
        })
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut comfy_addr = String::new();
    let (addr, metrics_addr) = loop {
        let line = lines
            .next()
            .expect("the server printed its address")
            .unwrap();
        // "sakuga serving the ComfyUI API on http://ADDR", before the gRPC line.
        if let Some(rest) = line.strip_prefix("sakuga serving the ComfyUI API on http://") {
            comfy_addr = rest.split_whitespace().next().unwrap().to_owned();
            continue;
        }
        // "sakuga serving gRPC on ADDR (metrics on http://ADDR/metrics)"
        if let Some(rest) = line.strip_prefix("sakuga serving gRPC on ") {
            let addr = rest.split_whitespace().next().unwrap().to_owned();
            let metrics = rest
                .split("http://")
                .nth(1)
                .and_then(|m| m.split('/').next())
                .unwrap_or_default()
                .to_owned();
            break (addr, metrics);
        }
    };
    let (tx, logs) = mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            // Nobody listening is fine: the lines are then only drained.
            let _ = tx.send(line);
        }
    });
    Spawned {
        process: ServerProcess(child),
        url: format!("http://{addr}"),
        metrics_addr,
        comfy_addr,
        logs,
    }
}

/// Starts `sakuga serve` on free ports with its folders under `dir`, `global` flags
/// before the subcommand and `serve` flags after it; returns the process and its URL.
pub fn spawn_server_with(
    dir: &std::path::Path,
    global: &[&str],
    serve: &[&str],
) -> (ServerProcess, String) {
    let spawned = spawn_server_full(dir, global, serve);
    (spawned.process, spawned.url)
}

/// [`spawn_server_with`] without extra flags.
pub fn spawn_server(dir: &std::path::Path) -> (ServerProcess, String) {
    spawn_server_with(dir, &[], &[])
}

/// Watches a job to its end, pulling frames as a player would; returns the final state.
pub async fn watch_to_end(client: &mut sakuga::client::SakugaClient, job_id: &str) -> i32 {
    use sakuga_proto::v1;
    let mut stream = client
        .render
        .watch(v1::WatchRequest {
            job_id: job_id.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(event) = stream.message().await.unwrap() {
        if let Some(v1::watch_event::Kind::FinalStatus(status)) = event.kind {
            return status.state;
        }
    }
    panic!("the watch of {job_id} ended without a final status");
}
