//! Numbers: per-capsule metrics (`/metrics`), team stats (`/stats`) and
//! daily usage (`/usage`).
//!
//! Metrics of a running capsule come from the agent's sampler (every 5 s)
//! in three tiers (10 minutes of samples, 2 h of 30 s points, 24 h of
//! 5 min points; [`history_for`] picks); CPU % is the CPU time used between
//! two points over the wall time × vCPUs. A paused capsule shows the
//! series saved when it paused. Stats
//! and usage are computed from the ledger of running stretches
//! (`capsule_runs`) when asked; nothing is rolled up.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use time::{Date, Duration as TimeDuration, OffsetDateTime};

use super::{host_of, owned};
use crate::auth::Caller;
use crate::db::{now_ms, CapsuleRow, MetricRow, Run};
use crate::error::{ApiError, ApiResult};
use crate::hosts::HostConn;
use crate::model::{rfc3339, Status};
use crate::server::Cp;

#[derive(Debug, Serialize)]
pub struct Point {
    timestamp_unix: i64,
    cpu_pct: f64,
    mem_bytes: i64,
    disk_bytes: i64,
}

const DAY_MS: i64 = 86_400_000;

fn metric_range(r: &str) -> Option<i64> {
    let min = match r {
        "5m" => 5,
        "10m" => 10,
        "1h" => 60,
        "2h" => 120,
        "6h" => 360,
        "12h" => 720,
        "24h" => 1440,
        _ => return None,
    };
    Some(min * 60_000)
}

/// The agent's history covering the last `span` ms: the finest of its
/// tiers (every sample for 10 min, 30 s points for 2 h, 5 min points for
/// 24 h) that spans it, followed by the finer tiers' newer points.
pub(crate) fn history_for(
    m: &wrenn_proto::wrenn::agent::v1::Metrics,
    span: i64,
) -> Vec<wrenn_proto::wrenn::agent::v1::MetricPoint> {
    let tiers = [&m.history_24h, &m.history_2h, &m.history];
    let first = match span {
        s if s <= 600_000 => 2,
        s if s <= 7_200_000 => 1,
        _ => 0,
    };
    let mut out: Vec<wrenn_proto::wrenn::agent::v1::MetricPoint> = Vec::new();
    for tier in &tiers[first..] {
        let after = out.last().map_or(i64::MIN, |p| p.at_ms);
        out.extend(tier.iter().filter(|p| p.at_ms > after).cloned());
    }
    out
}

/// Agent samples → points with CPU % between consecutive samples.
pub(crate) fn points(
    history: &[wrenn_proto::wrenn::agent::v1::MetricPoint],
    vcpus: i64,
) -> Vec<MetricRow> {
    history
        .windows(2)
        .map(|w| {
            let dt_us = ((w[1].at_ms - w[0].at_ms).max(1) as f64) * 1000.0;
            let used = w[1].cpu_usec.saturating_sub(w[0].cpu_usec) as f64;
            let pct = (used / (dt_us * vcpus.max(1) as f64) * 100.0).min(100.0);
            MetricRow {
                at_ms: w[1].at_ms,
                cpu_pct: (pct * 100.0).round() / 100.0,
                mem_bytes: w[1].memory_bytes as i64,
                disk_bytes: w[1].disk_bytes as i64,
            }
        })
        .collect()
}

/// Keep a capsule's samples in the database before it pauses (the agent
/// stops sampling a frozen capsule). Best effort.
pub async fn flush_metrics(cp: &Cp, host: &HostConn, c: &CapsuleRow) {
    if let Ok(m) = host.rpc.get_metrics(super::capsules::cref(&c.id)).await {
        let m = m.into_owned();
        let pts = points(&history_for(&m, DAY_MS), c.vcpus);
        if let Err(e) = cp.db.save_metrics(&c.id, &pts).await {
            tracing::warn!(capsule = %c.id, error = %e, "cannot save metrics");
        }
    }
}

