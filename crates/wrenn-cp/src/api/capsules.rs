//! Capsule lifecycle: create, list, get, destroy, pause, resume, ping.
//!
//! Create is synchronous (the agent starts a capsule in well under the
//! SDK's 30 s timeout), so it answers 201 with `status: "running"` and a
//! data-plane call right after `Capsule()` works. Destroy is idempotent.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_types::ids::{CapsuleId, TeamId, TemplateName};

use super::{host_of, owned, ApiJson};
use crate::auth::Caller;
use crate::db::{now_ms, CapsuleRow, TemplateRow};
use crate::error::{ApiError, ApiResult};
use crate::events::{Actor, Event, Kind, Resource};
use crate::model::{CapsuleJson, Status};
use crate::server::Cp;

pub const DEFAULT_TEMPLATE: &str = "minimal";
pub const MAX_VCPUS: i64 = 64;
pub const MAX_MEMORY_MB: i64 = 256 << 10;
pub const DEFAULT_DISK_MB: i64 = 5120;
/// Metadata keys the server sets once a capsule runs.
pub const RESERVED_METADATA: [&str; 4] = [
    "kernel_version",
    "vmm_version",
    "agent_version",
    "envd_version",
];

#[derive(Debug, Deserialize)]
pub struct CreateBody {
    template: Option<String>,
    vcpus: Option<i64>,
    memory_mb: Option<i64>,
    timeout_sec: Option<i64>,
    disk_size_mb: Option<i64>,
    metadata: Option<BTreeMap<String, String>>,
}

fn validate_metadata(m: &BTreeMap<String, String>) -> ApiResult<()> {
    if m.len() > 20 {
        return Err(ApiError::invalid("metadata has more than 20 keys"));
    }
    for (k, v) in m {
        if k.parse::<TemplateName>().is_err() {
            return Err(ApiError::invalid(format!("invalid metadata key {k:?}")));
        }
        if RESERVED_METADATA.contains(&k.as_str()) {
            return Err(ApiError::invalid(format!("metadata key {k:?} is reserved")));
        }
        if v.chars().count() > 64 {
            return Err(ApiError::invalid(format!(
                "metadata value of {k:?} is longer than 64 characters"
            )));
        }
    }
    Ok(())
}

pub(crate) fn capsule_event(kind: Kind, c: &CapsuleRow, actor: Actor) -> Event {
    Event::new(
        kind,
        &c.team_id,
        actor,
        Resource {
            id: c.id.to_string(),
            kind: "sandbox",
        },
    )
    .capsule(CapsuleJson::from(c))
}

/// `POST /v1/capsules`
pub async fn create(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateBody>,
) -> ApiResult<(StatusCode, Json<CapsuleJson>)> {
    let name = body.template.unwrap_or_else(|| DEFAULT_TEMPLATE.into());
    let name: TemplateName = name
        .parse()
        .map_err(|_| ApiError::invalid(format!("invalid template name {name:?}")))?;
    let mut vcpus = body.vcpus.filter(|v| *v > 0).unwrap_or(1);
    let mut memory_mb = body.memory_mb.filter(|v| *v > 0).unwrap_or(512);
    let timeout_sec = match body.timeout_sec.unwrap_or(0) {
        t if t < 0 => return Err(ApiError::invalid("timeout_sec must be 0 or more")),
        1..=59 => 60,
        t => t,
    };
    let metadata = body.metadata.unwrap_or_default();
    validate_metadata(&metadata)?;
    let template = cp
        .db
        .resolve_template(caller.team_id(), name.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("template {name} not found")))?;
    // Snapshot templates fix their size.
    if let Some(v) = template.vcpus {
        vcpus = v;
    }
    if let Some(m) = template.memory_mb {
        memory_mb = m;
    }
    if vcpus > MAX_VCPUS {
        return Err(ApiError::invalid(format!(
            "vcpus must be at most {MAX_VCPUS}"
        )));
    }
    if memory_mb > MAX_MEMORY_MB {
        return Err(ApiError::invalid(format!(
            "memory_mb must be at most {MAX_MEMORY_MB}"
        )));
    }
    let disk_size_mb = body
        .disk_size_mb
        .filter(|d| *d > 0)
        .unwrap_or(DEFAULT_DISK_MB);
    let spec = Launch {
        template: &template,
        vcpus,
        memory_mb,
        timeout_sec,
        disk_size_mb,
        metadata,
    };
    let running = launch(&cp, caller.team_id(), Actor::key(&caller), spec).await?;
    Ok((StatusCode::CREATED, Json(CapsuleJson::from(&running))))
}

