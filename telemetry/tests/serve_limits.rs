//! The `/metrics` listener under abuse: half-sent requests and floods of silent
//! connections (own test binary: it owns the process-wide recorder and its listener).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use sakuga_telemetry::prometheus::{self, PrometheusConfig};
use sakuga_telemetry::record;

/// GET /metrics; `None` when the server closed the connection without a reply.
fn scrape(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.starts_with("HTTP/1.1 200").then_some(response)
}

#[test]
fn half_sent_requests_and_idle_floods_cannot_pin_the_listener() {
    let handle = prometheus::install(&PrometheusConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
    })
    .unwrap();
    let addr = handle.listen_addr().expect("a bound address");
    record::record_each_once();

    // A request that never finishes its head is closed by the server, not held forever.
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"GET /metr").unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    half.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let read = half.read_to_end(&mut rest);
    assert!(
        matches!(read, Ok(0)) || read.is_err() && started.elapsed().as_secs() < 30,
        "closed without a reply: {read:?} {rest:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "closed by the head deadline, after {:?}",
        started.elapsed()
    );

    // A flood of silent connections past the cap: once their deadline passes, scrapes
    // are served again (a scrape in the meantime may be refused, never hung).
    let flood: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let served = loop {
        if let Some(text) = scrape(addr) {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the listener stayed pinned by idle connections"
        );
        // The next try can only succeed once the silent connections' deadline passed.
        std::thread::park_timeout(std::time::Duration::from_millis(100));
    };
    assert!(served.contains("# TYPE"));
    drop(flood);
}
