//! `wrenn template ls|build|rm`. `build FILE` checks the recipe here (with
//! line numbers) and sends it to the control plane (`POST
//! /v1/admin/builds`, admin key), which builds it in a capsule; the
//! healthcheck comes from `--healthcheck` or a `.healthcheck` file next to
//! `FILE` (`recipes/code-runner-beta.{recipefile,healthcheck}`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use wrenn_sdk::Build;

use crate::config::Global;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum TemplateCmd {
    /// Templates you can create capsules from.
    Ls,
    /// Build a platform template from a recipe file (admin key).
    Build(BuildArgs),
    /// Remove one of your team's templates, or (admin key) a platform
    /// template built from a recipe.
    Rm { name: String },
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The recipe: one step per line (RUN, ENV, WORKDIR, USER, COPY, START).
    file: PathBuf,
    /// Template name [default: the file name without its extension].
    #[arg(long)]
    name: Option<String>,
    /// Template the build starts from.
    #[arg(long, default_value = "minimal")]
    base: String,
    /// Healthcheck line [default: FILE's `.healthcheck` sibling, if any].
    #[arg(long, allow_hyphen_values = true)]
    healthcheck: Option<String>,
    /// Where `COPY` sources are read from [default: FILE's directory]; what
    /// they name is sent along as a tar archive.
    #[arg(long)]
    context: Option<PathBuf>,
}

pub async fn run(g: &Global, cmd: TemplateCmd) -> Result<i32> {
    match cmd {
        TemplateCmd::Ls => ls(g).await,
        TemplateCmd::Build(a) => build(g, a).await,
        TemplateCmd::Rm { name } => {
            let client = g.client()?;
            match client.delete_template(&name).await {
                // (a platform template: the admin route, with an admin key)
                Err(wrenn_sdk::Error::Api { status: 403, .. }) => {
                    client.delete_platform_template(&name).await
                }
                r => r,
            }
            .with_context(|| format!("remove template {name}"))?;
            if g.json {
                output::json(&serde_json::json!({ "name": name }))?;
            } else {
                println!("{name}");
            }
            Ok(0)
        }
    }
}

async fn ls(g: &Global) -> Result<i32> {
    let ts = g.client()?.templates().await?;
    output::listing(
        g.json,
        &ts,
        &["NAME", "TYPE", "OWNER", "SIZE_MB", "CREATED"],
        |t| {
            vec![
                t.name.clone(),
                t.kind.clone(),
                if t.platform { "platform" } else { "team" }.to_owned(),
                format!("{:.1}", t.size_bytes as f64 / (1 << 20) as f64),
                t.created_at.clone(),
            ]
        },
    )
}

async fn build(g: &Global, a: BuildArgs) -> Result<i32> {
    let recipe =
        std::fs::read_to_string(&a.file).with_context(|| format!("read {}", a.file.display()))?;
    // Catch mistakes here, with line numbers, before a capsule is started.
    let steps =
        wrenn_types::recipe::parse(&recipe).with_context(|| format!("{}", a.file.display()))?;
    let sources: Vec<&str> = steps
        .iter()
        .filter_map(|s| match s {
            wrenn_types::recipe::Step::Copy { sources, .. } => Some(sources),
            _ => None,
        })
        .flatten()
        .map(String::as_str)
        .collect();
    let context = if sources.is_empty() {
        None
    } else {
        let dir = match &a.context {
            Some(d) => d.clone(),
            None => a
                .file
                .parent()
                .map(|p| {
                    if p.as_os_str().is_empty() {
                        ".".as_ref()
                    } else {
                        p
                    }
                })
                .unwrap_or(".".as_ref())
                .to_owned(),
        };
        Some(context_archive(&dir, &sources)?)
    };
    let name = match a.name {
        Some(n) => n,
        None => a
            .file
            .file_stem()
            .and_then(|s| s.to_str())
            .context("name the template with --name")?
            .to_owned(),
    };
    let healthcheck = match a.healthcheck {
        Some(h) => Some(h),
        None => std::fs::read_to_string(a.file.with_extension("healthcheck"))
            .ok()
            .map(|h| h.trim().to_owned()),
    };
    let client = g.client()?;
    eprintln!(
        "building {name} from {} on {} (steps run in a capsule; this waits for the result)",
        a.base,
        client.base_url()
    );
    let (t, logs) = client
        .build_template(&Build {
            name: name.clone(),
            base_template: a.base,
            recipe,
            healthcheck,
            context,
        })
        .await
        .with_context(|| format!("build {name}"))?;
    for line in logs {
        println!("{line}");
    }
    println!("built template {} ({} bytes)", t.name, t.size_bytes);
    Ok(0)
}

