//! The ops kit under `deploy/` checked end to end: Prometheus rules and their unit tests,
//! the Alertmanager routing, the runbooks, and the Grafana dashboards' queries.
//!
//! Most checks shell out to `promtool` and `amtool` (Debian: `apt-get install prometheus
//! prometheus-alertmanager`). Without them a check is skipped with a note on stderr, unless
//! `SAKUGA_REQUIRE_PROMTOOL=1` (CI sets it), in which case it fails. The checks that only
//! read files (labels, runbooks, metric names) always run.
//!
//! Run: `cargo test --test ops_kit`; by hand: `deploy/check.sh`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod support;

const SEVERITIES: &[&str] = &["page", "ticket", "email"];
/// Alert categories muted while `sakuga_planned_heavy_load` is 1.
const SUPPRESSED_CATEGORIES: &[&str] = &["capacity", "latency"];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

/// Files in `dir` whose names end with `suffix`, sorted.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("cannot list {}: {err}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *{suffix} files in {}", dir.display());
    files
}

fn rule_files() -> Vec<PathBuf> {
    files_ending(&deploy_dir().join("prometheus"), ".rules.yml")
}

fn rule_test_files() -> Vec<PathBuf> {
    files_ending(&deploy_dir().join("prometheus/tests"), ".test.yml")
}

fn dashboard_files() -> Vec<PathBuf> {
    files_ending(&deploy_dir().join("grafana/dashboards"), ".json")
}

fn read_yaml(path: &Path) -> Value {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    serde_norway::from_str(&text)
        .unwrap_or_else(|err| panic!("{} is not valid YAML: {err}", path.display()))
}

/// Every rule of every rule file (recording and alerting), each a YAML mapping.
fn all_rules() -> Vec<Value> {
    rule_files()
        .iter()
        .flat_map(|path| {
            let doc = read_yaml(path);
            let groups = doc["groups"].as_array().cloned().unwrap_or_default();
            assert!(!groups.is_empty(), "{} has no groups", path.display());
            groups
                .into_iter()
                .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
        })
        .collect()
}

fn alerting_rules() -> Vec<Value> {
    all_rules()
        .into_iter()
        .filter(|rule| rule.get("alert").is_some())
        .collect()
}

fn alert_names() -> BTreeSet<String> {
    alerting_rules()
        .iter()
        .map(|rule| rule["alert"].as_str().expect("alert name").to_owned())
        .collect()
}

fn recording_rule_names() -> BTreeSet<String> {
    all_rules()
        .iter()
        .filter_map(|rule| rule["record"].as_str().map(str::to_owned))
        .collect()
}

// --- external tools -------------------------------------------------------------------

/// Whether `tool` can run; when it cannot, skip (or fail when CI requires the tools).
fn tool_available(tool: &str) -> bool {
    let runs = Command::new(tool)
        .arg("--version")
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false);
    if runs {
        return true;
    }
    let required = std::env::var("SAKUGA_REQUIRE_PROMTOOL").is_ok_and(|value| value == "1");
    assert!(
        !required,
        "{tool} is not installed but SAKUGA_REQUIRE_PROMTOOL=1: \
         apt-get install -y prometheus prometheus-alertmanager"
    );
    eprintln!(
        "skipping: {tool} is not installed (apt-get install -y prometheus prometheus-alertmanager)"
    );
    false
}

fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {tool}: {err}"))
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn path_args(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|path| path.display().to_string())
        .collect()
}

// --- Prometheus rules -----------------------------------------------------------------

#[test]
fn rule_files_pass_promtool_check() {
    if !tool_available("promtool") {
        return;
    }
    let files = path_args(&rule_files());
    let mut args = vec!["check", "rules"];
    args.extend(files.iter().map(String::as_str));
    assert_success(&run("promtool", &args), "promtool check rules");
}

#[test]
fn rule_unit_tests_pass() {
    if !tool_available("promtool") {
        return;
    }
    let files = path_args(&rule_test_files());
    let mut args = vec!["test", "rules"];
    args.extend(files.iter().map(String::as_str));
    assert_success(&run("promtool", &args), "promtool test rules");
}

