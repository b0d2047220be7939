//! A capsule's persisted record (`capsules/<id>/capsule.json`): what the
//! agent needs to re-adopt the capsule after a restart and to tear it down
//! then, including its cleanup stack.
//!
//! The cleanup stack is data, not closures: each [`Undo`] names a step
//! whose parameters come from the record, so a stack pushed by one agent
//! process can be run by the next. Steps are popped and the record saved
//! one at a time, so a crash in the middle of a teardown resumes where it
//! stopped and never runs a step twice after it succeeded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use wrenn_types::ids::{CapsuleId, TemplateName};

use crate::error::AgentError;
use crate::network::Slot;
use crate::state::CapsuleState;
use crate::template::{Engine, RuntimeChoice};

/// One teardown step, pushed right after the setup step it undoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Undo {
    /// Remove the capsule's directory (the record itself goes with it).
    RemoveDir,
    /// Give the address slot back to the pool.
    ReleaseSlot,
    /// Delete the netns and veth pair.
    DestroyNetwork,
    /// Remove the capsule's nftables set elements.
    FirewallRules,
    /// Unmount the overlay rootfs.
    UnmountRootfs,
    /// Kill and delete the runtime's container (or VMM).
    DeleteContainer,
}

/// What to do when a capsule's inactivity timeout expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    #[default]
    Pause,
    Destroy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapsuleRecord {
    /// The public ID callers use.
    pub id: CapsuleId,
    /// The ID the host knows the capsule by: its directory, container and
    /// cgroup. The same as `id`, except for capsules taken from a warm
    /// pool, which were created before anyone asked for them.
    pub container: CapsuleId,
    /// Still waiting in a warm pool (never listed; torn down on restart).
    #[serde(default)]
    pub warm: bool,
    pub template: TemplateName,
    pub state: CapsuleState,
    /// False once a hibernation dropped the processes (no CRIU).
    pub memory_kept: bool,
    /// Why the capsule is in `error`.
    pub error: Option<String>,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub pids_limit: i64,
    /// Inactivity timeout in seconds; 0 = none.
    pub timeout_sec: u64,
    pub on_timeout: OnTimeout,
    pub internet: bool,
    pub env: BTreeMap<String, String>,
    pub default_user: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub access_token: Option<String>,
    pub runtime: RuntimeChoice,
    #[serde(default)]
    pub engine: Engine,
    pub start_cmd: Option<String>,
    #[serde(default)]
    pub ready_cmd: Option<String>,
    pub slot: Option<Slot>,
    /// Unix milliseconds.
    pub created_at: u64,
    pub last_active_at: u64,
    pub undo: Vec<Undo>,
}

pub const RECORD_FILE: &str = "capsule.json";
/// A capsule's saved metrics history ([`crate::history::History::to_bytes`]).
pub const METRICS_FILE: &str = "metrics.json";

/// The files of one capsule under `capsules/<id>/`.
#[derive(Debug, Clone)]
pub struct CapsuleDir(pub PathBuf);

impl CapsuleDir {
    pub fn record(&self) -> PathBuf {
        self.0.join(RECORD_FILE)
    }
    pub fn metrics(&self) -> PathBuf {
        self.0.join(METRICS_FILE)
    }
    pub fn bundle(&self) -> PathBuf {
        self.0.join("bundle")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.0.join("bundle/rootfs")
    }
    pub fn upper(&self) -> PathBuf {
        self.0.join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.0.join("work")
    }
    pub fn etc(&self) -> PathBuf {
        self.0.join("etc")
    }
    pub fn log(&self) -> PathBuf {
        self.0.join("envd.log")
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.0.join("checkpoint")
    }

    /// Replace file `name` here with `bytes` atomically (a temporary file
    /// `.<name>.tmp`, then a rename).
    pub fn replace(&self, name: &str, bytes: &[u8]) -> Result<(), AgentError> {
        let (tmp, path) = (self.0.join(format!(".{name}.tmp")), self.0.join(name));
        std::fs::write(&tmp, bytes).map_err(AgentError::io("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(AgentError::io("rename", &path))
    }
}

impl CapsuleRecord {
    /// Write atomically ([`CapsuleDir::replace`]).
    pub fn save(&self, dir: &CapsuleDir) -> Result<(), AgentError> {
        let json = serde_json::to_vec_pretty(self).expect("records serialise");
        dir.replace(RECORD_FILE, &json)
    }

    pub fn load(path: &Path) -> Result<CapsuleRecord, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    }
}
