//! Hosts: the admin team issues a one-time registration token
//! (`POST /v1/hosts`), an agent registers with it (`POST
//! /v1/hosts/register`, no API key) and gets a host token and a refresh
//! token ([`crate::host_tokens`]), then heartbeats with `X-Host-Token`.
//! When the host token is refused it trades the refresh token for a new
//! pair and a new certificate (`POST /v1/hosts/auth/refresh`). `wrenn up`
//! registers its own agent through the same functions.
//!
//! Registration also hands the agent its TLS certificate, key and the
//! control plane's CA certificate (`cert_pem`, `key_pem`, `ca_cert_pem`,
//! as wrenn's API names them; see [`crate::pki`]). The certificate names
//! the host, not its address: a host that moves keeps it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use wrenn_types::hosts::HOST_NOT_FOUND;
use wrenn_types::ids::HostId;

use super::{ApiJson, Path, Query};
use crate::auth::{random_hex, sha256_hex, Caller};
use crate::db::{now_ms, Host, HostRegistration};
use crate::error::{ApiError, ApiResult};
use crate::host_tokens::Verified;
use crate::model::rfc3339;
use crate::pki::HostCert;
use crate::server::Cp;

fn host_json(h: &Host) -> Value {
    json!({
        "id": h.id.to_string(), "status": h.status, "address": h.address, "arch": h.arch,
        "cpu_cores": h.cpu_cores, "memory_mb": h.memory_mb, "disk_gb": h.disk_gb,
        "created_at": rfc3339(h.created_at), "last_heartbeat": h.last_heartbeat.map(rfc3339),
    })
}

/// A pending host and its registration token (64 hex, shown once).
pub async fn issue_registration(cp: &Cp) -> ApiResult<(Host, String)> {
    let token = random_hex(32);
    let host = Host {
        id: HostId::random(),
        status: "pending".into(),
        address: String::new(),
        arch: String::new(),
        cpu_cores: 0,
        memory_mb: 0,
        disk_gb: 0,
        created_at: now_ms(),
        last_heartbeat: None,
        agent_token: String::new(),
    };
    cp.db.insert_host(&host, &sha256_hex(&token)).await?;
    Ok((host, token))
}

/// What the agent said is usable: an `ip:port`, and a token that fits in a
/// header (empty: an agent that requires none).
fn check_facts(reg: &HostRegistration) -> ApiResult<()> {
    if reg.address.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::invalid("address must be ip:port"));
    }
    if reg.agent_token.len() > 256 || http::HeaderValue::from_str(&reg.agent_token).is_err() {
        return Err(ApiError::invalid(
            "agent_token must be at most 256 visible ASCII characters",
        ));
    }
    Ok(())
}

/// A registered (or refreshed) host, its host token (for heartbeats), its
/// refresh token and its certificate.
#[derive(Debug)]
pub struct Registered {
    pub host: Host,
    pub token: String,
    pub refresh_token: String,
    pub cert: HostCert,
}

impl Registered {
    /// wrenn's answer: `{host, token, refresh_token, cert_pem, key_pem,
    /// ca_cert_pem}`.
    fn json(&self) -> Value {
        let mut out = cert_json(&self.cert);
        out["host"] = host_json(&self.host);
        out["token"] = Value::String(self.token.clone());
        out["refresh_token"] = Value::String(self.refresh_token.clone());
        out
    }
}

fn host_token(cp: &Cp, id: &HostId) -> ApiResult<String> {
    cp.host_tokens.sign(id).map_err(|e| {
        tracing::error!(error = %e, "cannot sign a host token");
        ApiError::internal()
    })
}

/// A certificate for `host`.
pub fn certify(cp: &Cp, host: &Host) -> ApiResult<HostCert> {
    certify_id(cp, &host.id)
}

fn certify_id(cp: &Cp, id: &HostId) -> ApiResult<HostCert> {
    cp.pki.issue_host(id).map_err(|e| {
        tracing::error!(error = %e, "cannot issue a host certificate");
        ApiError::internal()
    })
}

