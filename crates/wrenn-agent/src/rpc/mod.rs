//! The Connect edge of the agent: `wrenn.agent.v1.Agent` over
//! [`crate::agent::Agent`]. Requests are parsed into typed IDs here, every
//! call becomes one operation of the capsule manager (or of the capsule's
//! envd client), and errors become Connect codes here and only here.
//!
//! Streams relay envd-client's streams, whose channels hold 256 events: a
//! slow control plane blocks the pump (the policy envd-client documents).

// Handlers return concrete message types where the generated trait says
// `impl Encodable`.
#![allow(refining_impl_trait)]

mod files;
mod lifecycle;
mod process;

use std::sync::Arc;

use futures::{Stream, StreamExt};

use connectrpc::{ConnectError, ErrorCode};
use envd_client::ClientError;
use wrenn_types::ids::CapsuleId;

use crate::agent::{Agent, Capsule};
use crate::error::{AgentError, ErrorKind};

/// The Connect router with the agent service.
pub fn router(agent: Arc<Agent>) -> connectrpc::Router {
    connectrpc::Router::new().add_service(Arc::new(AgentRpc { agent }))
}

/// The `wrenn.agent.v1.Agent` service.
pub struct AgentRpc {
    agent: Arc<Agent>,
}

impl AgentRpc {
    /// A running capsule (a data operation counts as activity).
    fn running(&self, id: &str) -> Result<Arc<Capsule>, ConnectError> {
        let id = capsule_id(id)?;
        self.agent.running(&id).map_err(agent_error)
    }
}

fn capsule_id(s: &str) -> Result<CapsuleId, ConnectError> {
    s.parse()
        .map_err(|e: wrenn_types::ids::InvalidId| ConnectError::invalid_argument(e.to_string()))
}

/// Domain error → Connect error. Internal causes are logged in full; the
/// message keeps the step and the capsule, which the control plane needs.
pub fn agent_error(e: AgentError) -> ConnectError {
    let code = match e.kind() {
        ErrorKind::NotFound => ErrorCode::NotFound,
        ErrorKind::AlreadyExists => ErrorCode::AlreadyExists,
        ErrorKind::InvalidArgument => ErrorCode::InvalidArgument,
        ErrorKind::FailedPrecondition => ErrorCode::FailedPrecondition,
        ErrorKind::ResourceExhausted => ErrorCode::ResourceExhausted,
        ErrorKind::Unavailable => ErrorCode::Unavailable,
        ErrorKind::Internal => ErrorCode::Internal,
    };
    if code == ErrorCode::Internal {
        tracing::error!(error = ?e, "agent operation failed");
    }
    ConnectError::new(code, display_chain(&e))
}

/// An envd failure during a data operation: envd's own code passes
/// through (a missing file stays not_found), transport trouble is
/// `unavailable`. A capsule destroyed under the operation is `not_found`,
/// saying so (its envd went away mid-answer: the client's own error,
/// "failed to read response body", would say nothing of why).
fn envd_error(c: &Capsule, e: ClientError) -> ConnectError {
    let id = &c.id;
    if c.destroyed() {
        return ConnectError::not_found(format!("capsule {id} was destroyed"));
    }
    match e {
        ClientError::Rpc(err) => ConnectError::new(err.code, err.message.unwrap_or_default()),
        ClientError::Http { status, message } => {
            let code = match status {
                400 => ErrorCode::InvalidArgument,
                401 | 403 => ErrorCode::PermissionDenied,
                404 => ErrorCode::NotFound,
                406 | 409 => ErrorCode::FailedPrecondition,
                413 => ErrorCode::OutOfRange,
                507 => ErrorCode::ResourceExhausted,
                _ => ErrorCode::Internal,
            };
            ConnectError::new(code, message)
        }
        ClientError::Transport(m) | ClientError::NotHealthy(m) => {
            ConnectError::unavailable(format!("envd in capsule {id} is unreachable: {m}"))
        }
        e @ ClientError::OutputTooLarge { .. } => {
            ConnectError::new(ErrorCode::OutOfRange, e.to_string())
        }
        other => ConnectError::internal(format!("envd in capsule {id}: {other}")),
    }
}

/// `s`, ended by a pause of `c` with `failed_precondition`: the frozen
/// envd would send nothing more, and the client would wait for good (an
/// exec stream, a download).
fn until_paused<T, S>(s: S, c: &Arc<Capsule>) -> impl Stream<Item = Result<T, ConnectError>> + Send
where
    S: Stream<Item = Result<T, ConnectError>> + Send + 'static,
    T: Send + 'static,
{
    let (pauses, id) = (c.watch_pauses(), c.id.clone());
    futures::stream::unfold(Some((Box::pin(s), pauses, id)), |state| async move {
        let (mut s, mut pauses, id) = state?;
        tokio::select! {
            // (never an error: the stream's owner holds the capsule)
            _ = pauses.changed() => {
                let msg = format!("capsule {id} was paused: the stream ended");
                Some((Err(ConnectError::failed_precondition(msg)), None))
            }
            item = s.next() => item.map(|i| (i, Some((s, pauses, id)))),
        }
    })
}

fn display_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let msg = inner.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        src = inner.source();
    }
    s
}
