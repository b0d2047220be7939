//! Capsule lifecycle: create, list, get, destroy, pause, resume, ping.
//!
//! Create is synchronous (the agent starts a capsule in well under the
//! SDK's 30 s timeout), so it answers 201 with `status: "running"` and a
//! data-plane call right after `Capsule()` works. Destroy is idempotent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_types::hosts::{MAX_TIMEOUT_SEC, MIN_MEMORY_MB};
use wrenn_types::ids::{CapsuleId, HostId, TeamId, TemplateName};

use super::{host_of, owned, ApiJson, Path};
use crate::auth::Caller;
use crate::db::{now_ms, CapsuleRow, OnTimeout, TemplateRow};
use crate::error::{ApiError, ApiResult};
use crate::events::{Actor, Event, Kind, Resource};
use crate::hosts::Holders;
use crate::model::{CapsuleJson, Status};
use crate::server::Cp;

pub const DEFAULT_TEMPLATE: &str = "minimal";
/// wrenn 0.2's name for its default template, which the SDK's own examples
/// create: it stands for [`DEFAULT_TEMPLATE`] unless the team has a
/// template of that name.
pub const DEFAULT_TEMPLATE_ALIAS: &str = "minimal-ubuntu";
/// How long `GET /v1/capsules/{id}` waits for the agent's disk figure
/// before answering without it (the SDK's wait loops poll this).
const DISK_FIGURE_WAIT: Duration = Duration::from_secs(2);
pub const MAX_VCPUS: i64 = 64;
pub const MAX_MEMORY_MB: i64 = 256 << 10;
pub const DEFAULT_DISK_MB: i64 = 5120;
pub const MAX_DISK_MB: i64 = 1 << 20;
/// What a create's `engine` may say.
pub const ENGINES: [&str; 2] = ["oci", "vm"];
/// Metadata keys the server sets once a capsule runs.
pub const RESERVED_METADATA: [&str; 5] = [
    "kernel_version",
    "vmm_version",
    "agent_version",
    "envd_version",
    "engine",
];