/// `cert` is now host `id`'s: the one it had before is revoked, and no
/// longer accepted from the next handshake on.
pub async fn adopt_cert(cp: &Cp, id: &HostId, cert: &HostCert) -> ApiResult<()> {
    if !cp.db.replace_host_cert(id, cert_row(cert)).await? {
        return Err(ApiError::not_found(HOST_NOT_FOUND));
    }
    reload_revocations(cp).await;
    Ok(())
}

/// What the database keeps of `cert`: its serial and expiry.
fn cert_row(cert: &HostCert) -> (&str, i64) {
    (&cert.serial, cert.expires_at)
}

/// Take up a revocation just stored. Should it fail, the reconciler's next
/// round does it (the revocation itself is in the database).
async fn reload_revocations(cp: &Cp) {
    if let Err(e) = cp.reload_revocations().await {
        tracing::error!(error = %e, "cannot install the revocation list");
    }
}

fn cert_json(c: &HostCert) -> Value {
    json!({
        "cert_pem": c.identity.cert_pem,
        "key_pem": c.identity.key_pem,
        "ca_cert_pem": c.ca_cert_pem,
    })
}

/// Register the agent holding `token`. Its credentials are made before
/// the token is used up, so a failure to make them leaves it usable.
pub async fn register_host(cp: &Cp, token: &str, reg: &HostRegistration) -> ApiResult<Registered> {
    check_facts(reg)?;
    let used = || ApiError::unauthorized("invalid or used registration token");
    let hash = sha256_hex(token);
    let id = cp.db.pending_host(&hash).await?.ok_or_else(used)?;
    let token = host_token(cp, &id)?;
    let refresh = cp.host_tokens.refresh();
    let cert = certify_id(cp, &id)?;
    let host = cp
        .db
        .register_host(
            &hash,
            reg,
            (&refresh.hash, refresh.expires_at),
            cert_row(&cert),
        )
        .await?
        .ok_or_else(used)?;
    reconnect(cp, &host)?;
    tracing::info!(host = %host.id, address = %host.address, "host registered");
    Ok(Registered {
        host,
        token,
        refresh_token: refresh.token,
        cert,
    })
}

/// Trade a refresh token for a new pair and a new certificate. The old
/// refresh token is used up, though still taken for a short grace
/// ([`crate::host_tokens::REFRESH_GRACE`]) in case this answer is lost; an
/// unknown, used or expired one is 401. Everything is made before the old
/// token is used up, so a failure to make it leaves that token good.
pub async fn refresh_host(cp: &Cp, refresh_token: &str) -> ApiResult<Registered> {
    let refused = || ApiError::unauthorized("invalid, used or expired refresh token");
    if refresh_token.len() != 64 {
        return Err(refused());
    }
    let old = sha256_hex(refresh_token);
    let id = cp.db.refreshable_host(&old).await?.ok_or_else(refused)?;
    let token = host_token(cp, &id)?;
    let cert = certify_id(cp, &id)?;
    let refresh = cp.host_tokens.refresh();
    let grace_until = now_ms() + cp.config.host_refresh_grace.as_millis() as i64;
    let host = cp
        .db
        .rotate_refresh(
            &id,
            &old,
            (&refresh.hash, refresh.expires_at),
            grace_until,
            cert_row(&cert),
        )
        .await?
        .ok_or_else(refused)?;
    reload_revocations(cp).await;
    tracing::info!(host = %host.id, "host credentials refreshed");
    Ok(Registered {
        host,
        token,
        refresh_token: refresh.token,
        cert,
    })
}

/// `POST /v1/hosts` (admin) — 201 `{host, registration_token}`.
pub async fn create(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require_admin()?;
    let (host, token) = issue_registration(&cp).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"host": host_json(&host), "registration_token": token})),
    ))
}

#[derive(Debug, Deserialize)]
pub struct RegisterBody {
    #[serde(default)]
    token: String,
    #[serde(flatten)]
    reg: HostRegistration,
}

/// `POST /v1/hosts/register` — 201 `{host, token, cert_pem, key_pem,
/// ca_cert_pem}`.
pub async fn register(
    State(cp): State<Arc<Cp>>,
    ApiJson(body): ApiJson<RegisterBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let r = register_host(&cp, &body.token, &body.reg).await?;
    Ok((StatusCode::CREATED, Json(r.json())))
}