#[test]
fn every_alert_has_severity_summary_category_and_runbook() {
    let runbooks = repo_root().join("docs/runbooks");
    for rule in alerting_rules() {
        let name = rule["alert"].as_str().expect("alert name");
        let labels = &rule["labels"];
        let severity = labels["severity"].as_str().unwrap_or_default();
        assert!(
            SEVERITIES.contains(&severity),
            "{name}: severity {severity:?} is not one of {SEVERITIES:?}"
        );
        assert!(labels["category"].is_string(), "{name}: no category label");

        let summary = rule["annotations"]["summary"].as_str().unwrap_or_default();
        let names_workload = summary.contains("{{ $labels.workload }}")
            || labels["workload"]
                .as_str()
                .is_some_and(|workload| summary.contains(&format!("[{workload}]")));
        assert!(
            names_workload,
            "{name}: summary {summary:?} does not name the workload"
        );

        let runbook_url = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_default();
        assert!(
            runbook_url.ends_with(&format!("/docs/runbooks/{name}.md")),
            "{name}: runbook_url {runbook_url:?} does not point at docs/runbooks/{name}.md"
        );
        let runbook = runbooks.join(format!("{name}.md"));
        let text = fs::read_to_string(&runbook)
            .unwrap_or_else(|err| panic!("{name}: runbook {} missing: {err}", runbook.display()));
        for section in [
            "## What it means",
            "## Probable causes",
            "## Verify",
            "## Act",
        ] {
            assert!(
                text.contains(section),
                "{}: no {section:?} section",
                runbook.display()
            );
        }
    }
}

#[test]
fn capacity_and_latency_alerts_are_suppressed_during_planned_load() {
    const SUPPRESSION: &str = "unless on () (max(max_over_time(sakuga_planned_heavy_load[";
    for rule in alerting_rules() {
        let name = rule["alert"].as_str().expect("alert name");
        let category = rule["labels"]["category"].as_str().unwrap_or_default();
        if !SUPPRESSED_CATEGORIES.contains(&category) {
            continue;
        }
        let expr = rule["expr"].as_str().expect("expr");
        // Every top-level `or` branch carries its own suppression, over its own window.
        for branch in top_level_or_branches(expr) {
            let branch = strip_outer_parens(branch.trim());
            let at = branch.rfind(SUPPRESSION).unwrap_or_else(|| {
                panic!("{name} ({category}): a branch lacks `{SUPPRESSION}...`:\n{branch}")
            });
            assert!(
                branch.ends_with("])) == 1)"),
                "{name}: the suppression must end the branch:\n{branch}"
            );
            // `unless` binds tighter than `or`: an unparenthesised `or` before the
            // suppression would leave its left side unsuppressed.
            assert_eq!(
                top_level_or_count(&branch[..at]),
                0,
                "{name}: wrap the condition in parentheses before `unless`:\n{expr}"
            );
        }
    }
}

/// The expression split at `or` operators outside any parentheses.
fn top_level_or_branches(expr: &str) -> Vec<&str> {
    let mut branches = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    let bytes = expr.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'(' => depth += 1,
            b')' => depth -= 1,
            b'o' if depth == 0
                && expr[i..].starts_with("or")
                && (i == 0 || bytes[i - 1].is_ascii_whitespace())
                && bytes.get(i + 2).is_some_and(u8::is_ascii_whitespace) =>
            {
                branches.push(&expr[start..i]);
                start = i + 2;
            }
            _ => {}
        }
    }
    branches.push(&expr[start..]);
    branches
}

/// `(x)` as `x` when the parentheses enclose the whole text.
fn strip_outer_parens(text: &str) -> &str {
    let Some(inner) = text.strip_prefix('(').and_then(|t| t.strip_suffix(')')) else {
        return text;
    };
    let mut depth = 0i32;
    for b in inner.bytes() {
        depth += i32::from(b == b'(') - i32::from(b == b')');
        if depth < 0 {
            return text;
        }
    }
    inner.trim()
}

