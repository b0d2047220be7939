//! A capsule's metrics history in wrenn's three tiers: every sample for
//! the last 10 minutes (5m and 10m ranges), 30 s points for 2 hours (1h,
//! 2h) and 5 min points for 24 hours (6h, 12h, 24h). A coarse point is
//! the end of its span: the CPU counter as it stood then (so consecutive
//! points give the mean CPU over the span), memory and disk averaged over
//! the span's samples, the last pid count.
//!
//! A history outlives its agent: [`History::to_bytes`] is what the agent
//! writes to the capsule's directory (every
//! [`crate::config::AgentConfig::metrics_save_interval`] and when it stops),
//! [`History::from_bytes`] what it reads back when it adopts the capsule.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::agent::CapsuleMetrics;
use crate::cgroup::Usage;

/// The finest tier: every sample of the last [`FINE_SPAN_MS`], at most
/// [`SAMPLES_KEPT`] of them (10 minutes at the default 500 ms interval).
pub const SAMPLES_KEPT: usize = 1200;
pub const FINE_SPAN_MS: u64 = 600_000;
/// How long a walk of a capsule's upper dir stands for its disk use: the
/// sampler's other reads are a few cgroup files, this one a whole tree.
pub const DISK_FRESH_MS: u64 = 5_000;
/// (span of one point in ms, points kept) of the coarser tiers.
pub const TIERS: [(u64, usize); 2] = [(30_000, 240), (300_000, 288)];

#[derive(Debug, Default)]
pub struct History {
    fine: VecDeque<CapsuleMetrics>,
    coarse: [Tier; 2],
    /// (when, bytes) of the last walk of the upper dir.
    disk: Option<(u64, u64)>,
    /// A sample came since the history was last written ([`History::to_bytes`]).
    unsaved: bool,
}

#[derive(Debug, Default)]
struct Tier {
    points: VecDeque<CapsuleMetrics>,
    /// The span being filled: its index, sample count, sums, last sample.
    open: Option<(u64, u64, u128, u128, CapsuleMetrics)>,
}

/// The saved form of a [`History`]: a point is
/// `[at_ms, cpu_usec, memory_bytes, pids, oom_kills, disk_bytes]`, less
/// than half its size as a JSON object (a full day's history is ~90 KB).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    /// [`SAVED_VERSION`]: another is not read.
    v: u32,
    fine: VecDeque<Point>,
    coarse: [SavedTier; 2],
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedTier {
    points: VecDeque<Point>,
    open: Option<(u64, u64, u128, u128, Point)>,
}

const SAVED_VERSION: u32 = 1;
/// More samples than a span of the coarsest tier holds at 1 ms apart.
const MAX_SPAN_SAMPLES: u64 = 300_000;

#[derive(Clone, Copy, Serialize, Deserialize)]
struct Point(u64, u64, u64, u64, u64, u64);

impl From<CapsuleMetrics> for Point {
    fn from(m: CapsuleMetrics) -> Point {
        let u = m.usage;
        Point(
            m.at_ms,
            u.cpu_usec,
            u.memory_bytes,
            u.pids,
            u.oom_kills,
            m.disk_bytes,
        )
    }
}

impl From<Point> for CapsuleMetrics {
    fn from(Point(at_ms, cpu_usec, memory_bytes, pids, oom_kills, disk_bytes): Point) -> Self {
        CapsuleMetrics {
            at_ms,
            usage: Usage {
                cpu_usec,
                memory_bytes,
                pids,
                oom_kills,
            },
            disk_bytes,
        }
    }
}

impl Tier {
    fn push(&mut self, s: CapsuleMetrics, span_ms: u64, keep: usize) {
        let span = s.at_ms / span_ms;
        if let Some((open, n, mem, disk, last)) = self.open {
            if open == span {
                let sums = (
                    mem + s.usage.memory_bytes as u128,
                    disk + s.disk_bytes as u128,
                );
                self.open = Some((open, n + 1, sums.0, sums.1, s));
                return;
            }
            let mut p = last;
            p.usage.memory_bytes = (mem / n as u128) as u64;
            p.disk_bytes = (disk / n as u128) as u64;
            while self.points.len() >= keep {
                self.points.pop_front();
            }
            self.points.push_back(p);
        }
        self.open = Some((
            span,
            1,
            s.usage.memory_bytes as u128,
            s.disk_bytes as u128,
            s,
        ));
    }
}

