//! `wrenn ls`, `create`, `pause`, `resume`, `kill`, `url`, `snapshot`,
//! `logs`.

use std::collections::BTreeMap;
use std::io::Write as _;

use anyhow::{bail, Context, Result};
use clap::Args;
use wrenn_sdk::{CreateCapsule, ExecEvent};

use crate::config::Global;
use crate::output;

pub async fn ls(g: &Global) -> Result<i32> {
    let caps = g.client()?.capsules().await?;
    output::listing(
        g.json,
        &caps,
        &[
            "ID",
            "STATUS",
            "TEMPLATE",
            "ENGINE",
            "VCPUS",
            "MEMORY_MB",
            "CREATED",
        ],
        |c| {
            let engine = c.metadata.as_ref().and_then(|m| m.get("engine"));
            vec![
                c.id.clone(),
                c.status.clone(),
                c.template.clone(),
                engine.map_or("-", |e| e.as_str()).to_owned(),
                c.vcpus.to_string(),
                c.memory_mb.to_string(),
                c.created_at.clone(),
            ]
        },
    )
}

/// `K=V` (for `--env` and `--meta`).
pub(crate) fn pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Template [default: the server's, `minimal`].
    #[arg(long, short)]
    template: Option<String>,
    /// Seconds without activity before the capsule is paused (0: never).
    #[arg(long)]
    timeout: Option<i64>,
    /// vCPUs.
    #[arg(long)]
    cpu: Option<i64>,
    /// Memory in MiB.
    #[arg(long)]
    memory: Option<i64>,
    /// An environment variable of every process (repeatable).
    #[arg(long = "env", short = 'e', value_parser = pair)]
    envs: Vec<(String, String)>,
    /// A metadata label (repeatable).
    #[arg(long = "meta", value_parser = pair)]
    meta: Vec<(String, String)>,
    /// No egress from the capsule.
    #[arg(long)]
    no_internet: bool,
    /// Isolation: `oci` (a container) or `vm` (a microVM with its own
    /// kernel) [default: the template's].
    #[arg(long, value_parser = ["oci", "vm"])]
    engine: Option<String>,
}

pub async fn create(g: &Global, a: CreateArgs) -> Result<i32> {
    let req = CreateCapsule {
        template: a.template,
        vcpus: a.cpu,
        memory_mb: a.memory,
        timeout_sec: a.timeout,
        metadata: (!a.meta.is_empty()).then(|| a.meta.into_iter().collect()),
        envs: a.envs.into_iter().collect::<BTreeMap<_, _>>(),
        internet: a.no_internet.then_some(false),
        engine: a.engine,
    };
    let c = g.client()?.create_capsule(&req).await?;
    if g.json {
        output::json(&c)?;
    } else {
        println!("{}", c.id);
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub struct IdsArgs {
    /// Capsule IDs.
    #[arg(required = true)]
    ids: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
pub enum Op {
    Pause,
    Resume,
    Kill,
}

/// Apply `op` to each capsule; every one is tried, the first failure is
/// reported after. Prints each ID done, or with `--json` one array: the
/// capsules as they are now (pause, resume) or `{"id"}` (kill).
pub async fn each(g: &Global, a: IdsArgs, op: Op) -> Result<i32> {
    let client = g.client()?;
    let mut failed = None;
    let mut done = Vec::new();
    for id in &a.ids {
        let r = match op {
            Op::Pause => client.pause_capsule(id).await.map(Some),
            Op::Resume => client.resume_capsule(id).await.map(Some),
            Op::Kill => client.destroy_capsule(id).await.map(|()| None),
        };
        match r {
            Ok(c) if g.json => done.push(match c {
                Some(c) => serde_json::to_value(c)?,
                None => serde_json::json!({ "id": id }),
            }),
            Ok(_) => println!("{id}"),
            Err(e) => {
                let verb = match op {
                    Op::Pause => "pause",
                    Op::Resume => "resume",
                    Op::Kill => "kill",
                };
                let e = anyhow::Error::new(e).context(format!("{verb} {id}"));
                eprintln!("wrenn: {}", output::explain(&e));
                failed.get_or_insert(1);
            }
        }
    }
    if g.json {
        output::json(&done)?;
    }
    Ok(failed.unwrap_or(0))
}

#[derive(Debug, Args)]
pub struct UrlArgs {
    id: String,
    #[arg(value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// The proxy domain `wrenn up --proxy-domain` was given [default: from
    /// the base URL: `localhost:PORT` for a local server].
    #[arg(long, env = "WRENN_PROXY_DOMAIN")]
    domain: Option<String>,
}

/// `http://{port}-{id}.{domain}`: `*.localhost` resolves to this machine
/// in browsers and curl.
pub async fn url(g: &Global, a: UrlArgs) -> Result<i32> {
    let client = g.client()?;
    let c = client.capsule(&a.id).await?;
    let base = g.base_url();
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", &base));
    let authority = rest.split('/').next().unwrap_or(rest);
    let domain = match a.domain {
        Some(d) => d,
        None => {
            let (host, port) = match authority.rsplit_once(':') {
                Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => (h, Some(p)),
                _ => (authority, None),
            };
            let host = if host == "127.0.0.1" || host == "[::1]" || host == "localhost" {
                "localhost"
            } else {
                host
            };
            match port {
                Some(p) => format!("{host}:{p}"),
                None => host.to_owned(),
            }
        }
    };
    if c.status != "running" {
        eprintln!("wrenn: note: {} is {}", c.id, c.status);
    }
    let url = format!("{scheme}://{}-{}.{domain}/", a.port, c.id);
    if g.json {
        output::json(&serde_json::json!({ "url": url }))?;
    } else {
        println!("{url}");
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    id: String,
    /// The template's name.
    name: String,
    /// Replace a template of that name.
    #[arg(long)]
    overwrite: bool,
}

pub async fn snapshot(g: &Global, a: SnapshotArgs) -> Result<i32> {
    let t = g
        .client()?
        .snapshot(&a.id, &a.name, a.overwrite)
        .await
        .with_context(|| format!("snapshot {}", a.id))?;
    if g.json {
        output::json(&t)?;
    } else {
        println!("{}", t.name);
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    id: String,
    /// A process: pid or tag [default: `init-cmd`, the template's start
    /// command]. Output is followed from now on (envd keeps no scrollback).
    process: Option<String>,
}

pub async fn logs(g: &Global, a: LogsArgs) -> Result<i32> {
    let selector = a.process.as_deref().unwrap_or("init-cmd");
    let mut s = match g.client()?.attach(&a.id, selector).await {
        Ok(s) => s,
        Err(e) => return Err(anyhow::Error::new(e).context(format!("logs of {}", a.id))),
    };
    while let Some(ev) = s.next().await {
        match ev {
            Ok(ExecEvent::Stdout(t)) => {
                print!("{t}");
                std::io::stdout().flush()?;
            }
            Ok(ExecEvent::Stderr(t)) => eprint!("{t}"),
            Ok(ExecEvent::Exit { code }) => {
                eprintln!("wrenn: the process exited with {code}");
                return Ok(0);
            }
            Ok(ExecEvent::Started { .. }) => {}
            Err(e) if a.process.is_none() && e.to_string().contains("not found") => {
                bail!(
                    "{} has no start command running (name a process: `wrenn logs {} PID|TAG`)",
                    a.id,
                    a.id
                )
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(0)
}