#[derive(Debug, Deserialize)]
pub struct RefreshBody {
    refresh_token: String,
}

/// `POST /v1/hosts/auth/refresh` `{refresh_token}` — 200 with a new pair
/// and certificate, as registration answers.
pub async fn refresh(
    State(cp): State<Arc<Cp>>,
    ApiJson(body): ApiJson<RefreshBody>,
) -> ApiResult<Json<Value>> {
    Ok(Json(refresh_host(&cp, &body.refresh_token).await?.json()))
}

/// `GET /v1/hosts` (admin)
pub async fn list(State(cp): State<Arc<Cp>>, caller: Caller) -> ApiResult<Json<Vec<Value>>> {
    caller.require_admin()?;
    Ok(Json(cp.db.hosts().await?.iter().map(host_json).collect()))
}

/// `GET /v1/hosts/{id}` (admin)
pub async fn get(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let id: HostId = id
        .parse()
        .map_err(|_| ApiError::invalid("invalid host ID"))?;
    let h = cp
        .db
        .host(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(HOST_NOT_FOUND))?;
    Ok(Json(host_json(&h)))
}

/// `DELETE /v1/hosts/{id}` (admin) — 204. A host that still has capsules
/// is a 409 `host_has_capsules` listing them in a top-level `capsule_ids`
/// (where wrenn's SDK looks), unless `?force=true` (or `1`), which
/// forgets them (marked `stopped`, each with its `capsule.destroy` event;
/// their host is gone).
pub async fn delete(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    caller.require_admin()?;
    let id: HostId = id
        .parse()
        .map_err(|_| ApiError::invalid("invalid host ID"))?;
    if cp.db.host(&id).await?.is_none() {
        return Err(ApiError::not_found(HOST_NOT_FOUND));
    }
    let live = cp.db.capsules_on(&id).await?;
    let force = q.get("force").is_some_and(|v| v == "true" || v == "1");
    if !live.is_empty() && !force {
        let ids: Vec<String> = live.iter().map(|c| c.id.to_string()).collect();
        let body = json!({
            "error": {"code": "host_has_capsules", "message": format!("host has {} capsules", ids.len())},
            "capsule_ids": ids,
        });
        return Ok((StatusCode::CONFLICT, Json(body)).into_response());
    }
    for c in &live {
        let stopped = cp
            .db
            .transition(&c.id, &[], crate::model::Status::Stopped)
            .await?;
        cp.proxy_routes.evict(&c.id);
        if let Some(row) = stopped {
            let ev = crate::api::capsules::capsule_event(
                crate::events::Kind::CapsuleDestroy,
                &row,
                crate::events::Actor::key(&caller),
            );
            cp.events.publish(
                ev.meta("reason", "host_deleted")
                    .meta("from", c.status.as_str())
                    .outcome(Ok(())),
            );
        }
    }
    cp.db.delete_host(&id).await?;
    cp.hosts.forget(&id);
    reload_revocations(&cp).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A heartbeat's optional body: the agent's current facts.
#[derive(Debug, Default, Deserialize)]
pub struct HeartbeatBody {
    address: Option<String>,
    #[serde(default)]
    arch: String,
    #[serde(default)]
    cpu_cores: i64,
    #[serde(default)]
    memory_mb: i64,
    #[serde(default)]
    disk_gb: i64,
    #[serde(default)]
    agent_token: String,
    /// When the agent started (RFC 3339): another value than the last
    /// heartbeat's means it restarted.
    #[serde(default)]
    started_at: String,
}

/// Check that `X-Host-Token` is host `id`'s: 401 when missing, foreign or
/// expired (the agent refreshes), 403 for another host's, 404 for a
/// deleted host.
async fn token_of_host(cp: &Cp, headers: &HeaderMap, id: &HostId) -> ApiResult<()> {
    let presented = headers
        .get("x-host-token")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::unauthorized("missing X-Host-Token header"))?;
    let Verified {
        host: named,
        expired,
    } = cp
        .host_tokens
        .verify(presented)
        .map_err(|_| ApiError::unauthorized("invalid host token"))?;
    if !bool::from(named.as_bytes().ct_eq(id.as_str().as_bytes())) {
        return Err(ApiError::forbidden("the token is not this host's"));
    }
    // (before expiry: an agent away for a week still learns its host is
    // gone, where a refresh would only be refused)
    if cp.db.host(id).await?.is_none() {
        return Err(ApiError::not_found(HOST_NOT_FOUND));
    }
    if expired {
        return Err(ApiError::unauthorized("the host token has expired"));
    }
    Ok(())
}