/// Number of `or` operators outside any parentheses.
fn top_level_or_count(expr: &str) -> usize {
    let mut depth = 0i32;
    let mut count = 0;
    for token in tokens(expr) {
        match token {
            Token::Open => depth += 1,
            Token::Close => depth -= 1,
            Token::Word(word) if depth == 0 && word == "or" => count += 1,
            _ => {}
        }
    }
    count
}

#[test]
fn every_alert_has_unit_tests_that_fire_it_and_keep_it_quiet() {
    let mut fired = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for path in rule_test_files() {
        let doc = read_yaml(&path);
        for test in doc["tests"].as_array().cloned().unwrap_or_default() {
            for case in test["alert_rule_test"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                let name = case["alertname"].as_str().expect("alertname").to_owned();
                let firing = case["exp_alerts"]
                    .as_array()
                    .is_some_and(|alerts| !alerts.is_empty());
                if firing {
                    fired.insert(name);
                } else {
                    quiet.insert(name);
                }
            }
        }
    }
    for name in alert_names() {
        assert!(fired.contains(&name), "no promtool test fires {name}");
        assert!(
            quiet.contains(&name),
            "no promtool test expects {name} to stay quiet"
        );
    }
}

// --- Alertmanager ---------------------------------------------------------------------

fn alertmanager_config() -> PathBuf {
    deploy_dir().join("alertmanager/alertmanager.yml")
}

#[test]
fn alertmanager_config_passes_amtool() {
    if !tool_available("amtool") {
        return;
    }
    let config = alertmanager_config().display().to_string();
    assert_success(
        &run("amtool", &["check-config", &config]),
        "amtool check-config",
    );
}

/// `(expected receiver, labels)` from deploy/alertmanager/route-tests.txt.
fn route_cases() -> Vec<(String, Vec<String>)> {
    let path = deploy_dir().join("alertmanager/route-tests.txt");
    let text = fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let mut words = line.split_whitespace().map(str::to_owned);
            let receiver = words.next().expect("receiver");
            (receiver, words.collect())
        })
        .collect()
}

#[test]
fn alerts_route_to_the_receiver_of_their_severity() {
    if !tool_available("amtool") {
        return;
    }
    let config = format!("--config.file={}", alertmanager_config().display());
    let cases = route_cases();
    for (receiver, labels) in &cases {
        let verify = format!("--verify.receivers={receiver}");
        let mut args = vec!["config", "routes", "test", config.as_str(), verify.as_str()];
        args.extend(labels.iter().map(String::as_str));
        assert_success(
            &run("amtool", &args),
            &format!("route {labels:?} -> {receiver}"),
        );
    }
    // Every severity the rules use has a case, and the cases can tell receivers apart.
    for severity in SEVERITIES {
        let label = format!("severity={severity}");
        assert!(
            cases.iter().any(|(_, labels)| labels.contains(&label)),
            "no routing case for {label}"
        );
    }
    let receivers: BTreeSet<_> = cases.iter().map(|(receiver, _)| receiver).collect();
    assert_eq!(receivers.len(), 3, "cases cover {receivers:?}");
}

#[test]
fn alertmanager_inhibits_tickets_under_pages_and_capacity_during_planned_load() {
    let config = read_yaml(&alertmanager_config());
    let rules = config["inhibit_rules"].as_array().expect("inhibit_rules");
    let matchers = |rule: &Value, key: &str| -> Vec<String> {
        rule[key]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|m| m.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let page_over_ticket = rules.iter().any(|rule| {
        matchers(rule, "source_matchers") == ["severity=\"page\""]
            && matchers(rule, "target_matchers") == ["severity=\"ticket\""]
            && matchers(rule, "equal").contains(&"alertname".to_owned())
    });
    assert!(
        page_over_ticket,
        "no inhibit rule lets a page mute its ticket"
    );
    let planned_load = rules.iter().any(|rule| {
        matchers(rule, "source_matchers") == ["alertname=\"SakugaPlannedHeavyLoad\""]
            && matchers(rule, "target_matchers")
                .iter()
                .any(|m| SUPPRESSED_CATEGORIES.iter().all(|c| m.contains(c)))
    });
    assert!(
        planned_load,
        "no inhibit rule mutes capacity/latency alerts during planned heavy load"
    );
    assert!(
        alert_names().contains("SakugaPlannedHeavyLoad"),
        "the inhibit source alert SakugaPlannedHeavyLoad is not defined"
    );
}

// --- metric names ---------------------------------------------------------------------

/// `(name, kind)` pairs from deploy/metrics.txt.
fn listed_metrics() -> Vec<(String, String)> {
    let path = deploy_dir().join("metrics.txt");
    let text = fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (name, kind) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("metrics.txt line {line:?} lacks a kind"));
            (name.to_owned(), kind.trim().to_owned())
        })
        .collect()
}

