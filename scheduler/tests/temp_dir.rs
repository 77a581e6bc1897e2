//! A server's engine starts with an empty temp dir, as ComfyUI does, so previews do not
//! pile up across restarts; links in it are removed, never followed.

use std::sync::Arc;

use sakuga_nodes::{NodeEnv, NodeRegistry};
use sakuga_scheduler::{EngineConfig, EngineHandle};
use sakuga_telemetry::{Signals, SignalsConfig};

#[test]
fn the_temp_dir_is_cleared_when_a_server_engine_starts() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("keep.png"), b"x").unwrap();
    let env = NodeEnv::new(
        dir.path().join("input"),
        dir.path().join("output"),
        dir.path().join("models"),
    );
    std::fs::create_dir_all(env.temp_dir.join("old")).unwrap();
    for i in 0..100 {
        std::fs::write(
            env.temp_dir.join(format!("sakuga_temp_{i}_00000_.png")),
            b"x",
        )
        .unwrap();
    }
    #[cfg(unix)]
    std::os::unix::fs::symlink(outside.path(), env.temp_dir.join("old/link")).unwrap();
    std::fs::write(env.output_dir.join("saved.png"), b"x").unwrap();
    let temp = env.temp_dir.clone();
    let output = env.output_dir.clone();
    let config = EngineConfig {
        data_dir: Some(dir.path().join("data")),
        ..EngineConfig::default()
    };
    let engine = EngineHandle::start(
        config,
        Arc::new(NodeRegistry::with_builtins()),
        Arc::new(env),
        Signals::new(SignalsConfig::default()),
    )
    .unwrap();
    assert_eq!(std::fs::read_dir(&temp).unwrap().count(), 0);
    assert!(output.join("saved.png").exists(), "only temp is cleared");
    assert!(outside.path().join("keep.png").exists());
    engine.shutdown_blocking();
}
