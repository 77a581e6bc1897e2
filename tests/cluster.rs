//! Cluster mode end to end (DESIGN.md section 11): a real nats-server with JetStream, real
//! `sakuga serve --nats` gateways and `sakuga worker --nats` processes, real gRPC clients.
//!
//! - 2 gateways, 3 workers, 200 jobs: a worker killed mid-job (SIGKILL), a gateway killed
//!   while clients watch through it, nats-server killed and restarted; every accepted job
//!   ends succeeded exactly once, with exactly one output object, none lost; the
//!   redelivered job's Watch shows `job_recovered` with its attempt number; an idempotency
//!   key retried on the other gateway returns the same job.
//! - A job whose workers keep dying fails with `worker_lost` after `max_deliver`.
//! - `GetOutput` returns the bytes the worker wrote; `submit --watch --save` writes them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;

use sakuga::client::SakugaClient;
use sakuga_proto::v1;

mod support;
use support::nats::{self, NatsServer};
use support::{Spawned, spawn_command, wait_health, wait_serving};

use tonic_health::pb::health_check_response::ServingStatus;

/// A job of `frames` paced frames at `fps` plus one saved 8x8 image tagged `tag`.
fn job(tag: u32, frames: u32, fps: f64) -> String {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": frames, "color": tag}},
        "2": {"class_type": "StreamFrames", "inputs": {"images": ["1", 0], "fps": fps, "pace": true}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": tag}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": format!("job{tag}")}},
    })
    .to_string()
}

fn submit_request(workflow: String, key: &str) -> v1::SubmitRequest {
    v1::SubmitRequest {
        workflow: Some(v1::submit_request::Workflow::WorkflowJson(workflow)),
        workload: v1::Workload::SingleImage as i32,
        idempotency_key: key.to_owned(),
        ..Default::default()
    }
}

struct Fleet {
    nats: NatsServer,
    root: tempfile::TempDir,
}

impl Fleet {
    fn start() -> Option<Self> {
        if !nats::available() {
            return None;
        }
        let root = tempfile::tempdir().unwrap();
        let nats = NatsServer::start(root.path());
        Some(Fleet { nats, root })
    }