#[test]
fn metric_list_matches_the_telemetry_catalogue() {
    let listed: BTreeSet<(String, String)> = listed_metrics().into_iter().collect();
    let catalogue: BTreeSet<(String, String)> = sakuga_telemetry::catalogue::METRICS
        .iter()
        .map(|def| (def.name.to_owned(), def.kind.as_str().to_owned()))
        .collect();
    assert_eq!(
        listed, catalogue,
        "deploy/metrics.txt and sakuga_telemetry::catalogue::METRICS disagree"
    );
}

/// Every series name a query may use: catalogue metrics (histograms through their
/// `_bucket`, `_sum` and `_count` series) and the recording rules of deploy/prometheus.
fn queryable_names() -> BTreeSet<String> {
    let mut names = recording_rule_names();
    for def in sakuga_telemetry::catalogue::METRICS {
        if def.kind.as_str() == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{}{suffix}", def.name));
            }
        } else {
            names.insert(def.name.to_owned());
        }
    }
    names
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Open,
    Close,
    /// `{...}` label matchers, `[...]` ranges, strings, numbers and operators.
    Other,
}

/// A small PromQL lexer: enough to find metric names, not to evaluate anything.
fn tokens(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                out.push(Token::Other);
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                // Strings inside braces may hold the closing character.
                i += 1;
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            if chars[i] == '\\' {
                                i += 1;
                            }
                            i += 1;
                        }
                    }
                    i += 1;
                }
                i += 1;
                out.push(Token::Other);
            }
            '(' => {
                out.push(Token::Open);
                i += 1;
            }
            ')' => {
                out.push(Token::Close);
                i += 1;
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // Numbers and durations (30m, 1e3, 0.5).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
                out.push(Token::Other);
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                out.push(Token::Word(chars[start..i].iter().collect()));
            }
            _ => {
                i += 1;
                if !c.is_whitespace() {
                    out.push(Token::Other);
                }
            }
        }
    }
    out
}

/// The series names a PromQL expression selects.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Aggregations may be followed by `by (...)` rather than their argument, so they are
    // recognised by name, not by the parenthesis after them.
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan",
        "Inf",
        "NaN",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let tokens = tokens(expr);
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < tokens.len() {
        if let Token::Word(word) = &tokens[i] {
            let next = tokens.get(i + 1);
            if LABEL_LISTS.contains(&word.as_str()) {
                // Skip the parenthesised label list that follows.
                if next == Some(&Token::Open) {
                    i += 2;
                    while i < tokens.len() && tokens[i] != Token::Close {
                        i += 1;
                    }
                }
            } else if next != Some(&Token::Open) && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word.clone());
            }
        }
        i += 1;
    }
    names
}