/// What an agent reports of its capsules (`POST /v1/hosts/sandbox-events`).
#[derive(Debug, Deserialize)]
pub struct SandboxEvent {
    event: String,
    sandbox_id: String,
    host_id: String,
}

/// `POST /v1/hosts/sandbox-events` with `X-Host-Token` — 204. Of the events
/// wrenn's agents send, `sandbox.auto_paused` (its reaper paused an idle
/// capsule) is acted on: the capsule is `paused` now (`capsule.pause`,
/// reason `ttl_expired`), not at the next reconciliation. The others are
/// taken and left to reconciliation.
pub async fn sandbox_event(
    State(cp): State<Arc<Cp>>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SandboxEvent>,
) -> ApiResult<StatusCode> {
    let host: HostId = body
        .host_id
        .parse()
        .map_err(|_| ApiError::invalid("invalid host_id"))?;
    token_of_host(&cp, &headers, &host).await?;
    let capsule = super::capsule_id(&body.sandbox_id)?;
    match body.event.as_str() {
        "sandbox.auto_paused" => crate::reconcile::auto_paused(&cp, &host, &capsule).await,
        other => {
            tracing::debug!(event = other, capsule = %capsule, "agent event left to reconciliation")
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Connect to `host` as it is recorded now. When that is a new connection
/// (the agent restarted on another address, or with another token), the
/// proxy routes cached for the old one go: they would be refused.
fn reconnect(cp: &Cp, host: &Host) -> ApiResult<()> {
    let old = cp.hosts.get(&host.id);
    let new = cp.hosts.connect(host).map_err(ApiError::invalid)?;
    if old.is_some_and(|o| !Arc::ptr_eq(&o, &new)) {
        cp.proxy_routes.evict_host(&host.id);
    }
    Ok(())
}

/// `POST /v1/hosts/{id}/heartbeat` with `X-Host-Token` — 204; an optional
/// JSON body with the agent's facts updates its address and size. A
/// missing, foreign or expired token is 401 (the agent refreshes), another
/// host's 403, a deleted host 404.
/// A host that came back from `unreachable`, or whose agent joined,
/// moved or restarted, is reconciled at once.
pub async fn heartbeat(
    State(cp): State<Arc<Cp>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<HeartbeatBody>,
) -> ApiResult<StatusCode> {
    let id: HostId = id
        .parse()
        .map_err(|_| ApiError::invalid("invalid host ID"))?;
    token_of_host(&cp, &headers, &id).await?;
    let revived = cp.db.heartbeat(&id).await?;
    let started_at = body.started_at;
    // An agent that restarted on another address says so here.
    if let Some(address) = body.address.filter(|a| !a.is_empty()) {
        let facts = HostRegistration {
            address,
            arch: body.arch,
            cpu_cores: body.cpu_cores,
            memory_mb: body.memory_mb,
            disk_gb: body.disk_gb,
            agent_token: body.agent_token,
        };
        check_facts(&facts)?;
        if let Some(host) = cp.db.update_host(&id, &facts).await? {
            reconnect(&cp, &host)?;
        }
    }
    // (at its current address; the agent does not wait for it. Once per
    // connection and agent run: should that fail, the rounds are left to it.)
    let unreconciled = cp.hosts.get(&id).is_some_and(|h| {
        let restarted = h.restarted(&started_at);
        !h.reconciled.swap(true, Ordering::Relaxed) || restarted
    });
    if revived {
        cp.tasks
            .spawn(crate::reconcile::host_revived(cp.clone(), id));
    } else if unreconciled {
        cp.tasks
            .spawn(crate::reconcile::host_joined(cp.clone(), id));
    }
    Ok(StatusCode::NO_CONTENT)
}
