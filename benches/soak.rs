//! Soak: a real `sakuga serve` under 10x its capacity for 5 minutes, with a mixed
//! workload (animation previews, single images, batches) and a population of slow
//! readers watching previews, while its RSS is sampled every second. The server must
//! refuse what it cannot take and stay flat: peak RSS within 1.2x of its level after
//! warm-up. Warm-up ends when every workload's queue is at its cap (each has refused a
//! submission): until then RSS grows with the queued work, by design bounded by the caps.
//!
//! `cargo bench --bench soak` (release). `SAKUGA_SOAK_SECS` shortens or lengthens the
//! overload (default 300). Figures go to BENCHMARKS.md by hand.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use sakuga::client::SakugaClient;
use sakuga_proto::v1;

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn workflow(kind: usize, i: usize) -> (Value, v1::Workload) {
    let color = i % 0xFF_FFFF;
    match kind % 3 {
        0 => (
            json!({
                "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 12, "color": color}},
                "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                "3": {"class_type": "StreamFrames", "inputs": {"images": ["2", 0], "fps": 24.0, "pace": true}},
            }),
            v1::Workload::Animation,
        ),
        1 => (
            json!({
                "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
                "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "scale_by": 2.0}},
                "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
            }),
            v1::Workload::SingleImage,
        ),
        _ => (
            json!({
                "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 4, "color": color}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
            }),
            v1::Workload::Batch,
        ),
    }
}

fn request(kind: usize, i: usize) -> v1::SubmitRequest {
    let (wf, workload) = workflow(kind, i);
    v1::SubmitRequest {
        workflow: Some(v1::submit_request::Workflow::WorkflowJson(wf.to_string())),
        workload: workload as i32,
        labels: [("soak".to_owned(), format!("{i}"))].into(),
        ..Default::default()
    }
}

/// Jobs the server finishes per second, measured closed-loop for `secs`.
async fn capacity(url: &str, secs: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..4 {
        let mut client = SakugaClient::connect(url, None).await.unwrap();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = c * 1_000_000;
            while Instant::now() < until {
                i += 1;
                let Ok(job) = client.render.submit(request(i, i)).await else {
                    continue;
                };
                let job_id = job.into_inner().job_id;
                let mut stream = client
                    .render
                    .watch(v1::WatchRequest {
                        job_id,
                        skip_frames: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                while let Ok(Some(_)) = stream.message().await {}
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / secs as f64
}

/// Watches a preview and reads one message a second: a client on a bad link.
fn slow_reader(mut client: SakugaClient, job_id: String) {
    tokio::spawn(async move {
        let Ok(response) = client
            .render
            .watch(v1::WatchRequest {
                job_id,
                ..Default::default()
            })
            .await
        else {
            return;
        };
        let mut stream = response.into_inner();
        while let Ok(Some(_)) = stream.message().await {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

fn main() {
    let soak_secs: u64 = std::env::var("SAKUGA_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sakuga"))
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .args(["--out", dir.path().join("out").to_str().unwrap()])
        .args(["--models-dir", dir.path().join("models").to_str().unwrap()])
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--comfy-listen",
            "off",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let url = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(rest) = line.strip_prefix("sakuga serving gRPC on ") {
            break format!("http://{}", rest.split_whitespace().next().unwrap());
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let cap = capacity(&url, 20).await;
        let offered = (cap * 10.0).max(10.0);
        println!("capacity {cap:.1} jobs/s closed-loop; offering {offered:.0} submissions/s for {soak_secs}s");
        let warm_rss = rss_kb(pid);
        let (accepted, denied, other) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        // Bit per workload (animation, single image, batch) that has refused a submission.
        let full = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let until = started + Duration::from_secs(soak_secs);
        let submitters = 8usize;
        let mut tasks = Vec::new();
        for s in 0..submitters {
            let client = SakugaClient::connect(&url, None).await.unwrap();
            let (accepted, denied, other) = (accepted.clone(), denied.clone(), other.clone());
            let full = full.clone();
            let period = Duration::from_secs_f64(submitters as f64 / offered);
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut i = s;
                while Instant::now() < until {
                    tick.tick().await;
                    i += submitters;
                    let mut c = client.clone();
                    match c.render.submit(request(i, i)).await {
                        Ok(job) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            // Every 10th preview gets a slow reader.
                            if i % 30 == 0 {
                                slow_reader(client.clone(), job.into_inner().job_id);
                            }
                        }
                        Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                            denied.fetch_add(1, Ordering::Relaxed);
                            full.fetch_or(1 << (i % 3), Ordering::Relaxed);
                        }
                        Err(_) => {
                            other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        // Post-warm-up level: once every queue is at its cap.
        let mut samples = Vec::new();
        let mut settled: Option<(usize, u64)> = None;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rss = rss_kb(pid);
            samples.push(rss);
            if settled.is_none() && full.load(Ordering::Relaxed) == 0b111 {
                settled = Some((samples.len(), rss));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Caps not all reached (a 4,096-job batch queue can take the whole soak to fill):
        // judge the second half against its start.
        let (settled_at, settled) = settled.unwrap_or_else(|| {
            let half = samples.len() / 2;
            println!("not every queue reached its cap; settled level taken at half time");
            (half, samples.get(half).copied().unwrap_or(warm_rss))
        });
        let settled = settled.max(1);
        println!(
            "every queue at its cap after {settled_at} s of overload, RSS {} MiB ({} MiB over the capacity run)",
            settled / 1024,
            settled.saturating_sub(warm_rss) / 1024
        );
        let after = &samples[settled_at.min(samples.len())..];
        let peak = after.iter().copied().max().unwrap_or(settled);
        let mut sorted = after.to_vec();
        sorted.sort_unstable();
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(settled);
        println!(
            "submissions: {} accepted, {} denied (RESOURCE_EXHAUSTED), {} other errors",
            accepted.load(Ordering::Relaxed),
            denied.load(Ordering::Relaxed),
            other.load(Ordering::Relaxed)
        );
        println!(
            "server RSS: {} MiB after the capacity run, {} MiB with the queues full; over the rest: median {} MiB, peak {} MiB = {:.2}x the settled level",
            warm_rss / 1024,
            settled / 1024,
            median / 1024,
            peak / 1024,
            peak as f64 / settled as f64
        );
    });
    let _ = child.kill();
    let _ = child.wait();
}
