//! Numbers: per-capsule metrics (`/metrics`), team stats (`/stats`) and
//! daily usage (`/usage`).
//!
//! Metrics of a running capsule come from the agent's sampler (every 500 ms)
//! in three tiers (10 minutes of samples, 2 h of 30 s points, 24 h of
//! 5 min points; [`history_for`] picks); CPU % is the CPU time used between
//! two points over the wall time × vCPUs. A paused capsule shows the
//! series saved when it paused. Stats
//! and usage are computed from the ledger of running stretches
//! (`capsule_runs`) when asked; nothing is rolled up.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use time::{Date, Duration as TimeDuration, OffsetDateTime};

use super::{host_of, owned, Path, Query};
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

/// Usage dates: `YYYY-MM-DD`.
const DATE: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]");

fn day_name(d: Date) -> String {
    d.format(DATE).unwrap_or_default()
}

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

/// The agent's whole history at the finest grain each stretch has: every
/// sample of the last 10 minutes, the 30 s points before them, the 5 min
/// points before those. (E2B's metrics, one per 5 s for the sandbox's
/// life: [`history_for`] of a day started from the 5 min points, and each
/// new 30 s point swallowed the samples before it.)
pub(crate) fn history_all(
    m: &wrenn_proto::wrenn::agent::v1::Metrics,
) -> Vec<wrenn_proto::wrenn::agent::v1::MetricPoint> {
    let mut out: Vec<wrenn_proto::wrenn::agent::v1::MetricPoint> = Vec::new();
    for tier in [&m.history, &m.history_2h, &m.history_24h] {
        let before = out.first().map_or(i64::MAX, |p| p.at_ms);
        let older: Vec<_> = tier.iter().filter(|p| p.at_ms < before).cloned().collect();
        out.splice(0..0, older);
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
            let dt_us = (w[1].at_ms.saturating_sub(w[0].at_ms).max(1) as f64) * 1000.0;
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

/// The first point of each `step` of the clock (E2B shows a point every
/// 5 s; the agent samples every 500 ms). On the clock's grid, not counted
/// from the first point, so the points kept do not change as older ones
/// come and go: a client polling sees its list grow. Thinned before
/// [`points`], a point's CPU % is the mean over the step it ends.
pub(crate) fn thin<T>(v: Vec<T>, step: i64, at_ms: impl Fn(&T) -> i64) -> Vec<T> {
    let mut last = None;
    v.into_iter()
        .filter(|p| {
            let bucket = Some(at_ms(p).div_euclid(step.max(1)));
            let keep = bucket != last;
            last = bucket;
            keep
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
    Date::parse(s, DATE).map_err(|_| ApiError::invalid(format!("invalid date {s:?} (YYYY-MM-DD)")))
}

/// Unix ms of `d`'s midnight, UTC.
fn day_ms(d: Date) -> i64 {
    d.midnight().assume_utc().unix_timestamp() * 1000
}

/// Roll up every finished day not rolled up yet (at most the last 400),
/// from the first day with a run; then again every hour, until `cp` stops.
pub async fn run_rollups(cp: Arc<Cp>) {
    loop {
        if let Err(e) = roll_up(&cp).await {
            tracing::warn!(error = %e, "usage rollup failed");
        }
        tokio::select! {
            () = cp.stop.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
        }
    }
}

/// One pass of [`run_rollups`].
pub async fn roll_up(cp: &Cp) -> Result<(), crate::db::DbError> {
    let Ok(now) = OffsetDateTime::from_unix_timestamp(now_ms() / 1000) else {
        return Ok(());
    };
    let today = now.date();
    let (last, first_run) = cp.db.rollup_bounds().await?;
    let after_last = last
        .and_then(|l| Date::parse(&l, DATE).ok())
        .and_then(|d| d.next_day());
    let first = first_run
        .and_then(|ms| OffsetDateTime::from_unix_timestamp(ms / 1000).ok())
        .map(|t| t.date());
    let Some(mut d) = after_last.or(first) else {
        return Ok(());
    };
    d = d.max(today - TimeDuration::days(400));
    while d < today && !cp.stop.is_cancelled() {
        cp.db
            .roll_up_day(&day_name(d), day_ms(d), day_ms(d) + DAY_MS)
            .await?;
        match d.next_day() {
            Some(next) => d = next,
            None => break,
        }
    }
    Ok(())
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
    let day = day_name;
    // Finished days from the rollup where it has them; the rest (today,
    // and days not rolled up yet) from the run ledger.
    let rolled = cp
        .db
        .rolled_usage(caller.team_id(), &day(from), &day(to))
        .await?;
    let mut live_from = from;
    while live_from < today && live_from <= to && rolled.contains_key(&day(live_from)) {
        match live_from.next_day() {
            Some(next) => live_from = next,
            None => break,
        }
    }
    let runs = if live_from <= to {
        cp.db
            .runs(caller.team_id(), day_ms(live_from), day_ms(to) + DAY_MS)
            .await?
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    let mut d = from;
    while d <= to {
        let (cpu, ram) = match rolled.get(&day(d)).filter(|_| d < today) {
            Some(&kept) => kept,
            None => runs.iter().fold((0.0, 0.0), |acc, r| {
                let (c, m) = r.usage_within(day_ms(d), day_ms(d) + DAY_MS, now);
                (acc.0 + c, acc.1 + m)
            }),
        };
        out.push(json!({
            "date": day(d),
            "cpu_minutes": (cpu * 1000.0).round() / 1000.0,
            "ram_mb_minutes": (ram * 1000.0).round() / 1000.0,
        }));
        match d.next_day() {
            Some(next) => d = next,
            None => break,
        }
    }
    Ok(Json(json!({
        "from": day(from),
        "to": day(to),
        "points": out,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_the_part_of_a_run_inside_the_window() {
        let run = |started_at, ended_at| Run {
            vcpus: 2,
            memory_mb: 100,
            started_at,
            ended_at,
        };
        let min = 60_000;
        // clipped at both ends of the window
        assert_eq!(
            run(0, Some(10 * min)).usage_within(2 * min, 5 * min, 99 * min),
            (6.0, 300.0)
        );
        // a run still going counts up to now, never past the window
        assert_eq!(
            run(4 * min, None).usage_within(0, 10 * min, 7 * min),
            (6.0, 300.0)
        );
        assert_eq!(
            run(4 * min, None).usage_within(0, 5 * min, 7 * min),
            (2.0, 100.0)
        );
        // outside the window, or not started yet
        assert_eq!(
            run(0, Some(min)).usage_within(min, 2 * min, 9 * min),
            (0.0, 0.0)
        );
        assert_eq!(
            run(5 * min, None).usage_within(0, 9 * min, 4 * min),
            (0.0, 0.0)
        );
        assert_eq!(
            day_name(Date::from_ordinal_date(2026, 334).unwrap()),
            "2026-11-30"
        );
        assert_eq!(day_ms(Date::from_ordinal_date(1970, 2).unwrap()), DAY_MS);
    }

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
    fn thinning_keeps_a_point_every_step() {
        let row = |at_ms| MetricRow {
            at_ms,
            cpu_pct: 0.0,
            mem_bytes: 0,
            disk_bytes: 0,
        };
        // 500 ms samples, then the coarse tiers' 30 s points
        let rows: Vec<MetricRow> = (0..25)
            .map(|i| row(i * 500))
            .chain([row(40_000), row(70_000)])
            .collect();
        let kept: Vec<i64> = thin(rows, 5_000, |p| p.at_ms)
            .iter()
            .map(|p| p.at_ms)
            .collect();
        assert_eq!(kept, [0, 5_000, 10_000, 40_000, 70_000]);
        // the same grid whatever the first point
        let rows: Vec<MetricRow> = (3..25).map(|i| row(i * 500)).collect();
        let kept: Vec<i64> = thin(rows, 5_000, |p| p.at_ms)
            .iter()
            .map(|p| p.at_ms)
            .collect();
        assert_eq!(kept, [1_500, 5_000, 10_000]);
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
        // the whole history, each stretch at its finest
        assert_eq!(
            ms(history_all(&m)),
            [0, 300_000, 570_000, 600_000, 625_000, 630_000, 635_000, 640_000]
        );
        let pts = points(&history_all(&m), 1);
        assert!(pts.iter().all(|p| p.cpu_pct == 50.0), "{pts:?}");
    }
}
