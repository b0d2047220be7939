//! A remote agent joins a control plane: `--control-plane URL
//! --registration-token T` registers it once (`POST /v1/hosts/register`;
//! the host ID, host token and refresh token are kept in
//! `<data-dir>/host.json`, 0600), then it heartbeats every
//! [`HEARTBEAT_EVERY`] with its current facts (`POST
//! /v1/hosts/{id}/heartbeat`, `X-Host-Token`) and when it started, so a
//! restart on a new address, or on the same one, is picked up. Failures are retried; the agent keeps serving.
//!
//! Host tokens expire (a week): a heartbeat refused with 401 or 403 makes
//! the agent trade its refresh token for a new pair and a new certificate
//! (`POST /v1/hosts/auth/refresh`), which it keeps and serves at once. A
//! refused refresh token means the host must be registered again.
//!
//! Between heartbeats, each capsule the reaper pauses is reported at once
//! (`POST /v1/hosts/sandbox-events`, `sandbox.auto_paused`).
//!
//! A heartbeat answered 404 `not_found` means the control plane deleted
//! this host: [`run`] ends with [`Ended::Deleted`], and the agent destroys
//! its capsules and leaves (wrenn-api.md §5).
//!
//! Registration hands the agent its TLS certificate and key and the control
//! plane's CA certificate (kept in `host.json` too). An agent that belongs
//! to a control plane serves nothing but mutual TLS, and nothing at all
//! until it has them ([`install_tls`], [`restore_tls`]): only clients with
//! a certificate from that CA get in (wrenn-api.md §6). The certificate
//! names the host, not its address, so a host that moves keeps it.
//!
//! The control plane is reached with `reqwest` (rustls, the system's
//! roots, `SSL_CERT_FILE` honoured): give an `https://` URL wherever the
//! network between them is not trusted, since registration carries the
//! agent's token and key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use wrenn_types::hosts::{HostFacts, HOST_NOT_FOUND};
use wrenn_types::ids::CapsuleId;

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
    /// (absent in an identity from before host tokens expired: the old
    /// host token then serves as the refresh token, once)
    #[serde(default)]
    refresh_token: String,
    /// (absent in an identity from before mutual TLS)
    #[serde(default)]
    tls: Option<TlsFiles>,
}

impl Identity {
    /// From a registration's or a refresh's answer.
    fn from_answer(bytes: &[u8]) -> Result<Identity, String> {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let tls: TlsFiles = serde_json::from_value(v.clone())
            .map_err(|e| format!("the control plane sent no usable certificate: {e}"))?;
        let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        Ok(Identity {
            id: v["host"]["id"].as_str().unwrap_or_default().to_owned(),
            token: text("token"),
            refresh_token: text("refresh_token"),
            tls: Some(tls),
        })
    }

    fn save(&self, data_dir: &Path) -> Result<(), String> {
        let path = identity_path(data_dir);
        let text = serde_json::to_string(self).map_err(|e| e.to_string())?;
        write_private(&path, &text).map_err(|e| format!("write {}: {e}", path.display()))
    }

    /// Keep it in `host.json`; a failure is logged, not returned: the
    /// control plane has used up what it replaced, so the agent goes on
    /// with it in memory (and writes it again at the next renewal).
    fn keep(&self, data_dir: &Path) {
        if let Err(e) = self.save(data_dir) {
            tracing::error!(
                error = %e,
                "cannot keep the host's credentials; a restart will need a new registration"
            );
        }
    }
}

/// What the control plane issued: wrenn's field names.
#[derive(Clone, Serialize, Deserialize)]
pub struct TlsFiles {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_cert_pem: String,
}

/// Serve mutual TLS with `files` on the listener whose slot is `slot`.
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

/// Before the listener serves anyone: install the TLS this agent was
/// issued, if `<data-dir>/host.json` holds it (true). A `host.json` that
/// cannot be read or used is an error, never plain HTTP.
pub fn restore_tls(data_dir: &Path, slot: &wrenn_http::tls::TlsSlot) -> Result<bool, String> {
    let path = identity_path(data_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("read {}: {e}", path.display())),
    };
    let id: Identity =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    match &id.tls {
        Some(files) => install_tls(slot, files).map(|()| true),
        None => Err(format!(
            "{} is from before mutual TLS: register this host again \
             (remove the file, start with a new --registration-token)",
            path.display()
        )),
    }
}

fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join("host.json")
}

