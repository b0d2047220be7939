//! cgroups, v1 (and hybrid) and v2: which one the host runs, and reading a
//! capsule's usage back. Limits themselves are written by the OCI runtime
//! from the bundle's `linux.resources`; the agent only names the path
//! (`/{instance}/{capsule}`) and reads the counters.

use std::path::{Path, PathBuf};

/// The host's cgroup layout, detected once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// One controller per hierarchy under `/sys/fs/cgroup/<controller>`.
    V1,
    /// v1 controllers plus an empty v2 tree at `/sys/fs/cgroup/unified`
    /// (what these machines run; crun refuses it, see `runtime::oci`).
    Hybrid,
    /// The unified hierarchy.
    V2,
}

impl CgroupMode {
    pub fn detect(root: &Path) -> CgroupMode {
        if root.join("cgroup.controllers").exists() {
            CgroupMode::V2
        } else if root.join("unified/cgroup.controllers").exists() {
            CgroupMode::Hybrid
        } else {
            CgroupMode::V1
        }
    }
}

/// Counters of one cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time used, microseconds.
    pub cpu_usec: u64,
    /// Memory in use, bytes, without reclaimable page cache.
    pub memory_bytes: u64,
    pub pids: u64,
    /// Processes the kernel OOM-killed in this cgroup.
    pub oom_kills: u64,
}

/// What [`Cgroups::create`] limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub cpus: u32,
    pub pids: u64,
}

/// Where a capsule's cgroups live.
#[derive(Debug, Clone)]
pub struct Cgroups {
    pub mode: CgroupMode,
    pub root: PathBuf,
}

impl Cgroups {
    pub fn host() -> Cgroups {
        let root = PathBuf::from("/sys/fs/cgroup");
        Cgroups {
            mode: CgroupMode::detect(&root),
            root,
        }
    }

    /// The directory of `path` (absolute cgroup path) for `controller`.
    fn dir(&self, controller: &str, path: &str) -> PathBuf {
        let rel = path.trim_start_matches('/');
        match self.mode {
            CgroupMode::V2 => self.root.join(rel),
            CgroupMode::V1 | CgroupMode::Hybrid => self.root.join(controller).join(rel),
        }
    }

    /// Whether any piece of the cgroup is still there (leak checks).
    pub fn exists(&self, path: &str) -> bool {
        match self.mode {
            CgroupMode::V2 => self.dir("", path).exists(),
            _ => [
                "memory", "pids", "cpu", "cpuacct", "freezer", "devices", "blkio", "cpuset",
            ]
            .iter()
            .any(|c| self.dir(c, path).exists()),
        }
    }

    /// Remove the (empty) parent cgroup `path` in every hierarchy: the
    /// runtime removes each capsule's own cgroup, never the parent it made.
    pub fn remove_parent(&self, path: &str) {
        let rel = path.trim_start_matches('/');
        match self.mode {
            CgroupMode::V2 => {
                let _ = std::fs::remove_dir(self.root.join(rel));
            }
            CgroupMode::V1 | CgroupMode::Hybrid => {
                if let Ok(rd) = std::fs::read_dir(&self.root) {
                    for hierarchy in rd.flatten() {
                        let _ = std::fs::remove_dir(hierarchy.path().join(rel));
                    }
                }
            }
        }
    }

