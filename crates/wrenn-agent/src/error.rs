//! The agent's error type: one variant per failing step, with the capsule
//! or path involved. [`AgentError::kind`] is what the RPC edge maps to a
//! Connect code; nothing else inspects variants.

use std::path::PathBuf;

use wrenn_types::ids::{CapsuleId, InvalidId};

use crate::network::{NetError, PoolError};
use crate::rootfs::RootfsError;
use crate::runtime::spec::SpecError;
use crate::runtime::RuntimeError;
use crate::state::{CapsuleState, Illegal};
use crate::template::TemplateError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("capsule {0} not found")]
    NotFound(CapsuleId),
    #[error("capsule {0} already exists")]
    AlreadyExists(CapsuleId),
    #[error(transparent)]
    InvalidId(#[from] InvalidId),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("cannot {op} capsule {id}: it is {state}")]
    IllegalState {
        id: CapsuleId,
        op: &'static str,
        state: CapsuleState,
    },
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Network(#[from] NetError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("vm image: {0}")]
    VmImage(#[from] crate::runtime::vm::image::ImageError),
    #[error("envd in capsule {id} {what}")]
    Envd {
        id: CapsuleId,
        what: &'static str,
        #[source]
        source: Box<envd_client::ClientError>,
    },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("capsule {id} did not become ready: `{cmd}` kept failing ({last})")]
    NotReady {
        id: CapsuleId,
        cmd: String,
        last: String,
    },
}

/// What a caller can do about an error: the RPC edge turns this into a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    Internal,
}

impl AgentError {
    pub fn illegal(id: &CapsuleId, i: Illegal) -> Self {
        AgentError::IllegalState {
            id: id.clone(),
            op: i.op.verb(),
            state: i.state,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            AgentError::NotFound(_) => ErrorKind::NotFound,
            AgentError::Template(TemplateError::NotFound(_)) => ErrorKind::NotFound,
            AgentError::AlreadyExists(_) | AgentError::Template(TemplateError::Exists(_)) => {
                ErrorKind::AlreadyExists
            }
            AgentError::InvalidId(_)
            | AgentError::Invalid(_)
            | AgentError::Template(TemplateError::BadImport { .. })
            | AgentError::VmImage(crate::runtime::vm::image::ImageError::CmdlineTooLong(_)) => {
                ErrorKind::InvalidArgument
            }
            AgentError::IllegalState { .. }
            | AgentError::Template(TemplateError::InUse { .. } | TemplateError::NoParent { .. })
            | AgentError::Runtime(RuntimeError::Missing { .. } | RuntimeError::NoCheckpoint) => {
                ErrorKind::FailedPrecondition
            }
            AgentError::Pool(_) => ErrorKind::ResourceExhausted,
            AgentError::ShuttingDown => ErrorKind::Unavailable,
            AgentError::Envd { source, .. } => match source.status() {
                Some(404) => ErrorKind::NotFound,
                Some(400) => ErrorKind::InvalidArgument,
                _ => ErrorKind::Internal,
            },
            _ => ErrorKind::Internal,
        }
    }

    pub(crate) fn io<'a>(
        what: &'static str,
        path: &'a std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> AgentError + 'a {
        move |source| AgentError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}
