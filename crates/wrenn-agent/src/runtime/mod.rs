//! The `Runtime` trait: how the agent starts, freezes, checkpoints and
//! stops a capsule's container. The OCI backend (`runc` by default, any
//! OCI CLI by configuration) is the first implementation.
//!
//! The microVM engine ([`vm`]) implements the same trait with a VMM per
//! capsule.
//!
//! Calls are synchronous (they run the runtime's CLI and wait); the
//! capsule manager calls them on blocking threads.

mod oci;
pub mod spec;
pub mod vm;

use std::path::Path;

pub use oci::{criu_works, set_envd_priority, OciRuntime};
use wrenn_types::ids::CapsuleId;

/// What the runtime says about a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerStatus {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerState {
    pub status: ContainerStatus,
    pub pid: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("runtime {binary} is not installed")]
    Missing { binary: String },
    #[error("{binary} {op} {id}: {message}")]
    Failed {
        binary: String,
        op: &'static str,
        id: String,
        message: String,
    },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoints need a working CRIU (`criu check` fails on this host)")]
    NoCheckpoint,
}

/// A container runtime. The bundle directory holds `config.json` and the
/// `rootfs` the config names; `stdio` receives the container's output.
pub trait Runtime: Send + Sync + std::fmt::Debug {
    /// A short name for logs and capsule info (`runc`, `crun`, `runsc`…).
    fn name(&self) -> &str;
    fn create(&self, id: &CapsuleId, bundle: &Path, stdio: &Path) -> Result<(), RuntimeError>;
    fn start(&self, id: &CapsuleId) -> Result<(), RuntimeError>;
    /// `create` and `start` in one step (one runtime invocation where the
    /// runtime can: `run --detach`).
    fn run(&self, id: &CapsuleId, bundle: &Path, stdio: &Path) -> Result<(), RuntimeError> {
        self.create(id, bundle, stdio)?;
        self.start(id)
    }
    /// `None` when the runtime has no such container.
    fn state(&self, id: &CapsuleId) -> Result<Option<ContainerState>, RuntimeError>;
    fn pause(&self, id: &CapsuleId) -> Result<(), RuntimeError>;
    fn resume(&self, id: &CapsuleId) -> Result<(), RuntimeError>;
    fn kill(&self, id: &CapsuleId, signal: &str) -> Result<(), RuntimeError>;
    /// Remove the container, killing it first; fine if it is already gone.
    fn delete(&self, id: &CapsuleId) -> Result<(), RuntimeError>;
    /// Whether a paused capsule's processes stay in place, frozen (the
    /// freezer), so that they must be thawed before they can be killed.
    /// False for VMs, whose pause stops the VMM.
    fn freezes_in_place(&self) -> bool {
        true
    }
    /// Whether `checkpoint`/`restore` can work on this host.
    fn can_checkpoint(&self) -> bool;
    /// Dump the container's processes and memory to `images`, stopping it.
    fn checkpoint(&self, id: &CapsuleId, images: &Path) -> Result<(), RuntimeError>;
    /// Recreate a checkpointed container from `images`.
    fn restore(
        &self,
        id: &CapsuleId,
        bundle: &Path,
        images: &Path,
        stdio: &Path,
    ) -> Result<(), RuntimeError>;
}
