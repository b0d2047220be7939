//! The Connect RPC edge: implementations of the generated `process.Process`
//! and `filesystem.Filesystem` traits that translate messages into calls on
//! [`crate::process`] and [`crate::fs`], and domain errors into Connect codes
//! (here and only here).

// Handlers return concrete message types where the generated traits say
// `impl Encodable`; nothing outside this crate sees them.
#![allow(refining_impl_trait)]

mod filesystem;
mod process;

use std::sync::Arc;
use std::time::Duration;

use connectrpc::{ConnectError, RequestContext};
use wrenn_proto::filesystem as pb;

use crate::auth;
use crate::fs::{Entry, FileKind, FsError};
use crate::state::Envd;
use crate::users::{Accounts, User};

/// Keepalive interval when the client names none (seconds).
const DEFAULT_KEEPALIVE_SECS: u64 = 90;

/// The Connect router with both services.
pub fn router(state: Arc<Envd>) -> connectrpc::Router {
    connectrpc::Router::new()
        .add_service(Arc::new(process::ProcessRpc::new(state.clone())))
        .add_service(Arc::new(filesystem::FilesystemRpc::new(state)))
}

/// The longest `Keepalive-Ping-Interval` taken (a day).
const MAX_KEEPALIVE_SECS: u64 = 86_400;

/// `Keepalive-Ping-Interval` (seconds), defaulting to 90 when missing, bad
/// or out of range.
fn keepalive_interval(ctx: &RequestContext) -> Duration {
    let secs = ctx
        .header("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| (1..=MAX_KEEPALIVE_SECS).contains(s))
        .unwrap_or(DEFAULT_KEEPALIVE_SECS);
    Duration::from_secs(secs)
}

/// The acting user of an RPC (Basic auth, else the default user).
fn rpc_user(state: &Envd, ctx: &RequestContext) -> Result<(Accounts, User), ConnectError> {
    let name = auth::basic_user(ctx.headers())
        .map_err(|e| ConnectError::unauthenticated(e.to_string()))?;
    let accounts = state.accounts().map_err(|e| internal("read accounts", e))?;
    let user = state
        .user(&accounts, name.as_deref())
        .map_err(|e| ConnectError::unauthenticated(e.to_string()))?;
    Ok((accounts, user))
}

/// An error the caller cannot act on: logged in full, answered briefly.
fn internal(what: &str, err: impl std::fmt::Display) -> ConnectError {
    tracing::error!(%err, "{what}");
    ConnectError::internal(format!("{what}: {err}"))
}

fn fs_error(e: FsError) -> ConnectError {
    let msg = e.to_string();
    match e {
        FsError::NotFound(_) => ConnectError::not_found(msg),
        FsError::NotDir(_)
        | FsError::IsDir(_)
        | FsError::ExistsNotDir(_)
        | FsError::InvalidPath { .. }
        | FsError::Metadata { .. } => ConnectError::invalid_argument(msg),
        FsError::AlreadyExists(_) => ConnectError::already_exists(msg),
        FsError::NoSpace(_) => ConnectError::resource_exhausted(msg),
        FsError::PermissionDenied(_) => ConnectError::permission_denied(msg),
        FsError::Io { .. } => internal("filesystem", format!("{e:#}")),
    }
}

fn entry_to_pb(e: Entry) -> pb::EntryInfo {
    let kind = match e.kind {
        FileKind::Unspecified => pb::FileType::FILE_TYPE_UNSPECIFIED,
        FileKind::File => pb::FileType::FILE_TYPE_FILE,
        FileKind::Dir => pb::FileType::FILE_TYPE_DIRECTORY,
        FileKind::Symlink => pb::FileType::FILE_TYPE_SYMLINK,
    };
    pb::EntryInfo {
        name: e.name,
        r#type: kind.into(),
        path: e.path,
        size: e.size,
        mode: e.mode,
        permissions: e.permissions,
        owner: e.owner,
        group: e.group,
        modified_time: buffa::MessageField::some(buffa_types::Timestamp::from(e.modified)),
        symlink_target: e.symlink_target,
        metadata: e.metadata.into_iter().collect(),
        is_symlink: e.is_symlink,
        ..Default::default()
    }
}