fn read_identity(data_dir: &Path) -> Option<Identity> {
    let text = std::fs::read_to_string(identity_path(data_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// POST `body` as JSON; (status, body).
async fn post(
    client: &reqwest::Client,
    url: String,
    token: Option<&str>,
    body: &serde_json::Value,
) -> Result<(u16, Vec<u8>), String> {
    let mut req = client.post(url).json(body);
    if let Some(t) = token {
        req = req.header("x-host-token", t);
    }
    let resp = req.send().await.map_err(|e| error_chain(&e))?;
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.map_err(|e| error_chain(&e))?;
    Ok((status, bytes.to_vec()))
}

fn error_chain(e: &reqwest::Error) -> String {
    wrenn_http::relay::error_chain(e)
}

async fn register(
    client: &reqwest::Client,
    cp: &str,
    token: &str,
    facts: &HostFacts,
    data_dir: &Path,
) -> Result<Identity, String> {
    let mut body = serde_json::to_value(facts).map_err(|e| e.to_string())?;
    body["token"] = serde_json::Value::String(token.to_owned());
    let (status, bytes) = post(client, format!("{cp}/v1/hosts/register"), None, &body).await?;
    if status != 201 {
        return Err(format!(
            "register: {status} {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    let id = Identity::from_answer(&bytes)?;
    id.keep(data_dir);
    Ok(id)
}

/// Why a refresh failed: `refused` when the control plane will not take
/// the refresh token (the host must be registered again).
struct RefreshFailed {
    refused: bool,
    message: String,
}

/// Trade `id`'s refresh token for a new identity: kept in `host.json`, its
/// certificate served from now on.
async fn refresh(
    client: &reqwest::Client,
    cp: &str,
    id: &Identity,
    data_dir: &Path,
    tls: &wrenn_http::tls::TlsSlot,
) -> Result<Identity, RefreshFailed> {
    let failed = |refused, message| RefreshFailed { refused, message };
    let refresh_token = if id.refresh_token.is_empty() {
        &id.token
    } else {
        &id.refresh_token
    };
    let body = serde_json::json!({ "refresh_token": refresh_token });
    let (status, bytes) = post(client, format!("{cp}/v1/hosts/auth/refresh"), None, &body)
        .await
        .map_err(|e| failed(false, e))?;
    if status != 200 {
        let text = format!("refresh: {status} {}", String::from_utf8_lossy(&bytes));
        return Err(failed(status == 401, text));
    }
    let new = Identity::from_answer(&bytes).map_err(|e| failed(false, e))?;
    // Kept before it is served: a crash in between must not leave the agent
    // with only the used-up refresh token.
    new.keep(data_dir);
    if let Some(files) = &new.tls {
        if let Err(e) = install_tls(tls, files) {
            tracing::error!(error = %e, "cannot serve the renewed certificate");
        }
    }
    Ok(new)
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

/// How [`run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// `shutdown` came, or the agent could not join at all.
    Stopped,
    /// The control plane no longer knows this host: it was deleted.
    Deleted,
}

/// Whether a heartbeat's 404 is the control plane's "host not found" (and
/// not a 404 for a path it has no route for, as a wrong URL or a proxy in
/// front of it would get).
fn says_deleted(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v["error"]["code"] == "not_found" && v["error"]["message"] == HOST_NOT_FOUND)
}

/// What [`run`] works with.
pub struct Membership {
    /// The control plane's base URL.
    pub control_plane: String,
    /// For a host not registered yet.
    pub registration_token: Option<String>,
    pub data_dir: PathBuf,
    pub facts: HostFacts,
    /// Where the certificates the control plane issues go.
    pub tls: wrenn_http::tls::TlsSlot,
    /// The heartbeat's period.
    pub every: Duration,
    /// The reaper's pauses, reported as they come.
    pub auto_pauses: Option<broadcast::Receiver<CapsuleId>>,
}

/// Register (unless `<data-dir>/host.json` says this agent already is) and
/// heartbeat every `every` until `shutdown` or until the control plane
/// says the host was deleted; the certificate the control plane issues at
/// registration (and at each refresh) goes into `tls`.
pub async fn run(m: Membership, shutdown: impl std::future::Future<Output = ()>) -> Ended {
    let Membership {
        control_plane: cp,
        registration_token,
        data_dir,
        facts,
        tls,
        every,
        mut auto_pauses,
    } = m;
    tokio::pin!(shutdown);
    let cp = cp.trim_end_matches('/').to_owned();
    let client = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no HTTP client for the control plane");
            return Ended::Stopped;
        }
    };
    let mut id = match read_identity(&data_dir) {
        Some(id) => id,
        None => loop {
            let Some(token) = registration_token.as_deref() else {
                tracing::error!("not registered yet and no --registration-token given");
                return Ended::Stopped;
            };
            let registered = tokio::select! {
                r = register(&client, &cp, token, &facts, &data_dir) => r,
                () = &mut shutdown => return Ended::Stopped,
            };
            match registered {
                Ok(id) => {
                    tracing::info!(host = %id.id, control_plane = %cp, "registered");
                    if let Some(files) = &id.tls {
                        if let Err(e) = install_tls(&tls, files) {
                            // TLS is required: the agent serves nothing
                            tracing::error!(error = %e, "cannot use the issued certificate");
                        }
                    }
                    break id;
                }
                Err(e) => tracing::warn!(error = %e, "registration failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                () = &mut shutdown => return Ended::Stopped,
            }
        },
    };
    let mut body = serde_json::to_value(&facts).unwrap_or_default();
    // (so that a restart on the same address is seen at once: the control
    // plane reconciles the host then)
    body["started_at"] = humantime::format_rfc3339_millis(std::time::SystemTime::now())
        .to_string()
        .into();
    let mut renewed = false;
    loop {
        let url = format!("{cp}/v1/hosts/{}/heartbeat", id.id);
        // (a call in flight does not hold up shutdown)
        let beat = tokio::select! {
            r = post(&client, url, Some(&id.token), &body) => r,
            () = &mut shutdown => return Ended::Stopped,
        };
        match beat {
            Ok((204, _)) => {}
            Ok((404, b)) if says_deleted(&b) => {
                tracing::error!(host = %id.id, "the control plane deleted this host");
                return Ended::Deleted;
            }
            // (once per beat: a token refused as soon as it is issued, by a
            // clock far off, must not spin)
            Ok((401 | 403, _)) if !renewed => {
                let renewal = tokio::select! {
                    r = refresh(&client, &cp, &id, &data_dir, &tls) => r,
                    () = &mut shutdown => return Ended::Stopped,
                };
                match renewal {
                    Ok(new) => {
                        tracing::info!(host = %new.id, "host token and certificate renewed");
                        id = new;
                        renewed = true;
                        // heartbeat with the new token now
                        continue;
                    }
                    Err(e) if e.refused => tracing::error!(
                        error = %e.message,
                        "the refresh token was refused: register this host again"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e.message, "cannot renew the host token; retrying")
                    }
                }
            }
            Ok((status, b)) => {
                tracing::warn!(status, body = %String::from_utf8_lossy(&b), "heartbeat refused")
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        // Between beats, each capsule the reaper pauses is reported at once.
        let next_beat = tokio::time::sleep(every);
        tokio::pin!(next_beat);
        loop {
            let paused = tokio::select! {
                () = &mut next_beat => break,
                paused = next_auto_pause(&mut auto_pauses) => paused,
                () = &mut shutdown => return Ended::Stopped,
            };
            tokio::select! {
                () = report_auto_pause(&client, &cp, &id, &paused) => {}
                () = &mut shutdown => return Ended::Stopped,
            }
        }
        renewed = false;
    }
}

/// The next capsule the reaper paused; never, without a receiver. Missed
/// ones (a lagging receiver) are left to the next reconciliation.
async fn next_auto_pause(rx: &mut Option<broadcast::Receiver<CapsuleId>>) -> CapsuleId {
    loop {
        match rx.as_mut() {
            None => return std::future::pending().await,
            Some(r) => match r.recv().await {
                Ok(id) => return id,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => *rx = None,
            },
        }
    }
}

/// `POST /v1/hosts/sandbox-events` `sandbox.auto_paused`: the control plane
/// shows the capsule paused now, not at its next reconciliation (which
/// still learns it, if this is lost).
async fn report_auto_pause(client: &reqwest::Client, cp: &str, id: &Identity, capsule: &CapsuleId) {
    let body = serde_json::json!({
        "event": "sandbox.auto_paused",
        "sandbox_id": capsule.as_str(),
        "host_id": id.id,
        "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    });
    let url = format!("{cp}/v1/hosts/sandbox-events");
    match post(client, url, Some(&id.token), &body).await {
        Ok((204, _)) => {}
        Ok((status, b)) => tracing::warn!(
            status,
            body = %String::from_utf8_lossy(&b),
            capsule = %capsule,
            "auto-pause report refused"
        ),
        Err(e) => tracing::warn!(error = %e, capsule = %capsule, "auto-pause report failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::says_deleted;

    #[test]
    fn only_the_host_not_found_404_means_deleted() {
        let deleted = br#"{"error":{"code":"not_found","message":"host not found"}}"#;
        assert!(says_deleted(deleted));
        // the control plane's 404 for a path it has no route for
        let no_route = br#"{"error":{"code":"not_found","message":"no such route"}}"#;
        assert!(!says_deleted(no_route));
        assert!(!says_deleted(b"<html>404 Not Found</html>"));
        assert!(!says_deleted(b""));
    }
}
