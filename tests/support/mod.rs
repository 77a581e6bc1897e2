//! A real `sakuga serve` process for end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
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
            if update.status == ServingStatus::Serving as i32 {
                return;
            }
        }
        panic!("the health stream ended before SERVING");
    })
    .await
    .expect("the server became ready");
}

/// Starts `sakuga serve` on free ports with its folders under `dir`, `global` flags
/// before the subcommand and `serve` flags after it; returns the process and its URL.
pub fn spawn_server_with(
    dir: &std::path::Path,
    global: &[&str],
    serve: &[&str],
) -> (ServerProcess, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sakuga"))
        .args(global)
        .args(["--data-dir", dir.join("data").to_str().unwrap()])
        .args(["--out", dir.join("out").to_str().unwrap()])
        .args(["--models-dir", dir.join("models").to_str().unwrap()])
        .args(["--input-dir", dir.join("input").to_str().unwrap()])
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(serve)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the server printed its address")
            .unwrap();
        if let Some(rest) = line.strip_prefix("sakuga serving gRPC on ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (ServerProcess(child), format!("http://{addr}"))
}

/// [`spawn_server_with`] without extra flags.
pub fn spawn_server(dir: &std::path::Path) -> (ServerProcess, String) {
    spawn_server_with(dir, &[], &[])
}
