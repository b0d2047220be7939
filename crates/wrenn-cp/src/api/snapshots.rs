//! Snapshots (templates): `POST /v1/snapshots` turns a running or paused
//! capsule into a team template (its writable layer stacked on its
//! template's), `GET` lists the team's and the platform's templates,
//! `DELETE` removes one of the team's.
//!
//! On the host a team template is stored under a generated name
//! (`s-<random>`), so two teams can use the same template name, and a
//! name can be deleted or overwritten while capsules made from it run.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_types::ids::{HostId, TemplateName};

use super::{capsule_id, host_of, ApiJson, Path, Query};
use crate::auth::{random_hex, Caller};
use crate::db::{now_ms, platform_team, CapsuleRow, TemplateRow};
use crate::error::{ApiError, ApiResult};
use crate::events::{Actor, Event, Kind, Resource};
use crate::hosts::HostConn;
use crate::model::{Status, TemplateJson};
use crate::server::Cp;

pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(55);
/// A VM capsule's snapshot writes its memory out and flattens its disk.
pub const VM_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Deserialize)]
pub struct CreateBody {
    #[serde(default)]
    sandbox_id: String,
    name: Option<String>,
}

fn template_event(kind: Kind, t: &TemplateRow, caller: &Caller) -> Event {
    Event::new(
        kind,
        &t.team_id,
        Actor::key(caller),
        Resource {
            id: t.name.clone(),
            kind: "template",
        },
    )
}

/// Delete a team template: the name is freed now;
/// the host-side layers go now or, while capsules made from them still
/// run, when the last of them is destroyed ([`collect_layers`]).
async fn retire(cp: &Cp, t: &TemplateRow) -> ApiResult<()> {
    cp.db.delete_template(&t.team_id, &t.name).await?;
    collect_layers(cp, &t.agent_name).await;
    Ok(())
}

/// Delete a team template's host-side layers once nothing names them: no
/// template row and no capsule that is not stopped. Best effort (a later
/// destroy or delete tries again).
pub async fn collect_layers(cp: &Cp, agent_name: &str) {
    collect_layers_on(cp, agent_name, &cp.hosts.all()).await
}

/// [`collect_layers`] on `hosts` only.
pub async fn collect_layers_on(cp: &Cp, agent_name: &str, hosts: &[Arc<HostConn>]) {
    if !agent_name.starts_with("s-") {
        return; // platform templates are never collected
    }
    match (
        cp.db.template_users(agent_name).await,
        cp.db.template_named_on_host(agent_name).await,
    ) {
        (Ok(0), Ok(false)) => {}
        _ => return,
    }
    for host in hosts {
        // (the next destroy, delete or reconciler round). Asked again under
        // the copies' lock of the layer, which a copy holds while it looks
        // for the layer there: one that starts after the first answer
        // must not find the layer, count it as copied and go on to the
        // layer above, then lose it to this drop. A copy holding the lock
        // is in `being_copied`: the first answer skips it, never waits.
        if crate::copies::being_copied(cp, agent_name, &host.id) {
            continue;
        }
        let _one = cp
            .copying
            .lock(&(agent_name.to_owned(), host.id.clone()))
            .await;
        if crate::copies::being_copied(cp, agent_name, &host.id) {
            continue;
        }
        match host.drop_template(agent_name).await {
            Ok(()) => {
                if let Err(e) = cp.db.drop_template_copy(agent_name, Some(&host.id)).await {
                    tracing::warn!(template = agent_name, error = %e, "copy row stays");
                }
            }
            Err(e) => {
                tracing::debug!(template = agent_name, error = %e, "layers not collected yet")
            }
        }
    }
}

