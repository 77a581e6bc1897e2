//! The `sakuga` client commands reach a TLS server: `https://` URLs verified with
//! `--tls-ca`, and a clear error without it.

mod support;
use support::tls::make_certs;

use std::process::Command;
use std::time::{Duration, Instant};

fn sakuga(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sakuga"))
        .args(args)
        .env_remove("SAKUGA_CONFIG")
        .env_remove("SAKUGA_SERVER")
        .output()
        .unwrap()
}

#[test]
fn client_commands_reach_a_tls_server_with_tls_ca() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (_server, url) = support::spawn_server_with(
        dir.path(),
        &[],
        &[
            "--tls-cert",
            &path("cert.pem"),
            "--tls-key",
            &path("key.pem"),
        ],
    );
    let https = url.replace("http://127.0.0.1", "https://localhost");

    let missing = sakuga(&["signals", "--server", &https]);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("--tls-ca"), "{stderr}");

    // The engine may still be starting (UNAVAILABLE): poll until served, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = sakuga(&[
            "signals",
            "--json",
            "--server",
            &https,
            "--tls-ca",
            &path("ca.pem"),
        ]);
        if out.status.success() {
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert!(json.is_object(), "{json}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never served: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::yield_now();
    }
}
