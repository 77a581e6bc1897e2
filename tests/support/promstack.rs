//! A real Prometheus and Alertmanager (Debian's packages) wired to a live `sakuga serve`,
//! with a webhook receiver in the test standing in for the pager, ticket and mail bridges.
//!
//! The shipped configs are used as they are, with only what a test must change: scrape and
//! rule intervals of 1 s, receivers pointed at the local webhook, and Alertmanager's group
//! waits shortened. Rules keep their expressions; a test may shorten the `for:` hold of an
//! alert it wants to see fire (holds have their own promtool unit tests).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Kills a helper process when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free right now (the window before the tool binds it again is small).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether `tool --version` runs; otherwise the caller skips, unless CI requires it.
pub fn tools_available(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| {
            !Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let required = std::env::var("SAKUGA_REQUIRE_PROMTOOL").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{missing:?} not installed but SAKUGA_REQUIRE_PROMTOOL=1: \
         apt-get install -y prometheus prometheus-alertmanager"
    );
    eprintln!("skipping: {missing:?} not installed");
    false
}

/// A minimal HTTP/1.0 exchange (no keep-alive, no chunking): status and body.
pub fn http(method: &str, addr: &str, target: &str, body: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {target} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Percent-encodes a query parameter value.
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`. Each try
/// is a real query against a live process, so there is nothing to wait on but the answer.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // The answer changes on the next scrape or rule evaluation (1 s).
        std::thread::park_timeout(Duration::from_millis(200));
    }
}

/// Notifications Alertmanager posted, one JSON body each.
pub struct Webhook {
    pub url: String,
    pub received: mpsc::Receiver<Value>,
}

/// Starts a webhook receiver thread on a free port.
pub fn webhook() -> Webhook {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/notify", listener.local_addr().unwrap());
    let (tx, received) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            if let Some(body) = read_post(stream)
                && tx.send(body).is_err()
            {
                return;
            }
        }
    });
    Webhook { url, received }
}

fn read_post(mut stream: TcpStream) -> Option<Value> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    serde_json::from_slice(&body).ok()
}

/// The repository's `deploy/` dir.
pub fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read_yaml(path: &Path) -> Value {
    serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn write_yaml(path: &Path, value: &Value) {
    std::fs::write(path, serde_norway::to_string(value).unwrap()).unwrap();
}

/// The shipped rule files, with every group evaluated each second and the holds of the
/// named alerts set to `hold`, written under `dir`; returns their paths.
pub fn rule_files_for_test(dir: &Path, short_holds: &[&str], hold: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(deploy_dir().join("prometheus")).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with(".rules.yml") {
            continue;
        }
        let mut doc = read_yaml(&path);
        for group in doc["groups"].as_array_mut().unwrap() {
            group["interval"] = Value::from("1s");
            for rule in group["rules"].as_array_mut().unwrap() {
                let is_short = rule["alert"]
                    .as_str()
                    .is_some_and(|name| short_holds.contains(&name));
                if is_short {
                    rule["for"] = Value::from(hold);
                }
            }
        }
        let target = dir.join(path.file_name().unwrap());
        write_yaml(&target, &doc);
        out.push(target);
    }
    out
}

/// The shipped Alertmanager config with every receiver posting to `webhook_url` (receiver
/// names, routes and inhibit rules unchanged) and group waits shortened.
pub fn alertmanager_config_for_test(dir: &Path, webhook_url: &str) -> PathBuf {
    let mut doc = read_yaml(&deploy_dir().join("alertmanager/alertmanager.yml"));
    let route = &mut doc["route"];
    route["group_wait"] = Value::from("0s");
    route["group_interval"] = Value::from("1s");
    for sub in route["routes"].as_array_mut().unwrap() {
        sub["group_wait"] = Value::from("0s");
    }
    for receiver in doc["receivers"].as_array_mut().unwrap() {
        let name = receiver["name"].clone();
        *receiver = serde_json::json!({
            "name": name,
            "webhook_configs": [{"url": webhook_url, "send_resolved": true}],
        });
    }
    let path = dir.join("alertmanager.yml");
    write_yaml(&path, &doc);
    path
}

/// Prometheus and Alertmanager running against one sakuga `/metrics` address.
pub struct Stack {
    pub prometheus: String,
    pub alertmanager: String,
    _processes: Vec<Process>,
}

impl Stack {
    /// Starts both and waits until Prometheus has scraped sakuga once.
    pub fn start(
        dir: &Path,
        metrics_addr: &str,
        rule_files: &[PathBuf],
        am_config: &Path,
    ) -> Stack {
        let am_port = free_port();
        let alertmanager = format!("127.0.0.1:{am_port}");
        let am = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", am_config.display()))
            .arg(format!("--storage.path={}", dir.join("am-data").display()))
            .arg(format!("--web.listen-address={alertmanager}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus-alertmanager starts");
        let prom_port = free_port();
        let prometheus = format!("127.0.0.1:{prom_port}");
        let rules: Vec<String> = rule_files
            .iter()
            .map(|p| format!("  - {}\n", p.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{}\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{alertmanager}']\n\
             scrape_configs:\n  - job_name: sakuga\n    static_configs:\n      - targets: ['{metrics_addr}']\n",
            rules.concat()
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let prom = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prom-data").display()
            ))
            .arg(format!("--web.listen-address={prometheus}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        let stack = Stack {
            prometheus,
            alertmanager,
            _processes: vec![Process(prom), Process(am)],
        };
        wait_for(
            "the first scrape of sakuga",
            Duration::from_secs(60),
            || {
                stack
                    .try_query("up{job=\"sakuga\"} == 1")
                    .filter(|r| !r.is_empty())
            },
        );
        wait_for("alertmanager", Duration::from_secs(60), || {
            std::net::TcpStream::connect(&stack.alertmanager).ok()
        });
        stack
    }

    /// A handle that only queries the Prometheus at `addr` (for another thread); it owns
    /// no process.
    pub fn observer(prometheus: String) -> Stack {
        Stack {
            prometheus,
            alertmanager: String::new(),
            _processes: Vec::new(),
        }
    }

    /// An instant query now; `None` while Prometheus is not answering yet.
    pub fn try_query(&self, expr: &str) -> Option<Vec<Value>> {
        let body = format!("query={}", encode(expr));
        let stream_ok = TcpStream::connect(&self.prometheus).is_ok();
        if !stream_ok {
            return None;
        }
        let (status, text) = http("POST", &self.prometheus, "/api/v1/query", Some(&body));
        if status != 200 {
            panic!("query {expr:?} failed ({status}): {text}");
        }
        let json: Value = serde_json::from_str(&text).ok()?;
        json["data"]["result"].as_array().cloned()
    }

    /// An instant query now; panics when Prometheus refuses it.
    pub fn query(&self, expr: &str) -> Vec<Value> {
        self.try_query(expr)
            .unwrap_or_else(|| panic!("prometheus did not answer {expr:?}"))
    }

    /// The one value of a query that returns a single sample.
    pub fn value(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr);
        let first = result.first()?;
        first["value"][1].as_str()?.parse().ok()
    }

    /// Alerts Prometheus holds now (pending and firing), as `(name, state, labels)`.
    pub fn alerts(&self) -> Vec<(String, String, Value)> {
        let (_, text) = http("GET", &self.prometheus, "/api/v1/alerts", None);
        let json: Value = serde_json::from_str(&text).unwrap();
        json["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                    a["state"].as_str().unwrap_or("").to_owned(),
                    a["labels"].clone(),
                )
            })
            .collect()
    }

    /// Alerts Alertmanager holds now, as its v2 API returns them.
    pub fn alertmanager_alerts(&self) -> Vec<Value> {
        let (_, text) = http("GET", &self.alertmanager, "/api/v2/alerts", None);
        serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }
}

/// The Grafana dashboards under `deploy/grafana/dashboards`.
pub fn dashboard_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("grafana/dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

/// Every query of a dashboard (panel targets, nested rows, annotations), keyed by where it
/// sits: `"<file>: <panel title> / <refId>"` or `"<file>: annotation <name>"`.
pub fn dashboard_expressions(path: &Path) -> std::collections::BTreeMap<String, String> {
    fn panels(list: &Value, file: &str, out: &mut std::collections::BTreeMap<String, String>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let ref_id = target["refId"].as_str().unwrap_or("?");
                    out.insert(format!("{file}: {title} / {ref_id}"), expr.to_owned());
                }
            }
            panels(&panel["panels"], file, out);
        }
    }
    let board: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
    let file = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut out = std::collections::BTreeMap::new();
    panels(&board["panels"], &file, &mut out);
    for annotation in board["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = annotation["expr"].as_str() {
            let name = annotation["name"].as_str().unwrap_or("?");
            out.insert(format!("{file}: annotation {name}"), expr.to_owned());
        }
    }
    out
}

/// Grafana's built-in interval variables, replaced by values Prometheus accepts.
pub fn without_grafana_variables(expr: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", "5m")
        .replace("${__rate_interval}", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    assert!(
        !expr.contains('$'),
        "unknown dashboard variable in {expr:?}"
    );
    expr
}
