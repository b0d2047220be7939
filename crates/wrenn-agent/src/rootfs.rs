//! A capsule's root filesystem: overlayfs with the template's layers
//! read-only below and the capsule's own `upper/` on top. Synchronous
//! (mount(2)); callers use blocking threads.

use std::path::{Path, PathBuf};

use rustix::mount::{mount, unmount, MountFlags, UnmountFlags};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount overlay on {}", target.display())]
    Mount {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unmount {}", target.display())]
    Unmount {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("overlay options too long ({0} bytes; at most 4095)")]
    TooManyLayers(usize),
}

/// The directories of one capsule's overlay.
#[derive(Debug, Clone)]
pub struct Overlay {
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
}

impl Overlay {
    fn options(&self) -> String {
        let lower: Vec<_> = self.lowers.iter().map(|p| escape(p)).collect();
        format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            escape(&self.upper),
            escape(&self.work)
        )
    }

    /// Create upper/work/merged as needed and mount (no-op when mounted).
    pub fn mount(&self) -> Result<(), RootfsError> {
        if is_mountpoint(&self.merged) {
            return Ok(());
        }
        for d in [&self.upper, &self.work, &self.merged] {
            std::fs::create_dir_all(d).map_err(|source| RootfsError::Create {
                path: d.clone(),
                source,
            })?;
        }
        let opts = self.options();
        if opts.len() >= 4096 {
            return Err(RootfsError::TooManyLayers(opts.len()));
        }
        let data = std::ffi::CString::new(opts).map_err(|e| RootfsError::Mount {
            target: self.merged.clone(),
            source: std::io::Error::other(e),
        })?;
        mount(
            "overlay",
            &self.merged,
            "overlay",
            MountFlags::NODEV,
            Some(data.as_c_str()),
        )
        .map_err(|e| RootfsError::Mount {
            target: self.merged.clone(),
            source: e.into(),
        })
    }
}

/// Unmount `target` if it is a mount point; a busy mount is detached.
pub fn unmount_if_mounted(target: &Path) -> Result<(), RootfsError> {
    if !is_mountpoint(target) {
        return Ok(());
    }
    unmount(target, UnmountFlags::empty())
        .or_else(|_| unmount(target, UnmountFlags::DETACH))
        .map_err(|e| RootfsError::Unmount {
            target: target.to_owned(),
            source: e.into(),
        })
}

/// Whether `path` is listed as a mount point in our mount namespace.
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = escape_mountinfo(path);
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Mount points at or below `dir` (leak checks, sweeping).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let prefix = escape_mountinfo(dir);
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .collect()
}

/// Overlay separates options with `,` and layers with `:`.
fn escape(p: &Path) -> String {
    p.to_string_lossy()
        .replace('\\', "\\\\")
        .replace(',', "\\,")
        .replace(':', "\\:")
}

fn escape_mountinfo(p: &Path) -> String {
    let mut s = String::new();
    for c in p.to_string_lossy().chars() {
        match c {
            ' ' => s.push_str("\\040"),
            '\t' => s.push_str("\\011"),
            '\n' => s.push_str("\\012"),
            '\\' => s.push_str("\\134"),
            c => s.push(c),
        }
    }
    s
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_escape_separators() {
        let o = Overlay {
            lowers: vec!["/a:b".into(), "/c,d".into()],
            upper: "/u".into(),
            work: "/w".into(),
            merged: "/m".into(),
        };
        assert_eq!(o.options(), "lowerdir=/a\\:b:/c\\,d,upperdir=/u,workdir=/w");
        assert_eq!(
            unescape_mountinfo(&escape_mountinfo(Path::new("/x y\\z"))),
            "/x y\\z"
        );
        assert!(is_mountpoint(Path::new("/proc")));
        assert!(!is_mountpoint(Path::new("/proc/self")));
    }
}
