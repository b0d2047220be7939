//! Path resolution for paths that clients send.
//!
//! Rules (E2B envd's): `~` and `~/x` expand to the acting user's home; a
//! relative path is joined to the home directory; the result is made
//! absolute and cleaned lexically (`.` dropped, `..` pops a component and
//! never climbs above `/`). Symlinks are not resolved here: the capsule is the
//! security boundary, and envd acts inside it with the capsule's own view.

use std::path::{Component, Path, PathBuf};

/// Resolve `raw` for a user whose home is `home`.
pub fn resolve(raw: &str, home: &Path) -> PathBuf {
    let joined = if raw == "~" {
        home.to_path_buf()
    } else if let Some(rest) = raw.strip_prefix("~/") {
        home.join(rest)
    } else if raw.starts_with('/') {
        PathBuf::from(raw)
    } else {
        home.join(raw)
    };
    clean(&joined)
}

/// Lexically clean an absolute path.
pub fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_envd() {
        let home = Path::new("/home/user");
        assert_eq!(resolve("a.txt", home), PathBuf::from("/home/user/a.txt"));
        assert_eq!(resolve("~", home), PathBuf::from("/home/user"));
        assert_eq!(resolve("~/x/../y", home), PathBuf::from("/home/user/y"));
        assert_eq!(resolve("/tmp/./a//b/", home), PathBuf::from("/tmp/a/b"));
        assert_eq!(resolve("../../../../etc", home), PathBuf::from("/etc"));
        assert_eq!(resolve("/..", home), PathBuf::from("/"));
        assert_eq!(resolve("", home), PathBuf::from("/home/user"));
    }
}
