//! `wrenn cp SRC DST`, one side `ID:/path` in a capsule, as `docker cp`:
//! a file goes into a directory that exists (or to the path named); a
//! directory travels as a tar stream (modes kept) and lands as `DST` if that
//! does not exist, else inside it: packed while it is sent and unpacked while
//! it arrives (`…/files/tar`), never staged in a file. Files of 16 MiB and
//! more show a progress bar on a terminal, left on the screen when done. In the capsule `tar`, `stat` and
//! `sh` do the packing, unpacking and inspecting (busybox and Debian have
//! them).

use std::io::IsTerminal;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;
use wrenn_sdk::{Client, Command};

use crate::config::Global;
use wrenn_cp::build::quote;

const PROGRESS_FROM: u64 = 16 << 20;

#[derive(Debug, Args)]
pub struct CpArgs {
    /// `ID:/path` or a local path.
    src: String,
    /// `ID:/path` or a local path.
    dst: String,
}

/// `cl-…:/path` → (capsule, path); local paths are None. A prefix before
/// the first `:` that holds no `/` names a capsule.
fn remote(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    (!id.is_empty() && !id.contains('/')).then_some((id, path))
}

fn base_name(p: &str) -> Result<String> {
    Path::new(p.trim_end_matches('/'))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{p:?} names no file"))
}

#[derive(Debug, PartialEq, Eq)]
enum Remote {
    Missing,
    Dir,
    File { mode: u32, size: u64 },
}