/// What a capsule is made of (validated).
#[derive(Debug)]
pub struct Launch<'a> {
    pub template: &'a TemplateRow,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub timeout_sec: i64,
    pub disk_size_mb: i64,
    pub metadata: BTreeMap<String, String>,
}

/// Place, record and start a capsule for `team`; it is `running` when
/// this returns. (The API's create and template builds both use it.)
pub async fn launch(
    cp: &Cp,
    team: &TeamId,
    actor: Actor,
    spec: Launch<'_>,
) -> ApiResult<CapsuleRow> {
    let Launch {
        template,
        vcpus,
        memory_mb,
        timeout_sec,
        disk_size_mb,
        metadata,
    } = spec;
    // Placement and the insert happen under one lock so that two creates
    // cannot both take a host's last room.
    let (row, host) = {
        let _placing = cp.placing.lock().await;
        let host = cp
            .hosts
            .place(&cp.db, vcpus, memory_mb, template.host_id.as_ref())
            .await?;
        let now = now_ms();
        let row = CapsuleRow {
            id: CapsuleId::random(),
            team_id: team.clone(),
            host_id: Some(host.id.clone()),
            template: template.name.clone(),
            agent_template: template.agent_name.clone(),
            status: Status::Starting,
            vcpus,
            memory_mb,
            timeout_sec,
            disk_size_mb,
            metadata: metadata.clone(),
            created_at: now,
            started_at: None,
            last_active_at: None,
            last_updated: now,
        };
        cp.creating.lock().unwrap().insert(row.id.clone());
        if let Err(e) = cp.db.insert_capsule(&row).await {
            cp.creating.lock().unwrap().remove(&row.id);
            return Err(e.into());
        }
        (row, host)
    };
    let result = start(cp, actor, row.clone(), host, template, metadata).await;
    cp.creating.lock().unwrap().remove(&row.id);
    result
}

/// The agent half of a create: the row exists (`starting`).
async fn start(
    cp: &Cp,
    actor: Actor,
    row: CapsuleRow,
    host: Arc<crate::hosts::HostConn>,
    template: &TemplateRow,
    metadata: BTreeMap<String, String>,
) -> ApiResult<CapsuleRow> {
    let (vcpus, memory_mb, timeout_sec) = (row.vcpus, row.memory_mb, row.timeout_sec);
    let req = pb::CreateCapsuleRequest {
        id: row.id.to_string(),
        template: template.agent_name.clone(),
        vcpus: vcpus as u32,
        memory_mb: memory_mb as u64,
        timeout_sec: timeout_sec as u64,
        destroy_on_timeout: false,
        metadata: metadata.clone().into_iter().collect(),
        default_user: template.default_user.clone(),
        ..Default::default()
    };
    let started = match host.rpc.create_capsule(req).await {
        Ok(r) => r.into_owned(),
        Err(e) => {
            let err = ApiError::agent(&e);
            let failed = cp
                .db
                .transition(&row.id, &[], Status::Error)
                .await?
                .unwrap_or(row);
            cp.events.publish(
                capsule_event(Kind::CapsuleCreate, &failed, actor)
                    .outcome(Err(err.message.clone())),
            );
            return Err(err);
        }
    };
    let mut meta = metadata;
    meta.insert("agent_version".into(), env!("CARGO_PKG_VERSION").into());
    meta.insert("envd_version".into(), env!("CARGO_PKG_VERSION").into());
    if !started.runtime.is_empty() {
        meta.insert("vmm_version".into(), started.runtime.clone());
    }
    cp.db.set_capsule_metadata(&row.id, &meta).await?;
    let running = cp
        .db
        .transition(&row.id, &[Status::Starting], Status::Running)
        .await?
        .ok_or_else(ApiError::capsule_not_found)?;
    cp.events
        .publish(capsule_event(Kind::CapsuleCreate, &running, actor).outcome(Ok(())));
    Ok(running)
}

/// `GET /v1/capsules`
pub async fn list(State(cp): State<Arc<Cp>>, caller: Caller) -> ApiResult<Json<Vec<CapsuleJson>>> {
    let rows = cp.db.capsules(caller.team_id()).await?;
    Ok(Json(rows.iter().map(CapsuleJson::from).collect()))
}