impl History {
    pub fn push(&mut self, s: CapsuleMetrics) {
        self.unsaved = true;
        self.fine.push_back(s);
        while self.fine.len() > SAMPLES_KEPT
            || self
                .fine
                .front()
                .is_some_and(|f| f.at_ms.saturating_add(FINE_SPAN_MS) <= s.at_ms)
        {
            self.fine.pop_front();
        }
        for (tier, (span, keep)) in self.coarse.iter_mut().zip(TIERS) {
            tier.push(s, span, keep);
        }
    }

    /// The disk use measured less than [`DISK_FRESH_MS`] before `now_ms`.
    pub fn fresh_disk(&self, now_ms: u64) -> Option<u64> {
        self.disk
            .filter(|(at, _)| now_ms.saturating_sub(*at) < DISK_FRESH_MS)
            .map(|(_, bytes)| bytes)
    }

    /// Record a walk of the upper dir.
    pub fn disk_measured(&mut self, at_ms: u64, bytes: u64) {
        self.disk = Some((at_ms, bytes));
    }

    /// Every sample of the finest tier, oldest first.
    pub fn fine(&self) -> Vec<CapsuleMetrics> {
        self.fine.iter().copied().collect()
    }

    /// The closed points of coarse tier `i` (0: 30 s, 1: 5 min), oldest first.
    pub fn coarse(&self, i: usize) -> Vec<CapsuleMetrics> {
        self.coarse[i].points.iter().copied().collect()
    }

    /// Whether a sample came since the last [`History::to_bytes`].
    pub fn unsaved(&self) -> bool {
        self.unsaved
    }

    /// What [`History::to_bytes`] gave could not be written: save it again.
    pub fn save_failed(&mut self) {
        self.unsaved = true;
    }

    /// The history as the agent writes it to disk (the last disk walk
    /// aside); it counts as saved from now on.
    pub fn to_bytes(&mut self) -> Vec<u8> {
        self.unsaved = false;
        let points = |v: &VecDeque<CapsuleMetrics>| v.iter().map(|&m| Point::from(m)).collect();
        let tier = |t: &Tier| SavedTier {
            points: points(&t.points),
            open: t
                .open
                .map(|(i, n, mem, disk, last)| (i, n, mem, disk, last.into())),
        };
        serde_json::to_vec(&Saved {
            v: SAVED_VERSION,
            fine: points(&self.fine),
            coarse: [tier(&self.coarse[0]), tier(&self.coarse[1])],
        })
        .expect("a history serialises")
    }