async fn sh(client: &Client, id: &str, line: &str) -> Result<String> {
    let out = client.exec(id, &Command::shell(line), 600).await?;
    if out.exit_code != 0 {
        bail!(
            "in {id}: `{line}` failed ({}): {}",
            out.exit_code,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn inspect(client: &Client, id: &str, path: &str) -> Result<Remote> {
    let q = quote(path);
    let line = format!(
        "if [ -d {q} ]; then echo dir; elif [ -e {q} ]; then echo file $(stat -L -c '%a %s' {q}); else echo none; fi"
    );
    let out = sh(client, id, &line).await?;
    let words: Vec<&str> = out.split_whitespace().collect();
    Ok(match words.as_slice() {
        ["dir"] => Remote::Dir,
        ["file", mode, size] => Remote::File {
            mode: u32::from_str_radix(mode, 8).unwrap_or(0o644),
            size: size.parse().unwrap_or(0),
        },
        _ => Remote::Missing,
    })
}

fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    if len < PROGRESS_FROM || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

pub async fn run(g: &Global, a: CpArgs) -> Result<i32> {
    match (remote(&a.src), remote(&a.dst)) {
        (None, Some((id, dst))) => upload(&g.client()?, Path::new(&a.src), id, dst).await?,
        (Some((id, src)), None) => download(&g.client()?, id, src, Path::new(&a.dst)).await?,
        (Some(_), Some(_)) => {
            bail!("copy between capsules is not supported: go through a local path")
        }
        (None, None) => bail!("one side must be a capsule path, ID:/path"),
    }
    Ok(0)
}

async fn upload_file(client: &Client, local: &Path, id: &str, target: &str) -> Result<()> {
    let file = tokio::fs::File::open(local)
        .await
        .with_context(|| format!("open {}", local.display()))?;
    let len = file.metadata().await?.len();
    let bar = progress(len, target);
    let bar2 = bar.clone();
    let body = tokio_util::io::ReaderStream::with_capacity(file, 256 << 10)
        .inspect_ok(move |b: &Bytes| bar2.inc(b.len() as u64));
    client.write_file(id, target, body).await?;
    bar.finish();
    Ok(())
}

async fn upload(client: &Client, src: &Path, id: &str, dst: &str) -> Result<()> {
    let meta = std::fs::metadata(src).with_context(|| format!("{}", src.display()))?;
    let existing = inspect(client, id, dst).await?;
    let src_name = base_name(&src.to_string_lossy())?;
    let target = if existing == Remote::Dir || (meta.is_file() && dst.ends_with('/')) {
        format!("{}/{src_name}", dst.trim_end_matches('/'))
    } else {
        dst.to_owned()
    };
    if meta.is_file() {
        upload_file(client, src, id, &target).await?;
        let mode = meta.permissions().mode() & 0o7777;
        sh(client, id, &format!("chmod {mode:o} {}", quote(&target))).await?;
        return Ok(());
    }
    if !meta.is_dir() {
        bail!("{} is neither a file nor a directory", src.display());
    }
    // A directory: packed as it is sent, unpacked in the capsule as it
    // arrives (nothing staged on either side).
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    let dir = src.to_owned();
    let packer = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut b = tar::Builder::new(ChannelWriter::new(tx.clone()));
        b.follow_symlinks(false);
        let packed = b
            .append_dir_all(".", &dir)
            .and_then(|()| b.into_inner())
            .and_then(|mut w| std::io::Write::flush(&mut w))
            .with_context(|| format!("pack {}", dir.display()));
        if let Err(e) = &packed {
            // fails the upload: the capsule's tar is stopped
            let _ = tx.blocking_send(Err(std::io::Error::other(format!("{e:#}"))));
        }
        packed
    });
    let body =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let sent = client.write_tar(id, &target, body).await;
    // Whichever side failed first says why: a refused upload stops the
    // packer ("the upload stopped"), a failed packing fails the upload.
    match (packer.await?, sent) {
        (Ok(()), sent) => Ok(sent?),
        (Err(packing), Err(upload)) if stopped_by_upload(&packing) => Err(upload.into()),
        (Err(packing), _) => Err(packing),
    }
}

fn stopped_by_upload(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The packer's output, in 256 KiB pieces, to the upload's body.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    const PIECE: usize = 256 << 10;

    fn new(tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>) -> ChannelWriter {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(Self::PIECE),
        }
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= Self::PIECE {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(Self::PIECE),
        ));
        self.tx
            .blocking_send(Ok(piece))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

async fn download_to(client: &Client, id: &str, src: &str, local: &Path, len: u64) -> Result<()> {
    let mut stream = client.read_file(id, src).await?;
    let mut file = tokio::fs::File::create(local)
        .await
        .with_context(|| format!("create {}", local.display()))?;
    let bar = progress(len, src);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        bar.inc(chunk.len() as u64);
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    bar.finish();
    Ok(())
}

async fn download(client: &Client, id: &str, src: &str, dst: &Path) -> Result<()> {
    let src_name = base_name(src)?;
    let target: PathBuf = if dst.is_dir() {
        dst.join(&src_name)
    } else {
        dst.to_owned()
    };
    match inspect(client, id, src).await? {
        Remote::Missing => bail!("{id}:{src} does not exist"),
        Remote::File { mode, size } => {
            download_to(client, id, src, &target, size).await?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
        }
        Remote::Dir => {
            // unpacked as it arrives
            let stream = client.read_tar(id, src).await?;
            let reader = tokio_util::io::StreamReader::new(stream.map_err(std::io::Error::other));
            let reader = tokio_util::io::SyncIoBridge::new(reader);
            tokio::task::spawn_blocking(move || -> Result<()> {
                std::fs::create_dir_all(&target)?;
                let mut ar = tar::Archive::new(reader);
                ar.set_preserve_permissions(true);
                let partly =
                    || format!("unpack into {} (it may be partly filled)", target.display());
                ar.unpack(&target).with_context(partly)?;
                // Past the archive's end marker: a stream the server cut
                // (tar failed in the capsule, say on an unreadable file)
                // is an error, not a complete copy.
                std::io::copy(&mut ar.into_inner(), &mut std::io::sink()).with_context(partly)?;
                Ok(())
            })
            .await??;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides() {
        assert_eq!(remote("cl-abc:/tmp/x"), Some(("cl-abc", "/tmp/x")));
        assert_eq!(remote("./a:b"), None);
        assert_eq!(remote("/tmp/x"), None);
        assert_eq!(remote(":x"), None);
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(base_name("/a/b/").unwrap(), "b");
        assert!(base_name("/").is_err());
    }
}
