//! `EntryInfo`: what envd says about one path (lstat-based, E2B semantics).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::SystemTime;

use super::{read_metadata, FsError};
use crate::users::Accounts;

/// The type a client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Neither file nor directory (or a dangling symlink).
    Unspecified,
    File,
    Dir,
    Symlink,
}

/// One filesystem entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// For a symlink, the type of its target.
    pub kind: FileKind,
    pub path: String,
    pub size: i64,
    /// Permission bits only (of the target, for a symlink).
    pub mode: u32,
    /// Go's `FileMode.String()` of the lstat mode.
    pub permissions: String,
    pub owner: String,
    pub group: String,
    pub modified: SystemTime,
    /// Fully resolved absolute target of a symlink.
    pub symlink_target: Option<String>,
    pub is_symlink: bool,
    /// `user.e2b.*` xattrs, prefix stripped.
    pub metadata: BTreeMap<String, String>,
}

/// Describe `path` (already absolute). `accounts` names owners.
pub fn entry_info(path: &Path, accounts: &Accounts) -> Result<Entry, FsError> {
    let lmeta = std::fs::symlink_metadata(path).map_err(|e| FsError::from_io("stat", path, e))?;
    let is_symlink = lmeta.file_type().is_symlink();
    let (kind, mode, symlink_target) = if is_symlink {
        let target = std::fs::canonicalize(path).ok();
        let tmeta = std::fs::metadata(path).ok();
        let kind = match &tmeta {
            Some(m) if m.is_dir() => FileKind::Dir,
            Some(m) if m.is_file() => FileKind::File,
            _ => FileKind::Unspecified,
        };
        let mode = tmeta.map_or(lmeta.mode(), |m| m.mode()) & 0o777;
        let target = target.unwrap_or_else(|| path.to_path_buf());
        (kind, mode, Some(target.to_string_lossy().into_owned()))
    } else {
        let ft = lmeta.file_type();
        let kind = if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_file() {
            FileKind::File
        } else {
            FileKind::Unspecified
        };
        (kind, lmeta.mode() & 0o777, None)
    };
    Ok(Entry {
        name: path
            .file_name()
            .map_or_else(|| "/".to_string(), |n| n.to_string_lossy().into_owned()),
        kind,
        path: path.to_string_lossy().into_owned(),
        size: lmeta.size() as i64,
        mode,
        permissions: permissions_string(lmeta.mode()),
        owner: accounts.uid_name(lmeta.uid()),
        group: accounts.gid_name(lmeta.gid()),
        modified: lmeta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        symlink_target,
        is_symlink,
        metadata: read_metadata(path),
    })
}

/// Go's `os.FileMode.String()` for a Unix `st_mode`: type letters from
/// `dalTLDpSugct?` in that order (or `-`), then `rwxrwxrwx`.
pub fn permissions_string(st_mode: u32) -> String {
    let fmt = st_mode & libc::S_IFMT;
    let mut out = String::with_capacity(12);
    let mut push_if = |cond: bool, c: char| {
        if cond {
            out.push(c);
        }
    };
    push_if(fmt == libc::S_IFDIR, 'd');
    push_if(fmt == libc::S_IFLNK, 'L');
    push_if(fmt == libc::S_IFBLK || fmt == libc::S_IFCHR, 'D');
    push_if(fmt == libc::S_IFIFO, 'p');
    push_if(fmt == libc::S_IFSOCK, 'S');
    push_if(st_mode & libc::S_ISUID != 0, 'u');
    push_if(st_mode & libc::S_ISGID != 0, 'g');
    push_if(fmt == libc::S_IFCHR, 'c');
    push_if(st_mode & libc::S_ISVTX != 0, 't');
    if out.is_empty() {
        out.push('-');
    }
    const RWX: &[u8; 9] = b"rwxrwxrwx";
    for (i, c) in RWX.iter().enumerate() {
        out.push(if st_mode & (1 << (8 - i)) != 0 {
            *c as char
        } else {
            '-'
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_strings_match_go() {
        assert_eq!(permissions_string(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(permissions_string(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(permissions_string(libc::S_IFLNK | 0o777), "Lrwxrwxrwx");
        assert_eq!(permissions_string(libc::S_IFCHR | 0o666), "Dcrw-rw-rw-");
        assert_eq!(permissions_string(libc::S_IFBLK | 0o660), "Drw-rw----");
        assert_eq!(permissions_string(libc::S_IFIFO | 0o600), "prw-------");
        assert_eq!(permissions_string(libc::S_IFSOCK | 0o777), "Srwxrwxrwx");
        assert_eq!(
            permissions_string(libc::S_IFDIR | libc::S_ISVTX | 0o777),
            "dtrwxrwxrwx"
        );
        assert_eq!(
            permissions_string(libc::S_IFREG | libc::S_ISUID | 0o755),
            "urwxr-xr-x"
        );
    }

    #[test]
    fn symlinks_report_their_target() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"abc").unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let dangling = dir.path().join("d");
        std::os::unix::fs::symlink(dir.path().join("nope"), &dangling).unwrap();
        let accounts = Accounts::default();

        let e = entry_info(&link, &accounts).unwrap();
        assert_eq!(e.kind, FileKind::File);
        assert!(e.is_symlink);
        assert_eq!(e.permissions, "Lrwxrwxrwx");
        let want = std::fs::canonicalize(&file).unwrap();
        assert_eq!(e.symlink_target.as_deref(), Some(want.to_str().unwrap()));

        let d = entry_info(&dangling, &accounts).unwrap();
        assert_eq!(d.kind, FileKind::Unspecified);
        assert_eq!(
            d.symlink_target.as_deref(),
            Some(dangling.to_str().unwrap())
        );

        let f = entry_info(&file, &accounts).unwrap();
        assert_eq!((f.kind, f.size, f.name.as_str()), (FileKind::File, 3, "f"));
        assert!(matches!(
            entry_info(&dir.path().join("missing"), &accounts),
            Err(FsError::NotFound(_))
        ));
    }
}