/// A tar archive of `sources` (files or directories, relative to `dir`),
/// under the same relative names: what the recipe's `COPY` steps read,
/// each once (a source inside another is in it already). Links are
/// followed, so the archive holds what they point to, but only inside
/// `dir`: a source or link leading out of it is an error (it would send
/// files the recipe never meant to, such as a key under `~`).
fn context_archive(dir: &std::path::Path, sources: &[&str]) -> Result<Vec<u8>> {
    let root = std::fs::canonicalize(dir)
        .with_context(|| format!("build context {} is not readable", dir.display()))?;
    let mut names: Vec<&str> = sources
        .iter()
        .map(
            |src| match src.trim_start_matches("./").trim_end_matches('/') {
                "" => ".",
                n => n,
            },
        )
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.contains(&".") {
        names = vec!["."]; // (everything else is in it)
    }
    let mut ar = tar::Builder::new(Vec::new());
    ar.follow_symlinks(true);
    let mut sent: Vec<&str> = Vec::new();
    let mut walked = 0usize;
    for name in names {
        let inside = |parent: &&str| {
            *parent == "."
                || name
                    .strip_prefix(*parent)
                    .is_some_and(|r| r.starts_with('/'))
        };
        if sent.iter().any(inside) {
            continue;
        }
        let path = dir.join(name);
        let meta = std::fs::metadata(&path)
            .with_context(|| format!("COPY {name}: {} is not readable", path.display()))?;
        stays_inside(&root, &path, &mut Vec::new(), &mut walked)
            .with_context(|| format!("COPY {name}"))?;
        if meta.is_dir() {
            ar.append_dir_all(name, &path)
        } else {
            ar.append_path_with_name(&path, name)
        }
        .with_context(|| format!("COPY {name}: archive {}", path.display()))?;
        sent.push(name);
    }
    Ok(ar.into_inner()?)
}

/// The most entries a context may hold (the control plane's own limit).
const CONTEXT_ENTRIES: usize = 100_000;

/// Fails if `path`, or a link anywhere under it, leads out of `root`
/// (canonical), or a link leads back into a directory it is in (the
/// archive would never end), or the walk passes [`CONTEXT_ENTRIES`]
/// (`walked` counts them: links that fan out would make it explode).
/// `above`: the directories `path` is in, as canonical paths.
fn stays_inside(
    root: &std::path::Path,
    path: &std::path::Path,
    above: &mut Vec<PathBuf>,
    walked: &mut usize,
) -> Result<()> {
    *walked += 1;
    if *walked > CONTEXT_ENTRIES {
        anyhow::bail!("more than {CONTEXT_ENTRIES} files and directories (links followed)");
    }
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("{} is not readable", path.display()))?;
    // (only links, and the top of each source, can lead elsewhere)
    let (real, is_dir) = if meta.file_type().is_symlink() || above.is_empty() {
        let real = std::fs::canonicalize(path)
            .with_context(|| format!("{} is not readable", path.display()))?;
        if !real.starts_with(root) {
            anyhow::bail!(
                "{} leads out of the build context {} (to {})",
                path.display(),
                root.display(),
                real.display()
            );
        }
        let is_dir = real.is_dir();
        (real, is_dir)
    } else {
        let parent = above.last().cloned().unwrap_or_default();
        (
            parent.join(path.file_name().unwrap_or_default()),
            meta.is_dir(),
        )
    };
    if is_dir {
        if above.contains(&real) {
            anyhow::bail!("{} is a link loop", path.display());
        }
        above.push(real);
        for entry in std::fs::read_dir(path)? {
            stays_inside(root, &entry?.path(), above, walked)?;
        }
        above.pop();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(archive: &[u8]) -> Vec<String> {
        let mut names: Vec<String> = tar::Archive::new(archive)
            .entries()
            .unwrap()
            .map(|e| {
                e.unwrap()
                    .path()
                    .unwrap()
                    .to_string_lossy()
                    .trim_end_matches('/')
                    .to_owned()
            })
            .collect();
        names.sort();
        names
    }

    /// The error of an archive that should have been refused.
    fn refused(r: Result<Vec<u8>>) -> String {
        match r {
            Ok(a) => panic!("archived anyway: {:?}", entries(&a)),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn context_holds_each_source_once_and_nothing_from_outside() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "key").unwrap();
        let ctx = tempfile::tempdir().unwrap();
        let d = ctx.path();
        std::fs::create_dir_all(d.join("app/sub")).unwrap();
        std::fs::write(d.join("app/sub/a.txt"), "a").unwrap();
        std::fs::write(d.join("motd"), "m").unwrap();
        std::os::unix::fs::symlink("motd", d.join("motd-link")).unwrap();

        // named twice, and inside another source: archived once
        let ar = context_archive(d, &["app", "./app/", "app/sub/a.txt", "motd-link"]).unwrap();
        assert_eq!(
            entries(&ar),
            ["app", "app/sub", "app/sub/a.txt", "motd-link"],
            "{:?}",
            entries(&ar)
        );

        // a link inside the context leading out of it, or a source above it
        std::os::unix::fs::symlink(outside.path().join("secret"), d.join("app/sub/key")).unwrap();
        let e = refused(context_archive(d, &["app"]));
        assert!(e.contains("leads out of the build context"), "{e}");
        let e = refused(context_archive(&d.join("app"), &["../motd"]));
        assert!(e.contains("leads out of the build context"), "{e}");
        std::fs::remove_file(d.join("app/sub/key")).unwrap();

        // "." holds every other source
        let ar = context_archive(d, &["-x", ".", "motd"]);
        let names = entries(&ar.unwrap());
        assert_eq!(
            names.iter().filter(|n| *n == "motd").count(),
            1,
            "{names:?}"
        );

        // a link back to a directory it is in
        std::os::unix::fs::symlink("..", d.join("app/sub/up")).unwrap();
        let e = refused(context_archive(d, &["app"]));
        assert!(e.contains("link loop"), "{e}");
    }
}
