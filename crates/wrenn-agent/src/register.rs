//! A remote agent joins a control plane: `--control-plane URL
//! --registration-token T` registers it once (`POST /v1/hosts/register`;
//! the host ID and host token are kept in `<data-dir>/host.json`, 0600),
//! then it heartbeats every [`HEARTBEAT_EVERY`] with its current facts
//! (`POST /v1/hosts/{id}/heartbeat`, `X-Host-Token`), so a restart on a new
//! address is picked up. Failures are retried; the agent keeps serving.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use wrenn_types::hosts::HostFacts;

pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(30);
const RETRY: Duration = Duration::from_secs(5);

/// This machine's facts, for an agent listening on `address` that
/// requires `agent_token`.
pub fn host_facts(data_dir: &Path, address: SocketAddr, agent_token: &str) -> HostFacts {
    let cpu_cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
    let memory_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok())
        })
        .map_or(1024, |kb| kb / 1024);
    let disk_gb = rustix::fs::statvfs(data_dir)
        .map(|s| (s.f_blocks * s.f_frsize / (1 << 30)) as i64)
        .unwrap_or(0);
    HostFacts {
        address: address.to_string(),
        arch: std::env::consts::ARCH.into(),
        cpu_cores,
        memory_mb,
        disk_gb,
        agent_token: agent_token.to_owned(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Identity {
    id: String,
    token: String,
}

fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join("host.json")
}

async fn post(
    client: &wrenn_http::HttpClient,
    url: String,
    token: Option<&str>,
    body: serde_json::Value,
) -> Result<(u16, Bytes), String> {
    let mut req = http::Request::post(url).header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("x-host-token", t);
    }
    let body = Full::new(Bytes::from(body.to_string()))
        .map_err(|e| match e {})
        .boxed();
    let req = req.body(body).map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes))
}

async fn register(
    client: &wrenn_http::HttpClient,
    cp: &str,
    token: &str,
    facts: &HostFacts,
    data_dir: &Path,
) -> Result<Identity, String> {
    let mut body = serde_json::to_value(facts).map_err(|e| e.to_string())?;
    body["token"] = serde_json::Value::String(token.to_owned());
    let (status, bytes) = post(client, format!("{cp}/v1/hosts/register"), None, body).await?;
    if status != 201 {
        return Err(format!(
            "register: {status} {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    let id = Identity {
        id: v["host"]["id"].as_str().unwrap_or_default().to_owned(),
        token: v["token"].as_str().unwrap_or_default().to_owned(),
    };
    let path = identity_path(data_dir);
    let text = serde_json::to_string(&id).map_err(|e| e.to_string())?;
    write_private(&path, &text).map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(id)
}

/// Write a file only its owner can read (0600), whole or not at all
/// (written beside it, synced, renamed into place).
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// Register (unless `<data-dir>/host.json` says this agent already is) and
/// heartbeat until `shutdown`.
pub async fn run(
    cp: String,
    registration_token: Option<String>,
    data_dir: PathBuf,
    facts: HostFacts,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let cp = cp.trim_end_matches('/').to_owned();
    let client = wrenn_http::client(wrenn_http::HttpVersion::Http1);
    let known = std::fs::read_to_string(identity_path(&data_dir))
        .ok()
        .and_then(|t| serde_json::from_str::<Identity>(&t).ok());
    let id = match known {
        Some(id) => id,
        None => loop {
            let Some(token) = registration_token.as_deref() else {
                tracing::error!("not registered yet and no --registration-token given");
                return;
            };
            match register(&client, &cp, token, &facts, &data_dir).await {
                Ok(id) => {
                    tracing::info!(host = %id.id, control_plane = %cp, "registered");
                    break id;
                }
                Err(e) => tracing::warn!(error = %e, "registration failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                () = &mut shutdown => return,
            }
        },
    };
    let body = serde_json::to_value(&facts).unwrap_or_default();
    loop {
        let url = format!("{cp}/v1/hosts/{}/heartbeat", id.id);
        match post(&client, url, Some(&id.token), body.clone()).await {
            Ok((204, _)) => {}
            Ok((404, _)) => {
                tracing::error!(host = %id.id, "the control plane no longer knows this host")
            }
            Ok((status, b)) => {
                tracing::warn!(status, body = %String::from_utf8_lossy(&b), "heartbeat refused")
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT_EVERY) => {}
            () = &mut shutdown => return,
        }
    }
}
