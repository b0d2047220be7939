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
    /// Remove one of your team's templates.
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
    #[arg(long)]
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
            g.client()?
                .delete_template(&name)
                .await
                .with_context(|| format!("remove template {name}"))?;
            println!("{name}");
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
/// under the same relative names: what the recipe's `COPY` steps read.
/// Links are followed, so the archive holds what they point to.
fn context_archive(dir: &std::path::Path, sources: &[&str]) -> Result<Vec<u8>> {
    let mut ar = tar::Builder::new(Vec::new());
    ar.follow_symlinks(true);
    for src in sources {
        let path = dir.join(src);
        let meta = std::fs::metadata(&path)
            .with_context(|| format!("COPY {src}: {} is not readable", path.display()))?;
        let name = match src.trim_start_matches("./").trim_end_matches('/') {
            "" => ".",
            n => n,
        };
        if meta.is_dir() {
            ar.append_dir_all(name, &path)
        } else {
            ar.append_path_with_name(&path, name)
        }
        .with_context(|| format!("COPY {src}: archive {}", path.display()))?;
    }
    Ok(ar.into_inner()?)
}
