//! Templates on disk: `templates/<name>/template.json` (metadata) and
//! `templates/<name>/layer/` (one read-only overlay layer). A template's
//! rootfs is its own layer stacked on its parents' (`layers`, topmost
//! first), so a snapshot stores only what its capsule changed.
//!
//! Builders write into a hidden temporary directory and rename it into
//! place, so a template either exists whole or not at all.

mod busybox;
mod debootstrap;
mod transfer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use wrenn_types::ids::TemplateName;

pub use busybox::build_busybox;
pub use debootstrap::{build_minimal, host_mirror, Progress};
pub use transfer::{export, Import};

/// Which OCI runtime a template asks for (else the agent's default).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RuntimeChoice {
    pub binary: String,
    #[serde(default)]
    pub args: Vec<String>,
}

/// How a capsule is isolated: a container on an OCI runtime, or a
/// virtual machine with its own kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    #[default]
    Oci,
    Vm,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Oci => "oci",
            Engine::Vm => "vm",
        }
    }
}

impl std::str::FromStr for Engine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "oci" => Ok(Engine::Oci),
            "vm" => Ok(Engine::Vm),
            other => Err(format!("engine must be \"oci\" or \"vm\", not {other:?}")),
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateMeta {
    pub name: TemplateName,
    /// Templates whose layers make up the rootfs, topmost first; the first
    /// is always this template itself.
    pub layers: Vec<TemplateName>,
    /// User processes and files default to (root when unset).
    #[serde(default)]
    pub default_user: Option<String>,
    /// Started by envd at boot (and after a resume from hibernation).
    #[serde(default)]
    pub start_cmd: Option<String>,
    /// Polled after boot until it exits 0; creates wait for it.
    #[serde(default)]
    pub ready_cmd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub runtime: Option<RuntimeChoice>,
    /// The engine its capsules get unless a create asks for another.
    #[serde(default)]
    pub engine: Engine,
    /// Allow setuid programs (`sudo`): clears `noNewPrivileges`.
    #[serde(default)]
    pub allow_setuid: bool,
    pub created_at: u64,
    #[serde(default)]
    pub size_bytes: u64,
}