    /// Hierarchies (v1) a VMM's cgroup is made in.
    const V1_CONTROLLERS: [&'static str; 4] = ["memory", "cpu", "cpuacct", "pids"];

    /// Make the cgroup `path` with `limits`, for a process the agent starts
    /// itself (a VMM; OCI runtimes make their containers' cgroups).
    pub fn create(&self, path: &str, limits: &CgroupLimits) -> std::io::Result<()> {
        let quota = u64::from(limits.cpus) * 100_000;
        let files: Vec<(&str, &str, String)> = match self.mode {
            CgroupMode::V2 => {
                // Each ancestor must hand the controllers down.
                let mut dir = self.root.clone();
                for part in path.trim_start_matches('/').split('/') {
                    let _ =
                        std::fs::write(dir.join("cgroup.subtree_control"), "+cpu +memory +pids");
                    dir.push(part);
                    std::fs::create_dir_all(&dir)?;
                }
                vec![
                    ("", "memory.max", limits.memory_bytes.to_string()),
                    ("", "cpu.max", format!("{quota} 100000")),
                    ("", "pids.max", limits.pids.to_string()),
                ]
            }
            CgroupMode::V1 | CgroupMode::Hybrid => {
                for c in Self::V1_CONTROLLERS {
                    std::fs::create_dir_all(self.dir(c, path))?;
                }
                vec![
                    (
                        "memory",
                        "memory.limit_in_bytes",
                        limits.memory_bytes.to_string(),
                    ),
                    ("cpu", "cpu.cfs_period_us", "100000".into()),
                    ("cpu", "cpu.cfs_quota_us", quota.to_string()),
                    ("pids", "pids.max", limits.pids.to_string()),
                ]
            }
        };
        for (c, f, v) in files {
            std::fs::write(self.dir(c, path).join(f), v)?;
        }
        Ok(())
    }

    /// Move `pid` (and its threads) into the cgroup `path`.
    pub fn add_process(&self, path: &str, pid: i32) -> std::io::Result<()> {
        let controllers: &[&str] = match self.mode {
            CgroupMode::V2 => &[""],
            CgroupMode::V1 | CgroupMode::Hybrid => &Self::V1_CONTROLLERS,
        };
        for c in controllers {
            std::fs::write(self.dir(c, path).join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// Remove the (empty) cgroup `path` made by [`Cgroups::create`]; fine
    /// if it is already gone.
    pub fn remove(&self, path: &str) -> std::io::Result<()> {
        let dirs: Vec<PathBuf> = match self.mode {
            CgroupMode::V2 => vec![self.dir("", path)],
            CgroupMode::V1 | CgroupMode::Hybrid => Self::V1_CONTROLLERS
                .iter()
                .map(|c| self.dir(c, path))
                .collect(),
        };
        for d in dirs {
            match std::fs::remove_dir(&d) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn usage(&self, path: &str) -> std::io::Result<Usage> {
        let read = |c: &str, f: &str| std::fs::read_to_string(self.dir(c, path).join(f));
        let num = |s: std::io::Result<String>| -> std::io::Result<u64> {
            Ok(s?.trim().parse().unwrap_or(0))
        };
        match self.mode {
            CgroupMode::V2 => {
                let cpu = read("", "cpu.stat")?;
                let stat = read("", "memory.stat").unwrap_or_default();
                let current = num(read("", "memory.current"))?;
                Ok(Usage {
                    cpu_usec: field(&cpu, "usage_usec"),
                    memory_bytes: current.saturating_sub(field(&stat, "inactive_file")),
                    pids: num(read("", "pids.current")).unwrap_or(0),
                    oom_kills: field(&read("", "memory.events").unwrap_or_default(), "oom_kill"),
                })
            }
            CgroupMode::V1 | CgroupMode::Hybrid => {
                let stat = read("memory", "memory.stat").unwrap_or_default();
                let current = num(read("memory", "memory.usage_in_bytes"))?;
                Ok(Usage {
                    cpu_usec: num(read("cpuacct", "cpuacct.usage"))? / 1000,
                    memory_bytes: current.saturating_sub(field(&stat, "total_inactive_file")),
                    pids: num(read("pids", "pids.current")).unwrap_or(0),
                    oom_kills: field(
                        &read("memory", "memory.oom_control").unwrap_or_default(),
                        "oom_kill",
                    ),
                })
            }
        }
    }
}

/// `key value` line of a flat-keyed cgroup file.
fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn detects_layouts_and_reads_v2_counters() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(CgroupMode::detect(t.path()), CgroupMode::V1);
        write(&t.path().join("unified/cgroup.controllers"), "");
        assert_eq!(CgroupMode::detect(t.path()), CgroupMode::Hybrid);
        write(&t.path().join("cgroup.controllers"), "cpu memory pids");
        assert_eq!(CgroupMode::detect(t.path()), CgroupMode::V2);

        let cg = Cgroups {
            mode: CgroupMode::V2,
            root: t.path().to_owned(),
        };
        let d = t.path().join("wrenn/cl-1");
        write(&d.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n");
        write(&d.join("memory.current"), "4096000\n");
        write(&d.join("memory.stat"), "anon 1\ninactive_file 96000\n");
        write(&d.join("memory.events"), "low 0\noom 2\noom_kill 1\n");
        write(&d.join("pids.current"), "7\n");
        assert!(cg.exists("/wrenn/cl-1"));
        let u = cg.usage("/wrenn/cl-1").unwrap();
        assert_eq!(
            u,
            Usage {
                cpu_usec: 1500,
                memory_bytes: 4_000_000,
                pids: 7,
                oom_kills: 1
            }
        );
    }

    #[test]
    fn reads_v1_counters() {
        let t = tempfile::tempdir().unwrap();
        let cg = Cgroups {
            mode: CgroupMode::V1,
            root: t.path().to_owned(),
        };
        write(&t.path().join("cpuacct/w/c/cpuacct.usage"), "2000000\n");
        write(
            &t.path().join("memory/w/c/memory.usage_in_bytes"),
            "10000\n",
        );
        write(
            &t.path().join("memory/w/c/memory.stat"),
            "cache 5\ntotal_inactive_file 2000\n",
        );
        write(
            &t.path().join("memory/w/c/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        );
        write(&t.path().join("pids/w/c/pids.current"), "2\n");
        let u = cg.usage("/w/c").unwrap();
        assert_eq!(
            u,
            Usage {
                cpu_usec: 2000,
                memory_bytes: 8000,
                pids: 2,
                oom_kills: 3
            }
        );
        assert!(!cg.exists("/w/other"));
    }
}
