//! Users and groups from the capsule's own `/etc/passwd` and `/etc/group`.
//!
//! envd is static and must not touch NSS (no glibc `getpwnam`, which would try
//! to `dlopen` modules the rootfs may not have), so it parses the files
//! itself. They are small; each lookup rereads them, so users a workload adds
//! (`useradd`) are seen at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A resolved user: who a process runs as and whom files belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: String,
    /// Supplementary groups, the primary group included.
    pub groups: Vec<u32>,
}

/// A lookup that failed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("invalid username: '{0}'")]
    Unknown(String),
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One parsed copy of the account databases.
#[derive(Debug, Default, Clone)]
pub struct Accounts {
    users: Vec<User>,
    group_names: HashMap<u32, String>,
}

impl Accounts {
    /// Read `<root>/etc/passwd` and `<root>/etc/group`. Missing files are empty
    /// databases (a bare rootfs may have neither); `root` is always known.
    pub fn load(root: &Path) -> Result<Self, UserError> {
        let passwd = read_optional(&root.join("etc/passwd"))?;
        let group = read_optional(&root.join("etc/group"))?;
        Ok(Self::parse(&passwd, &group))
    }

    /// Parse the two files' contents. Malformed lines are skipped.
    pub fn parse(passwd: &str, group: &str) -> Self {
        let mut members: HashMap<&str, Vec<u32>> = HashMap::new();
        let mut group_names = HashMap::new();
        for line in group.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || line.starts_with('#') {
                continue;
            }
            let Ok(gid) = f[2].parse::<u32>() else {
                continue;
            };
            group_names.entry(gid).or_insert_with(|| f[0].to_string());
            for m in f[3].split(',').filter(|m| !m.is_empty()) {
                members.entry(m).or_default().push(gid);
            }
        }
        let mut users = Vec::new();
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || line.starts_with('#') {
                continue;
            }
            let (Ok(uid), Ok(gid)) = (f[2].parse::<u32>(), f[3].parse::<u32>()) else {
                continue;
            };
            let mut groups = vec![gid];
            for g in members.get(f[0]).into_iter().flatten() {
                if !groups.contains(g) {
                    groups.push(*g);
                }
            }
            users.push(User {
                name: f[0].to_string(),
                uid,
                gid,
                home: PathBuf::from(if f[5].is_empty() { "/" } else { f[5] }),
                shell: f[6].to_string(),
                groups,
            });
        }
        if !users.iter().any(|u| u.uid == 0) {
            users.push(User {
                name: "root".into(),
                uid: 0,
                gid: 0,
                home: "/root".into(),
                shell: "/bin/sh".into(),
                groups: vec![0],
            });
        }
        group_names.entry(0).or_insert_with(|| "root".into());
        Self { users, group_names }
    }

    /// The user called `name`.
    pub fn user(&self, name: &str) -> Result<User, UserError> {
        self.users
            .iter()
            .find(|u| u.name == name)
            .cloned()
            .ok_or_else(|| UserError::Unknown(name.to_string()))
    }

    /// The user with `uid`, if any.
    pub fn by_uid(&self, uid: u32) -> Option<&User> {
        self.users.iter().find(|u| u.uid == uid)
    }

    /// A uid's name, or the number as text (as `ls -l` shows it).
    pub fn uid_name(&self, uid: u32) -> String {
        self.by_uid(uid)
            .map(|u| u.name.clone())
            .unwrap_or_else(|| uid.to_string())
    }

    /// A gid's name, or the number as text.
    pub fn gid_name(&self, gid: u32) -> String {
        self.group_names
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}

fn read_optional(path: &Path) -> Result<String, UserError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(UserError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        user:x:1000:1000::/home/user:/bin/bash\n\
        broken line\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:user\nuser:x:1000:\ndocker:x:999:user,other\n";

    #[test]
    fn resolves_users_with_supplementary_groups() {
        let a = Accounts::parse(PASSWD, GROUP);
        let u = a.user("user").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.home, PathBuf::from("/home/user"));
        assert_eq!(u.groups, vec![1000, 27, 999]);
        assert!(matches!(a.user("ghost"), Err(UserError::Unknown(n)) if n == "ghost"));
        assert_eq!(a.uid_name(1000), "user");
        assert_eq!(a.uid_name(4242), "4242");
        assert_eq!(a.gid_name(27), "sudo");
    }

    #[test]
    fn a_bare_rootfs_still_knows_root() {
        let a = Accounts::parse("", "");
        assert_eq!(a.user("root").unwrap().home, PathBuf::from("/root"));
        assert_eq!(a.gid_name(0), "root");
    }
}
