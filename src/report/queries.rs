//! The report's PromQL, generated next to the recording rules by `deploy/generate.py`
//! into `deploy/prometheus/report-queries.json` (checked by promtool as a rule file) and
//! compiled in here, so the report and the rules can never read different definitions.

use std::sync::OnceLock;

use serde::Deserialize;

/// The generated file, as committed.
pub const QUERIES_JSON: &str = include_str!("../../deploy/prometheus/report-queries.json");

/// Every query is written over this window; [`Query::over`] swaps it.
const WRITTEN_WINDOW: &str = "[1d]";

#[derive(Debug, Clone, Deserialize)]
struct File {
    groups: Vec<Group>,
}

#[derive(Debug, Clone, Deserialize)]
struct Group {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize)]
struct Rule {
    expr: String,
    labels: std::collections::BTreeMap<String, String>,
}

/// One report query: its id (`frames`, `latency_quantile:0.95`, `slo_bad_ratio:batch_success`)
/// and its expression over one day.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub id: String,
    pub expr: String,
}

impl Query {
    /// The expression over `window` (a PromQL duration such as `1h` or `604800s`).
    pub fn over(&self, window: &str) -> String {
        self.expr.replace(WRITTEN_WINDOW, &format!("[{window}]"))
    }
}

/// An SLO as the rules define it.
#[derive(Debug, Clone, PartialEq)]
pub struct SloDef {
    pub name: String,
    pub alert: String,
    pub objective: f64,
    pub description: String,
    pub query: Query,
}

struct Catalogue {
    queries: Vec<Query>,
    slos: Vec<SloDef>,
}

fn catalogue() -> &'static Catalogue {
    static CATALOGUE: OnceLock<Catalogue> = OnceLock::new();
    CATALOGUE.get_or_init(|| {
        // The file is generated and tested (tests/report.rs); a broken one fails every test.
        let file: File = serde_json::from_str(QUERIES_JSON).expect("report-queries.json parses");
        let mut queries = Vec::new();
        let mut slos = Vec::new();
        for rule in file.groups.into_iter().flat_map(|g| g.rules) {
            let query = Query {
                id: rule.labels.get("report_query").cloned().unwrap_or_default(),
                expr: rule.expr,
            };
            if let Some(name) = rule.labels.get("slo") {
                slos.push(SloDef {
                    name: name.clone(),
                    alert: rule.labels.get("alert").cloned().unwrap_or_default(),
                    objective: rule
                        .labels
                        .get("objective")
                        .and_then(|o| o.parse().ok())
                        .unwrap_or(0.99),
                    description: rule.labels.get("description").cloned().unwrap_or_default(),
                    query: query.clone(),
                });
            }
            queries.push(query);
        }
        Catalogue { queries, slos }
    })
}

/// The SLOs, in the rules' order.
pub fn slo_defs() -> &'static [SloDef] {
    &catalogue().slos
}

/// The query with this id.
///
/// # Panics
/// When the generated file lacks it (a test checks every id the report uses).
pub fn query(id: &str) -> &'static Query {
    catalogue()
        .queries
        .iter()
        .find(|q| q.id == id)
        .unwrap_or_else(|| panic!("report-queries.json has no query {id:?}"))
}

/// Every query id the report uses.
pub const USED: &[&str] = &[
    "latency_quantile:0.5",
    "latency_quantile:0.95",
    "latency_quantile:0.99",
    "queue_wait_quantile:0.5",
    "queue_wait_quantile:0.95",
    "queue_wait_quantile:0.99",
    "jobs_finished",
    "frames",
    "late_frames",
    "produced_fps",
    "delivered_fps",
    "errors",
    "config_generation",
    "build_versions",
    "presence",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_used_query_and_the_six_slos_are_in_the_file() {
        for id in USED {
            assert!(query(id).expr.contains("sakuga_"), "{id}");
        }
        assert_eq!(slo_defs().len(), 6);
        let q = query("frames");
        assert!(q.over("1h").contains("[1h]") && !q.over("1h").contains("[1d]"));
    }
}
