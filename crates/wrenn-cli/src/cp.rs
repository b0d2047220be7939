//! `wrenn cp SRC DST`, one side `ID:/path` in a capsule, as `docker cp`:
//! a file goes into a directory that exists (or to the path named); a
//! directory travels as a tar stream (modes kept) and lands as `DST` if that
//! does not exist, else inside it. Files of 16 MiB and more show a progress
//! bar on a terminal. In the capsule `tar`, `stat` and `sh` do the
//! unpacking and inspecting (busybox and Debian have them).

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

fn scratch(ext: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("/tmp/.wrenn-cp-{}-{nanos}.{ext}", std::process::id())
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
    bar.finish_and_clear();
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
    // A directory: its contents as a tar file, unpacked into `target`.
    let local_tar = tempfile::NamedTempFile::new()?;
    let (dir, tar_path) = (src.to_owned(), local_tar.path().to_owned());
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut b = tar::Builder::new(std::fs::File::create(&tar_path)?);
        b.follow_symlinks(false);
        b.append_dir_all(".", &dir)
            .with_context(|| format!("pack {}", dir.display()))?;
        b.finish()?;
        Ok(())
    })
    .await??;
    let remote_tar = scratch("tar");
    upload_file(client, local_tar.path(), id, &remote_tar).await?;
    let (t, r) = (quote(&target), quote(&remote_tar));
    sh(
        client,
        id,
        &format!("mkdir -p {t} && tar -xpf {r} -C {t}; rc=$?; rm -f {r}; exit $rc"),
    )
    .await?;
    Ok(())
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
    bar.finish_and_clear();
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
            let remote_tar = scratch("tar");
            let (s, r) = (quote(src), quote(&remote_tar));
            sh(client, id, &format!("tar -cf {r} -C {s} .")).await?;
            let local_tar = tempfile::NamedTempFile::new()?;
            let fetched = download_to(client, id, &remote_tar, local_tar.path(), 0).await;
            let _ = sh(client, id, &format!("rm -f {r}")).await;
            fetched?;
            let tar_path = local_tar.path().to_owned();
            tokio::task::spawn_blocking(move || -> Result<()> {
                std::fs::create_dir_all(&target)?;
                let mut ar = tar::Archive::new(std::fs::File::open(&tar_path)?);
                ar.set_preserve_permissions(true);
                ar.unpack(&target)
                    .with_context(|| format!("unpack into {}", target.display()))?;
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
