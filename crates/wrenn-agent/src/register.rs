//! A remote agent joins a control plane: `--control-plane URL
//! --registration-token T` registers it once (`POST /v1/hosts/register`;
//! the host ID and host token are kept in `<data-dir>/host.json`, 0600),
//! then it heartbeats every [`HEARTBEAT_EVERY`] with its current facts
//! (`POST /v1/hosts/{id}/heartbeat`, `X-Host-Token`), so a restart on a new
//! address is picked up. Failures are retried; the agent keeps serving.
//!
//! Registration hands the agent its TLS certificate and key and the control
//! plane's CA certificate (kept in `host.json` too). From the moment they
//! are installed ([`install_tls`]) the agent's listener serves only TLS,
//! to clients with a certificate from that CA (wrenn-api.md §6). A
//! heartbeat from a new address is answered with a certificate for it.

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

#[derive(Clone, Serialize, Deserialize)]
struct Identity {
    id: String,
    token: String,
    #[serde(flatten)]
    tls: Option<TlsFiles>,
}

/// What the control plane issued: wrenn's field names.
#[derive(Clone, Serialize, Deserialize)]
pub struct TlsFiles {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_cert_pem: String,
}

impl TlsFiles {
    fn from_json(v: &serde_json::Value) -> Option<TlsFiles> {
        serde_json::from_value(v.clone()).ok()
    }
}

/// Serve TLS with `files` on the listener whose slot is `slot`.
pub fn install_tls(slot: &wrenn_http::tls::TlsSlot, files: &TlsFiles) -> Result<(), String> {
    let identity = wrenn_http::tls::Identity {
        cert_pem: files.cert_pem.clone(),
        key_pem: files.key_pem.clone(),
    };
    slot.install(wrenn_http::tls::server_config(
        &identity,
        &files.ca_cert_pem,
    )?);
    Ok(())
}

/// Install the TLS this agent was issued before, if `<data-dir>/host.json`
/// holds it: done before the listener serves anyone.
pub fn restore_tls(data_dir: &Path, slot: &wrenn_http::tls::TlsSlot) -> Result<bool, String> {
    let Some(id) = read_identity(data_dir) else {
        return Ok(false);
    };
    match &id.tls {
        Some(files) => install_tls(slot, files).map(|()| true),
        None => Ok(false),
    }
}

fn read_identity(data_dir: &Path) -> Option<Identity> {
    let text = std::fs::read_to_string(identity_path(data_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

fn save_identity(data_dir: &Path, id: &Identity) -> Result<(), String> {
    let path = identity_path(data_dir);
    let text = serde_json::to_string(id).map_err(|e| e.to_string())?;
    write_private(&path, &text).map_err(|e| format!("write {}: {e}", path.display()))
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
    let tls = TlsFiles::from_json(&v).ok_or("the control plane sent no certificate")?;
    let id = Identity {
        id: v["host"]["id"].as_str().unwrap_or_default().to_owned(),
        token: v["token"].as_str().unwrap_or_default().to_owned(),
        tls: Some(tls),
    };
    save_identity(data_dir, &id)?;
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
/// heartbeat until `shutdown`; the certificates the control plane issues
/// go into `tls`.
pub async fn run(
    cp: String,
    registration_token: Option<String>,
    data_dir: PathBuf,
    facts: HostFacts,
    tls: wrenn_http::tls::TlsSlot,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let cp = cp.trim_end_matches('/').to_owned();
    let client = wrenn_http::client(wrenn_http::HttpVersion::Http1);
    let known = read_identity(&data_dir);
    let mut id = match known {
        Some(id) => id,
        None => loop {
            let Some(token) = registration_token.as_deref() else {
                tracing::error!("not registered yet and no --registration-token given");
                return;
            };
            match register(&client, &cp, token, &facts, &data_dir).await {
                Ok(id) => {
                    tracing::info!(host = %id.id, control_plane = %cp, "registered");
                    if let Some(files) = &id.tls {
                        if let Err(e) = install_tls(&tls, files) {
                            tracing::error!(error = %e, "cannot use the issued certificate");
                        }
                    }
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
            // a new address, and a certificate for it
            Ok((200, b)) => {
                let files = serde_json::from_slice(&b)
                    .ok()
                    .and_then(|v| TlsFiles::from_json(&v));
                match files.map(|f| install_tls(&tls, &f).map(|()| f)) {
                    Some(Ok(files)) => {
                        id.tls = Some(files);
                        if let Err(e) = save_identity(&data_dir, &id) {
                            tracing::warn!(error = %e, "cannot keep the new certificate");
                        }
                        tracing::info!(host = %id.id, "new certificate for a new address");
                    }
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "bad certificate from the control plane")
                    }
                    None => tracing::warn!("heartbeat answered 200 without a certificate"),
                }
            }
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
