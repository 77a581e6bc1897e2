//! Text rendering of a [`SignalsSnapshot`]: the golden-signals summary `sakuga run` prints
//! at the end and `sakuga signals` prints on demand.

use std::fmt::Write as _;

use crate::diagnosis::fmt_num;
use crate::labels::Workload;
use crate::signals::SignalsSnapshot;
use crate::window::{Percentiles, Window};

fn opt(value: Option<f64>) -> String {
    value.map(fmt_num).unwrap_or_else(|| "-".to_owned())
}

fn pct(value: Option<f64>) -> String {
    value
        .map(|v| format!("{:.1}%", v * 100.0))
        .unwrap_or_else(|| "-".to_owned())
}

fn dist(p: &Percentiles) -> String {
    if p.count == 0 {
        return "-".to_owned();
    }
    format!(
        "p50 {}s p95 {}s p99 {}s (n={})",
        opt(p.p50),
        opt(p.p95),
        opt(p.p99),
        p.count
    )
}

impl SignalsSnapshot {
    /// Golden signals per workload (workloads with no activity are skipped), SLOs and
    /// the device, as aligned text.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for &workload in Workload::ALL {
            let active: Vec<_> = Window::ALL
                .iter()
                .filter_map(|&w| self.golden(workload, w))
                .filter(|g| g.frames_produced + g.frames_delivered + g.jobs_finished > 0)
                .collect();
            if active.is_empty() {
                continue;
            }
            let _ = writeln!(out, "{workload}");
            for g in active {
                let mut parts = Vec::new();
                if g.frames_produced + g.frames_delivered > 0 {
                    parts.push(format!(
                        "fps produced {} delivered {} health {} dropped {} duplicated {}",
                        fmt_num(g.produced_fps),
                        fmt_num(g.delivered_fps),
                        opt(g.fps_health),
                        pct(g.dropped_ratio),
                        pct(g.duplicated_ratio),
                    ));
                }
                if g.jobs_finished > 0 {
                    parts.push(format!(
                        "jobs {} success {} latency {} images/s {}",
                        g.jobs_finished,
                        pct(g.success_ratio),
                        dist(&g.render_latency),
                        fmt_num(g.images_per_second),
                    ));
                }
                if g.queue_wait.count > 0 {
                    parts.push(format!("queue wait p95 {}s", opt(g.queue_wait.p95)));
                }
                let _ = writeln!(out, "  {:>3}: {}", g.window.as_str(), parts.join("; "));
                if g.postprocess.count > 0 {
                    let _ = writeln!(out, "       post-process {}", dist(&g.postprocess));
                }
            }
        }
        if let Some(sys) = self.system(Window::FifteenMinutes) {
            let _ = writeln!(
                out,
                "system (15m): cache hit {} utilization mean {} headroom min {} ooms {} timeouts {}",
                pct(sys.cache_hit_rate),
                pct(sys.utilization_mean),
                pct(sys.headroom_min),
                sys.ooms,
                sys.timeouts
            );
        }
        if let Some(device) = &self.device {
            let _ = writeln!(
                out,
                "device {}: {} / {} MiB used, headroom {}, utilization {}",
                device.device,
                device.memory_used_bytes >> 20,
                device.memory_total_bytes >> 20,
                pct(self.device_headroom_ratio),
                pct(Some(device.utilization_ratio)),
            );
        }
        let measured: Vec<_> = self.slos.iter().filter(|s| s.total > 0).collect();
        if !measured.is_empty() {
            let _ = writeln!(out, "slos:");
            for s in measured {
                let flag = if s.page {
                    " PAGE"
                } else if s.ticket {
                    " TICKET"
                } else {
                    ""
                };
                let _ = writeln!(
                    out,
                    "  {:<26} good {} of {} (objective {}), budget left {}, burn 5m {} 1h {} 6h {}{flag}",
                    s.slo.as_str(),
                    pct(s.good_ratio),
                    s.total,
                    pct(Some(s.objective)),
                    pct(Some(s.error_budget_remaining)),
                    fmt_num(s.burn_rate(crate::slo::BurnWindow::M5)),
                    fmt_num(s.burn_rate(crate::slo::BurnWindow::H1)),
                    fmt_num(s.burn_rate(crate::slo::BurnWindow::H6)),
                );
            }
        }
        if out.is_empty() {
            out.push_str("no signals recorded yet\n");
        }
        out
    }
}