impl TemplateMeta {
    /// A base template (a single layer of its own), created now.
    pub fn base(name: TemplateName, allow_setuid: bool) -> TemplateMeta {
        TemplateMeta {
            layers: vec![name.clone()],
            name,
            default_user: None,
            start_cmd: None,
            ready_cmd: None,
            env: BTreeMap::new(),
            runtime: None,
            engine: Engine::Oci,
            allow_setuid,
            created_at: now_secs(),
            size_bytes: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {0} does not exist")]
    NotFound(TemplateName),
    #[error("template {0} already exists")]
    Exists(TemplateName),
    #[error("template {name} is a layer of {child}")]
    InUse {
        name: TemplateName,
        child: TemplateName,
    },
    #[error("template {name} stacks on {parent}, which this host does not have")]
    NoParent {
        name: TemplateName,
        parent: TemplateName,
    },
    #[error("import of template {name}: {what}")]
    BadImport { name: TemplateName, what: String },
    #[error("template {name}: {what}")]
    Corrupt { name: TemplateName, what: String },
    #[error("build template {name}: {what}")]
    Build { name: TemplateName, what: String },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> TemplateError + 'a {
    move |source| TemplateError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The templates directory of an agent.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    dir: PathBuf,
}

impl TemplateStore {
    pub fn open(dir: PathBuf) -> Result<Self, TemplateError> {
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        Ok(TemplateStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of template `name` (its layer, metadata and caches).
    pub fn dir_of(&self, name: &TemplateName) -> PathBuf {
        self.dir.join(name.as_str())
    }

    pub fn layer_dir(&self, name: &TemplateName) -> PathBuf {
        self.dir.join(name.as_str()).join("layer")
    }

    pub fn exists(&self, name: &TemplateName) -> bool {
        self.dir.join(name.as_str()).join("template.json").is_file()
    }

    pub fn get(&self, name: &TemplateName) -> Result<TemplateMeta, TemplateError> {
        let path = self.dir.join(name.as_str()).join("template.json");
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TemplateError::NotFound(name.clone()))
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let meta: TemplateMeta =
            serde_json::from_slice(&text).map_err(|e| TemplateError::Corrupt {
                name: name.clone(),
                what: e.to_string(),
            })?;
        if meta.layers.first() != Some(name) {
            return Err(TemplateError::Corrupt {
                name: name.clone(),
                what: "first layer is not its own".into(),
            });
        }
        Ok(meta)
    }

    pub fn list(&self) -> Vec<TemplateMeta> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<_> = rd
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .into_string()
                    .ok()?
                    .parse::<TemplateName>()
                    .ok()
            })
            .filter_map(|n| self.get(&n).ok())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Overlay lower directories, topmost first; every layer must exist.
    pub fn lower_dirs(&self, meta: &TemplateMeta) -> Result<Vec<PathBuf>, TemplateError> {
        meta.layers
            .iter()
            .map(|l| {
                let d = self.layer_dir(l);
                if d.is_dir() {
                    Ok(d)
                } else {
                    Err(TemplateError::Corrupt {
                        name: meta.name.clone(),
                        what: format!("layer {l} is missing"),
                    })
                }
            })
            .collect()
    }

    /// Start building `name`: a fresh hidden directory with an empty
    /// `layer/`. Commit it with [`TemplateStore::commit`].
    pub fn stage(&self, name: &TemplateName) -> Result<Staged, TemplateError> {
        if self.exists(name) {
            return Err(TemplateError::Exists(name.clone()));
        }
        let mut rnd = [0u8; 6];
        getrandom::fill(&mut rnd).expect("the OS random source works");
        let tmp = self.dir.join(format!(".{}.{}", name, hex(&rnd)));
        let layer = tmp.join("layer");
        std::fs::create_dir_all(&layer).map_err(io_err("create", &layer))?;
        Ok(Staged {
            tmp,
            layer,
            committed: false,
        })
    }

    /// Write the metadata and move the staged directory into place.
    pub fn commit(
        &self,
        mut staged: Staged,
        mut meta: TemplateMeta,
    ) -> Result<TemplateMeta, TemplateError> {
        meta.size_bytes = dir_size(&staged.layer);
        let json = serde_json::to_vec_pretty(&meta).expect("metadata serialises");
        let path = staged.tmp.join("template.json");
        std::fs::write(&path, json).map_err(io_err("write", &path))?;
        let dest = self.dir.join(meta.name.as_str());
        if dest.exists() {
            return Err(TemplateError::Exists(meta.name.clone()));
        }
        std::fs::rename(&staged.tmp, &dest).map_err(io_err("rename into", &dest))?;
        staged.committed = true;
        Ok(meta)
    }

    /// [`TemplateStore::commit`], or, when a template of that name came
    /// meanwhile (a copy of a template every host has, from another
    /// host), that one, and the staged files go.
    pub fn commit_or_existing(
        &self,
        staged: Staged,
        meta: TemplateMeta,
    ) -> Result<TemplateMeta, TemplateError> {
        let name = meta.name.clone();
        match self.commit(staged, meta) {
            Err(TemplateError::Exists(_)) => self.get(&name),
            r => r,
        }
    }

    /// Delete a template no other template stacks on.
    pub fn remove(&self, name: &TemplateName) -> Result<(), TemplateError> {
        self.get(name)?;
        if let Some(child) = self
            .list()
            .into_iter()
            .find(|t| t.name != *name && t.layers.contains(name))
        {
            return Err(TemplateError::InUse {
                name: name.clone(),
                child: child.name,
            });
        }
        let dir = self.dir.join(name.as_str());
        // Rename first so a half-deleted template is never visible.
        let trash = self.dir.join(format!(".deleting.{name}"));
        std::fs::rename(&dir, &trash).map_err(io_err("rename", &dir))?;
        std::fs::remove_dir_all(&trash).map_err(io_err("remove", &trash))
    }

    /// Remove staging leftovers of builds that crashed.
    pub fn sweep(&self) {
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with('.') {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// A template being built; removed on drop unless committed.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    pub layer: PathBuf,
    committed: bool,
}

impl Staged {
    /// The template's directory-to-be (caches beside the layer go here).
    pub fn dir(&self) -> &Path {
        &self.tmp
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Bytes used by regular files under `dir` (symlinks not followed).
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                total += md.len();
            }
        }
    }
    total
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, layers: &[&str]) -> TemplateMeta {
        TemplateMeta {
            name: name.parse().unwrap(),
            layers: layers.iter().map(|l| l.parse().unwrap()).collect(),
            default_user: None,
            start_cmd: None,
            ready_cmd: None,
            env: BTreeMap::new(),
            runtime: None,
            engine: Engine::Oci,
            allow_setuid: false,
            created_at: 1,
            size_bytes: 0,
        }
    }