/// `POST /v1/snapshots[?overwrite=true]` — 201 with the template.
pub async fn create(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
    ApiJson(body): ApiJson<CreateBody>,
) -> ApiResult<(StatusCode, Json<TemplateJson>)> {
    let overwrite = q.get("overwrite").is_some_and(|v| v == "true" || v == "1");
    let id = capsule_id(&body.sandbox_id)?;
    let name = match body.name.filter(|n| !n.is_empty()) {
        Some(n) => n
            .parse::<TemplateName>()
            .map_err(|_| ApiError::invalid(format!("invalid snapshot name {n:?}")))?,
        None => format!("template-{}", random_hex(4))
            .parse()
            .map_err(|_| ApiError::internal())?,
    };
    let c = cp
        .db
        .capsule(caller.team_id(), &id)
        .await?
        .ok_or_else(ApiError::capsule_not_found)?;
    snapshottable(&c)?;
    // (the platform's names, and the alias that stands for one of them)
    let alias = name.as_str() == super::capsules::DEFAULT_TEMPLATE_ALIAS;
    if alias
        || cp
            .db
            .own_template(&platform_team(), name.as_str())
            .await?
            .is_some()
    {
        return Err(ApiError::conflict(format!("the name {name} is reserved")));
    }
    // Overwritten only once the new one is recorded: a snapshot that fails
    // leaves the old template as it was. (Asked again under the name's
    // lock below: this early answer spares a snapshot bound to fail.)
    if !overwrite
        && cp
            .db
            .own_template(caller.team_id(), name.as_str())
            .await?
            .is_some()
    {
        return Err(exists(&name));
    }
    let agent_name = format!("s-{}", random_hex(12));
    // The rest runs on its own, under the capsule's lock: a client that
    // gives up (a VM's snapshot can outlast an SDK's timeout) still gets
    // its template recorded.
    let row = super::capsules::locked(&cp, &c, move |cp, now| {
        async move {
            let c = now.ok_or_else(ApiError::capsule_not_found)?;
            snapshottable(&c)?;
            let key = (caller.team_id().clone(), name.to_string());
            let _name = cp.template_names.lock(&key).await;
            let replacing = match cp.db.own_template(caller.team_id(), name.as_str()).await? {
                Some(_) if !overwrite => return Err(exists(&name)),
                old => old.map(|t| t.agent_name),
            };
            let host = host_of(&cp, &c)?;
            let req = pb::SnapshotRequest {
                id: c.id.to_string(),
                name: agent_name.clone(),
                ..Default::default()
            };
            let vm = c.metadata.get("engine").is_some_and(|e| e == "vm");
            let timeout = if vm {
                VM_SNAPSHOT_TIMEOUT
            } else {
                SNAPSHOT_TIMEOUT
            };
            let opts = connectrpc::client::CallOptions::default().with_timeout(timeout);
            if c.status == Status::Running {
                crate::api::stats::flush_metrics(&cp, &host, &c).await;
            }
            // (its own name: nobody else claims it)
            let _taking = cp.snapshotting.claim(agent_name.clone());
            let row = record_snapshot(&cp, &caller, c, host, req, opts, name, agent_name).await?;
            if let Some(old) = replacing {
                collect_layers(&cp, &old).await; // (no row names them now)
            }
            Ok::<_, ApiError>(row)
        }
    })
    .await?;
    Ok((StatusCode::CREATED, Json(TemplateJson::from(&row))))
}

/// Only a running or paused capsule can be snapshotted.
fn snapshottable(c: &CapsuleRow) -> ApiResult<()> {
    if matches!(c.status, Status::Running | Status::Paused) {
        return Ok(());
    }
    Err(ApiError::invalid_state(format!(
        "capsule is not running or paused (status: {})",
        c.status
    )))
}

/// A snapshot's name is taken and `overwrite` was not asked for: 409.
fn exists(name: &TemplateName) -> ApiError {
    ApiError::conflict(format!(
        "template {name} exists (pass overwrite=true to replace it)"
    ))
}

/// Take the snapshot on the agent and record the template.
#[allow(clippy::too_many_arguments)]
async fn record_snapshot(
    cp: &Cp,
    caller: &Caller,
    c: CapsuleRow,
    host: Arc<HostConn>,
    req: pb::SnapshotRequest,
    opts: connectrpc::client::CallOptions,
    name: TemplateName,
    agent_name: String,
) -> ApiResult<TemplateRow> {
    let made = match host.rpc.create_snapshot_with_options(req, opts).await {
        Ok(t) => t.into_owned(),
        Err(e) => return Err(super::refresh_after(cp, &c, &host, ApiError::agent(&e)).await),
    };
    // The agent leaves the capsule frozen; a running one goes back to
    // running (a live snapshot, as wrenn 0.2 does).
    if c.status == Status::Running {
        if let Err(e) = host.rpc.resume_capsule(super::capsules::cref(&c.id)).await {
            tracing::warn!(capsule = %c.id, error = %e, "resume after snapshot failed");
            crate::reconcile::refresh_capsule(cp, &host, &c).await;
        }
    }
    let row = TemplateRow {
        team_id: caller.team_id().clone(),
        name: name.to_string(),
        agent_name,
        kind: "snapshot".into(),
        host_id: Some(host.id.clone()),
        vcpus: Some(c.vcpus),
        memory_mb: Some(c.memory_mb),
        size_bytes: made.size_bytes as i64,
        default_user: made.default_user,
        protected: false,
        metadata: BTreeMap::from([("source_capsule".to_owned(), c.id.to_string())]),
        created_at: now_ms(),
    };
    cp.db.put_template(&row).await?; // (replaces an overwritten one's row)
    cp.events
        .publish(template_event(Kind::SnapshotCreate, &row, caller).outcome(Ok(())));
    Ok(row)
}