#[derive(Debug, Deserialize)]
pub struct CreateBody {
    template: Option<String>,
    vcpus: Option<i64>,
    memory_mb: Option<i64>,
    timeout_sec: Option<i64>,
    disk_size_mb: Option<i64>,
    metadata: Option<BTreeMap<String, String>>,
    /// Our extension (the `wrenn` command's `--env`): environment of every
    /// process in the capsule.
    envs: Option<BTreeMap<String, String>>,
    /// Our extension (`--no-internet`): false cuts egress.
    internet: Option<bool>,
    /// Our extension (`--engine`): `oci` (a container) or `vm` (a microVM);
    /// the template's default when absent.
    engine: Option<String>,
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

/// A line in a capsule's log (E2B's sandbox logs). Best effort: a failed
/// write is only traced.
pub(crate) async fn log(cp: &Cp, id: &CapsuleId, level: &str, message: impl AsRef<str>) {
    if let Err(e) = cp.db.add_log(id, level, message.as_ref()).await {
        tracing::warn!(capsule = %id, error = %e, "cannot write the capsule's log");
    }
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
    let env = body.envs.unwrap_or_default();
    if let Some(k) = env.keys().find(|k| k.is_empty() || k.contains(['=', '\0'])) {
        return Err(ApiError::invalid(format!(
            "invalid environment variable name {k:?}"
        )));
    }
    let mut template = cp
        .db
        .resolve_template(caller.team_id(), name.as_str())
        .await?;
    if template.is_none() && name.as_str() == DEFAULT_TEMPLATE_ALIAS {
        template = cp
            .db
            .resolve_template(caller.team_id(), DEFAULT_TEMPLATE)
            .await?;
    }
    let template = template.ok_or_else(|| missing_template(&cp, name.as_str()))?;
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
    // (what the agent would refuse, refused before a row is written)
    if memory_mb < MIN_MEMORY_MB as i64 {
        return Err(ApiError::invalid(format!(
            "memory_mb must be at least {MIN_MEMORY_MB}"
        )));
    }
    if timeout_sec > MAX_TIMEOUT_SEC as i64 {
        return Err(ApiError::invalid(format!(
            "timeout_sec must be at most {MAX_TIMEOUT_SEC}"
        )));
    }
    if body.disk_size_mb.is_some_and(|d| d > MAX_DISK_MB) {
        return Err(ApiError::invalid(format!(
            "disk_size_mb must be at most {MAX_DISK_MB}"
        )));
    }
    if let Some(e) = body.engine.as_deref() {
        if !ENGINES.contains(&e) {
            return Err(ApiError::invalid(format!(
                "engine must be \"oci\" or \"vm\", not {e:?}"
            )));
        }
    }
    let disk_size_mb = body
        .disk_size_mb
        .filter(|d| *d > 0)
        .unwrap_or(DEFAULT_DISK_MB);
    let spec = Launch {
        vcpus,
        memory_mb,
        timeout_sec,
        disk_size_mb,
        metadata,
        env,
        internet: body.internet,
        engine: body.engine.clone(),
        ..Launch::new(&template)
    };
    let running = launch(&cp, caller.team_id(), Actor::key(&caller), spec).await?;
    Ok((StatusCode::CREATED, Json(CapsuleJson::from(&running))))
}

/// No template `name`: 404, or 503 while `wrenn up` is still building it.
pub fn missing_template(cp: &Cp, name: &str) -> ApiError {
    let alias_of_building = name == DEFAULT_TEMPLATE_ALIAS && cp.is_building(DEFAULT_TEMPLATE);
    if cp.is_building(name) || alias_of_building {
        ApiError::host_unavailable(format!(
            "template {name} is still being built (GET /health shows the progress)"
        ))
    } else {
        ApiError::not_found(format!("template {name} not found"))
    }
}

/// What a capsule is made of (validated).
#[derive(Debug)]
pub struct Launch {
    pub id: CapsuleId,
    pub template: TemplateRow,
    pub vcpus: i64,
    pub memory_mb: i64,
    /// The agent's inactivity TTL (0: none).
    pub timeout_sec: i64,
    pub disk_size_mb: i64,
    pub metadata: BTreeMap<String, String>,
    /// Environment of every process in the capsule.
    pub env: BTreeMap<String, String>,
    /// Internet access as asked for; `None`: not asked (on).
    pub internet: Option<bool>,
    /// `oci` or `vm` (validated); `None`: the template's.
    pub engine: Option<String>,
    /// An absolute deadline (Unix ms) kept by the control plane.
    pub end_at: Option<i64>,
    pub on_timeout: OnTimeout,
    /// Whether the metadata also goes to envd (wrenn: as environment
    /// variables and files; E2B's metadata stays in the control plane).
    pub metadata_to_envd: bool,
}

impl Launch {
    /// The template's defaults: 1 vCPU, 512 MiB, no timeout.
    pub fn new(template: &TemplateRow) -> Self {
        Launch {
            id: CapsuleId::random(),
            template: template.clone(),
            vcpus: template.vcpus.unwrap_or(1),
            memory_mb: template.memory_mb.unwrap_or(512),
            timeout_sec: 0,
            disk_size_mb: DEFAULT_DISK_MB,
            metadata: BTreeMap::new(),
            env: BTreeMap::new(),
            internet: None,
            engine: None,
            end_at: None,
            on_timeout: OnTimeout::Kill,
            metadata_to_envd: true,
        }
    }
}

/// Place, record and start a capsule for `team`; it is `running` when
/// this returns. (The API's create and template builds both use it.) It
/// runs to its end even if the caller gives up ([`Cp::to_completion`]).
pub async fn launch(cp: &Cp, team: &TeamId, actor: Actor, spec: Launch) -> ApiResult<CapsuleRow> {
    let team = team.clone();
    cp.to_completion(move |cp| async move { launch_now(&cp, &team, actor, spec).await })
        .await
}

async fn launch_now(cp: &Cp, team: &TeamId, actor: Actor, spec: Launch) -> ApiResult<CapsuleRow> {
    let Launch {
        id,
        template,
        vcpus,
        memory_mb,
        timeout_sec,
        disk_size_mb,
        metadata,
        env,
        internet,
        engine,
        end_at,
        on_timeout,
        metadata_to_envd,
    } = spec;
    let holders = crate::copies::holders(cp, &template).await?;
    let avoid = crate::copies::avoided(cp, &template.agent_name);
    // Placement and the insert happen under one lock so that two creates
    // (of this control plane or of any sharing its database) cannot both
    // take a host's last room.
    let (mut row, host) = {
        let _placing = cp.placing().await?;
        let host = cp
            .hosts
            .place(
                &cp.db,
                vcpus,
                memory_mb,
                holders.as_deref(),
                Holders::Prefer,
                &avoid,
            )
            .await?;
        let now = now_ms();
        let row = CapsuleRow {
            id,
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
            access_token: crate::auth::random_hex(24),
            end_at,
            on_timeout,
            allow_internet: internet,
            created_by: Some(cp.identity().to_owned()),
        };
        cp.creating.lock().unwrap().insert(row.id.clone());
        if let Err(e) = cp.db.insert_capsule(&row).await {
            cp.creating.lock().unwrap().remove(&row.id);
            return Err(e.into());
        }
        (row, host)
    };
    let extra = Extra {
        env,
        internet: internet.unwrap_or(true),
        engine,
        metadata_to_envd,
    };
    // A host without the template's files gets a copy now (the row, still
    // `starting`, keeps the template from being deleted meanwhile); if
    // that fails, the capsule moves to a host that has them.
    let placed = match crate::copies::ensure(cp, &template, holders.as_deref(), &host).await {
        Ok(()) => Ok(host),
        Err(e) => move_to_files(cp, &mut row, &template, holders.as_deref(), e).await,
    };
    let result = match placed {
        Ok(host) => start(cp, actor, row.clone(), host, &template, extra).await,
        Err(e) => Err(create_failed(cp, actor, row.clone(), e).await),
    };
    cp.creating.lock().unwrap().remove(&row.id);
    result
}

/// A copy of `template` to `row`'s host failed (`failed`): place it again,
/// on a host that has the files (for a template of every host, any other
/// host, which may need a copy too). `failed` is the answer if none can
/// take it.
async fn move_to_files(
    cp: &Cp,
    row: &mut CapsuleRow,
    template: &TemplateRow,
    holders: Option<&[HostId]>,
    failed: ApiError,
) -> ApiResult<Arc<crate::hosts::HostConn>> {
    tracing::warn!(capsule = %row.id, error = %failed.message, "placing again, where the template is");
    let host = {
        let _placing = cp.placing().await?;
        let avoid = crate::copies::avoided(cp, &template.agent_name);
        let Ok(host) = cp
            .hosts
            .place(
                &cp.db,
                row.vcpus,
                row.memory_mb,
                holders,
                Holders::Only,
                &avoid,
            )
            .await
        else {
            return Err(failed);
        };
        if !cp.db.set_capsule_host(&row.id, &host.id).await? {
            return Err(ApiError::capsule_not_found()); // (destroyed meanwhile)
        }
        host
    };
    row.host_id = Some(host.id.clone());
    crate::copies::ensure(cp, template, holders, &host).await?;
    Ok(host)
}

/// A create that failed after its row was recorded: the row is `error`
/// (logged, published); the error to answer. A row destroyed meanwhile
/// stays `stopped`.
async fn create_failed(cp: &Cp, actor: Actor, row: CapsuleRow, err: ApiError) -> ApiError {
    log(
        cp,
        &row.id,
        "error",
        format!("create failed: {}", err.message),
    )
    .await;
    let failed = match cp
        .db
        .transition(&row.id, &[Status::Starting], Status::Error)
        .await
    {
        Ok(Some(failed)) => failed,
        Ok(None) => return err,
        Err(e) => return e.into(),
    };
    cp.events.publish(
        capsule_event(Kind::CapsuleCreate, &failed, actor).outcome(Err(err.message.clone())),
    );
    err
}

/// What the agent gets beyond the row.
#[derive(Debug)]
struct Extra {
    env: BTreeMap<String, String>,
    internet: bool,
    engine: Option<String>,
    metadata_to_envd: bool,
}

/// The agent half of a create: the row exists (`starting`).
async fn start(
    cp: &Cp,
    actor: Actor,
    row: CapsuleRow,
    host: Arc<crate::hosts::HostConn>,
    template: &TemplateRow,
    extra: Extra,
) -> ApiResult<CapsuleRow> {
    let metadata = row.metadata.clone();
    let to_envd = if extra.metadata_to_envd {
        metadata.clone().into_iter().collect()
    } else {
        Default::default()
    };
    let req = pb::CreateCapsuleRequest {
        id: row.id.to_string(),
        template: template.agent_name.clone(),
        vcpus: row.vcpus as u32,
        memory_mb: row.memory_mb as u64,
        timeout_sec: row.timeout_sec as u64,
        destroy_on_timeout: false,
        no_internet: !extra.internet,
        env: extra.env.into_iter().collect(),
        metadata: to_envd,
        default_user: template.default_user.clone(),
        access_token: row.access_token.clone(),
        engine: extra.engine.unwrap_or_default(),
        ..Default::default()
    };
    let started = match host.rpc.create_capsule(req).await {
        Ok(r) => r.into_owned(),
        Err(e) => return Err(create_failed(cp, actor, row, ApiError::agent_placing(&e)).await),
    };
    let mut meta = metadata;
    meta.insert("agent_version".into(), env!("CARGO_PKG_VERSION").into());
    meta.insert("envd_version".into(), env!("CARGO_PKG_VERSION").into());
    if !started.runtime.is_empty() {
        meta.insert("vmm_version".into(), started.runtime.clone());
    }
    if !started.engine.is_empty() {
        meta.insert("engine".into(), started.engine.clone());
    }
    cp.db.set_capsule_metadata(&row.id, &meta).await?;
    let Some(running) = cp
        .db
        .transition(&row.id, &[Status::Starting], Status::Running)
        .await?
    else {
        // Destroyed while it was made (its host's copy of the template
        // can take minutes): what the agent made goes too.
        if let Err(e) = host.destroy(&row.id).await {
            tracing::warn!(capsule = %row.id, error = %e, "cannot destroy a capsule destroyed while made");
        }
        return Err(ApiError::capsule_not_found());
    };
    let msg = format!(
        "started from template {} ({} vCPU, {} MiB) on {}",
        running.template, running.vcpus, running.memory_mb, host.id
    );
    log(cp, &running.id, "info", msg).await;
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
            let asked = host.rpc.get_metrics(cref(&c.id));
            if let Ok(Ok(m)) = tokio::time::timeout(DISK_FIGURE_WAIT, asked).await {
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
    destroy_capsule(&cp, &c, Actor::key(&caller)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `c` as it is now, read under its lifecycle lock; `None` once gone.
pub(crate) async fn reread(cp: &Cp, c: &CapsuleRow) -> ApiResult<Option<CapsuleRow>> {
    Ok(cp.db.capsule(&c.team_id, &c.id).await?)
}

/// Run `work` on `c` as read again under its lifecycle lock (`None` once
/// gone), to its end ([`Cp::to_completion`]): an operation that raced
/// another acts on the state the other left, and finishes even if its
/// client hangs up.
pub(crate) async fn locked<T, E, F>(
    cp: &Cp,
    c: &CapsuleRow,
    work: impl FnOnce(Arc<Cp>, Option<CapsuleRow>) -> F + Send + 'static,
) -> Result<T, E>
where
    F: std::future::Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: From<ApiError> + Send + 'static,
{
    let c = c.clone();
    cp.to_completion(move |cp| async move {
        let _lock = cp.lifecycle.lock(&c.id).await;
        let now = reread(&cp, &c).await?;
        work(cp.clone(), now).await
    })
    .await
}

/// Destroy a capsule on its agent and record it `stopped` (nothing
/// happens to one that is already stopped). Whether this call stopped it.
/// Under the capsule's lifecycle lock, to its end ([`locked`]).
pub async fn destroy_capsule(cp: &Cp, c: &CapsuleRow, actor: Actor) -> ApiResult<bool> {
    locked(cp, c, move |cp, now| async move {
        match now {
            Some(c) if c.status != Status::Stopped => {
                destroy_locked(&cp, &c, actor).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    })
    .await
}

/// Destroy `c` (as read under its lifecycle lock, which the caller holds).
pub(crate) async fn destroy_locked(cp: &Cp, c: &CapsuleRow, actor: Actor) -> ApiResult<()> {
    if let Some(host) = c.host_id.as_ref().and_then(|h| cp.hosts.get(h)) {
        // `stopping` while the agent works: nobody is shown a capsule the
        // agent has already let go of as running. Recorded before the
        // route goes, so a client whose stream the eviction cuts, and who
        // asks right away, is told the capsule is gone.
        cp.db
            .transition(&c.id, &[c.status], Status::Stopping)
            .await?;
        cp.proxy_routes.evict(&c.id);
        if let Err(e) = host.destroy(&c.id).await {
            cp.db
                .transition(&c.id, &[Status::Stopping], c.status)
                .await?;
            return Err(ApiError::agent(&e));
        }
    } else if c.host_id.is_some() && c.status != Status::Error {
        return Err(ApiError::host_unavailable(
            "the capsule's host is not reachable",
        ));
    }
    if let Some(stopped) = cp.db.transition(&c.id, &[], Status::Stopped).await? {
        cp.proxy_routes.evict(&c.id);
        log(cp, &c.id, "info", "destroyed").await;
        crate::api::snapshots::collect_layers(cp, &c.agent_template).await;
        cp.events
            .publish(capsule_event(Kind::CapsuleDestroy, &stopped, actor).outcome(Ok(())));
    }
    Ok(())
}

/// `POST /v1/capsules/{id}/pause`
pub async fn pause(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<CapsuleJson>> {
    let (c, host) = super::running_quiet(&cp, &caller, &id).await?;
    let paused = pause_capsule(&cp, &c, &host, Actor::key(&caller)).await?;
    Ok(Json(CapsuleJson::from(&paused)))
}

/// Pause a running capsule (its metrics are kept first; its proxy routes
/// and streams end). Under the capsule's lifecycle lock, to its end.
pub async fn pause_capsule(
    cp: &Cp,
    c: &CapsuleRow,
    host: &Arc<crate::hosts::HostConn>,
    actor: Actor,
) -> ApiResult<CapsuleRow> {
    let host = host.clone();
    locked(cp, c, move |cp, now| async move {
        let c = now.ok_or_else(gone)?;
        if c.status != Status::Running {
            return Err(ApiError::invalid_state(format!(
                "capsule is not running (status: {})",
                c.status
            )));
        }
        pause_locked(&cp, &c, &host, actor).await
    })
    .await
}

/// The capsule disappeared under a lifecycle operation.
fn gone() -> ApiError {
    ApiError::not_found("capsule not found")
}

/// Pause `c` (running, as read under its lifecycle lock, which the
/// caller holds).
pub(crate) async fn pause_locked(
    cp: &Cp,
    c: &CapsuleRow,
    host: &crate::hosts::HostConn,
    actor: Actor,
) -> ApiResult<CapsuleRow> {
    crate::api::stats::flush_metrics(cp, host, c).await;
    if let Err(e) = host.rpc.pause_capsule(cref(&c.id)).await {
        let err = super::refresh_after(cp, c, host, ApiError::agent(&e)).await;
        cp.events
            .publish(capsule_event(Kind::CapsulePause, c, actor).outcome(Err(err.message.clone())));
        return Err(err);
    }
    // (recorded first: a proxy lookup that raced the eviction then finds
    // the capsule paused when it checks again)
    let paused = cp
        .db
        .transition(&c.id, &[Status::Running], Status::Paused)
        .await;
    cp.proxy_routes.evict(&c.id);
    let paused =
        paused?.ok_or_else(|| ApiError::conflict("the capsule changed state during pause"))?;
    log(cp, &c.id, "info", "paused (memory kept)").await;
    cp.events
        .publish(capsule_event(Kind::CapsulePause, &paused, actor).outcome(Ok(())));
    Ok(paused)
}

/// `POST /v1/capsules/{id}/resume`
pub async fn resume(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<CapsuleJson>> {
    let c = owned(&cp, &caller, &id).await?;
    // An E2B sandbox's deadline that passed while it was paused would end
    // it as soon as it runs: it gets E2B's default timeout from now.
    if c.status == Status::Paused && c.end_at.is_some_and(|e| e <= now_ms()) {
        let end = now_ms() + crate::e2b::sandboxes::DEFAULT_TIMEOUT * 1000;
        cp.db.set_deadline(&c.id, Some(end), c.on_timeout).await?;
    }
    let resumed = resume_capsule(&cp, &c, Actor::key(&caller)).await?;
    Ok(Json(CapsuleJson::from(&resumed)))
}

/// Whether `c`'s host has room for it running again, as placement counts
/// (a paused capsule holds a quarter of what it takes running): else 503,
/// as a create that does not fit. Without the check, pausing capsules to
/// make room for more and resuming them all overcommitted a host about 4×.
async fn room_to_resume(cp: &Cp, c: &CapsuleRow) -> ApiResult<()> {
    let Some(host_id) = &c.host_id else {
        return Ok(());
    };
    let Some(host) = cp.db.host(host_id).await? else {
        return Ok(());
    };
    let (rv, rm, pv, pm) = cp.db.host_load(host_id).await?;
    let without = (rv, rm, (pv - c.vcpus).max(0), (pm - c.memory_mb).max(0));
    match crate::hosts::score(&host, without, c.vcpus, c.memory_mb) {
        Some(_) => Ok(()),
        None => Err(ApiError::host_unavailable(format!(
            "host {host_id} has no room to resume this capsule ({} vCPUs, {} MiB) now",
            c.vcpus, c.memory_mb
        ))),
    }
}

/// Resume a paused capsule. Under its lifecycle lock, to its end.
pub async fn resume_capsule(cp: &Cp, c: &CapsuleRow, actor: Actor) -> ApiResult<CapsuleRow> {
    locked(cp, c, move |cp, now| async move {
        resume_locked(&cp, &now.ok_or_else(gone)?, actor).await
    })
    .await
}

/// Resume `c` (as read under its lifecycle lock, which the caller holds).
pub(crate) async fn resume_locked(cp: &Cp, c: &CapsuleRow, actor: Actor) -> ApiResult<CapsuleRow> {
    if c.status != Status::Paused {
        return Err(ApiError::invalid_state(format!(
            "capsule is not paused (status: {})",
            c.status
        )));
    }
    let host = host_of(cp, c)?;
    // Placement's lock: a create meanwhile sees the capsule at its running
    // weight, not its paused one (held through the agent's resume).
    let placing = cp.placing().await?;
    room_to_resume(cp, c).await?;
    if let Err(e) = host.rpc.resume_capsule(cref(&c.id)).await {
        drop(placing);
        let err = super::refresh_after(cp, c, &host, ApiError::agent_placing(&e)).await;
        cp.events.publish(
            capsule_event(Kind::CapsuleResume, c, actor).outcome(Err(err.message.clone())),
        );
        return Err(err);
    }
    let resumed = cp
        .db
        .transition(&c.id, &[Status::Paused], Status::Running)
        .await?
        .ok_or_else(|| ApiError::conflict("the capsule changed state during resume"))?;
    drop(placing);
    log(cp, &c.id, "info", "resumed").await;
    cp.events
        .publish(capsule_event(Kind::CapsuleResume, &resumed, actor).outcome(Ok(())));
    Ok(resumed)
}

/// `POST /v1/capsules/{id}/ping` — resets the inactivity timer; 204.
pub async fn ping(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let (c, host) = super::running_quiet(&cp, &caller, &id).await?;
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
