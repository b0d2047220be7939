//! Filesystem operations on behalf of a user: entry info, make/move/list/
//! remove, metadata in xattrs, and watches. Knows nothing of the wire.
//!
//! Every path arriving here is already resolved ([`crate::paths`]); new files
//! and directories are chowned to the acting user.

mod entry;
mod ops;
pub mod watch;

use std::path::PathBuf;

pub use entry::{entry_info, permissions_string, Entry, FileKind};
pub use ops::{
    check_metadata, chown_to, list_dir, make_dir, make_parents, move_path, read_metadata, remove,
    write_metadata,
};

/// Errors of filesystem operations; each maps to one wire code.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("file not found: '{}'", .0.display())]
    NotFound(PathBuf),
    #[error("path '{}' is not a directory", .0.display())]
    NotDir(PathBuf),
    #[error("path '{}' is a directory", .0.display())]
    IsDir(PathBuf),
    #[error("directory '{}' already exists", .0.display())]
    AlreadyExists(PathBuf),
    #[error("path '{}' already exists and is not a directory", .0.display())]
    ExistsNotDir(PathBuf),
    #[error("no space left on device while writing '{}'", .0.display())]
    NoSpace(PathBuf),
    #[error("permission denied: '{}'", .0.display())]
    PermissionDenied(PathBuf),
    #[error("invalid path '{}': {reason}", path.display())]
    InvalidPath { path: PathBuf, reason: String },
    #[error("cannot keep the metadata of '{}': {reason}", path.display())]
    Metadata { path: PathBuf, reason: String },
    #[error("{op} '{}': {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FsError {
    /// Classify an I/O error on `path`.
    pub fn from_io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::InvalidInput {
            // std refuses paths with NUL bytes before any syscall.
            return FsError::InvalidPath {
                path,
                reason: source.to_string(),
            };
        }
        match source.raw_os_error() {
            Some(libc::ENAMETOOLONG) | Some(libc::ELOOP) | Some(libc::EINVAL) => {
                FsError::InvalidPath {
                    path,
                    reason: source.to_string(),
                }
            }
            Some(libc::ENOENT) => FsError::NotFound(path),
            Some(libc::ENOTDIR) => FsError::NotDir(path),
            Some(libc::EISDIR) => FsError::IsDir(path),
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => FsError::NoSpace(path),
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                FsError::PermissionDenied(path)
            }
            _ => FsError::Io { op, path, source },
        }
    }
}