/// `GET /v1/snapshots?type=base|snapshot` — an unknown type lists nothing.
pub async fn list(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Vec<TemplateJson>>> {
    let want = q.get("type").filter(|t| !t.is_empty());
    let rows = cp.db.templates(caller.team_id()).await?;
    Ok(Json(
        rows.iter()
            .filter(|t| want.is_none_or(|w| *w == t.kind))
            .map(TemplateJson::from)
            .collect(),
    ))
}

/// `GET /v1/admin/templates` (admin team): the platform's templates.
pub async fn admin_list(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
) -> ApiResult<Json<Vec<TemplateJson>>> {
    caller.require_admin()?;
    let team = platform_team();
    let rows = cp.db.templates(&team).await?;
    Ok(Json(rows.iter().map(TemplateJson::from).collect()))
}

/// `DELETE /v1/admin/templates/{name}` (admin team) — 204: a platform
/// template built from a recipe, with its layers on its host, at once. Not
/// while a capsule (or a build) uses it or a template stands on it (409:
/// its layers are shared, and a rebuild of the name needs them gone), nor
/// a built-in one (`wrenn up`'s: `minimal`, `busybox`, `base`, the code
/// runner's: 403).
pub async fn admin_delete(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let name: TemplateName = name
        .parse()
        .map_err(|_| ApiError::invalid(format!("invalid template name {name:?}")))?;
    let team = platform_team();
    let _name = cp
        .template_names
        .lock(&(team.clone(), name.to_string()))
        .await;
    let t = cp
        .db
        .own_template(&team, name.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("platform template {name} not found")))?;
    if t.protected {
        return Err(ApiError::forbidden(format!(
            "platform template {name} is built in (wrenn up makes it; other templates and \
             SDKs rely on it)"
        )));
    }
    let users = cp.db.template_users(&t.agent_name).await?;
    if users > 0 {
        return Err(ApiError::conflict(format!(
            "template {name} is used by {users} capsule(s): destroy them first"
        )));
    }
    // Its copies first, then its own files. Every host that has it must
    // answer (one away would keep files that a template stacked there
    // needs, and a rebuilt name would meet them), and none may use it:
    // one that does refuses (409), and what the hosts before it removed is
    // forgotten as it goes, so no copy row outlives its files.
    let unreachable = |h: &HostId| {
        ApiError::host_unavailable(format!(
            "host {h}, which has template {name}'s files, is not reachable; the template stays"
        ))
    };
    let mut copies = Vec::new();
    for h in cp.db.template_copies(&t.agent_name).await? {
        copies.push(cp.hosts.get(&h).ok_or_else(|| unreachable(&h))?);
    }
    let made = match &t.host_id {
        Some(h) => vec![cp.hosts.get(h).ok_or_else(|| unreachable(h))?],
        None => cp.hosts.all(),
    };
    for host in copies.iter().chain(&made) {
        if let Err(e) = host.drop_template(&t.agent_name).await {
            return Err(match e.code {
                // (used there by a capsule, or stacked on by a template)
                connectrpc::ErrorCode::InvalidArgument
                | connectrpc::ErrorCode::FailedPrecondition => {
                    ApiError::conflict(e.message.unwrap_or_default())
                }
                _ => ApiError::agent(&e),
            });
        }
        cp.db
            .drop_template_copy(&t.agent_name, Some(&host.id))
            .await?;
    }
    cp.db.delete_template(&team, name.as_str()).await?;
    cp.db.drop_template_copy(&t.agent_name, None).await?;
    // (to the admin team: nobody listens as the platform team)
    let seen = TemplateRow {
        team_id: caller.team_id().clone(),
        ..t
    };
    cp.events
        .publish(template_event(Kind::SnapshotDelete, &seen, &caller).outcome(Ok(())));
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v1/snapshots/{name}` — 204.
pub async fn delete(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let name: TemplateName = name
        .parse()
        .map_err(|_| ApiError::invalid(format!("invalid template name {name:?}")))?;
    // (a snapshot overwriting the name finishes first, or starts after)
    let key = (caller.team_id().clone(), name.to_string());
    let _name = cp.template_names.lock(&key).await;
    match cp.db.own_template(caller.team_id(), name.as_str()).await? {
        Some(t) => {
            retire(&cp, &t).await?;
            cp.events
                .publish(template_event(Kind::SnapshotDelete, &t, &caller).outcome(Ok(())));
            Ok(StatusCode::NO_CONTENT)
        }
        None if cp
            .db
            .own_template(&platform_team(), name.as_str())
            .await?
            .is_some() =>
        {
            Err(ApiError::forbidden(format!(
                "template {name} is a platform template (the admin team deletes it: \
                 DELETE /v1/admin/templates/{name})"
            )))
        }
        None => Err(ApiError::not_found(format!("template {name} not found"))),
    }
}