    #[test]
    fn stage_commit_stack_and_remove() {
        let t = tempfile::tempdir().unwrap();
        let store = TemplateStore::open(t.path().join("templates")).unwrap();
        let base: TemplateName = "base".parse().unwrap();
        assert!(matches!(store.get(&base), Err(TemplateError::NotFound(_))));

        let s = store.stage(&base).unwrap();
        std::fs::write(s.layer.join("f"), "12345").unwrap();
        let m = store.commit(s, meta("base", &["base"])).unwrap();
        assert_eq!(m.size_bytes, 5);
        assert!(matches!(store.stage(&base), Err(TemplateError::Exists(_))));

        let child: TemplateName = "child".parse().unwrap();
        let s = store.stage(&child).unwrap();
        store.commit(s, meta("child", &["child", "base"])).unwrap();
        let lowers = store.lower_dirs(&store.get(&child).unwrap()).unwrap();
        assert_eq!(
            lowers,
            vec![store.layer_dir(&child), store.layer_dir(&base)]
        );
        assert!(matches!(
            store.remove(&base),
            Err(TemplateError::InUse { .. })
        ));
        store.remove(&child).unwrap();
        store.remove(&base).unwrap();
        assert!(store.list().is_empty());

        // A build that another's copy overtook keeps the copy.
        let (s1, s2) = (store.stage(&base).unwrap(), store.stage(&base).unwrap());
        std::fs::write(s1.layer.join("f"), "copied").unwrap();
        std::fs::write(s2.layer.join("f"), "built").unwrap();
        store.commit(s1, meta("base", &["base"])).unwrap();
        let m = store
            .commit_or_existing(s2, meta("base", &["base"]))
            .unwrap();
        assert_eq!(m.size_bytes, 6);
        assert_eq!(
            std::fs::read_to_string(store.layer_dir(&base).join("f")).unwrap(),
            "copied"
        );
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 1);
        store.remove(&base).unwrap();

        // An abandoned build leaves nothing behind.
        drop(store.stage(&base).unwrap());
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 0);
    }

    #[test]
    fn corrupt_metadata_is_an_error_not_a_panic() {
        let t = tempfile::tempdir().unwrap();
        let store = TemplateStore::open(t.path().to_owned()).unwrap();
        std::fs::create_dir_all(t.path().join("x")).unwrap();
        std::fs::write(t.path().join("x/template.json"), "{not json").unwrap();
        assert!(matches!(
            store.get(&"x".parse().unwrap()),
            Err(TemplateError::Corrupt { .. })
        ));
        std::fs::write(
            t.path().join("x/template.json"),
            serde_json::to_vec(&meta("x", &["y"])).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            store.get(&"x".parse().unwrap()),
            Err(TemplateError::Corrupt { .. })
        ));
    }
}
