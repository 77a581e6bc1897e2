//! The journal: records survive reopening, group commits acknowledge every write, final
//! records past the retention are pruned; and an engine restarted on the same data dir
//! runs the jobs that were queued when it stopped, marking them recovered.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;

use sakuga_nodes::{NodeEnv, NodeRegistry};
use sakuga_scheduler::engine::JobState;
use sakuga_scheduler::journal::{JobRecord, Journal, RecordState, unix_ms};
use sakuga_scheduler::{EngineConfig, EngineHandle, SubmitRequest};
use sakuga_telemetry::{Signals, SignalsConfig, Workload};

fn record(id: &str, state: RecordState) -> JobRecord {
    JobRecord {
        job_id: id.into(),
        workflow: Some(json!({"1": {}})),
        workload: "batch".into(),
        priority: 0,
        deadline_unix_ms: None,
        idempotency_key: Some(format!("key-{id}")),
        labels: Default::default(),
        trace_id: "0".repeat(32),
        submitted_unix_ms: unix_ms(SystemTime::now()),
        state,
        attempts: 0,
        finished_unix_ms: state.is_final().then(|| unix_ms(SystemTime::now())),
        error: None,
        outputs: Vec::new(),
    }
}

#[test]
fn records_survive_reopening_and_every_write_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (acked_tx, acked_rx) = std::sync::mpsc::channel();
    {
        let (journal, records) = Journal::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert!(records.is_empty());
        for i in 0..200 {
            let tx = acked_tx.clone();
            journal.put(
                record(&format!("j{i}"), RecordState::Queued),
                Some(Box::new(move |r| tx.send(r.is_ok()).unwrap())),
            );
        }
        journal.put(record("j0", RecordState::Succeeded), None);
        journal.flush();
    }
    let acked: Vec<bool> = acked_rx.try_iter().collect();
    assert_eq!(acked.len(), 200);
    assert!(acked.iter().all(|ok| *ok));
    let (_journal, records) = Journal::open(dir.path(), Duration::from_secs(3600)).unwrap();
    assert_eq!(records.len(), 200);
    let j0 = records.iter().find(|r| r.job_id == "j0").unwrap();
    assert_eq!(
        j0.state,
        RecordState::Succeeded,
        "the later write replaced the earlier"
    );
}

#[test]
fn final_records_past_retention_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (journal, _) = Journal::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let mut old = record("old", RecordState::Failed);
        old.finished_unix_ms = Some(1);
        journal.put(old, None);
        journal.put(record("queued", RecordState::Queued), None);
    }
    let (_journal, records) = Journal::open(dir.path(), Duration::from_secs(3600)).unwrap();
    let ids: Vec<&str> = records.iter().map(|r| r.job_id.as_str()).collect();
    assert_eq!(ids, ["queued"]);
}

#[test]
fn the_workflow_is_kept_until_the_job_is_final_and_later_records_do_not_need_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (journal, _) = Journal::open(dir.path(), Duration::from_secs(3600)).unwrap();
        journal.put(record("running", RecordState::Queued), None);
        let mut running = record("running", RecordState::Running);
        running.workflow = None;
        running.attempts = 1;
        journal.put(running, None);
        journal.put(record("done", RecordState::Queued), None);
        journal.flush();
        let mut done = record("done", RecordState::Succeeded);
        done.workflow = None;
        journal.put(done, None);
        journal.flush();
    }
    let (journal, records) = Journal::open(dir.path(), Duration::from_secs(3600)).unwrap();
    let running = records.iter().find(|r| r.job_id == "running").unwrap();
    assert_eq!((running.state, running.attempts), (RecordState::Running, 1));
    assert_eq!(
        running.workflow,
        Some(json!({"1": {}})),
        "restored from its own table"
    );
    let done = records.iter().find(|r| r.job_id == "done").unwrap();
    assert_eq!(done.state, RecordState::Succeeded);
    assert_eq!(done.workflow, None, "deleted with the final record");
    drop(journal);
}

