//! An OCI runtime driven through its command line (`runc` and the CLIs
//! compatible with it: `crun`, `runsc`, `youki`, `kata-runtime`).
//!
//! Every call passes `--root` (a state directory private to this agent
//! instance) and `--log` (a JSON log per capsule, read back for error
//! messages). `run --detach` (and `create`, `restore`) hand the container
//! the capsule's log file as stdio, never a pipe to the agent: containers
//! outlive the agent.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use wrenn_types::ids::CapsuleId;

use super::{ContainerState, ContainerStatus, Runtime, RuntimeError};
use crate::cgroup::CgroupMode;
use crate::cmd::{self, CmdError};

#[derive(Debug, Clone)]
pub struct OciRuntime {
    binary: String,
    args: Vec<String>,
    root: PathBuf,
    /// Run the CLI in a private mount namespace without
    /// `/sys/fs/cgroup/unified`: crun refuses hybrid cgroup hosts otherwise.
    hide_unified: bool,
    /// Start containers (`run`, `create`) inside the capsule's network
    /// namespace: gVisor's runsc sets its netstack up from the namespace it
    /// starts in. (Gets
    /// runsc past its root-namespace check; its sandbox still dies at boot
    /// here, so runsc is not a supported runtime yet.)
    enter_netns: bool,
    criu: bool,
}

impl OciRuntime {
    /// `binary` is a name on `PATH` or a path; `state_root` must be private
    /// to this agent instance.
    pub fn new(binary: &str, args: Vec<String>, state_root: &Path, cgroups: CgroupMode) -> Self {
        let base = Path::new(binary)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(binary);
        OciRuntime {
            binary: binary.to_owned(),
            args,
            root: state_root.join(base),
            hide_unified: base == "crun" && cgroups == CgroupMode::Hybrid,
            enter_netns: base == "runsc",
            criu: false,
        }
    }

    /// Enable checkpoints (when `criu check` passes on this host).
    pub fn with_criu(mut self, works: bool) -> Self {
        self.criu = works;
        self
    }

    /// Whether the binary can be found (at start, to fail fast).
    pub fn installed(&self) -> bool {
        cmd::on_path(&self.binary)
    }

    fn command(&self, log: Option<&Path>) -> Command {
        self.command_in(log, None)
    }

    fn command_in(&self, log: Option<&Path>, netns: Option<&Path>) -> Command {
        let mut c = if let Some(ns) = netns {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display()))
                .arg("--")
                .arg(&self.binary);
            c
        } else if self.hide_unified {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                .arg("umount /sys/fs/cgroup/unified 2>/dev/null; exec \"$0\" \"$@\"")
                .arg(&self.binary);
            c
        } else {
            Command::new(&self.binary)
        };
        c.args(&self.args)
            .arg(format!("--root={}", self.root.display()));
        if let Some(log) = log {
            c.arg(format!("--log={}", log.display()))
                .arg("--log-format=json");
        }
        c
    }

    fn cli(
        &self,
        op: &'static str,
        id: &CapsuleId,
        extra: &[&str],
    ) -> Result<String, RuntimeError> {
        let mut c = self.command(None);
        c.arg(op).args(extra).arg(id.as_str());
        let program = c.get_program().to_string_lossy().into_owned();
        let args: Vec<_> = c.get_args().map(|a| a.to_owned()).collect();
        cmd::run(&program, &args, None).map_err(|e| self.error(op, id, e))
    }

    fn error(&self, op: &'static str, id: &CapsuleId, e: CmdError) -> RuntimeError {
        match e {
            CmdError::Missing { .. } => RuntimeError::Missing {
                binary: self.binary.clone(),
            },
            CmdError::Failed { stderr, .. } => RuntimeError::Failed {
                binary: self.binary.clone(),
                op,
                id: id.to_string(),
                message: last_error(&stderr),
            },
            other => RuntimeError::Failed {
                binary: self.binary.clone(),
                op,
                id: id.to_string(),
                message: other.to_string(),
            },
        }
    }

    /// Run a detaching command (`run --detach`, `create`, `restore`) whose stdio the
    /// container keeps: output goes to `stdio`, errors are read back from
    /// the runtime's log.
    fn detached(
        &self,
        op: &'static str,
        id: &CapsuleId,
        bundle: &Path,
        stdio: &Path,
        extra: &[&str],
    ) -> Result<(), RuntimeError> {
        if !self.installed() {
            return Err(RuntimeError::Missing {
                binary: self.binary.clone(),
            });
        }
        std::fs::create_dir_all(&self.root).map_err(|source| RuntimeError::Io {
            what: "create",
            path: self.root.clone(),
            source,
        })?;
        let log = bundle.join("runtime.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(stdio)
            .map_err(|source| RuntimeError::Io {
                what: "open",
                path: stdio.to_owned(),
                source,
            })?;
        let err = out.try_clone().map_err(|source| RuntimeError::Io {
            what: "dup",
            path: stdio.to_owned(),
            source,
        })?;
        let netns = if self.enter_netns {
            bundle_netns(bundle)
        } else {
            None
        };
        let mut c = self.command_in(Some(&log), netns.as_deref());
        c.arg(op)
            .args(extra)
            .arg(format!("--bundle={}", bundle.display()))
            .arg(format!("--pid-file={}", pid_file(bundle).display()))
            .arg(id.as_str())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let status = c.status().map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => RuntimeError::Missing {
                binary: self.binary.clone(),
            },
            _ => RuntimeError::Io {
                what: "run",
                path: PathBuf::from(&self.binary),
                source,
            },
        })?;
        if status.success() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Err(RuntimeError::Failed {
            binary: self.binary.clone(),
            op,
            id: id.to_string(),
            message: last_error(&text),
        })
    }
}