/// `GET /v1/capsules/{id}`
pub async fn get(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<CapsuleJson>> {
    let c = owned(&cp, &caller, &id).await?;
    let mut json = CapsuleJson::from(&c);
    if c.status == Status::Running {
        if let Ok(host) = host_of(&cp, &c) {
            if let Ok(m) = host.rpc.get_metrics(cref(&c.id)).await {
                json.disk_used_mb = Some((m.into_owned().disk_bytes >> 20) as i64);
            }
        }
    }
    Ok(Json(json))
}

pub(crate) fn cref(id: &CapsuleId) -> pb::CapsuleRef {
    pb::CapsuleRef {
        id: id.to_string(),
        ..Default::default()
    }
}

/// `DELETE /v1/capsules/{id}` — idempotent: a stopped capsule answers 204.
pub async fn destroy(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let c = owned(&cp, &caller, &id).await?;
    if c.status == Status::Stopped {
        return Ok(StatusCode::NO_CONTENT);
    }
    if let Some(host) = c.host_id.as_ref().and_then(|h| cp.hosts.get(h)) {
        match host.rpc.destroy_capsule(cref(&c.id)).await {
            Ok(_) => {}
            Err(e) if e.code == connectrpc::ErrorCode::NotFound => {}
            Err(e) => return Err(ApiError::agent(&e)),
        }
    } else if c.host_id.is_some() && c.status != Status::Error {
        return Err(ApiError::host_unavailable(
            "the capsule's host is not reachable",
        ));
    }
    if let Some(stopped) = cp.db.transition(&c.id, &[], Status::Stopped).await? {
        cp.proxy_routes.evict(&c.id);
        crate::api::snapshots::collect_layers(&cp, &c.agent_template).await;
        cp.events.publish(
            capsule_event(Kind::CapsuleDestroy, &stopped, Actor::key(&caller)).outcome(Ok(())),
        );
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/capsules/{id}/pause`
pub async fn pause(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<CapsuleJson>> {
    let (c, host) = super::running(&cp, &caller, &id).await?;
    crate::api::stats::flush_metrics(&cp, &host, &c).await;
    if let Err(e) = host.rpc.pause_capsule(cref(&c.id)).await {
        let err = super::refresh_after(&cp, &c, &host, ApiError::agent(&e)).await;
        cp.events.publish(
            capsule_event(Kind::CapsulePause, &c, Actor::key(&caller))
                .outcome(Err(err.message.clone())),
        );
        return Err(err);
    }
    let paused = cp
        .db
        .transition(&c.id, &[Status::Running], Status::Paused)
        .await?
        .ok_or_else(|| ApiError::conflict("the capsule changed state during pause"))?;
    cp.events
        .publish(capsule_event(Kind::CapsulePause, &paused, Actor::key(&caller)).outcome(Ok(())));
    Ok(Json(CapsuleJson::from(&paused)))
}

/// `POST /v1/capsules/{id}/resume`
pub async fn resume(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<CapsuleJson>> {
    let c = owned(&cp, &caller, &id).await?;
    if c.status != Status::Paused {
        return Err(ApiError::invalid_state(format!(
            "capsule is not paused (status: {})",
            c.status
        )));
    }
    let host = host_of(&cp, &c)?;
    if let Err(e) = host.rpc.resume_capsule(cref(&c.id)).await {
        let err = super::refresh_after(&cp, &c, &host, ApiError::agent(&e)).await;
        cp.events.publish(
            capsule_event(Kind::CapsuleResume, &c, Actor::key(&caller))
                .outcome(Err(err.message.clone())),
        );
        return Err(err);
    }
    let resumed = cp
        .db
        .transition(&c.id, &[Status::Paused], Status::Running)
        .await?
        .ok_or_else(|| ApiError::conflict("the capsule changed state during resume"))?;
    cp.events
        .publish(capsule_event(Kind::CapsuleResume, &resumed, Actor::key(&caller)).outcome(Ok(())));
    Ok(Json(CapsuleJson::from(&resumed)))
}

/// `POST /v1/capsules/{id}/ping` — resets the inactivity timer; 204.
pub async fn ping(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let (c, host) = super::running(&cp, &caller, &id).await?;
    let req = pb::PingRequest {
        id: c.id.to_string(),
        ..Default::default()
    };
    if let Err(e) = host.rpc.ping_capsule(req).await {
        return Err(super::refresh_after(&cp, &c, &host, ApiError::agent(&e)).await);
    }
    cp.db.touch_capsule(&c.id).await?;
    Ok(StatusCode::NO_CONTENT)
}
