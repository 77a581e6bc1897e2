//! `/metrics` over HTTP, as `sakuga serve` exposes it (own test binary: it owns the
//! process-wide recorder and installs it with a listener).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use sakuga_telemetry::prometheus::{self, PrometheusConfig};
use sakuga_telemetry::record;

#[test]
fn metrics_are_served_over_http() {
    // Find a free port; the tiny window before the exporter binds it again is acceptable.
    let addr: SocketAddr = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let handle = prometheus::install(&PrometheusConfig { listen: Some(addr) }).unwrap();
    assert_eq!(handle.listen_addr(), Some(addr));
    record::record_each_once();

    let mut stream = TcpStream::connect(addr).expect("the listener is bound when install returns");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("sakuga_jobs_submitted_total"),
        "{response}"
    );
    assert!(response.contains("# TYPE sakuga_render_latency_seconds histogram"));
}