/// The network namespace path a bundle's config names.
fn bundle_netns(bundle: &Path) -> Option<PathBuf> {
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).ok()?;
    let linux = spec.linux().as_ref()?;
    linux
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)?
        .path()
        .clone()
}

/// The message of the last JSON log line at error level, else the last line.
fn last_error(text: &str) -> String {
    #[derive(Deserialize)]
    struct Line {
        level: Option<String>,
        msg: Option<String>,
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines
        .iter()
        .rev()
        .filter_map(|l| serde_json::from_str::<Line>(l).ok())
        .find(|l| matches!(l.level.as_deref(), Some("error" | "fatal")))
        .and_then(|l| l.msg)
        .or_else(|| lines.last().map(|l| l.trim().to_owned()))
        .unwrap_or_else(|| "failed without a message".to_owned())
}

fn not_found(e: &RuntimeError) -> bool {
    matches!(e, RuntimeError::Failed { message, .. }
        if message.contains("does not exist") || message.contains("not found") || message.contains("No such file"))
}

impl Runtime for OciRuntime {
    fn name(&self) -> &str {
        Path::new(&self.binary)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(&self.binary)
    }

    fn create(&self, id: &CapsuleId, bundle: &Path, stdio: &Path) -> Result<(), RuntimeError> {
        self.detached("create", id, bundle, stdio, &[])
    }

    fn start(&self, id: &CapsuleId) -> Result<(), RuntimeError> {
        self.cli("start", id, &[]).map(|_| ())
    }

    fn run(&self, id: &CapsuleId, bundle: &Path, stdio: &Path) -> Result<(), RuntimeError> {
        self.detached("run", id, bundle, stdio, &["--detach"])
    }

    fn state(&self, id: &CapsuleId) -> Result<Option<ContainerState>, RuntimeError> {
        #[derive(Deserialize)]
        struct State {
            status: String,
            pid: Option<i32>,
        }
        let out = match self.cli("state", id, &[]) {
            Ok(out) => out,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let s: State = serde_json::from_str(&out).map_err(|e| RuntimeError::Failed {
            binary: self.binary.clone(),
            op: "state",
            id: id.to_string(),
            message: format!("unreadable state: {e}"),
        })?;
        let status = match s.status.as_str() {
            "creating" => ContainerStatus::Creating,
            "created" => ContainerStatus::Created,
            "running" => ContainerStatus::Running,
            "paused" => ContainerStatus::Paused,
            _ => ContainerStatus::Stopped,
        };
        Ok(Some(ContainerState {
            status,
            pid: s.pid.filter(|p| *p > 0),
        }))
    }

    fn pause(&self, id: &CapsuleId) -> Result<(), RuntimeError> {
        self.cli("pause", id, &[]).map(|_| ())
    }

    fn resume(&self, id: &CapsuleId) -> Result<(), RuntimeError> {
        self.cli("resume", id, &[]).map(|_| ())
    }

    fn kill(&self, id: &CapsuleId, signal: &str) -> Result<(), RuntimeError> {
        self.cli("kill", id, &[signal]).map(|_| ())
    }

    fn delete(&self, id: &CapsuleId) -> Result<(), RuntimeError> {
        match self.cli("delete", id, &["--force"]) {
            Err(e) if not_found(&e) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    fn can_checkpoint(&self) -> bool {
        self.criu
    }

    fn checkpoint(&self, id: &CapsuleId, images: &Path) -> Result<(), RuntimeError> {
        if !self.criu {
            return Err(RuntimeError::NoCheckpoint);
        }
        let dir = format!("--image-path={}", images.display());
        self.cli("checkpoint", id, &[&dir]).map(|_| ())
    }

    fn restore(
        &self,
        id: &CapsuleId,
        bundle: &Path,
        images: &Path,
        stdio: &Path,
    ) -> Result<(), RuntimeError> {
        if !self.criu {
            return Err(RuntimeError::NoCheckpoint);
        }
        let dir = format!("--image-path={}", images.display());
        self.detached("restore", id, bundle, stdio, &["--detach", &dir])
    }
}

/// Whether CRIU can checkpoint on this host (`criu check` passes).
pub fn criu_works() -> bool {
    cmd::run("criu", ["check"], None).is_ok()
}

/// Where `run`, `create` and `restore` write the container's host PID.
fn pid_file(bundle: &Path) -> PathBuf {
    bundle.join("container.pid")
}

/// Give envd CPU priority over the workloads of its capsule: every thread
/// of the container's process gets a nice value `boost` below the agent's
/// (`ENVD_PRIORITY_BOOST` when it starts; a container cannot do this
/// itself: it has no `CAP_SYS_NICE`). envd starts its children at its
/// original value, and threads it starts later inherit the new one. Only
/// when that process is `envd` itself (runc, crun, youki): a runtime's own
/// sandbox process (runsc, kata) runs the whole capsule, which must not
/// outrank the host. Best effort: returns how many threads it found.
pub fn set_envd_priority(bundle: &Path, envd: &Path, boost: i32) -> std::io::Result<usize> {
    use std::os::unix::fs::MetadataExt;
    let pid: u32 = std::fs::read_to_string(pid_file(bundle))?
        .trim()
        .parse()
        .map_err(std::io::Error::other)?;
    let proc = PathBuf::from(format!("/proc/{pid}"));
    // The same file (a bind mount keeps device and inode), by any name.
    let (exe, bin) = (
        std::fs::metadata(proc.join("exe"))?,
        std::fs::metadata(envd)?,
    );
    if (exe.dev(), exe.ino()) != (bin.dev(), bin.ino()) {
        return Ok(0);
    }
    // Relative to the agent's main thread (its bulk workers are niced).
    let nice = (wrenn_http::thread_nice(std::process::id()) - boost).clamp(-20, 19);
    // A thread started during a pass by one not yet changed has the old
    // value: pass again until a pass finds no new thread.
    let mut done = std::collections::HashSet::new();
    loop {
        let mut new = false;
        for task in std::fs::read_dir(proc.join("task"))? {
            let Some(tid) = task?
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            if done.insert(tid) {
                new = true;
                // SAFETY: a plain syscall; a thread gone meanwhile fails
                // with ESRCH.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
            }
        }
        if !new {
            return Ok(done.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_come_from_the_log() {
        let log = "{\"level\":\"info\",\"msg\":\"x\"}\n{\"level\":\"error\",\"msg\":\"container_linux.go: bad thing\"}\n{\"level\":\"info\",\"msg\":\"y\"}\n";
        assert_eq!(last_error(log), "container_linux.go: bad thing");
        assert_eq!(last_error("plain words\n\n"), "plain words");
        assert_eq!(last_error(""), "failed without a message");
    }

    #[test]
    fn a_missing_binary_is_named() {
        let rt = OciRuntime::new(
            "/nonexistent/runc",
            vec![],
            Path::new("/tmp"),
            CgroupMode::V2,
        );
        assert!(!rt.installed());
        let id = CapsuleId::random();
        assert!(matches!(rt.state(&id), Err(RuntimeError::Missing { .. })));
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(
            rt.create(&id, t.path(), &t.path().join("log")),
            Err(RuntimeError::Missing { .. })
        ));
        assert!(OciRuntime::new("sh", vec![], Path::new("/tmp"), CgroupMode::V2).installed());
    }
}
