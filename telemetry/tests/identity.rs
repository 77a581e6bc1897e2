//! The build and config identity (`sakuga_build_info`, `sakuga_config_generation`):
//! exactly one series each, replaced on every change. Own test binary: the identity is
//! process-wide.

use sakuga_telemetry::{PrometheusConfig, Signals, SignalsConfig};

#[test]
fn each_config_change_replaces_the_exported_identity_and_counts_on() {
    let handle = sakuga_telemetry::prometheus::install(&PrometheusConfig::in_process()).unwrap();
    let signals = Signals::new(SignalsConfig::default());
    signals.resume_config_generation(7);
    assert_eq!(
        signals.config_changed("1.2.3", "aaaa"),
        8,
        "a start is a change"
    );
    assert_eq!(signals.config_changed("1.2.3", "bbbb"), 9);
    assert_eq!(signals.config_generation(), 9);
    let text = handle.render();
    let generation: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("sakuga_config_generation{"))
        .collect();
    assert_eq!(
        generation,
        ["sakuga_config_generation{version=\"1.2.3\",config_hash=\"bbbb\"} 9"],
        "exactly one series, the current config's"
    );
    let info: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("sakuga_build_info{"))
        .collect();
    assert_eq!(
        info,
        ["sakuga_build_info{version=\"1.2.3\",config_hash=\"bbbb\"} 1"]
    );
}
