//! gRPC throughput and latency on loopback: trivial jobs submitted and followed to their
//! final status by 1 and 8 concurrent clients, then a 10x overload burst with peak RSS.
//!
//! `cargo bench --bench grpc` (release profile). Figures go to BENCHMARKS.md by hand.
//! Server and clients share the process, so RSS covers both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::TcpListener;

use sakuga::client::SakugaClient;
use sakuga::server::{EngineStart, ServerConfig, run};
use sakuga_nodes::{NodeEnv, NodeRegistry};
use sakuga_proto::v1;
use sakuga_proto::v1::watch_event::Kind;
use sakuga_scheduler::{EngineConfig, EngineHandle};
use sakuga_telemetry::{Signals, SignalsConfig};

// The same allocator as the `sakuga` binary, so the figures are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn trivial(i: usize) -> v1::SubmitRequest {
    // One 8x8 frame; the colour varies so the output cache cannot serve whole jobs.
    let wf = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i % 0xFF_FFFF}},
        "2": {"class_type": "StreamFrames", "inputs": {"images": ["1", 0], "fps": 24.0, "pace": false}},
    });
    v1::SubmitRequest {
        workflow: Some(v1::submit_request::Workflow::WorkflowJson(wf.to_string())),
        workload: v1::Workload::SingleImage as i32,
        ..Default::default()
    }
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time this process has used (user + system), from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Submits `per_client` jobs per client, each followed to its final status.
/// `in_flight` jobs at a time share each client's connection (HTTP/2 multiplexing).
async fn closed_loop(
    url: &str,
    clients: usize,
    in_flight: usize,
    per_client: usize,
) -> (f64, Vec<Duration>) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let connection = SakugaClient::connect(url, None).await.unwrap();
        for f in 0..in_flight {
            let mut client = connection.clone();
            let c = c * in_flight + f;
            let per_client = per_client / in_flight;
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_client);
                for i in 0..per_client {
                    let t = Instant::now();
                    let job = client
                        .render
                        .submit(trivial(c * per_client + i))
                        .await
                        .unwrap()
                        .into_inner()
                        .job_id;
                    let request = v1::WatchRequest {
                        job_id: job,
                        skip_frames: true,
                        ..Default::default()
                    };
                    let mut stream = client.render.watch(request).await.unwrap().into_inner();
                    while let Some(event) = stream.message().await.unwrap() {
                        if let Some(Kind::FinalStatus(f)) = event.kind {
                            assert_eq!(f.state, v1::JobState::Succeeded as i32, "{}", f.error);
                            break;
                        }
                    }
                    latencies.push(t.elapsed());
                }
                latencies
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort();
    (rate, all)
}

/// Open loop: `clients` submitters fire without waiting for jobs; returns (accepted, denied, seconds).
async fn burst(url: &str, clients: usize, per_client: usize) -> (usize, usize, f64) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = SakugaClient::connect(&url, None).await.unwrap();
            let (mut ok, mut denied) = (0, 0);
            for i in 0..per_client {
                match client
                    .render
                    .submit(trivial(1_000_000 + c * per_client + i))
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => denied += 1,
                    Err(s) => panic!("unexpected {s}"),
                }
            }
            (ok, denied)
        }));
    }
    let (mut ok, mut denied) = (0, 0);
    for t in tasks {
        let (o, d) = t.await.unwrap();
        ok += o;
        denied += d;
    }
    (ok, denied, started.elapsed().as_secs_f64())
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let env = NodeEnv::new(root.join("input"), root.join("output"), root.join("models"));
        let mut config = EngineConfig {
            data_dir: Some(root.join("data")),
            ..EngineConfig::default()
        };
        config.tunables.admission.queue_caps.single_image = 1024;
        let engine = EngineHandle::start(
            config,
            Arc::new(NodeRegistry::with_builtins()),
            Arc::new(env),
            Signals::new(SignalsConfig::default()),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(run(listener, EngineStart::Ready(engine.clone()), ServerConfig::default(), async {
            let _ = stopped.await;
        }));

        // Warm-up: connections, estimator, allocator.
        closed_loop(&url, 1, 1, 200).await;
        // The machine is shared and noisy: rounds interleave the configurations and the
        // medians are reported.
        let rounds: usize = std::env::var("SAKUGA_BENCH_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(3);
        // SAKUGA_BENCH_ONLY=1x32 runs one configuration and skips the burst (for profiling).
        let only = std::env::var("SAKUGA_BENCH_ONLY").ok();
        let configs: Vec<(usize, usize)> = [(1usize, 1usize), (8, 1), (1, 32), (8, 16)]
            .into_iter()
            .filter(|(c, f)| only.as_ref().is_none_or(|o| *o == format!("{c}x{f}")))
            .collect();
        let mut results: Vec<Vec<(f64, f64, f64, f64)>> = vec![Vec::new(); configs.len()];
        for _ in 0..rounds {
            for (slot, &(clients, in_flight)) in configs.iter().enumerate() {
                let per = 4000 / clients;
                let cpu_before = cpu_time();
                let (rate, lat) = closed_loop(&url, clients, in_flight, per).await;
                let cpu_per_job = (cpu_time() - cpu_before).as_secs_f64() * 1e6 / lat.len() as f64;
                results[slot].push((
                    rate,
                    percentile(&lat, 0.5).as_secs_f64() * 1e3,
                    percentile(&lat, 0.99).as_secs_f64() * 1e3,
                    cpu_per_job,
                ));
            }
        }
        // CPU time per job (server and client together, as they share the process) is the
        // steadier figure on a shared machine: 2 cores / CPU per job bounds the rate.
        for (&(clients, in_flight), runs) in configs.iter().zip(&results) {
            let median = |pick: fn(&(f64, f64, f64, f64)) -> f64| {
                let mut v: Vec<f64> = runs.iter().map(pick).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let rates: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.0)).collect();
            println!(
                "{clients} client(s) x {in_flight} in flight: median {:.0} jobs/s end to end (rounds: {}), submit-to-finish p50 {:.2} ms, p99 {:.2} ms, CPU {:.0} us/job",
                median(|r| r.0),
                rates.join(", "),
                median(|r| r.1),
                median(|r| r.2),
                median(|r| r.3),
            );
        }
        if only.is_some() {
            let _ = stop.send(());
            let _ = server.await;
            return;
        }
        let rss_before = status_kb("VmRSS:");
        // 10x the single_image queue cap, fired from 32 concurrent submitters.
        let (ok, denied, secs) = burst(&url, 32, 320).await;
        let demand = engine.demand().await.unwrap();
        println!(
            "overload burst: {} submissions in {secs:.2}s ({:.0}/s), {ok} accepted, {denied} denied (RESOURCE_EXHAUSTED), queue after burst {}",
            ok + denied,
            (ok + denied) as f64 / secs,
            demand.queued_jobs
        );
        // Let the accepted work finish (followed through its last job's feed).
        let page = engine
            .list(Default::default(), 1, None)
            .await
            .unwrap();
        if let Some(last) = page.jobs.first() {
            let mut watch = engine.watch(&last.job_id).await.unwrap();
            while watch.next().await.is_some() {}
        }
        println!(
            "RSS: {} MiB before the burst, {} MiB after, peak {} MiB",
            rss_before / 1024,
            status_kb("VmRSS:") / 1024,
            status_kb("VmHWM:") / 1024
        );
        let _ = stop.send(());
        let _ = server.await;
    });
}
