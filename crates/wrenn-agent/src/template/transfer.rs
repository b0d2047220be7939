//! Templates between hosts. A template leaves as a tar stream of its own
//! directory's `template.json` and `layer/` ([`export`]) and comes in
//! through an [`Import`]. GNU tar makes and reads the stream, keeping what
//! an overlay layer needs: numeric owners, modes, hard links, sparse
//! files, device nodes (overlay's whiteouts are 0/0 character devices)
//! and every extended attribute (its opaque directories are marked with
//! `trusted.overlay.opaque`).
//!
//! An import unpacks into a staged directory ([`TemplateStore::stage`])
//! that becomes the template only once the whole stream is in, tar said
//! it was whole, the metadata names the template and the layers it stacks
//! on are on this host; anything else leaves nothing behind. (The stream
//! comes from another agent through the control plane, both
//! authenticated; tar still refuses members that climb out with `..`,
//! and only the two expected entries may arrive.)

use std::path::Path;
use std::process::Stdio;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::task::JoinHandle;
use wrenn_types::ids::TemplateName;

use super::{io_err, Staged, TemplateError, TemplateMeta, TemplateStore};

/// Largest piece of the export stream read at once.
const CHUNK: usize = 64 << 10;
/// How much of tar's complaints an error keeps (the end).
const STDERR_TAIL: usize = 2048;
/// tar's options for what a layer holds, both ways.
const KEEP: [&str; 3] = ["--numeric-owner", "--xattrs", "--xattrs-include=*"];
/// What a template's directory sends: nothing of its caches (a VM disk is
/// made again on first use).
const ENTRIES: [&str; 2] = ["template.json", "layer"];

/// Start tar in `dir` with `args`, then `files`; its stderr is gathered
/// meanwhile (a chatty tar must not stall on a full pipe).
fn tar(
    dir: &Path,
    args: &[&str],
    files: &[&str],
    stdin: Stdio,
    stdout: Stdio,
) -> Result<Tar, TemplateError> {
    let mut child = Command::new("tar")
        .args(args)
        .args(KEEP)
        .arg("-C")
        .arg(dir)
        .args(files)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(io_err("run tar in", dir))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    Ok(Tar {
        child,
        stderr: tokio::spawn(tail(stderr)),
    })
}

struct Tar {
    child: Child,
    stderr: JoinHandle<String>,
}

impl Tar {
    /// Wait for tar; its complaints if it failed.
    async fn done(mut self) -> Result<(), String> {
        let status = self.child.wait().await.map_err(|e| e.to_string())?;
        let said = self.stderr.await.unwrap_or_default();
        if status.success() {
            Ok(())
        } else {
            Err(format!("tar {status}: {}", said.trim()))
        }
    }
}

async fn tail(mut r: impl AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > STDERR_TAIL {
            kept.drain(..kept.len() - STDERR_TAIL);
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// Template `name`'s own files as a tar stream. The stream ends with an
/// error rather than cleanly if tar fails part way.
pub fn export(
    store: &TemplateStore,
    name: &TemplateName,
) -> Result<impl Stream<Item = Result<Bytes, TemplateError>> + Send + 'static, TemplateError> {
    store.get(name)?;
    let mut tar = tar(
        &store.dir_of(name),
        &["--create", "--file=-", "--sparse"],
        &ENTRIES,
        Stdio::null(),
        Stdio::piped(),
    )?;
    let out = tar.child.stdout.take().expect("stdout is piped");
    let failed = {
        let name = name.clone();
        move |what: String| TemplateError::Corrupt {
            name: name.clone(),
            what: format!("export: {what}"),
        }
    };
    let state = Some((tar, out, failed));
    Ok(futures::stream::unfold(state, |state| async move {
        let (tar, mut out, failed) = state?;
        let mut buf = BytesMut::with_capacity(CHUNK);
        match out.read_buf(&mut buf).await {
            Ok(0) => match tar.done().await {
                Ok(()) => None,
                Err(said) => Some((Err(failed(said)), None)),
            },
            Ok(_) => Some((Ok(buf.freeze()), Some((tar, out, failed)))),
            Err(e) => Some((Err(failed(e.to_string())), None)),
        }
    }))
}

/// A template arriving from another host: [`Import::write`] its stream's
/// bytes in order, then [`Import::finish`]. Dropped before that, or
/// refused by `finish`, the import is abandoned: tar is killed, waited
/// for, and then the staged directory is removed, off the async threads
/// (it may hold gigabytes).
pub struct Import {
    name: TemplateName,
    /// Taken by `finish`; what `Drop` discards otherwise.
    work: Option<Work>,
}

struct Work {
    tar: Tar,
    stdin: ChildStdin,
    staged: Staged,
}

impl Work {
    /// Kill tar, then remove what it wrote; in the background.
    fn discard(self) {
        let Work {
            mut tar, staged, ..
        } = self;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // (no runtime to wait in: the agent's next sweep removes it)
            let _ = tar.child.start_kill();
            return std::mem::forget(staged);
        };
        rt.spawn(async move {
            let _ = tar.child.kill().await;
            let _ = tokio::task::spawn_blocking(move || drop(staged)).await;
        });
    }
}

