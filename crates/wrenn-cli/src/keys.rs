//! `wrenn keys create|ls|rm` and `wrenn hosts ls`.

use anyhow::{Context, Result};
use clap::Subcommand;
use wrenn_sdk::KeyKind;

use crate::config::Global;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Make a key for your team; it is printed once.
    Create {
        name: String,
        /// An E2B-format key (`e2b_` + 40 hex) for E2B's SDKs.
        #[arg(long)]
        e2b: bool,
    },
    /// List your team's keys (never the secrets).
    Ls,
    /// Revoke a key.
    Rm { id: String },
}

pub async fn run(g: &Global, cmd: KeysCmd) -> Result<i32> {
    let client = g.client()?;
    match cmd {
        KeysCmd::Create { name, e2b } => {
            let kind = if e2b { KeyKind::E2b } else { KeyKind::Wrenn };
            let k = client.create_api_key(&name, kind).await?;
            if g.json {
                output::json(&k)?;
            } else {
                println!("{}", k.secret);
                eprintln!(
                    "wrenn: key {} ({}) created; it is not shown again",
                    k.key.id, k.key.name
                );
            }
        }
        KeysCmd::Ls => {
            let keys = client.api_keys().await?;
            return output::listing(
                g.json,
                &keys,
                &["ID", "NAME", "KIND", "PREFIX", "CREATED", "LAST USED"],
                |k| {
                    vec![
                        k.id.clone(),
                        k.name.clone(),
                        k.kind.clone(),
                        format!("{}…", k.key_prefix),
                        k.created_at.clone(),
                        k.last_used.clone().unwrap_or_else(|| "-".into()),
                    ]
                },
            );
        }
        KeysCmd::Rm { id } => {
            client
                .delete_api_key(&id)
                .await
                .with_context(|| format!("remove key {id}"))?;
            println!("{id}");
        }
    }
    Ok(0)
}

#[derive(Debug, Subcommand)]
pub enum HostsCmd {
    /// List hosts (admin key).
    Ls,
}

pub async fn hosts(g: &Global, cmd: HostsCmd) -> Result<i32> {
    let HostsCmd::Ls = cmd;
    let hosts = g.client()?.hosts().await?;
    output::listing(
        g.json,
        &hosts,
        &[
            "ID",
            "STATUS",
            "ADDRESS",
            "CPUS",
            "MEMORY_MB",
            "LAST HEARTBEAT",
        ],
        |h| {
            vec![
                h.id.clone(),
                h.status.clone(),
                h.facts.address.clone(),
                h.facts.cpu_cores.to_string(),
                h.facts.memory_mb.to_string(),
                h.last_heartbeat.clone().unwrap_or_else(|| "-".into()),
            ]
        },
    )
}