/// `GET /v1/capsules/{id}/metrics?range=`
pub async fn metrics(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let range = q.get("range").map(String::as_str).unwrap_or("10m");
    let span = metric_range(range)
        .ok_or_else(|| ApiError::invalid("range must be one of 5m, 10m, 1h, 2h, 6h, 12h, 24h"))?;
    let c = owned(&cp, &caller, &id).await?;
    let since = now_ms() - span;
    let rows = match c.status {
        Status::Running => {
            let host = host_of(&cp, &c)?;
            let m = host
                .rpc
                .get_metrics(super::capsules::cref(&c.id))
                .await
                .map_err(|e| ApiError::agent(&e))?
                .into_owned();
            points(&history_for(&m, span), c.vcpus)
        }
        Status::Paused => cp.db.saved_metrics(&c.id, since).await?,
        _ => {
            return Err(ApiError::not_found(
                "the capsule has no metrics (not running or paused)",
            ))
        }
    };
    let pts: Vec<Point> = rows
        .into_iter()
        .filter(|p| p.at_ms >= since)
        .map(|p| Point {
            timestamp_unix: p.at_ms / 1000,
            cpu_pct: p.cpu_pct,
            mem_bytes: p.mem_bytes,
            disk_bytes: p.disk_bytes,
        })
        .collect();
    Ok(Json(
        json!({"sandbox_id": c.id.to_string(), "range": range, "points": pts}),
    ))
}

/// (range span, bucket) in milliseconds, as wrenn buckets them.
fn stats_range(r: &str) -> Option<(i64, i64)> {
    Some(match r {
        "5m" => (300_000, 3_000),
        "1h" => (3_600_000, 30_000),
        "6h" => (21_600_000, 180_000),
        "24h" => (86_400_000, 720_000),
        "30d" => (2_592_000_000, 21_600_000),
        _ => return None,
    })
}

/// Sum of running capsules, vCPUs and MiB at instant `t`.
fn at(runs: &[Run], t: i64) -> (i64, i64, i64) {
    runs.iter()
        .filter(|r| r.started_at <= t && r.ended_at.is_none_or(|e| e > t))
        .fold((0, 0, 0), |(n, v, m), r| {
            (n + 1, v + r.vcpus, m + r.memory_mb)
        })
}

fn series(runs: &[Run], now: i64, span: i64, step: i64) -> Vec<(i64, (i64, i64, i64))> {
    let start = (now - span) / step * step + step;
    (0..)
        .map(|i| start + i * step)
        .take_while(|t| *t <= now)
        .map(|t| (t, at(runs, t)))
        .collect()
}

/// `GET /v1/capsules/stats?range=`
pub async fn stats(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let range = q.get("range").map(String::as_str).unwrap_or("1h");
    let (span, step) = stats_range(range)
        .ok_or_else(|| ApiError::invalid("range must be one of 5m, 1h, 6h, 24h, 30d"))?;
    let now = now_ms();
    let month = 2_592_000_000;
    let runs = cp.db.runs(caller.team_id(), now - month, now + 1).await?;
    let cur = at(&runs, now);
    let s = series(&runs, now, span, step);
    let peak = series(&runs, now, month, 21_600_000)
        .into_iter()
        .map(|(_, v)| v)
        .chain(s.iter().map(|(_, v)| *v))
        .chain(std::iter::once(cur))
        .fold((0, 0, 0), |a, b| (a.0.max(b.0), a.1.max(b.1), a.2.max(b.2)));
    Ok(Json(json!({
        "range": range,
        "current": {"running_count": cur.0, "vcpus_reserved": cur.1, "memory_mb_reserved": cur.2},
        "peaks": {"running_count": peak.0, "vcpus": peak.1, "memory_mb": peak.2},
        "series": {
            "labels": s.iter().map(|(t, _)| rfc3339(*t)).collect::<Vec<_>>(),
            "running": s.iter().map(|(_, v)| v.0).collect::<Vec<_>>(),
            "vcpus": s.iter().map(|(_, v)| v.1).collect::<Vec<_>>(),
            "memory_mb": s.iter().map(|(_, v)| v.2).collect::<Vec<_>>(),
        }
    })))
}

fn parse_date(s: &str) -> ApiResult<Date> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(s, &fmt).map_err(|_| ApiError::invalid(format!("invalid date {s:?} (YYYY-MM-DD)")))
}