    fn cluster_flags(&self, ack_wait: &str, max_deliver: &str) -> Vec<String> {
        [
            "--nats",
            &self.nats.url(),
            "--ack-wait",
            ack_wait,
            "--max-deliver",
            max_deliver,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn gateway(&self, name: &str, flags: &[String]) -> Spawned {
        let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
        args.extend(["--comfy-listen", "off"]);
        spawn_command(&self.root.path().join(name), &[], "serve", &args)
    }

    fn worker(&self, name: &str, flags: &[String]) -> Spawned {
        let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
        args.extend(["--worker-id", name]);
        spawn_command(&self.root.path().join(name), &[], "worker", &args)
    }
}

async fn connect(url: &str) -> SakugaClient {
    wait_serving(url).await;
    SakugaClient::connect(url, None).await.unwrap()
}

async fn get_job(client: &mut SakugaClient, job_id: &str) -> v1::Job {
    client
        .render
        .get_job(v1::GetJobRequest {
            job_id: job_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Watches a job from the start to its final status; returns every event kind seen.
async fn watch_all(
    client: &mut SakugaClient,
    job_id: &str,
) -> Result<Vec<v1::watch_event::Kind>, tonic::Status> {
    let request = v1::WatchRequest {
        job_id: job_id.into(),
        skip_frames: true,
        ..Default::default()
    };
    let mut stream = client.render.watch(request).await?.into_inner();
    let mut seen = Vec::new();
    while let Some(event) = stream.message().await? {
        if let Some(kind) = event.kind {
            let last = matches!(kind, v1::watch_event::Kind::FinalStatus(_));
            seen.push(kind);
            if last {
                break;
            }
        }
    }
    Ok(seen)
}

/// Watches until attempt `attempt` of the job has started a node (it is running on a
/// worker); returns its record.
async fn wait_running(client: &mut SakugaClient, job_id: &str, attempt: usize) -> v1::Job {
    let request = v1::WatchRequest {
        job_id: job_id.into(),
        skip_frames: true,
        ..Default::default()
    };
    let mut stream = client.render.watch(request).await.unwrap().into_inner();
    let mut recoveries = 0;
    while let Some(event) = stream.message().await.unwrap() {
        match event.kind {
            Some(v1::watch_event::Kind::Stage(s)) if s.name == "job_recovered" => recoveries += 1,
            Some(v1::watch_event::Kind::NodeStarted(_)) if recoveries + 1 == attempt => break,
            _ => {}
        }
    }
    get_job(client, job_id).await
}

fn recovered_attempt(events: &[v1::watch_event::Kind]) -> Option<String> {
    events.iter().find_map(|k| match k {
        v1::watch_event::Kind::Stage(s) if s.name == "job_recovered" => Some(s.detail.clone()),
        _ => None,
    })
}

/// Counts the objects under each job in `sakuga_outputs`.
async fn output_objects(nats_url: &str) -> BTreeMap<String, usize> {
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let store = js.get_object_store("sakuga_outputs").await.unwrap();
    let mut list = store.list().await.unwrap();
    let mut counts = BTreeMap::new();
    while let Some(info) = list.next().await {
        let info = info.unwrap();
        let job = info.name.split('/').next().unwrap().to_owned();
        *counts.entry(job).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_survives_a_lost_worker_a_lost_gateway_and_a_nats_restart() {
    let Some(mut fleet) = Fleet::start() else {
        return;
    };
    let flags = fleet.cluster_flags("2", "3");
    let gateway_a = fleet.gateway("gw-a", &flags);
    let mut gateway_b = Some(fleet.gateway("gw-b", &flags));
    let mut workers: Vec<Option<Spawned>> = (0..3)
        .map(|i| Some(fleet.worker(&format!("w{i}"), &flags)))
        .collect();
    let mut a = connect(&gateway_a.url).await;
    let url_b = gateway_b.as_ref().unwrap().url.clone();
    let mut b = connect(&url_b).await;

    // 200 jobs through both gateways.
    let mut ids = Vec::new();
    for i in 0..200u32 {
        let client = if i % 2 == 0 { &mut a } else { &mut b };
        // Job 40 plays for 2 s, long enough to be killed in the middle of.
        let (frames, fps) = if i == 40 { (40, 20.0) } else { (4, 40.0) };
        let reply = client
            .render
            .submit(submit_request(job(i, frames, fps), &format!("fleet-{i}")))
            .await
            .unwrap()
            .into_inner();
        ids.push(reply.job_id);
    }
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 200, "job ids are unique across gateways");
    // The same key on the other gateway is the same job.
    let again = a
        .render
        .submit(submit_request(job(1, 4, 40.0), "fleet-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.job_id, ids[1]);
    assert!(again.deduplicated);

    // Clients watching through gateway B, which is about to die.
    let watched: Vec<String> = ids[150..160].to_vec();
    let mut watchers = Vec::new();
    for id in watched.clone() {
        let (url_b, url_a) = (url_b.clone(), gateway_a.url.clone());
        watchers.push(tokio::spawn(async move {
            let mut via_b = SakugaClient::connect(&url_b, None).await.unwrap();
            if let Ok(events) = watch_all(&mut via_b, &id).await {
                return events;
            }
            // Its gateway died: watch again through the other one, from the start (again
            // while NATS restarts, which that gateway reports as UNAVAILABLE).
            loop {
                let mut via_a = SakugaClient::connect(&url_a, None).await.unwrap();
                match watch_all(&mut via_a, &id).await {
                    Ok(events) => return events,
                    Err(status) => eprintln!("watching {id} again after: {status:?}"),
                }
            }
        }));
    }

    // Kill a worker in the middle of a job.
    let victim_job = ids[40].clone();
    let running = wait_running(&mut a, &victim_job, 1).await;
    let victim = running.worker.clone();
    let index: usize = victim.trim_start_matches('w').parse().unwrap();
    let mut dead = workers[index].take().unwrap();
    dead.process.0.kill().unwrap();
    dead.process.0.wait().unwrap();
    let replacement = format!("w{index}-again");
    workers[index] = Some(fleet.worker(&replacement, &flags));

    // Kill gateway B while clients watch through it.
    let mut gone = gateway_b.take().unwrap();
    gone.process.0.kill().unwrap();
    gone.process.0.wait().unwrap();

    // Kill nats-server; the gateway reports NOT_SERVING and refuses work, then recovers.
    wait_running(&mut a, &ids[120], 1).await;
    fleet.nats.stop();
    wait_health(&gateway_a.url, ServingStatus::NotServing).await;
    let refused = a
        .render
        .submit(submit_request(job(999, 1, 40.0), "while-down"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    fleet.nats.restart();
    wait_health(&gateway_a.url, ServingStatus::Serving).await;

    // Every job ends, succeeded, once.
    let mut finals = BTreeMap::new();
    for id in &ids {
        let Ok(events) = tokio::time::timeout(Duration::from_secs(60), watch_all(&mut a, id)).await
        else {
            let job = get_job(&mut a, id).await;
            for (i, w) in workers.iter().enumerate() {
                for line in w
                    .as_ref()
                    .map(|w| w.logs.try_iter().collect::<Vec<_>>())
                    .unwrap_or_default()
                {
                    eprintln!("worker {i}: {line}");
                }
            }
            let client = async_nats::connect(fleet.nats.url()).await.unwrap();
            let js = async_nats::jetstream::new(client);
            let stream = js.get_stream("SAKUGA_EVENTS").await.unwrap();
            let last = stream
                .get_last_raw_message_by_subject(&format!("sakuga.events.{id}"))
                .await;
            eprintln!(
                "last event stored: {:?}",
                last.map(|m| <v1::WatchEvent as prost::Message>::decode(m.payload.as_ref()))
            );
            panic!("job {id} never finished: {job:?}");
        };
        finals.insert(id.clone(), events.unwrap());
    }
    for (id, events) in &finals {
        let job = get_job(&mut a, id).await;
        assert_eq!(job.state, v1::JobState::Succeeded as i32, "{id}: {job:?}");
        assert_eq!(
            job.outputs.len(),
            1,
            "{id}: one SaveImage output, no duplicates"
        );
        let ends = events
            .iter()
            .filter(|k| matches!(k, v1::watch_event::Kind::FinalStatus(_)))
            .count();
        assert_eq!(ends, 1, "{id}: one final status");
    }
    let objects = output_objects(&fleet.nats.url()).await;
    let ids_set: BTreeSet<&String> = ids.iter().collect();
    for id in &ids {
        if !objects.contains_key(id) {
            let job = get_job(&mut a, id).await;
            eprintln!("no output object for {id}: {job:?}");
        }
    }

    assert_eq!(objects.len(), 200, "every job stored its output");
    for (job, count) in &objects {
        assert!(ids_set.contains(job), "an object of an unknown job {job}");
        assert_eq!(*count, 1, "job {job} stored {count} objects");
    }

    // The killed worker's job ran again, and its Watch says which attempt.
    let detail = recovered_attempt(&finals[&victim_job]).unwrap_or_else(|| {
        panic!(
            "no job_recovered for {victim_job}: {:?}",
            finals[&victim_job]
        )
    });
    assert!(detail.contains("attempt 2"), "{detail}");
    let redone = get_job(&mut a, &victim_job).await;
    assert!(redone.recovered && redone.attempts >= 2, "{redone:?}");
    assert_ne!(redone.worker, victim);

    for watcher in watchers {
        let events = watcher.await.unwrap();
        assert!(
            events.iter().any(|k| matches!(k, v1::watch_event::Kind::FinalStatus(f) if f.state == v1::JobState::Succeeded as i32)),
            "a watcher of the dead gateway did not see its job finish: {events:?}"
        );
    }
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_workers_keep_dying_fails_as_worker_lost() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let flags = fleet.cluster_flags("1", "2");
    let gateway = fleet.gateway("gw", &flags);
    let mut client = connect(&gateway.url).await;
    let id = client
        .render
        .submit(submit_request(job(7, 200, 20.0), "doomed"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let mut lost_on = Vec::new();
    for attempt in 1..=2 {
        let mut worker = fleet.worker(&format!("doomed-{attempt}"), &flags);
        let running = wait_running(&mut client, &id, attempt as usize).await;
        assert_eq!(running.attempts, attempt, "{running:?}");
        lost_on.push(running.worker.clone());
        worker.process.0.kill().unwrap();
        worker.process.0.wait().unwrap();
    }
    // The third delivery is the verdict: the next worker fails it instead of running it.
    let judge = fleet.worker("judge", &flags);
    let events = tokio::time::timeout(Duration::from_secs(60), watch_all(&mut client, &id))
        .await
        .expect("the job never ended")
        .unwrap();
    let job = get_job(&mut client, &id).await;
    assert_eq!(job.state, v1::JobState::Failed as i32, "{job:?}");
    assert!(job.error.starts_with("worker_lost"), "{}", job.error);
    assert!(job.error.contains("2 attempts"), "{}", job.error);
    let detail = recovered_attempt(&events).expect("the second attempt was a recovery");
    assert!(detail.contains("attempt 2"), "{detail}");
    assert_eq!(lost_on, ["doomed-1", "doomed-2"]);
    let metrics = support::http::get(&judge.metrics_addr, "/metrics").await;
    assert!(
        String::from_utf8_lossy(&metrics.body)
            .contains("sakuga_cluster_worker_lost_total{workload=\"single_image\"} 1"),
        "the judging worker counts it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_output_streams_what_the_worker_wrote_and_submit_save_writes_it() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let flags = fleet.cluster_flags("5", "3");
    let gateway = fleet.gateway("gw", &flags);
    let _worker = fleet.worker("writer", &flags);
    wait_serving(&gateway.url).await;
    let workflow = fleet.root.path().join("job.json");
    std::fs::write(&workflow, job(42, 3, 40.0)).unwrap();
    let saved = fleet.root.path().join("saved");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sakuga"))
        .args([
            "submit",
            workflow.to_str().unwrap(),
            "--server",
            &gateway.url,
        ])
        .args(["--watch", "--save", saved.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = fleet.root.path().join("writer/out/job42_00001_.png");
    let local = std::fs::read(saved.join("job42_00001_.png")).unwrap();
    assert_eq!(
        local,
        std::fs::read(&written).unwrap(),
        "the worker's bytes"
    );
    let frames = std::fs::read_dir(saved.join("frames")).unwrap().count();
    assert_eq!(frames, 3, "{stdout}");

    // The same through the RPC, and a name the job does not have.
    let mut client = SakugaClient::connect(&gateway.url, None).await.unwrap();
    let job_id = stdout.split_whitespace().nth(1).unwrap().to_owned();
    let mut stream = client
        .render
        .get_output(v1::GetOutputRequest {
            job_id: job_id.clone(),
            name: "job42_00001_.png".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.name, "job42_00001_.png");
    assert_eq!(first.total_bytes as usize, local.len());
    assert_eq!(first.data, local);
    let missing = client
        .render
        .get_output(v1::GetOutputRequest {
            job_id,
            name: "../../etc/passwd".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_get_output_reads_the_out_dir() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = support::spawn_server(dir.path());
    let mut client = connect(&url).await;
    let id = client
        .render
        .submit(submit_request(job(5, 1, 40.0), ""))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let events = watch_all(&mut client, &id).await.unwrap();
    let path = events
        .iter()
        .find_map(|k| match k {
            v1::watch_event::Kind::Output(o) => Some(o.path.clone()),
            _ => None,
        })
        .expect("an output event");
    for name in [path.clone(), "job5_00001_.png".to_owned()] {
        let mut stream = client
            .render
            .get_output(v1::GetOutputRequest {
                job_id: id.clone(),
                name,
            })
            .await
            .unwrap()
            .into_inner();
        let chunk = stream.message().await.unwrap().unwrap();
        assert_eq!(chunk.data, std::fs::read(Path::new(&path)).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_caps_cancels_frames_and_fleet_signals() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let tunables = fleet.root.path().join("tunables.toml");
    std::fs::write(
        &tunables,
        "[admission.queue_caps]\nanimation = 4\nsingle_image = 2\nbatch = 4\n",
    )
    .unwrap();
    let mut flags = fleet.cluster_flags("5", "3");
    flags.extend(["--tunables".to_owned(), tunables.display().to_string()]);
    let gateway = fleet.gateway("gw", &flags);
    let mut client = connect(&gateway.url).await;

    // No worker yet: the consumer's pending count is the queue, and its cap holds.
    let first = client
        .render
        .submit(submit_request(job(1, 100, 20.0), ""))
        .await
        .unwrap()
        .into_inner();
    let second = client
        .render
        .submit(submit_request(job(2, 1, 20.0), ""))
        .await
        .unwrap()
        .into_inner();
    let refused = client
        .render
        .submit(submit_request(job(3, 1, 20.0), ""))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    use tonic_types::StatusExt;
    assert!(refused.get_details_retry_info().is_some(), "a retry hint");

    // A queued job cancelled on the gateway ends at once; its watchers hear it.
    let cancelled = client
        .render
        .cancel(v1::CancelRequest {
            job_id: second.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, v1::JobState::Cancelled as i32);
    let events = watch_all(&mut client, &second.job_id).await.unwrap();
    assert!(
        matches!(events.last(), Some(v1::watch_event::Kind::FinalStatus(f)) if f.state == v1::JobState::Cancelled as i32)
    );

    // A running job is cancelled on its worker.
    let worker = fleet.worker("solo", &flags);
    let running = wait_running(&mut client, &first.job_id, 1).await;
    assert_eq!(running.worker, "solo");
    client
        .render
        .cancel(v1::CancelRequest {
            job_id: first.job_id.clone(),
        })
        .await
        .unwrap();
    watch_all(&mut client, &first.job_id).await.unwrap();
    let ended = get_job(&mut client, &first.job_id).await;
    assert_eq!(ended.state, v1::JobState::Cancelled as i32, "{ended:?}");

    // A frame over NATS's payload limit arrives whole (sent in chunks).
    let big = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 640, "height": 640, "batch_size": 1, "color": 7}},
        "2": {"class_type": "StreamFrames", "inputs": {"images": ["1", 0], "fps": 24.0, "pace": false}},
    })
    .to_string();
    let id = client
        .render
        .submit(submit_request(big, ""))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let request = v1::WatchRequest {
        job_id: id,
        frame_encoding: v1::FrameEncoding::Rgb8 as i32,
        ..Default::default()
    };
    let mut stream = client.render.watch(request).await.unwrap().into_inner();
    let mut frame_bytes = None;
    while let Some(event) = stream.message().await.unwrap() {
        match event.kind {
            Some(v1::watch_event::Kind::Frame(f)) => frame_bytes = Some(f.data),
            Some(v1::watch_event::Kind::FinalStatus(_)) => break,
            _ => {}
        }
    }
    let frame = frame_bytes.expect("the frame arrived");
    assert_eq!(frame.len(), 640 * 640 * 3);
    assert!(
        frame.chunks(3).all(|px| px == [0, 0, 7]),
        "its pixels intact"
    );

    // The fleet, from heartbeats, on the gateway's signals.
    let signals = client
        .signals
        .get_signals(v1::GetSignalsRequest {})
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = signals
        .workers
        .iter()
        .map(|w| w.worker_id.as_str())
        .collect();
    assert_eq!(ids, ["solo"], "{:?}", signals.workers);
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gateway_serves_comfyuis_api_for_the_cluster() {
    use tokio_tungstenite::tungstenite::Message;
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let flags = fleet.cluster_flags("5", "3");
    let with_comfy = |name: &str| {
        let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
        args.extend(["--comfy-listen", "127.0.0.1:0"]);
        spawn_command(&fleet.root.path().join(name), &[], "serve", &args)
    };
    let (a, b) = (with_comfy("gw-a"), with_comfy("gw-b"));
    let _worker = fleet.worker("comfy-worker", &flags);
    wait_serving(&a.url).await;
    wait_serving(&b.url).await;

    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?clientId=c1", a.comfy_addr))
            .await
            .unwrap();
    let prompt = json!({
        "client_id": "c1",
        "prompt": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1234}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "viaComfy"}},
        },
    });
    let reply = support::http::post_json(&a.comfy_addr, "/prompt", &prompt).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let prompt_id = reply.json()["prompt_id"].as_str().unwrap().to_owned();
    let mut seen = Vec::new();
    while let Some(message) = ws.next().await {
        let Message::Text(text) = message.unwrap() else {
            continue;
        };
        let message: serde_json::Value = serde_json::from_str(&text).unwrap();
        let kind = message["type"].as_str().unwrap_or_default().to_owned();
        if message["data"]["prompt_id"] == prompt_id.as_str() {
            seen.push(kind.clone());
        }
        if kind == "execution_success" && message["data"]["prompt_id"] == prompt_id.as_str() {
            break;
        }
        assert_ne!(kind, "execution_error", "{message}");
    }
    assert_eq!(
        seen.first().map(String::as_str),
        Some("execution_start"),
        "{seen:?}"
    );
    assert!(seen.contains(&"executed".to_owned()), "{seen:?}");

    // The other gateway knows the job and serves its output from the object store.
    let history = support::http::get(&b.comfy_addr, &format!("/history/{prompt_id}")).await;
    let entry = &history.json()[&prompt_id];
    let image = &entry["outputs"]["2"]["images"][0];
    assert_eq!(image["filename"], "viaComfy_00001_.png", "{entry}");
    assert_eq!(image["subfolder"], prompt_id.as_str(), "{entry}");
    let view = support::http::get(
        &b.comfy_addr,
        &format!(
            "/view?filename={}&subfolder={}&type=output",
            image["filename"].as_str().unwrap(),
            prompt_id
        ),
    )
    .await;
    assert_eq!(view.status, 200);
    let written = fleet
        .root
        .path()
        .join("comfy-worker/out/viaComfy_00001_.png");
    assert_eq!(view.body, std::fs::read(written).unwrap());
    let missing = support::http::get(
        &b.comfy_addr,
        &format!("/view?filename=nothing.png&subfolder={prompt_id}&type=output"),
    )
    .await;
    assert_eq!(missing.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_gracefully_hands_back_what_it_did_not_finish() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let flags = fleet.cluster_flags("2", "3");
    let gateway = fleet.gateway("gw", &flags);
    let mut client = connect(&gateway.url).await;
    let mut leaving = fleet.worker("leaving", &flags);
    // One job runs (1.5 s of frames) and one waits on the same worker (its prefetch).
    let mut ids = Vec::new();
    for tag in [1, 2] {
        let id = client
            .render
            .submit(submit_request(job(tag, 30, 20.0), ""))
            .await
            .unwrap()
            .into_inner()
            .job_id;
        ids.push(id);
    }
    wait_running(&mut client, &ids[0], 1).await;
    let pid = leaving.process.0.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let _staying = fleet.worker("staying", &flags);
    for id in &ids {
        let events = tokio::time::timeout(Duration::from_secs(60), watch_all(&mut client, id))
            .await
            .expect("the job ended")
            .unwrap();
        let ends: Vec<_> = events
            .iter()
            .filter_map(|k| match k {
                v1::watch_event::Kind::FinalStatus(f) => Some(f.state),
                _ => None,
            })
            .collect();
        assert_eq!(ends, [v1::JobState::Succeeded as i32], "{id}: {events:?}");
    }
    leaving.process.0.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_and_workers_reach_nats_over_tls_with_its_ca() {
    if !nats::available() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    support::tls::make_certs(&certs);
    let path = |name: &str| certs.join(name).display().to_string();
    let (cert, key, ca) = (path("cert.pem"), path("key.pem"), path("ca.pem"));
    let server = NatsServer::start_with(
        root.path(),
        &["--tls", "--tlscert", &cert, "--tlskey", &key],
    );
    // The certificate names localhost, so that is the host NATS is reached by.
    let url = format!("tls://localhost:{}", server.port);
    let flags: Vec<&str> = vec!["--nats", &url, "--nats-tls-ca", &ca];
    let mut gateway_args = flags.clone();
    gateway_args.extend(["--comfy-listen", "off"]);
    let gateway = spawn_command(&root.path().join("gw"), &[], "serve", &gateway_args);
    let mut worker_args = flags.clone();
    worker_args.extend(["--worker-id", "tls-worker"]);
    let _worker = spawn_command(&root.path().join("w"), &[], "worker", &worker_args);
    let mut client = connect(&gateway.url).await;
    let id = client
        .render
        .submit(submit_request(job(9, 2, 40.0), ""))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let events = watch_all(&mut client, &id).await.unwrap();
    assert!(
        matches!(events.last(), Some(v1::watch_event::Kind::FinalStatus(f)) if f.state == v1::JobState::Succeeded as i32),
        "{events:?}"
    );
    assert_eq!(get_job(&mut client, &id).await.worker, "tls-worker");
    drop(server);
}
