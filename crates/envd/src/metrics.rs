//! `GET /metrics`: CPU from a 1 s sampler of `/proc/stat`, memory from
//! `/proc/meminfo`, disk from `statvfs("/")` (used = total − available).
//!
//! The sampler is one task; `pause` (before a snapshot) stops it from
//! sampling and `resume` (on `/init`) restarts it, so no stale delta spans
//! the snapshot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wrenn_types::envd::Metrics;

/// The CPU sampler.
pub struct Sampler {
    /// `cpu_used_pct * 100`, as the sampler last measured it.
    pct_centi: Arc<AtomicU64>,
    paused: Arc<AtomicBool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler").finish_non_exhaustive()
    }
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new()
    }
}

fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let nums: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|n| n.parse().ok())
        .collect();
    let idle = nums.get(3)? + nums.get(4).unwrap_or(&0);
    Some((nums.iter().sum(), idle))
}

impl Sampler {
    pub fn new() -> Self {
        Self {
            pct_centi: Arc::new(AtomicU64::new(0)),
            paused: Arc::new(AtomicBool::new(false)),
            task: Mutex::new(None),
        }
    }

    /// Start sampling once a second.
    pub fn start(&self) {
        let pct = self.pct_centi.clone();
        let paused = self.paused.clone();
        let task = tokio::spawn(async move {
            let mut last = cpu_times();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if paused.load(Ordering::Relaxed) {
                    last = None;
                    continue;
                }
                let now = cpu_times();
                if let (Some((t0, i0)), Some((t1, i1))) = (last, now) {
                    let total = t1.saturating_sub(t0);
                    if total > 0 {
                        let busy = total.saturating_sub(i1.saturating_sub(i0));
                        pct.store(busy * 10_000 / total, Ordering::Relaxed);
                    }
                }
                last = now;
            }
        });
        *self.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    pub fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    pub fn stop(&self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort();
        }
    }

    /// Current metrics.
    pub fn snapshot(&self) -> Metrics {
        let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| -> u64 {
            mem.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        let total = field("MemTotal:");
        let available = field("MemAvailable:");
        let cache = field("Cached:") + field("Buffers:");
        let used = total.saturating_sub(available);
        // SAFETY: statvfs on a static C string with a zeroed out-struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let (disk_total, disk_used) = if unsafe { libc::statvfs(c"/".as_ptr(), &mut st) } == 0 {
            let total = st.f_blocks * st.f_frsize;
            (total, total.saturating_sub(st.f_bavail * st.f_frsize))
        } else {
            (0, 0)
        };
        Metrics {
            ts: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            cpu_count: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            cpu_used_pct: self.pct_centi.load(Ordering::Relaxed) as f64 / 100.0,
            mem_total: total,
            mem_used: used,
            mem_cache: cache,
            mem_total_mib: total >> 20,
            mem_used_mib: used >> 20,
            disk_used,
            disk_total,
        }
    }
}