#[test]
fn writes_nobody_waits_on_are_committed_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(dir.path(), Duration::from_secs(3600)).unwrap();
    journal.put(record("lingering", RecordState::Queued), None);
    // The journal holds the file lock, so a second reader cannot open it; instead wait on
    // an acknowledged write queued behind the lingering one: group commits keep order.
    let (tx, rx) = std::sync::mpsc::channel();
    journal.put(
        record("acked", RecordState::Queued),
        Some(Box::new(move |r| tx.send(r.is_ok()).unwrap())),
    );
    assert!(rx.recv().unwrap());
    // Nothing forces this one out but the linger deadline; dropping the journal without a
    // flush must still commit it.
    journal.put(record("last", RecordState::Failed), None);
    drop(journal);
    let (_journal, records) = Journal::open(dir.path(), Duration::from_secs(3600)).unwrap();
    let mut ids: Vec<&str> = records.iter().map(|r| r.job_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["acked", "last", "lingering"]);
}

fn engine(dir: &std::path::Path) -> EngineHandle {
    let env = NodeEnv::new(dir.join("input"), dir.join("output"), dir.join("models"));
    let config = EngineConfig {
        data_dir: Some(dir.join("data")),
        ..EngineConfig::default()
    };
    EngineHandle::start(
        config,
        Arc::new(NodeRegistry::with_builtins()),
        Arc::new(env),
        Signals::new(SignalsConfig::default()),
    )
    .unwrap()
}

#[test]
fn queued_jobs_run_after_a_restart_and_keys_still_dedupe() {
    let dir = tempfile::tempdir().unwrap();
    let workflow = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    });
    let first = engine(dir.path());
    // Draining first leaves the submitted jobs queued (as a crash would) but journaled.
    let done = first
        .run_to_completion(
            SubmitRequest {
                idempotency_key: Some("done".into()),
                ..SubmitRequest::new(workflow.clone())
            },
            |_| {},
        )
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(first.drain());
    assert!(
        first
            .submit_blocking(SubmitRequest::new(workflow.clone()))
            .is_err(),
        "draining refuses work"
    );
    first.shutdown_blocking();
    let second = engine(dir.path());
    let again = second
        .submit_blocking(SubmitRequest {
            idempotency_key: Some("done".into()),
            ..SubmitRequest::new(workflow.clone())
        })
        .unwrap();
    assert!(again.deduplicated);
    assert_eq!(again.job_id, done.job_id);
    assert_eq!(
        second.get_blocking(&done.job_id).unwrap().state,
        JobState::Succeeded
    );
    second.shutdown_blocking();

    // Queued jobs in the journal at start-up run and are marked recovered; a job found
    // running went down with the server once, and that is enough to call it poison.
    {
        let (journal, _) =
            Journal::open(&dir.path().join("data"), Duration::from_secs(3600)).unwrap();
        let mut queued = record("recover-me", RecordState::Queued);
        queued.workflow = Some(workflow.clone());
        queued.workload = Workload::SingleImage.as_str().into();
        journal.put(queued, None);
        let mut poison = record("poison", RecordState::Running);
        poison.workflow = Some(workflow);
        poison.attempts = 1;
        journal.put(poison, None);
    }
    let third = engine(dir.path());
    let mut watch = third.watch_blocking("recover-me").unwrap();
    while watch.next_blocking().is_some() {}
    let info = third.get_blocking("recover-me").unwrap();
    assert_eq!(info.state, JobState::Succeeded);
    assert!(info.recovered);
    assert_eq!(info.attempts, 1);
    let poison = third.get_blocking("poison").unwrap();
    assert_eq!(poison.state, JobState::Failed);
    assert_eq!(poison.attempts, 1, "no second run after the crash");
    assert!(poison.error.unwrap().starts_with("poison"));
    third.shutdown_blocking();
}