    /// A history [`History::to_bytes`] wrote, read at `now_ms`: malformed
    /// bytes, another version or points out of order are an error, never a
    /// panic. Points later than `now_ms` (the clock went back while the
    /// agent was down) are dropped: newer ones would sort before them. Each
    /// tier is cut to what it keeps.
    pub fn from_bytes(bytes: &[u8], now_ms: u64) -> Result<History, String> {
        let saved: Saved = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if saved.v != SAVED_VERSION {
            return Err(format!(
                "metrics history version {} (expected {SAVED_VERSION})",
                saved.v
            ));
        }
        // (an open span's count divides its sums, which later samples add to)
        let sane = |&(_, n, mem, disk, _): &(u64, u64, u128, u128, Point)| {
            let most = u128::from(n) * u128::from(u64::MAX);
            (1..=MAX_SPAN_SAMPLES).contains(&n) && mem <= most && disk <= most
        };
        if saved
            .coarse
            .iter()
            .any(|t| t.open.as_ref().is_some_and(|o| !sane(o)))
        {
            return Err("metrics history: an open span's sums do not fit its count".into());
        }
        let ordered = |v: &VecDeque<Point>| v.iter().zip(v.iter().skip(1)).all(|(a, b)| a.0 <= b.0);
        if !ordered(&saved.fine) || !saved.coarse.iter().all(|t| ordered(&t.points)) {
            return Err("metrics history: points out of order".into());
        }
        let points = |v: VecDeque<Point>, keep: usize| {
            let mut v: VecDeque<CapsuleMetrics> = v
                .into_iter()
                .filter(|p| p.0 <= now_ms)
                .map(CapsuleMetrics::from)
                .collect();
            v.drain(..v.len().saturating_sub(keep));
            v
        };
        let tier = |t: SavedTier, keep: usize| Tier {
            points: points(t.points, keep),
            open: t
                .open
                .filter(|o| o.4 .0 <= now_ms)
                .map(|(i, n, mem, disk, last)| (i, n, mem, disk, last.into())),
        };
        let [mid, coarse] = saved.coarse;
        Ok(History {
            fine: points(saved.fine, SAMPLES_KEPT),
            coarse: [tier(mid, TIERS[0].1), tier(coarse, TIERS[1].1)],
            disk: None,
            unsaved: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::Usage;

    fn sample(at_ms: u64, cpu_usec: u64, mem: u64) -> CapsuleMetrics {
        CapsuleMetrics {
            at_ms,
            usage: Usage {
                cpu_usec,
                memory_bytes: mem,
                pids: 1,
                oom_kills: 0,
            },
            disk_bytes: 10,
        }
    }

    #[test]
    fn tiers_keep_their_spans() {
        let mut h = History::default();
        // 3 hours of 500 ms samples: 1 CPU second per second, memory rising
        let n = 3 * 3600 * 2;
        for i in 0..n {
            h.push(sample(i * 500, i * 500_000, i));
        }
        let fine = h.fine();
        assert_eq!(fine.len(), SAMPLES_KEPT);
        assert_eq!(fine.last().unwrap().at_ms, (n - 1) * 500);
        assert_eq!(
            fine.last().unwrap().at_ms - fine[0].at_ms,
            FINE_SPAN_MS - 500,
            "every sample of the last 10 minutes"
        );

        let mid = h.coarse(0);
        assert_eq!(mid.len(), 240, "2 hours of 30 s points");
        for w in mid.windows(2) {
            assert_eq!(w[1].at_ms - w[0].at_ms, 30_000);
            // the CPU counter's difference over a span is the span's CPU
            assert_eq!(w[1].usage.cpu_usec - w[0].usage.cpu_usec, 30_000_000);
        }
        // a point ends its span (the last of its 60 samples) and averages
        // their memory
        let p = mid.last().unwrap();
        assert_eq!(p.at_ms % 30_000, 29_500);
        let i_last = p.at_ms / 500;
        assert_eq!(
            p.usage.memory_bytes,
            (i_last - 59..=i_last).sum::<u64>() / 60
        );

        let coarse = h.coarse(1);
        assert_eq!(
            coarse.len(),
            3 * 12 - 1,
            "every closed 5 min span of 3 hours"
        );
        assert_eq!(coarse[1].at_ms - coarse[0].at_ms, 300_000);

        // and 24 hours is where the coarsest tier stops
        for i in n..(26 * 3600 * 2) {
            h.push(sample(i * 500, i * 500_000, i));
        }
        assert_eq!(h.coarse(1).len(), 288);
    }

    #[test]
    fn the_fine_tier_is_ten_minutes_whatever_the_interval() {
        let mut h = History::default();
        // a slower sampler (5 s) and a gap of 20 minutes
        for i in 0..300 {
            h.push(sample(i * 5_000, 0, 0));
        }
        assert_eq!(h.fine().len(), 120);
        h.push(sample(299 * 5_000 + 1_200_000, 0, 0));
        assert_eq!(h.fine().len(), 1, "samples older than 10 minutes go");
    }

    #[test]
    fn a_saved_history_goes_on_as_if_it_had_not_been() {
        let mut kept = History::default();
        // 2 hours and a bit: every tier full or filling, spans left open
        let n = 2 * 3600 * 2 + 77;
        for i in 0..n {
            kept.push(sample(i * 500, i * 500_000, i));
        }
        assert!(kept.unsaved());
        let bytes = kept.to_bytes();
        assert!(!kept.unsaved());
        assert!(bytes.len() < 100_000, "{} bytes", bytes.len());
        let mut read = History::from_bytes(&bytes, u64::MAX).unwrap();
        assert!(!read.unsaved());
        for h in [&mut kept, &mut read] {
            for i in n..n + 1_000 {
                h.push(sample(i * 500, i * 500_000, 3 * i));
            }
        }
        assert!(read.unsaved());
        assert_eq!(read.fine(), kept.fine());
        for t in 0..2 {
            assert!(!kept.coarse(t).is_empty());
            assert_eq!(read.coarse(t), kept.coarse(t), "tier {t}");
        }
    }

    #[test]
    fn a_bad_saved_history_is_an_error() {
        let mut h = History::default();
        for i in 0..200 {
            h.push(sample(i * 500, i, i));
        }
        let good = h.to_bytes();
        for cut in [0, 1, good.len() / 2, good.len() - 1] {
            assert!(
                History::from_bytes(&good[..cut], u64::MAX).is_err(),
                "cut at {cut}"
            );
        }
        let saved = |v: u32, open: &str| {
            format!(
                r#"{{"v":{v},"fine":[[1,2,3,4,5,6]],"coarse":[{{"points":[],"open":{open}}},{{"points":[],"open":null}}]}}"#
            )
        };
        assert!(History::from_bytes(saved(1, "null").as_bytes(), u64::MAX).is_ok());
        for bad in [
            "null".to_owned(),
            "[]".to_owned(),
            saved(2, "null"),
            saved(1, "[0,0,0,0,[1,2,3,4,5,6]]"),
            saved(1, &format!("[0,1,{},0,[1,2,3,4,5,6]]", u128::MAX)),
            saved(1, "[0,1,0,0,[1,2,3,4,5]]"),
            saved(1, "[0,18446744073709551615,0,0,[1,2,3,4,5,6]]"),
            saved(1, "null").replace(r#""v":1"#, r#""v":1,"extra":0"#),
        ] {
            assert!(
                History::from_bytes(bad.as_bytes(), u64::MAX).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_read_history_is_cut_to_its_tiers_and_to_now() {
        let point = |i: u64| format!("[{},0,0,1,0,0]", i * 30_000 + 29_999);
        let points: Vec<String> = (0..300).map(point).collect();
        let fine: Vec<String> = (0..1500).map(|i| format!("[{i},0,0,1,0,0]")).collect();
        let bytes = format!(
            r#"{{"v":1,"fine":[{}],"coarse":[{{"points":[{}],"open":[300,1,0,0,{}]}},{{"points":[],"open":null}}]}}"#,
            fine.join(","),
            points.join(","),
            point(300)
        );
        let mut h = History::from_bytes(bytes.as_bytes(), u64::MAX).unwrap();
        assert_eq!(h.fine().len(), SAMPLES_KEPT);
        assert_eq!(h.fine()[0].at_ms, 300, "the newest samples are kept");
        assert_eq!(h.coarse(0).len(), 240, "the 30 s tier keeps 2 hours");
        assert_eq!(h.coarse(0)[0].at_ms, 60 * 30_000 + 29_999);
        h.push(sample(301 * 30_000, 0, 0));
        assert_eq!(h.coarse(0).len(), 240);
        assert_eq!(h.coarse(0).last().unwrap().at_ms, 300 * 30_000 + 29_999);

        // read with the clock at the 100th point: the later ones, and the
        // open span, are from a clock that went back since
        let now = 100 * 30_000 + 29_999;
        let mut h = History::from_bytes(bytes.as_bytes(), now).unwrap();
        assert_eq!(h.coarse(0).last().unwrap().at_ms, now);
        assert_eq!(h.coarse(0).len(), 101);
        h.push(sample(now + 1, 0, 0));
        h.push(sample(now + 30_001, 0, 0));
        assert_eq!(
            h.coarse(0).last().unwrap().at_ms,
            now + 1,
            "no later point left open"
        );

        // points out of order are an error
        let swapped = bytes.replacen(
            "[0,0,0,1,0,0],[1,0,0,1,0,0]",
            "[1,0,0,1,0,0],[0,0,0,1,0,0]",
            1,
        );
        assert_ne!(swapped, bytes);
        assert!(History::from_bytes(swapped.as_bytes(), u64::MAX).is_err());
    }

    #[test]
    fn a_disk_walk_stands_for_five_seconds() {
        let mut h = History::default();
        assert_eq!(h.fresh_disk(1_000), None);
        h.disk_measured(1_000, 42);
        assert_eq!(h.fresh_disk(1_000), Some(42));
        assert_eq!(h.fresh_disk(1_000 + DISK_FRESH_MS - 1), Some(42));
        assert_eq!(h.fresh_disk(1_000 + DISK_FRESH_MS), None);
    }
}