#[test]
fn metric_name_extraction_skips_functions_labels_and_keywords() {
    let names = metric_names(
        "sum by (workload, le) (rate(a_bucket{le=~\"0\\\\.04\", x=\"}\"}[5m]))\n\
         / on (slo) group_left () b:rec offset 30m\n\
         and ignoring (kind) c > bool 2 unless on () (max(d) == 1) or vector(0.5)",
    );
    let expected: BTreeSet<String> = ["a_bucket", "b:rec", "c", "d"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(names, expected);
}

#[test]
fn rule_expressions_select_only_exported_metrics() {
    let known = queryable_names();
    for rule in all_rules() {
        let name = rule["alert"]
            .as_str()
            .or(rule["record"].as_str())
            .unwrap_or("?");
        let expr = rule["expr"].as_str().expect("expr");
        for metric in metric_names(expr) {
            assert!(
                known.contains(&metric),
                "rule {name} selects {metric}, which sakuga does not export"
            );
        }
    }
}

/// Every PromQL expression of a dashboard (panel targets, nested rows, annotations), keyed
/// by a description of where it sits.
use support::promstack::{dashboard_expressions, without_grafana_variables};

#[test]
fn dashboards_cover_every_workload_and_annotate_config_changes() {
    let files: Vec<String> = dashboard_files()
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for board in ["animation", "single-image", "batch", "system"] {
        assert!(
            files.contains(&format!("sakuga-{board}.json")),
            "no dashboard for {board} in {files:?}"
        );
    }
    for path in dashboard_files() {
        let exprs = dashboard_expressions(&path);
        assert!(
            exprs
                .iter()
                .any(|(place, expr)| place.contains("annotation")
                    && expr.contains("changes(sakuga:config_generation:max")),
            "{}: no annotation from changes of the config generation",
            path.display()
        );
    }
}

#[test]
fn dashboard_queries_select_only_exported_metrics() {
    let known = queryable_names();
    for path in dashboard_files() {
        let exprs = dashboard_expressions(&path);
        assert!(!exprs.is_empty(), "{} has no queries", path.display());
        for (place, expr) in exprs {
            for metric in metric_names(&without_grafana_variables(&expr)) {
                assert!(
                    known.contains(&metric),
                    "{place} selects {metric}, which sakuga does not export"
                );
            }
        }
    }
}

#[test]
fn dashboard_queries_parse() {
    if !tool_available("promtool") {
        return;
    }
    // promtool parses every expression of a rule file, so the dashboard queries go into a
    // throwaway one, one recording rule each.
    let mut rules = String::from("groups:\n  - name: dashboard-lint\n    rules:\n");
    let mut places = Vec::new();
    for path in dashboard_files() {
        for (place, expr) in dashboard_expressions(&path) {
            rules.push_str(&format!(
                "      - record: dashboard_lint:expr_{}\n        expr: {}\n",
                places.len(),
                serde_json::to_string(&without_grafana_variables(&expr)).unwrap()
            ));
            places.push(place);
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dashboards.rules.yml");
    fs::write(&file, rules).expect("write lint rules");
    let output = run("promtool", &["check", "rules", &file.display().to_string()]);
    assert_success(
        &output,
        &format!(
            "parsing {} dashboard queries (expr_N is the Nth of {places:#?})",
            places.len()
        ),
    );
}

#[test]
fn generated_files_are_up_to_date() {
    let python = Command::new("python3").arg("--version").output();
    if !python.is_ok_and(|output| output.status.success()) {
        eprintln!("skipping: python3 is not installed");
        return;
    }
    let output = run("python3", &["deploy/generate.py", "--check"]);
    assert_success(&output, "python3 deploy/generate.py --check");
}

/// The rule generator writes the late-frame tolerance and the low-traffic guard into the
/// rules as numbers; they are the catalogue's numbers.
#[test]
fn rule_generator_constants_match_the_catalogue() {
    let source = std::fs::read_to_string("deploy/generate.py").unwrap();
    let constant = |name: &str| -> f64 {
        let prefix = format!("{name} = ");
        let line = source
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("deploy/generate.py defines no {name}"));
        line.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name} = {line}: {e}"))
    };
    use sakuga_telemetry::catalogue;
    assert_eq!(
        constant("LATE_FRAME_TOLERANCE"),
        catalogue::LATE_FRAME_TOLERANCE
    );
    assert_eq!(
        constant("MIN_BAD_FRAMES_TO_ALERT"),
        catalogue::MIN_BAD_FRAMES_TO_ALERT as f64
    );
}
