//! A capsule's metrics history in wrenn's three tiers: every sample for
//! the last 10 minutes (5m and 10m ranges), 30 s points for 2 hours (1h,
//! 2h) and 5 min points for 24 hours (6h, 12h, 24h). A coarse point is
//! the end of its span: the CPU counter as it stood then (so consecutive
//! points give the mean CPU over the span), memory and disk averaged over
//! the span's samples, the last pid count.

use std::collections::VecDeque;

use crate::agent::CapsuleMetrics;

/// The finest tier: [`SAMPLES_KEPT`] samples (10 minutes at the default
/// 5 s interval).
pub const SAMPLES_KEPT: usize = 120;
/// (span of one point in ms, points kept) of the coarser tiers.
pub const TIERS: [(u64, usize); 2] = [(30_000, 240), (300_000, 288)];

#[derive(Debug, Default)]
pub struct History {
    fine: VecDeque<CapsuleMetrics>,
    coarse: [Tier; 2],
}

#[derive(Debug, Default)]
struct Tier {
    points: VecDeque<CapsuleMetrics>,
    /// The span being filled: its index, sample count, sums, last sample.
    open: Option<(u64, u64, u128, u128, CapsuleMetrics)>,
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
            if self.points.len() == keep {
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
        if self.fine.len() == SAMPLES_KEPT {
            self.fine.pop_front();
        }
        self.fine.push_back(s);
        for (tier, (span, keep)) in self.coarse.iter_mut().zip(TIERS) {
            tier.push(s, span, keep);
        }
    }

    /// Every sample of the finest tier, oldest first.
    pub fn fine(&self) -> Vec<CapsuleMetrics> {
        self.fine.iter().copied().collect()
    }

    /// The closed points of coarse tier `i` (0: 30 s, 1: 5 min), oldest first.
    pub fn coarse(&self, i: usize) -> Vec<CapsuleMetrics> {
        self.coarse[i].points.iter().copied().collect()
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
        // 3 hours of 5 s samples: 1 CPU second per second, memory rising
        let n = 3 * 3600 / 5;
        for i in 0..n {
            h.push(sample(i * 5_000, i * 5_000_000, i));
        }
        let fine = h.fine();
        assert_eq!(fine.len(), SAMPLES_KEPT);
        assert_eq!(fine.last().unwrap().at_ms, (n - 1) * 5_000);

        let mid = h.coarse(0);
        assert_eq!(mid.len(), 240, "2 hours of 30 s points");
        for w in mid.windows(2) {
            assert_eq!(w[1].at_ms - w[0].at_ms, 30_000);
            // the CPU counter's difference over a span is the span's CPU
            assert_eq!(w[1].usage.cpu_usec - w[0].usage.cpu_usec, 30_000_000);
        }
        // a point ends its span (the last of its six samples) and averages
        // their memory
        let p = mid.last().unwrap();
        assert_eq!(p.at_ms % 30_000, 25_000);
        let i_last = p.at_ms / 5_000;
        assert_eq!(p.usage.memory_bytes, (i_last - 5..=i_last).sum::<u64>() / 6);

        let coarse = h.coarse(1);
        assert_eq!(
            coarse.len(),
            3 * 12 - 1,
            "every closed 5 min span of 3 hours"
        );
        assert_eq!(coarse[1].at_ms - coarse[0].at_ms, 300_000);

        // and 24 hours is where the coarsest tier stops
        for i in n..(26 * 3600 / 5) {
            h.push(sample(i * 5_000, i * 5_000_000, i));
        }
        assert_eq!(h.coarse(1).len(), 288);
    }
}
