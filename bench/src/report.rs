//! Results: one [`Outcome`] per benchmark, printed as a table and as one JSON line.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

use crate::stats::{median, us, Latency};

/// A ratio's target.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// The ratio must be at most this (envd slower by at most this factor).
    AtMost(f64),
    /// The ratio must be at least this (envd keeps at least this fraction).
    AtLeast(f64),
}

impl Goal {
    pub fn met(self, ratio: f64) -> bool {
        match self {
            Goal::AtMost(limit) => ratio <= limit,
            Goal::AtLeast(floor) => ratio >= floor,
        }
    }

    fn describe(self) -> String {
        match self {
            Goal::AtMost(limit) => format!("<= {limit}x"),
            Goal::AtLeast(floor) => format!(">= {floor}x"),
        }
    }
}

/// One ratio, checked against its goal unless it is informational.
#[derive(Debug, Clone)]
pub struct Check {
    /// What is divided by what, e.g. `p50 envd / p50 fork`.
    pub what: String,
    pub ratio: f64,
    /// `None` for a ratio reported for diagnosis only.
    pub goal: Option<Goal>,
}

impl Check {
    /// Whether the goal is met; `None` for an informational ratio.
    pub fn met(&self) -> Option<bool> {
        self.goal.map(|g| g.met(self.ratio))
    }

    /// `met (2.10x <= 3x, 30% headroom)` or `NOT met (4.20x > 3x, 1.40x over)`.
    pub fn verdict(&self) -> String {
        let r = self.ratio;
        let Some(goal) = self.goal else {
            return "(information, no goal)".into();
        };
        match goal {
            Goal::AtMost(limit) if goal.met(r) => format!(
                "met ({r:.2}x <= {limit}x, {:.0}% headroom)",
                (1.0 - r / limit) * 100.0
            ),
            Goal::AtMost(limit) => {
                format!("NOT met ({r:.2}x > {limit}x, {:.2}x over)", r / limit)
            }
            Goal::AtLeast(floor) if goal.met(r) => {
                format!("met ({r:.2}x >= {floor}x, {:.2}x margin)", r / floor)
            }
            Goal::AtLeast(floor) => format!(
                "NOT met ({r:.2}x < {floor}x, needs {:.2}x more)",
                floor / r.max(1e-9)
            ),
        }
    }
}

/// What a row measured.
#[derive(Debug, Clone)]
pub enum Measure {
    Latency(Latency),
    /// MB/s of each run moving `bytes`.
    Throughput {
        bytes: u64,
        runs: Vec<f64>,
    },
}

impl Measure {
    /// The median of the runs, for a throughput.
    fn mb_per_s(runs: &[f64]) -> f64 {
        median(runs)
    }
}

/// One measured subject (envd, or a baseline).
#[derive(Debug, Clone)]
pub struct Row {
    /// JSON key, snake_case.
    pub key: &'static str,
    /// Table label.
    pub label: String,
    pub measure: Measure,
}

/// The result of one benchmark.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub bench: &'static str,
    pub params: Value,
    pub rows: Vec<Row>,
    pub checks: Vec<Check>,
}

impl Outcome {
    /// The machine-readable line.
    pub fn json(&self, smoke: bool) -> Value {
        let results: serde_json::Map<String, Value> = self
            .rows
            .iter()
            .map(|row| {
                let value = match &row.measure {
                    Measure::Latency(l) => json!({
                        "n": l.n,
                        "p50_us": round(us(l.p50)),
                        "p99_us": round(us(l.p99)),
                        "mean_us": round(us(l.mean)),
                        "min_us": round(us(l.min)),
                        "max_us": round(us(l.max)),
                    }),
                    Measure::Throughput { bytes, runs } => json!({
                        "bytes": bytes,
                        "reps": runs.len(),
                        "mb_per_s": round(Measure::mb_per_s(runs)),
                        "runs_mb_per_s": runs.iter().map(|r| round(*r)).collect::<Vec<_>>(),
                    }),
                };
                (row.key.to_string(), value)
            })
            .collect();
        let checks: Vec<Value> = self
            .checks
            .iter()
            .map(|c| {
                json!({
                    "ratio": c.what,
                    "value": (c.ratio * 1000.0).round() / 1000.0,
                    "goal": c.goal.map(Goal::describe),
                    "met": c.met(),
                })
            })
            .collect();
        json!({
            "bench": self.bench,
            "smoke": smoke,
            "params": self.params,
            "results": results,
            "checks": checks,
        })
    }
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn fmt_duration(d: Duration) -> String {
    let us = us(d);
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// The human-readable table of all outcomes, followed by the goal checks.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<7} {:<34} {:>6} {:>10} {:>10} {:>11}",
        "bench", "subject", "n", "p50", "p99", "MB/s"
    );
    let _ = writeln!(out, "{}", "-".repeat(83));
    for o in outcomes {
        for row in &o.rows {
            let (n, p50, p99, rate) = match &row.measure {
                Measure::Latency(l) => (
                    l.n.to_string(),
                    fmt_duration(l.p50),
                    fmt_duration(l.p99),
                    String::new(),
                ),
                Measure::Throughput { runs, .. } => (
                    format!("{}x", runs.len()),
                    String::new(),
                    String::new(),
                    format!("{:.0}", Measure::mb_per_s(runs)),
                ),
            };
            let _ = writeln!(
                out,
                "{:<7} {:<34} {:>6} {:>10} {:>10} {:>11}",
                o.bench, row.label, n, p50, p99, rate
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<7} {:<38} {:>8}  verdict",
        "bench", "ratio", "value"
    );
    let _ = writeln!(out, "{}", "-".repeat(83));
    for o in outcomes {
        for c in &o.checks {
            let _ = writeln!(
                out,
                "{:<7} {:<38} {:>7.2}x  {}",
                o.bench,
                c.what,
                c.ratio,
                c.verdict()
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let c = |ratio, goal| Check {
            what: "x".into(),
            ratio,
            goal: Some(goal),
        };
        assert!(c(2.0, Goal::AtMost(3.0)).verdict().starts_with("met"));
        assert!(c(4.0, Goal::AtMost(3.0)).verdict().starts_with("NOT met"));
        assert!(c(0.6, Goal::AtLeast(0.5)).verdict().starts_with("met"));
        assert!(c(0.25, Goal::AtLeast(0.5))
            .verdict()
            .contains("needs 2.00x more"));
        let info = Check {
            what: "x".into(),
            ratio: 1.0,
            goal: None,
        };
        assert_eq!(info.met(), None);
    }
}
