//! The `busybox` template: Debian's static busybox and its applet links,
//! a root and an unprivileged `user` account. Offline, about a second.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use super::{io_err, TemplateError, TemplateMeta, TemplateStore};
use crate::cmd;

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
user:x:1000:1000:user:/home/user:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n";

/// Build `busybox` from the host's static busybox (package
/// `busybox-static`) unless it already exists.
pub fn build_busybox(store: &TemplateStore, busybox: &Path) -> Result<TemplateMeta, TemplateError> {
    let name = "busybox".parse().expect("valid name");
    if store.exists(&name) {
        return store.get(&name);
    }
    let staged = store.stage(&name)?;
    let root = &staged.layer;
    let fail = |what: String| TemplateError::Build {
        name: name.clone(),
        what,
    };
    for (d, mode) in [
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("etc", 0o755),
        ("root", 0o700),
        ("home/user", 0o755),
        ("tmp", 0o1777),
        ("var/tmp", 0o1777),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
    ] {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &p))?;
    }
    std::os::unix::fs::chown(root.join("home/user"), Some(1000), Some(1000))
        .map_err(io_err("chown", &root.join("home/user")))?;
    let bin = root.join("bin/busybox");
    std::fs::copy(busybox, &bin).map_err(io_err("copy busybox from", busybox))?;
    let list = cmd::run(busybox.to_str().unwrap_or("busybox"), ["--list-full"], None)
        .map_err(|e| fail(format!("list applets: {e}")))?;
    for applet in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains(".."))
    {
        let link = root.join(applet);
        if link.exists() || link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        symlink("/bin/busybox", &link).map_err(io_err("link", &link))?;
    }
    for (f, text) in [
        ("etc/passwd", PASSWD),
        ("etc/group", GROUP),
        ("etc/shells", "/bin/sh\n/bin/ash\n"),
    ] {
        let p = root.join(f);
        std::fs::write(&p, text).map_err(io_err("write", &p))?;
    }
    let meta = TemplateMeta::base(name.clone(), false);
    store.commit(staged, meta)
}
