//! Make, move, list, remove; ownership and xattr metadata.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::{entry_info, Entry, FsError};
use crate::users::{Accounts, User};

const XATTR_PREFIX: &str = "user.e2b.";
/// The longest metadata key: its attribute's name (`user.e2b.<key>`) takes
/// at most 255 bytes.
pub const MAX_METADATA_KEY: usize = 255 - XATTR_PREFIX.len();
/// The longest metadata value (an extended attribute's limit).
pub const MAX_METADATA_VALUE: usize = 64 << 10;

/// Refuse metadata no file could carry, before anything is written.
pub fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), String> {
    for (key, value) in metadata {
        if key.len() > MAX_METADATA_KEY {
            return Err(format!(
                "metadata key '{}…' is longer than {MAX_METADATA_KEY} bytes",
                key.chars().take(32).collect::<String>()
            ));
        }
        if value.len() > MAX_METADATA_VALUE {
            return Err(format!(
                "metadata value of '{key}' is longer than {MAX_METADATA_VALUE} bytes"
            ));
        }
    }
    Ok(())
}

/// `chown` a path (not following symlinks) to `user`.
pub fn chown_to(path: &Path, user: &User) -> Result<(), FsError> {
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
        .map_err(|e| FsError::from_io("chown", path, e))
}

/// Create the missing directories above `path` (0755, owned by `user`).
pub fn make_parents(path: &Path, user: &User) -> Result<(), FsError> {
    match path.parent() {
        Some(parent) => create_dirs(parent, user),
        None => Ok(()),
    }
}

/// Create `dir` and every missing ancestor, chowning each new one.
fn create_dirs(dir: &Path, user: &User) -> Result<(), FsError> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(p) = cur {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => break,
            Ok(m) if m.file_type().is_symlink() && p.is_dir() => break,
            Ok(_) => return Err(FsError::ExistsNotDir(p.to_path_buf())),
            Err(_) => missing.push(p),
        }
        cur = p.parent();
    }
    for p in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(0o755).create(p) {
            Ok(()) => chown_to(p, user)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => {}
            Err(e) => return Err(FsError::from_io("mkdir", p, e)),
        }
    }
    Ok(())
}

/// `MakeDir`: create `path` with its parents.
pub fn make_dir(path: &Path, user: &User, accounts: &Accounts) -> Result<Entry, FsError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return Err(FsError::AlreadyExists(path.to_path_buf())),
        Ok(_) => return Err(FsError::ExistsNotDir(path.to_path_buf())),
        Err(_) => {}
    }
    create_dirs(path, user)?;
    entry_info(path, accounts)
}

/// `Move`: rename `from` to `to`, creating `to`'s parents.
pub fn move_path(
    from: &Path,
    to: &Path,
    user: &User,
    accounts: &Accounts,
) -> Result<Entry, FsError> {
    std::fs::symlink_metadata(from).map_err(|e| FsError::from_io("stat", from, e))?;
    make_parents(to, user)?;
    std::fs::rename(from, to).map_err(|e| FsError::from_io("rename", from, e))?;
    entry_info(to, accounts)
}

/// `Remove`: recursive; a missing path is not an error.
pub fn remove(path: &Path) -> Result<(), FsError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(FsError::from_io("stat", path, e)),
    };
    let res = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match res {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(FsError::from_io("remove", path, e))
        }
        _ => Ok(()),
    }
}

/// `ListDir`: entries under `dir` down to `depth` levels (0 means 1), lexical
/// order, parents before children; entries that vanish meanwhile are skipped.
/// Paths are built from `dir` as given, even when it is a symlink.
pub fn list_dir(dir: &Path, depth: u32, accounts: &Accounts) -> Result<Vec<Entry>, FsError> {
    let meta = std::fs::metadata(dir).map_err(|e| FsError::from_io("stat", dir, e))?;
    if !meta.is_dir() {
        return Err(FsError::NotDir(dir.to_path_buf()));
    }
    let mut out = Vec::new();
    walk(dir, depth.max(1), accounts, &mut out)?;
    Ok(out)
}

fn walk(dir: &Path, levels: u32, accounts: &Accounts, out: &mut Vec<Entry>) -> Result<(), FsError> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| FsError::from_io("read dir", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    for path in names {
        let Ok(entry) = entry_info(&path, accounts) else {
            continue;
        };
        let descend = levels > 1 && !entry.is_symlink && entry.kind == super::FileKind::Dir;
        out.push(entry);
        if descend {
            // A subdirectory that vanished or cannot be read is skipped.
            let _ = walk(&path, levels - 1, accounts, out);
        }
    }
    Ok(())
}

fn cpath(path: &Path) -> Option<CString> {
    CString::new(path.as_os_str().as_bytes()).ok()
}

/// The `user.e2b.*` xattrs of `path` (not following symlinks), prefix
/// stripped. Filesystems without xattrs have none.
pub fn read_metadata(path: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(c) = cpath(path) else { return out };
    let mut names = vec![0u8; 4096];
    // SAFETY: valid C string and buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize].split(|b| *b == 0) {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let Some(key) = name.strip_prefix(XATTR_PREFIX) else {
            continue;
        };
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: valid C strings and buffer of the given length.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len >= 0 {
            value.truncate(len as usize);
            out.insert(
                key.to_string(),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
    }
    out
}

/// Replace all `user.e2b.*` xattrs of `path` with `metadata`.
pub fn write_metadata(path: &Path, metadata: &BTreeMap<String, String>) -> Result<(), FsError> {
    let c = cpath(path).ok_or_else(|| FsError::NotFound(path.to_path_buf()))?;
    for key in read_metadata(path).keys() {
        if let Ok(name) = CString::new(format!("{XATTR_PREFIX}{key}")) {
            // SAFETY: valid C strings.
            unsafe { libc::lremovexattr(c.as_ptr(), name.as_ptr()) };
        }
    }
    for (key, value) in metadata {
        let name = CString::new(format!("{XATTR_PREFIX}{}", key.to_lowercase()))
            .map_err(|_| FsError::NotFound(path.to_path_buf()))?;
        // SAFETY: valid C strings and a value slice of the given length.
        let rc = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                // too much for this file system (all of a file's metadata
                // shares one block on ext4), or none at all here
                Some(libc::E2BIG | libc::ERANGE | libc::ENOSPC | libc::EOPNOTSUPP) => {
                    FsError::Metadata {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    }
                }
                _ => FsError::from_io("set metadata", path, e),
            });
        }
    }
    Ok(())
}