impl Drop for Import {
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            work.discard();
        }
    }
}

impl Import {
    /// Start importing `name`: `Exists` if this host has it already.
    pub fn start(store: &TemplateStore, name: &TemplateName) -> Result<Import, TemplateError> {
        let staged = store.stage(name)?;
        let mut tar = tar(
            staged.dir(),
            &[
                "--extract",
                "--file=-",
                "--same-owner",
                "--preserve-permissions",
            ],
            &[],
            Stdio::piped(),
            Stdio::null(),
        )?;
        let stdin = tar.child.stdin.take().expect("stdin is piped");
        Ok(Import {
            name: name.clone(),
            work: Some(Work { tar, stdin, staged }),
        })
    }

    fn refused(&self, what: String) -> TemplateError {
        TemplateError::BadImport {
            name: self.name.clone(),
            what,
        }
    }

    /// The next bytes of the stream.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), TemplateError> {
        let work = self.work.as_mut().expect("not finished");
        if let Err(e) = work.stdin.write_all(data).await {
            // (tar stopped reading: its own words say why)
            let what = match work.tar.child.wait().await {
                Ok(status) if !status.success() => format!("tar {status}"),
                _ => e.to_string(),
            };
            return Err(self.refused(what));
        }
        Ok(())
    }

    /// The stream is complete: check it and make it the template. Its
    /// `created_at` becomes now (the reconciler's grace for layers no
    /// template names counts from a layer's arrival on this host).
    pub async fn finish(mut self, store: &TemplateStore) -> Result<TemplateMeta, TemplateError> {
        let Work { tar, stdin, staged } = self.work.take().expect("not finished");
        drop(stdin);
        let (tar_said, dir) = (tar.done().await, staged.dir().to_owned());
        let mut meta = match tar_said.and_then(|()| checked(&dir, &self.name)) {
            Ok(meta) => meta,
            Err(what) => {
                discard_staged(staged);
                return Err(self.refused(what));
            }
        };
        if let Some(parent) = meta.layers[1..].iter().find(|p| !store.exists(p)) {
            discard_staged(staged);
            return Err(TemplateError::NoParent {
                name: self.name.clone(),
                parent: parent.clone(),
            });
        }
        meta.created_at = super::now_secs();
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.commit(staged, meta))
            .await
            .expect("commit does not panic")
    }
}

/// Remove a staged directory off the async threads.
fn discard_staged(staged: Staged) {
    tokio::task::spawn_blocking(move || drop(staged));
}

/// The imported metadata, once the staged directory holds exactly a
/// regular `template.json` naming `name` and a real `layer/` directory.
fn checked(dir: &Path, name: &TemplateName) -> Result<TemplateMeta, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| e.to_string())?;
    for e in entries {
        let e = e.map_err(|e| e.to_string())?;
        let file = e.file_name();
        let kind = e.file_type().map_err(|e| e.to_string())?;
        match file.to_str() {
            Some("template.json") if kind.is_file() => {}
            Some("layer") if kind.is_dir() => {}
            _ => return Err(format!("unexpected entry {file:?} in the stream")),
        }
    }
    let text = std::fs::read(dir.join(ENTRIES[0]))
        .map_err(|e| format!("the stream has no template.json: {e}"))?;
    let meta: TemplateMeta =
        serde_json::from_slice(&text).map_err(|e| format!("template.json does not parse: {e}"))?;
    if meta.name != *name || meta.layers.first() != Some(name) {
        return Err(format!("the stream holds template {}", meta.name));
    }
    Ok(meta)
}