/// `GET /v1/capsules/usage?from=&to=`
pub async fn usage(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let now = now_ms();
    let today = OffsetDateTime::from_unix_timestamp(now / 1000)
        .map_err(|_| ApiError::internal())?
        .date();
    let to = q
        .get("to")
        .map(|s| parse_date(s))
        .transpose()?
        .unwrap_or(today);
    let from = q
        .get("from")
        .map(|s| parse_date(s))
        .transpose()?
        .unwrap_or(today - TimeDuration::days(29));
    if from > to {
        return Err(ApiError::invalid("from is after to"));
    }
    if (to - from).whole_days() > 92 {
        return Err(ApiError::invalid("the range spans more than 92 days"));
    }
    let day_ms = |d: Date| d.midnight().assume_utc().unix_timestamp() * 1000;
    let (start, end) = (day_ms(from), day_ms(to) + 86_400_000);
    let runs = cp.db.runs(caller.team_id(), start, end).await?;
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let mut out = Vec::new();
    let mut d = from;
    while d <= to {
        let (a, b) = (day_ms(d), day_ms(d) + 86_400_000);
        let (mut cpu, mut ram) = (0.0, 0.0);
        for r in &runs {
            let s = r.started_at.max(a);
            let e = r.ended_at.unwrap_or(now).min(b).min(now);
            if e > s {
                let minutes = (e - s) as f64 / 60_000.0;
                cpu += minutes * r.vcpus as f64;
                ram += minutes * r.memory_mb as f64;
            }
        }
        out.push(json!({
            "date": d.format(&fmt).unwrap_or_default(),
            "cpu_minutes": (cpu * 1000.0).round() / 1000.0,
            "ram_mb_minutes": (ram * 1000.0).round() / 1000.0,
        }));
        match d.next_day() {
            Some(next) => d = next,
            None => break,
        }
    }
    Ok(Json(json!({
        "from": from.format(&fmt).unwrap_or_default(),
        "to": to.format(&fmt).unwrap_or_default(),
        "points": out,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_counts_stretches_running_at_each_bucket() {
        let runs = [
            Run {
                vcpus: 1,
                memory_mb: 512,
                started_at: 1_000,
                ended_at: Some(5_000),
            },
            Run {
                vcpus: 2,
                memory_mb: 1024,
                started_at: 3_000,
                ended_at: None,
            },
        ];
        assert_eq!(at(&runs, 500), (0, 0, 0));
        assert_eq!(at(&runs, 1_000), (1, 1, 512));
        assert_eq!(at(&runs, 4_000), (2, 3, 1536));
        assert_eq!(at(&runs, 5_000), (1, 2, 1024));
        let s = series(&runs, 10_000, 10_000, 1_000);
        assert_eq!(s.len(), 10);
        assert_eq!(s.last().unwrap().0, 10_000);
    }

    #[test]
    fn cpu_percent_between_samples() {
        use wrenn_proto::wrenn::agent::v1::MetricPoint;
        let p = |at_ms, cpu_usec| MetricPoint {
            at_ms,
            cpu_usec,
            memory_bytes: 7,
            ..Default::default()
        };
        // 0.5 s of CPU over 1 s on 1 vCPU = 50 %; on 2 vCPUs 25 %
        let h = [p(0, 0), p(1000, 500_000)];
        assert_eq!(points(&h, 1)[0].cpu_pct, 50.0);
        assert_eq!(points(&h, 2)[0].cpu_pct, 25.0);
        assert_eq!(points(&h, 1)[0].mem_bytes, 7);
    }
}

#[cfg(test)]
mod history_tests {
    use super::*;
    use wrenn_proto::wrenn::agent::v1::{MetricPoint, Metrics};

    fn at(ms: &[i64]) -> Vec<MetricPoint> {
        ms.iter()
            .map(|&at_ms| MetricPoint {
                at_ms,
                cpu_usec: at_ms as u64 * 500,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn ranges_take_the_tier_that_spans_them() {
        let m = Metrics {
            history_24h: at(&[0, 300_000, 600_000]),
            history_2h: at(&[570_000, 600_000, 630_000]),
            history: at(&[625_000, 630_000, 635_000, 640_000]),
            ..Default::default()
        };
        let ms = |v: Vec<MetricPoint>| v.iter().map(|p| p.at_ms).collect::<Vec<_>>();
        assert_eq!(
            ms(history_for(&m, 600_000)),
            [625_000, 630_000, 635_000, 640_000]
        );
        assert_eq!(
            ms(history_for(&m, 3_600_000)),
            [570_000, 600_000, 630_000, 635_000, 640_000]
        );
        assert_eq!(
            ms(history_for(&m, DAY_MS)),
            [0, 300_000, 600_000, 630_000, 635_000, 640_000]
        );
        // half a CPU all along, whatever the tiers' spacing
        let pts = points(&history_for(&m, DAY_MS), 1);
        assert!(pts.iter().all(|p| p.cpu_pct == 50.0), "{pts:?}");
    }
}
